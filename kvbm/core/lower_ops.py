"""The tiers below host memory as :class:`~kvbm.BlockManager` sees them: opening them, storing
G2 pages down, and what their workers report back (stores, loads, removals, pages other
writers put in a shared bucket), applied on the owner thread.

Methods of :class:`~kvbm.BlockManager`, written as functions of the manager (``mgr``) and
assigned in its class body: one state, one class, modules of one job each.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from kvbm.core.handles import StageHandle
from kvbm.core.tier_state import (
    ANNOUNCED,
    LOWER_BITS,
    Discovered,
    LoadContext,
    Removal,
    StoreContext,
    StoreTier,
)
from kvbm.errors import TransferError
from kvbm.events import BlockRemoved
from kvbm.exitflush import exit_flush
from kvbm.index import BlockRecord
from kvbm.medium import Medium
from kvbm.offload import OffloadEngine, TransferHandle, TransferKind, TransferStatus

if TYPE_CHECKING:
    from kvbm.manager import BlockManager
    from kvbm.storage.base import PageStore, RemovalReason

log = logging.getLogger(__name__)


def _open_lower_tiers(mgr: BlockManager) -> None:
    from kvbm.tiers import open_store

    oc = mgr.config.offload
    host = mgr.config.host
    assert host is not None
    # Pages in flight to a tier are pinned in G2: at most half of G2, so that G2 always
    # keeps room to stage loads and to take new offloads.
    inflight = max(1, min(oc.max_inflight_pages, host.num_blocks // 2))
    mgr._engine = OffloadEngine(max_inflight_pages=inflight,
                                 batch_bytes=oc.batch_bytes, on_complete=mgr._inbox.put)
    try:
        for cfg in mgr.config.lower_tiers:
            store: PageStore = mgr._engine.run(open_store(cfg, mgr.layout, mgr))
            mgr._engine.add_tier(store)
            lt = StoreTier(store)
            mgr._lower.append(lt)
            mgr._orphans.or_many(mgr._engine.run(store.keys()), lt.bit)
    except BaseException:
        with contextlib.suppress(TransferError):  # the opening error is the one to see
            mgr._engine.shutdown(flush=False)
        raise
    log.info("lower tiers: %s; %d stored pages found", [t.medium.value for t in mgr._lower],
             len(mgr._orphans))
    if oc.exit_flush_timeout_s > 0:
        exit_flush.add(mgr)


def on_removed(mgr: BlockManager, medium: Medium, keys: Sequence[int],
               reason: RemovalReason) -> None:
    """TierListener: a tier dropped pages (called on the tier's threads)."""
    mgr._inbox.put(Removal(medium, list(keys)))


def on_discovered(mgr: BlockManager, medium: Medium, keys: Sequence[int]) -> None:
    """TierListener (optional): a tier shared with other writers found pages they
    stored (called on the tier's threads). They are matched like pages found at open."""
    mgr._inbox.put(Discovered(medium, list(keys)))


def _store_down(mgr: BlockManager, recs: Sequence[BlockRecord]) -> None:
    """Queue G2-resident ``recs`` for every lower tier that lacks them (inclusive tiers).
    Their G2 pages stay pinned until the store finishes. What the tier's in-flight bound
    has no room for now waits (unpinned: G2 may still evict it) and is submitted as
    earlier stores finish; nothing blocks."""
    engine, g2 = mgr._engine, mgr._g2
    if engine is None or g2 is None or not recs:
        return
    pool = mgr._host_pool()
    assert pool is not None
    for lt in mgr._lower:
        todo = [r for r in recs if r.g2 >= 0 and not r.mask & lt.bit
                and r.seq_hash not in lt.inflight]
        room = max(0, engine.store_room(lt.medium))
        for r in todo[room:]:
            lt.deferred[r.seq_hash] = r
        todo = todo[:room]
        if todo and mgr._check_hook is not None:
            todo = mgr._checked_pages(todo)
        if not todo:
            continue
        for r in todo:
            lt.deferred.pop(r.seq_hash, None)
            mgr._hold(g2, r)
            lt.inflight.add(r.seq_hash)
        engine.submit(TransferHandle(TransferKind.STORE, lt.medium,
                                     [r.seq_hash for r in todo],
                                     [pool.page(r.g2) for r in todo],
                                     context=StoreContext(lt, [(r, r.g2) for r in todo]),
                                     parents=[r.parent_hash for r in todo]))


def _store_deferred(mgr: BlockManager, lt: StoreTier) -> None:
    """Submit the deferred stores of ``lt`` that its in-flight bound has room for now."""
    if not lt.deferred or mgr._engine is None:
        return
    room = mgr._engine.store_room(lt.medium)
    batch: list[BlockRecord] = []
    for h in list(lt.deferred):
        if len(batch) >= room:
            break
        r = lt.deferred.pop(h)
        if r.g2 >= 0 and not r.mask & lt.bit and mgr._index.get(h) is r:
            batch.append(r)
    if batch:
        mgr._store_down(batch)


def _on_stored(mgr: BlockManager, th: TransferHandle) -> None:
    ctx: StoreContext = th.context
    lt, pages = ctx.tier, ctx.pages
    g2 = mgr._g2
    assert g2 is not None
    stored: list[BlockRecord] = []
    if th.status is not TransferStatus.DONE:
        lt.failed += len(pages)
    for (rec, slot), ok in zip(pages, th.results, strict=True):
        lt.inflight.discard(rec.seq_hash)
        if rec.g2 == slot:
            mgr._unhold(g2, rec)
        else:  # forgotten meanwhile: the page was detached and is ours to free
            mgr._release_one(g2, slot)
        if not ok:
            continue
        lt.stored += 1
        if not rec.mask:  # forgotten meanwhile; maybe recomputed under a new record
            cur = mgr._index.get(rec.seq_hash)
            if cur is None:
                mgr._orphans[rec.seq_hash] = mgr._orphans.get(rec.seq_hash, 0) | lt.bit
                continue
            rec = cur
        if not rec.mask & lt.bit:
            rec.mask |= lt.bit
            stored.append(rec)
    mgr._sink.emit_stored(stored, lt.medium)
    mgr._store_deferred(lt)


def _reports_misses(mgr: BlockManager, medium: Medium) -> bool:
    from kvbm.storage.base import Capability

    return any(lt.medium is medium and lt.store.capabilities & Capability.REPORTS_MISSES
               for lt in mgr._lower)


def _on_discovered(mgr: BlockManager, item: Discovered) -> None:
    """Pages of a lower tier this manager did not store: unlinked (``_orphans``) until a
    match links them, as at open; a block already indexed gains the tier's residency."""
    lt = next((t for t in mgr._lower if t.medium is item.medium), None)
    if lt is None:
        return
    bit, orphans = lt.bit, mgr._orphans
    gained: list[BlockRecord] = []
    unlinked: list[int] = []
    for k in item.keys:
        rec = mgr._index.get(k)
        if rec is not None:
            if not rec.mask & bit:
                rec.mask |= bit
                gained.append(rec)
            continue
        was = orphans.get(k)
        if was & ANNOUNCED and not was & bit:
            # Compacted without its tokens, it cannot announce the new copy: it becomes
            # unannounced, and the match that links it announces every copy.
            orphans[k] = (was & LOWER_BITS) | bit
            mgr._announced -= 1
        elif not was & bit:
            unlinked.append(k)
    orphans.or_many(unlinked, bit)
    mgr._sink.emit_stored(gained, lt.medium)


def _on_removed(mgr: BlockManager, item: Removal) -> None:
    bit = item.medium.bit
    gone: list[BlockRecord] = []
    announced: list[int] = []  # compacted blocks whose copy there was announced
    for k in item.keys:
        rec = mgr._index.get(k)
        if rec is not None and rec.mask & bit:
            rec.mask &= ~bit
            gone.append(rec)
        elif k in mgr._orphans:
            was = mgr._orphans[k]
            left = was & ~bit
            if was & ANNOUNCED and was & bit:
                announced.append(k)
            if left & LOWER_BITS:
                mgr._orphans[k] = left
            else:
                del mgr._orphans[k]
                mgr._announced -= bool(was & ANNOUNCED)
    if gone or announced:
        mgr._sink.emit(BlockRemoved([r.seq_hash for r in gone] + announced, item.medium))
    for r in gone:
        if r.mask == 0 and mgr._index.get(r.seq_hash) is r:
            mgr._forget(r)


def _on_loaded(mgr: BlockManager, th: TransferHandle) -> None:
    lctx: LoadContext = th.context
    handle, medium, positions = lctx.handle, lctx.medium, lctx.positions
    for i, ok in zip(positions, th.results, strict=True):
        handle._ok[i] = ok
    if not all(th.results):
        # A tier that reports its definite misses itself (it has already: the listener
        # runs before completion) failed the others transiently, e.g. an unreachable
        # object store: keep their residency so that they are served once it answers.
        # Any other tier's failed load is taken as "not there any more".
        missing = [handle._recs[i].seq_hash for i, ok in zip(positions, th.results,
                                                               strict=True) if not ok]
        if th.status is not th.status.FAILED and not mgr._reports_misses(medium):
            mgr._on_removed(Removal(medium, missing))
    else:
        mgr._onboarded[medium] += len(positions)
    handle._pending -= 1
    if handle._pending == 0:
        if isinstance(handle, StageHandle):
            mgr._finish_stage(handle)
        else:
            mgr._finish_onboard(handle)
    # Loads count against the tier's in-flight bound: stores deferred behind them can
    # go down now (nothing else may finish soon to submit them).
    for lt in mgr._lower:
        if lt.medium is medium:
            mgr._store_deferred(lt)

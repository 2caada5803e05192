"""The host-level API of :class:`~kvbm.BlockManager` for an engine that owns G1 (vLLM through
the connector): stage G2 pages for the engine's own copies, reserve/commit/release host
pages, and the hooks that fill and check them.

Methods of :class:`~kvbm.BlockManager`, written as functions of the manager (``mgr``) and
assigned in its class body: one state, one class, modules of one job each.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from kvbm.checks import (
    as_count,
    check_hashes,
    check_id_container,
    check_keys,
    check_match,
    closed_error,
)
from kvbm.core.handles import OnboardStatus, StageHandle
from kvbm.core.tier_state import LoadContext, MemTier
from kvbm.errors import BlockStateError, ConfigError, InvalidArgumentError
from kvbm.hashing import BlockHashes, as_token_array, check_lora_name, hash_blocks
from kvbm.index import BlockRecord, MatchResult
from kvbm.medium import Medium
from kvbm.offload import TransferHandle, TransferKind

if TYPE_CHECKING:
    from kvbm.manager import BlockManager

log = logging.getLogger(__name__)


def stage(mgr: BlockManager, match: MatchResult, start_block: int = 0) -> StageHandle:
    """Hold the G2 pages of the matched blocks from ``start_block`` on, loading into G2
    (through the offload engine, in the background) those only disk or object storage
    holds. For an engine that owns G1: a mover copies the pages into the engine's memory
    (see :mod:`kvbm.core.plans`), then :meth:`StageHandle.release` gives them back.

    No I/O on the calling thread. Without room in G2 for the loads, the prefix ends
    before the first block to load (a miss, not an error).
    """
    if mgr._closed:
        raise closed_error()
    check_match(match)
    start_block = as_count(start_block, "start_block")
    g2 = mgr._g2
    if g2 is None:
        raise ConfigError("stage needs a host tier (config.host)")
    mgr._drain()
    recs = mgr._matched(match)[start_block:]
    staged_recs = [r for r in recs if r.g2 < 0]
    if staged_recs and not mgr._has_room(g2, len(staged_recs), recs):
        recs = recs[: recs.index(staged_recs[0])]
        staged_recs = []
        mgr._staging_misses += 1
    # The pages held, by position, as they are now: an eviction below may forget a held
    # block (its unheld parent before start_block left every tier), detaching its page.
    held = {i: r.g2 for i, r in enumerate(recs) if r.g2 >= 0}
    for r in recs:
        if r.g2 >= 0:
            mgr._hold(g2, r)
    taken = mgr._take(g2, len(staged_recs)) if staged_recs else []
    # Evictions made while taking pages may have dropped blocks of the prefix (lineage):
    # the prefix ends before the first such block.
    alive = len(recs)
    for i, r in enumerate(recs):
        if r.mask == 0:
            alive = i
            break
    slots: list[int] = []
    staged: dict[int, int] = {}
    loads: dict[Medium, list[tuple[int, BlockRecord, int]]] = {}
    it = iter(taken)
    for i, r in enumerate(recs):
        if i in held:
            slots.append(held[i])
            continue
        s = next(it)
        if i >= alive:
            g2.alloc.free([s])
            slots.append(-1)
            continue
        staged[i] = s
        slots.append(s)
        src = Medium.DISK if r.mask & Medium.DISK.bit else Medium.OBJECT
        loads.setdefault(src, []).append((i, r, s))
    if alive < len(recs):
        for i in range(alive, len(recs)):
            if i in held:  # (a detached page is freed by its last release)
                mgr._release_one(g2, held[i])
        recs, slots = recs[:alive], slots[:alive]
    handle = StageHandle(mgr, recs, start_block, slots, staged, len(loads))
    if not loads:
        mgr._touch(recs)
        return handle
    mgr._busy.update(r.seq_hash for r in recs)
    engine, pool = mgr._engine, mgr._host_pool()
    assert engine is not None and pool is not None
    for medium, items in loads.items():
        handle.loading_from[medium] = len(items)
        engine.submit(TransferHandle(
            TransferKind.LOAD, medium, [r.seq_hash for _, r, _ in items],
            [pool.page(a) for _, _, a in items],
            context=LoadContext(handle, medium, [i for i, _, _ in items])))
    return handle


def stageable(mgr: BlockManager, match: MatchResult, start_block: int = 0) -> int:
    """How many blocks of ``match`` from ``start_block`` on :meth:`stage` could hold now
    (no I/O): those in G2, then as far as G2 has room to load the ones only below. An
    engine promises no more than this (a promise :meth:`stage` then cuts is a load
    error, not a miss)."""
    if mgr._closed:
        raise closed_error()
    check_match(match)
    start_block = as_count(start_block, "start_block")
    g2 = mgr._g2
    if g2 is None:
        raise ConfigError("stageable needs a host tier (config.host)")
    mgr._drain()
    recs = mgr._matched(match)[start_block:]
    below = [i for i, r in enumerate(recs) if r.g2 < 0]
    if below and not mgr._has_room(g2, len(below), recs):
        return below[0]
    return len(recs)


def reserve_host(mgr: BlockManager, seq_hashes: Sequence[int]) -> list[int]:
    """G2 pages for a mover to write blocks into (engine-owned G1), one per hash, for
    as long a prefix of ``seq_hashes`` as G2's admission and room allow (evicting by
    its policy). Each page is held until :meth:`commit_host` or :meth:`release_host`."""
    if mgr._closed:
        raise closed_error()
    hashes = list(check_id_container(seq_hashes, "seq_hashes", ordered=True))
    check_keys(hashes, "seq_hashes")
    g2 = mgr._g2
    if g2 is None:
        raise ConfigError("reserve_host needs a host tier (config.host)")
    mgr._drain()
    n = len(hashes)
    if g2.admission is not None:
        admit = g2.admission.admit
        for i, h in enumerate(hashes):
            if not admit(h):
                g2.rejected += n - i
                n = i
                break
    room = g2.alloc.num_free + g2.evictable()
    if n > room:
        g2.skipped += n - room
        n = room
    return mgr._take(g2, n) if n > 0 else []


def commit_host(mgr: BlockManager, slots: Sequence[int], token_ids: Any, *,
                start_block: int = 0, hashes: BlockHashes | None = None,
                lora_name: str | None = None) -> list[bool]:
    """Register G2 pages a mover has written (reserved with :meth:`reserve_host`):
    ``slots[i]`` holds block ``start_block + i`` of ``token_ids``. The pages become
    cached blocks of G2 (stored down to the lower tiers as configured). A block whose
    parent is no longer cached cannot be matched, so it and the rest are given back.
    Returns, per page, whether it was kept as the block's G2 copy (a block already in
    G2 keeps its page; the new one is freed)."""
    if mgr._closed:
        raise closed_error()
    slots = check_id_container(slots, "slots", ordered=True)
    start_block = as_count(start_block, "start_block")
    check_lora_name(lora_name)
    tokens = as_token_array(token_ids)
    if hashes is None:
        hashes = hash_blocks(tokens, mgr.block_size, lora_name=lora_name,
                             salt=mgr.config.salt)
    else:
        check_hashes(hashes)
    g2 = mgr._g2
    if g2 is None:
        raise ConfigError("commit_host needs a host tier (config.host)")
    mgr._drain()
    ids = [g2.alloc.check(s) for s in slots]
    if len(set(ids)) != len(ids):
        raise BlockStateError(f"duplicate slots in commit_host: {list(slots)}")
    for s in ids:
        if g2.alloc.refcount(s) != 1 or g2.owner[s] is not None:
            raise BlockStateError(f"G2 page {s} is not a page reserved with reserve_host")
    end = start_block + len(ids)
    if end > len(hashes) or end * mgr.block_size > tokens.size:
        raise BlockStateError(
            f"commit_host of blocks [{start_block}, {end}) but the tokens hold "
            f"{min(len(hashes), tokens.size // mgr.block_size)} full blocks")
    parent: BlockRecord | None = None
    if start_block > 0:
        parent = mgr._parent_of(hashes, start_block, tokens, lora_name)
    kept: list[bool] = []
    placed: list[BlockRecord] = []
    relinked: list[BlockRecord] = []
    recs: list[BlockRecord] = []
    bs4 = mgr.block_size * 4
    tok_bytes = tokens[: end * mgr.block_size].tobytes()
    for i, s in enumerate(ids):
        pos = start_block + i
        if pos > 0 and parent is None:  # lineage broken: nothing below can be matched
            g2.alloc.free([s])
            kept.append(False)
            continue
        h = hashes.sequence[pos]
        rec = mgr._index.get(h)
        if rec is None:
            rec = BlockRecord(h, hashes.local[pos], parent,
                              tok_bytes[pos * bs4: (pos + 1) * bs4], lora_name)
            if mgr._orphans and h in mgr._orphans and mgr._unorphan(rec):
                relinked.append(rec)
            mgr._index.insert(rec)
        if rec.g2 >= 0:
            g2.alloc.free([s])
            kept.append(False)
            mgr._deduplicated += 1
        else:
            mgr._place(g2, rec, s, pinned=False)
            placed.append(rec)
            kept.append(True)
        recs.append(rec)
        parent = rec
    mgr._committed += len(placed)
    mgr._offloaded += len(placed)
    mgr._sink.emit_stored(placed, Medium.CPU_PINNED)
    mgr._emit_relinked(relinked)
    mgr._touch(recs)
    mgr._store_down(placed)
    return kept


def release_host(mgr: BlockManager, slots: Iterable[int]) -> None:
    """Give back G2 pages reserved with :meth:`reserve_host` and not committed (a save
    that failed). Validates everything first."""
    if mgr._closed:
        raise closed_error()
    slots = check_id_container(slots, "slots", ordered=False)
    g2 = mgr._g2
    if g2 is None:
        raise ConfigError("release_host needs a host tier (config.host)")
    mgr._drain()
    ids = [g2.alloc.check(s) for s in slots]
    if len(set(ids)) != len(ids):
        raise BlockStateError(f"duplicate slots in release_host: {list(slots)}")
    for s in ids:
        if g2.alloc.refcount(s) != 1 or g2.owner[s] is not None:
            raise BlockStateError(f"G2 page {s} is not a page reserved with reserve_host")
    g2.alloc.free(ids)


def set_host_check_hook(
        mgr: BlockManager,
        hook: Callable[[list[tuple[int, int]]], list[bool]] | None) -> None:
    """Ask ``hook([(g2_slot, seq_hash), ...])`` whether each page still holds its block
    before it is stored to a tier below (an engine whose movers tag pages checks the
    tags). A page it refuses is not stored, and its G2 copy is dropped: a tier's
    checksum would otherwise vouch for whatever the page held."""
    if hook is not None and not callable(hook):
        raise InvalidArgumentError(f"hook must be callable or None, got {hook!r}")
    mgr._check_hook = hook


def _checked_pages(mgr: BlockManager, recs: list[BlockRecord]) -> list[BlockRecord]:
    assert mgr._check_hook is not None and mgr._g2 is not None
    ok = mgr._check_hook([(r.g2, r.seq_hash) for r in recs])
    bad = [r for r, good in zip(recs, ok, strict=True) if not good]
    if not bad:
        return recs
    log.error("kvbm: %d G2 page(s) no longer hold their block; not stored below, dropped",
              len(bad))
    mgr._bad_host_pages += len(bad)
    g2 = mgr._g2
    for r in bad:
        if r.g2 >= 0 and g2.alloc.refcount(r.g2) == 0 and mgr._index.get(r.seq_hash) is r:
            g2.policy.remove(r.seq_hash)
            mgr._evict(g2, r)
    # (an eviction may have taken descendants with it: lineage)
    return [r for r, good in zip(recs, ok, strict=True)
            if good and r.g2 >= 0 and mgr._index.get(r.seq_hash) is r]


def set_host_fill_hook(mgr: BlockManager, hook: Callable[[list[tuple[int, int]]], None] | None
                       ) -> None:
    """Call ``hook([(g2_slot, seq_hash), ...])`` on the owner thread whenever pages loaded
    from disk or object storage (verified by the tier) become G2 copies. An engine that
    tags pages for its movers (the vLLM connector) tags them there: the only moment the
    page is known to hold that block."""
    if hook is not None and not callable(hook):
        raise InvalidArgumentError(f"hook must be callable or None, got {hook!r}")
    mgr._fill_hook = hook


def _host_filled(mgr: BlockManager, recs: Sequence[BlockRecord]) -> None:
    if mgr._fill_hook is not None and recs:
        mgr._fill_hook([(r.g2, r.seq_hash) for r in recs])


def discard_host(mgr: BlockManager, seq_hashes: Sequence[int]) -> int:
    """Drop the G2 copies of these blocks (a mover found them damaged): they leave G2 as
    an eviction would (copies in lower tiers stay). Blocks not in G2, or whose page is
    held, are left alone. Returns how many were dropped."""
    if mgr._closed:
        raise closed_error()
    hashes = list(check_id_container(seq_hashes, "seq_hashes", ordered=False))
    check_keys(hashes, "seq_hashes")
    g2 = mgr._g2
    if g2 is None:
        raise ConfigError("discard_host needs a host tier (config.host)")
    mgr._drain()
    n = 0
    for h in hashes:
        rec = mgr._index.get(h)
        if rec is None or rec.g2 < 0 or g2.alloc.refcount(rec.g2) > 0:
            continue
        g2.policy.remove(h)
        mgr._evict(g2, rec)
        n += 1
    return n


def _device_tier(mgr: BlockManager) -> MemTier:
    """G1, for the calls that use kvbm's own device pool."""
    if mgr._g1 is None:
        raise ConfigError("this manager has no device tier of its own (device = none: the "
                          "engine owns G1); use stage/reserve_host/commit_host/"
                          "release_host and a mover")
    return mgr._g1


def _release_stage_tail(mgr: BlockManager, h: StageHandle, cut: int) -> None:
    """Give back the holds of ``h`` from ``cut`` on that are ready (staged pages are
    dealt with when their load finishes)."""
    g2 = mgr._g2
    assert g2 is not None
    for i in range(cut, len(h._recs)):
        if i not in h._staged:
            mgr._release_one(g2, h._slots[i])


def _finish_stage(mgr: BlockManager, h: StageHandle) -> None:
    """All loads of a stage finished: cache what arrived, cut at the first block that did
    not, give back what follows."""
    g2 = mgr._g2
    assert g2 is not None
    recs, staged = h._recs, h._staged
    mgr._unbusy(recs)
    cancelled = h._cut is not None
    cut = h._cut if h._cut is not None else len(recs)
    arrived: list[BlockRecord] = []
    for i in sorted(staged):
        s = staged[i]
        rec = recs[i]
        ok = h._ok.get(i, False) and mgr._index.get(rec.seq_hash) is rec
        keep = ok and i < cut and not cancelled
        if ok and rec.g2 < 0:
            mgr._place(g2, rec, s, pinned=keep)
            arrived.append(rec)
        else:
            g2.alloc.free([s])
            if ok and keep:  # a G2 copy appeared meanwhile: hold that one instead
                mgr._hold(g2, rec)
                h._slots[i] = rec.g2
        if not ok:
            cut = min(cut, i)
    mgr._host_filled(arrived)
    mgr._sink.emit_stored(arrived, Medium.CPU_PINNED)
    if not cancelled:
        mgr._release_stage_tail(h, cut)
        h.slots = h._slots[:cut]
        h.sequence_hashes = [r.seq_hash for r in recs[:cut]]
        h.status = OnboardStatus.DONE
    mgr._touch(recs[:cut])
    mgr._store_down(arrived)

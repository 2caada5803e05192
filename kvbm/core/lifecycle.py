"""Draining, flushing and closing a :class:`~kvbm.BlockManager`: the owner thread's inbox, the
waits for transfers in flight, and a close that loses nothing it was asked to keep.

Methods of :class:`~kvbm.BlockManager`, written as functions of the manager (``mgr``) and
assigned in its class body: one state, one class, modules of one job each.
"""

from __future__ import annotations

import copy
import logging
import queue
import threading
import time
from typing import TYPE_CHECKING

from kvbm.checks import as_seconds, closed_error, os_wait
from kvbm.core.tier_state import LOWER_BITS, Discovered, FlushTimeout, Removal
from kvbm.errors import InvalidArgumentError, TransferError
from kvbm.exitflush import exit_flush
from kvbm.index import BlockRecord
from kvbm.offload import TransferKind
from kvbm.reports import FlushResult

if TYPE_CHECKING:
    from kvbm.manager import BlockManager

log = logging.getLogger(__name__)


def poll(mgr: BlockManager) -> int:
    """Complete finished background transfers now (owner thread). Every other call does
    it too; an idle engine can call this to get offload events out sooner."""
    if mgr._closed:
        raise closed_error()
    return mgr._drain()


def _drain(mgr: BlockManager, *, block: bool = False, timeout: float | None = None) -> int:
    """Process the inbox on the owner thread. ``block``: wait for at least one item."""
    if mgr._copies:
        mgr._reap_copies()
    if mgr._compactable:
        mgr._compact()
    mgr._sink.serve_snapshot()
    if mgr._engine is None:
        return 0
    n = 0
    inbox = mgr._inbox
    if timeout is not None:  # (every call drains: nothing more on the common path)
        timeout = os_wait(timeout)  # callers loop until their own deadline
    while True:
        try:
            item = inbox.get(block=block and n == 0, timeout=timeout)
        except queue.Empty:
            return n
        n += 1
        if isinstance(item, Removal):
            mgr._on_removed(item)
        elif isinstance(item, Discovered):
            mgr._on_discovered(item)
        elif item.kind is TransferKind.STORE:
            mgr._on_stored(item)
        else:
            mgr._on_loaded(item)


def _quiesce(mgr: BlockManager, timeout: float = 60.0) -> None:
    """Wait until no store transfer is in flight (their G2 pages are pinned)."""
    deadline = time.monotonic() + timeout
    while any(lt.inflight for lt in mgr._lower):
        left = deadline - time.monotonic()
        if left <= 0:
            raise TransferError("offloads to lower tiers did not finish in time")
        mgr._drain(block=True, timeout=left)


def flush(mgr: BlockManager, timeout: float | None = None) -> FlushResult:
    """Write the committed blocks down to the tiers below host memory and return once
    each is in every such tier that admitted it (durable: see the class docstring).

    With ``host.eager_offload`` off, the blocks only G1 holds are first copied to G2
    (its admission permitting; parents first, as many at a time as G2 has room for, so
    G2 may be smaller than G1). Then every G2 page that a lower tier lacks is stored into
    it (offloads that backpressure skipped earlier included), within the tiers' in-flight
    bounds, and the flush waits until no store is in flight. A page a tier refuses (its
    admission, no room, an I/O error) is not retried: ``FlushResult.volatile`` counts
    the blocks left in no persistent tier. Without tiers below host memory there is
    nothing durable to write: it returns at once.

    ``timeout``: seconds, finite and >= 0; ``None`` waits as long as it takes (every
    tier operation has its own timeout). When it runs out,
    :class:`~kvbm.errors.TransferError` is raised; what was stored so far stays stored.
    """
    if mgr._closed:
        raise closed_error()
    limit = as_seconds(timeout, "timeout")
    result = mgr._flush(limit)
    if not result.complete:
        raise TransferError(f"flush did not finish within {limit} s: {result.volatile} "
                            f"committed blocks are in no tier below host memory yet")
    return result


def _flush(mgr: BlockManager, timeout: float | None) -> FlushResult:
    """:meth:`flush` without the checks; ``complete=False`` when time ran out."""
    deadline = None if timeout is None else time.monotonic() + timeout
    mgr._reap_copies(wait=True)  # offloads still copying: their stores go down now
    mgr._drain()
    engine, g2, host = mgr._engine, mgr._g2, mgr.config.host
    if engine is None or g2 is None or host is None or not mgr._lower:
        return FlushResult(0, {}, mgr._volatile())
    before = {lt.medium: (lt.stored, lt.failed) for lt in mgr._lower}
    every = 0
    for lt in mgr._lower:
        every |= lt.bit
    backlog: list[BlockRecord] = []
    if not host.eager_offload and mgr._g1 is not None:
        backlog = mgr._parents_first([r for r in mgr._device_tier().owner
                                       if r is not None and r.g2 < 0
                                       and r.mask & every != every])
    tried: set[int] = set()  # each page is offered to the tiers once per flush
    to_host = 0
    complete = True
    try:
        i = 0
        while True:
            mgr._store_backlog(tried, deadline)
            if i >= len(backlog):
                break
            # G1 -> G2 in chunks that G2 can take without evicting a page that has not
            # reached the tiers below yet, and that the tiers take without skipping.
            room = min(g2.alloc.num_free + g2.evictable(),
                       *(engine.store_room(lt.medium) for lt in mgr._lower))
            if room <= 0:
                if not mgr._transfers_in_flight():
                    break  # G2 is all held by the engine: the rest stays in G1
                mgr._wait_for_transfers(deadline)
                continue
            chunk = [r for r in backlog[i: i + room] if r.g1 >= 0 and r.g2 < 0]
            i += room
            tried.update(r.seq_hash for r in chunk)
            to_host += mgr._offload(chunk)
            mgr._reap_copies(wait=True)  # landed: their stores are submitted
    except FlushTimeout:
        complete = False
    stored = {lt.medium: lt.stored - before[lt.medium][0] for lt in mgr._lower}
    failed = sum(lt.failed - before[lt.medium][1] for lt in mgr._lower)
    return FlushResult(to_host, stored, mgr._volatile(), failed, complete)


def _store_backlog(mgr: BlockManager, tried: set[int], deadline: float | None) -> None:
    """Store every G2 page that a lower tier lacks (not in ``tried``) into it, parents
    first, within the in-flight bounds; return once no store is in flight."""
    engine, g2 = mgr._engine, mgr._g2
    assert engine is not None and g2 is not None
    mgr._drain()
    todo = mgr._parents_first([
        r for r in g2.owner if r is not None and r.seq_hash not in tried
        and any(not r.mask & lt.bit and r.seq_hash not in lt.inflight for lt in mgr._lower)])
    i = 0
    while i < len(todo) or any(lt.inflight for lt in mgr._lower):
        room = min(engine.store_room(lt.medium) for lt in mgr._lower)
        if i < len(todo) and room > 0:
            batch = [r for r in todo[i: i + room] if r.g2 >= 0]
            i += room
            tried.update(r.seq_hash for r in batch)
            mgr._store_down(batch)
            continue
        if not mgr._transfers_in_flight():  # pragma: no cover - room comes back
            break
        mgr._wait_for_transfers(deadline)


def _transfers_in_flight(mgr: BlockManager) -> bool:
    engine = mgr._engine
    return engine is not None and any(engine.inflight_pages(lt.medium)
                                      for lt in mgr._lower)


def _wait_for_transfers(mgr: BlockManager, deadline: float | None) -> None:
    """Complete at least one transfer, or raise :class:`FlushTimeout` at ``deadline``."""
    left = None if deadline is None else deadline - time.monotonic()
    if left is not None and left <= 0:
        raise FlushTimeout
    mgr._drain(block=True, timeout=left)


def _volatile(mgr: BlockManager) -> int:
    """Indexed blocks that no tier below host memory holds."""
    return sum(1 for r in mgr._index if not r.mask & LOWER_BITS)


def _parents_first(recs: list[BlockRecord]) -> list[BlockRecord]:
    """``recs`` ordered by depth in the prefix tree (stable): a prefix of the result
    that reached a tier is matchable there."""
    depth: dict[int, int] = {}

    def depth_of(r: BlockRecord) -> int:
        chain: list[BlockRecord] = []
        node: BlockRecord | None = r
        while node is not None and id(node) not in depth:
            chain.append(node)
            node = node.parent
        d = -1 if node is None else depth[id(node)]
        for x in reversed(chain):
            d += 1
            depth[id(x)] = d
        return d

    return sorted(recs, key=depth_of)


def close(mgr: BlockManager, *, flush: bool | None = None,
          timeout: float | None = None) -> None:
    """Flush (when ``flush``, default ``config.offload.flush_on_close``: see
    :meth:`flush`), stop the offload engine and close the lower tiers. Idempotent.

    Waits at most ``timeout`` seconds (default ``config.offload.close_timeout_s``), plus
    a second for the workers to stop; a flush that runs out of time is logged as a
    warning, not raised (call :meth:`flush` first to know). Loads still pending end
    with the prefix cut before them. Afterwards every call but the few listed in the
    class docstring raises :class:`~kvbm.errors.ClosedError`.
    """
    if mgr._closed:
        return
    if flush is not None and not isinstance(flush, bool):
        raise InvalidArgumentError(f"flush must be true, false or None, got {flush!r}")
    limit = as_seconds(timeout, "timeout")
    oc = mgr.config.offload
    mgr._shutdown(oc.flush_on_close if flush is None else flush,
                   oc.close_timeout_s if limit is None else limit)


def _shutdown(mgr: BlockManager, flush: bool, limit: float) -> FlushResult | None:
    exit_flush.discard(mgr)
    engine = mgr._engine
    result = None
    try:
        mgr._reap_copies(wait=True)
        if mgr._copier is not None:
            mgr._copier.close()
        if engine is not None:
            deadline = time.monotonic() + limit
            try:
                if flush:
                    result = mgr._flush(limit)
                    if not result.complete:
                        log.warning("close: the flush did not finish within %.1f s; %d "
                                    "committed blocks are in no tier below host memory",
                                    limit, result.volatile)
            finally:  # whatever happened, the workers stop and the manager closes
                try:
                    engine.shutdown(flush=flush,
                                    timeout=max(deadline - time.monotonic(), 1.0))
                except TransferError as e:
                    log.warning("close: %s", e)
                # What the workers finished or cancelled: unpins G2 pages and ends the
                # onboards still pending.
                mgr._drain()
                mgr._final_lower = {
                    lt.medium: (copy.deepcopy(lt.store.stats()),
                                copy.deepcopy(engine.stats(lt.medium)))
                    for lt in mgr._lower}
                mgr._engine = None
    finally:
        mgr._closed = True
        mgr._sink.close()
    return result


def _close_at_exit(mgr: BlockManager) -> None:
    """The exit flush (:class:`ExitFlush`): close a manager left open, and say so."""
    if mgr._closed:
        return
    owner = mgr._owner
    if owner is not threading.main_thread() and owner.is_alive():
        log.warning("kvbm: a BlockManager was not closed before exit and the thread that "
                    "built it (%s) is still running: not flushing it at exit (close() it "
                    "on that thread)", owner.name)
        return
    oc = mgr.config.offload
    t0 = time.monotonic()
    result = mgr._shutdown(oc.flush_on_close, oc.exit_flush_timeout_s)
    took = time.monotonic() - t0
    if result is None:
        log.warning("kvbm: a BlockManager was not closed before exit; closed it at exit "
                    "without flushing (offload.flush_on_close is off)")
    elif result.complete:
        log.warning("kvbm: a BlockManager was not closed before exit; flushed and closed "
                    "it at exit in %.2f s (%d blocks copied to host memory, stored: %s; "
                    "%d committed blocks in no persistent tier). Call close() before "
                    "the program ends.", took, result.to_host,
                    {m.value: n for m, n in result.stored.items()}, result.volatile)
    else:
        log.warning("kvbm: a BlockManager was not closed before exit, and the exit flush "
                    "ran out of time after %.1f s (offload.exit_flush_timeout_s): %d "
                    "committed blocks were not written to any persistent tier and are "
                    "lost. Call close() before the program ends.", took, result.volatile)


def __enter__(mgr: BlockManager) -> BlockManager:
    if mgr._closed:
        raise closed_error()
    return mgr


def __exit__(mgr: BlockManager, *exc: object) -> None:
    mgr.close()

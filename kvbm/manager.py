"""BlockManager: the engine's single entry point to the KV cache.

Synchronous and single-owner: the engine calls it from one thread. Lifecycle of a request::

    match = mgr.match_prefix(tokens)              # longest cached prefix, across tiers
    ids = mgr.onboard(match)                      # pin it in G1 (copying up what is lower)
    new = mgr.allocate(n_blocks - len(ids))       # pages for the rest
    ... the engine computes KV into mgr.block_view(i) for i in new ...
    ids += mgr.commit(new, tokens, start_block=len(ids), hashes=match.hashes)
    mgr.release(ids)                              # cached, evictable, still matchable

A committed block is named by its sequence hash; committing a block that is already cached
deduplicates it (the returned id is the existing page's). Committed blocks are offloaded to
the host tier eagerly (as Dynamo does) unless ``host.eager_offload`` is off, in which case a
block is written back to G2 when G1 evicts it.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from kvbm.checks import (
    U64,
    as_count,
    as_flag,
    check_hashes,
    check_id_container,
    check_match,
    closed_error,
)
from kvbm.config import DeviceTierConfig, ManagerConfig
from kvbm.core import compaction, host_api, lifecycle, lower_ops
from kvbm.core.event_sink import EventSink
from kvbm.core.handles import OnboardHandle, OnboardStatus, StageHandle
from kvbm.core.masks import MaskTable
from kvbm.core.tier_state import (
    ANNOUNCED,
    CLEAR_EVENT_BLOCKS,
    GPU_BIT,
    HOST_BIT,
    LOWER_BITS,
    Discovered,
    LoadContext,
    LocalCopy,
    MemTier,
    Removal,
    StoreTier,
    check_host_pool,
)
from kvbm.errors import (
    BlockStateError,
    ConfigError,
    InvalidKeyError,
    LayoutError,
    PoolExhaustedError,
    TokenError,
    TransferError,
)
from kvbm.events import AllBlocksCleared, BlockRemoved, KVEvent
from kvbm.hashing import (
    BlockHashes,
    MmHashes,
    as_token_array,
    check_lora_name,
    check_mm_hashes,
    hash_blocks,
)
from kvbm.index import BlockRecord, MatchResult, PrefixIndex
from kvbm.layout import KVLayout
from kvbm.medium import BEST_MEDIUM, Medium, mediums_of
from kvbm.memory.local_copy import InlineCopier, LocalCopier, make_copier
from kvbm.offload import OffloadEngine, TierQueueStats, TransferHandle, TransferKind
from kvbm.policies import make_admission, make_eviction
from kvbm.pool import DevicePool, HostPool
from kvbm.reports import ManagerStats, TierUsage

if TYPE_CHECKING:
    import torch

    from kvbm.events.nats import NatsEventPublisher
    from kvbm.events.publisher import ZmqEventPublisher
    from kvbm.storage.base import TierStats

log = logging.getLogger(__name__)

#: The handles an onboard or a stage returns live in kvbm.core.handles; named here too, beside
#: the calls that return them.
__all__ = ["BlockManager", "OnboardHandle", "OnboardStatus", "StageHandle"]

class BlockManager:
    """Owns the prefix index, the G1/G2 pools and their policies (see module docstring).

    Every public call validates its arguments before it changes anything and raises only
    :mod:`kvbm.errors` classes. After :meth:`close`, every call raises
    :class:`~kvbm.errors.ClosedError` except ``close()`` (idempotent), ``stats()`` (the last
    counters, those of the tiers below host memory as they were at close), ``take_events()``
    (the events of the close itself, e.g. the last stores of its flush) and the plain
    attributes ``closed``, ``layout``, ``config`` and ``block_size``.

    **Durability.** G1 (device) and G2 (host memory) are volatile: what only they hold is
    gone when the process ends. A block is durable in a tier below host memory once the
    ``BlockStored`` event for that medium has been emitted (drained with
    :meth:`take_events`), or once :meth:`flush` returned (for every tier that admitted it):

    * G3 (disk): a stored page survives ``kill -9`` of the process (and power loss with the
      default ``durability = "power_loss"``) and is served again after a restart.
    * G4 (object storage): a stored page is in the bucket and in the tier's local index.

    Offloads run in the background, so at any moment the newest blocks may not have reached
    those tiers yet; with ``host.eager_offload`` off, blocks reach G2 only when G1 evicts
    them (or on :meth:`offload` / :meth:`flush`). :meth:`close` flushes first
    (``offload.flush_on_close``, waiting at most ``offload.close_timeout_s``). A manager with
    tiers below host memory that is still open when the interpreter exits normally is
    flushed and closed then, with a warning, waiting at most ``offload.exit_flush_timeout_s``
    (0 turns that off); nothing runs on ``kill -9`` or ``os._exit``. That exit flush runs on
    the main thread, early in the interpreter's exit: an engine that drives the manager from
    another thread still running then should close it itself, and ``close()`` belongs before
    the end of the program, not in an ``atexit`` handler (by then the tiers' thread pools
    are shut down).
    """

    def __init__(self, layout: KVLayout, config: ManagerConfig | None = None, *,
                 host_pool: HostPool | None = None) -> None:
        if not isinstance(layout, KVLayout):
            raise LayoutError(f"layout must be a KVLayout, got {type(layout).__name__}")
        if config is None:
            config = ManagerConfig(device=DeviceTierConfig(num_blocks=1024))
        if not isinstance(config, ManagerConfig):
            raise ConfigError(f"config must be a ManagerConfig, got {type(config).__name__}")
        self._closed = False
        #: the thread that built the manager: its owner, as far as the exit flush can tell
        self._owner = threading.current_thread()
        #: the lower tiers' counters as they were at close (stats() stays readable)
        self._final_lower: dict[Medium, tuple[TierStats, TierQueueStats]] = {}
        self.layout = layout
        self.config = config
        self.block_size = layout.block_size
        self._index = PrefixIndex()
        if host_pool is not None:
            check_host_pool(host_pool, layout, config)
        dev = config.device
        #: G1, or None when the engine owns its KV memory (then only the host-level calls
        #: - stage, reserve_host, commit_host, release_host - move pages, through plans)
        self._g1: MemTier | None = None
        #: copies between G1 and G2 (standalone mode), and those not landed yet, oldest first
        self._copier: LocalCopier | None = None
        self._copies: collections.deque[LocalCopy] = collections.deque()
        if dev is not None:
            g1_pool = DevicePool(layout, dev.num_blocks, dev.device)
            self._g1 = MemTier(Medium.GPU, g1_pool, make_eviction(dev.eviction, dev.num_blocks),
                                None)
            self._copier = make_copier(dev.copies, g1_pool.device)
        #: copies that land within submit (a CPU G1): no holds while in flight, no landing
        #: step - the pages change hands in the same order as ever
        self._inline_copies = isinstance(self._copier, InlineCopier)
        self._g2: MemTier | None = None
        if config.host is not None:
            h = config.host
            pool = host_pool if host_pool is not None else HostPool(layout, h.num_blocks,
                                                                    h.pin_memory)
            self._g2 = MemTier(Medium.CPU_PINNED, pool,
                                make_eviction(h.eviction, h.num_blocks),
                                make_admission(h.admission, capacity=h.num_blocks)
                                if h.admission is not None else None)
        self._tiers = [t for t in (self._g1, self._g2) if t is not None]
        #: finished transfers and tier removals, in the order they happened (any thread)
        self._inbox: queue.SimpleQueue[TransferHandle | Removal | Discovered] = \
            queue.SimpleQueue()
        #: pages of persistent tiers not linked into the index (after a restart, or whose
        #: prefix left every memory tier): seq hash -> residency mask. A match re-links them.
        self._orphans = MaskTable()
        self._announced = 0  # entries of _orphans flagged ANNOUNCED
        #: records that became resident only below host memory: compacted at the next drain
        self._compactable: list[BlockRecord] = []
        #: sequence hashes of the blocks of onboards and stages still loading (not compacted)
        self._busy: collections.Counter[int] = collections.Counter()
        self._lower: list[StoreTier] = []
        self._engine: OffloadEngine | None = None
        self._sink = EventSink(self.block_size, config.max_pending_events)
        self._tick = 0
        self._lookups = 0
        self._query_blocks = 0
        self._hit_blocks = 0
        self._hits_by_medium = dict.fromkeys(Medium, 0)
        self._onboarded = dict.fromkeys(Medium, 0)
        self._committed = 0
        self._deduplicated = 0
        self._offloaded = 0
        self._staging_misses = 0  # onboards cut short: no G2 page to stage a lower-tier load
        self._fill_hook: Callable[[list[tuple[int, int]]], None] | None = None
        self._check_hook: Callable[[list[tuple[int, int]]], list[bool]] | None = None
        self._bad_host_pages = 0  # refused by the check hook before a store
        if config.events.enabled:
            # the snapshots that resync subscribers are built here, on the owner thread
            self._sink.start(config.events, self._residency_snapshot)
        if config.lower_tiers:
            try:
                self._open_lower_tiers()
            except BaseException:
                self._sink.close()
                raise

    # ------------------------------------------------------------------ engine-facing API --
    def match_prefix(self, tokens: Any, *, lora_name: str | None = None,
                     mm_hashes: MmHashes | None = None) -> MatchResult:
        """Hash the full blocks of ``tokens`` and find the longest prefix cached in any tier.

        Nothing is pinned until :meth:`onboard`. Pages of a persistent tier found under this
        prefix (after a restart) are linked into the index here.
        """
        if self._closed:
            raise closed_error()
        arr = as_token_array(tokens)
        hashes = hash_blocks(arr, self.block_size, lora_name=lora_name, mm_hashes=mm_hashes,
                             salt=self.config.salt)  # checks lora_name and mm_hashes too
        return self._match(hashes, lora_name, arr)

    def match_hashes(self, hashes: BlockHashes, *, lora_name: str | None = None,
                     tokens: Any = None) -> MatchResult:
        """:meth:`match_prefix` for hashes computed by the caller (``tokens``, when given,
        only fill the token ids of events)."""
        if self._closed:
            raise closed_error()
        check_hashes(hashes)
        check_lora_name(lora_name)
        arr = None if tokens is None else as_token_array(tokens)
        if arr is not None and arr.size < len(hashes) * self.block_size:
            raise TokenError(f"tokens hold {arr.size // self.block_size} full blocks but the "
                             f"hashes {len(hashes)}: pass the tokens the hashes were computed "
                             f"from (they fill the token ids of events)")
        return self._match(hashes, lora_name, arr)

    def _match(self, hashes: BlockHashes, lora_name: str | None,
               tokens: np.ndarray | None) -> MatchResult:
        self._drain()
        recs = self._index.match(hashes.sequence)
        masks = [r.mask for r in recs]
        seq = hashes.sequence
        if self._orphans and len(recs) < len(seq) and seq[len(recs)] in self._orphans:
            # Compacted blocks are only read here (onboard and stage link them); pages not
            # announced yet are linked now, which announces them.
            flags = self._orphans.get_many(np.asarray(seq[len(recs):], dtype=np.uint64))
            announced = (flags & ANNOUNCED) != 0
            stop = flags.size if announced.all() else int(announced.argmin())
            if stop < flags.size and flags[stop]:
                recs = self._linked(hashes, len(seq), tokens, lora_name)
                masks = [r.mask for r in recs]
            else:
                masks += (flags[:stop] & LOWER_BITS).tolist()
        # Per-block work stays on ints (Enum hashing is Python-level and slow): count the
        # masks, then map the few distinct ones to media.
        best = BEST_MEDIUM
        mediums = [best[m] for m in masks]
        by_medium: dict[Medium, int] = {}
        for mask, c in collections.Counter(masks).items():
            by_medium[best[mask]] = by_medium.get(best[mask], 0) + c
        self._lookups += 1
        self._query_blocks += len(hashes)
        self._hit_blocks += len(masks)
        for m, c in by_medium.items():
            self._hits_by_medium[m] += c
        out = MatchResult(len(masks), by_medium, hashes.sequence[: len(masks)], hashes, mediums,
                          lora_name)
        object.__setattr__(out, "_checked", True)  # frozen; not an init field on purpose
        # the tokens, for the records of compacted blocks that onboard or stage link back
        object.__setattr__(out, "_tokens", tokens)
        return out

    def onboard(self, match: MatchResult) -> list[int]:
        """Pin the matched prefix in G1, copying up the blocks held only in lower tiers, and
        wait for it (see :meth:`onboard_async`; a lower-tier load waits at most
        ``config.offload.load_timeout_s``).

        Returns the G1 block ids of the prefix, in order, each held once (release them with
        :meth:`release`). A block that left every tier since the match, or whose load failed,
        ends the prefix early, so the list can be shorter than ``match.num_blocks``. Raises
        :class:`~kvbm.errors.PoolExhaustedError`, changing nothing, when there is no room.
        """
        if self._closed:
            raise closed_error()
        return self.onboard_async(match).wait(self.config.offload.load_timeout_s)

    def onboard_async(self, match: MatchResult) -> OnboardHandle:
        """Start onboarding the matched prefix; blocks in G1 and G2 are ready at once, blocks
        only on disk or object storage are loaded (through G2) by the offload engine."""
        if self._closed:
            raise closed_error()
        check_match(match)
        self._drain()
        g1 = self._device_tier()
        recs = self._matched(match)
        missing = [r for r in recs if r.g1 < 0]
        staged = [r for r in missing if r.g2 < 0]
        if staged:
            g2 = self._g2
            assert g2 is not None, "a block outside G1 and G2 with no host tier"
            if not self._has_room(g2, len(staged), missing):
                # No staging pages in G2 (all in flight to a slow tier): the blocks below
                # are a miss this time, not an error; the prefix ends before the first one.
                recs = recs[: recs.index(staged[0])]
                missing = [r for r in recs if r.g1 < 0]
                staged = []
                self._staging_misses += 1
        self._check_room(g1, len(missing), recs)
        for r in recs:
            if r.g1 >= 0:
                self._hold(g1, r)
        direct = [r for r in missing if r.g2 >= 0]
        g1_slots: dict[int, int] = {}
        staging: dict[int, tuple[int, int]] = {}
        loads: dict[Medium, list[tuple[int, BlockRecord, int]]] = {}
        if missing:
            g2 = self._g2
            assert g2 is not None
            # The G2 copies are the sources: pin them so that evictions made while taking
            # pages (write-back may evict from G2) cannot drop them.
            for r in direct:
                self._hold(g2, r)
            s2 = self._take(g2, len(staged)) if staged else []
            s1 = self._take(g1, len(missing))
            src2 = [r.g2 for r in direct]
            if self._inline_copies:
                self._copier_of().submit(g2.pool, src2, g1.pool, s1[: len(direct)],
                                         order_consumer=True)
                for r, s in zip(direct, s1, strict=False):
                    self._unhold(g2, r)
                    self._place(g1, r, s, pinned=True)
            else:  # the G2 sources stay held until the copy has landed
                if direct:
                    self._copy(g2, src2, g1, s1[: len(direct)], g2_holds=src2)
                for r, s in zip(direct, s1, strict=False):
                    self._place(g1, r, s, pinned=True)
            self._onboarded[Medium.CPU_PINNED] += len(direct)
            self._sink.emit_stored(direct, Medium.GPU)
            pos = {id(r): i for i, r in enumerate(recs)}
            for r, a, b in zip(staged, s2, s1[len(direct):], strict=True):
                i = pos[id(r)]
                staging[i] = (a, b)
                g1_slots[i] = b
                src = Medium.DISK if r.mask & Medium.DISK.bit else Medium.OBJECT
                loads.setdefault(src, []).append((i, r, a))
        ids = [g1_slots.get(i, r.g1) for i, r in enumerate(recs)]
        handle = OnboardHandle(self, recs, ids, staging, len(loads))
        if not loads:
            self._touch(recs)
            return handle
        self._busy.update(r.seq_hash for r in recs)
        engine, g2pool = self._engine, self._host_pool()
        assert engine is not None and g2pool is not None
        for medium, items in loads.items():
            engine.submit(TransferHandle(
                TransferKind.LOAD, medium, [r.seq_hash for _, r, _ in items],
                [g2pool.page(a) for _, _, a in items],
                context=LoadContext(handle, medium, [i for i, _, _ in items])))
        return handle

    def allocate(self, n: int) -> list[int]:
        """``n`` fresh G1 pages for the engine to compute into (held once each)."""
        if self._closed:
            raise closed_error()
        n = as_count(n, "allocate: n")
        self._drain()
        g1 = self._device_tier()
        if n > g1.alloc.num_free + g1.evictable():
            raise PoolExhaustedError(f"{n} blocks requested; G1 has {g1.alloc.num_free} free and "
                                     f"{g1.evictable()} evictable")
        return self._take(g1, n)

    def commit(self, block_ids: Sequence[int], token_ids: Any, *, start_block: int = 0,
               hashes: BlockHashes | None = None, lora_name: str | None = None,
               mm_hashes: MmHashes | None = None) -> list[int]:
        """Register computed full blocks so later requests can match them.

        ``block_ids[i]`` holds block ``start_block + i`` of ``token_ids``. Blocks already
        cached are deduplicated: the returned list holds, per block, the id the engine must use
        from now on (the existing page, whose hold replaces the one on the passed page).
        """
        if self._closed:
            raise closed_error()
        block_ids = check_id_container(block_ids, "block_ids", ordered=True)
        start_block = as_count(start_block, "start_block")
        check_lora_name(lora_name)
        if hashes is not None:
            check_hashes(hashes)
            check_mm_hashes(mm_hashes)  # unused then, but malformed input is still refused
        tokens = as_token_array(token_ids)
        if hashes is None:
            hashes = hash_blocks(tokens, self.block_size, lora_name=lora_name,
                                 mm_hashes=mm_hashes, salt=self.config.salt)
        self._drain()
        g1 = self._device_tier()
        ids = [g1.alloc.check(b) for b in block_ids]
        if len(set(ids)) != len(ids):
            raise BlockStateError(f"duplicate block ids in commit: {list(block_ids)}")
        for b in ids:
            if g1.alloc.refcount(b) == 0:
                raise BlockStateError(f"block {b} is not held (allocate it first)")
            if g1.owner[b] is not None:
                raise BlockStateError(f"block {b} is already committed")
        end = start_block + len(ids)
        if end > len(hashes) or end * self.block_size > tokens.size:
            raise BlockStateError(
                f"commit of blocks [{start_block}, {end}) but the tokens hold "
                f"{min(len(hashes), tokens.size // self.block_size)} full blocks")
        parent: BlockRecord | None = None
        if start_block > 0:
            parent = self._parent_of(hashes, start_block, tokens, lora_name)
            if parent is None:
                raise BlockStateError(
                    f"the parent of block {start_block} ({hashes.sequence[start_block - 1]:#x}) "
                    f"is not cached; commit blocks in prefix order and keep the prefix held")
        if not ids:
            return []

        out: list[int] = []
        stored: list[BlockRecord] = []
        recs: list[BlockRecord] = []
        relinked: list[BlockRecord] = []
        orphans = self._orphans
        bs4 = self.block_size * 4
        tok_bytes = tokens[: end * self.block_size].tobytes()
        for i, b in enumerate(ids):
            pos = start_block + i
            h = hashes.sequence[pos]
            rec = self._index.get(h)
            if rec is None:
                rec = BlockRecord(h, hashes.local[pos], parent,
                                  tok_bytes[pos * bs4: (pos + 1) * bs4], lora_name)
                # Its page may still be in a persistent tier (its parent had left every
                # tier, so it was unlinked): the new record owns that copy again.
                if orphans and h in orphans and self._unorphan(rec):
                    relinked.append(rec)
                self._index.insert(rec)
                self._place(g1, rec, b, pinned=True)
                stored.append(rec)
                out.append(b)
            elif rec.g1 >= 0:
                # Same block already in G1: keep one page. The caller's hold moves to it.
                self._hold(g1, rec)
                g1.alloc.free([b])
                self._deduplicated += 1
                out.append(rec.g1)
            else:
                # Cached below G1 only: the freshly computed page becomes its G1 copy.
                self._place(g1, rec, b, pinned=True)
                stored.append(rec)
                out.append(b)
            recs.append(rec)
            parent = rec
        self._committed += len(ids)
        self._sink.emit_stored(stored, Medium.GPU)
        self._emit_relinked(relinked)
        self._touch(recs)
        if self._g2 is not None and self.config.host is not None and self.config.host.eager_offload:
            self._offload(recs)
        return out

    def release(self, block_ids: Iterable[int]) -> None:
        """Drop one hold on each block. A committed block stays cached (evictable); an
        uncommitted one goes back to the free list. Validates everything first: a block not
        held raises :class:`~kvbm.errors.BlockStateError` and nothing is released."""
        if self._closed:
            raise closed_error()
        block_ids = check_id_container(block_ids, "block_ids", ordered=False)
        self._drain()
        g1 = self._device_tier()
        alloc = g1.alloc
        check, refcount = alloc.check, alloc.refcount
        ids = [check(b) for b in block_ids]
        # The common call holds each id once: a set is enough to see that (Counter only
        # when there are repeats, for the message).
        counts = collections.Counter(ids) if len(set(ids)) != len(ids) else dict.fromkeys(ids, 1)
        for b, c in counts.items():
            if refcount(b) < c:
                raise BlockStateError(f"block {b} released {c} time(s) but held "
                                      f"{refcount(b)} time(s)")
        # Pages nobody committed go back in one free-list splice, in the order the one-by-one
        # release would give them.
        loose: list[int] = []
        owner, unpin, decref = g1.owner, g1.policy.unpin, alloc.decref
        for b in reversed(ids):  # tail first: see _touch
            if decref(b) == 0:
                rec = owner[b]
                if rec is None:  # an uncommitted (or detached) page
                    loose.append(b)
                else:
                    g1.pinned -= 1
                    unpin(rec.seq_hash)
        if loose:
            alloc.free(loose)

    def _release_one(self, tier: MemTier, slot: int) -> None:
        if tier.alloc.decref(slot) == 0:
            rec = tier.owner[slot]
            if rec is None:  # an uncommitted (or detached) page
                tier.alloc.free([slot])
            else:
                tier.pinned -= 1
                tier.policy.unpin(rec.seq_hash)

    def offload(self, block_ids: Iterable[int] | None = None) -> int:
        """Copy committed G1 blocks (all of them by default) to the host tier now.

        Returns how many blocks were newly written to G2 (admission and room permitting).
        """
        if self._closed:
            raise closed_error()
        if block_ids is not None:
            block_ids = check_id_container(block_ids, "block_ids", ordered=False)
        if self._g2 is None:
            raise ConfigError("offload needs a host tier (config.host)")
        self._drain()
        g1 = self._device_tier()
        if block_ids is None:
            recs = [r for r in g1.owner if r is not None]
        else:
            recs = []
            for b in [g1.alloc.check(b) for b in block_ids]:
                rec = g1.owner[b]
                if rec is None:
                    raise BlockStateError(f"block {b} is not committed")
                recs.append(rec)
        return self._offload(recs)

    def take_events(self) -> list[KVEvent]:
        """Drain the queued residency events, oldest first (also after :meth:`close`: the
        events of the close itself)."""
        self._drain()
        return self._sink.take()

    def clear(self) -> int:
        """Drop every cached block from every tier (vLLM's ``reset_prefix_cache``).

        Refused with :class:`~kvbm.errors.BlockStateError` while any block is held. Returns
        how many blocks were dropped. Events: a ``BlockRemoved`` for every block announced
        in host memory, disk or object storage, and ``AllBlocksCleared`` for G1 when this
        manager owns one (vLLM's event means its GPU cache: a router keeps the lower tiers
        of a worker on it, so kvbm withdraws them one by one). Pages of persistent tiers
        stay where they are, unlinked, and are found again by later matches.
        """
        if self._closed:
            raise closed_error()
        self._quiesce()
        for t in self._tiers:
            if t.alloc.num_free + len(t.policy) - t.pinned != t.alloc.num_slots or t.pinned:
                raise BlockStateError(f"cannot clear: blocks of {t.medium.value} are in use")
        n = len(self._index)
        for t in self._tiers:
            for slot, rec in enumerate(t.owner):
                if rec is not None:
                    t.policy.remove(rec.seq_hash)
                    t.owner[slot] = None
                    t.alloc.free([slot])
        n += self._announced
        gone: dict[Medium, list[int]] = {}
        if self._announced:  # compacted blocks announced in their lower tiers
            keys, masks = self._orphans.with_flag(ANNOUNCED)
            for m in mediums_of(LOWER_BITS):
                gone[m] = keys[(masks & m.bit) != 0].tolist()
            self._orphans.and_all(LOWER_BITS)
            self._announced = 0
        for rec in self._index:
            for m in mediums_of(rec.mask & ~GPU_BIT):
                gone.setdefault(m, []).append(rec.seq_hash)
            if rec.mask & LOWER_BITS:
                self._orphans[rec.seq_hash] = rec.mask & LOWER_BITS
            rec.mask, rec.g1, rec.g2, rec.children = 0, -1, -1, None
        self._index = PrefixIndex()
        self._compactable.clear()
        step = CLEAR_EVENT_BLOCKS
        for m, hs in gone.items():
            for i in range(0, len(hs), step):
                self._sink.emit(BlockRemoved(hs[i:i + step], m))
        if self._g1 is not None:
            self._sink.emit(AllBlocksCleared())
        return n

    # ------------------------------------------------- host-level API (engine-owned G1) --
    # ------------------------------------------------------------------------- data access --
    def block_view(self, block_id: int) -> torch.Tensor | list[torch.Tensor]:
        """The engine's view of one G1 block's KV (see :meth:`DevicePool.block_view`)."""
        if self._closed:
            raise closed_error()
        g1 = self._device_tier()
        return g1.pool.block_view(g1.alloc.check(block_id))

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called (or the exit flush closed the manager)."""
        return self._closed

    @property
    def kv_caches(self) -> list[torch.Tensor]:
        """The G1 tensors, one per layer (views into one buffer when fully contiguous)."""
        if self._closed:
            raise closed_error()
        pool = self._device_tier().pool
        assert isinstance(pool, DevicePool)
        return pool.layers

    @property
    def device_pool(self) -> DevicePool:
        if self._closed:
            raise closed_error()
        pool = self._device_tier().pool
        assert isinstance(pool, DevicePool)
        return pool

    @property
    def host_pool(self) -> HostPool | None:
        if self._closed:
            raise closed_error()
        return self._host_pool()

    def _host_pool(self) -> HostPool | None:
        if self._g2 is None:
            return None
        pool = self._g2.pool
        assert isinstance(pool, HostPool)
        return pool

    def lookup(self, seq_hash: int) -> BlockRecord | None:
        """The index record of a block (read-only use), or ``None``. A block held only
        below host memory whose record was compacted away (see :meth:`_compact`) comes back
        as a snapshot of its residency (``mask``; no parent, no tokens)."""
        if self._closed:
            raise closed_error()
        if isinstance(seq_hash, bool | np.bool_) or not isinstance(seq_hash, int | np.integer) \
                or not 0 <= seq_hash <= U64:
            raise InvalidKeyError(f"a block hash must be an int in [0, 2**64), got {seq_hash!r}")
        rec = self._index.get(int(seq_hash))
        if rec is None and self._orphans.get(int(seq_hash)) & ANNOUNCED:
            # compacted (only below host memory): a snapshot of its residency
            rec = BlockRecord(int(seq_hash), 0, None, b"", None)
            rec.mask = self._orphans.get(int(seq_hash)) & LOWER_BITS
        return rec

    def stats(self, *, drain: bool = True) -> ManagerStats:
        """A snapshot of the counters. ``drain=False`` skips completing finished transfers
        first (which only the owner thread may do): the form a metrics scrape on another
        thread uses; its numbers lag by the transfers not yet completed."""
        if as_flag(drain, "drain"):
            self._drain()
        tiers = {}
        for t in self._tiers:
            used = t.alloc.num_slots - t.alloc.num_free
            tiers[t.medium] = TierUsage(
                t.medium, t.alloc.num_slots, used, t.alloc.num_free,
                sum(1 for s in range(t.alloc.num_slots) if t.alloc.refcount(s) > 0)
                if t.is_g1 else t.pinned,
                len(t.policy), t.evictions, t.rejected, t.skipped)
        lower = dict(self._final_lower)  # after close: as they were then
        engine = self._engine  # read once: a metrics scrape (another thread) may race close()
        if engine is not None:
            for lt in self._lower:
                lower[lt.medium] = (lt.store.stats(), engine.stats(lt.medium))
        return ManagerStats(self._lookups, self._query_blocks, self._hit_blocks,
                            dict(self._hits_by_medium), self._committed, self._deduplicated,
                            dict(self._onboarded), self._offloaded,
                            len(self._index) + self._announced, self._sink.dropped, tiers,
                            lower, len(self._orphans) - self._announced,
                            self._staging_misses,
                            sum(len(c.g1_holds) + len(c.g2_holds) for c in self._copies))

    # ---------------------------------------------------------------------------- internals --
    def _hold(self, tier: MemTier, rec: BlockRecord) -> None:
        slot = tier.slot(rec)
        if tier.alloc.incref(slot) == 1:
            tier.pinned += 1
            tier.policy.pin(rec.seq_hash)

    def _unhold(self, tier: MemTier, rec: BlockRecord) -> None:
        slot = tier.slot(rec)
        if tier.alloc.decref(slot) == 0:
            tier.pinned -= 1
            tier.policy.unpin(rec.seq_hash)

    def _place(self, tier: MemTier, rec: BlockRecord, slot: int, *, pinned: bool) -> None:
        """Make ``slot`` (taken, refcount 1) the copy of ``rec`` in ``tier``."""
        tier.set_slot(rec, slot)
        tier.owner[slot] = rec
        rec.mask |= tier.bit
        tier.policy.insert(rec.seq_hash, rec.parent_hash, pinned=pinned)
        if pinned:
            tier.pinned += 1
        else:
            tier.alloc.decref(slot)

    def _take(self, tier: MemTier, n: int) -> list[int]:
        """``n`` pages of ``tier``, evicting by its policy; the caller checked there is room."""
        short = n - tier.alloc.num_free
        while short > 0:
            key = tier.policy.victim()
            if key is None:  # pragma: no cover - callers check evictable() first
                raise PoolExhaustedError(f"{tier.medium.value}: nothing left to evict")
            rec = self._index.get(key)
            assert rec is not None and tier.slot(rec) >= 0, "policy returned a non-resident key"
            self._evict(tier, rec)
            short = n - tier.alloc.num_free
        return tier.alloc.allocate(n)

    def _evict(self, tier: MemTier, rec: BlockRecord) -> None:
        """``rec`` was chosen as victim of ``tier`` (the policy already forgot it)."""
        slot = tier.slot(rec)
        host = self.config.host
        if (tier.is_g1 and self._g2 is not None and rec.g2 < 0 and host is not None
                and not host.eager_offload):
            # Write-back. Hold the page raw (the policy already forgot the key) so that a
            # lineage cascade triggered by G2's own evictions detaches it instead of freeing it.
            tier.alloc.incref(slot)
            tier.pinned += 1
            self._offload([rec], evicting=rec)
            tier.alloc.decref(slot)
            tier.pinned -= 1 if tier.slot(rec) >= 0 else 0
            if tier.slot(rec) < 0:  # forgotten meanwhile: the page is ours to free
                tier.alloc.free([slot])
                tier.evictions += 1
                return
        tier.set_slot(rec, -1)
        tier.owner[slot] = None
        rec.mask &= ~tier.bit
        tier.alloc.free([slot])
        tier.evictions += 1
        self._sink.emit(BlockRemoved([rec.seq_hash], tier.medium))
        if rec.mask == 0:
            self._forget(rec)
        elif not rec.mask & (GPU_BIT | HOST_BIT):
            self._compactable.append(rec)

    def _forget(self, rec: BlockRecord) -> None:
        """Lineage rule: ``rec`` left every tier, so it and its descendants leave the index."""
        removed = self._index.remove_subtree(rec)
        if rec.parent is not None:  # it may have been the last child keeping a record
            self._compactable.append(rec.parent)
        by_medium: dict[Medium, list[int]] = {}
        for r in removed:
            for t in self._tiers:
                slot = t.slot(r)
                if slot < 0:
                    continue
                t.set_slot(r, -1)
                t.owner[slot] = None
                t.policy.remove(r.seq_hash)
                if t.alloc.refcount(slot) > 0:
                    # Still in use by the engine: the page stays held but is no longer a
                    # cached block; release() frees it like an uncommitted page.
                    t.pinned -= 1
                else:
                    t.alloc.free([slot])
                by_medium.setdefault(t.medium, []).append(r.seq_hash)
            if r.mask & LOWER_BITS:
                # The page stays in its persistent tier, unlinked: a later match whose
                # prefix is cached again links it back.
                self._orphans[r.seq_hash] = r.mask & LOWER_BITS
                for m in mediums_of(r.mask & LOWER_BITS):
                    by_medium.setdefault(m, []).append(r.seq_hash)
            r.mask = 0
        for m, hs in by_medium.items():
            self._sink.emit(BlockRemoved(hs, m))

    def _offload(self, recs: Sequence[BlockRecord], evicting: BlockRecord | None = None) -> int:
        """Copy G1-resident ``recs`` without a G2 copy down to G2 (admission and room
        permitting). ``evicting`` is a G1 victim being written back (it is not evictable)."""
        g1, g2 = self._device_tier(), self._g2
        assert g2 is not None
        todo = [r for r in recs if r.g2 < 0 and r.g1 >= 0]
        if g2.admission is not None:
            admit = g2.admission.admit
            kept = [r for r in todo if admit(r.seq_hash)]
            g2.rejected += len(todo) - len(kept)
            todo = kept
        room = g2.alloc.num_free + g2.evictable()
        if len(todo) > room:
            g2.skipped += len(todo) - room
            todo = todo[:room]  # parents first: a prefix of the run stays matchable
        if not todo:
            return 0
        # Evictions in G2 may drop blocks from the index (lineage); hold the sources meanwhile
        # so a cascade detaches their pages instead of freeing them under the copy.
        src = [r.g1 for r in todo]
        for r in todo:
            if r is not evicting:
                self._hold(g1, r)
        slots = self._take(g2, len(todo))
        live: list[tuple[BlockRecord, int, int]] = []
        for r, s1, s2 in zip(todo, src, slots, strict=True):
            if r.mask == 0:  # forgotten by a cascade while G2 made room
                g2.alloc.free([s2])
                if r is not evicting and g1.alloc.decref(s1) == 0:
                    g1.alloc.free([s1])
            else:
                live.append((r, s1, s2))
        if not live:
            return 0
        if self._inline_copies:  # landed on return: the pages are G2's at once
            self._copier_of().submit(g1.pool, [x[1] for x in live], g2.pool,
                                     [x[2] for x in live], order_consumer=True)
            for r, _, s2 in reversed(live):  # tail first: see _touch
                if r is not evicting:
                    self._unhold(g1, r)
                self._place(g2, r, s2, pinned=False)
            placed = [r for r, _, _ in live]
            self._offloaded += len(placed)
            self._sink.emit_stored(placed, Medium.CPU_PINNED)
            self._store_down(placed)
            return len(placed)
        for r, _, s2 in reversed(live):  # tail first: see _touch
            # In G2 from now on (matchable, not evictable); what reads G2 from the host -
            # the tiers below, the events - waits until the copy has landed (_landed).
            self._place(g2, r, s2, pinned=True)
        self._copy(g1, [x[1] for x in live], g2, [x[2] for x in live],
                   order_consumer=evicting is not None,  # its G1 page is reused next
                   offloaded=[(r, s2) for r, _, s2 in live],
                   g1_holds=[s1 for r, s1, _ in live if r is not evicting],
                   g2_holds=[s2 for _, _, s2 in live])
        self._reap_copies()
        return len(live)

    def _copier_of(self) -> LocalCopier:
        copier = self._copier
        assert copier is not None, "G1/G2 copies need kvbm's own G1"
        return copier

    def _copy(self, src: MemTier, src_slots: list[int], dst: MemTier, dst_slots: list[int],
              *, order_consumer: bool = True,
              offloaded: list[tuple[BlockRecord, int]] | None = None,
              g1_holds: list[int] | None = None, g2_holds: list[int] | None = None) -> None:
        """Hand a G1/G2 copy to the copier; the holds listed are dropped when it lands."""
        copier = self._copier
        assert copier is not None, "G1/G2 copies need kvbm's own G1"
        ticket = copier.submit(src.pool, src_slots, dst.pool, dst_slots,
                               order_consumer=order_consumer)
        self._copies.append(LocalCopy(ticket, offloaded or [], g1_holds or [], g2_holds or []))

    def _reap_copies(self, *, wait: bool = False) -> None:
        """Finish the G1/G2 copies that have landed (all of them with ``wait``), oldest
        first: copies land in the order they were submitted."""
        copies = self._copies
        while copies:
            lc = copies[0]
            if not wait and not lc.ticket.done():
                return
            ok = True
            try:
                lc.ticket.wait()
            except TransferError as e:
                log.error("%s; the pages it was writing to G2 are dropped", e)
                ok = False
            copies.popleft()
            self._landed(lc, ok)

    def _landed(self, lc: LocalCopy, ok: bool) -> None:
        g1, g2 = self._g1, self._g2
        # Blocks forgotten meanwhile (a lineage cascade) had their G2 page detached: the
        # hold below frees it.
        placed = [r for r, s2 in lc.offloaded
                  if r.g2 == s2 and self._index.get(r.seq_hash) is r]
        if not ok:
            assert g2 is not None
            for r in placed:
                self._drop_unlanded(g2, r)
            placed = []
        if lc.g1_holds:
            assert g1 is not None
            for s in lc.g1_holds:
                self._release_one(g1, s)
        if lc.g2_holds:
            assert g2 is not None
            for s in lc.g2_holds:
                self._release_one(g2, s)
        if placed:
            self._offloaded += len(placed)
            self._sink.emit_stored(placed, Medium.CPU_PINNED)
            self._store_down(placed)

    def _drop_unlanded(self, tier: MemTier, rec: BlockRecord) -> None:
        """``rec``'s page in ``tier`` never received its data: it stops being that block's
        copy (the caller's hold on it frees it); nothing was announced for it."""
        slot = tier.slot(rec)
        tier.set_slot(rec, -1)
        tier.owner[slot] = None
        tier.policy.remove(rec.seq_hash)
        tier.pinned -= 1
        rec.mask &= ~tier.bit
        if rec.mask == 0:
            self._forget(rec)
        elif not rec.mask & (GPU_BIT | HOST_BIT):
            self._compactable.append(rec)

    def _touch(self, recs: Sequence[BlockRecord]) -> None:
        """A prefix was used: refresh recency/frequency in every tier holding each block.

        Leaf first, root last: the root ends up the most recent, so a recency-based policy
        evicts the tail of a chain before the prefix it depends on. Root first would make
        the root the oldest, and evicting it from its last tier drops the whole chain
        (lineage rule). vLLM frees a request's blocks in reverse order for the same reason.
        """
        self._tick += 1
        tick = self._tick
        g1, g2 = self._g1, self._g2
        for r in reversed(recs):
            r.last_access = tick
            r.frequency += 1
            if g1 is not None and r.g1 >= 0:
                g1.policy.access(r.seq_hash)
            if g2 is not None and r.g2 >= 0:
                g2.policy.access(r.seq_hash)

    # ------------------------------------------------------------------------- publisher --
    @property
    def nats_publisher(self) -> NatsEventPublisher | None:
        """The JetStream publisher (``[events.nats]``), or ``None``."""
        return self._sink.nats

    @property
    def publisher(self) -> ZmqEventPublisher | None:
        """The residency-event publisher (``[events] enabled``), for its endpoints and
        counters; ``None`` otherwise (then :meth:`take_events` drains the events)."""
        return self._sink.publisher

    # ------------------------------------------------------------- lower tiers (G3, G4) --
    # ---------------------------------------------------------------------- flush and close --
    def _finish_onboard(self, h: OnboardHandle) -> None:
        """All loads of an onboard finished: keep what arrived in G2, cut the prefix at the
        first block that did not arrive, copy the rest up to G1, give back what follows."""
        g1, g2 = self._device_tier(), self._g2
        assert g2 is not None
        recs, staged = h._recs, h._staged
        self._unbusy(recs)
        cancelled = h._cut is not None
        cut = h._cut if h._cut is not None else len(recs)
        to_g2: list[BlockRecord] = []
        for i in sorted(staged):
            s2 = staged[i][0]
            rec = recs[i]
            ok = h._ok.get(i, False) and self._index.get(rec.seq_hash) is rec
            if ok and rec.g2 < 0:
                self._place(g2, rec, s2, pinned=False)  # good data: cache it whatever the cut
                to_g2.append(rec)
            else:  # a failed load, or a G2 copy appeared meanwhile (recomputed elsewhere)
                g2.alloc.free([s2])
            if not ok:
                cut = min(cut, i)
        src: list[int] = []
        dst: list[int] = []
        up: list[BlockRecord] = []
        for i in sorted(staged):
            s1 = staged[i][1]
            rec = recs[i]
            if i >= cut:
                g1.alloc.free([s1])
            elif rec.g1 >= 0:  # committed by another request meanwhile: share that page
                self._hold(g1, rec)
                g1.alloc.free([s1])
                h._g1[i] = rec.g1
            else:
                src.append(rec.g2)
                dst.append(s1)
                up.append(rec)
        if up and self._inline_copies:
            self._copier_of().submit(g2.pool, src, g1.pool, dst, order_consumer=True)
        elif up:  # the G2 sources stay held until the copy has landed
            for rec in up:
                self._hold(g2, rec)
            self._copy(g2, src, g1, dst, g2_holds=list(src))
        for rec, s1 in zip(up, dst, strict=True):
            self._place(g1, rec, s1, pinned=True)
        self._host_filled(to_g2)
        self._sink.emit_stored(to_g2, Medium.CPU_PINNED)
        self._sink.emit_stored(up, Medium.GPU)
        if not cancelled:
            self._release_tail(h, cut)
            h.block_ids = h._g1[:cut]
            h.status = OnboardStatus.DONE
        self._touch(recs[:cut])
        self._store_down(to_g2)  # promotion: a page loaded from G4 also goes to G3
        self._reap_copies()

    def _release_tail(self, h: OnboardHandle, cut: int) -> None:
        """Give back the engine's holds on the blocks of ``h`` from ``cut`` on that are
        ready (not staged: staged pages are dealt with when their load finishes)."""
        for i in range(cut, len(h._recs)):
            if i not in h._staged:
                self._release_one(self._device_tier(), h._g1[i])

    def _has_room(self, tier: MemTier, need: int, will_hold: Sequence[BlockRecord]) -> bool:
        """Whether ``need`` pages can be taken in ``tier`` after pinning ``will_hold``."""
        short = need - tier.alloc.num_free
        if short <= 0:
            return True
        unpinned = sum(1 for r in will_hold
                       if tier.slot(r) >= 0 and tier.alloc.refcount(tier.slot(r)) == 0)
        return short <= tier.evictable() - unpinned

    def _check_room(self, tier: MemTier, need: int, will_hold: Sequence[BlockRecord]) -> None:
        """Raise, changing nothing, unless :meth:`_has_room`."""
        if not self._has_room(tier, need, will_hold):
            raise PoolExhaustedError(
                f"{tier.medium.value}: {need} pages needed, {tier.alloc.num_free} free and "
                f"{tier.evictable()} evictable (some may be about to be pinned)")

    # host-level API (engine-owned G1): kvbm/core/host_api.py ----------------------------------
    stage = host_api.stage
    stageable = host_api.stageable
    reserve_host = host_api.reserve_host
    commit_host = host_api.commit_host
    release_host = host_api.release_host
    set_host_check_hook = host_api.set_host_check_hook
    _checked_pages = host_api._checked_pages
    set_host_fill_hook = host_api.set_host_fill_hook
    _host_filled = host_api._host_filled
    discard_host = host_api.discard_host
    _device_tier = host_api._device_tier
    _release_stage_tail = host_api._release_stage_tail
    _finish_stage = host_api._finish_stage

    # lower tiers (G3, G4): kvbm/core/lower_ops.py ---------------------------------------------
    _open_lower_tiers = lower_ops._open_lower_tiers
    on_removed = lower_ops.on_removed
    on_discovered = lower_ops.on_discovered
    _store_down = lower_ops._store_down
    _store_deferred = lower_ops._store_deferred
    _on_stored = lower_ops._on_stored
    _reports_misses = lower_ops._reports_misses
    _on_discovered = lower_ops._on_discovered
    _on_removed = lower_ops._on_removed
    _on_loaded = lower_ops._on_loaded

    # drain, flush and close: kvbm/core/lifecycle.py -------------------------------------------
    poll = lifecycle.poll
    _drain = lifecycle._drain
    _quiesce = lifecycle._quiesce
    flush = lifecycle.flush
    _flush = lifecycle._flush
    _store_backlog = lifecycle._store_backlog
    _transfers_in_flight = lifecycle._transfers_in_flight
    _wait_for_transfers = lifecycle._wait_for_transfers
    _volatile = lifecycle._volatile
    _parents_first = staticmethod(lifecycle._parents_first)
    close = lifecycle.close
    _shutdown = lifecycle._shutdown
    _close_at_exit = lifecycle._close_at_exit
    __enter__ = lifecycle.__enter__
    __exit__ = lifecycle.__exit__

    # compaction and the resync snapshot: kvbm/core/compaction.py ------------------------------
    _relink = compaction._relink
    _unorphan = compaction._unorphan
    _linked = compaction._linked
    _matched = compaction._matched
    _parent_of = compaction._parent_of
    _unbusy = compaction._unbusy
    _compact = compaction._compact
    _emit_relinked = compaction._emit_relinked
    _residency_snapshot = compaction._residency_snapshot

    # ----------------------------------------------------------------------- test support --
    def check_invariants(self) -> None:
        """Assert the internal invariants (used by the stateful tests; O(size))."""
        for t in self._tiers:
            free = set(t.alloc.free_slots())
            assert len(free) == t.alloc.num_free, "free list length"
            pinned = 0
            for slot in range(t.alloc.num_slots):
                rec = t.owner[slot]
                refs = t.alloc.refcount(slot)
                assert refs >= 0
                if slot in free:
                    assert rec is None and refs == 0 and t.alloc.is_free(slot)
                    continue
                assert not t.alloc.is_free(slot)
                if rec is None:  # uncommitted, detached or a staging page: held
                    assert refs > 0, f"{t.medium}: slot {slot} leaked"
                    continue
                assert t.slot(rec) == slot and rec.mask & t.bit
                assert self._index.get(rec.seq_hash) is rec, "resident block not indexed"
                assert rec.seq_hash in t.policy
                pinned += refs > 0
            assert pinned == t.pinned, f"{t.medium}: pinned count {t.pinned} != {pinned}"
            assert len(t.policy) == sum(1 for r in t.owner if r is not None)
        flagged = sum(1 for _, m in self._orphans.items() if m & ANNOUNCED)
        assert flagged == self._announced, f"announced count {self._announced} != {flagged}"
        for _, m in self._orphans.items():
            assert m & LOWER_BITS and not m & (GPU_BIT | HOST_BIT), f"unlinked mask {m:#x}"
        for rec in self._index:
            assert rec.mask != 0, "indexed block resident nowhere"
            assert bool(rec.mask & GPU_BIT) == (rec.g1 >= 0)
            assert bool(rec.mask & HOST_BIT) == (rec.g2 >= 0)
            assert rec.seq_hash not in self._orphans
            if rec.parent is not None:
                assert self._index.get(rec.parent.seq_hash) is rec.parent, "lineage rule"
                assert rec.parent.children is not None and rec in rec.parent.children

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
import contextlib
import copy
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from kvbm.checks import (
    U64,
    as_count,
    as_flag,
    as_seconds,
    check_hashes,
    check_id_container,
    check_keys,
    check_match,
    closed_error,
    os_wait,
)
from kvbm.config import DeviceTierConfig, ManagerConfig
from kvbm.core.event_sink import EventSink, runs
from kvbm.core.handles import OnboardHandle, OnboardStatus, StageHandle
from kvbm.core.masks import MaskTable
from kvbm.errors import (
    BlockStateError,
    ConfigError,
    InvalidArgumentError,
    InvalidKeyError,
    LayoutError,
    PoolExhaustedError,
    TokenError,
    TransferError,
)
from kvbm.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from kvbm.exitflush import exit_flush
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
from kvbm.memory.local_copy import CopyTicket, InlineCopier, LocalCopier, make_copier
from kvbm.offload import (
    OffloadEngine,
    TierQueueStats,
    TransferHandle,
    TransferKind,
    TransferStatus,
)
from kvbm.policies import make_admission, make_eviction
from kvbm.policies.base import AdmissionPolicy, EvictionPolicy
from kvbm.pool import DevicePool, HostPool, SlotAllocator
from kvbm.reports import FlushResult, ManagerStats, TierUsage

if TYPE_CHECKING:
    import torch

    from kvbm.events.nats import NatsEventPublisher
    from kvbm.events.publisher import ZmqEventPublisher
    from kvbm.storage.base import PageStore, RemovalReason, TierStats

log = logging.getLogger(__name__)

_GPU = Medium.GPU.bit
_HOST = Medium.CPU_PINNED.bit
_LOWER = Medium.DISK.bit | Medium.OBJECT.bit
#: In the table of unlinked pages: a block compacted out of the index (resident only below
#: host memory, no child in the index) whose BlockStored events still stand. Without it the
#: page is unlinked and unannounced (after a restart, or its prefix left every tier).
_ANNOUNCED = 0x80
#: Hashes per BlockRemoved of clear(): a cleared million-block index is withdrawn in
#: messages of a size every subscriber takes in stride.
_CLEAR_EVENT_BLOCKS = 4096


class _MemTier:
    """One in-memory tier: its pool, the record owning each slot, and its policies."""

    __slots__ = ("admission", "alloc", "bit", "evictions", "is_g1", "medium", "owner", "pinned",
                 "policy", "pool", "rejected", "skipped")

    def __init__(self, medium: Medium, pool: DevicePool | HostPool, policy: EvictionPolicy,
                 admission: AdmissionPolicy | None) -> None:
        self.medium = medium
        self.bit = medium.bit
        self.is_g1 = medium is Medium.GPU
        self.pool = pool
        self.alloc: SlotAllocator = pool.allocator
        self.owner: list[BlockRecord | None] = [None] * pool.num_blocks
        self.policy = policy
        self.admission = admission
        #: committed blocks of this tier with a refcount > 0 (resident but not evictable)
        self.pinned = 0
        self.evictions = 0
        self.rejected = 0  # refused by admission
        self.skipped = 0  # no room (every page pinned)

    def slot(self, rec: BlockRecord) -> int:
        return rec.g1 if self.is_g1 else rec.g2

    def set_slot(self, rec: BlockRecord, slot: int) -> None:
        if self.is_g1:
            rec.g1 = slot
        else:
            rec.g2 = slot

    def evictable(self) -> int:
        return len(self.policy) - self.pinned


class _StoreTier:
    """A tier below host memory: its store runs on the offload engine."""

    __slots__ = ("bit", "deferred", "failed", "inflight", "medium", "store", "stored")

    def __init__(self, store: PageStore) -> None:
        self.store = store
        self.medium = store.medium
        self.bit = store.medium.bit
        #: keys with a store transfer under way (not submitted twice)
        self.inflight: set[int] = set()
        #: G2 pages waiting for room under the tier's in-flight bound (oldest first)
        self.deferred: dict[int, BlockRecord] = {}
        self.stored = 0  # pages stored (monotonic; flush() reports the difference)
        self.failed = 0  # pages whose store transfer failed or was cancelled


@dataclass(frozen=True, slots=True)
class _Removal:
    """A tier dropped pages on its own (eviction, corruption); from a tier's thread."""

    medium: Medium
    keys: list[int]


@dataclass(frozen=True, slots=True)
class _Discovered:
    """A shared tier found pages another writer stored (storage/objectdiscovery.py); from
    a tier's thread."""

    medium: Medium
    keys: list[int]


@dataclass(frozen=True, slots=True)
class _StoreContext:
    """What a store transfer carries back to the manager: the tier, and each page's record
    with the G2 slot it was read from (the record may have moved or gone meanwhile)."""

    tier: _StoreTier
    pages: list[tuple[BlockRecord, int]]


@dataclass(frozen=True, slots=True)
class _LocalCopy:
    """A G1/G2 copy in flight (standalone mode): the pages it holds until it lands."""

    ticket: CopyTicket
    #: G1 -> G2: each block with the G2 page it is being copied to (empty for G2 -> G1)
    offloaded: list[tuple[BlockRecord, int]]
    g1_holds: list[int]  # G1 pages held as sources
    g2_holds: list[int]  # G2 pages held (destinations of an offload, sources of an onboard)


@dataclass(frozen=True, slots=True)
class _LoadContext:
    """What a load transfer carries back: the onboard or stage it serves, the tier it reads
    from and the positions of its blocks in that handle's prefix."""

    handle: OnboardHandle | StageHandle
    medium: Medium
    positions: list[int]


def _check_host_pool(pool: Any, layout: KVLayout, config: ManagerConfig) -> None:
    """A host pool handed in (a shared-memory one) must be the one the config describes."""
    if not isinstance(pool, HostPool):
        raise ConfigError(f"host_pool must be a HostPool, got {type(pool).__name__}")
    if config.host is None:
        raise ConfigError("host_pool given but the config has no host tier (config.host)")
    if pool.layout.fingerprint != layout.fingerprint:
        raise LayoutError("host_pool was made for another layout")
    if pool.num_blocks != config.host.num_blocks:
        raise ConfigError(f"host_pool holds {pool.num_blocks} pages but host.num_blocks is "
                          f"{config.host.num_blocks}")


class _FlushTimeout(Exception):
    """Internal: a flush ran out of time (flush() raises TransferError, close() warns)."""


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
            _check_host_pool(host_pool, layout, config)
        dev = config.device
        #: G1, or None when the engine owns its KV memory (then only the host-level calls
        #: - stage, reserve_host, commit_host, release_host - move pages, through plans)
        self._g1: _MemTier | None = None
        #: copies between G1 and G2 (standalone mode), and those not landed yet, oldest first
        self._copier: LocalCopier | None = None
        self._copies: collections.deque[_LocalCopy] = collections.deque()
        if dev is not None:
            g1_pool = DevicePool(layout, dev.num_blocks, dev.device)
            self._g1 = _MemTier(Medium.GPU, g1_pool, make_eviction(dev.eviction, dev.num_blocks),
                                None)
            self._copier = make_copier(dev.copies, g1_pool.device)
        #: copies that land within submit (a CPU G1): no holds while in flight, no landing
        #: step - the pages change hands in the same order as ever
        self._inline_copies = isinstance(self._copier, InlineCopier)
        self._g2: _MemTier | None = None
        if config.host is not None:
            h = config.host
            pool = host_pool if host_pool is not None else HostPool(layout, h.num_blocks,
                                                                    h.pin_memory)
            self._g2 = _MemTier(Medium.CPU_PINNED, pool,
                                make_eviction(h.eviction, h.num_blocks),
                                make_admission(h.admission, capacity=h.num_blocks)
                                if h.admission is not None else None)
        self._tiers = [t for t in (self._g1, self._g2) if t is not None]
        #: finished transfers and tier removals, in the order they happened (any thread)
        self._inbox: queue.SimpleQueue[TransferHandle | _Removal | _Discovered] = \
            queue.SimpleQueue()
        #: pages of persistent tiers not linked into the index (after a restart, or whose
        #: prefix left every memory tier): seq hash -> residency mask. A match re-links them.
        self._orphans = MaskTable()
        self._announced = 0  # entries of _orphans flagged _ANNOUNCED
        #: records that became resident only below host memory: compacted at the next drain
        self._compactable: list[BlockRecord] = []
        #: sequence hashes of the blocks of onboards and stages still loading (not compacted)
        self._busy: collections.Counter[int] = collections.Counter()
        self._lower: list[_StoreTier] = []
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
            announced = (flags & _ANNOUNCED) != 0
            stop = flags.size if announced.all() else int(announced.argmin())
            if stop < flags.size and flags[stop]:
                recs = self._linked(hashes, len(seq), tokens, lora_name)
                masks = [r.mask for r in recs]
            else:
                masks += (flags[:stop] & _LOWER).tolist()
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
                context=_LoadContext(handle, medium, [i for i, _, _ in items])))
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

    def _release_one(self, tier: _MemTier, slot: int) -> None:
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
            keys, masks = self._orphans.with_flag(_ANNOUNCED)
            for m in mediums_of(_LOWER):
                gone[m] = keys[(masks & m.bit) != 0].tolist()
            self._orphans.and_all(_LOWER)
            self._announced = 0
        for rec in self._index:
            for m in mediums_of(rec.mask & ~_GPU):
                gone.setdefault(m, []).append(rec.seq_hash)
            if rec.mask & _LOWER:
                self._orphans[rec.seq_hash] = rec.mask & _LOWER
            rec.mask, rec.g1, rec.g2, rec.children = 0, -1, -1, None
        self._index = PrefixIndex()
        self._compactable.clear()
        step = _CLEAR_EVENT_BLOCKS
        for m, hs in gone.items():
            for i in range(0, len(hs), step):
                self._sink.emit(BlockRemoved(hs[i:i + step], m))
        if self._g1 is not None:
            self._sink.emit(AllBlocksCleared())
        return n

    # ------------------------------------------------- host-level API (engine-owned G1) --
    def stage(self, match: MatchResult, start_block: int = 0) -> StageHandle:
        """Hold the G2 pages of the matched blocks from ``start_block`` on, loading into G2
        (through the offload engine, in the background) those only disk or object storage
        holds. For an engine that owns G1: a mover copies the pages into the engine's memory
        (see :mod:`kvbm.core.plans`), then :meth:`StageHandle.release` gives them back.

        No I/O on the calling thread. Without room in G2 for the loads, the prefix ends
        before the first block to load (a miss, not an error).
        """
        if self._closed:
            raise closed_error()
        check_match(match)
        start_block = as_count(start_block, "start_block")
        g2 = self._g2
        if g2 is None:
            raise ConfigError("stage needs a host tier (config.host)")
        self._drain()
        recs = self._matched(match)[start_block:]
        staged_recs = [r for r in recs if r.g2 < 0]
        if staged_recs and not self._has_room(g2, len(staged_recs), recs):
            recs = recs[: recs.index(staged_recs[0])]
            staged_recs = []
            self._staging_misses += 1
        # The pages held, by position, as they are now: an eviction below may forget a held
        # block (its unheld parent before start_block left every tier), detaching its page.
        held = {i: r.g2 for i, r in enumerate(recs) if r.g2 >= 0}
        for r in recs:
            if r.g2 >= 0:
                self._hold(g2, r)
        taken = self._take(g2, len(staged_recs)) if staged_recs else []
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
                    self._release_one(g2, held[i])
            recs, slots = recs[:alive], slots[:alive]
        handle = StageHandle(self, recs, start_block, slots, staged, len(loads))
        if not loads:
            self._touch(recs)
            return handle
        self._busy.update(r.seq_hash for r in recs)
        engine, pool = self._engine, self._host_pool()
        assert engine is not None and pool is not None
        for medium, items in loads.items():
            handle.loading_from[medium] = len(items)
            engine.submit(TransferHandle(
                TransferKind.LOAD, medium, [r.seq_hash for _, r, _ in items],
                [pool.page(a) for _, _, a in items],
                context=_LoadContext(handle, medium, [i for i, _, _ in items])))
        return handle

    def stageable(self, match: MatchResult, start_block: int = 0) -> int:
        """How many blocks of ``match`` from ``start_block`` on :meth:`stage` could hold now
        (no I/O): those in G2, then as far as G2 has room to load the ones only below. An
        engine promises no more than this (a promise :meth:`stage` then cuts is a load
        error, not a miss)."""
        if self._closed:
            raise closed_error()
        check_match(match)
        start_block = as_count(start_block, "start_block")
        g2 = self._g2
        if g2 is None:
            raise ConfigError("stageable needs a host tier (config.host)")
        self._drain()
        recs = self._matched(match)[start_block:]
        below = [i for i, r in enumerate(recs) if r.g2 < 0]
        if below and not self._has_room(g2, len(below), recs):
            return below[0]
        return len(recs)

    def reserve_host(self, seq_hashes: Sequence[int]) -> list[int]:
        """G2 pages for a mover to write blocks into (engine-owned G1), one per hash, for
        as long a prefix of ``seq_hashes`` as G2's admission and room allow (evicting by
        its policy). Each page is held until :meth:`commit_host` or :meth:`release_host`."""
        if self._closed:
            raise closed_error()
        hashes = list(check_id_container(seq_hashes, "seq_hashes", ordered=True))
        check_keys(hashes, "seq_hashes")
        g2 = self._g2
        if g2 is None:
            raise ConfigError("reserve_host needs a host tier (config.host)")
        self._drain()
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
        return self._take(g2, n) if n > 0 else []

    def commit_host(self, slots: Sequence[int], token_ids: Any, *, start_block: int = 0,
                    hashes: BlockHashes | None = None, lora_name: str | None = None
                    ) -> list[bool]:
        """Register G2 pages a mover has written (reserved with :meth:`reserve_host`):
        ``slots[i]`` holds block ``start_block + i`` of ``token_ids``. The pages become
        cached blocks of G2 (stored down to the lower tiers as configured). A block whose
        parent is no longer cached cannot be matched, so it and the rest are given back.
        Returns, per page, whether it was kept as the block's G2 copy (a block already in
        G2 keeps its page; the new one is freed)."""
        if self._closed:
            raise closed_error()
        slots = check_id_container(slots, "slots", ordered=True)
        start_block = as_count(start_block, "start_block")
        check_lora_name(lora_name)
        tokens = as_token_array(token_ids)
        if hashes is None:
            hashes = hash_blocks(tokens, self.block_size, lora_name=lora_name,
                                 salt=self.config.salt)
        else:
            check_hashes(hashes)
        g2 = self._g2
        if g2 is None:
            raise ConfigError("commit_host needs a host tier (config.host)")
        self._drain()
        ids = [g2.alloc.check(s) for s in slots]
        if len(set(ids)) != len(ids):
            raise BlockStateError(f"duplicate slots in commit_host: {list(slots)}")
        for s in ids:
            if g2.alloc.refcount(s) != 1 or g2.owner[s] is not None:
                raise BlockStateError(f"G2 page {s} is not a page reserved with reserve_host")
        end = start_block + len(ids)
        if end > len(hashes) or end * self.block_size > tokens.size:
            raise BlockStateError(
                f"commit_host of blocks [{start_block}, {end}) but the tokens hold "
                f"{min(len(hashes), tokens.size // self.block_size)} full blocks")
        parent: BlockRecord | None = None
        if start_block > 0:
            parent = self._parent_of(hashes, start_block, tokens, lora_name)
        kept: list[bool] = []
        placed: list[BlockRecord] = []
        relinked: list[BlockRecord] = []
        recs: list[BlockRecord] = []
        bs4 = self.block_size * 4
        tok_bytes = tokens[: end * self.block_size].tobytes()
        for i, s in enumerate(ids):
            pos = start_block + i
            if pos > 0 and parent is None:  # lineage broken: nothing below can be matched
                g2.alloc.free([s])
                kept.append(False)
                continue
            h = hashes.sequence[pos]
            rec = self._index.get(h)
            if rec is None:
                rec = BlockRecord(h, hashes.local[pos], parent,
                                  tok_bytes[pos * bs4: (pos + 1) * bs4], lora_name)
                if self._orphans and h in self._orphans and self._unorphan(rec):
                    relinked.append(rec)
                self._index.insert(rec)
            if rec.g2 >= 0:
                g2.alloc.free([s])
                kept.append(False)
                self._deduplicated += 1
            else:
                self._place(g2, rec, s, pinned=False)
                placed.append(rec)
                kept.append(True)
            recs.append(rec)
            parent = rec
        self._committed += len(placed)
        self._offloaded += len(placed)
        self._sink.emit_stored(placed, Medium.CPU_PINNED)
        self._emit_relinked(relinked)
        self._touch(recs)
        self._store_down(placed)
        return kept

    def release_host(self, slots: Iterable[int]) -> None:
        """Give back G2 pages reserved with :meth:`reserve_host` and not committed (a save
        that failed). Validates everything first."""
        if self._closed:
            raise closed_error()
        slots = check_id_container(slots, "slots", ordered=False)
        g2 = self._g2
        if g2 is None:
            raise ConfigError("release_host needs a host tier (config.host)")
        self._drain()
        ids = [g2.alloc.check(s) for s in slots]
        if len(set(ids)) != len(ids):
            raise BlockStateError(f"duplicate slots in release_host: {list(slots)}")
        for s in ids:
            if g2.alloc.refcount(s) != 1 or g2.owner[s] is not None:
                raise BlockStateError(f"G2 page {s} is not a page reserved with reserve_host")
        g2.alloc.free(ids)

    def set_host_check_hook(self, hook: Callable[[list[tuple[int, int]]], list[bool]] | None
                            ) -> None:
        """Ask ``hook([(g2_slot, seq_hash), ...])`` whether each page still holds its block
        before it is stored to a tier below (an engine whose movers tag pages checks the
        tags). A page it refuses is not stored, and its G2 copy is dropped: a tier's
        checksum would otherwise vouch for whatever the page held."""
        if hook is not None and not callable(hook):
            raise InvalidArgumentError(f"hook must be callable or None, got {hook!r}")
        self._check_hook = hook

    def _checked_pages(self, recs: list[BlockRecord]) -> list[BlockRecord]:
        assert self._check_hook is not None and self._g2 is not None
        ok = self._check_hook([(r.g2, r.seq_hash) for r in recs])
        bad = [r for r, good in zip(recs, ok, strict=True) if not good]
        if not bad:
            return recs
        log.error("kvbm: %d G2 page(s) no longer hold their block; not stored below, dropped",
                  len(bad))
        self._bad_host_pages += len(bad)
        g2 = self._g2
        for r in bad:
            if r.g2 >= 0 and g2.alloc.refcount(r.g2) == 0 and self._index.get(r.seq_hash) is r:
                g2.policy.remove(r.seq_hash)
                self._evict(g2, r)
        # (an eviction may have taken descendants with it: lineage)
        return [r for r, good in zip(recs, ok, strict=True)
                if good and r.g2 >= 0 and self._index.get(r.seq_hash) is r]

    def set_host_fill_hook(self, hook: Callable[[list[tuple[int, int]]], None] | None
                           ) -> None:
        """Call ``hook([(g2_slot, seq_hash), ...])`` on the owner thread whenever pages loaded
        from disk or object storage (verified by the tier) become G2 copies. An engine that
        tags pages for its movers (the vLLM connector) tags them there: the only moment the
        page is known to hold that block."""
        if hook is not None and not callable(hook):
            raise InvalidArgumentError(f"hook must be callable or None, got {hook!r}")
        self._fill_hook = hook

    def _host_filled(self, recs: Sequence[BlockRecord]) -> None:
        if self._fill_hook is not None and recs:
            self._fill_hook([(r.g2, r.seq_hash) for r in recs])

    def discard_host(self, seq_hashes: Sequence[int]) -> int:
        """Drop the G2 copies of these blocks (a mover found them damaged): they leave G2 as
        an eviction would (copies in lower tiers stay). Blocks not in G2, or whose page is
        held, are left alone. Returns how many were dropped."""
        if self._closed:
            raise closed_error()
        hashes = list(check_id_container(seq_hashes, "seq_hashes", ordered=False))
        check_keys(hashes, "seq_hashes")
        g2 = self._g2
        if g2 is None:
            raise ConfigError("discard_host needs a host tier (config.host)")
        self._drain()
        n = 0
        for h in hashes:
            rec = self._index.get(h)
            if rec is None or rec.g2 < 0 or g2.alloc.refcount(rec.g2) > 0:
                continue
            g2.policy.remove(h)
            self._evict(g2, rec)
            n += 1
        return n

    def _device_tier(self) -> _MemTier:
        """G1, for the calls that use kvbm's own device pool."""
        if self._g1 is None:
            raise ConfigError("this manager has no device tier of its own (device = none: the "
                              "engine owns G1); use stage/reserve_host/commit_host/"
                              "release_host and a mover")
        return self._g1

    def _release_stage_tail(self, h: StageHandle, cut: int) -> None:
        """Give back the holds of ``h`` from ``cut`` on that are ready (staged pages are
        dealt with when their load finishes)."""
        g2 = self._g2
        assert g2 is not None
        for i in range(cut, len(h._recs)):
            if i not in h._staged:
                self._release_one(g2, h._slots[i])

    def _finish_stage(self, h: StageHandle) -> None:
        """All loads of a stage finished: cache what arrived, cut at the first block that did
        not, give back what follows."""
        g2 = self._g2
        assert g2 is not None
        recs, staged = h._recs, h._staged
        self._unbusy(recs)
        cancelled = h._cut is not None
        cut = h._cut if h._cut is not None else len(recs)
        arrived: list[BlockRecord] = []
        for i in sorted(staged):
            s = staged[i]
            rec = recs[i]
            ok = h._ok.get(i, False) and self._index.get(rec.seq_hash) is rec
            keep = ok and i < cut and not cancelled
            if ok and rec.g2 < 0:
                self._place(g2, rec, s, pinned=keep)
                arrived.append(rec)
            else:
                g2.alloc.free([s])
                if ok and keep:  # a G2 copy appeared meanwhile: hold that one instead
                    self._hold(g2, rec)
                    h._slots[i] = rec.g2
            if not ok:
                cut = min(cut, i)
        self._host_filled(arrived)
        self._sink.emit_stored(arrived, Medium.CPU_PINNED)
        if not cancelled:
            self._release_stage_tail(h, cut)
            h.slots = h._slots[:cut]
            h.sequence_hashes = [r.seq_hash for r in recs[:cut]]
            h.status = OnboardStatus.DONE
        self._touch(recs[:cut])
        self._store_down(arrived)

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
        if rec is None and self._orphans.get(int(seq_hash)) & _ANNOUNCED:
            # compacted (only below host memory): a snapshot of its residency
            rec = BlockRecord(int(seq_hash), 0, None, b"", None)
            rec.mask = self._orphans.get(int(seq_hash)) & _LOWER
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
    def _hold(self, tier: _MemTier, rec: BlockRecord) -> None:
        slot = tier.slot(rec)
        if tier.alloc.incref(slot) == 1:
            tier.pinned += 1
            tier.policy.pin(rec.seq_hash)

    def _unhold(self, tier: _MemTier, rec: BlockRecord) -> None:
        slot = tier.slot(rec)
        if tier.alloc.decref(slot) == 0:
            tier.pinned -= 1
            tier.policy.unpin(rec.seq_hash)

    def _place(self, tier: _MemTier, rec: BlockRecord, slot: int, *, pinned: bool) -> None:
        """Make ``slot`` (taken, refcount 1) the copy of ``rec`` in ``tier``."""
        tier.set_slot(rec, slot)
        tier.owner[slot] = rec
        rec.mask |= tier.bit
        tier.policy.insert(rec.seq_hash, rec.parent_hash, pinned=pinned)
        if pinned:
            tier.pinned += 1
        else:
            tier.alloc.decref(slot)

    def _take(self, tier: _MemTier, n: int) -> list[int]:
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

    def _evict(self, tier: _MemTier, rec: BlockRecord) -> None:
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
        elif not rec.mask & (_GPU | _HOST):
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
            if r.mask & _LOWER:
                # The page stays in its persistent tier, unlinked: a later match whose
                # prefix is cached again links it back.
                self._orphans[r.seq_hash] = r.mask & _LOWER
                for m in mediums_of(r.mask & _LOWER):
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

    def _copy(self, src: _MemTier, src_slots: list[int], dst: _MemTier, dst_slots: list[int],
              *, order_consumer: bool = True,
              offloaded: list[tuple[BlockRecord, int]] | None = None,
              g1_holds: list[int] | None = None, g2_holds: list[int] | None = None) -> None:
        """Hand a G1/G2 copy to the copier; the holds listed are dropped when it lands."""
        copier = self._copier
        assert copier is not None, "G1/G2 copies need kvbm's own G1"
        ticket = copier.submit(src.pool, src_slots, dst.pool, dst_slots,
                               order_consumer=order_consumer)
        self._copies.append(_LocalCopy(ticket, offloaded or [], g1_holds or [], g2_holds or []))

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

    def _landed(self, lc: _LocalCopy, ok: bool) -> None:
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

    def _drop_unlanded(self, tier: _MemTier, rec: BlockRecord) -> None:
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
        elif not rec.mask & (_GPU | _HOST):
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

    def _residency_snapshot(self) -> list[BlockStored]:
        """Every block resident now, per medium, parents first (owner thread): what a
        publisher re-announces after the ``AllBlocksCleared`` of a resync. Compacted blocks
        lose their announcement (their tokens are not kept): a match links and announces
        them again."""
        if self._announced:
            self._orphans.and_all(_LOWER)
            self._announced = 0
        recs = self._parents_first(list(self._index))
        return [self._sink.stored_event(run, medium) for medium in Medium
                for run in runs([r for r in recs if r.mask & medium.bit])]

    # ------------------------------------------------------------- lower tiers (G3, G4) --
    def _open_lower_tiers(self) -> None:
        from kvbm.tiers import open_store

        oc = self.config.offload
        host = self.config.host
        assert host is not None
        # Pages in flight to a tier are pinned in G2: at most half of G2, so that G2 always
        # keeps room to stage loads and to take new offloads.
        inflight = max(1, min(oc.max_inflight_pages, host.num_blocks // 2))
        self._engine = OffloadEngine(max_inflight_pages=inflight,
                                     batch_bytes=oc.batch_bytes, on_complete=self._inbox.put)
        try:
            for cfg in self.config.lower_tiers:
                store: PageStore = self._engine.run(open_store(cfg, self.layout, self))
                self._engine.add_tier(store)
                lt = _StoreTier(store)
                self._lower.append(lt)
                self._orphans.or_many(self._engine.run(store.keys()), lt.bit)
        except BaseException:
            with contextlib.suppress(TransferError):  # the opening error is the one to see
                self._engine.shutdown(flush=False)
            raise
        log.info("lower tiers: %s; %d stored pages found", [t.medium.value for t in self._lower],
                 len(self._orphans))
        if oc.exit_flush_timeout_s > 0:
            exit_flush.add(self)

    def on_removed(self, medium: Medium, keys: Sequence[int], reason: RemovalReason) -> None:
        """TierListener: a tier dropped pages (called on the tier's threads)."""
        self._inbox.put(_Removal(medium, list(keys)))

    def on_discovered(self, medium: Medium, keys: Sequence[int]) -> None:
        """TierListener (optional): a tier shared with other writers found pages they
        stored (called on the tier's threads). They are matched like pages found at open."""
        self._inbox.put(_Discovered(medium, list(keys)))

    def poll(self) -> int:
        """Complete finished background transfers now (owner thread). Every other call does
        it too; an idle engine can call this to get offload events out sooner."""
        if self._closed:
            raise closed_error()
        return self._drain()

    def _drain(self, *, block: bool = False, timeout: float | None = None) -> int:
        """Process the inbox on the owner thread. ``block``: wait for at least one item."""
        if self._copies:
            self._reap_copies()
        if self._compactable:
            self._compact()
        self._sink.serve_snapshot()
        if self._engine is None:
            return 0
        n = 0
        inbox = self._inbox
        if timeout is not None:  # (every call drains: nothing more on the common path)
            timeout = os_wait(timeout)  # callers loop until their own deadline
        while True:
            try:
                item = inbox.get(block=block and n == 0, timeout=timeout)
            except queue.Empty:
                return n
            n += 1
            if isinstance(item, _Removal):
                self._on_removed(item)
            elif isinstance(item, _Discovered):
                self._on_discovered(item)
            elif item.kind is TransferKind.STORE:
                self._on_stored(item)
            else:
                self._on_loaded(item)

    def _quiesce(self, timeout: float = 60.0) -> None:
        """Wait until no store transfer is in flight (their G2 pages are pinned)."""
        deadline = time.monotonic() + timeout
        while any(lt.inflight for lt in self._lower):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TransferError("offloads to lower tiers did not finish in time")
            self._drain(block=True, timeout=left)

    # ---------------------------------------------------------------------- flush and close --
    def flush(self, timeout: float | None = None) -> FlushResult:
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
        if self._closed:
            raise closed_error()
        limit = as_seconds(timeout, "timeout")
        result = self._flush(limit)
        if not result.complete:
            raise TransferError(f"flush did not finish within {limit} s: {result.volatile} "
                                f"committed blocks are in no tier below host memory yet")
        return result

    def _flush(self, timeout: float | None) -> FlushResult:
        """:meth:`flush` without the checks; ``complete=False`` when time ran out."""
        deadline = None if timeout is None else time.monotonic() + timeout
        self._reap_copies(wait=True)  # offloads still copying: their stores go down now
        self._drain()
        engine, g2, host = self._engine, self._g2, self.config.host
        if engine is None or g2 is None or host is None or not self._lower:
            return FlushResult(0, {}, self._volatile())
        before = {lt.medium: (lt.stored, lt.failed) for lt in self._lower}
        every = 0
        for lt in self._lower:
            every |= lt.bit
        backlog: list[BlockRecord] = []
        if not host.eager_offload and self._g1 is not None:
            backlog = self._parents_first([r for r in self._device_tier().owner
                                           if r is not None and r.g2 < 0
                                           and r.mask & every != every])
        tried: set[int] = set()  # each page is offered to the tiers once per flush
        to_host = 0
        complete = True
        try:
            i = 0
            while True:
                self._store_backlog(tried, deadline)
                if i >= len(backlog):
                    break
                # G1 -> G2 in chunks that G2 can take without evicting a page that has not
                # reached the tiers below yet, and that the tiers take without skipping.
                room = min(g2.alloc.num_free + g2.evictable(),
                           *(engine.store_room(lt.medium) for lt in self._lower))
                if room <= 0:
                    if not self._transfers_in_flight():
                        break  # G2 is all held by the engine: the rest stays in G1
                    self._wait_for_transfers(deadline)
                    continue
                chunk = [r for r in backlog[i: i + room] if r.g1 >= 0 and r.g2 < 0]
                i += room
                tried.update(r.seq_hash for r in chunk)
                to_host += self._offload(chunk)
                self._reap_copies(wait=True)  # landed: their stores are submitted
        except _FlushTimeout:
            complete = False
        stored = {lt.medium: lt.stored - before[lt.medium][0] for lt in self._lower}
        failed = sum(lt.failed - before[lt.medium][1] for lt in self._lower)
        return FlushResult(to_host, stored, self._volatile(), failed, complete)

    def _store_backlog(self, tried: set[int], deadline: float | None) -> None:
        """Store every G2 page that a lower tier lacks (not in ``tried``) into it, parents
        first, within the in-flight bounds; return once no store is in flight."""
        engine, g2 = self._engine, self._g2
        assert engine is not None and g2 is not None
        self._drain()
        todo = self._parents_first([
            r for r in g2.owner if r is not None and r.seq_hash not in tried
            and any(not r.mask & lt.bit and r.seq_hash not in lt.inflight for lt in self._lower)])
        i = 0
        while i < len(todo) or any(lt.inflight for lt in self._lower):
            room = min(engine.store_room(lt.medium) for lt in self._lower)
            if i < len(todo) and room > 0:
                batch = [r for r in todo[i: i + room] if r.g2 >= 0]
                i += room
                tried.update(r.seq_hash for r in batch)
                self._store_down(batch)
                continue
            if not self._transfers_in_flight():  # pragma: no cover - room comes back
                break
            self._wait_for_transfers(deadline)

    def _transfers_in_flight(self) -> bool:
        engine = self._engine
        return engine is not None and any(engine.inflight_pages(lt.medium)
                                          for lt in self._lower)

    def _wait_for_transfers(self, deadline: float | None) -> None:
        """Complete at least one transfer, or raise :class:`_FlushTimeout` at ``deadline``."""
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            raise _FlushTimeout
        self._drain(block=True, timeout=left)

    def _volatile(self) -> int:
        """Indexed blocks that no tier below host memory holds."""
        return sum(1 for r in self._index if not r.mask & _LOWER)

    @staticmethod
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

    def close(self, *, flush: bool | None = None, timeout: float | None = None) -> None:
        """Flush (when ``flush``, default ``config.offload.flush_on_close``: see
        :meth:`flush`), stop the offload engine and close the lower tiers. Idempotent.

        Waits at most ``timeout`` seconds (default ``config.offload.close_timeout_s``), plus
        a second for the workers to stop; a flush that runs out of time is logged as a
        warning, not raised (call :meth:`flush` first to know). Loads still pending end
        with the prefix cut before them. Afterwards every call but the few listed in the
        class docstring raises :class:`~kvbm.errors.ClosedError`.
        """
        if self._closed:
            return
        if flush is not None and not isinstance(flush, bool):
            raise InvalidArgumentError(f"flush must be true, false or None, got {flush!r}")
        limit = as_seconds(timeout, "timeout")
        oc = self.config.offload
        self._shutdown(oc.flush_on_close if flush is None else flush,
                       oc.close_timeout_s if limit is None else limit)

    def _shutdown(self, flush: bool, limit: float) -> FlushResult | None:
        exit_flush.discard(self)
        engine = self._engine
        result = None
        try:
            self._reap_copies(wait=True)
            if self._copier is not None:
                self._copier.close()
            if engine is not None:
                deadline = time.monotonic() + limit
                try:
                    if flush:
                        result = self._flush(limit)
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
                    self._drain()
                    self._final_lower = {
                        lt.medium: (copy.deepcopy(lt.store.stats()),
                                    copy.deepcopy(engine.stats(lt.medium)))
                        for lt in self._lower}
                    self._engine = None
        finally:
            self._closed = True
            self._sink.close()
        return result

    def _close_at_exit(self) -> None:
        """The exit flush (:class:`ExitFlush`): close a manager left open, and say so."""
        if self._closed:
            return
        owner = self._owner
        if owner is not threading.main_thread() and owner.is_alive():
            log.warning("kvbm: a BlockManager was not closed before exit and the thread that "
                        "built it (%s) is still running: not flushing it at exit (close() it "
                        "on that thread)", owner.name)
            return
        oc = self.config.offload
        t0 = time.monotonic()
        result = self._shutdown(oc.flush_on_close, oc.exit_flush_timeout_s)
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

    def __enter__(self) -> BlockManager:
        if self._closed:
            raise closed_error()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _store_down(self, recs: Sequence[BlockRecord]) -> None:
        """Queue G2-resident ``recs`` for every lower tier that lacks them (inclusive tiers).
        Their G2 pages stay pinned until the store finishes. What the tier's in-flight bound
        has no room for now waits (unpinned: G2 may still evict it) and is submitted as
        earlier stores finish; nothing blocks."""
        engine, g2 = self._engine, self._g2
        if engine is None or g2 is None or not recs:
            return
        pool = self._host_pool()
        assert pool is not None
        for lt in self._lower:
            todo = [r for r in recs if r.g2 >= 0 and not r.mask & lt.bit
                    and r.seq_hash not in lt.inflight]
            room = max(0, engine.store_room(lt.medium))
            for r in todo[room:]:
                lt.deferred[r.seq_hash] = r
            todo = todo[:room]
            if todo and self._check_hook is not None:
                todo = self._checked_pages(todo)
            if not todo:
                continue
            for r in todo:
                lt.deferred.pop(r.seq_hash, None)
                self._hold(g2, r)
                lt.inflight.add(r.seq_hash)
            engine.submit(TransferHandle(TransferKind.STORE, lt.medium,
                                         [r.seq_hash for r in todo],
                                         [pool.page(r.g2) for r in todo],
                                         context=_StoreContext(lt, [(r, r.g2) for r in todo]),
                                         parents=[r.parent_hash for r in todo]))

    def _store_deferred(self, lt: _StoreTier) -> None:
        """Submit the deferred stores of ``lt`` that its in-flight bound has room for now."""
        if not lt.deferred or self._engine is None:
            return
        room = self._engine.store_room(lt.medium)
        batch: list[BlockRecord] = []
        for h in list(lt.deferred):
            if len(batch) >= room:
                break
            r = lt.deferred.pop(h)
            if r.g2 >= 0 and not r.mask & lt.bit and self._index.get(h) is r:
                batch.append(r)
        if batch:
            self._store_down(batch)

    def _on_stored(self, th: TransferHandle) -> None:
        ctx: _StoreContext = th.context
        lt, pages = ctx.tier, ctx.pages
        g2 = self._g2
        assert g2 is not None
        stored: list[BlockRecord] = []
        if th.status is not TransferStatus.DONE:
            lt.failed += len(pages)
        for (rec, slot), ok in zip(pages, th.results, strict=True):
            lt.inflight.discard(rec.seq_hash)
            if rec.g2 == slot:
                self._unhold(g2, rec)
            else:  # forgotten meanwhile: the page was detached and is ours to free
                self._release_one(g2, slot)
            if not ok:
                continue
            lt.stored += 1
            if not rec.mask:  # forgotten meanwhile; maybe recomputed under a new record
                cur = self._index.get(rec.seq_hash)
                if cur is None:
                    self._orphans[rec.seq_hash] = self._orphans.get(rec.seq_hash, 0) | lt.bit
                    continue
                rec = cur
            if not rec.mask & lt.bit:
                rec.mask |= lt.bit
                stored.append(rec)
        self._sink.emit_stored(stored, lt.medium)
        self._store_deferred(lt)

    def _reports_misses(self, medium: Medium) -> bool:
        from kvbm.storage.base import Capability

        return any(lt.medium is medium and lt.store.capabilities & Capability.REPORTS_MISSES
                   for lt in self._lower)

    def _on_discovered(self, item: _Discovered) -> None:
        """Pages of a lower tier this manager did not store: unlinked (``_orphans``) until a
        match links them, as at open; a block already indexed gains the tier's residency."""
        lt = next((t for t in self._lower if t.medium is item.medium), None)
        if lt is None:
            return
        bit, orphans = lt.bit, self._orphans
        gained: list[BlockRecord] = []
        unlinked: list[int] = []
        for k in item.keys:
            rec = self._index.get(k)
            if rec is not None:
                if not rec.mask & bit:
                    rec.mask |= bit
                    gained.append(rec)
                continue
            was = orphans.get(k)
            if was & _ANNOUNCED and not was & bit:
                # Compacted without its tokens, it cannot announce the new copy: it becomes
                # unannounced, and the match that links it announces every copy.
                orphans[k] = (was & _LOWER) | bit
                self._announced -= 1
            elif not was & bit:
                unlinked.append(k)
        orphans.or_many(unlinked, bit)
        self._sink.emit_stored(gained, lt.medium)

    def _on_removed(self, item: _Removal) -> None:
        bit = item.medium.bit
        gone: list[BlockRecord] = []
        announced: list[int] = []  # compacted blocks whose copy there was announced
        for k in item.keys:
            rec = self._index.get(k)
            if rec is not None and rec.mask & bit:
                rec.mask &= ~bit
                gone.append(rec)
            elif k in self._orphans:
                was = self._orphans[k]
                left = was & ~bit
                if was & _ANNOUNCED and was & bit:
                    announced.append(k)
                if left & _LOWER:
                    self._orphans[k] = left
                else:
                    del self._orphans[k]
                    self._announced -= bool(was & _ANNOUNCED)
        if gone or announced:
            self._sink.emit(BlockRemoved([r.seq_hash for r in gone] + announced, item.medium))
        for r in gone:
            if r.mask == 0 and self._index.get(r.seq_hash) is r:
                self._forget(r)

    def _on_loaded(self, th: TransferHandle) -> None:
        lctx: _LoadContext = th.context
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
            if th.status is not th.status.FAILED and not self._reports_misses(medium):
                self._on_removed(_Removal(medium, missing))
        else:
            self._onboarded[medium] += len(positions)
        handle._pending -= 1
        if handle._pending == 0:
            if isinstance(handle, StageHandle):
                self._finish_stage(handle)
            else:
                self._finish_onboard(handle)
        # Loads count against the tier's in-flight bound: stores deferred behind them can
        # go down now (nothing else may finish soon to submit them).
        for lt in self._lower:
            if lt.medium is medium:
                self._store_deferred(lt)

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

    def _has_room(self, tier: _MemTier, need: int, will_hold: Sequence[BlockRecord]) -> bool:
        """Whether ``need`` pages can be taken in ``tier`` after pinning ``will_hold``."""
        short = need - tier.alloc.num_free
        if short <= 0:
            return True
        unpinned = sum(1 for r in will_hold
                       if tier.slot(r) >= 0 and tier.alloc.refcount(tier.slot(r)) == 0)
        return short <= tier.evictable() - unpinned

    def _check_room(self, tier: _MemTier, need: int, will_hold: Sequence[BlockRecord]) -> None:
        """Raise, changing nothing, unless :meth:`_has_room`."""
        if not self._has_room(tier, need, will_hold):
            raise PoolExhaustedError(
                f"{tier.medium.value}: {need} pages needed, {tier.alloc.num_free} free and "
                f"{tier.evictable()} evictable (some may be about to be pinned)")

    def _relink(self, recs: list[BlockRecord], hashes: BlockHashes, tokens: Any,
                lora_name: str | None, limit: int | None = None) -> None:
        """Extend a match with unlinked pages of persistent tiers (lineage: only right after
        a linked parent, or at the start of a sequence), up to ``limit`` blocks."""
        seq, bs = hashes.sequence, self.block_size
        end = len(seq) if limit is None else min(limit, len(seq))
        tok = None if tokens is None else as_token_array(tokens)
        k = len(recs)
        announce: list[BlockRecord] = []
        while k < end and seq[k] in self._orphans:
            piece = (b"" if tok is None or tok.size < (k + 1) * bs
                     else tok[k * bs: (k + 1) * bs].tobytes())
            rec = BlockRecord(seq[k], hashes.local[k], recs[-1] if recs else None, piece,
                              lora_name)
            if self._unorphan(rec):
                announce.append(rec)
            self._index.insert(rec)
            recs.append(rec)
            if not rec.mask & (_GPU | _HOST):  # announced now: compacted again if unused
                self._compactable.append(rec)
            k += 1
        self._emit_relinked(announce)

    def _unorphan(self, rec: BlockRecord) -> bool:
        """Give ``rec`` the residency of its unlinked pages; whether they must be announced
        (a compacted block's events still stand)."""
        mask = self._orphans.pop(rec.seq_hash, 0)
        rec.mask = mask & _LOWER
        if mask & _ANNOUNCED:
            self._announced -= 1
            return False
        return True

    def _linked(self, hashes: BlockHashes, n: int, tokens: Any,
                lora_name: str | None) -> list[BlockRecord]:
        """Records of the longest cached prefix of the first ``n`` blocks, linking the
        unlinked and compacted pages of persistent tiers back into the index."""
        recs = self._index.match(hashes.sequence[:n])
        if self._orphans and len(recs) < n:
            self._relink(recs, hashes, tokens, lora_name, n)
        return recs

    def _matched(self, match: MatchResult) -> list[BlockRecord]:
        """The records of a match's prefix as cached now (onboard, stage)."""
        try:
            recs = self._index.match(match.sequence_hashes)
        except TypeError:  # an unhashable "hash" put into a match's list after the fact
            raise InvalidKeyError("match.sequence_hashes holds something that is not a block "
                                  "hash") from None
        n = len(match.sequence_hashes)
        if self._orphans and len(recs) < n and len(match.hashes) >= n:
            self._relink(recs, match.hashes, getattr(match, "_tokens", None), match.lora_name,
                         n)
        return recs

    def _parent_of(self, hashes: BlockHashes, start_block: int, tokens: Any,
                   lora_name: str | None) -> BlockRecord | None:
        """The record of block ``start_block - 1``, linked back if it was compacted."""
        rec = self._index.get(hashes.sequence[start_block - 1])
        if rec is None and self._orphans:
            chain = self._linked(hashes, start_block, tokens, lora_name)
            rec = chain[-1] if len(chain) == start_block else None
        return rec

    def _unbusy(self, recs: Sequence[BlockRecord]) -> None:
        busy = self._busy
        for r in recs:
            left = busy[r.seq_hash] - 1
            if left > 0:
                busy[r.seq_hash] = left
            else:
                del busy[r.seq_hash]
            if not r.mask & (_GPU | _HOST):
                self._compactable.append(r)

    def _compact(self) -> None:
        """Records resident only below host memory, with no child in the index, leave the
        index for the table of unlinked pages (``_ANNOUNCED``: nothing is announced; a
        match reads them there, onboard and stage link them back). The index then holds a
        Python record only for blocks of G1 and G2 and their ancestors: a disk or bucket
        tier of tens of millions of pages costs the table's bytes per page, not a record's.
        """
        todo, self._compactable = self._compactable, []
        index, orphans, busy = self._index, self._orphans, self._busy
        for leaf in todo:
            rec: BlockRecord | None = leaf
            while (rec is not None and rec.mask and not rec.mask & (_GPU | _HOST)
                   and not rec.children and rec.seq_hash not in busy
                   and index.get(rec.seq_hash) is rec):
                parent = rec.parent
                index.remove_subtree(rec)  # a leaf: itself
                orphans[rec.seq_hash] = rec.mask | _ANNOUNCED
                self._announced += 1
                rec.mask = 0
                rec = parent

    def _emit_relinked(self, recs: Sequence[BlockRecord]) -> None:
        """BlockStored for the persistent-tier copies of ``recs``, linked back into the index
        (a BlockRemoved was emitted for each when it was unlinked)."""
        if not recs:
            return
        linked: dict[Medium, list[BlockRecord]] = {}
        for rec in recs:
            for m in mediums_of(rec.mask & _LOWER):
                linked.setdefault(m, []).append(rec)
        for m, rs in linked.items():
            self._sink.emit_stored(rs, m)

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
        flagged = sum(1 for _, m in self._orphans.items() if m & _ANNOUNCED)
        assert flagged == self._announced, f"announced count {self._announced} != {flagged}"
        for _, m in self._orphans.items():
            assert m & _LOWER and not m & (_GPU | _HOST), f"unlinked mask {m:#x}"
        for rec in self._index:
            assert rec.mask != 0, "indexed block resident nowhere"
            assert bool(rec.mask & _GPU) == (rec.g1 >= 0)
            assert bool(rec.mask & _HOST) == (rec.g2 >= 0)
            assert rec.seq_hash not in self._orphans
            if rec.parent is not None:
                assert self._index.get(rec.parent.seq_hash) is rec.parent, "lineage rule"
                assert rec.parent.children is not None and rec in rec.parent.children

"""G3: the local-disk page store.

Pages live in slots of large preallocated slab files (storage/disk/slabs.py), each slot a
64-byte header and the payload (storage/page.py), rounded up to 4 KiB for O_DIRECT. The
index (storage/disk/index.py) maps block hash -> slot in lmdb.

A put goes: reserve slots (evicting if full) -> write header + payload into aligned staging
buffers, adjacent slots in one large write -> fdatasync the slabs -> commit the index
entries (group commit, storage/disk/commit.py) -> make the pages visible. A page is in the
index only once its bytes are durable, so after ``kill -9`` at any moment a reopened store
serves every page whose put returned, and a torn page (written, never committed, or
damaged later) is caught by its header and checksum and dropped.

Threading: the asyncio methods hand each call to one *op* thread, which does the blocking
work and splits big batches into chunks for the *I/O* threads. All shared state sits
behind one lock that is never held across I/O or waits.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from kvbm.errors import ConfigError, LayoutError, StorageError
from kvbm.layout import KVLayout
from kvbm.medium import Medium
from kvbm.policies import make_admission, make_eviction
from kvbm.storage.base import Capability, PageStore, RemovalReason, TierListener
from kvbm.storage.disk.commit import GroupCommitter
from kvbm.storage.disk.config import DiskTierConfig, Durability
from kvbm.storage.disk.directory import (
    DirectoryLock,
    Geometry,
    check_identity,
    create_identity,
    geometry_for,
    stored_geometry,
)
from kvbm.storage.disk.index import Entry, IndexOp, PageIndex
from kvbm.storage.disk.slabs import BufferPool, SlabFiles, probe_direct_io
from kvbm.storage.disk.slots import SlotAllocator
from kvbm.storage.page import (
    HEADER_SIZE,
    PageFault,
    PageHeader,
    parse_header,
    payload_checksum,
    verify_page,
)

if TYPE_CHECKING:
    from typing_extensions import Buffer

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Access-time updates wait for the next commit; past this many, a get commits them itself.
_DIRTY_FLUSH = 4096
#: A put that finds the tier full evicts, commits the evictions and retries this often.
_EVICT_ROUNDS = 8
#: Batches are not cut into runs smaller than this (a system call per run must pay off).
_MIN_RUN_BYTES = 1 << 20
#: Restart replays at most this many extra accesses per page into frequency-aware policies.
_REPLAY_ACCESSES = 4


class _Read(enum.Enum):
    """What reading one page came to."""

    HIT = enum.auto()
    ABSENT = enum.auto()  # not in the index: a plain miss
    CORRUPT = enum.auto()  # read, failed verification: dropped
    ERROR = enum.auto()  # the read itself failed: a miss, the page is kept


@dataclass(frozen=True, slots=True)
class _Run:
    """Adjacent slots of one slab, read or written with one system call."""

    slab: int
    offset: int
    #: (item index in the batch, key, slot) in slot order
    pages: list[tuple[int, int, int]]


class DiskStore(PageStore):
    """Pages in slab files on a local disk, indexed in lmdb. See the module docstring."""

    medium = Medium.DISK
    capabilities = Capability.DURABLE | Capability.EVICTS | Capability.PERSISTENT

    def __init__(self, layout: KVLayout, config: DiskTierConfig, *,
                 listener: TierListener | None = None) -> None:
        super().__init__(layout, listener=listener)
        self.config = config
        root = config.root
        wanted = geometry_for(layout, config.capacity_bytes, config.slab_bytes)
        if wanted.max_slots == 0:
            raise ConfigError(f"disk.capacity_bytes={config.capacity_bytes} is less than one "
                              f"page slot ({wanted.slot_bytes} bytes)")
        # Refuse a foreign directory before creating anything in it.
        check_identity(root, layout)
        root.mkdir(parents=True, exist_ok=True)
        self._dir_lock = DirectoryLock(root)
        try:
            self._open(layout, config, wanted)
        except BaseException:
            self._dir_lock.release()
            raise

    def _open(self, layout: KVLayout, config: DiskTierConfig, wanted: Geometry) -> None:
        root = config.root
        meta = check_identity(root, layout)  # again, now that we hold the lock
        if meta is None:
            geometry = wanted
            create_identity(root, layout, geometry)
        else:
            geometry = stored_geometry(meta, wanted, config.capacity_bytes)
        self.geometry = geometry
        # Policies first: an unknown name fails before any file is opened.
        self._policy = make_eviction(config.eviction, geometry.max_slots)
        self._admission = make_admission(config.admission)

        direct = probe_direct_io(root) if config.direct_io is not False else False
        if config.direct_io is True and not direct:
            raise StorageError(f"O_DIRECT is not supported on {root}; set direct_io to "
                               f"false or leave it unset to fall back to buffered I/O")
        self._direct = direct

        self._slabs = SlabFiles(root / "slabs", geometry, direct=direct)
        self._index_db = PageIndex(root / "index", geometry, self.page_bytes,
                                   sync=config.durability is Durability.POWER_LOSS)
        self._committer = GroupCommitter(self._index_db, self._slabs,
                                         sync_data=config.durability is Durability.POWER_LOSS)
        try:
            self._load(root)
        except BaseException:
            self._index_db.close()
            raise

        self._lock = threading.Lock()
        #: Keys being written by a put -> that put's completion event.
        self._pending: dict[int, threading.Event] = {}
        self._dirty: dict[int, Entry] = {}
        self._closed = False
        self._chunk_slots = max(1, config.io_chunk_bytes // geometry.slot_bytes)
        self._min_run_slots = max(1, min(self._chunk_slots,
                                         _MIN_RUN_BYTES // geometry.slot_bytes))
        self._buffers = BufferPool(self._chunk_slots * geometry.slot_bytes,
                                   keep=2 * config.io_threads)
        self._ops = ThreadPoolExecutor(2 * config.io_threads, thread_name_prefix="kvbm-disk-op")
        self._io = ThreadPoolExecutor(config.io_threads, thread_name_prefix="kvbm-disk-io")
        self._stats.extra["direct_io"] = int(direct)
        log.info("disk store %s open: %d pages, %d slots of %d bytes, %s I/O, %s", root,
                 len(self._index), geometry.max_slots, geometry.slot_bytes,
                 "O_DIRECT" if direct else "buffered", config.durability.value)

    def _load(self, root: Path) -> None:
        """The index into memory, the free slots, the policy's state."""
        geometry = self.geometry
        entries, bad = self._index_db.load()
        seen: set[int] = set()
        drop = list(bad)
        for k, e in list(entries.items()):
            # Records of a smaller capacity, or a second claim on a slot (which only damage
            # could produce), are dropped for good.
            if e.slot >= geometry.max_slots or e.slot in seen:
                drop.append(k)
                del entries[k]
            else:
                seen.add(e.slot)
        if drop:
            log.warning("disk store %s: dropping %d index entries (beyond the capacity, "
                        "unreadable or overlapping)", root, len(drop))
            self._index_db.apply([(k, None) for k in drop])

        existing = self._slabs.existing()
        existing_slots = (existing[-1] + 1) * geometry.slab_slots if existing else 0
        self._alloc = SlotAllocator(geometry, (e.slot for e in entries.values()),
                                    existing_slots)
        self._index: dict[int, Entry] = entries
        # Replay the index into the policy oldest use first, so that recency (and roughly
        # frequency) survive the restart.
        for key, e in sorted(entries.items(), key=lambda kv: kv[1].last_access):
            self._policy.insert(key, e.parent)
            for _ in range(min(e.freq - 1, _REPLAY_ACCESSES)):
                self._policy.access(key)

    @classmethod
    async def open(cls, layout: KVLayout, config: DiskTierConfig, *,
                   listener: TierListener | None = None) -> DiskStore:
        """Open on a worker thread (opening reads the whole index)."""
        return await asyncio.to_thread(cls, layout, config, listener=listener)

    # -- properties --------------------------------------------------------------------------
    @property
    def capacity_bytes(self) -> int:
        """Payload bytes: the slots that fit in ``config.capacity_bytes`` times the page size
        (each slot also holds a header and alignment padding)."""
        return self.geometry.max_slots * self.page_bytes

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return len(self._index) * self.page_bytes

    @property
    def direct_io(self) -> bool:
        """Whether the slabs are read and written with O_DIRECT (bypassing the page cache)."""
        return self._direct

    @property
    def group_commits(self) -> int:
        return self._committer.commits

    def drop_page_cache(self) -> None:
        """Evict the slabs from the page cache, so that the next reads come from the device
        (for benchmarks; a no-op in effect with O_DIRECT, which never caches them)."""
        self._slabs.drop_cache()

    # -- async API ---------------------------------------------------------------------------
    async def _call(self, fn: Callable[..., T], *args: object) -> T:
        self._check_open()
        try:
            return await asyncio.get_running_loop().run_in_executor(self._ops, fn, *args)
        except RuntimeError as e:
            if self._closed:  # the executor shut down between the check and the call
                raise StorageError("disk store is closed") from e
            raise

    async def put(self, items: Sequence[tuple[int, Buffer]],
                  *, parents: Sequence[int | None] | None = None) -> list[bool]:
        """See :meth:`PageStore.put`. ``parents`` (optional, one per item) names each
        block's prefix parent, for lineage-aware eviction; it is kept across restarts."""
        # Validate every payload before anything is written: a bad batch stores nothing.
        pages = [(key, self._check_payload(key, buf)) for key, buf in items]
        if parents is not None and len(parents) != len(pages):
            raise LayoutError(f"{len(parents)} parents for {len(pages)} pages")
        if not pages:
            return []
        return await self._call(self._put_sync, pages, parents)

    async def get(self, items: Sequence[tuple[int, Buffer]]) -> list[bool]:
        dests = [(key, self._check_payload(key, buf)) for key, buf in items]
        for key, mv in dests:
            if mv.readonly:
                raise LayoutError(f"the buffer for page {key:#x} is read-only")
        if not dests:
            return []
        return await self._call(self._get_sync, dests)

    async def exists(self, keys: Sequence[int]) -> list[bool]:
        with self._lock:
            self._check_open()
            return [k in self._index for k in keys]

    async def delete(self, keys: Sequence[int]) -> int:
        if not keys:
            return 0
        return await self._call(self._delete_sync, list(keys))

    async def keys(self) -> list[int]:
        with self._lock:
            self._check_open()
            return list(self._index)

    async def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        await asyncio.to_thread(self._close_sync)

    # -- internals: shared --------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise StorageError("disk store is closed")

    def _submit(self, ops: list[IndexOp], slabs: Sequence[int] = ()) -> int:
        """Queue index mutations, with any pending access updates in front. Lock held."""
        if self._dirty:
            ops = list(self._dirty.items()) + ops
            self._dirty.clear()
        return self._committer.submit(ops, slabs)

    def _forget(self, key: int) -> Entry | None:
        """Take ``key`` out of the in-memory index and the policy. Lock held."""
        entry = self._index.pop(key, None)
        if entry is not None:
            self._policy.remove(key)
            self._dirty.pop(key, None)
        return entry

    def _runs(self, pages: list[tuple[int, int, int]]) -> list[_Run]:
        """Group ``(item, key, slot)`` into runs of adjacent slots, at most a chunk each.

        A batch is cut into at least as many runs as there are I/O threads (down to
        ``_MIN_RUN_BYTES``): the device then has several requests in flight, and one run's
        copy and checksum (which hold the GIL) overlap another's system call (which does not).
        """
        per_thread = -(-len(pages) // self.config.io_threads)
        limit = min(self._chunk_slots, max(per_thread, self._min_run_slots))
        runs: list[_Run] = []
        cur: list[tuple[int, int, int]] = []
        for page in sorted(pages, key=lambda p: p[2]):
            if cur and (page[2] != cur[-1][2] + 1 or len(cur) == limit
                        or page[2] % self.geometry.slab_slots == 0):
                runs.append(self._run(cur))
                cur = []
            cur.append(page)
        if cur:
            runs.append(self._run(cur))
        return runs

    def _run(self, pages: list[tuple[int, int, int]]) -> _Run:
        slab, offset = self.geometry.locate(pages[0][2])
        return _Run(slab, offset, pages)

    def _parallel(self, fn: Callable[[_Run], T], runs: list[_Run]) -> list[T | BaseException]:
        """``fn`` over runs: the first on this thread, the rest on the I/O threads."""
        futures = [self._io.submit(fn, run) for run in runs[1:]]
        out: list[T | BaseException] = []
        try:
            out.append(fn(runs[0]))
        except Exception as e:  # per-run failure; the caller maps it to its pages
            out.append(e)
        for f in futures:
            try:
                out.append(f.result())
            except Exception as e:
                out.append(e)
        return out

    # -- internals: put ---------------------------------------------------------------------
    def _put_sync(self, pages: list[tuple[int, memoryview]],
                  parents: Sequence[int | None] | None) -> list[bool]:
        results = [False] * len(pages)
        # One event per put, shared by all its keys: a second put of a key in flight waits
        # for it, then looks the key up (one Future per key cost more than the index work).
        mine: threading.Event = threading.Event()
        claimed: list[int] = []
        waits: list[tuple[int, int, threading.Event]] = []
        todo: list[int] = []
        try:
            with self._lock:
                self._check_open()
                for i, (key, _) in enumerate(pages):
                    if key in self._index:
                        results[i] = True
                        self._stats.put_skipped += 1
                        continue
                    other = self._pending.get(key)
                    if other is not None:  # in flight: earlier in this batch or another put
                        waits.append((i, key, other))
                        continue
                    if self._admission is not None and not self._admission.admit(key):
                        continue
                    self._pending[key] = mine
                    claimed.append(key)
                    todo.append(i)
            slots = self._reserve(len(todo))
            if len(slots) < len(todo):
                log.debug("disk store full of pages being read: %d of %d pages not stored",
                          len(todo) - len(slots), len(todo))
            placed = [(i, pages[i][0], s) for i, s in zip(todo, slots, strict=False)]
            stored = self._write_and_commit(pages, placed, parents) if placed else []
            for i in stored:
                results[i] = True
        finally:
            # Whatever happened, release the claims, so no other put waits forever on a
            # page that will never arrive.
            with self._lock:
                for key in claimed:
                    self._pending.pop(key, None)
            mine.set()
        for i, key, event in waits:
            event.wait()
            with self._lock:
                results[i] = key in self._index
                self._stats.put_skipped += results[i]
        return results

    def _reserve(self, n: int) -> list[int]:
        """``n`` free slots (fewer if the policy cannot free enough), evicting as needed."""
        slots: list[int] = []
        for _ in range(_EVICT_ROUNDS):
            with self._lock:
                self._alloc.settle(self._committer.is_done)
                slots += self._alloc.take(n - len(slots))
                short = n - len(slots) - self._alloc.pending()
                evicted: list[int] = []
                freed: list[int] = []
                while len(evicted) < short:
                    victim = self._policy.victim()
                    if victim is None:
                        break
                    entry = self._index.pop(victim, None)
                    self._dirty.pop(victim, None)
                    if entry is not None:
                        evicted.append(victim)
                        freed.append(entry.slot)
                ticket = self._submit([(k, None) for k in evicted]) if evicted else 0
                self._alloc.release(freed, ticket)
                self._stats.evicted += len(evicted)
                waiting = self._alloc.pending() > 0
            if evicted:
                self._notify_removed(evicted, RemovalReason.EVICTED)
            if len(slots) == n or not (evicted or waiting):
                break
            if ticket:
                # The evicted pages leave the index durably before their slots are reused.
                self._wait_quietly(ticket)
            elif waiting and not evicted:
                self._flush()  # limbo slots wait for a commit nobody else may trigger
        return sorted(slots)

    def _wait_quietly(self, ticket: int) -> None:
        try:
            self._committer.wait(ticket)
        except StorageError as e:
            # The deletion did not commit: after a restart those entries point at reused
            # slots, which reads then detect as torn. Nothing wrong is ever served.
            log.error("disk store: committing removals failed: %s", e)

    def _flush(self) -> None:
        with self._lock:
            ticket = self._submit([])
        self._wait_quietly(ticket)

    def _write_and_commit(self, pages: list[tuple[int, memoryview]],
                          placed: list[tuple[int, int, int]],
                          parents: Sequence[int | None] | None) -> list[int]:
        """Write placed pages, commit them, publish them; the item indexes that stored."""
        runs = self._runs(placed)
        outcomes = self._parallel(lambda run: self._write_run(run, pages), runs)
        now = time.time_ns()
        ok: list[tuple[int, int, Entry]] = []
        failed_slots: list[int] = []
        slabs: set[int] = set()
        for run, outcome in zip(runs, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                log.error("disk store: writing %d pages to slab %d failed: %s",
                          len(run.pages), run.slab, outcome)
                failed_slots += [s for _, _, s in run.pages]
                continue
            slabs.add(run.slab)
            for (i, key, slot), checksum in zip(run.pages, outcome, strict=True):
                parent = parents[i] if parents is not None else None
                ok.append((i, key, Entry(slot, checksum, now, 1, parent)))
        ticket = 0
        with self._lock:
            if failed_slots:
                self._stats.errors += len(failed_slots)
                self._alloc.give_back(failed_slots)
            if ok:
                ticket = self._submit([(key, e) for _, key, e in ok], sorted(slabs))
        if not ok:
            return []
        try:
            self._committer.wait(ticket)
        except StorageError as err:
            log.error("disk store: committing %d pages failed: %s", len(ok), err)
            with self._lock:
                self._stats.errors += len(ok)
                self._alloc.give_back(entry.slot for _, _, entry in ok)
            return []
        with self._lock:
            for _, key, e in ok:
                self._index[key] = e
                self._policy.insert(key, e.parent)
            self._stats.puts += len(ok)
            self._stats.put_bytes += len(ok) * self.page_bytes
        return [i for i, _, _ in ok]

    def _write_run(self, run: _Run, pages: list[tuple[int, memoryview]]) -> list[bytes]:
        """Header + payload of each page into a staging buffer, then one write."""
        slot, pb = self.geometry.slot_bytes, self.page_bytes
        buf = self._buffers.acquire()
        try:
            mv = memoryview(buf)
            checksums = []
            for j, (i, key, _) in enumerate(run.pages):
                payload = pages[i][1]
                base = j * slot
                checksum = payload_checksum(payload)
                mv[base:base + HEADER_SIZE] = PageHeader(self.fingerprint, key, pb,
                                                         checksum).pack()
                mv[base + HEADER_SIZE:base + HEADER_SIZE + pb] = payload
                pad = slot - HEADER_SIZE - pb
                if pad:
                    mv[base + slot - pad:base + slot] = bytes(pad)
                checksums.append(checksum)
            self._slabs.write(run.slab, run.offset, mv[:len(run.pages) * slot])
            return checksums
        finally:
            self._buffers.release(buf)

    # -- internals: get -----------------------------------------------------------------------
    def _get_sync(self, dests: list[tuple[int, memoryview]]) -> list[bool]:
        outcome = [_Read.ABSENT] * len(dests)
        reading: list[tuple[int, int, int]] = []
        entries: dict[int, Entry] = {}
        with self._lock:
            self._check_open()
            for i, (key, _) in enumerate(dests):
                e = self._index.get(key)
                if e is not None:
                    # Pin the slot, not the key: an eviction may still take the key, but the
                    # slot is not overwritten until this read is done (slots.py).
                    self._alloc.start_read(e.slot)
                    reading.append((i, key, e.slot))
                    entries[i] = e
                    outcome[i] = _Read.ERROR  # until a read says otherwise
        corrupt: list[int] = []
        ticket = 0
        try:
            if reading:
                runs = self._runs(reading)
                done = self._parallel(lambda run: self._read_run(run, dests, entries), runs)
                for run, result in zip(runs, done, strict=True):
                    if isinstance(result, BaseException):
                        # An I/O error is not evidence against the page: a miss, kept.
                        log.error("disk store: reading slab %d failed: %s", run.slab, result)
                        continue
                    for (i, _, _), read in zip(run.pages, result, strict=True):
                        outcome[i] = read
        finally:
            now = time.time_ns()
            with self._lock:
                for i, key, slot in reading:
                    self._alloc.end_read(slot)
                    e = entries[i]
                    if self._index.get(key) is not e:
                        continue  # deleted or evicted meanwhile: nothing to update
                    if outcome[i] is _Read.HIT:
                        self._policy.access(key)
                        e.last_access = now
                        e.freq += 1
                        self._dirty[key] = e
                    elif outcome[i] is _Read.CORRUPT:
                        self._forget(key)
                        corrupt.append(key)
                hits = outcome.count(_Read.HIT)
                s = self._stats
                s.gets += len(dests)
                s.hits += hits
                s.misses += len(dests) - hits
                s.get_bytes += hits * self.page_bytes
                s.corrupt += len(corrupt)
                s.errors += outcome.count(_Read.ERROR)
                if corrupt or len(self._dirty) > _DIRTY_FLUSH:
                    ticket = self._submit([(k, None) for k in corrupt])
                    dropped = set(corrupt)
                    self._alloc.release({slot for _, k, slot in reading if k in dropped},
                                        ticket)
        if corrupt:
            log.warning("disk store: %d corrupt pages dropped (%s)", len(corrupt),
                        ", ".join(f"{k:#x}" for k in corrupt[:8]))
            self._notify_removed(corrupt, RemovalReason.CORRUPT)
        if ticket:
            self._wait_quietly(ticket)
        return [o is _Read.HIT for o in outcome]

    def _read_run(self, run: _Run, dests: list[tuple[int, memoryview]],
                  entries: dict[int, Entry]) -> list[_Read]:
        """One read for the run, then verify each page and copy its payload out."""
        slot, pb = self.geometry.slot_bytes, self.page_bytes
        buf = self._buffers.acquire()
        try:
            mv = memoryview(buf)
            got = self._slabs.read(run.slab, run.offset, mv[:len(run.pages) * slot])
            out = []
            for j, (i, key, _) in enumerate(run.pages):
                base = j * slot
                if got < base + HEADER_SIZE + pb:
                    fault: str = PageFault.TRUNCATED.value  # the slab ends early: torn
                else:
                    head = mv[base:base + HEADER_SIZE]
                    payload = mv[base + HEADER_SIZE:base + HEADER_SIZE + pb]
                    bad = verify_page(head, payload, fingerprint=self.fingerprint, seq_hash=key)
                    if bad is None:
                        header = parse_header(head)
                        # A valid page of this key but not the one the index committed (an
                        # older incarnation in a slot never reused since) is stale.
                        if (isinstance(header, PageHeader)
                                and header.checksum == entries[i].checksum):
                            dests[i][1][:] = payload
                            out.append(_Read.HIT)
                            continue
                        fault = "stale"
                    else:
                        fault = bad.value
                log.debug("disk store: page %#x in slab %d failed verification: %s", key,
                          run.slab, fault)
                out.append(_Read.CORRUPT)
            return out
        finally:
            self._buffers.release(buf)

    # -- internals: delete / close ------------------------------------------------------------
    def _delete_sync(self, keys: list[int]) -> int:
        with self._lock:
            self._check_open()
            freed: list[int] = []
            gone: list[int] = []
            for key in keys:
                e = self._forget(key)
                if e is not None:
                    freed.append(e.slot)
                    gone.append(key)
            if not gone:
                return 0
            ticket = self._submit([(k, None) for k in gone])
            self._alloc.release(freed, ticket)
            self._stats.deleted += len(gone)
        self._committer.wait(ticket)
        return len(gone)

    def _close_sync(self) -> None:
        # Calls already running finish (they hold the state they need); queued ones see
        # the store closed and fail cleanly.
        self._ops.shutdown(wait=True)
        self._io.shutdown(wait=True)
        try:
            if self._dirty:
                self._flush()
        finally:
            self._index_db.close()
            self._slabs.close()
            self._dir_lock.release()

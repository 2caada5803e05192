"""G3: the local-disk page store.

Pages live in slots of large preallocated slab files (storage/disk/slabs.py): each slab the
64-byte headers (storage/page.py) of its slots, then their payloads back to back, each slot
rounded up to 4 KiB for O_DIRECT (storage/disk/directory.py). The index
(storage/disk/index.py) maps block hash -> slot in lmdb.

A put goes: reserve slots (evicting if full) -> write the payloads, a run of adjacent slots
per vectored write straight from the caller's pages where O_DIRECT allows, then the header
blocks that cover their headers (storage/disk/runs.py) -> fdatasync the slabs -> commit the
index entries (group commit, storage/disk/commit.py) -> make the pages visible. A page is in
the index only once its bytes are durable, so after ``kill -9`` at any moment a reopened
store serves every page whose put returned, and a torn page (written, never committed, or
damaged later) is caught by its header and checksum and dropped.

Threading: the asyncio methods hand each call to one *op* thread, which does the blocking
work and splits big batches into runs for the *I/O* threads. All shared state sits behind
one lock that is never held across I/O or waits. The per-page Python work (hashing, headers,
index records, policy updates after a read) is done inside the runs, where it overlaps other
runs' system calls (which release the GIL); what is left between the last write and the
return of a put is the commit and publishing the pages.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar, cast

from kvbm.errors import ConfigError, InvalidArgumentError, KvbmError, LayoutError, StorageError
from kvbm.layout import KVLayout
from kvbm.medium import Medium
from kvbm.policies import make_admission, make_eviction
from kvbm.storage.args import check_items, check_keys, check_parents
from kvbm.storage.base import Capability, PageStore, RemovalReason, TierListener
from kvbm.storage.disk.commit import GroupCommitter
from kvbm.storage.disk.config import DiskTierConfig, Durability
from kvbm.storage.disk.directory import (
    DirectoryLock,
    Geometry,
    IdentityState,
    check_identity,
    create_identity,
    geometry_for,
    stored_geometry,
)
from kvbm.storage.disk.index import Entry, checksum_of, parent_of, touched, use_of
from kvbm.storage.disk.recover import geometry_from_slabs, open_index, repair_identity
from kvbm.storage.disk.runs import MAX_RUN_SLOTS, Run, RunIO, cut_runs
from kvbm.storage.disk.slabs import SlabFiles, probe_direct_io
from kvbm.storage.disk.slots import SlotAllocator

if TYPE_CHECKING:
    from typing_extensions import Buffer

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Access-time updates ride along with the next commit. Past this many, and once the oldest
#: has waited this long, a get queues a commit of them that an I/O thread sees through (never
#: the get itself): they cost device time (random B-tree pages), and only recency after a
#: crash depends on them.
_DIRTY_FLUSH = 4096
_DIRTY_MAX_AGE_S = 1.0
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


def _unwritable(root: Path, e: OSError) -> StorageError:
    """An OS error while opening the store at ``root`` as a :class:`StorageError` that says
    what to do."""
    # Which path failed: the directory itself, or one of the store's own names inside it
    # (a "slabs" that is a file, a "LOCK" that is a directory).
    where = f" ({e.filename})" if e.filename and str(e.filename) != str(root) else ""
    return StorageError(f"cannot open the disk store at {root}: {e.strerror or e}{where} "
                        f"({type(e).__name__}); disk.path must be a directory this process "
                        f"can create and write (or an existing kvbm disk store it can write): "
                        f"fix its permissions or mount, or point disk.path elsewhere")


class DiskStore(PageStore):
    """Pages in slab files on a local disk, indexed in lmdb. See the module docstring."""

    medium = Medium.DISK
    capabilities = Capability.DURABLE | Capability.EVICTS | Capability.PERSISTENT

    def __init__(self, layout: KVLayout, config: DiskTierConfig, *,
                 listener: TierListener | None = None) -> None:
        if not isinstance(layout, KVLayout):
            raise InvalidArgumentError(f"layout must be a KVLayout, got {type(layout).__name__}")
        if not isinstance(config, DiskTierConfig):
            raise InvalidArgumentError(f"config must be a DiskTierConfig, got "
                                       f"{type(config).__name__}")
        if listener is not None and not callable(getattr(listener, "on_removed", None)):
            raise InvalidArgumentError(f"listener must have an on_removed method, got "
                                       f"{type(listener).__name__}")
        super().__init__(layout, listener=listener)
        self.config = config
        root = config.root
        wanted = geometry_for(layout, config.capacity_bytes, config.slab_bytes)
        if wanted.max_slots == 0:
            raise ConfigError(f"disk.capacity_bytes={config.capacity_bytes} is less than one "
                              f"page slot ({wanted.slot_bytes} bytes) and its header block "
                              f"({wanted.header_area} bytes)")
        try:
            # Refuse a foreign directory (or another model's pages) before creating
            # anything in it.
            if check_identity(root, layout).state is IdentityState.DAMAGED:
                geometry_from_slabs(root, layout, wanted, config.capacity_bytes)
            root.mkdir(parents=True, exist_ok=True)
            self._dir_lock = DirectoryLock(root)
        except OSError as e:
            if isinstance(e, KvbmError):
                raise
            raise _unwritable(root, e) from e
        try:
            self._open(layout, config, wanted)
        except BaseException as e:
            self._dir_lock.release()
            if isinstance(e, OSError) and not isinstance(e, KvbmError):
                raise _unwritable(root, e) from e
            raise

    def _open(self, layout: KVLayout, config: DiskTierConfig, wanted: Geometry) -> None:
        root = config.root
        ident = check_identity(root, layout)  # again, now that we hold the lock
        if ident.state is IdentityState.ABSENT:
            geometry = wanted
            create_identity(root, layout, geometry)
        elif ident.state is IdentityState.DAMAGED:
            geometry = repair_identity(root, layout, wanted, config.capacity_bytes,
                                       ident.problem, self._stats)
        else:
            assert ident.meta is not None
            geometry = stored_geometry(ident.meta, wanted, config.capacity_bytes)
        self.geometry = geometry
        for stale in root.glob(".direct-probe-*"):  # a kill -9 during the probe below
            # The probe is a file; anything else under its name is not ours to remove.
            if stale.is_symlink() or stale.is_file():
                stale.unlink()
        # Policies first: an unknown name fails before any file is opened.
        self._policy = make_eviction(config.eviction, geometry.max_slots)
        self._admission = make_admission(config.admission)

        direct = probe_direct_io(root) if config.direct_io is not False else False
        if config.direct_io is True and not direct:
            raise StorageError(f"O_DIRECT is not supported on {root}; set direct_io to "
                               f"false or leave it unset to fall back to buffered I/O")
        self._direct = direct

        self._slabs = SlabFiles(root / "slabs", geometry, direct=direct)
        opened = open_index(root, geometry, layout,
                            sync=config.durability is Durability.POWER_LOSS, stats=self._stats)
        self._index_db = opened.index
        self._committer = GroupCommitter(self._index_db, self._slabs,
                                         sync_data=config.durability is Durability.POWER_LOSS)
        try:
            self._load(root, opened.entries, opened.bad)
        except BaseException:
            self._committer.close()
            self._index_db.close()
            raise

        self._lock = threading.Lock()
        #: The puts in flight: each one's keys being written and its completion event, by
        #: ``id`` of the event.
        self._pending: dict[int, tuple[set[int], threading.Event]] = {}
        #: Access-time updates not committed yet: key -> its packed index record.
        self._dirty: dict[int, bytes] = {}
        self._dirty_since = 0.0  # time.monotonic() of the oldest of them
        self._closed = False
        self._chunk_slots = max(1, min(MAX_RUN_SLOTS,
                                       config.io_chunk_bytes // geometry.slot_bytes))
        self._min_run_slots = max(1, min(self._chunk_slots,
                                         _MIN_RUN_BYTES // geometry.slot_bytes))
        self._runio = RunIO(self._slabs, geometry, self.page_bytes, self.fingerprint,
                            max_run_slots=self._chunk_slots, keep_buffers=2 * config.io_threads)
        self._ops = ThreadPoolExecutor(2 * config.io_threads, thread_name_prefix="kvbm-disk-op")
        self._io = ThreadPoolExecutor(config.io_threads, thread_name_prefix="kvbm-disk-io")
        self._io_threads = config.io_threads
        self._stats.extra["direct_io"] = int(direct)
        #: Pages copied through a staging buffer (not aligned for O_DIRECT), puts and gets.
        self._stats.extra["staged_pages"] = 0
        #: Slabs whose writes failed, taking no new pages while this process runs (slots.py).
        self._retired: set[int] = set()
        self._stats.extra["retired_slabs"] = 0
        log.info("disk store %s open: %d pages, %d slots of %d bytes, %s I/O, %s", root,
                 len(self._index), geometry.max_slots, geometry.slot_bytes,
                 "O_DIRECT" if direct else "buffered", config.durability.value)

    def _load(self, root: Path, entries: dict[int, Entry], bad: list[int]) -> None:
        """The index into memory (``entries``, ``bad``: :meth:`PageIndex.load`), the free
        slots, the policy's state."""
        geometry, slot_of = self.geometry, self._index_db.slot_of
        seen: set[int] = set()
        drop = list(bad)  # slots
        for k, e in list(entries.items()):
            # Records of a smaller capacity are dropped for good.
            slot = slot_of(e)
            if slot >= geometry.max_slots:
                drop.append(slot)
                del entries[k]
            else:
                seen.add(slot)
        if drop:
            log.warning("disk store %s: dropping %d index entries (beyond the capacity, "
                        "unreadable, or a second slot of one block)", root, len(drop))
            self._index_db.apply(drop, [None] * len(drop))

        existing = self._slabs.existing()
        existing_slots = (existing[-1] + 1) * geometry.slab_slots if existing else 0
        self._alloc = SlotAllocator(geometry, seen, existing_slots)
        self._index: dict[int, Entry] = entries
        # Replay the index into the policy oldest use first, so that recency (and roughly
        # frequency) survive the restart.
        for key, e in sorted(entries.items(), key=lambda kv: use_of(kv[1])):
            self._policy.insert(key, parent_of(e))
            for _ in range(min(use_of(e)[1] - 1, _REPLAY_ACCESSES)):
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
        (the slabs also hold 64 bytes of header per slot, and any alignment padding)."""
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
        # Validate every key and payload before anything is written: a bad batch stores
        # nothing.
        keys, bufs = check_items(items)
        views = [self._view(key, buf) for key, buf in zip(keys, bufs, strict=True)]
        checked_parents = check_parents(parents, len(keys))
        if not keys:
            return []
        return await self._call(self._put_sync, keys, views, checked_parents)

    async def get(self, items: Sequence[tuple[int, Buffer]]) -> list[bool]:
        keys, bufs = check_items(items)
        views = [self._view(key, buf) for key, buf in zip(keys, bufs, strict=True)]
        for key, mv in zip(keys, views, strict=True):
            if mv.readonly:
                raise LayoutError(f"the buffer for page {key:#x} is read-only")
        if not keys:
            return []
        return await self._call(self._get_sync, keys, views)

    def _view(self, key: int, buf: Buffer) -> memoryview:
        """The page as a flat byte view: the caller's own when it is one already (as
        HostPool pages are), which saves an object per page."""
        if (type(buf) is memoryview and buf.format == "B" and buf.ndim == 1
                and buf.c_contiguous and buf.nbytes == self.page_bytes):
            return buf
        try:
            return self._check_payload(key, buf)
        except TypeError as e:  # not a buffer, or not a contiguous one
            if isinstance(e, KvbmError):
                raise
            raise InvalidArgumentError(f"page {key:#x}: the payload must be a contiguous "
                                       f"buffer of {self.page_bytes} bytes, got "
                                       f"{type(buf).__name__} ({e})") from None

    async def exists(self, keys: Sequence[int]) -> list[bool]:
        checked = check_keys(keys)
        with self._lock:
            self._check_open()
            return [k in self._index for k in checked]

    async def delete(self, keys: Sequence[int]) -> int:
        checked = check_keys(keys)
        self._check_open()
        if not checked:
            return 0
        return await self._call(self._delete_sync, checked)

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
    # Batches travel as parallel lists (keys, views, slots, ...) rather than a tuple per page:
    # per-page objects that live as long as a batch are promoted by the cyclic GC and set off
    # full collections (see storage/disk/runs.py).

    def _check_open(self) -> None:
        if self._closed:
            raise StorageError("disk store is closed")

    def _submit(self, slots: list[int], records: list[bytes | None],
                slabs: Sequence[int] = ()) -> int:
        """Queue index changes (the new record of each slot, or ``None`` to empty it), with
        any pending access updates in front. Lock held."""
        if self._dirty:
            slot_of = self._index_db.slot_of
            records = [*self._dirty.values(), *records]
            slots = [slot_of(cast(Entry, r)) for r in records[:len(self._dirty)]] + slots
            self._dirty.clear()
        return self._committer.submit(slots, records, slabs)

    def _forget(self, key: int) -> Entry | None:
        """Take ``key`` out of the in-memory index and the policy. Lock held."""
        entry = self._index.pop(key, None)
        if entry is not None:
            self._policy.remove(key)
            self._dirty.pop(key, None)
        return entry

    def _runs(self, slots: list[int]) -> list[Run]:
        """Cut ascending ``slots`` into runs, a chunk at most, and at least one per worker of
        :meth:`_parallel` (down to ``_MIN_RUN_BYTES``): the device then has several requests
        in flight, and one run's hashing (which holds the GIL) overlaps another's system
        call (which does not)."""
        share = -(-len(slots) // (self._io_threads + 1))
        return cut_runs(slots, self.geometry,
                        min(self._chunk_slots, max(share, self._min_run_slots)))

    def _parallel(self, fn: Callable[[Run], T], runs: list[Run]) -> list[T | BaseException]:
        """``fn`` over runs, on this thread and the I/O threads alike, each taking the next
        run as it gets done with one (so that none idles while runs are left); per run, its
        result or the exception it raised."""
        out: list[T | BaseException | None] = [None] * len(runs)
        take = itertools.count().__next__  # atomic: one C call under the GIL

        def work() -> None:
            while (k := take()) < len(runs):
                try:
                    out[k] = fn(runs[k])
                except Exception as e:  # per-run failure; the caller maps it to its pages
                    out[k] = e

        helpers = [self._io.submit(work) for _ in range(min(len(runs) - 1, self._io_threads))]
        work()
        for f in helpers:
            f.result()
        return cast("list[T | BaseException]", out)  # every run has its entry by now

    # -- internals: put ---------------------------------------------------------------------
    def _put_sync(self, keys: list[int], views: list[memoryview],
                  parents: Sequence[int | None] | None) -> list[bool]:
        n = len(keys)
        results = [False] * n
        # One event per put, shared by all its keys: a second put of a key in flight waits
        # for it, then looks the key up (one Future per key cost more than the index work).
        # The claim is the put's set of keys, registered whole and released whole: set
        # operations (in C) find the keys already stored or in flight, so a batch of new
        # pages (the common case) costs no Python per page here.
        mine: threading.Event = threading.Event()
        claim = id(mine)
        waits: list[tuple[int, int, threading.Event]] = []
        todo: list[int]  # item positions to write
        try:
            with self._lock:
                self._check_open()
                index, admission = self._index, self._admission
                wanted = set(keys)
                stored_before = wanted.intersection(index)
                busy = {k: ev for held, ev in self._pending.values()
                        for k in held.intersection(wanted)}
                if admission is None and not stored_before and not busy and len(wanted) == n:
                    todo = list(range(n))
                    claimed = wanted
                else:
                    todo, claimed = [], set()
                    skipped = 0
                    for i, key in enumerate(keys):
                        if key in stored_before:
                            results[i] = True
                            skipped += 1
                            continue
                        other = busy.get(key)
                        if other is None and key in claimed:
                            other = mine  # earlier in this batch
                        if other is not None:
                            waits.append((i, key, other))
                            continue
                        if admission is not None and not admission.admit(key):
                            continue
                        claimed.add(key)
                        todo.append(i)
                    self._stats.put_skipped += skipped
                self._pending[claim] = (claimed, mine)
            slots = self._reserve(len(todo))
            if len(slots) < len(todo):
                log.debug("disk store full of pages being read: %d of %d pages not stored",
                          len(todo) - len(slots), len(todo))
                del todo[len(slots):]
            # Slots come ascending: todo[j] goes to slots[j], and the lists are in slot order.
            retired = len(self._retired)
            stored = self._write_and_commit(keys, views, parents, todo, slots) if slots else []
            if len(stored) < len(todo) and len(self._retired) > retired:
                # Writes to a slab failed and it was retired: once more on other slots.
                done = set(stored)
                again = [i for i in todo if i not in done]
                slots = self._reserve(len(again))
                del again[len(slots):]
                if slots:
                    stored += self._write_and_commit(keys, views, parents, again, slots)
            if len(stored) == n:
                results = [True] * n
            else:
                for i in stored:
                    results[i] = True
        finally:
            # Whatever happened, release the claims, so no other put waits forever on a
            # page that will never arrive.
            with self._lock:
                self._pending.pop(claim, None)
            mine.set()
        for i, key, event in waits:
            event.wait()
            with self._lock:
                results[i] = key in self._index
                self._stats.put_skipped += results[i]
        return results

    def _reserve(self, n: int) -> list[int]:
        """``n`` free slots, ascending (fewer if the policy cannot free enough), evicting
        as needed."""
        slots: list[int] = []
        for _ in range(_EVICT_ROUNDS):
            with self._lock:
                self._alloc.settle(self._committer.done)
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
                        freed.append(self._index_db.slot_of(entry))
                ticket = self._submit(freed, [None] * len(freed)) if evicted else 0
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
            # Removals that did not commit leave entries that, after a restart, point at
            # reused slots, which reads then detect as torn: nothing wrong is ever served.
            # Lost access times only cost recency.
            log.error("disk store: committing removals or access times failed: %s", e)

    def _flush(self) -> None:
        """Commit everything queued, pending access updates included."""
        with self._lock:
            ticket = self._submit([], []) if self._dirty else 0
        if ticket:
            self._wait_quietly(ticket)  # the access updates' own ticket: its error is ours
        self._committer.flush()

    def _write_and_commit(self, keys: list[int], views: list[memoryview],
                          parents: Sequence[int | None] | None, todo: list[int],
                          slots: list[int]) -> list[int]:
        """Write items ``todo`` to ``slots``, commit them, publish them; the items stored."""
        runs = self._runs(slots)
        now = time.time_ns()
        outcomes = self._parallel(
            lambda run: self._write_run(run, keys, views, parents, todo, slots, now), runs)
        new_keys: list[int] = []
        entries: list[bytes | None] = []  # all bytes; typed for the commit queue
        stored: list[int] = []
        written: list[int] = []
        failed: list[int] = []
        slabs: set[int] = set()
        done: list[tuple[int, int, int]] = []  # runs written: slab, slot position, slots
        bad_slabs: set[int] = set()
        staged = 0
        for run, outcome in zip(runs, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                log.error("disk store: writing %d pages to slab %d failed (%s); the slab "
                          "takes no new pages until the store is opened again",
                          run.stop - run.start, run.slab, outcome)
                failed += slots[run.start:run.stop]
                bad_slabs.add(run.slab)
                continue
            slabs.add(run.slab)
            new_keys += outcome[0]
            entries += outcome[1]
            staged += outcome[2]
            stored += todo[run.start:run.stop]
            written += slots[run.start:run.stop]
            done.append((run.slab, run.offset, run.stop - run.start))
        if done:
            try:
                self._runio.write_headers(done)
            except Exception as err:
                log.error("disk store: writing the headers of %d pages failed: %s",
                          len(new_keys), err)
                failed += written
                new_keys, entries, stored, written = [], [], [], []
        ticket = 0
        with self._lock:
            self._stats.extra["staged_pages"] += staged
            if failed:
                self._stats.errors += len(failed)
                if bad_slabs:
                    self._alloc.retire(bad_slabs)
                    self._retired |= bad_slabs
                    self._stats.extra["retired_slabs"] = len(self._retired)
                self._alloc.give_back(failed)
            if new_keys:
                ticket = self._submit(written, entries, sorted(slabs))
        if not new_keys:
            return []
        try:
            self._committer.wait(ticket)
        except StorageError as err:
            log.error("disk store: committing %d pages failed: %s", len(new_keys), err)
            with self._lock:
                self._stats.errors += len(new_keys)
                self._alloc.give_back(written)
            return []
        with self._lock:
            index, insert = self._index, self._policy.insert
            index.update(zip(new_keys, cast("list[Entry]", entries), strict=True))
            if parents is None:
                for key in new_keys:
                    insert(key, None)
            else:
                for key, i in zip(new_keys, stored, strict=True):
                    insert(key, parents[i])
            self._stats.puts += len(new_keys)
            self._stats.put_bytes += len(new_keys) * self.page_bytes
        return stored

    def _write_run(self, run: Run, keys: list[int], views: list[memoryview],
                   parents: Sequence[int | None] | None, todo: list[int], slots: list[int],
                   now: int) -> tuple[list[int], list[bytes | None], int]:
        """Write a run; its keys and entries (built here, in parallel with other runs'
        writes), and how many of its pages were staged."""
        items = todo[run.start:run.stop]
        run_keys = [keys[i] for i in items]
        checksums, staged = self._runio.write(run.slab, run.offset, run_keys,
                                              [views[i] for i in items])
        record, slab, step = self._index_db.record, run.slab, self.geometry.slot_bytes
        offset = run.offset - step
        entries: list[bytes | None] = []
        for key, checksum, i in zip(run_keys, checksums, items, strict=True):
            offset += step
            entries.append(record(key, slab, offset, checksum, now, 1,
                                  parents[i] if parents is not None else None))
        return run_keys, entries, staged

    # -- internals: get -----------------------------------------------------------------------
    def _get_sync(self, keys: list[int], views: list[memoryview]) -> list[bool]:
        outcome = [_Read.ABSENT] * len(keys)
        items: list[int] = []  # item positions found in the index ...
        slots: list[int] = []  # ... their slots ...
        sums: list[bytes] = []  # ... and the checksums their entries hold
        with self._lock:
            self._check_open()
            lookup, start_read = self._index.get, self._alloc.start_read
            slot_of = self._index_db.slot_of
            for i, key in enumerate(keys):
                e = lookup(key)
                if e is not None:
                    # Pin the slot, not the key: an eviction may still take the key, but the
                    # slot is not overwritten until this read is done (slots.py).
                    slot = slot_of(e)
                    start_read(slot)
                    items.append(i)
                    slots.append(slot)
                    sums.append(checksum_of(e))
        corrupt: list[int] = []
        freed: list[int] = []
        if items:
            order = sorted(range(len(items)), key=slots.__getitem__)
            items = [items[j] for j in order]
            slots = [slots[j] for j in order]
            sums = [sums[j] for j in order]
            runs = self._runs(slots)
            now = time.time_ns()
            done = self._parallel(
                lambda run: self._read_run(run, keys, views, items, slots, sums, now), runs)
            for run, result in zip(runs, done, strict=True):
                if isinstance(result, BaseException):
                    # _read_run reports I/O failures itself: this is a bug in it. The slots
                    # stay pinned (never reused) rather than risk serving a torn page.
                    log.error("disk store: reading %d pages failed: %r",
                              run.stop - run.start, result)
                    reads = [_Read.ERROR] * (run.stop - run.start)
                else:
                    reads, dropped, dropped_slots = result
                    corrupt += dropped
                    freed += dropped_slots
                for i, read in zip(items[run.start:run.stop], reads, strict=True):
                    outcome[i] = read
        ticket = 0
        with self._lock:
            hits = outcome.count(_Read.HIT)
            s = self._stats
            s.gets += len(keys)
            s.hits += hits
            s.misses += len(keys) - hits
            s.get_bytes += hits * self.page_bytes
            s.corrupt += len(corrupt)
            s.errors += outcome.count(_Read.ERROR)
            if corrupt or (len(self._dirty) > _DIRTY_FLUSH
                           and time.monotonic() - self._dirty_since > _DIRTY_MAX_AGE_S):
                ticket = self._submit(freed, [None] * len(freed))
                self._alloc.release(freed, ticket)
        if corrupt:
            log.warning("disk store: %d corrupt pages dropped (%s)", len(corrupt),
                        ", ".join(f"{k:#x}" for k in corrupt[:8]))
            self._notify_removed(corrupt, RemovalReason.CORRUPT)
            # Rare; waiting keeps "dropped" meaning "dropped durably" when get returns.
            self._wait_quietly(ticket)
        elif ticket:
            # Access times only: an I/O thread sees the commit through, the get moves on.
            self._io.submit(self._wait_quietly, ticket)
        return [o is _Read.HIT for o in outcome]

    def _read_run(self, run: Run, keys: list[int], views: list[memoryview], items: list[int],
                  slots: list[int], sums: list[bytes], now: int
                  ) -> tuple[list[_Read], list[int], list[int]]:
        """Read and verify a run, unpin its slots, record the hits' accesses and take the
        corrupt pages out of the index; the outcomes, and the keys and slots dropped."""
        a, b = run.start, run.stop
        run_items = items[a:b]
        run_keys = [keys[i] for i in run_items]
        try:
            faults, staged = self._runio.read(run.slab, run.offset, run_keys,
                                              [views[i] for i in run_items], sums[a:b])
        except Exception as err:
            # An I/O error is not evidence against the pages: misses, kept.
            log.error("disk store: reading slab %d failed: %s", run.slab, err)
            out = [_Read.ERROR] * (b - a)
            staged = 0
        else:
            out = [_Read.HIT if f is None else _Read.CORRUPT for f in faults]
            for key, fault in zip(run_keys, faults, strict=True):
                if fault is not None:
                    log.debug("disk store: page %#x in slab %d failed verification: %s",
                              key, run.slab, fault)
        dropped: list[int] = []
        dropped_slots: list[int] = []
        slot_of = self._index_db.slot_of
        with self._lock:
            end_read, index, access = self._alloc.end_read, self._index, self._policy.access
            dirty = self._dirty
            if not dirty:
                self._dirty_since = time.monotonic()
            for j, key in enumerate(run_keys):
                slot = slots[a + j]
                end_read(slot)
                e = index.get(key)
                # The slot was pinned until now, so an entry on it is the page just read;
                # on another slot (or none), the key was deleted or evicted meanwhile.
                if e is None or slot_of(e) != slot:
                    continue
                if out[j] is _Read.HIT:
                    access(key)
                    index[key] = dirty[key] = touched(e, now)
                elif out[j] is _Read.CORRUPT:
                    self._forget(key)
                    dropped.append(key)
                    dropped_slots.append(slot)
            self._stats.extra["staged_pages"] += staged
        return out, dropped, dropped_slots

    # -- internals: delete / close ------------------------------------------------------------
    def _delete_sync(self, keys: list[int]) -> int:
        with self._lock:
            self._check_open()
            freed: list[int] = []
            gone: list[int] = []
            for key in keys:
                e = self._forget(key)
                if e is not None:
                    freed.append(self._index_db.slot_of(e))
                    gone.append(key)
            if not gone:
                return 0
            ticket = self._submit(freed, [None] * len(freed))
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
            self._flush()  # access updates, and anything queued without a waiter
        finally:
            self._committer.close()
            self._index_db.close()
            self._slabs.close()
            self._dir_lock.release()

"""Group commit: index mutations applied in submission order, made durable in batches.

A durable commit costs an fdatasync of each written slab plus an lmdb sync: milliseconds,
whatever its size. Concurrent puts therefore do not commit one by one: each *submits* its
mutations (a ticket) and *waits*; the first waiter becomes the leader, takes everything
queued, syncs the slabs and applies all of it in one lmdb transaction, while later
waiters sleep until their ticket is covered (the classic database group commit).

Ordering rule the store relies on: a submission is made while the store's state lock is
held, at the moment the in-memory change it mirrors happens, so the index on disk goes
through the same sequence of states as the one in memory.

Within a commit, the slabs' fdatasync runs on a helper thread while the leader fills the
lmdb transaction; the transaction commits (and its entries become durable) only once the
data is. The two overlap instead of adding up in the latency every waiting put sits behind.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor

from kvbm.errors import StorageError
from kvbm.storage.disk.index import PageIndex
from kvbm.storage.disk.slabs import SlabFiles

log = logging.getLogger(__name__)


class GroupCommitter:
    def __init__(self, index: PageIndex, slabs: SlabFiles, *, sync_data: bool) -> None:
        self._index = index
        self._slabs = slabs
        self._sync_data = sync_data
        self._cond = threading.Condition()
        self._queue: list[tuple[int, list[int], list[bytes | None], set[int]]] = []
        self._next = 1
        self._done = 0  # every ticket <= _done is committed (or failed)
        self._failed: dict[int, BaseException] = {}
        self._leading = False
        #: Number of group commits so far (a figure for benchmarks).
        self.commits = 0
        self._syncer = ThreadPoolExecutor(1, thread_name_prefix="kvbm-disk-sync")

    def submit(self, slots: list[int], records: list[bytes | None],
               slabs: Iterable[int] = ()) -> int:
        """Queue index changes (:meth:`PageIndex.apply`: each slot's new record, or
        ``None``); ``slabs`` hold data the new records point at (synced before they
        commit)."""
        with self._cond:
            ticket = self._next
            self._next += 1
            self._queue.append((ticket, slots, records, set(slabs)))
            return ticket

    @property
    def done(self) -> int:
        """Every ticket up to this one is committed (or failed)."""
        with self._cond:
            return self._done

    def flush(self) -> None:
        """Commit everything submitted so far. A failure stays with the submitters' own
        :meth:`wait` (each reports its ticket's); the flush itself raises nothing."""
        with self._cond:
            self._commit_through(self._next - 1)

    def wait(self, ticket: int) -> None:
        """Block until ``ticket`` is committed; :class:`StorageError` if its group failed."""
        with self._cond:
            self._commit_through(ticket)
            error = self._failed.pop(ticket, None)
        if error is not None:
            raise StorageError(f"index commit failed: {error}") from error

    def _commit_through(self, ticket: int) -> None:
        """Lead or wait for group commits until ``ticket`` is done. ``_cond`` held."""
        while self._done < ticket:
            if self._leading:
                self._cond.wait()
                continue
            self._leading = True
            batch, self._queue = self._queue, []
            self._cond.release()
            error: BaseException | None = None
            try:
                self._commit(batch)
            except BaseException as e:  # recorded for every waiter of the group
                error = e
            finally:
                self._cond.acquire()
                self._leading = False
                if batch:
                    self._done = batch[-1][0]
                    if error is not None:
                        for t, *_ in batch:
                            self._failed[t] = error
                self._cond.notify_all()

    def close(self) -> None:
        self._syncer.shutdown(wait=True)

    def _commit(self, batch: list[tuple[int, list[int], list[bytes | None], set[int]]]
                ) -> None:
        if not batch:
            return
        slabs = sorted(set().union(*(s for *_, s in batch))) if self._sync_data else []
        # The pages first: an index entry must never point at data still in flight.
        sync = self._syncer.submit(self._slabs.sync, slabs) if slabs else None
        try:
            slots = [k for _, group, _, _ in batch for k in group]
            if slots:
                self._index.apply(slots, [r for _, _, group, _ in batch for r in group],
                                  before_commit=sync.result if sync is not None else None)
            elif sync is not None:
                sync.result()
        finally:
            if sync is not None:
                futures.wait([sync])  # a failed commit leaves no sync running behind it
        self.commits += 1

"""Group commit: index mutations applied in submission order, made durable in batches.

A durable commit costs an fdatasync of each written slab plus an lmdb sync: milliseconds,
whatever its size. Concurrent puts therefore do not commit one by one: each *submits* its
mutations (a ticket) and *waits*; the first waiter becomes the leader, takes everything
queued, syncs the slabs and applies all of it in one lmdb transaction, while later
waiters sleep until their ticket is covered (the classic database group commit).

Ordering rule the store relies on: a submission is made while the store's state lock is
held, at the moment the in-memory change it mirrors happens, so the index on disk goes
through the same sequence of states as the one in memory.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable

from kvbm.errors import StorageError
from kvbm.storage.disk.index import IndexOp, PageIndex
from kvbm.storage.disk.slabs import SlabFiles

log = logging.getLogger(__name__)


class GroupCommitter:
    def __init__(self, index: PageIndex, slabs: SlabFiles, *, sync_data: bool) -> None:
        self._index = index
        self._slabs = slabs
        self._sync_data = sync_data
        self._cond = threading.Condition()
        self._queue: list[tuple[int, list[IndexOp], set[int]]] = []
        self._next = 1
        self._done = 0  # every ticket <= _done is committed (or failed)
        self._failed: dict[int, BaseException] = {}
        self._leading = False
        #: Number of group commits so far (a figure for benchmarks).
        self.commits = 0

    def submit(self, ops: list[IndexOp], slabs: Iterable[int] = ()) -> int:
        """Queue ``ops``; ``slabs`` hold data the ops point at (synced before they commit)."""
        with self._cond:
            ticket = self._next
            self._next += 1
            self._queue.append((ticket, ops, set(slabs)))
            return ticket

    def is_done(self, ticket: int) -> bool:
        with self._cond:
            return ticket <= self._done

    def wait(self, ticket: int) -> None:
        """Block until ``ticket`` is committed; :class:`StorageError` if its group failed."""
        with self._cond:
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
                            for t, _, _ in batch:
                                self._failed[t] = error
                    self._cond.notify_all()
            error = self._failed.pop(ticket, None)
        if error is not None:
            raise StorageError(f"index commit failed: {error}") from error

    def _commit(self, batch: list[tuple[int, list[IndexOp], set[int]]]) -> None:
        if not batch:
            return
        if self._sync_data:
            # The pages first: an index entry must never point at data still in flight.
            self._slabs.sync(sorted(set().union(*(s for _, _, s in batch))))
        ops = [op for _, group, _ in batch for op in group]
        if ops:
            self._index.apply(ops)
        self.commits += 1

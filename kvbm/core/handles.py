"""What onboard and stage return: handles on a matched prefix whose blocks may still be
loading from disk or object storage, completed on the manager's owner thread."""

from __future__ import annotations

import abc
import enum
import time
from typing import TYPE_CHECKING

from kvbm.checks import as_seconds, closed_error
from kvbm.index import BlockRecord
from kvbm.medium import Medium

if TYPE_CHECKING:
    from kvbm.manager import BlockManager


class OnboardStatus(enum.Enum):
    PENDING = "pending"  # loads from lower tiers under way
    DONE = "done"  # block_ids is final
    CANCELLED = "cancelled"  # cut short by cancel() or a timeout; block_ids is final


class _LoadWaiter(abc.ABC):
    """What onboard and stage handles share: loads from lower tiers completed on the
    manager's owner thread, a wait that cancels on timeout."""

    _mgr: BlockManager
    status: OnboardStatus

    def done(self) -> bool:
        return self.status is not OnboardStatus.PENDING

    def poll(self) -> bool:
        """Process finished transfers (owner thread); returns :meth:`done`. Once the
        manager is closed, a handle still pending raises :class:`~kvbm.errors.ClosedError`
        (close() finishes every handle whose transfers it could wait for)."""
        if not self.done():
            self._mgr.poll()
        return self.done()

    @abc.abstractmethod
    def cancel(self) -> None:
        """Give up on the loads still running (each handle cuts its own prefix)."""

    def _wait(self, timeout: float | None) -> None:
        limit = as_seconds(timeout, "timeout")
        if not self.done() and self._mgr.closed:
            raise closed_error()
        deadline = None if limit is None else time.monotonic() + limit
        while not self.done():
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                self.cancel()
                break
            self._mgr._drain(block=True, timeout=left)


class OnboardHandle(_LoadWaiter):
    """The result of :meth:`BlockManager.onboard_async`: G1 pages of a matched prefix, some
    of them still being loaded from disk or object storage.

    ``wait()`` (or ``poll()`` until ``done()``) must be called on the manager's owner thread:
    completing a load updates the index. When a load fails (a miss, a corrupt page, a dead
    tier) the prefix ends before that block: ``block_ids`` is then shorter and the engine
    computes the rest. The engine owns one hold on each id in ``block_ids`` once done.
    """

    def __init__(self, mgr: BlockManager, recs: list[BlockRecord], g1_slots: list[int],
                 staged: dict[int, tuple[int, int]], pending: int) -> None:
        self._mgr = mgr
        self._recs = recs
        self._g1 = g1_slots
        #: position in recs -> (G2 staging slot, G1 slot) of blocks loaded from below
        self._staged = staged
        self._pending = pending
        self._ok: dict[int, bool] = {}
        self._cut: int | None = None  # set by cancel(): nothing from here on is returned
        self.status = OnboardStatus.PENDING if pending else OnboardStatus.DONE
        self.loaded_from: dict[Medium, int] = {}
        self.block_ids: list[int] = [] if pending else list(g1_slots)

    def wait(self, timeout: float | None = None) -> list[int]:
        """Block until every load finished (owner thread); returns ``block_ids``. On timeout
        (seconds, finite and >= 0; ``None``: no limit) the handle is cancelled: the prefix is
        cut before the first block still loading."""
        self._wait(timeout)
        return self.block_ids

    def cancel(self) -> None:
        """Give up on the loads: the prefix ends before the first block that had to be
        loaded (their pages are still cached in G2 if they arrive)."""
        if self.status is not OnboardStatus.PENDING:
            return
        if self._mgr.closed:
            raise closed_error()
        first = min(self._staged)
        self._cut = first
        self.block_ids = self._g1[:first]
        self._mgr._release_tail(self, first)
        self.status = OnboardStatus.CANCELLED


class StageHandle(_LoadWaiter):
    """The result of :meth:`BlockManager.stage`: G2 pages of a matched prefix, held for a
    mover to copy into the engine's memory, some of them still loading from disk or object
    storage.

    ``poll()``/``wait()`` on the manager's owner thread. When a load fails the prefix ends
    before that block (``slots`` is then shorter). Once done, ``slots[i]`` is the G2 page of
    block ``start_block + i`` and ``sequence_hashes[i]`` its hash; each is held until
    :meth:`release` (the pages cannot be evicted or reused while a mover reads them).
    """

    def __init__(self, mgr: BlockManager, recs: list[BlockRecord], start_block: int,
                 slots: list[int], staged: dict[int, int], pending: int) -> None:
        self._mgr = mgr
        self._recs = recs
        self.start_block = start_block
        self._slots = slots
        #: position in recs -> G2 staging slot of blocks loaded from below
        self._staged = staged
        self._pending = pending
        self._ok: dict[int, bool] = {}
        self._cut: int | None = None
        self._released = False
        self.status = OnboardStatus.PENDING if pending else OnboardStatus.DONE
        self.slots: list[int] = [] if pending else list(slots)
        self.sequence_hashes: list[int] = [] if pending else [r.seq_hash for r in recs]
        #: blocks that had to be loaded from each lower tier
        self.loading_from: dict[Medium, int] = {}

    @property
    def num_blocks(self) -> int:
        """Blocks ready in G2 (final once done)."""
        return len(self.slots)

    def wait(self, timeout: float | None = None) -> list[int]:
        """Block until every load finished; on timeout the handle is cancelled (the prefix
        ends before the first block still loading). Returns ``slots``."""
        self._wait(timeout)
        return self.slots

    def cancel(self) -> None:
        """Give up on the loads still running: the prefix ends before the first of them
        (their pages are cached in G2 if they arrive)."""
        if self.status is not OnboardStatus.PENDING:
            return
        if self._mgr.closed:
            raise closed_error()
        first = min(self._staged)
        self._cut = first
        self._mgr._release_stage_tail(self, first)
        self.slots = self._slots[:first]
        self.sequence_hashes = [r.seq_hash for r in self._recs[:first]]
        self.status = OnboardStatus.CANCELLED

    def release(self) -> None:
        """Drop the holds on the pages (idempotent; cancels loads still running)."""
        if self._released:
            return
        if self._mgr.closed:
            self._released = True
            return
        self.cancel()
        self._released = True
        g2 = self._mgr._g2
        assert g2 is not None
        for slot in self.slots:
            self._mgr._release_one(g2, slot)
        self.slots = []

    def __enter__(self) -> StageHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

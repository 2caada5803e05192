"""Transfer handles: what :meth:`Agent.transfer` returns, and what a backend completes.

A :class:`TransferHandle` is the caller's side: a status (:class:`TransferStatus`),
``wait(timeout)``, ``cancel()``, ``release()`` and a context manager. A :class:`Transfer`
is the backend's side of the same transfer: the checked segments, the peer, a cancel
signal, and :meth:`Transfer.complete`, to be called exactly once when the backend no longer
touches the memory of any segment (successfully or not).
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING

from kvbm.errors import InvalidArgumentError, TransferError, TransportTimeoutError
from kvbm.transports.descriptors import Op, Segment

if TYPE_CHECKING:
    from kvbm.transports.metadata import PeerInfo


class TransferStatus(enum.Enum):
    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


class TransferCancelled(TransferError):
    """Internal marker: the transfer ended because it was cancelled."""


class CancelFlag:
    """Whether a transfer was cancelled: the ``is_set`` / ``set`` of a ``threading.Event``
    without its condition variable, which cost a third of a small transfer's set-up (nobody
    waits on it: a backend checks it between steps and unblocks its I/O through
    :meth:`Transfer.on_cancel`)."""

    __slots__ = ("_set",)

    def __init__(self) -> None:
        self._set = False

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True


class Transfer:
    """The backend's view of one transfer (see the module)."""

    __slots__ = ("_cancel_fns", "_done_fn", "_lock", "_state", "cancelled", "nbytes", "notify",
                 "op", "peer", "progress", "segments")

    def __init__(self, peer: PeerInfo, op: Op, segments: list[Segment], nbytes: int,
                 notify: bytes | None, done: Callable[[Transfer, BaseException | None], None]
                 ) -> None:
        self.peer = peer
        self.op = op
        self.segments = segments
        self.nbytes = nbytes
        self.notify = notify
        #: Set when the caller cancels: a backend stops at its next step and completes.
        self.cancelled = CancelFlag()
        self._cancel_fns: list[Callable[[], None]] = []
        #: Set by a backend that can move the transfer in the thread that waits for it:
        #: ``TransferHandle.wait`` calls it once before blocking (no hand-over between
        #: threads when a caller submits and waits at once). It must not raise.
        self.progress: Callable[[], None] | None = None
        self._lock = threading.Lock()
        self._state = 0  # 0 running, 1 completed
        self._done_fn = done

    def on_cancel(self, fn: Callable[[], None]) -> Callable[[], None]:
        """Call ``fn`` (from the cancelling thread) when the transfer is cancelled; at once
        if it already was. A backend uses it to unblock its I/O (shut a socket down).
        Returns a function that withdraws ``fn`` (call it when that I/O is over)."""
        with self._lock:
            if not self.cancelled.is_set():
                self._cancel_fns.append(fn)
                return lambda: self._withdraw(fn)
        fn()
        return lambda: None

    def _withdraw(self, fn: Callable[[], None]) -> None:
        with self._lock:
            fns = self._cancel_fns
            if fns and fns[-1] is fn:  # the usual case: the last one added
                fns.pop()
            elif fn in fns:
                fns.remove(fn)

    def cancel(self) -> None:
        with self._lock:
            if self.cancelled.is_set() or self._state:
                return
            self.cancelled.set()
            fns, self._cancel_fns = self._cancel_fns, []
        for fn in fns:
            fn()

    def complete(self, error: BaseException | None = None) -> None:
        """The backend is done with the segments' memory; ``error`` if it failed. Only the
        first call counts."""
        with self._lock:
            if self._state:
                return
            self._state = 1
            self._cancel_fns = []
        # The backend's progress function refers back to this transfer: drop it, so that the
        # transfer is freed by reference counting rather than by the garbage collector.
        self.progress = None
        self._done_fn(self, error)


class TransferHandle:
    """One asynchronous transfer, as the caller sees it.

    ``wait`` returns the final status (DONE or CANCELLED), raises the transfer's error when
    it FAILED, and raises :class:`TransportTimeoutError` when ``timeout`` passes first (the
    transfer goes on). Without a timeout (or one of at least ``transport.io_timeout_s``) it
    may move the bytes in the calling thread, where the backend allows it. ``release``
    (also on leaving a ``with`` block) cancels a transfer still pending and waits until no
    backend touches its memory any more: afterwards the local buffers may be reused. After a
    cancel, the bytes of the ranges involved are undefined (partly moved) and no
    notification is sent.
    """

    def __init__(self, xfer: Transfer, backend: str, release_timeout: float) -> None:
        """``release_timeout``: how long ``release`` waits for the backend; a ``wait`` with a
        shorter timeout never moves bytes in the caller's thread (it could overrun it)."""
        self.transfer = xfer
        #: The backend that carries it (``"tcp"``, ``"ucx"``, ``"nvlink"``).
        self.backend = backend
        self.peer = xfer.peer.name
        self.op = xfer.op
        self.nbytes = xfer.nbytes
        self._status = TransferStatus.PENDING
        self._error: BaseException | None = None
        # A lock held until the transfer ends: a cheaper event (a waiter takes and gives it
        # back; the next waiter then wakes in turn)
        self._finished = threading.Lock()
        self._finished.acquire()
        self._ended = False
        self._release_timeout = release_timeout

    # -- called by the agent -----------------------------------------------------------------
    def _finish(self, status: TransferStatus, error: BaseException | None) -> None:
        self._error = error
        self._status = status
        self._ended = True
        self._finished.release()

    # -- caller API -----------------------------------------------------------------------------
    @property
    def status(self) -> TransferStatus:
        return self._status

    @property
    def error(self) -> BaseException | None:
        """Why the transfer FAILED (``None`` otherwise)."""
        return self._error

    def done(self) -> bool:
        """Whether it has ended (any status but PENDING)."""
        return self._ended

    def wait(self, timeout: float | None = None) -> TransferStatus:
        if timeout is not None and (isinstance(timeout, bool)
                                    or not isinstance(timeout, int | float)
                                    or not timeout >= 0):
            raise InvalidArgumentError(f"timeout must be a number >= 0 or None, got "
                                       f"{timeout!r}")
        progress = self.transfer.progress
        if (progress is not None and not self._ended
                and (timeout is None or timeout >= self._release_timeout)):
            progress()
        if not self._ended and not self._await(timeout):
            raise TransportTimeoutError(f"{self.op.value} of {self.nbytes} bytes with "
                                        f"{self.peer} ({self.backend}) still pending after "
                                        f"{timeout} s")
        if self._status is TransferStatus.FAILED:
            assert self._error is not None
            raise self._error
        return self._status

    def cancel(self) -> None:
        """Ask the backend to stop; the status becomes CANCELLED once it has (unless the
        transfer ended first)."""
        self.transfer.cancel()

    def release(self) -> None:
        """Cancel if pending, then wait (bounded) until the backend has let go. Idempotent."""
        if not self._ended:
            self.transfer.cancel()
            self._await(self._release_timeout)

    def _await(self, timeout: float | None) -> bool:
        if not self._finished.acquire(
                timeout=-1 if timeout is None else min(timeout, threading.TIMEOUT_MAX)):
            return False
        self._finished.release()
        return True

    def __enter__(self) -> TransferHandle:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()

    def __repr__(self) -> str:
        return (f"TransferHandle({self.op.value} {self.nbytes} bytes, peer={self.peer!r}, "
                f"backend={self.backend!r}, {self._status.value})")

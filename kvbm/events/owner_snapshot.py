"""A residency snapshot built on the thread that owns the state, for a publisher thread.

A publisher resyncs its subscribers (``AllBlocksCleared`` then every resident block) from
its own thread, but the block manager is single-owner: its index must not be read while
the engine's thread changes it. :class:`OwnerSnapshot` is the publisher's ``snapshot``
callable: it posts a request and waits; the owner serves it at its next call into the
manager (every call drains, :meth:`kvbm.BlockManager.poll` too). An owner that makes no
call within the wait leaves the request standing: the publisher counts a failed snapshot
and asks again later, and the request is served on the owner's next call.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

from kvbm.errors import TransferError
from kvbm.events.records import KVEvent

log = logging.getLogger(__name__)


class _Request:
    __slots__ = ("done", "error", "events")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.events: list[KVEvent] = []
        self.error: str | None = None


class OwnerSnapshot:
    """``snapshot()`` for a publisher (any thread); :meth:`serve` on the owner thread."""

    def __init__(self, build: Callable[[], Sequence[KVEvent]], timeout_s: float = 5.0) -> None:
        self._build = build
        self._timeout = timeout_s
        self._lock = threading.Lock()
        self._request: _Request | None = None
        self._closed = False

    @property
    def wanted(self) -> bool:
        """Whether a publisher waits for a snapshot (cheap: checked on every drain)."""
        return self._request is not None

    def __call__(self) -> list[KVEvent]:
        with self._lock:
            if self._closed:
                raise TransferError("the manager is closed: no snapshot")
            if self._request is None:
                self._request = _Request()
            req = self._request
        if not req.done.wait(self._timeout):
            raise TransferError(f"the manager's owner thread made no call within "
                                f"{self._timeout:.1f} s to build the snapshot (it is served "
                                f"on the next call; poll() serves it too)")
        if req.error is not None:
            raise TransferError(f"building the snapshot failed: {req.error}")
        return req.events

    def serve(self) -> None:
        """Build the snapshot a publisher asked for, if any (owner thread)."""
        with self._lock:
            req, self._request = self._request, None
        if req is None:
            return
        try:
            req.events = list(self._build())
        except Exception as e:  # the manager goes on; the publisher counts it and retries
            log.exception("building the residency snapshot failed")
            req.error = f"{type(e).__name__}: {e}"
        req.done.set()

    def close(self) -> None:
        """Refuse further requests and release a waiting publisher."""
        with self._lock:
            self._closed = True
            req, self._request = self._request, None
        if req is not None:
            req.error = "the manager closed"
            req.done.set()

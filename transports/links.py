"""The requesting side's connections of the ucx and nvlink backends, and who drives them.

A *link* is one authenticated connection to a peer (plus whatever the backend attaches:
a UCX worker, opened IPC handles). A peer gets at most ``parallel_connections`` links,
opened on first use and dropped after any error but a refusal (their state is then
unknown). A transfer is cut into parts (one, or one per link when it is large); each part
runs in whichever thread claims it first: a background thread of the peer, or the caller's
own thread when it waits on the handle (``Transfer.progress``), so that a caller that
submits and waits moves the bytes itself, without a hand-over between threads. A link is
used by one thread at a time.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import threading
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

from kvbm.errors import RemoteAccessError, TransportError, TransportTimeoutError
from kvbm.transports.config import TransportConfig
from kvbm.transports.control import expect_map
from kvbm.transports.descriptors import Segment
from kvbm.transports.handle import Transfer, TransferCancelled
from kvbm.transports.metadata import PeerInfo

log = logging.getLogger(__name__)


class Link(Protocol):
    sock: socket.socket

    def close(self) -> None: ...


L = TypeVar("L", bound=Link)


def split(segments: list[Segment], parts: int) -> list[list[Segment]]:
    """Cut ``segments`` into at most ``parts`` runs of about equal bytes, in order."""
    share = -(-sum(s.length for s in segments) // parts)
    out: list[list[Segment]] = [[]]
    room = share
    for s in segments:
        while s.length > room:
            if room:
                out[-1].append(s._replace(length=room))
                s = s._replace(local_offset=s.local_offset + room,
                               remote_offset=s.remote_offset + room, length=s.length - room)
            out.append([])
            room = share
        out[-1].append(s)
        room -= s.length
    return [p for p in out if p]


class _Join:
    __slots__ = ("error", "left", "lock", "xfer")

    def __init__(self, xfer: Transfer, parts: int) -> None:
        self.xfer = xfer
        self.left = parts
        self.error: BaseException | None = None
        self.lock = threading.Lock()


class Part:
    """One piece of a transfer, run once by whoever claims it; the last one to end
    completes the transfer (with the first real error)."""

    __slots__ = ("_claim", "_join", "segs")

    def __init__(self, join: _Join, segs: list[Segment]) -> None:
        self._join = join
        self.segs = segs
        self._claim = threading.Lock()

    def claim(self) -> bool:
        return self._claim.acquire(blocking=False)

    @property
    def xfer(self) -> Transfer:
        return self._join.xfer

    def done(self, error: BaseException | None) -> None:
        j = self._join
        with j.lock:
            if error is not None and (j.error is None or isinstance(j.error,
                                                                    TransferCancelled)):
                j.error = error
            j.left -= 1
            last = j.left == 0
        if last:
            j.xfer.complete(j.error)


def parts_of(xfer: Transfer, cfg: TransportConfig) -> list[Part]:
    segs = (split(xfer.segments, cfg.parallel_connections)
            if xfer.nbytes >= cfg.split_threshold_bytes else [xfer.segments])
    join = _Join(xfer, len(segs))
    return [Part(join, s) for s in segs]


J = TypeVar("J")


class LinkSlots(Generic[L, J]):
    """At most so many links to one peer (the idle ones kept for reuse), the worker threads
    that take jobs from one queue, and giving a link back or closing them all: the part every
    pooled backend shares (tcp's connections and the generic :class:`LinkPool`)."""

    def __init__(self) -> None:
        self._idle: list[L] = []
        self._count = 0
        self._closed = False
        self._cond = threading.Condition()
        self._jobs: queue.SimpleQueue[J | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []

    def _start_workers(self, n: int, name: str, work: Callable[[], None]) -> None:
        """Start ``n`` threads running ``work`` (last in a subclass's ``__init__``: they
        may take a job at once)."""
        self._threads = [threading.Thread(target=work, name=name, daemon=True)
                         for _ in range(n)]
        for t in self._threads:
            t.start()

    def _release(self, link: L, *, broken: bool) -> None:
        with self._cond:
            if broken or self._closed:
                self._count -= 1
            else:
                self._idle.append(link)
            self._cond.notify()
        if broken or self._closed:
            link.close()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._cond.notify_all()
            for _ in self._threads:
                self._jobs.put(None)
        for link in idle:
            link.close()


class LinkPool(LinkSlots[L, Part]):
    """The links to one peer, its background threads and its queue of parts.

    ``open_link(peer)`` makes a link; ``exchange(link, xfer, segments)`` moves segments
    over it (raising on failure; a :class:`RemoteAccessError` leaves the link usable)."""

    def __init__(self, kind: str, peer: str, open_link: Callable[[PeerInfo], L],
                 exchange: Callable[[L, Transfer, list[Segment]], None],
                 cfg: TransportConfig) -> None:
        super().__init__()
        self.kind = kind
        self.peer = peer
        self._open = open_link
        self._exchange = exchange
        self._cfg = cfg
        self._start_workers(cfg.parallel_connections, f"kvbm-{kind}-{peer}", self._work)

    def submit(self, xfer: Transfer) -> None:
        parts = parts_of(xfer, self._cfg)

        def progress() -> None:  # the waiting thread runs what no background one has taken
            for p in parts:
                if p.claim():
                    self.run(p)

        xfer.progress = progress
        with self._cond:
            if self._closed:
                raise TransportError(f"{self.kind} link to {self.peer} is closed")
            for p in parts:
                self._jobs.put(p)

    def _work(self) -> None:
        while True:
            part = self._jobs.get()
            if part is None:
                return
            if part.claim():
                self.run(part)

    def run(self, part: Part) -> None:
        """Move ``part`` in this thread (claimed by the caller)."""
        xfer = part.xfer
        try:
            if xfer.cancelled.is_set():
                raise TransferCancelled("cancelled before it started")
            link = self._acquire(xfer.peer)
            # A cancel must not wait out a blocked socket read: shutting the socket down
            # ends it (and the link).
            forget = xfer.on_cancel(lambda: shutdown(link.sock))
            try:
                self._exchange(link, xfer, part.segs)
            except RemoteAccessError:
                self._release(link, broken=False)  # refused before anything moved
                raise
            except BaseException:
                self._release(link, broken=True)
                raise
            finally:
                forget()
            self._release(link, broken=False)
        except BaseException as exc:
            err: BaseException = exc
            if xfer.cancelled.is_set():
                err = TransferCancelled("cancelled")
            elif not isinstance(exc, TransportError):
                log.exception("%s: transfer with %s failed", self.kind, self.peer)
                err = TransportError(f"{self.kind} transfer failed: {exc!r}")
            part.done(err)
        else:
            part.done(None)

    def _acquire(self, peer: PeerInfo) -> L:
        with self._cond:
            while True:
                if self._closed:
                    raise TransportError(f"{self.kind} link to {self.peer} is closed")
                if self._idle:
                    return self._idle.pop()
                if self._count < self._cfg.parallel_connections:
                    self._count += 1
                    break
                if not self._cond.wait(self._cfg.io_timeout_s):
                    raise TransportTimeoutError(
                        f"no {self.kind} link to {self.peer} came free within "
                        f"{self._cfg.io_timeout_s} s")
        try:
            return self._open(peer)
        except BaseException:
            with self._cond:
                self._count -= 1
                self._cond.notify()
            raise


def check_answer(frame: Any) -> None:
    """An ``ok`` answer, or the error the peer sent (a refusal: RemoteAccessError)."""
    if isinstance(frame, dict) and frame.get("t") == "error":
        msg = frame.get("error")
        msg = msg if isinstance(msg, str) else "refused"
        if frame.get("code") == "access":
            raise RemoteAccessError(f"peer refused: {msg}")
        raise TransportError(f"peer refused: {msg}")
    expect_map(frame, "ok")


def shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)

"""The requesting side of the tcp backend: data connections to one peer, and who drives them.

A transfer is cut into parts (one, or one per connection when it is large); each part is
run by whichever thread claims it first: one of the peer's worker threads, or the caller's
own thread when it waits on the handle (``Transfer.progress``). A caller that submits and
waits at once thus moves the bytes itself, with no hand-over between threads (on a busy
machine each hand-over can cost a scheduling slice); a caller that does not wait gets
them moved in the background all the same.

Connections are pooled per peer (at most ``parallel_connections``), opened on first use
through the peer's listener, and closed after any error (their stream's state is unknown).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import threading
from collections.abc import Callable
from typing import Any

from kvbm.errors import RemoteAccessError, TransportError, TransportTimeoutError
from kvbm.transports.control import ProtocolError, expect_map, recv_frame
from kvbm.transports.descriptors import Op, Segment
from kvbm.transports.handle import Transfer, TransferCancelled
from kvbm.transports.metadata import PeerInfo
from kvbm.transports.sockio import Channel

log = logging.getLogger(__name__)

CHANNEL = "tcp"


def split(segments: list[Segment], parts: int) -> list[list[Segment]]:
    """Cut ``segments`` into at most ``parts`` runs of about equal bytes, in order."""
    total = sum(s.length for s in segments)
    share = -(-total // parts)
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


class Part:
    """One piece of a transfer; run once, by whoever claims it."""

    __slots__ = ("_claim", "join", "segs")

    def __init__(self, join: Join, segs: list[Segment]) -> None:
        self.join = join
        self.segs = segs
        self._claim = threading.Lock()

    def claim(self) -> bool:
        return self._claim.acquire(blocking=False)


class Join:
    """Completes a transfer when its last part ends (with the first real error)."""

    __slots__ = ("_error", "_left", "_lock", "xfer")

    def __init__(self, xfer: Transfer, parts: int) -> None:
        self.xfer = xfer
        self._left = parts
        self._error: BaseException | None = None
        self._lock = threading.Lock()

    def part_done(self, error: BaseException | None) -> None:
        with self._lock:
            if error is not None and (self._error is None or isinstance(
                    self._error, TransferCancelled)):
                self._error = error
            self._left -= 1
            last = self._left == 0
        if last:
            self.xfer.complete(self._error)


class PeerLink:
    """The data connections to one peer, its worker threads, and its queue of parts."""

    def __init__(self, peer: str, open_conn: Callable[[PeerInfo], socket.socket],
                 max_conns: int, io_timeout: float, max_frame: int) -> None:
        self.peer = peer
        self._open = open_conn
        self._max = max_conns
        self._timeout = io_timeout
        self._max_frame = max_frame
        #: descriptors per request frame (each takes at most 27 bytes of msgpack)
        self._per_request = max(1, (max_frame - 64) // 32)
        self._idle: list[Channel] = []
        self._count = 0
        self._closed = False
        self._cond = threading.Condition()
        self._jobs: queue.SimpleQueue[Part | None] = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._work, name=f"kvbm-tcp-{peer}",
                                          daemon=True) for _ in range(max_conns)]
        for t in self._threads:
            t.start()

    def submit(self, parts: list[Part]) -> None:
        with self._cond:  # under the lock: never queued behind close()'s stop marks
            if self._closed:
                raise TransportError(f"tcp link to {self.peer} is closed")
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
        """Move ``part`` in this thread (it must have been claimed by the caller)."""
        xfer = part.join.xfer
        try:
            if xfer.cancelled.is_set():
                raise TransferCancelled("cancelled before it started")
            fresh = False
            while True:
                conn, reused = self._acquire(xfer.peer, fresh)
                try:
                    self._attempt(conn, xfer, part.segs)
                    break
                except TransportError as e:
                    # An idle pooled connection may have died unseen (the peer restarted):
                    # one more try on a new one. READ and WRITE can both be repeated.
                    if not (reused and _stale(e)) or fresh or xfer.cancelled.is_set():
                        raise
                    log.debug("tcp: pooled connection to %s was dead (%s); retrying",
                              self.peer, e)
                    fresh = True
        except BaseException as exc:
            err: BaseException = exc
            if xfer.cancelled.is_set():
                err = TransferCancelled("cancelled")
            elif not isinstance(exc, TransportError):
                if isinstance(exc, Exception):
                    log.exception("tcp: transfer with %s failed", self.peer)
                err = TransportError(f"tcp transfer failed: {exc!r}")
            part.join.part_done(err)
            if not isinstance(exc, Exception):
                raise  # KeyboardInterrupt in a caller's thread stays one
        else:
            part.join.part_done(None)

    def _attempt(self, conn: Channel, xfer: Transfer, segs: list[Segment]) -> None:
        forget = xfer.on_cancel(lambda: shutdown(conn.sock))
        try:
            # a part with more descriptors than one request frame holds: several requests
            for i in range(0, len(segs), self._per_request):
                self._exchange(conn, xfer.op, segs[i:i + self._per_request])
        except BaseException:
            self._release(conn, broken=True)
            raise
        finally:
            forget()  # the connection serves other transfers next
        self._release(conn, broken=False)

    def _exchange(self, conn: Channel, op: Op, segs: list[Segment]) -> None:
        flat: list[int] = []
        nbytes = 0
        for s in segs:
            flat += (s.remote_id, s.remote_offset, s.length)
            nbytes += s.length
        pieces = [(s.local, s.local_offset, s.length) for s in segs]
        if op is Op.READ:
            conn.send_frame({"t": "r", "s": flat})
            conn.recv_payload(check_answer(recv_frame(conn.sock, self._max_frame)), pieces)
        else:
            conn.send_payload({"t": "w", "s": flat}, pieces, nbytes)
            check_answer(recv_frame(conn.sock, self._max_frame))

    def _acquire(self, peer: PeerInfo, fresh: bool) -> tuple[Channel, bool]:
        """A connection, and whether it served before (``fresh``: a new one)."""
        with self._cond:
            while True:
                if self._closed:
                    raise TransportError(f"tcp link to {self.peer} is closed")
                if self._idle and not fresh:
                    return self._idle.pop(), True  # the most recently used: likeliest alive
                if self._count < self._max:
                    self._count += 1
                    break
                if fresh and self._idle:  # make room: an idle one goes
                    self._idle.pop(0).close()
                    self._count -= 1
                    continue
                if not self._cond.wait(self._timeout):
                    raise TransportTimeoutError(f"no tcp connection to {self.peer} came free "
                                                f"within {self._timeout} s")
        try:
            return Channel(self._open(peer)), False
        except BaseException:
            with self._cond:
                self._count -= 1
                self._cond.notify()
            raise

    def _release(self, conn: Channel, *, broken: bool) -> None:
        with self._cond:
            if broken or self._closed:
                self._count -= 1
            else:
                self._idle.append(conn)
            self._cond.notify()
        if broken or self._closed:
            conn.close()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._cond.notify_all()
            for _ in self._threads:
                self._jobs.put(None)
        for c in idle:
            c.close()


def _stale(e: TransportError) -> bool:
    """Whether ``e`` says the connection was dead, rather than the peer refusing or slow."""
    return not isinstance(e, RemoteAccessError | TransportTimeoutError | ProtocolError)


def check_answer(frame: Any) -> dict[str, Any]:
    """The ``ok`` frame, or the error the peer answered instead."""
    if isinstance(frame, dict) and frame.get("t") == "error":
        msg = frame.get("error")
        msg = msg if isinstance(msg, str) else "refused"
        if frame.get("code") == "access":
            raise RemoteAccessError(f"peer refused: {msg}")
        raise TransportError(f"peer refused: {msg}")
    return expect_map(frame, "ok")


def shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)

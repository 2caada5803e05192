"""The requesting side of the ucx backend: links to one peer, and who drives them.

A link is one authenticated connection (channel ``ucx``) with a UCX worker and an endpoint
to the peer's worker for that connection. A peer gets at most ``parallel_connections``
links, opened on first use and dropped after any error but a refusal (their state is then
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
from typing import Any

from kvbm.errors import RemoteAccessError, TransportError, TransportTimeoutError
from kvbm.transports import ucx_io
from kvbm.transports.config import TransportConfig
from kvbm.transports.control import expect_map, recv_frame, send_frame, set_timeouts
from kvbm.transports.descriptors import Op, Segment
from kvbm.transports.handle import Transfer, TransferCancelled
from kvbm.transports.metadata import PeerInfo

log = logging.getLogger(__name__)

CHANNEL = "ucx"
#: Tags are ``seq << TAG_INDEX_BITS | index``; seq stays below 2**63 with the index.
_SEQ_LIMIT = 1 << (63 - ucx_io.TAG_INDEX_BITS)


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


class Part:
    """One piece of a transfer, run once by whoever claims it; the last one to end
    completes the transfer (with the first real error)."""

    __slots__ = ("_claim", "segs", "state")

    def __init__(self, state: list[Any], segs: list[Segment]) -> None:
        self.state = state  # [xfer, parts left, first error, lock], shared by the parts
        self.segs = segs
        self._claim = threading.Lock()

    def claim(self) -> bool:
        return self._claim.acquire(blocking=False)

    @property
    def xfer(self) -> Transfer:
        return self.state[0]  # type: ignore[no-any-return]

    def done(self, error: BaseException | None) -> None:
        xfer, _, _, lock = self.state
        with lock:
            first = self.state[2]
            if error is not None and (first is None or isinstance(first, TransferCancelled)):
                self.state[2] = error
            self.state[1] -= 1
            last = self.state[1] == 0
        if last:
            xfer.complete(self.state[2])


def parts_of(xfer: Transfer, cfg: TransportConfig) -> list[Part]:
    segs = (split(xfer.segments, cfg.parallel_connections)
            if xfer.nbytes >= cfg.split_threshold_bytes else [xfer.segments])
    state: list[Any] = [xfer, len(segs), None, threading.Lock()]
    return [Part(state, s) for s in segs]


class _Link:
    """One connection, worker and endpoint (see the module)."""

    def __init__(self, sock: socket.socket, w: ucx_io.Worker) -> None:
        self.sock = sock
        self.w = w
        self.seq = 0

    def next_tag(self) -> int:
        self.seq = (self.seq + 1) % _SEQ_LIMIT or 1
        return self.seq << ucx_io.TAG_INDEX_BITS

    def close(self) -> None:
        shutdown(self.sock)
        self.sock.close()
        self.w.close()


class PeerLinks:
    """The links to one peer, its background threads and its queue of parts."""

    def __init__(self, peer: str, open_sock: Callable[[PeerInfo], socket.socket],
                 context: Callable[[], Any], cfg: TransportConfig) -> None:
        self.peer = peer
        self._open_sock = open_sock
        self._context = context
        self._cfg = cfg
        self._idle: list[_Link] = []
        self._count = 0
        self._closed = False
        self._cond = threading.Condition()
        self._jobs: queue.SimpleQueue[Part | None] = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._work, name=f"kvbm-ucx-{peer}",
                                          daemon=True)
                         for _ in range(cfg.parallel_connections)]
        for t in self._threads:
            t.start()

    def submit(self, parts: list[Part]) -> None:
        with self._cond:
            if self._closed:
                raise TransportError(f"ucx link to {self.peer} is closed")
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
                log.exception("ucx: transfer with %s failed", self.peer)
                err = TransportError(f"ucx transfer failed: {exc!r}")
            part.done(err)
        else:
            part.done(None)

    def _exchange(self, link: _Link, xfer: Transfer, segs: list[Segment]) -> None:
        cfg, sock, w = self._cfg, link.sock, link.w
        tag = link.next_tag()
        flat: list[int] = []
        for s in segs:
            flat += (s.remote_id, s.remote_offset, s.length)
        bufs = [ucx_io.buffer(s.local, s.local_offset, s.length, w.cuda) for s in segs]
        if xfer.op is Op.READ:
            send_frame(sock, {"t": "r", "s": flat, "tag": tag})
            check_answer(recv_frame(sock, cfg.max_frame_bytes))
            # The server posted its sends before answering: they are waiting for these.
            reqs = [w.recv(b, tag | i) for i, b in enumerate(bufs)]
            w.drive(reqs, cfg.io_timeout_s, cancelled=xfer.cancelled.is_set, sock=sock)
        else:
            send_frame(sock, {"t": "w", "s": flat, "tag": tag})
            for i, b in enumerate(bufs):
                w.send(b, tag | i)
            # The answer says every range landed (or none was touched); the sends' own
            # completions are picked up by later progress (they only read our memory).
            w.wait_readable(sock, cfg.io_timeout_s, xfer.cancelled.is_set)
            check_answer(recv_frame(sock, cfg.max_frame_bytes))
        w.flush()

    def _acquire(self, peer: PeerInfo) -> _Link:
        with self._cond:
            while True:
                if self._closed:
                    raise TransportError(f"ucx link to {self.peer} is closed")
                if self._idle:
                    return self._idle.pop()
                if self._count < self._cfg.parallel_connections:
                    self._count += 1
                    break
                if not self._cond.wait(self._cfg.io_timeout_s):
                    raise TransportTimeoutError(f"no ucx link to {self.peer} came free "
                                                f"within {self._cfg.io_timeout_s} s")
        try:
            return self._open(peer)
        except BaseException:
            with self._cond:
                self._count -= 1
                self._cond.notify()
            raise

    def _open(self, peer: PeerInfo) -> _Link:
        cfg = self._cfg
        sock = self._open_sock(peer)
        try:
            w = ucx_io.Worker(self._context())
            try:
                # The peer may have to load UCX first (~1.5 s): the set-up is bounded by the
                # handshake's timeout when that is the longer one.
                set_timeouts(sock, max(cfg.io_timeout_s, cfg.handshake_timeout_s))
                send_frame(sock, {"t": "hello", "addr": w.address})
                w.connect(expect_map(recv_frame(sock, cfg.max_frame_bytes), "hello"
                                     ).get("addr"))
                set_timeouts(sock, cfg.io_timeout_s)
            except BaseException:
                w.close()
                raise
        except BaseException:
            sock.close()
            raise
        return _Link(sock, w)

    def _release(self, link: _Link, *, broken: bool) -> None:
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


def check_answer(frame: Any) -> None:
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

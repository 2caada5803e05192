"""The ``tcp`` backend: plain sockets, authenticated like the control channel.

Requesting side: per peer, ``parallel_connections`` worker threads, each with one data
connection (opened on first use through the peer's listener, channel ``tcp``). A transfer
of at least ``split_threshold_bytes`` is cut into that many parts of about equal bytes,
one per connection; a smaller one goes to whichever connection is free.

On a data connection, one request at a time::

    READ   -> {t: r, s: [region, offset, length, ...]}
           <- {t: ok} + the bytes        or  {t: error, code, error}
    WRITE  -> {t: w, s: [...]} + the bytes
           <- {t: ok}                    or  {t: error, code, error}

The serving side checks every range (``Agent.resolve``) before it touches memory; a refused
WRITE's payload is read and dropped, so the connection stays usable. Bytes go out of and
into registered host memory without copies (:mod:`kvbm.transports.sockio`); CUDA regions
are staged through host memory.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import threading
from typing import Any, ClassVar

from kvbm.errors import RemoteAccessError, TransportError
from kvbm.transports.backend import Backend, BackendHost
from kvbm.transports.control import (
    ProtocolError,
    expect_map,
    pack_frame,
    recv_frame,
    send_frame,
)
from kvbm.transports.descriptors import MAX_DESCRIPTORS, Op, Segment
from kvbm.transports.handle import Transfer, TransferCancelled
from kvbm.transports.sockio import Staging, drain, recv_pieces, send_pieces

log = logging.getLogger(__name__)

CHANNEL = "tcp"
_LIMIT = 1 << 63


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


class _Join:
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


_Part = tuple[_Join, list[Segment]]


class _Worker:
    """One data connection to one peer and the thread that drives it."""

    def __init__(self, backend: TcpBackend, peer: str, jobs: queue.SimpleQueue[_Part | None]
                 ) -> None:
        self._backend = backend
        self._jobs = jobs
        self._sock: socket.socket | None = None
        self._staging = Staging()
        self._thread = threading.Thread(target=self._run, name=f"kvbm-tcp-{peer}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                self._close()
                return
            join, segs = job
            try:
                self._do(join.xfer, segs)
            except BaseException as exc:
                self._close()  # the stream's state is unknown: never reuse it
                err: BaseException = exc
                if join.xfer.cancelled.is_set():
                    err = TransferCancelled("cancelled")
                elif not isinstance(exc, TransportError):
                    log.exception("tcp: transfer with %s failed", join.xfer.peer.name)
                    err = TransportError(f"tcp transfer failed: {exc!r}")
                join.part_done(err)
            else:
                join.part_done(None)

    def _do(self, xfer: Transfer, segs: list[Segment]) -> None:
        if xfer.cancelled.is_set():
            raise TransferCancelled("cancelled before it started")
        sock = self._sock
        if sock is None:
            sock = self._sock = self._backend.host.open_channel(xfer.peer, CHANNEL)
        forget = xfer.on_cancel(lambda: _shutdown(sock))
        try:
            self._exchange(sock, xfer, segs)
        finally:
            forget()  # this socket serves other transfers next

    def _exchange(self, sock: socket.socket, xfer: Transfer, segs: list[Segment]) -> None:
        flat: list[int] = []
        for s in segs:
            flat += (s.remote_id, s.remote_offset, s.length)
        pieces = [(s.local, s.local_offset, s.length) for s in segs]
        if xfer.op is Op.READ:
            send_frame(sock, {"t": "r", "s": flat})
            _check_answer(recv_frame(sock, self._backend.host.config.max_frame_bytes))
            recv_pieces(sock, pieces, self._staging)
        else:
            head = pack_frame({"t": "w", "s": flat})
            send_pieces(sock, pieces, self._staging, head)
            _check_answer(recv_frame(sock, self._backend.host.config.max_frame_bytes))

    def _close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            _shutdown(sock)
            sock.close()


def _check_answer(frame: Any) -> None:
    if isinstance(frame, dict) and frame.get("t") == "error":
        msg = frame.get("error")
        msg = msg if isinstance(msg, str) else "refused"
        if frame.get("code") == "access":
            raise RemoteAccessError(f"peer refused: {msg}")
        raise ProtocolError(f"peer refused: {msg}")
    expect_map(frame, "ok")


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def _parse_request(frame: Any) -> tuple[Op, list[tuple[int, int, int]]]:
    if not isinstance(frame, dict) or frame.get("t") not in ("r", "w"):
        raise ProtocolError("not a tcp transfer request")
    flat = frame.get("s")
    if (not isinstance(flat, list) or not flat or len(flat) % 3
            or len(flat) > 3 * MAX_DESCRIPTORS
            or not all(type(x) is int and 0 <= x < _LIMIT for x in flat)):
        raise ProtocolError("malformed ranges in a tcp transfer request")
    it = iter(flat)
    return (Op.READ if frame["t"] == "r" else Op.WRITE), list(zip(it, it, it, strict=True))


class TcpBackend(Backend):
    """See the module docstring."""

    name: ClassVar[str] = "tcp"
    rank: ClassVar[int] = 10

    @classmethod
    def probe(cls) -> str | None:
        return None

    def __init__(self, host: BackendHost) -> None:
        super().__init__(host)
        self._lock = threading.Lock()
        self._peers: dict[str, tuple[queue.SimpleQueue[_Part | None], list[_Worker]]] = {}
        self._closed = False
        host.add_channel(CHANNEL, self._serve)

    def info(self) -> dict[str, Any]:
        # Data connections go through the agent's own listener: nothing else to publish.
        return {"connections": self.host.config.parallel_connections}

    # -- requesting side -------------------------------------------------------------------------
    def submit(self, xfer: Transfer) -> None:
        cfg = self.host.config
        with self._lock:
            if self._closed:
                raise TransportError("tcp backend is closed")
            got = self._peers.get(xfer.peer.name)
            if got is None:
                jobs: queue.SimpleQueue[_Part | None] = queue.SimpleQueue()
                got = self._peers[xfer.peer.name] = (jobs, [
                    _Worker(self, xfer.peer.name, jobs)
                    for _ in range(cfg.parallel_connections)])
        jobs = got[0]
        parts = (split(xfer.segments, cfg.parallel_connections)
                 if xfer.nbytes >= cfg.split_threshold_bytes else [xfer.segments])
        join = _Join(xfer, len(parts))
        for p in parts:
            jobs.put((join, p))

    def forget_peer(self, peer: str) -> None:
        with self._lock:
            got = self._peers.pop(peer, None)
        if got is not None:
            for _ in got[1]:
                got[0].put(None)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            peers = list(self._peers)
        for p in peers:
            self.forget_peer(p)

    # -- serving side -----------------------------------------------------------------------------
    def _serve(self, sock: socket.socket, peer: str) -> None:
        host = self.host
        staging = Staging()
        while True:
            op, ranges = _parse_request(recv_frame(sock, host.config.max_frame_bytes,
                                                   idle=True))
            try:
                lease = host.resolve(peer, op, ranges)
            except RemoteAccessError as e:
                if op is Op.WRITE:
                    drain(sock, sum(n for _, _, n in ranges))
                send_frame(sock, {"t": "error", "code": "access", "error": str(e)})
                continue
            # counted when accepted: the requester may see its data before we return
            host.count_event("served_requests")
            host.count_event("served_bytes", sum(n for _, _, n in ranges))
            with lease:
                if op is Op.READ:
                    send_pieces(sock, lease.pieces, staging, pack_frame({"t": "ok"}))
                else:
                    recv_pieces(sock, lease.pieces, staging)
                    send_frame(sock, {"t": "ok"})


BACKEND = TcpBackend

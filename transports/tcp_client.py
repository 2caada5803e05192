"""The requesting side of the tcp backend: data connections to one peer, and who drives them.

A transfer that is not split (under ``split_threshold_bytes``, host memory) and finds a
pooled connection idle starts at once in the thread that submits it: handing it to a
worker thread and back costs a wake-up each way (some 30-40 us of the ~100 us that a 2 MiB
transfer used to lose against a raw socket), so a small transfer has usually ended when
``Agent.transfer`` returns. If the peer keeps that thread waiting for more than a moment
(:func:`_patience`), a worker thread takes the transfer over where it stands, on the same
connection: ``transfer`` stays asynchronous with a stalled peer.

Otherwise the transfer is cut into parts (one, or one per connection when it is large);
each part is run by whichever thread claims it first: one of the peer's worker threads, or
the caller's own thread when it waits on the handle (``Transfer.progress``).

Connections are pooled per peer (at most ``parallel_connections``), opened on first use
through the peer's listener, and closed after any error but a refusal (their stream's state
is then unknown).
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Callable, Iterator, Sequence

from kvbm.errors import RemoteAccessError, TransportError, TransportTimeoutError
from kvbm.transports import tcp_wire as wire
from kvbm.transports.control import ProtocolError, recv_exact
from kvbm.transports.descriptors import MAX_DESCRIPTORS, Op, Segment
from kvbm.transports.handle import Transfer, TransferCancelled
from kvbm.transports.links import LinkSlots, Part
from kvbm.transports.metadata import PeerInfo
from kvbm.transports.regions import DeviceKind
from kvbm.transports.sockio import Channel

_ZEROS = memoryview(bytes(wire.ALIGN))

log = logging.getLogger(__name__)

CHANNEL = "tcp"


#: What a worker thread takes from its queue: a part to claim and run, the rest of a
#: transfer started in a caller's thread, or the sign to stop.
Job = Part | Callable[[], None] | None


class PeerLink(LinkSlots[Channel, Part | Callable[[], None]]):
    """The data connections to one peer, its worker threads, and its queue of parts."""

    def __init__(self, peer: str, open_conn: Callable[[PeerInfo], socket.socket],
                 max_conns: int, io_timeout: float, max_frame: int) -> None:
        super().__init__()
        self.peer = peer
        self._open = open_conn
        self._max = max_conns
        self._timeout = io_timeout
        self._max_frame = max_frame
        #: descriptors per request (as many as the peer reads in one, at most)
        self._per_request = max(1, min(MAX_DESCRIPTORS, max_frame // wire.RANGE.size))
        self._start_workers(max_conns, f"kvbm-tcp-{peer}", self._work)

    def submit(self, xfer: Transfer, parts: list[Part]) -> None:
        """Start a one-part transfer of host memory in this thread when a pooled connection
        is idle (see :meth:`_start`); otherwise queue the parts for the worker threads,
        and let a thread that waits for the transfer run those no worker took yet."""
        segs = parts[0].segs
        if len(parts) == 1 and (segs[0].local.device is DeviceKind.CPU if len(segs) == 1 else
                                all(s.local.device is DeviceKind.CPU for s in segs)):
            with self._cond:
                conn = self._idle.pop() if self._idle and not self._closed else None
            if conn is not None:
                parts[0].claim()
                self._start(parts[0], conn)
                return

        def progress() -> None:
            for p in parts:
                if p.claim():
                    self.run(p)

        xfer.progress = progress
        self._queue(parts)

    def _queue(self, jobs: Sequence[Job]) -> None:
        with self._cond:  # under the lock: never queued behind close()'s stop marks
            if self._closed:
                raise TransportError(f"tcp link to {self.peer} is closed")
            for j in jobs:
                self._jobs.put(j)

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if not isinstance(job, Part):
                job()  # a transfer started in a caller's thread, to be finished here
            elif job.claim():
                self.run(job)

    def _start(self, part: Part, conn: Channel) -> None:
        """Run the claimed ``part`` on the idle ``conn`` in this thread for as long as the
        peer keeps up: handing a transfer to a worker thread and back costs more than a
        small one takes. Where it would wait for the peer longer than a moment (see
        :func:`_patience`), a worker thread takes over on the same connection, so that
        ``Agent.transfer`` stays asynchronous with a stalled peer."""
        xfer = part.xfer
        forget = xfer.on_cancel(lambda: shutdown(conn.sock))
        steps = self._steps(conn, xfer.op, part.segs, inline=True)
        try:
            for _ in steps:
                self._hand_over(part, conn, steps, forget)
                return
        except BaseException as exc:
            forget()
            self._release(conn, broken=not isinstance(exc, RemoteAccessError))
            if (isinstance(exc, TransportError) and _stale(exc)
                    and not xfer.cancelled.is_set()):
                # A pooled connection that died unseen (the peer restarted): a worker runs
                # the part anew, on another connection. READ and WRITE can be repeated.
                log.debug("tcp: pooled connection to %s was dead (%s); retrying", self.peer,
                          exc)
                try:
                    self._queue([lambda: self.run(part)])
                    return
                except TransportError as e:
                    exc = e
            self._fail(part, exc)
            if not isinstance(exc, Exception):
                raise
            return
        forget()
        self._release(conn, broken=False)
        part.done(None)

    def _hand_over(self, part: Part, conn: Channel, steps: Iterator[None],
                   forget: Callable[[], None]) -> None:
        def finish() -> None:
            try:
                for _ in steps:
                    pass
            except BaseException as exc:
                forget()
                self._release(conn, broken=not isinstance(exc, RemoteAccessError))
                self._fail(part, exc)
                if not isinstance(exc, Exception):
                    raise
            else:
                forget()
                self._release(conn, broken=False)
                part.done(None)

        try:
            self._queue([finish])
        except TransportError as e:  # the link closed meanwhile
            forget()
            self._release(conn, broken=True)
            self._fail(part, e)

    def _fail(self, part: Part, exc: BaseException) -> None:
        """End ``part`` with the error ``exc`` stands for (called in an except block)."""
        err: BaseException = exc
        if part.xfer.cancelled.is_set():
            err = TransferCancelled("cancelled")
        elif not isinstance(exc, TransportError):
            if isinstance(exc, Exception):
                log.exception("tcp: transfer with %s failed", self.peer)
            err = TransportError(f"tcp transfer failed: {exc!r}")
        part.done(err)

    def run(self, part: Part) -> None:
        """Move ``part`` in this thread (it must have been claimed by the caller)."""
        xfer = part.xfer
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
            self._fail(part, exc)
            if not isinstance(exc, Exception):
                raise  # KeyboardInterrupt in a caller's thread stays one
        else:
            part.done(None)

    def _attempt(self, conn: Channel, xfer: Transfer, segs: list[Segment]) -> None:
        forget = xfer.on_cancel(lambda: shutdown(conn.sock))
        try:
            for _ in self._steps(conn, xfer.op, segs, inline=False):
                pass
        except BaseException as exc:
            self._release(conn, broken=not isinstance(exc, RemoteAccessError))
            raise
        finally:
            forget()  # the connection serves other transfers next
        self._release(conn, broken=False)

    def _steps(self, conn: Channel, op: Op, segs: list[Segment], *, inline: bool
               ) -> Iterator[None]:
        """Move ``segs`` over ``conn``, in as many requests as the peer's frame limit
        needs. ``inline``: yield where the peer keeps this thread waiting for longer than
        a moment (whoever goes on iterating then waits as long as the socket allows)."""
        if len(segs) <= self._per_request:  # one request, the usual case: no outer generator
            return self._exchange(conn, op, segs, inline)
        return self._requests(conn, op, segs, inline)

    def _requests(self, conn: Channel, op: Op, segs: list[Segment], inline: bool
                  ) -> Iterator[None]:
        for i in range(0, len(segs), self._per_request):
            yield from self._exchange(conn, op, segs[i:i + self._per_request], inline)

    def _exchange(self, conn: Channel, op: Op, segs: list[Segment], inline: bool
                  ) -> Iterator[None]:
        flat: list[int] = []
        nbytes = 0
        for s in segs:
            flat += (s.remote_id, s.remote_offset, s.length)
            nbytes += s.length
        pieces = [(s.local, s.local_offset, s.length) for s in segs]
        if op is Op.READ:
            head = wire.pack_request(op, flat)
            if not inline:
                conn.send(head)
            else:
                conn.tx += len(head)
                rest = conn.send_nowait([memoryview(head)])
                if rest:
                    yield
                    conn.send_rest(rest)
                if not conn.ready(False, _patience(nbytes)):
                    yield
            conn.recv(pieces, self._check_answer(conn))
            return
        pad = conn.pad_for(wire.HEAD.size + 8 * len(flat), nbytes)
        head = wire.pack_request(op, flat, pad)
        if not inline:
            conn.send(head, pad, pieces, nbytes)
        else:
            conn.tx += len(head) + pad + nbytes
            views = [memoryview(head)] + ([_ZEROS[:pad]] if pad else []) + [
                s.local.view(s.local_offset, s.length) for s in segs]
            rest = conn.send_nowait(views)
            while rest:  # the socket's buffer is full: wait for room while the peer reads
                if not conn.ready(True, _patience(nbytes)):
                    yield
                    conn.send_rest(rest)
                    break
                rest = conn.send_nowait(rest)
            if not conn.ready(False, _patience(nbytes)):
                yield
        self._check_answer(conn)

    def _check_answer(self, conn: Channel) -> int:
        """The padding an ``ok`` answer announces, or the error the peer answered instead
        (a refusal: :class:`RemoteAccessError`; the connection stays usable)."""
        status, pad, size = wire.parse_answer(conn.recv_small(wire.ANSWER.size),
                                              self._max_frame)
        if status == wire.OK:
            return pad
        msg = recv_exact(conn.sock, size).decode("utf-8", "replace") or "refused"
        if status == wire.REFUSED:
            raise RemoteAccessError(f"peer refused: {msg}")
        raise TransportError(f"peer refused: {msg}")

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


def _patience(nbytes: int) -> float:
    """How long a caller's thread waits for the peer before a worker thread takes over:
    a moment, plus the time ``nbytes`` take at a slow 0.5 GB/s."""
    return 0.002 + nbytes / 0.5e9


def _stale(e: TransportError) -> bool:
    """Whether ``e`` says the connection was dead, rather than the peer refusing or slow."""
    return not isinstance(e, RemoteAccessError | TransportTimeoutError | ProtocolError)


def shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)

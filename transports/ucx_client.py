"""The requesting side of the ucx backend: a link is an authenticated connection (channel
``ucx``) with a UCX worker and an endpoint to the peer's worker for that connection;
:class:`UcxPool` (a :class:`kvbm.transports.links.LinkPool`) pools them per peer and decides
which thread moves a transfer: a small one starts in the caller's thread. The protocol is
in :mod:`kvbm.transports.ucx`."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Generator
from typing import Any

import numpy as np

from kvbm.errors import RemoteAccessError, TransportError
from kvbm.transports import ucx_io, ucx_rma
from kvbm.transports.config import TransportConfig
from kvbm.transports.control import (
    ProtocolError,
    expect_map,
    recv_frame,
    send_frame,
    set_timeouts,
)
from kvbm.transports.descriptors import Op, Segment
from kvbm.transports.handle import Transfer, TransferCancelled
from kvbm.transports.links import LinkPool, Part, check_answer, parts_of, shutdown
from kvbm.transports.metadata import PeerInfo
from kvbm.transports.regions import DeviceKind

log = logging.getLogger(__name__)

CHANNEL = "ucx"
#: The version of the protocol on a link (in both hellos; peers of another one are
#: refused at connect rather than misread mid-transfer).
PROTOCOL = 4
#: Tags are ``seq << TAG_INDEX_BITS | index``; seq stays below 2**63 with the index.
_SEQ_LIMIT = 1 << (63 - ucx_io.TAG_INDEX_BITS)


class UcxLink:
    """One connection, worker and endpoint."""

    def __init__(self, sock: socket.socket, w: ucx_io.Worker, context: Any = None,
                 rma: bool = False) -> None:
        self.sock = sock
        self.w = w
        #: The UCX context of the link's worker (what a peer's keys are checked against).
        self.context = context
        #: One-sided (ucx_rma, both agents): transfers between host memory go by RMA with
        #: the keys granted so far (region id -> key).
        self.rma = rma
        self.keys: dict[int, ucx_rma.Key] = {}
        #: Keys were asked for: revocations may come on the socket from now on.
        self.asked = False
        #: One-sided operations of failed transfers still under way (ucx_rma.settle).
        self.abandoned: list[int] = []
        self.seq = 0
        self.answer = np.empty(1, np.uint8)
        #: Where coalesced messages are gathered and scattered (ucx_io.Staging).
        self.staging = ucx_io.Staging()
        #: A WRITE's last coalesced sends not yet seen completed: the staging buffer is
        #: not reused before they are.
        self.staged: list[Any] = []

    def next_tag(self) -> int:
        self.seq = (self.seq + 1) % _SEQ_LIMIT or 1
        return self.seq << ucx_io.TAG_INDEX_BITS

    def drop_keys(self, rids: object) -> None:
        for rid in rids if isinstance(rids, list) else ():
            key = self.keys.pop(rid, None) if type(rid) is int else None
            if key is not None:
                ucx_rma.destroy(key)

    def close(self) -> None:
        shutdown(self.sock)
        self.sock.close()
        if self.abandoned and not ucx_rma.settle(self.w.worker, self.abandoned, 0.5):
            # Still running: their keys must outlive them (UCX would use freed keys).
            log.warning("ucx: %d abandoned one-sided operations still running at close; "
                        "their keys are left allocated", len(self.abandoned))
            self.keys.clear()
        self.drop_keys(list(self.keys))  # before the endpoint they were unpacked on
        self.w.close()


def open_link(peer: PeerInfo, open_sock: Callable[[PeerInfo], socket.socket],
              context: Callable[[bool], Any], cfg: TransportConfig) -> UcxLink:
    want_rma = (cfg.ucx_rma and peer.backends.get("ucx", {}).get("rma") is True
                and ucx_rma.available())
    sock = open_sock(peer)
    ctx = context(want_rma)
    try:
        w = ucx_io.Worker(ctx)
        try:
            # The peer may have to load UCX first (~1.5 s): the set-up is bounded by the
            # handshake's timeout when that is the longer one.
            set_timeouts(sock, max(cfg.io_timeout_s, cfg.handshake_timeout_s))
            send_frame(sock, {"t": "hello", "addr": w.address, "v": PROTOCOL,
                              "rma": want_rma})
            hello = expect_map(recv_frame(sock, cfg.max_frame_bytes), "hello")
            if hello.get("v") != PROTOCOL:
                raise TransportError(f"{peer.name} speaks ucx protocol {hello.get('v')!r}, "
                                     f"not {PROTOCOL}")
            w.connect(hello.get("addr"))
            set_timeouts(sock, cfg.io_timeout_s)
        except BaseException:
            w.close()
            raise
    except BaseException:
        sock.close()
        raise
    rma = want_rma and hello.get("rma") is True
    if want_rma:
        log.info("ucx: a link to %s, %s", peer.name,
                 "one-sided (RMA)" if rma else "two-sided (the peer grants no keys)")
    return UcxLink(sock, w, ctx, rma)


def _one_sided(link: UcxLink, xfer: Transfer, segs: list[Segment]) -> bool:
    if not link.rma:
        return False
    remote = xfer.peer.regions
    return all(s.local.device is DeviceKind.CPU and (r := remote.get(s.remote_id)) is not None
               and r.device is DeviceKind.CPU for s in segs)


def _revoked(link: UcxLink, frame: Any) -> bool:
    """Whether ``frame`` is a revocation of keys this link asked for (then applied)."""
    if link.asked and isinstance(frame, dict) and frame.get("t") == "revoke":
        link.drop_keys(frame.get("r"))
        return True
    return False


def _revocation(link: UcxLink, frame: Any) -> bool:
    """Whether ``frame``, read while waiting for a two-sided transfer, is a revocation
    (applied); else it is the peer's answer, raised as its error (a refusal:
    RemoteAccessError), or ``False`` for an ``ok``."""
    if _revoked(link, frame):
        return True
    check_answer(frame)
    return False


def _take_revocations(cfg: TransportConfig, link: UcxLink) -> None:
    """Drop the keys the peer revoked meanwhile (its frames wait on the socket)."""
    while ucx_io.readable(link.sock, 0):
        frame = recv_frame(link.sock, cfg.max_frame_bytes)
        if not _revoked(link, frame):
            raise ProtocolError(f"expected a 'revoke' frame, got {type(frame).__name__}")


def rma_exchange(cfg: TransportConfig, link: UcxLink, xfer: Transfer, segs: list[Segment],
                 until: float) -> Generator[None, None, None]:
    """Move ``segs`` one-sided (:mod:`kvbm.transports.ucx_rma`): keys for the regions not
    yet granted first (one request; a wait for the answer yields as in
    :func:`exchange_steps`), then every range checked, then the bytes."""
    _take_revocations(cfg, link)
    for _ in range(_KEY_ROUNDS):
        missing = sorted({s.remote_id for s in segs} - link.keys.keys())
        if not missing:
            break
        if not (yield from _ask_keys(cfg, link, xfer, segs, until, missing)):
            return  # the link went two-sided, and the transfer with it
        # A revocation sent right after the grant is on the socket already: applied
        # before any key is used (a key it dropped is asked for again).
        _take_revocations(cfg, link)
    ucx_rma.check(link.keys, xfer.op, segs)
    ucx_rma.move(link.w.worker, link.w.ep, link.keys, xfer.op, segs, cfg.io_timeout_s,
                 xfer.cancelled.is_set, link.abandoned)


#: Key requests one transfer makes at most (another is made only when a revocation took
#: a needed key meanwhile).
_KEY_ROUNDS = 3


def _ask_keys(cfg: TransportConfig, link: UcxLink, xfer: Transfer, segs: list[Segment],
              until: float, missing: list[int]) -> Generator[None, None, bool]:
    """Ask for the keys of ``missing`` and install them; ``False`` when the peer cannot
    grant them or they do not verify (the transfer then went two-sided)."""
    send_frame(link.sock, {"t": "k", "r": missing})
    link.asked = True
    while True:
        # The answer's wait yields as exchange_steps' do (progressing is moot here)
        yield from link.w.wait_steps(link.sock, cfg.io_timeout_s, xfer.cancelled.is_set,
                                     hold=_hold(until))
        frame = recv_frame(link.sock, cfg.max_frame_bytes)
        if _revoked(link, frame):
            continue
        if isinstance(frame, dict) and frame.get("t") == "keys":
            break
        try:
            check_answer(frame)  # a refusal: RemoteAccessError, nothing moved
        except RemoteAccessError:
            raise
        except TransportError as e:  # the peer cannot grant keys (its UCX would not)
            yield from _two_sided(cfg, link, xfer, segs, until, str(e))
            return False
        raise TransportError("ucx: the peer answered a key request with 'ok'")
    entries = ucx_rma.parse_keys(frame)
    like = ucx_rma.template(link.context)
    try:
        for *_, packed in entries:
            ucx_rma.verify(packed, like)
    except TransportError as e:
        yield from _two_sided(cfg, link, xfer, segs, until, str(e))
        return False
    for rid, addr, length, bits, packed in entries:
        old = link.keys.pop(rid, None)
        if old is not None:  # granted anew (asked again after a revocation)
            ucx_rma.destroy(old)
        link.keys[rid] = ucx_rma.Key(addr, length, bits,
                                     ucx_rma.unpack(link.w.ep, packed, like))
    return True


def _two_sided(cfg: TransportConfig, link: UcxLink, xfer: Transfer, segs: list[Segment],
               until: float, why: str) -> Generator[None, None, None]:
    """Keys that cannot be had or read safely: the link goes on two-sided (the serving
    side checks each transfer), this transfer included."""
    log.warning("ucx: %s; transfers with %s go two-sided", why, xfer.peer.name)
    link.rma = False
    link.drop_keys(list(link.keys))
    yield from exchange_steps(cfg, link, xfer, segs, until)


def exchange(cfg: TransportConfig, link: UcxLink, xfer: Transfer, segs: list[Segment]
             ) -> None:
    ucx_io.finish(exchange_steps(cfg, link, xfer, segs, 0.0))


def merge(segs: list[Segment]) -> list[Segment]:
    """``segs`` with neighbours that are contiguous on both sides made one (no copy)."""
    out = [segs[0]]
    for s in segs[1:]:
        p = out[-1]
        if (s.local is p.local and s.remote_id == p.remote_id
                and s.local_offset == p.local_offset + p.length
                and s.remote_offset == p.remote_offset + p.length):
            out[-1] = p._replace(length=p.length + s.length)
        else:
            out.append(s)
    return out


def exchange_steps(cfg: TransportConfig, link: UcxLink, xfer: Transfer, segs: list[Segment],
                   until: float) -> Generator[None, None, None]:
    """Move ``segs`` over ``link``; waits for the peer sleep in this thread until the
    monotonic time ``until`` (0: for good), then the generator yields (see UcxPool)."""
    segs = merge(segs)
    if _one_sided(link, xfer, segs):
        yield from rma_exchange(cfg, link, xfer, segs, until)
        return
    if link.asked:  # a two-sided transfer on a link with keys: revocations first
        _take_revocations(cfg, link)
    sock, w = link.sock, link.w
    tag = link.next_tag()
    flat: list[int] = []
    for s in segs:
        flat += (s.remote_id, s.remote_offset, s.length)
    remote = xfer.peer.regions
    counts = ucx_io.group([s.length for s in segs], [
        s.local.device is DeviceKind.CPU and (r := remote.get(s.remote_id)) is not None
        and r.device is DeviceKind.CPU for s in segs])
    msgs = ucx_io.messages(counts, [s.length for s in segs])
    bufs = [ucx_io.buffer(s.local, s.local_offset, s.length, w.cuda) for s in segs]
    request: dict[str, Any] = {"t": "r" if xfer.op is Op.READ else "w", "s": flat, "tag": tag}
    if len(msgs) < len(segs):
        request["g"] = counts
    timeout, cancelled = cfg.io_timeout_s, xfer.cancelled.is_set
    if link.staged:  # the last WRITE's coalesced sends: done with the buffer before reuse
        yield from w.drive_steps(link.staged, timeout, cancelled=cancelled, sock=sock,
                                 hold=_hold(until))
        link.staged = []
    if xfer.op is Op.READ:
        send_frame(sock, request)
        # No answer on success: the server sends ranges only after it checked them all, so
        # the first one's arrival is the yes (one hop less than an "ok" on the socket);
        # a refusal comes on the socket instead. The receives are posted only then: none
        # is ever left posted for a message that will not come.
        while not (yield from w.wait_steps(sock, timeout, cancelled, tag=tag,
                                           hold=_hold(until))):
            if _revocation(link, recv_frame(sock, cfg.max_frame_bytes)):
                continue
            raise TransportError("ucx: the peer answered a READ it then did not send")
        for first, end in ucx_io.windows(msgs):
            reqs, staged = [], []
            stage, o = link.staging.get(ucx_io.staged_bytes(msgs, first, end)), 0
            for m in range(first, end):
                lo, hi, n = msgs[m]
                if hi - lo == 1:
                    reqs.append(w.recv(bufs[lo], tag | m))
                    continue
                dst = stage[o:o + n]
                staged.append((len(reqs), dst, bufs[lo:hi]))
                reqs.append(w.recv(dst, tag | m))
                o += n
            yield from ucx_io.drive_staged(w, reqs, staged, timeout, lambda: _hold(until),
                                           cancelled=cancelled, sock=sock)
    else:
        send_frame(sock, request)
        wins = ucx_io.windows(msgs)
        for k, (first, end) in enumerate(wins):
            reqs = []
            stage, o = link.staging.get(ucx_io.staged_bytes(msgs, first, end)), 0
            for m in range(first, end):
                lo, hi, n = msgs[m]
                if hi - lo == 1:
                    w.send(bufs[lo], tag | m)
                    continue
                src = stage[o:o + n]
                ucx_io.gather(bufs[lo:hi], src)
                reqs.append(w.send(src, tag | m))
                o += n
            if k + 1 < len(wins):  # the buffer is reused for the next window
                yield from w.drive_steps(reqs, timeout, cancelled=cancelled, sock=sock,
                                         hold=_hold(until))
            else:
                link.staged = reqs
        # The answer, a message of ours tagged ANSWER, says every range landed; it comes
        # on the heels of UCX's own acknowledgements, so one wake-up sees both. A refusal
        # (nothing was touched) comes on the socket. The sends' own completions are picked
        # up by later progress (they only read our memory).
        while not (yield from w.wait_steps(sock, timeout, cancelled,
                                           tag=tag | ucx_io.ANSWER, hold=_hold(until))):
            if _revocation(link, recv_frame(sock, cfg.max_frame_bytes)):
                continue
            raise TransportError("ucx: the peer answered a WRITE on the socket")
        yield from w.drive_steps([w.recv(link.answer, tag | ucx_io.ANSWER)], timeout,
                                 sock=sock, hold=_hold(until))
    w.flush()
    if link.staged and all(r.completed for r in link.staged):
        link.staged = []


def _hold(until: float) -> float:
    """How long a wait may sleep before it yields: none of it once ``until`` passed (the
    first wait then yields at once), no limit (0) outside the caller's thread."""
    return max(until - time.monotonic(), 1e-6) if until else 0.0


def patience(nbytes: int) -> float:
    """How long a caller's thread waits for the peer before a thread of its own takes
    over: a moment, plus the time ``nbytes`` take at a slow 0.5 GB/s."""
    return 0.002 + nbytes / 0.5e9


class UcxPool(LinkPool[UcxLink]):
    """A :class:`LinkPool` whose transfers of one part start in the caller's thread when a
    link is idle: handing each small transfer to a background thread (a wake-up, and the
    GIL going back and forth) cost the requester more CPU than the transfer itself
    (~40 % of it for 32 KiB). Where the peer keeps the caller waiting longer than
    :func:`patience`, a thread of its own finishes the transfer on the same link, so
    ``Agent.transfer`` stays asynchronous with a stalled peer."""

    def submit(self, xfer: Transfer) -> None:
        if xfer.nbytes < self._cfg.split_threshold_bytes:  # one part (parts_of)
            with self._cond:
                link = self._idle.pop() if self._idle and not self._closed else None
            if link is not None:
                self._start(xfer, link)
                return
        super().submit(xfer)

    def _start(self, xfer: Transfer, link: UcxLink) -> None:
        (part,) = parts_of(xfer, self._cfg)
        part.claim()
        forget = xfer.on_cancel(lambda: shutdown(link.sock))
        steps = exchange_steps(self._cfg, link, xfer, part.segs,
                               time.monotonic() + patience(xfer.nbytes))
        try:
            for _ in steps:  # the peer is slow: the rest goes on elsewhere
                threading.Thread(target=self._finish, args=(part, link, steps, forget),
                                 name=f"kvbm-ucx-{self.peer}", daemon=True).start()
                return
        except BaseException as exc:
            self._end(part, link, forget, exc)
            if not isinstance(exc, Exception):
                raise
            return
        self._end(part, link, forget, None)

    def _finish(self, part: Part, link: UcxLink, steps: Generator[None, None, None],
                forget: Callable[[], None]) -> None:
        try:
            ucx_io.finish(steps)
        except BaseException as exc:
            self._end(part, link, forget, exc)
            return
        self._end(part, link, forget, None)

    def _end(self, part: Part, link: UcxLink, forget: Callable[[], None],
             exc: BaseException | None) -> None:
        """As :meth:`LinkPool.run` ends a part: the link back (or dropped), the part done."""
        forget()
        self._release(link, broken=exc is not None and not isinstance(exc, RemoteAccessError))
        err: BaseException | None = exc
        if exc is not None:
            if part.xfer.cancelled.is_set():
                err = TransferCancelled("cancelled")
            elif not isinstance(exc, TransportError):
                log.error("ucx: transfer with %s failed: %r", self.peer, exc)
                err = TransportError(f"ucx transfer failed: {exc!r}")
        part.done(err)


def pool(peer: str, open_sock: Callable[[PeerInfo], socket.socket],
         context: Callable[[bool], Any], cfg: TransportConfig) -> LinkPool[UcxLink]:
    return UcxPool("ucx", peer, lambda p: open_link(p, open_sock, context, cfg),
                   lambda link, x, s: exchange(cfg, link, x, s), cfg)

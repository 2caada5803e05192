"""The requesting side of the ucx backend: a link is an authenticated connection (channel
``ucx``) with a UCX worker and an endpoint to the peer's worker for that connection;
:class:`kvbm.transports.links.LinkPool` pools them per peer and decides which thread moves
a transfer. The protocol is in :mod:`kvbm.transports.ucx`."""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import numpy as np

from kvbm.errors import TransportError
from kvbm.transports import ucx_io
from kvbm.transports.config import TransportConfig
from kvbm.transports.control import expect_map, recv_frame, send_frame, set_timeouts
from kvbm.transports.descriptors import Op, Segment
from kvbm.transports.handle import Transfer
from kvbm.transports.links import LinkPool, check_answer, shutdown
from kvbm.transports.metadata import PeerInfo

CHANNEL = "ucx"
#: The version of the protocol on a link (in both hellos; peers of another one are
#: refused at connect rather than misread mid-transfer).
PROTOCOL = 2
#: Tags are ``seq << TAG_INDEX_BITS | index``; seq stays below 2**63 with the index.
_SEQ_LIMIT = 1 << (63 - ucx_io.TAG_INDEX_BITS)


class UcxLink:
    """One connection, worker and endpoint."""

    def __init__(self, sock: socket.socket, w: ucx_io.Worker) -> None:
        self.sock = sock
        self.w = w
        self.seq = 0
        self.answer = np.empty(1, np.uint8)

    def next_tag(self) -> int:
        self.seq = (self.seq + 1) % _SEQ_LIMIT or 1
        return self.seq << ucx_io.TAG_INDEX_BITS

    def close(self) -> None:
        shutdown(self.sock)
        self.sock.close()
        self.w.close()


def open_link(peer: PeerInfo, open_sock: Callable[[PeerInfo], socket.socket],
              context: Any, cfg: TransportConfig) -> UcxLink:
    sock = open_sock(peer)
    try:
        w = ucx_io.Worker(context)
        try:
            # The peer may have to load UCX first (~1.5 s): the set-up is bounded by the
            # handshake's timeout when that is the longer one.
            set_timeouts(sock, max(cfg.io_timeout_s, cfg.handshake_timeout_s))
            send_frame(sock, {"t": "hello", "addr": w.address, "v": PROTOCOL})
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
    return UcxLink(sock, w)


def exchange(cfg: TransportConfig, link: UcxLink, xfer: Transfer, segs: list[Segment]
             ) -> None:
    sock, w = link.sock, link.w
    tag = link.next_tag()
    flat: list[int] = []
    for s in segs:
        flat += (s.remote_id, s.remote_offset, s.length)
    bufs = [ucx_io.buffer(s.local, s.local_offset, s.length, w.cuda) for s in segs]
    if xfer.op is Op.READ:
        send_frame(sock, {"t": "r", "s": flat, "tag": tag})
        # No answer on success: the server sends ranges only after it checked them all, so
        # the first one's arrival is the yes (one hop less than an "ok" on the socket);
        # a refusal comes on the socket instead. The receives are posted only then: none
        # is ever left posted for a message that will not come.
        if not w.wait_readable(sock, cfg.io_timeout_s, xfer.cancelled.is_set, tag=tag):
            check_answer(recv_frame(sock, cfg.max_frame_bytes))
            raise TransportError("ucx: the peer answered a READ it then did not send")
        reqs = [w.recv(b, tag | i) for i, b in enumerate(bufs)]
        w.drive(reqs, cfg.io_timeout_s, cancelled=xfer.cancelled.is_set, sock=sock)
    else:
        send_frame(sock, {"t": "w", "s": flat, "tag": tag})
        for i, b in enumerate(bufs):
            w.send(b, tag | i)
        # The answer, a message of ours tagged ANSWER, says every range landed; it comes
        # on the heels of UCX's own acknowledgements, so one wake-up sees both. A refusal
        # (nothing was touched) comes on the socket. The sends' own completions are picked
        # up by later progress (they only read our memory).
        if not w.wait_readable(sock, cfg.io_timeout_s, xfer.cancelled.is_set,
                               tag=tag | ucx_io.ANSWER):
            check_answer(recv_frame(sock, cfg.max_frame_bytes))
            raise TransportError("ucx: the peer answered a WRITE on the socket")
        w.drive([w.recv(link.answer, tag | ucx_io.ANSWER)], cfg.io_timeout_s, sock=sock)
    w.flush()


def pool(peer: str, open_sock: Callable[[PeerInfo], socket.socket],
         context: Callable[[], Any], cfg: TransportConfig) -> LinkPool[UcxLink]:
    return LinkPool("ucx", peer, lambda p: open_link(p, open_sock, context(), cfg),
                    lambda link, x, s: exchange(cfg, link, x, s), cfg)

"""The ``tcp`` backend: plain sockets, authenticated like the control channel.

Requesting side: per peer, ``parallel_connections`` worker threads, each with one data
connection (opened on first use through the peer's listener, channel ``tcp``). A transfer
of at least ``split_threshold_bytes`` is cut into that many parts of about equal bytes,
one per connection; a smaller one goes to whichever connection is free.

On a data connection, one request at a time, in fixed binary headers
(:mod:`kvbm.transports.tcp_wire`)::

    READ   -> r + ranges
           <- ok + the bytes           or  refused / error + message
    WRITE  -> w + ranges + the bytes
           <- ok                       or  refused / error + message

The serving side checks every range (``Agent.resolve``) before it touches memory; a refused
WRITE's payload is read and dropped, so the connection stays usable. Bytes go out of and
into registered host memory without copies (:mod:`kvbm.transports.sockio`); CUDA regions
are staged through host memory.
"""

from __future__ import annotations

import logging
import socket
from typing import Any, ClassVar

from kvbm.errors import RemoteAccessError, TransportError
from kvbm.transports import tcp_wire as wire
from kvbm.transports.backend import BackendHost, LinkedBackend
from kvbm.transports.control import recv_exact, recv_idle
from kvbm.transports.descriptors import Op
from kvbm.transports.handle import Transfer
from kvbm.transports.links import parts_of
from kvbm.transports.sockio import Channel, drain
from kvbm.transports.tcp_client import CHANNEL, PeerLink

log = logging.getLogger(__name__)


class TcpBackend(LinkedBackend[PeerLink]):
    """See the module docstring."""

    name: ClassVar[str] = "tcp"
    rank: ClassVar[int] = 10

    @classmethod
    def probe(cls) -> str | None:
        return None

    def __init__(self, host: BackendHost) -> None:
        super().__init__(host)
        host.add_channel(CHANNEL, self._serve)

    def info(self) -> dict[str, Any]:
        # Data connections go through the agent's own listener: nothing else to publish.
        return {"connections": self.host.config.parallel_connections}

    # -- requesting side ----------------------------------------------------------------------
    def submit(self, xfer: Transfer) -> None:
        cfg = self.host.config
        with self._lock:
            if self._closed:
                raise TransportError("tcp backend is closed")
            link = self._links.get(xfer.peer.name)
            if link is None:
                link = self._links[xfer.peer.name] = PeerLink(
                    xfer.peer.name, lambda p: self.host.open_channel(p, CHANNEL),
                    cfg.parallel_connections, cfg.io_timeout_s, cfg.max_frame_bytes)
        link.submit(xfer, parts_of(xfer, cfg))

    # -- serving side -----------------------------------------------------------------------------
    def _serve(self, sock: socket.socket, peer: str) -> None:
        host = self.host
        resolve, count_event = host.resolve, host.count_event  # bound once, not per request
        max_bytes = host.config.max_frame_bytes
        chan = Channel(sock)
        first = bytearray(wire.FIRST)
        view = memoryview(first)
        after_head = view[wire.HEAD.size:]
        while True:
            recv_idle(sock, view)
            op, pad, count = wire.parse_head(first, max_bytes)
            data: bytes | bytearray | memoryview = after_head
            if count > 1:
                data = first[wire.HEAD.size:] + recv_exact(sock, (count - 1) * wire.RANGE.size)
            ranges = wire.parse_ranges(data, count)
            try:
                lease = resolve(peer, op, ranges)
            except RemoteAccessError as e:
                if op is Op.WRITE:  # its payload follows: read and drop it, stay in step
                    drain(sock, pad + sum(n for _, _, n in ranges))
                chan.send(wire.pack_error(wire.REFUSED, str(e)))
                continue
            total = ranges[0][2] if count == 1 else sum(n for _, _, n in ranges)
            # counted when accepted: the requester may see its data before we return
            count_event("served_requests")
            count_event("served_bytes", total)
            try:
                if op is Op.READ:
                    out_pad = chan.pad_for(wire.ANSWER.size, total)
                    chan.send(wire.ANSWER.pack(wire.OK, 0, out_pad, 0), out_pad,
                              lease.pieces, total)
                else:
                    chan.recv(lease.pieces, pad)
                    chan.send(wire.ANSWER_OK)
            finally:
                lease.release()


BACKEND = TcpBackend

"""The requesting side of the control channel: one authenticated connection to a peer.

A :class:`ControlLink` asks a peer for its metadata and delivers notifications, one request
and one answer at a time. A broken connection is reopened once on the next call (the peer
may have restarted); after that the call fails with a :class:`TransportError`.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from typing import Any

from kvbm.errors import TransportError
from kvbm.transports.config import TransportConfig
from kvbm.transports.control import (
    ProtocolError,
    client_handshake,
    expect_map,
    recv_frame,
    send_frame,
    set_timeouts,
)
from kvbm.transports.metadata import PeerInfo, parse

CONTROL = "control"


def open_connection(host: str, port: int, *, secret: bytes, name: str, chan: str,
                    config: TransportConfig, expect: str | None = None
                    ) -> tuple[socket.socket, str]:
    """Connect to an agent's listener and authenticate for ``chan``: ``(socket, its name)``.
    The socket has ``io_timeout_s`` set and Nagle off."""
    try:
        sock = socket.create_connection((host, port), timeout=config.connect_timeout_s)
    except OSError as e:
        raise TransportError(f"cannot connect to {host}:{port}: {e}") from None
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        set_timeouts(sock, config.handshake_timeout_s)
        server = client_handshake(sock, secret, name, chan, expect)
        set_timeouts(sock, config.io_timeout_s)
    except BaseException:
        sock.close()
        raise
    return sock, server


class ControlLink:
    """The control connection of this agent to one peer (see the module)."""

    def __init__(self, host: str, port: int, *, secret: bytes, name: str,
                 config: TransportConfig, expect: str | None = None) -> None:
        self.host = host
        self.port = port
        self._secret = secret
        self._name = name
        self._cfg = config
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._closed = False
        self.peer_name = expect
        with self._lock:
            self._connect()

    def _connect(self) -> socket.socket:
        sock, server = open_connection(self.host, self.port, secret=self._secret,
                                       name=self._name, chan=CONTROL, config=self._cfg,
                                       expect=self.peer_name)
        self.peer_name = server  # later reconnects must reach the same agent
        self._sock = sock
        return sock

    def call(self, frame: dict[str, Any], answer: str, *, retry: bool = True
             ) -> dict[str, Any]:
        """Send ``frame``, return the answer of type ``answer``. With ``retry``, a broken
        connection is reopened and the call repeated once (for idempotent requests)."""
        with self._lock:
            if self._closed:
                raise TransportError(f"control link to {self.peer_name} is closed")
            for attempt in (0, 1):
                sock = self._sock
                try:
                    if sock is None:
                        sock = self._connect()
                    send_frame(sock, frame)
                    return expect_map(recv_frame(sock, self._cfg.max_frame_bytes), answer)
                except ProtocolError:
                    self._drop()
                    raise
                except TransportError:
                    self._drop()
                    if attempt or sock is None or not retry:
                        raise
            raise AssertionError("unreachable")

    def metadata(self) -> PeerInfo:
        info = parse(self.call({"t": "meta"}, "meta").get("meta"))
        if info.name != self.peer_name:
            raise ProtocolError(f"peer {self.peer_name!r} sent the metadata of {info.name!r}")
        return info

    def notify(self, msg: bytes) -> None:
        # not repeated: the first one may have arrived, its answer lost
        self.call({"t": "notify", "msg": msg}, "ok", retry=False)

    def _drop(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None

    def close(self) -> None:
        self._closed = True
        sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        with self._lock:
            self._drop()

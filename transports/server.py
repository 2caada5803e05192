"""An agent's listener: accepts connections, authenticates them, hands each to its channel.

One port serves every channel (``control`` for the agent, ``tcp`` for the tcp backend's data
connections, whatever else a backend adds). Each connection gets a thread of its own; at
most ``max_connections`` live at once (more are closed on accept), a handshake must finish
within ``handshake_timeout_s`` (a timer shuts the socket down otherwise), and anything
that goes wrong with one connection closes that connection only: the listener goes on
serving the others.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from kvbm.errors import AuthenticationError, TransportError
from kvbm.transports.config import TransportConfig
from kvbm.transports.control import (
    PeerClosed,
    ProtocolError,
    recv_frame,
    send_frame,
    server_handshake,
    set_timeouts,
)

log = logging.getLogger(__name__)

Handler = Callable[[socket.socket, str], None]


class RateLimitedLog:
    """Warn at most once per ``interval`` s per key, counting what was held back."""

    def __init__(self, interval: float = 5.0) -> None:
        self.interval = interval
        self._last: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()

    def warning(self, key: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        with self._lock:
            last, held = self._last.get(key, (-1e9, 0))
            if now - last < self.interval:
                self._last[key] = (last, held + 1)
                return
            self._last[key] = (now, 0)
        if held:
            log.warning(msg + " (%d similar ones held back)", *args, held)
        else:
            log.warning(msg, *args)


class Listener:
    """The accepting side of an agent (see the module)."""

    def __init__(self, name: str, secret: bytes, config: TransportConfig,
                 on_event: Callable[[str], None]) -> None:
        self.name = name
        self._secret = secret
        self._cfg = config
        self._on_event = on_event  # a counter name of AgentStats
        self._handlers: dict[str, Handler] = {}
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._rlog = RateLimitedLog()
        family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._sock.bind((config.host, config.port))
            self._sock.listen(128)
        except OSError as e:
            self._sock.close()
            raise TransportError(f"cannot listen on {config.host}:{config.port}: {e}") from None
        self.port: int = self._sock.getsockname()[1]
        self._thread = threading.Thread(target=self._accept_loop, name=f"kvbm-listen-{name}",
                                        daemon=True)

    def add_channel(self, chan: str, handler: Handler) -> None:
        self._handlers[chan] = handler

    def start(self) -> None:
        self._thread.start()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, addr = self._sock.accept()
            except OSError:
                if self._closed:
                    return
                time.sleep(0.01)  # EMFILE and the like: do not spin
                continue
            with self._lock:
                full = len(self._conns) >= self._cfg.max_connections or self._closed
                if not full:
                    self._conns.add(conn)
            if full:
                self._on_event("refused_connections")
                self._rlog.warning("full", "agent %s: %d connections already, closing one "
                                   "from %s", self.name, self._cfg.max_connections, addr)
                conn.close()
                continue
            threading.Thread(target=self._serve, args=(conn, addr),
                             name=f"kvbm-conn-{self.name}", daemon=True).start()

    def _serve(self, conn: socket.socket, addr: object) -> None:
        timer = threading.Timer(self._cfg.handshake_timeout_s, _shutdown, (conn,))
        try:
            set_timeouts(conn, self._cfg.handshake_timeout_s)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            timer.start()
            try:
                peer, chan = server_handshake(conn, self._secret, self.name,
                                              frozenset(self._handlers))
            finally:
                timer.cancel()
            set_timeouts(conn, self._cfg.io_timeout_s)
            self._handlers[chan](conn, peer)
        except PeerClosed:
            pass  # the normal end of a connection
        except AuthenticationError as e:
            self._on_event("auth_failures")
            self._rlog.warning("auth", "agent %s: connection from %s: %s", self.name, addr, e)
        except TransportError as e:
            self._on_event("bad_connections")
            self._rlog.warning("bad", "agent %s: dropped a connection from %s: %s", self.name,
                               addr, e)
        except OSError as e:  # a socket error outside the framed reads (reset at setup)
            log.debug("agent %s: connection from %s: %s", self.name, addr, e)
        except Exception:  # a handler bug must not kill the listener, only its connection
            log.exception("agent %s: handler failed on a connection from %s", self.name, addr)
        finally:
            with self._lock:
                self._conns.discard(conn)
            _shutdown(conn)
            conn.close()

    def close(self) -> None:
        """Stop accepting and shut every live connection down (their threads then end)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            conns = list(self._conns)
        _shutdown(self._sock)
        self._sock.close()
        for c in conns:
            _shutdown(c)
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)


def serve_control(sock: socket.socket, peer: str, max_frame: int,
                  metadata_for: Callable[[str], dict[str, Any]],
                  deliver: Callable[[bytes], None]) -> None:
    """Answer one peer's control requests until it goes: ``meta`` (the metadata it may
    see), ``notify`` (a notification, delivered before the answer), ``ping``. Anything
    else closes the connection."""
    while True:
        frame = recv_frame(sock, max_frame, idle=True)
        t = frame.get("t") if isinstance(frame, dict) else None
        if t == "meta":
            send_frame(sock, {"t": "meta", "meta": metadata_for(peer)})
        elif t == "notify" and isinstance(frame.get("msg"), bytes):
            deliver(frame["msg"])
            send_frame(sock, {"t": "ok"})
        elif t == "ping":
            send_frame(sock, {"t": "pong"})
        else:
            send_frame(sock, {"t": "error", "error": "unknown request"})
            raise ProtocolError(f"{peer} sent an unknown control request")


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)

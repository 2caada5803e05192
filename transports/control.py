"""The control channel's wire: length-prefixed msgpack frames and the mutual handshake.

A frame is a 4-byte big-endian length and that many bytes of msgpack (never pickle). A
length above the limit closes the connection before a byte of the body is read: 4 KiB until
the peer has authenticated, ``transport.max_frame_bytes`` afterwards.

The handshake proves to each end that the other holds the shared secret, without sending
it, over fresh nonces from both ends (no replay), with a label per direction (no
reflection) and both names and the channel under the MAC::

    client -> server  {t: hello, v, name, chan, nonce: 32 random bytes}
    server -> client  {t: challenge, v, name, nonce, mac: HMAC(secret, server-label, ...)}
    client -> server  {t: proof, mac: HMAC(secret, client-label, ...)}
    server -> client  {t: welcome}  or  {t: error, error: "authentication failed"}; close

Both MACs are compared with :func:`hmac.compare_digest`. The handshake authenticates the
ends; it does not encrypt or sign the bytes that follow (run on a trusted network, or
under a VPN / TLS tunnel across untrusted ones).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import socket
import struct
from typing import Any, cast

import msgpack

from kvbm.errors import AuthenticationError, TransportError, TransportTimeoutError
from kvbm.transports.regions import check_name

PROTOCOL_VERSION = 1
#: Largest frame accepted before the peer has authenticated.
PREAUTH_MAX_FRAME = 4096
NONCE_BYTES = 32
_LEN = struct.Struct(">I")
_SERVER_LABEL = b"kvbm-transport-v1/server"
_CLIENT_LABEL = b"kvbm-transport-v1/client"


class ProtocolError(TransportError):
    """The peer sent something the protocol does not allow (kept internal: callers see a
    :class:`TransportError`)."""


class PeerClosed(TransportError):
    """The peer closed the connection between two frames (the normal end of one)."""


def encode(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


def set_timeouts(sock: socket.socket, seconds: float) -> None:
    """Bound every send and receive on ``sock`` by ``seconds`` without progress.

    The kernel enforces it (``SO_RCVTIMEO``/``SO_SNDTIMEO`` on a blocking socket): a
    Python-level timeout would poll before every call, which doubles the cost of a small
    request on a busy machine. A call that times out raises ``BlockingIOError``."""
    sock.settimeout(None)
    tv = struct.pack("ll", int(seconds), int((seconds % 1) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


#: What a timed-out socket call raises (see :func:`set_timeouts`).
TIMED_OUT = (TimeoutError, BlockingIOError)


def pack_frame(obj: Any) -> bytes:
    """One frame's bytes: length prefix and msgpack body."""
    body = encode(obj)
    return _LEN.pack(len(body)) + body


def send_frame(sock: socket.socket, obj: Any) -> None:
    """Send one frame (the caller serialises writers of one socket)."""
    try:
        sock.sendall(pack_frame(obj))
    except TIMED_OUT:
        raise TransportTimeoutError("peer stopped reading (send timed out)") from None
    except OSError as e:
        raise TransportError(f"connection lost while sending: {e}") from None


def recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    recv_into_exact(sock, memoryview(buf))
    return buf


def recv_into_exact(sock: socket.socket, view: memoryview) -> None:
    """Fill ``view`` from ``sock`` (zero-copy). EOF or an error: :class:`TransportError`;
    no progress within the socket's timeout: :class:`TransportTimeoutError`."""
    got, n = 0, view.nbytes
    try:
        while got < n:
            # MSG_WAITALL: one system call for the whole range in the usual case
            k = sock.recv_into(view[got:], 0, socket.MSG_WAITALL)
            if k == 0:
                raise TransportError(f"peer closed the connection ({got} of {n} bytes "
                                     f"received)")
            got += k
    except TIMED_OUT:
        raise TransportTimeoutError(f"peer sent nothing for too long ({got} of {n} bytes "
                                    f"received)") from None
    except TransportError:
        raise
    except OSError as e:
        raise TransportError(f"connection lost while receiving: {e}") from None


def recv_idle(sock: socket.socket, view: memoryview) -> None:
    """Fill ``view`` (a header) on a connection between requests: wait for its first byte as
    long as it takes (closing the connection ends the wait: :class:`PeerClosed`), the rest
    within the socket's timeout."""
    while True:
        try:
            k = sock.recv_into(view, 0, socket.MSG_WAITALL)
            break
        except TIMED_OUT:
            continue
        except OSError as e:
            raise TransportError(f"connection lost: {e}") from None
    if not k:
        raise PeerClosed("peer closed the connection")
    if k < view.nbytes:
        recv_into_exact(sock, view[k:])


def recv_frame(sock: socket.socket, max_bytes: int, *, idle: bool = False) -> Any:
    """Receive one frame of at most ``max_bytes``. With ``idle``, wait for the frame's first
    byte as long as it takes (a connection between requests; closing it ends the wait);
    the rest must come within the socket's timeout."""
    head = bytearray(_LEN.size)
    view = memoryview(head)
    if idle:
        recv_idle(sock, view)
    else:
        recv_into_exact(sock, view)
    (n,) = _LEN.unpack(head)
    if n > max_bytes:
        raise ProtocolError(f"frame of {n} bytes announced, at most {max_bytes} allowed")
    body = recv_exact(sock, n)
    try:
        return msgpack.unpackb(body, raw=False, strict_map_key=True,
                               max_bin_len=max_bytes, max_str_len=max_bytes)
    except Exception as e:  # msgpack raises a zoo of ValueError/TypeError/ExtraData ...
        raise ProtocolError(f"malformed frame: {type(e).__name__}") from None


def expect_map(frame: Any, t: str) -> dict[str, Any]:
    """``frame`` as a dict of type ``t``; an ``error`` frame becomes the matching error."""
    if not isinstance(frame, dict):
        raise ProtocolError(f"expected a map frame, got {type(frame).__name__}")
    got = frame.get("t")
    if got == "error" and t != "error":
        msg = frame.get("error")
        raise ProtocolError(f"peer refused: {msg if isinstance(msg, str) else '?'}")
    if got != t:
        raise ProtocolError(f"expected a {t!r} frame, got {got!r}")
    return frame


def _mac(secret: bytes, label: bytes, *parts: Any) -> bytes:
    return hmac.new(secret, label + encode(list(parts)), hashlib.sha256).digest()


def _field(frame: dict[str, Any], key: str, kind: type, size: int | None = None) -> Any:
    value: Any = frame.get(key)
    if not isinstance(value, kind) or (size is not None and len(cast(bytes, value)) != size):
        raise ProtocolError(f"handshake field {key!r} missing or malformed")
    return value


def client_handshake(sock: socket.socket, secret: bytes, name: str, chan: str,
                     expect: str | None = None) -> str:
    """Authenticate both ends from the connecting side; the server's name."""
    cnonce = secrets.token_bytes(NONCE_BYTES)
    send_frame(sock, {"t": "hello", "v": PROTOCOL_VERSION, "name": name, "chan": chan,
                      "nonce": cnonce})
    try:
        ch = expect_map(recv_frame(sock, PREAUTH_MAX_FRAME), "challenge")
    except ProtocolError as e:
        raise AuthenticationError(f"handshake refused: {e}") from None
    if ch.get("v") != PROTOCOL_VERSION:
        raise AuthenticationError(f"peer speaks protocol {ch.get('v')!r}, this agent "
                                  f"{PROTOCOL_VERSION}")
    server: str = _field(ch, "name", str)
    snonce = _field(ch, "nonce", bytes, NONCE_BYTES)
    want = _mac(secret, _SERVER_LABEL, cnonce, snonce, server, name, chan)
    if not hmac.compare_digest(want, _field(ch, "mac", bytes, len(want))):
        raise AuthenticationError("the peer does not hold the shared secret (its proof is "
                                  "wrong): check transport.secret on both ends")
    if expect is not None and server != expect:
        raise AuthenticationError(f"connected to agent {server!r}, expected {expect!r}")
    send_frame(sock, {"t": "proof",
                      "mac": _mac(secret, _CLIENT_LABEL, snonce, cnonce, name, server, chan)})
    try:
        expect_map(recv_frame(sock, PREAUTH_MAX_FRAME), "welcome")
    except ProtocolError as e:
        raise AuthenticationError(f"the peer refused this agent's proof ({e}): check "
                                  f"transport.secret on both ends") from None
    return server


def server_handshake(sock: socket.socket, secret: bytes, name: str,
                     channels: frozenset[str]) -> tuple[str, str]:
    """Authenticate both ends on the accepting side; ``(peer name, channel)``. Any failure
    raises (a :class:`TransportError`); the caller closes the socket."""
    hello = expect_map(recv_frame(sock, PREAUTH_MAX_FRAME), "hello")
    if hello.get("v") != PROTOCOL_VERSION:
        send_frame(sock, {"t": "error", "error": f"protocol {PROTOCOL_VERSION} only"})
        raise ProtocolError(f"peer speaks protocol {hello.get('v')!r}")
    peer = _field(hello, "name", str)
    chan = _field(hello, "chan", str)
    cnonce = _field(hello, "nonce", bytes, NONCE_BYTES)
    try:
        check_name("peer", peer)
    except ValueError:
        raise ProtocolError("bad peer name") from None
    if chan not in channels:
        send_frame(sock, {"t": "error", "error": "unknown channel"})
        raise ProtocolError(f"unknown channel {chan!r}")
    snonce = secrets.token_bytes(NONCE_BYTES)
    send_frame(sock, {"t": "challenge", "v": PROTOCOL_VERSION, "name": name, "nonce": snonce,
                      "mac": _mac(secret, _SERVER_LABEL, cnonce, snonce, name, peer, chan)})
    proof = expect_map(recv_frame(sock, PREAUTH_MAX_FRAME), "proof")
    want = _mac(secret, _CLIENT_LABEL, snonce, cnonce, peer, name, chan)
    got = proof.get("mac")
    if not isinstance(got, bytes) or not hmac.compare_digest(want, got):
        send_frame(sock, {"t": "error", "error": "authentication failed"})
        raise AuthenticationError(f"peer claiming to be {peer!r} failed authentication")
    send_frame(sock, {"t": "welcome"})
    return peer, chan

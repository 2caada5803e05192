"""Bad input and security of the transport agent, two processes on 127.0.0.1: wrong secrets,
forged and replayed proofs, garbage, truncated and oversize frames, malformed requests,
ranges outside what a peer may touch, peers that vanish or stall mid-transfer. Each ends in
an error or a closed connection, never a crash, and the serving agent goes on serving."""

from __future__ import annotations

import os
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import msgpack
import numpy as np
import pytest

from kvbm.errors import AuthenticationError, ConfigError, TransportError
from kvbm.testing.transport_sides import ProcessSide, pattern
from kvbm.transports import Agent, Op, TransportConfig
from kvbm.transports import tcp_wire as wire
from kvbm.transports.control import (
    PREAUTH_MAX_FRAME,
    client_handshake,
    pack_frame,
    recv_frame,
    send_frame,
    server_handshake,
)

ROOT = Path(__file__).resolve().parent.parent
PEER = Path(__file__).with_name("transport_peer.py")
SECRET = "security-test-secret-0123456789abcdef"
SIZE = 1 << 20


def cfg(**over: object) -> TransportConfig:
    base: dict[str, object] = dict(secret=SECRET, handshake_timeout_s=1.0, io_timeout_s=2.0,
                                   backends="tcp",
                                   max_frame_bytes=1 << 20, max_connections=16)
    base.update(over)
    return TransportConfig(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def server() -> Iterator[ProcessSide]:
    side = ProcessSide("server", cfg(), PEER)
    side.register("open", SIZE, seed=1)
    side.register("alice-only", SIZE, seed=2, expose_to="alice")
    try:
        yield side
    finally:
        side.close()


@pytest.fixture(scope="module")
def good(server: ProcessSide) -> Iterator[Agent]:
    with Agent("good", cfg()) as a:
        yield a


def still_serving(server: ProcessSide, good: Agent) -> None:
    """A well-behaved peer gets the right bytes (so nothing above broke the server)."""
    peer = good.connect(*server.address)
    buf = np.zeros(SIZE, np.uint8)
    loc = good.register(buf)
    try:
        good.transfer(peer, Op.READ, [((loc, 0, SIZE), (peer.info.region("open"), 0, SIZE))]
                      ).wait(30)
        assert buf.tobytes() == server.read("open", 0, SIZE)
    finally:
        good.deregister(loc)


def raw(server: ProcessSide) -> socket.socket:
    s = socket.create_connection(server.address, timeout=10)
    return s


def closed_by_peer(s: socket.socket) -> bool:
    """Read until the peer closes (True) or 10 s of silence (False); frames are skipped."""
    s.settimeout(10)
    try:
        while s.recv(65536):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


def authed(server: ProcessSide, chan: str, name: str = "raw-client",
           secret: str = SECRET) -> socket.socket:
    s = raw(server)
    assert client_handshake(s, secret.encode(), name, chan) == "server"
    return s


# -- authentication ----------------------------------------------------------------------------
def test_wrong_secret_is_refused_both_ways(server: ProcessSide, good: Agent) -> None:
    with Agent("mallory", cfg(secret="not-the-secret-at-all-000000")) as bad, \
            pytest.raises(AuthenticationError):
        bad.connect(*server.address)
    # the server's own check of a client proof: right structure, wrong key
    s = raw(server)
    with pytest.raises(AuthenticationError):
        client_handshake(s, b"x" * 32, "mallory", "control")
    s.close()
    before = server.stats().get("auth_failures", 0)
    s = raw(server)
    send_frame(s, {"t": "hello", "v": 1, "name": "mallory", "chan": "control",
                   "nonce": os.urandom(32)})
    challenge = recv_frame(s, PREAUTH_MAX_FRAME)
    assert challenge["t"] == "challenge" and challenge["name"] == "server"
    send_frame(s, {"t": "proof", "mac": os.urandom(32)})
    assert recv_frame(s, PREAUTH_MAX_FRAME) == {"t": "error", "error": "authentication failed"}
    assert closed_by_peer(s)
    assert server.stats()["auth_failures"] == before + 1
    still_serving(server, good)


def test_a_recorded_proof_does_not_replay(server: ProcessSide, good: Agent) -> None:
    import hashlib
    import hmac

    nonce = os.urandom(32)

    def attempt(proof: bytes | None) -> tuple[bytes, dict[str, object]]:
        s = raw(server)
        send_frame(s, {"t": "hello", "v": 1, "name": "replayer", "chan": "control",
                       "nonce": nonce})
        ch = recv_frame(s, PREAUTH_MAX_FRAME)
        if proof is None:  # the honest run, whose proof an eavesdropper records
            proof = hmac.new(SECRET.encode(), b"kvbm-transport-v1/client" + msgpack.packb(
                [ch["nonce"], nonce, "replayer", "server", "control"]), hashlib.sha256).digest()
        send_frame(s, {"t": "proof", "mac": proof})
        out = recv_frame(s, PREAUTH_MAX_FRAME)
        s.close()
        return proof, out

    recorded, first = attempt(None)
    assert first == {"t": "welcome"}
    _, second = attempt(recorded)  # same client nonce, new server nonce
    assert second["t"] == "error"
    still_serving(server, good)


def test_expected_name_and_channel(server: ProcessSide, good: Agent) -> None:
    with pytest.raises(AuthenticationError):
        good.connect(*server.address, name="somebody-else")
    for hello in ({"t": "hello", "v": 1, "name": "x", "chan": "nope", "nonce": os.urandom(32)},
                  {"t": "hello", "v": 99, "name": "x", "chan": "control",
                   "nonce": os.urandom(32)},
                  {"t": "hello", "v": 1, "name": "bad name!", "chan": "control",
                   "nonce": os.urandom(32)},
                  {"t": "hello", "v": 1, "name": "x", "chan": "control", "nonce": b"short"},
                  {"t": "proof", "mac": b"x"}, [1, 2, 3], "hello"):
        s = raw(server)
        send_frame(s, hello)
        assert closed_by_peer(s), hello
    still_serving(server, good)


def test_secret_settings() -> None:
    with pytest.raises(ConfigError):
        TransportConfig(secret="short")
    with pytest.raises(ConfigError):
        Agent("no-secret", TransportConfig())
    assert TransportConfig.from_env({"KVBM_TRANSPORT_SECRET": SECRET}).resolve_secret() == \
        SECRET.encode()
    with pytest.raises(ConfigError):
        TransportConfig.from_env({"KVBM_TRANSPORT_SECRETS": SECRET})
    assert "secret" not in repr(TransportConfig(secret=SECRET)).replace("secret_file", "")


def test_secret_file(tmp_path: Path) -> None:
    f = tmp_path / "secret"
    f.write_text(SECRET + "\n")
    assert TransportConfig(secret_file=str(f)).resolve_secret() == SECRET.encode()
    f.write_text("tiny")
    with pytest.raises(ConfigError):
        TransportConfig(secret_file=str(f)).resolve_secret()
    with pytest.raises(ConfigError):
        TransportConfig(secret_file=str(tmp_path / "missing")).resolve_secret()


# -- garbage and bad frames ----------------------------------------------------------------------
def test_garbage_truncated_and_oversize_frames(server: ProcessSide, good: Agent) -> None:
    rng = np.random.default_rng(7)
    cases = [rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(),  # garbage
             b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
             struct.pack(">I", 0x7FFFFFFF),  # a 2 GiB frame announced
             struct.pack(">I", PREAUTH_MAX_FRAME + 1) + b"x" * 100,
             struct.pack(">I", 100) + b"\x85" * 10,  # truncated, then silence
             struct.pack(">I", 3) + b"\xc1\xc1\xc1",  # not msgpack
             b"\x00\x00",  # half a length prefix
             b""]  # nothing at all: closed after the handshake timeout
    for data in cases:
        s = raw(server)
        s.sendall(data)
        assert closed_by_peer(s), data[:16]
    # truncated, and the client goes away at once
    s = raw(server)
    s.sendall(struct.pack(">I", 100) + b"\x85")
    s.close()
    still_serving(server, good)


def test_bad_frames_after_authentication(server: ProcessSide, good: Agent) -> None:
    bad: list[bytes] = [
        struct.pack(">I", (1 << 20) + 1),  # over max_frame_bytes: closed unread
        pack_frame({"t": "bogus"}), pack_frame([1, 2, 3]), pack_frame("r"),
        struct.pack(">I", 5) + b"\xc1" * 5,
        pack_frame({"t": "notify", "msg": "not bytes"}),
        pack_frame({"t": "r", "s": [1, 0, 1]}),  # a data request on the control channel
    ]
    for frame in bad:
        s = authed(server, "control")
        s.sendall(frame)
        assert closed_by_peer(s), frame[:32]
    still_serving(server, good)


def test_bad_requests_on_a_data_connection(server: ProcessSide, good: Agent) -> None:
    rid = good.connect(*server.address).info.region("open").id
    one = wire.RANGE.pack(rid, 0, 16)
    bad: list[bytes] = [
        pack_frame({"t": "r", "s": [rid, 0, 16]}),  # msgpack: not this wire
        wire.HEAD.pack(ord("x"), 0, 0, 1) + one,  # no such op
        wire.HEAD.pack(ord("r"), 1, 0, 1) + one,  # unknown flags
        wire.HEAD.pack(ord("w"), 0, 4096, 1) + one,  # padding of a page or more
        wire.HEAD.pack(ord("r"), 0, 0, 0) + one,  # no ranges
        wire.HEAD.pack(ord("r"), 0, 0, (1 << 20) // 24 + 1) + one,  # over max_frame_bytes
        wire.HEAD.pack(ord("r"), 0, 0, 0xFFFFFFFF) + one,  # over MAX_DESCRIPTORS
        wire.pack_request(Op.READ, [rid, 0, 2**63]),  # a value the table cannot hold
        wire.pack_request(Op.READ, [rid, 0, 16, rid, 2**64 - 1, 1]),
        wire.HEAD.pack(ord("r"), 0, 0, 3) + one,  # truncated ranges, then silence
        wire.HEAD.pack(ord("w"), 0, 0, 1)[:5],  # half a header, then silence
    ]
    for frame in bad:
        s = authed(server, "tcp")
        s.sendall(frame)
        assert closed_by_peer(s), frame[:32]
    still_serving(server, good)


# -- ranges a peer may not touch -------------------------------------------------------------------
def test_raw_requests_outside_what_was_exposed(server: ProcessSide, good: Agent) -> None:
    peer = good.connect(*server.address)
    open_id = peer.info.region("open").id
    with Agent("alice", cfg()) as alice:
        hidden = alice.connect(*server.address).info.region("alice-only").id
    s = authed(server, "tcp", name="good")
    for ranges in ([hidden, 0, 16], [open_id, SIZE - 8, 16], [open_id, 2**62, 1],
                   [open_id, 0, SIZE + 1], [12345, 0, 1], [open_id, 0, 16, hidden, 0, 16],
                   [open_id, 0, 0]):
        s.sendall(wire.pack_request(Op.READ, ranges))
        assert answer(s)[0] == wire.REFUSED, ranges
        # a refused WRITE's payload is read and dropped: the connection stays in step
        s.sendall(wire.pack_request(Op.WRITE, ranges) + b"\xee" * sum(ranges[2::3]))
        assert answer(s)[0] == wire.REFUSED, ranges
    s.sendall(wire.pack_request(Op.READ, [open_id, 0, 16]))  # still usable, and right
    assert answer(s) == (wire.OK, 0, b"")  # no padding below 64 KiB
    data = bytearray(16)
    s.recv_into(data, 16, socket.MSG_WAITALL)
    assert bytes(data) == pattern(1, 16).tobytes()
    s.close()
    assert server.read("alice-only", 0, SIZE) == pattern(2, SIZE).tobytes()
    assert server.read("open", 0, SIZE) == pattern(1, SIZE).tobytes()
    still_serving(server, good)


def answer(s: socket.socket) -> tuple[int, int, bytes]:
    """``(status, padding, message)`` of an answer on a data connection."""
    head = bytearray(wire.ANSWER.size)
    assert s.recv_into(head, len(head), socket.MSG_WAITALL) == len(head)
    status, flags, pad, size = wire.ANSWER.unpack(head)
    assert flags == 0
    msg = bytearray(size)
    if size:
        assert s.recv_into(msg, size, socket.MSG_WAITALL) == size
    return status, pad, bytes(msg)


# -- peers that vanish or stall ------------------------------------------------------------------
def test_peer_disconnects_mid_write(server: ProcessSide, good: Agent) -> None:
    rid = good.connect(*server.address).info.region("open").id
    s = authed(server, "tcp", name="good")
    s.sendall(wire.pack_request(Op.WRITE, [rid, 0, SIZE]) + pattern(1, SIZE // 2).tobytes())
    s.close()  # half the payload, then gone (the same bytes: the region stays as it was)
    assert server.notifications(1, 0.5) == []
    still_serving(server, good)


def test_slow_peer_is_dropped(server: ProcessSide, good: Agent) -> None:
    rid = good.connect(*server.address).info.region("open").id
    before = server.stats().get("bad_connections", 0)
    s = authed(server, "tcp", name="good")
    s.sendall(wire.pack_request(Op.WRITE, [rid, 0, SIZE]) + pattern(1, 1000).tobytes())
    assert closed_by_peer(s)  # after io_timeout_s without progress
    assert server.stats()["bad_connections"] >= before + 1
    # a reader that stops reading: the server's sends time out too
    before = server.stats()["bad_connections"]
    s = authed(server, "tcp", name="good")
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    for _ in range(8):
        s.sendall(wire.pack_request(Op.READ, [rid, 0, SIZE]))
    for _ in range(200):  # not a timed assertion: wait (up to 20 s) for the server to give up
        if server.stats()["bad_connections"] > before:
            break
        threading.Event().wait(0.1)
    assert server.stats()["bad_connections"] == before + 1
    assert closed_by_peer(s)
    still_serving(server, good)


def test_too_many_connections(server: ProcessSide, good: Agent) -> None:
    before = server.stats().get("refused_connections", 0)
    socks = [raw(server) for _ in range(24)]  # max_connections is 16
    try:
        # the ones past the limit are closed at once (the rest after the handshake timeout)
        for _ in range(100):  # the server accepts them in its own time (up to 10 s)
            if server.stats().get("refused_connections", 0) >= before + 24 - 16:
                break
            threading.Event().wait(0.1)
        assert server.stats()["refused_connections"] >= before + 24 - 16
    finally:
        for s in socks:
            s.close()
    still_serving(server, good)


# -- a malicious server: what the requesting side accepts ----------------------------------------
@pytest.mark.parametrize("meta", [None, [], {"v": 1}, {"v": 1, "agent": "evil", "instance": 1,
                                                         "node": "n", "host": "h", "port": 1,
                                                         "backends": {}, "regions": [{"id": -1}]},
                                  {"v": 1, "agent": "other-name", "instance": 1, "node": "n",
                                   "host": "h", "port": 1, "backends": {}, "regions": []}])
def test_malformed_metadata_is_refused(meta: object) -> None:
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)

    def evil() -> None:
        conn, _ = ls.accept()
        with conn:
            server_handshake(conn, SECRET.encode(), "evil", frozenset({"control"}))
            recv_frame(conn, 1 << 20)
            send_frame(conn, {"t": "meta", "meta": meta})
            conn.recv(1)

    t = threading.Thread(target=evil, daemon=True)
    t.start()
    with Agent("victim", cfg()) as a, pytest.raises(TransportError):
        a.connect(*ls.getsockname())
    t.join(10)
    ls.close()


def test_nothing_is_pickled() -> None:
    import ast

    sources = [*(ROOT / "transports").glob("*.py"),
               *(ROOT / "kvbm" / "testing").glob("transport*.py")]
    assert len(sources) > 10
    unsafe = {"pickle", "cPickle", "dill", "marshal", "shelve", "cloudpickle"}
    offenders = []
    for p in sources:
        for node in ast.walk(ast.parse(p.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{p.name}: {n}" for n in names if n.split(".")[0] in unsafe]
    assert offenders == []

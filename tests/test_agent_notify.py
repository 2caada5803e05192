"""``Agent.notify``: a note without data, over the authenticated control channel, into the
peer's notifications (where its transfers' notifications arrive). Two processes on
127.0.0.1 (the serving agent runs tests/transport_peer.py): delivered in order, bounded
in size on both ends, refused for a peer not connected, after close and once the peer is
gone; garbage notify frames from a raw socket close that connection only."""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from kvbm.errors import ClosedError, InvalidArgumentError, TransportError
from kvbm.testing.transport_sides import ProcessSide
from kvbm.transports import Agent, Op, TransportConfig
from kvbm.transports.agent import MAX_NOTIFY_BYTES
from kvbm.transports.control import client_handshake, pack_frame

WAIT_S = 30  # a guard against hangs, not a timing assertion
PEER = Path(__file__).with_name("transport_peer.py")
SECRET = "notify-test-secret-0123456789abcdef"


def cfg(**over: object) -> TransportConfig:
    base: dict[str, object] = dict(secret=SECRET, handshake_timeout_s=1.0, io_timeout_s=2.0,
                                   backends="tcp", max_frame_bytes=1 << 20, max_connections=16)
    base.update(over)
    return TransportConfig(**base)  # type: ignore[arg-type]


def authed(server: ProcessSide, name: str = "raw-client", secret: str = SECRET
           ) -> socket.socket:
    """A raw socket past the control channel's handshake."""
    s = socket.create_connection(server.address, timeout=10)
    assert client_handshake(s, secret.encode(), name, "control") == "server"
    return s


def closed_by_peer(s: socket.socket) -> bool:
    """Read until the peer closes (True) or 10 s of silence (False)."""
    s.settimeout(10)
    try:
        while s.recv(65536):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


def still_serving(server: ProcessSide, good: Agent) -> None:
    """A well-behaved peer gets the right bytes (nothing above broke the server)."""
    peer = good.connect(*server.address)
    buf = np.zeros(4096, np.uint8)
    loc = good.register(buf)
    try:
        good.transfer(peer, Op.READ, [((loc, 0, 4096), (peer.info.region("open"), 0, 4096))]
                      ).wait(WAIT_S)
        assert buf.tobytes() == server.read("open", 0, 4096)
    finally:
        good.deregister(loc)


@pytest.fixture
def server() -> Iterator[ProcessSide]:
    side = ProcessSide("server", cfg(), PEER)
    side.register("open", 1 << 20, seed=1)
    try:
        yield side
    finally:
        side.close()


@pytest.fixture
def good() -> Iterator[Agent]:
    with Agent("good", cfg()) as a:
        yield a


def test_notify_reaches_the_peers_notifications_in_order(server: ProcessSide, good: Agent
                                                         ) -> None:
    peer = good.connect(*server.address)
    limit = good.max_notify_bytes
    assert limit == min(MAX_NOTIFY_BYTES, (1 << 20) // 2)
    payloads = [b"first", b"", bytearray(b"\x00\xffbinary"), memoryview(b"m" * limit)]
    good.notify(peer, payloads[0])
    good.notify("server", payloads[1])  # by name too
    for p in payloads[2:]:
        good.notify(peer, p)
    got = server.notifications(len(payloads), WAIT_S)
    assert got == [["good", bytes(p)] for p in payloads]
    # the same inbox as a transfer's notification, behind the notes sent before it
    buf = np.zeros(16, np.uint8)
    loc = good.register(buf)
    good.transfer(peer, Op.READ, [((loc, 0, 16), (peer.info.region("open"), 0, 16))],
                  notify=b"after the data").wait(WAIT_S)
    good.notify(peer, b"last")
    assert server.notifications(2, WAIT_S) == [["good", b"after the data"], ["good", b"last"]]
    assert server.stats()["notifications"] == len(payloads) + 2


def test_notify_refuses_bad_arguments_and_sends_nothing(server: ProcessSide, good: Agent
                                                        ) -> None:
    peer = good.connect(*server.address)
    too_big = b"x" * (good.max_notify_bytes + 1)
    for bad_peer, payload in ((peer, too_big), (peer, "text"), (peer, None), (peer, 5),
                              ("nobody", b"x"), (None, b"x"), (7, b"x")):
        with pytest.raises(InvalidArgumentError):
            good.notify(bad_peer, payload)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError):  # a transfer's notification: the same bound
        good.transfer(peer, Op.READ, [], notify=too_big)
    good.notify(peer, b"only this one")
    assert server.notifications(2, 1.0) == [["good", b"only this one"]]


def test_notify_to_a_peer_that_is_gone_or_after_close(server: ProcessSide) -> None:
    a = Agent("leaver", cfg())
    peer = a.connect(*server.address)
    a.notify(peer, b"hello")
    assert server.notifications(1, WAIT_S) == [["leaver", b"hello"]]
    server.kill()
    with pytest.raises(TransportError):
        a.notify(peer, b"anyone there?")
    a.disconnect(peer)
    with pytest.raises(InvalidArgumentError):
        a.notify(peer, b"x")
    a.close()
    with pytest.raises(ClosedError):
        a.notify(peer, b"x")


def test_garbage_notify_frames_close_that_connection_only(server: ProcessSide, good: Agent
                                                          ) -> None:
    peer = good.connect(*server.address)
    good.notify(peer, b"before")
    limit = good.max_notify_bytes
    bad = [pack_frame({"t": "notify"}), pack_frame({"t": "notify", "msg": "str"}),
           pack_frame({"t": "notify", "msg": 12}), pack_frame({"t": "notify", "msg": [b"x"]}),
           pack_frame({"t": "notify", "msg": b"x" * (limit + 1)}),  # over the bound
           pack_frame(["notify", b"x"]), struct.pack(">I", 9) + b"\x92\xa6notify",
           struct.pack(">I", 40) + b"\x82\xa1t\xa6notify\xa3msg\xc4\x20"]  # truncated
    for frame in bad:
        s = authed(server)
        s.sendall(frame)
        if frame.startswith(struct.pack(">I", 40)):
            s.close()  # and gone mid-frame
            continue
        assert closed_by_peer(s), frame[:32]
    # an authenticated raw client's well-formed note still arrives; so do good's
    s = authed(server, name="raw-client")
    s.sendall(pack_frame({"t": "notify", "msg": b"raw but right"}))
    s.settimeout(WAIT_S)
    assert s.recv(64)  # its "ok"
    s.close()
    good.notify(peer, b"after")
    got = server.notifications(3, WAIT_S)
    assert got == [["good", b"before"], ["raw-client", b"raw but right"], ["good", b"after"]]
    still_serving(server, good)


def test_notify_needs_the_shared_secret(server: ProcessSide) -> None:
    """Nothing reaches the inbox without the handshake: not from an agent with another
    secret, not from a raw socket that sends a notify frame instead of its hello."""
    from kvbm.errors import AuthenticationError

    with Agent("mallory", cfg(secret="not-the-secret-at-all-000000")) as m, \
            pytest.raises(AuthenticationError):
        m.connect(*server.address)
    s = socket.create_connection(server.address, timeout=10)
    s.sendall(pack_frame({"t": "notify", "msg": b"sneaky"}))
    assert closed_by_peer(s)
    s.close()
    assert server.notifications(1, 0.5) == []

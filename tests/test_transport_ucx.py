"""The ucx transport backend (ucxx): the conformance suite with the serving agent in this
process and in a process of its own, over UCX's default transports (shared memory and
cross-memory attach on one host) and over its tcp on loopback, plus what is particular to
ucx. Skipped where ucxx is not installed (``pip install 'kvtier[ucx]'``)."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from kvbm.testing.transports import PeerMode, TransportTests
from kvbm.transports import ALL_PEERS, Agent, Op, TransferStatus, TransportConfig

# Not importorskip: importing ucxx here would load UCX before the backend sets its log
# destination (stderr, not stdout).
if importlib.util.find_spec("ucxx") is None:
    pytest.skip("the ucx backend needs ucxx (kvtier[ucx])", allow_module_level=True)

PEER = Path(__file__).with_name("transport_peer.py")


@pytest.fixture(autouse=True)
def _loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    # Nothing but 127.0.0.1 in tests (peer processes inherit the environment).
    monkeypatch.setenv("UCX_NET_DEVICES", "lo")
    monkeypatch.setenv("UCX_WARN_UNUSED_ENV_VARS", "n")


class TestUcxThreads(TransportTests):
    backend = "ucx"
    mode = PeerMode.THREAD


class TestUcxProcesses(TransportTests):
    backend = "ucx"
    mode = PeerMode.PROCESS
    peer_script = PEER


class TestUcxTcpProcesses(TransportTests):
    """UCX held to its tcp transport on loopback (what it uses between hosts without
    RDMA)."""

    backend = "ucx"
    mode = PeerMode.PROCESS
    peer_script = PEER

    @pytest.fixture(autouse=True)
    def _tcp_only(self, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
        monkeypatch.setenv("UCX_TLS", "tcp")
        yield
        assert os.environ["UCX_TLS"] == "tcp"


# -- what is particular to ucx --------------------------------------------------------------------
SECRET = "kvbm-ucx-test-secret-0123456789"


def _pair(**over: object) -> tuple[Agent, Agent]:
    cfg = TransportConfig(secret=SECRET, backends="ucx", require="ucx", io_timeout_s=10.0,
                          **over)  # type: ignore[arg-type]
    return Agent("client", cfg), Agent("server", cfg)


def _roundtrip(a: Agent, b: Agent) -> None:
    src = np.arange(1 << 20, dtype=np.uint32).view(np.uint8)
    b.register(src, name="src", expose_to=ALL_PEERS)
    p = a.connect(*b.address)
    dst = np.zeros(src.size, np.uint8)
    with a.transfer(p, Op.READ, [((a.register(dst), 0, dst.size),
                                  (p.info.region("src"), 0, dst.size))]) as h:
        assert h.wait(30) is TransferStatus.DONE and h.backend == "ucx"
    assert np.array_equal(dst, src)


def test_ucx_environment_is_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UCX_TLS", "tcp")
    a, b = _pair()
    with a, b:
        _roundtrip(a, b)
        ctx = a.backends["ucx"].context()  # type: ignore[attr-defined]
        assert ctx.config["TLS"] == "tcp" and ctx.config["NET_DEVICES"] == "lo"


def test_a_loopback_agent_keeps_ucx_on_lo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("UCX_NET_DEVICES")
    a, b = _pair()
    with a, b:
        assert a.backends["ucx"].context().config["NET_DEVICES"] == "lo"  # type: ignore[attr-defined]
        _roundtrip(a, b)


@pytest.mark.parametrize("frames", [
    [{"t": "hello", "addr": b"not a ucx address"}],  # UCX would assert (abort) on it
    [{"t": "hello", "addr": b"\x20" * 4}],
    [{"t": "hello", "addr": "text"}],
    ["old hello"],  # a real address, from a peer of another protocol version
    [{"t": "nope"}],
    ["hello"],
    ["valid hello", {"t": "r", "s": [1, 0, 10], "tag": 3}],  # tag bits in the index part
    ["valid hello", {"t": "r", "s": [1, 0], "tag": 1 << 20}],  # not triples
    ["valid hello", {"t": "w", "s": [1, 0, -5], "tag": 1 << 20}],
    ["valid hello", {"t": "x", "s": [1, 0, 10], "tag": 1 << 20}],
])
def test_garbage_on_the_ucx_channel_drops_that_connection_only(frames: list[object]) -> None:
    from kvbm.transports import ucx_io
    from kvbm.transports.control import recv_frame, send_frame
    from kvbm.transports.ucx_client import PROTOCOL

    a, b = _pair()
    with a, b:
        p = a.connect(*b.address)
        sock = a.open_channel(p.info, "ucx")
        w = ucx_io.Worker(a.backends["ucx"].context())  # type: ignore[attr-defined]
        try:
            for f in frames:
                hello = {"t": "hello", "addr": w.address, "v": PROTOCOL}
                send_frame(sock, hello if f == "valid hello" else
                           {**hello, "v": PROTOCOL - 1} if f == "old hello" else f)
                if f == "valid hello":
                    assert recv_frame(sock, 1 << 20)["t"] == "hello"
            sock.settimeout(10)
            assert sock.recv(1) == b""  # the server closed this connection
        finally:
            sock.close()
            w.close()
        assert b.stats.snapshot().events.get("bad_connections", 0) >= 1
        _roundtrip(a, b)  # and goes on serving

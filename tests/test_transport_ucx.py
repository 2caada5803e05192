"""The ucx transport backend (ucxx): the conformance suite with the serving agent in this
process and in a process of its own, over UCX's default transports (shared memory and
cross-memory attach on one host) and over its tcp on loopback, plus what is particular to
ucx. Skipped where ucxx is not installed (``pip install 'kvtier[ucx]'``)."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


class _OneSided:
    """Both agents in one-sided mode (``ucx_rma``): host transfers by UCX RMA."""

    one_sided = True

    def config(self, **over: Any) -> TransportConfig:
        return super().config(**{"ucx_rma": True, **over})  # type: ignore[misc]


class TestUcxRmaThreads(_OneSided, TransportTests):
    backend = "ucx"
    mode = PeerMode.THREAD


class TestUcxRmaProcesses(_OneSided, TransportTests):
    backend = "ucx"
    mode = PeerMode.PROCESS
    peer_script = PEER


class TestUcxRmaTcpProcesses(_OneSided, TestUcxTcpProcesses):
    """One-sided over UCX's tcp (no cross-memory attach: UCX emulates RMA with messages,
    and operations finish in later progress calls)."""


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


def test_small_transfers_on_an_idle_link_run_in_the_callers_thread() -> None:
    """Under the split threshold with a link idle, the calling thread moves the transfer
    before ``transfer`` returns (no hand-over to a background thread, whose wake-up cost
    more than a small transfer): with a peer that keeps up, one of a few ends within the
    call. The handle behaves as any other; a refusal is its error; the link goes on."""
    from kvbm.errors import RemoteAccessError
    from kvbm.testing.transport_sides import ProcessSide

    cfg = TransportConfig(secret=SECRET, backends="ucx", require="ucx", io_timeout_s=10.0)
    side = ProcessSide("quick", cfg, PEER)
    try:
        side.register("r", 1 << 16, seed=5)
        with Agent("a", cfg) as a:
            peer = a.connect(*side.address)
            r = peer.info.region("r")
            buf = np.zeros(1 << 16, np.uint8)
            loc = a.register(buf)
            a.transfer(peer, Op.READ, [((loc, 0, 8), (r, 0, 8))]).wait(30)  # a link opens
            within = 0
            for i in range(20):
                op = Op.READ if i % 2 == 0 else Op.WRITE
                h = a.transfer(peer, op, [((loc, 0, 1 << 16), (r, 0, 1 << 16))])
                within += h.done()
                assert h.wait(30) is TransferStatus.DONE
                h.release()
                assert h.status is TransferStatus.DONE
            assert within >= 1
            assert bytes(buf) == side.read("r", 0, 1 << 16)
            side.register("other", 64, seed=1)
            peer = a.refresh(peer)
            side.deregister("other")  # what a knows is stale now: the peer refuses
            h = a.transfer(peer, Op.READ, [((loc, 0, 16), (peer.info.region("other"), 0, 16))])
            with pytest.raises(RemoteAccessError):
                h.wait(30)
            buf[:8] = 7
            a.transfer(peer, Op.WRITE, [((loc, 0, 8), (r, 8, 8))]).wait(30)
            assert side.read("r", 8, 8) == bytes([7] * 8)
    finally:
        side.close()


@pytest.mark.parametrize("op", [Op.READ, Op.WRITE])
@pytest.mark.parametrize("pieces", [1, 20000])
def test_a_stalled_peer_does_not_hold_up_the_call(op: Op, pieces: int) -> None:
    """A transfer started in the caller's thread on a peer that stopped: a thread of its own
    takes it over, ``transfer`` returns a pending handle, which can be released
    (CANCELLED); a new link works once the peer goes on. With many descriptors, the
    caller's moment is over before the first wait for the peer: that wait hands over at
    once rather than block."""
    from kvbm.testing.transport_sides import ProcessSide, cancel_while_paused

    cfg = TransportConfig(secret=SECRET, backends="ucx", require="ucx", io_timeout_s=10.0)
    side = ProcessSide("stopped", cfg, PEER)
    try:
        side.register("r", 1 << 20, seed=3)
        with Agent("a", cfg) as a:
            peer = a.connect(*side.address)
            r = peer.info.region("r")
            loc = a.register(np.zeros(1 << 20, np.uint8))
            a.transfer(peer, Op.READ, [((loc, 0, 8), (r, 0, 8))]).wait(30)
            step = (1 << 20) // pieces
            descs = [((loc, i * step, step // 2 or 1), (r, i * step, step // 2 or 1))
                     for i in range(pieces)] if pieces > 1 else [((loc, 0, 1 << 20),
                                                                  (r, 0, 1 << 20))]
            cancel_while_paused(side, lambda: a.transfer(peer, op, descs))
            a.transfer(peer, Op.READ, [((loc, 0, 4096), (r, 0, 4096))]).wait(30)
            assert loc.view(0, 4096) == side.read("r", 0, 4096)
    finally:
        side.close()


# -- many small descriptors: coalesced messages ---------------------------------------------------
def _scattered(rng: np.random.Generator, size: int) -> list[tuple[int, int, int]]:
    """``(local offset, remote offset, length)`` around the coalescing threshold (256 KiB):
    runs of small ranges, ones just below / at / above it, large ones, and neighbours
    contiguous on both sides (merged); each side's ranges are disjoint."""
    small = 256 << 10
    lengths = ([32 << 10] * 40 + [small - 1, small, small + 1, 3, 1 << 20]
               + [4096] * 30 + [small - 1] * 6 + [1, 2 << 20] + [24 << 10] * 20)
    rng.shuffle(lengths)
    out, lo, ro = [], 0, 0
    for i, n in enumerate(lengths):
        gap = 0 if i % 7 == 3 else int(rng.integers(1, 5000))  # some contiguous pairs
        lo, ro = lo + gap, ro + gap
        out.append((lo, ro, n))
        lo, ro = lo + n, ro + n
    assert max(lo, ro) <= size
    order = rng.permutation(len(out))  # not in address order either
    return [out[int(i)] for i in order[:len(out) // 2]] + out[len(out) // 2:]


@pytest.mark.parametrize("staging_mib", [16, 1])
def test_many_small_descriptors_move_exactly_their_bytes(
        monkeypatch: pytest.MonkeyPatch, staging_mib: int) -> None:
    from kvbm.errors import RemoteAccessError
    from kvbm.transports import ucx_io

    # 1 MiB of staging: several windows per transfer, the buffer reused between them.
    monkeypatch.setattr(ucx_io, "STAGING_BYTES", staging_mib << 20)
    size = 32 << 20
    rng = np.random.default_rng(staging_mib)
    descs = _scattered(rng, size)
    a, b = _pair()
    try:
        remote = rng.integers(0, 256, size, dtype=np.uint8)
        rr = b.register(remote, name="r", expose_to=ALL_PEERS)
        p = a.connect(*b.address)
        local = np.zeros(size, np.uint8)
        loc = a.register(local)
        r = p.info.region("r")

        def run(op: Op, ds: list[tuple[int, int, int]], bad_at: int | None = None) -> None:
            out = [((loc, lo, n), (r, ro, n)) for lo, ro, n in ds]
            if bad_at is not None:  # out of the peer's region: only the server can tell
                out.insert(bad_at, ((loc, 0, 4096), (rr.id, size - 100, 4096)))
            with a.transfer(p, op, out) as h:
                assert h.wait(30) is TransferStatus.DONE

        run(Op.READ, descs)
        want = np.zeros(size, np.uint8)
        for lo, ro, n in descs:
            want[lo:lo + n] = remote[ro:ro + n]
        assert np.array_equal(local, want)

        local[:] = rng.integers(0, 256, size, dtype=np.uint8)
        want = remote.copy()
        for lo, ro, n in descs:
            want[ro:ro + n] = local[lo:lo + n]
        run(Op.WRITE, descs)
        assert np.array_equal(remote, want)

        # A refused request, the bad range in the middle: nothing moves either way, and the
        # link goes on serving.
        before_local, before_remote = local.copy(), remote.copy()
        for op in (Op.READ, Op.WRITE):
            with pytest.raises(RemoteAccessError):
                run(op, descs, bad_at=len(descs) // 2)
            assert np.array_equal(local, before_local)
            assert np.array_equal(remote, before_remote)
        run(Op.READ, descs[:5])
        for lo, ro, n in descs[:5]:
            assert np.array_equal(local[lo:lo + n], remote[ro:ro + n])
    finally:
        a.close()
        b.close()

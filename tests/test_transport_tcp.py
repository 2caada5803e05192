"""The tcp transport backend: the conformance suite with the serving agent in this process
and in a process of its own, plus what is particular to tcp (splitting across connections,
CUDA staging where a GPU is present)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from kvbm.errors import ConfigError, InvalidArgumentError, RemoteAccessError
from kvbm.testing.transports import PeerMode, TransportTests
from kvbm.transports import (
    ALL_PEERS,
    Agent,
    Notification,
    Op,
    TransferStatus,
    TransportConfig,
    available_backends,
)
from kvbm.transports.backend import backend_class
from kvbm.transports.descriptors import Segment
from kvbm.transports.links import split
from kvbm.transports.regions import RegionHandle
from kvbm.transports.tcp import TcpBackend

PEER = Path(__file__).with_name("transport_peer.py")


class TestTcpThreads(TransportTests):
    backend = "tcp"
    mode = PeerMode.THREAD


class TestTcpProcesses(TransportTests):
    backend = "tcp"
    mode = PeerMode.PROCESS
    peer_script = PEER


SECRET = "tcp-backend-test-secret-0123456789"


def cfg(**over: object) -> TransportConfig:
    base: dict[str, object] = dict(secret=SECRET, backends="tcp", io_timeout_s=10.0)
    base.update(over)
    return TransportConfig(**base)  # type: ignore[arg-type]


@pytest.fixture
def pair() -> Iterator[tuple[Agent, Agent]]:
    with Agent("a", cfg()) as a, Agent("b", cfg()) as b:
        yield a, b


def roundtrip(a: Agent, b: Agent, mine: object, theirs: object, n: int) -> None:
    """READ ``n`` bytes of ``theirs`` (b's) into ``mine`` (a's), then WRITE them back
    inverted, checking both through numpy views of the bytes."""
    r_mine = a.register(mine)
    r_theirs = b.register(theirs, expose_to=ALL_PEERS)
    peer = a.connect(*b.address)
    remote = peer.info.regions[r_theirs.id]
    assert remote.length == r_theirs.length >= n
    a.transfer(peer, Op.READ, [((r_mine, 0, n), (remote, 0, n))]).wait(30)
    got, want = bytes(r_mine.view(0, n)), bytes(r_theirs.view(0, n))
    assert got == want
    np.frombuffer(r_mine.view(0, n), np.uint8)[:] ^= 0xFF
    a.transfer(peer, Op.WRITE, [((r_mine, 0, n), (remote, 0, n))]).wait(30)
    assert bytes(r_theirs.view(0, n)) == bytes(b ^ 0xFF for b in want)


def test_split_covers_every_byte_in_order() -> None:
    rng = np.random.default_rng(1)
    region = object.__new__(RegionHandle)
    for _ in range(200):
        lens = [int(x) for x in rng.integers(1, 5000, rng.integers(1, 12))]
        segs, off = [], 0
        for k in lens:
            segs.append(Segment(region, off, 7, off + 1000, k))
            off += k
        parts = int(rng.integers(1, 6))
        out = split(segs, parts)
        assert 1 <= len(out) <= parts
        flat = [s for p in out for s in p]
        assert sum(s.length for s in flat) == sum(lens)
        pos = 0
        for s in flat:  # contiguous, in order, both sides moved together
            assert s.local_offset == pos and s.remote_offset == pos + 1000 and s.length > 0
            pos += s.length
        share = -(-sum(lens) // parts)
        assert all(sum(s.length for s in p) <= share for p in out)


def test_torch_numpy_and_buffer_regions(pair: tuple[Agent, Agent]) -> None:
    torch = pytest.importorskip("torch")
    a, b = pair
    roundtrip(a, b, torch.zeros(1000, dtype=torch.bfloat16),
              torch.arange(3000, dtype=torch.float32)[1000:2000], 2000)
    roundtrip(a, b, bytearray(5000), np.arange(5000, dtype=np.uint8), 5000)
    roundtrip(a, b, np.zeros((10, 100), np.float64), memoryview(bytearray(range(256)) * 40),
              8000)


def test_host_pools_register_their_pages(pair: tuple[Agent, Agent]) -> None:
    pytest.importorskip("torch")
    from kvbm.memory.shm import SharedHostPool
    from kvbm.pool import HostPool
    from kvbm.testing.pages import TEST_LAYOUT

    a, b = pair
    plain = HostPool(TEST_LAYOUT, 4)
    plain.raw[:] = 7
    with SharedHostPool.create(TEST_LAYOUT, 4, prefix="kvbm-transport-test") as shared:
        roundtrip(a, b, shared, plain, 4 * TEST_LAYOUT.bytes_per_block)
        assert bytes(shared.page(3)) == b"\xf8" * TEST_LAYOUT.bytes_per_block  # read, inverted


def test_what_cannot_be_registered(pair: tuple[Agent, Agent]) -> None:
    torch = pytest.importorskip("torch")
    a, _ = pair
    for bad in (np.zeros((4, 4))[:, 1], np.zeros(0), bytearray(), "text", 42, object(),
                torch.zeros(4, 4).t(), torch.zeros(4, device="meta")):
        with pytest.raises(InvalidArgumentError):
            a.register(bad)
    a.register(bytearray(4), name="x")
    for kw in ({"name": "x"}, {"name": "bad name"}, {"meta": {"f": object()}},
               {"meta": {1: 2}}, {"expose_to": 5}, {"expose_to": "*", "access": 3},
               {"expose_to": ["ok", "not ok!"]}):
        with pytest.raises(InvalidArgumentError):
            a.register(bytearray(4), **kw)  # type: ignore[arg-type]
    assert [r.name for r in a.regions()] == ["x"]  # nothing half-registered
    with pytest.raises(InvalidArgumentError):
        a.expose(RegionHandle(bytearray(4), name=None, meta={}))  # not this agent's


def test_deregister_waits_for_transfers_in_flight(pair: tuple[Agent, Agent]) -> None:
    _, b = pair
    region = b.register(bytearray(100), expose_to="a")
    lease = b.resolve("a", Op.READ, [(region.id, 0, 10)])  # what a request in flight holds
    done = threading.Event()
    t = threading.Thread(target=lambda: (b.deregister(region, timeout=30), done.set()))
    t.start()
    t.join(0.3)
    assert not done.is_set()  # still waiting for the lease
    with pytest.raises(RemoteAccessError):  # but refusing new requests already
        b.resolve("a", Op.READ, [(region.id, 0, 10)])
    lease.release()
    t.join(30)
    assert done.is_set() and region.closed and b.regions() == []


def test_notification_callback_and_bounded_queue() -> None:
    got: list[Notification] = []
    with Agent("cb", cfg(), on_notification=got.append) as cb, \
            Agent("q", cfg(max_notifications=2)) as q, Agent("s", cfg()) as s:
        loc = s.register(bytearray(16))
        for target in (cb, q):
            target.register(bytearray(16), name="r", expose_to="s")
            peer = s.connect(*target.address)
            for i in range(3):
                s.transfer(peer, Op.WRITE, [((loc, 0, 4), (peer.info.region("r"), 0, 4))],
                           notify=b"n%d" % i).wait(30)
        assert got == [Notification("s", b"n0"), Notification("s", b"n1"),
                       Notification("s", b"n2")]
        assert q.notifications() == [Notification("s", b"n1"), Notification("s", b"n2")]
        assert q.notifications() == [] and q.next_notification(0.01) is None
        assert q.stats.snapshot().events["notifications_dropped"] == 1


def test_backend_registry_and_selection(pair: tuple[Agent, Agent]) -> None:
    a, b = pair
    assert available_backends(["tcp"])["tcp"] is TcpBackend
    cls, why = backend_class("warp-drive")
    assert cls is None and why is not None and "warp-drive" in why
    assert list(a.backends) == ["tcp"]
    b.register(bytearray(8), name="r", expose_to=ALL_PEERS)
    peer = a.connect(*b.address)
    loc = a.register(bytearray(8))
    with a.transfer(peer, Op.READ, [((loc, 0, 8), (peer.info.region("r"), 0, 8))],
                    require="tcp") as h:
        assert h.wait(30) is TransferStatus.DONE and h.backend == "tcp"
    with pytest.raises(InvalidArgumentError):
        a.transfer(peer, Op.READ, [((loc, 0, 8), (peer.info.region("r"), 0, 8))],
                   require="carrier-pigeon")


def test_transport_config_checks(tmp_path: Path) -> None:
    from kvbm.config import ManagerConfig

    for bad in ({"port": 70000}, {"port": -1}, {"backends": "tcp,smoke"}, {"backends": ""},
                {"require": "fax"}, {"io_timeout_s": float("nan")}, {"io_timeout_s": 0},
                {"parallel_connections": 0}, {"max_frame_bytes": 10}, {"host": ""},
                {"secret_file": ""}, {"connect_timeout_s": float("inf")}):
        with pytest.raises(ConfigError):
            TransportConfig(**bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        TransportConfig.from_mapping({"prot": 1})
    assert TransportConfig(backends="TCP, ucx").backend_names() == ("ucx", "tcp")
    toml = tmp_path / "kvbm.toml"
    toml.write_text('[device]\nnum_blocks = 4\n[transport]\nport = 5601\nbackends = "tcp"\n')
    mc = ManagerConfig.from_toml(toml, env={"KVBM_TRANSPORT_IO_TIMEOUT_S": "2.5"})
    assert mc.transport.port == 5601 and mc.transport.io_timeout_s == 2.5
    assert ManagerConfig.from_mapping(mc.to_dict()) == mc


@pytest.mark.gpu
def test_cuda_regions_are_staged_through_host_memory(pair: tuple[Agent, Agent]) -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    a, b = pair
    n = (9 << 20) + 5  # more than one staging chunk
    mine = torch.zeros(n, dtype=torch.uint8, device="cuda")
    theirs = torch.randint(0, 256, (n,), dtype=torch.uint8, device="cuda")
    ra, rb = a.register(mine), b.register(theirs, expose_to=ALL_PEERS)
    peer = a.connect(*b.address)
    remote = peer.info.regions[rb.id]
    a.transfer(peer, Op.READ, [((ra, 0, n), (remote, 0, n))]).wait(60)
    assert torch.equal(mine, theirs)
    mine.add_(1)
    a.transfer(peer, Op.WRITE, [((ra, 3, n - 3), (remote, 0, n - 3))]).wait(60)
    assert torch.equal(theirs[:n - 3], mine[3:])


def test_transfers_go_on_after_the_peer_restarts() -> None:
    big = 3 << 20  # split across both data connections: two pooled connections die
    with Agent("a", cfg(split_threshold_bytes=1 << 20)) as a:
        loc = a.register(np.zeros(big, np.uint8))
        b = Agent("b", cfg())
        b.register(np.ones(big, np.uint8), name="r", expose_to=ALL_PEERS)
        peer = a.connect(*b.address)
        a.transfer(peer, Op.READ, [((loc, 0, big), (peer.info.region("r"), 0, big))]).wait(30)
        port = b.address[1]
        b.close()
        with Agent("b", cfg(port=port)) as b2:
            src = np.full(big, 9, np.uint8)
            b2.register(src, name="r", expose_to=ALL_PEERS)
            peer = a.refresh(peer)  # the control connection reopens; the data ones are stale
            for n in (10, big, 4096, big):
                a.transfer(peer, Op.READ, [((loc, 0, n), (peer.info.region("r"), 0, n))]
                           ).wait(30)
                assert loc.view(0, n) == src[:n].tobytes()


def test_more_descriptors_than_one_request_frame_holds() -> None:
    with Agent("a", cfg(max_frame_bytes=64 << 10)) as a, \
            Agent("b", cfg(max_frame_bytes=64 << 10)) as b:
        n = 9000  # ~200 KiB of ranges, every other 8 bytes (nothing merges)
        src = np.arange(16 * n, dtype=np.uint8)
        b.register(src, name="r", expose_to=ALL_PEERS)
        buf = np.zeros(16 * n, np.uint8)
        loc = a.register(buf)
        peer = a.connect(*b.address)
        r = peer.info.region("r")
        descs = [((loc, 16 * i, 8), (r, 16 * i, 8)) for i in range(n)]
        a.transfer(peer, Op.READ, descs).wait(60)
        view = buf.reshape(n, 16)
        assert (view[:, :8] == src.reshape(n, 16)[:, :8]).all() and not view[:, 8:].any()


def test_the_example_of_the_docs_runs() -> None:
    import re

    text = (Path(__file__).resolve().parent.parent / "docs" / "transports.md").read_text()
    code = re.findall(r"^```python\n(.*?)^```", text, flags=re.M | re.S)[0]
    exec(compile(code, "docs/transports.md", "exec"), {})


def test_a_transfer_on_an_idle_link_ends_within_the_call() -> None:
    """One connection free and a transfer under the split threshold: the calling thread
    moves it before ``transfer`` returns (no hand-over to a worker thread and back). The
    handle behaves as any other: status, wait, release, context manager, the notification
    at the peer, a refusal as the error."""
    with Agent("a", cfg()) as a, Agent("b", cfg()) as b:
        src = np.arange(1 << 16, dtype=np.uint8)
        b.register(src, name="r", expose_to=ALL_PEERS)
        peer = a.connect(*b.address)
        r = peer.info.region("r")
        buf = np.zeros(1 << 16, np.uint8)
        loc = a.register(buf)
        a.transfer(peer, Op.READ, [((loc, 0, 8), (r, 0, 8))]).wait(30)  # a connection opens
        for op in (Op.READ, Op.WRITE, Op.READ):
            h = a.transfer(peer, op, [((loc, 0, 1 << 16), (r, 0, 1 << 16))],
                           notify=op.value.encode())
            assert h.done() and h.status is TransferStatus.DONE
            assert h.wait(0) is TransferStatus.DONE and h.wait() is TransferStatus.DONE
            with h:
                pass
            h.release()
            assert h.status is TransferStatus.DONE
            assert b.next_notification(30) == Notification("a", op.value.encode())
        assert (buf == src).all()
        other = b.register(np.ones(64, np.uint8), name="other", expose_to=ALL_PEERS)
        peer = a.refresh(peer)
        b.unexpose(other)  # what a knows is stale now: b refuses
        h = a.transfer(peer, Op.READ, [((loc, 0, 16), (peer.info.region("other"), 0, 16))],
                       notify=b"no")
        assert h.done() and h.status is TransferStatus.FAILED
        with pytest.raises(RemoteAccessError):
            h.wait(30)
        assert b.next_notification(0.2) is None
        h = a.transfer(peer, Op.READ, [((loc, 0, 8), (r, 8, 8))])  # the link still works
        assert h.done() and h.wait(30) is TransferStatus.DONE
        assert (buf[:8] == src[8:16]).all()


@pytest.mark.parametrize("op", [Op.READ, Op.WRITE])
def test_a_stalled_peer_does_not_hold_up_the_call(op: Op) -> None:
    """A transfer started in the caller's thread on a peer that stopped answering: a worker
    thread takes it over, ``transfer`` returns a pending handle, which can be released
    (CANCELLED); the link works again once the peer does."""
    from kvbm.testing.transport_sides import ProcessSide, cancel_while_paused

    side = ProcessSide("stopped", cfg(), PEER)
    try:
        side.register("r", 1 << 20, seed=3)
        with Agent("a", cfg()) as a:
            peer = a.connect(*side.address)
            r = peer.info.region("r")
            loc = a.register(np.zeros(1 << 20, np.uint8))
            a.transfer(peer, Op.READ, [((loc, 0, 8), (r, 0, 8))]).wait(30)
            cancel_while_paused(side, lambda: a.transfer(
                peer, op, [((loc, 0, 1 << 20), (r, 0, 1 << 20))]))
            a.transfer(peer, Op.READ, [((loc, 0, 4096), (r, 0, 4096))]).wait(30)
            assert loc.view(0, 4096) == side.read("r", 0, 4096)
    finally:
        side.close()

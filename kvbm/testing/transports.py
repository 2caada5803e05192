"""Conformance suite of the transport backends (:mod:`kvbm.transports`).

A backend's test module subclasses :class:`TransportTests` once per way of running the
serving agent, and inherits every test::

    PEER = Path(__file__).with_name("transport_peer.py")

    class TestTcpThreads(TransportTests):
        backend = "tcp"                      # required on every transfer
        mode = PeerMode.THREAD               # serving agent in this process

    class TestTcpProcesses(TransportTests):
        backend = "tcp"
        mode = PeerMode.PROCESS              # serving agent in a process of its own
        peer_script = PEER

A backend that needs another one for its control path sets ``backends = "ucx,tcp"``; a
subclass may change any setting through :meth:`TransportTests.config`. Tests that need to
pause the serving agent (a slow peer) skip in THREAD mode.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest

from kvbm.errors import (
    InvalidArgumentError,
    RemoteAccessError,
)
from kvbm.testing.transport_faults import FaultTests
from kvbm.testing.transport_sides import MiB, PeerMode, Side, pattern
from kvbm.transports import (
    Access,
    Agent,
    Desc,
    Op,
    TransferStatus,
)


class TransportTests(FaultTests):
    """Base class of every backend's conformance tests; see the module docstring."""

    # -- reads and writes ----------------------------------------------------------------------
    def test_read_sizes(self, agent: Agent, side: Side) -> None:
        big = max(self.sizes) + 100
        side.register("src", big, seed=1)
        peer = self.connect(agent, side)
        src = peer.info.region("src")
        buf, loc = self.local(agent, big)
        for i, n in enumerate(self.sizes):
            roff, loff = (i * 13) % 100, (i * 29) % 100
            with agent.transfer(peer, Op.READ, [((loc, loff, n), (src, roff, n))]) as h:
                assert h.wait(30) is TransferStatus.DONE
                assert h.backend == self.backend
            assert buf[loff:loff + n].tobytes() == side.read("src", roff, n), n

    def test_write_sizes(self, agent: Agent, side: Side) -> None:
        big = max(self.sizes) + 100
        side.register("dst", big, seed=2)
        peer = self.connect(agent, side)
        dst = peer.info.region("dst")
        buf = pattern(3, big)
        loc = agent.register(buf)
        for i, n in enumerate(self.sizes):
            roff, loff = (i * 17) % 100, (i * 31) % 100
            before = side.read("dst", 0, big)
            agent.transfer(peer, Op.WRITE, [((loc, loff, n), (dst, roff, n))]).wait(30)
            after = side.read("dst", 0, big)
            assert after[roff:roff + n] == buf[loff:loff + n].tobytes(), n
            assert after[:roff] == before[:roff] and after[roff + n:] == before[roff + n:]

    def test_many_descriptors(self, agent: Agent, side: Side) -> None:
        size, n = 4 * MiB, 600
        side.register("r", size, seed=4)
        peer = self.connect(agent, side)
        r = peer.info.region("r")
        rng = np.random.default_rng(5)
        # non-overlapping slots of 4 KiB, some lengths short, local order shuffled
        rslots = rng.permutation(size // 4096)[:n]
        lslots = rng.permutation(size // 4096)[:n]
        lens = rng.integers(1, 4097, n)
        buf, loc = self.local(agent, size, fill=0xAA)
        descs = [Desc(loc, int(ls) * 4096, r, int(rs) * 4096, int(k))
                 for ls, rs, k in zip(lslots, rslots, lens, strict=True)]
        agent.transfer(peer, Op.READ, descs).wait(30)
        for d in descs[:: 7]:
            assert (buf[d.local_offset:d.local_offset + d.length].tobytes()
                    == side.read("r", d.remote_offset, d.length))
        buf[:] = pattern(6, size)
        agent.transfer(peer, Op.WRITE, descs).wait(30)
        for d in descs[:: 7]:
            assert (side.read("r", d.remote_offset, d.length)
                    == buf[d.local_offset:d.local_offset + d.length].tobytes())

    def test_adjacent_descriptors_and_forms(self, agent: Agent, side: Side) -> None:
        side.register("r", 64 * 1024, seed=7)
        peer = self.connect(agent, side)
        r = peer.info.region("r")
        buf, loc = self.local(agent, 64 * 1024)
        # 16 adjacent blocks (merged into one segment), by RemoteRegion, by bare id, by Desc
        descs: list[Any] = [((loc, i * 1024, 1024), (r, i * 1024, 1024)) for i in range(16)]
        descs.append(((loc, 20_000, 100), (r.id, 30_000, 100)))
        descs.append(Desc(loc, 40_000, r, 50_000, 10))
        agent.transfer(peer, Op.READ, descs).wait(30)
        assert buf[:16 * 1024].tobytes() == side.read("r", 0, 16 * 1024)
        assert buf[20_000:20_100].tobytes() == side.read("r", 30_000, 100)
        assert buf[40_000:40_010].tobytes() == side.read("r", 50_000, 10)

    # -- notifications -------------------------------------------------------------------------
    def test_notification_follows_the_data(self, agent: Agent, side: Side) -> None:
        side.register("dst", MiB, seed=8)
        peer = self.connect(agent, side)
        buf = pattern(9, MiB)
        loc = agent.register(buf)
        agent.transfer(peer, Op.WRITE, [((loc, 0, MiB), (peer.info.region("dst"), 0, MiB))],
                       notify=b"req-1 done").wait(30)
        assert self.notes(side, 1, 10.0) == [("client", b"req-1 done")]
        assert side.read("dst", 0, MiB) == buf.tobytes()
        agent.transfer(peer, Op.READ, [((loc, 0, 10), (peer.info.region("dst"), 0, 10))],
                       notify=b"\x00binary\xff").wait(30)
        assert self.notes(side, 1, 10.0) == [("client", b"\x00binary\xff")]

    def test_no_notification_when_refused(self, agent: Agent, side: Side) -> None:
        side.register("r", 4096)
        peer = self.connect(agent, side)
        _, loc = self.local(agent, 4096)
        h = agent.transfer(peer, Op.WRITE, [((loc, 0, 100), (peer.info.region("r").id,
                                                             4000, 100))], notify=b"x")
        with pytest.raises(RemoteAccessError):
            h.wait(30)
        assert self.notes(side, 1, 0.2) == []

    # -- concurrency and lifecycle -------------------------------------------------------------
    def test_concurrent_transfers(self, agent: Agent, side: Side) -> None:
        size, threads, rounds = 2 * MiB, 6, 8
        side.register("r", size, seed=18)
        peer = self.connect(agent, side)
        r = peer.info.region("r")
        expect = side.read("r", 0, size)
        bufs = [self.local(agent, size) for _ in range(threads)]
        errors: list[BaseException] = []

        def work(i: int) -> None:
            buf, loc = bufs[i]
            try:
                for k in range(rounds):
                    n = size >> (k % 4)
                    agent.transfer(peer, Op.READ, [((loc, 0, n), (r, 0, n))]).wait(60)
                    assert buf[:n].tobytes() == expect[:n]
            except BaseException as e:
                errors.append(e)

        ts = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
        for t in ts:
            t.start()
        handles = [agent.transfer(peer, Op.READ, [((bufs[0][1], 0, 4096), (r, 0, 4096))])
                   for _ in range(20)]
        for t in ts:
            t.join(120)
        assert not errors, errors
        assert all(h.wait(60) is TransferStatus.DONE for h in handles)
        st = agent.stats.snapshot().backends[self.backend]
        assert st.transfers == threads * rounds + 20 and st.failed == 0

    def test_handle_lifecycle(self, agent: Agent, side: Side) -> None:
        side.register("r", MiB, seed=19)
        peer = self.connect(agent, side)
        _, loc = self.local(agent, MiB)
        h = agent.transfer(peer, Op.READ, [((loc, 0, MiB), (peer.info.region("r"), 0, MiB))])
        assert h.op is Op.READ and h.nbytes == MiB and h.peer == side.name
        assert h.wait(30) is TransferStatus.DONE and h.done() and h.error is None
        h.cancel()  # too late: nothing changes
        h.release()
        h.release()
        assert h.status is TransferStatus.DONE and self.backend in repr(h)
        with pytest.raises(InvalidArgumentError):
            h.wait(-1)
        with pytest.raises(InvalidArgumentError):
            h.wait(float("nan"))

    def test_metadata_and_stats(self, agent: Agent, side: Side) -> None:
        import msgpack

        side.register("r", 4096, seed=24)
        peer = self.connect(agent, side)
        info = peer.info
        assert info.name == side.name and self.backend in info.backends and info.same_node
        r = info.region("r")
        assert r.length == 4096 and r.meta == {"seed": 24} and r.access is Access.READ_WRITE
        with pytest.raises(KeyError):
            info.region("nope")
        blob = msgpack.unpackb(agent.metadata(), raw=False)  # plain msgpack
        assert blob["agent"] == "client" and self.backend in blob["backends"]
        before = side.stats().get("served_requests", 0)
        _, loc = self.local(agent, 4096)
        agent.transfer(peer, Op.READ, [((loc, 0, 4096), (r, 0, 4096))]).wait(30)
        # One-sided transfers never reach the serving side's threads (only key grants do).
        assert side.stats().get("served_requests", 0) == before + (not self.one_sided)
        assert agent.stats.snapshot().backends[self.backend].bytes == 4096



__all__ = ["PeerMode", "TransportTests"]

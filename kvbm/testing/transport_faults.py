"""The refusals and failures of the transport conformance suite (see
:mod:`kvbm.testing.transports`): the serving side's checks, the requester's own checks,
cancellation, a slow peer, a dead one, a closed agent."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from kvbm.errors import (
    BackendUnavailableError,
    ClosedError,
    InvalidArgumentError,
    RemoteAccessError,
    TransportError,
)
from kvbm.testing.transport_sides import MiB, Side, SuiteBase, pattern
from kvbm.transports import (
    Access,
    Agent,
    Op,
    Peer,
    RegionHandle,
    TransferStatus,
)


class FaultTests(SuiteBase):
    # -- the serving side's checks -------------------------------------------------------------
    def _refused(self, agent: Agent, peer: Peer, op: Op, remote: int, off: int, n: int,
                 loc: RegionHandle) -> None:
        h = agent.transfer(peer, op, [((loc, 0, n), (remote, off, n))])
        with pytest.raises(RemoteAccessError):
            h.wait(30)
        assert h.status is TransferStatus.FAILED and isinstance(h.error, RemoteAccessError)

    def test_out_of_bounds_refused_by_the_server(self, agent: Agent, side: Side) -> None:
        side.register("r", 8192, seed=10)
        peer = self.connect(agent, side)
        rid = peer.info.region("r").id
        buf, loc = self.local(agent, 16384, fill=0x55)
        for off, n in ((8000, 193), (8192, 1), (2**62, 16), (0, 8193)):
            self._refused(agent, peer, Op.READ, rid, off, n, loc)
            self._refused(agent, peer, Op.WRITE, rid, off, n, loc)
        assert (buf == 0x55).all()  # nothing was read
        assert side.read("r", 0, 8192) == pattern(10, 8192).tobytes()  # nothing written
        # the connection is still good
        agent.transfer(peer, Op.READ, [((loc, 0, 8192), (rid, 0, 8192))]).wait(30)
        assert buf[:8192].tobytes() == side.read("r", 0, 8192)

    def test_unknown_and_unexposed_regions(self, agent: Agent, side: Side) -> None:
        side.register("mine", 4096, seed=11)
        hidden = side.register("theirs", 4096, seed=12, expose_to="someone-else")["id"]
        peer = self.connect(agent, side)
        assert [r.name for r in peer.info.regions.values()] == ["mine"]
        buf, loc = self.local(agent, 4096, fill=1)
        for rid in (hidden, 12345, peer.info.region("mine").id ^ 1):
            self._refused(agent, peer, Op.READ, rid, 0, 100, loc)
            self._refused(agent, peer, Op.WRITE, rid, 0, 100, loc)
        assert (buf == 1).all()
        assert side.read("theirs", 0, 4096) == pattern(12, 4096).tobytes()
        assert side.stats()["refused_requests"] >= 6

    def test_access_flags(self, agent: Agent, side: Side) -> None:
        side.register("ro", 4096, seed=13, access=Access.READ.value)
        side.register("wo", 4096, seed=14, access=Access.WRITE.value)
        side.register("const", 4096, seed=15, readonly=True)
        peer = self.connect(agent, side)
        assert peer.info.region("ro").access is Access.READ
        assert peer.info.region("const").access is Access.READ
        _, loc = self.local(agent, 4096)
        for name in ("ro", "const"):
            self._refused(agent, peer, Op.WRITE, peer.info.region(name).id, 0, 10, loc)
            agent.transfer(peer, Op.READ, [((loc, 0, 10), (peer.info.region(name), 0, 10))]
                           ).wait(30)
        self._refused(agent, peer, Op.READ, peer.info.region("wo").id, 0, 10, loc)
        with pytest.raises(InvalidArgumentError):  # known from the metadata: refused here
            agent.transfer(peer, Op.WRITE, [((loc, 0, 10), (peer.info.region("ro"), 0, 10))])

    def test_deregistered_remote_region(self, agent: Agent, side: Side) -> None:
        side.register("gone", 4096, seed=16)
        peer = self.connect(agent, side)
        stale = peer.info.region("gone")
        side.deregister("gone")
        _, loc = self.local(agent, 4096)
        h = agent.transfer(peer, Op.READ, [((loc, 0, 10), (stale, 0, 10))])
        with pytest.raises(RemoteAccessError):
            h.wait(30)
        assert "gone" not in [r.name for r in agent.refresh(peer).info.regions.values()]

    def test_exposure_per_peer(self, side: Side) -> None:
        side.register("for-alice", 4096, seed=17, expose_to="alice")
        with Agent("alice", self.config()) as alice, Agent("bob", self.config()) as bob:
            pa, pb = alice.connect(*side.address), bob.connect(*side.address)
            rid = pa.info.region("for-alice").id
            assert not pb.info.regions
            _, la = self.local(alice, 4096)
            _, lb = self.local(bob, 4096)
            alice.transfer(pa, Op.READ, [((la, 0, 4096), (rid, 0, 4096))]).wait(30)
            self._refused(bob, pb, Op.READ, rid, 0, 4096, lb)
            side.expose("for-alice", to="bob", access=Access.READ.value)
            assert bob.refresh(pb).info.region("for-alice").access is Access.READ
            bob.transfer(pb, Op.READ, [((lb, 0, 4096), (rid, 0, 4096))]).wait(30)

    # -- the requester's own checks ------------------------------------------------------------
    def test_local_checks(self, agent: Agent, side: Side) -> None:
        side.register("r", 4096)
        peer = self.connect(agent, side)
        r = peer.info.region("r")
        buf, loc = self.local(agent, 4096)
        other = Agent("other", self.config())
        foreign = other.register(np.zeros(16, np.uint8))
        other.close()
        bad: list[Any] = [
            [], [((loc, 4000, 200), (r, 0, 200))], [((loc, 0, 10), (r, 4090, 10))],
            [((loc, -1, 10), (r, 0, 10))], [((loc, 0, 0), (r, 0, 0))],
            [((loc, 0, 10), (r, 0, 11))], [((foreign, 0, 10), (r, 0, 10))],
            [((loc, 0, 10.0), (r, 0, 10.0))], [((loc, 0, True), (r, 0, True))],
            [((loc, 0, 10), ("r", 0, 10))], [((loc, 0, 10), (0, 0, 10))], ["junk"],
        ]
        for descs in bad:
            with pytest.raises(InvalidArgumentError):
                agent.transfer(peer, Op.READ, descs)
        with pytest.raises(InvalidArgumentError):
            agent.transfer(peer, "read", [((loc, 0, 10), (r, 0, 10))])  # type: ignore[arg-type]
        with pytest.raises(InvalidArgumentError):
            agent.transfer(peer, Op.READ, [((loc, 0, 10), (r, 0, 10))], notify="str")  # type: ignore[arg-type]
        with pytest.raises(InvalidArgumentError):
            agent.transfer("nobody", Op.READ, [((loc, 0, 10), (r, 0, 10))])
        agent.deregister(loc)
        with pytest.raises((InvalidArgumentError, ClosedError)):
            agent.transfer(peer, Op.READ, [((loc, 0, 10), (r, 0, 10))])
        assert (buf == 0).all()

    def test_required_backend_missing(self, agent: Agent, side: Side) -> None:
        side.register("r", 4096)
        peer = self.connect(agent, side)
        _, loc = self.local(agent, 4096)
        missing = next(n for n in ("nvlink", "ucx", "tcp") if n not in agent.backends)
        with pytest.raises(BackendUnavailableError):
            agent.transfer(peer, Op.READ, [((loc, 0, 10), (peer.info.region("r"), 0, 10))],
                           require=missing)

    def test_cancel_a_stalled_transfer(self, agent: Agent, side: Side) -> None:
        side.register("r", 4 * MiB, seed=20)
        # The stalled transfer goes to a region not used before: a one-sided backend needs
        # the paused peer for its key, as every other backend needs it for each transfer.
        side.register("r2", 4 * MiB, seed=20)
        peer = self.connect(agent, side)
        _, loc = self.local(agent, 4 * MiB)
        whole = [((loc, 0, 4 * MiB), (peer.info.region("r"), 0, 4 * MiB))]
        agent.transfer(peer, Op.READ, whole).wait(30)  # every data connection is open now
        stalled = [((loc, 0, 4 * MiB), (peer.info.region("r2"), 0, 4 * MiB))]
        side.pause()
        try:
            h = agent.transfer(peer, Op.READ, stalled, notify=b"never")
            with pytest.raises(TransportError):
                h.wait(0.2)  # still pending: the peer is stopped
            h.release()  # cancels, waits for the backend to let go
            assert h.status is TransferStatus.CANCELLED
        finally:
            side.resume()
        assert self.notes(side, 1, 0.5) == []
        # the agent goes on working with that peer
        agent.transfer(peer, Op.READ, [((loc, 0, 10), (peer.info.region("r"), 0, 10))]
                       ).wait(30)

    def test_slow_peer_times_out(self, side: Side) -> None:
        side.register("r", 4 * MiB, seed=21)
        side.register("r2", 4 * MiB, seed=21)  # see test_cancel_a_stalled_transfer
        with Agent("impatient", self.config(io_timeout_s=0.5)) as agent:
            peer = self.connect(agent, side)
            _, loc = self.local(agent, 4 * MiB)
            whole = [((loc, 0, 4 * MiB), (peer.info.region("r"), 0, 4 * MiB))]
            agent.transfer(peer, Op.READ, whole).wait(30)
            side.pause()
            try:
                h = agent.transfer(peer, Op.READ, [((loc, 0, 4 * MiB),
                                                    (peer.info.region("r2"), 0, 4 * MiB))])
                with pytest.raises(TransportError):
                    h.wait(60)
                assert h.status is TransferStatus.FAILED
            finally:
                side.resume()

    def test_peer_death_mid_transfer(self, agent: Agent) -> None:
        side = self.make_side("doomed")
        try:
            side.register("r", 8 * MiB, seed=22)
            peer = self.connect(agent, side)
            _, loc = self.local(agent, 8 * MiB)
            handles = [agent.transfer(peer, Op.READ, [((loc, 0, 8 * MiB),
                                                       (peer.info.region("r"), 0, 8 * MiB))])
                       for _ in range(4)]
            side.kill()
            for h in handles:  # each either finished before the kill or failed
                try:
                    h.wait(60)
                except TransportError:
                    assert h.status is TransferStatus.FAILED
            with pytest.raises(TransportError):
                agent.transfer(peer, Op.READ, [((loc, 0, 10), (peer.info.region("r"), 0, 10))]
                               ).wait(60)
        finally:
            side.close()
        # the agent keeps working with other peers
        with self.make_side("survivor") as other:
            other.register("r", 4096, seed=23)
            p2 = self.connect(agent, other)
            agent.transfer(p2, Op.READ, [((loc, 0, 4096), (p2.info.region("r"), 0, 4096))]
                           ).wait(30)

    def test_closed_agent(self, side: Side) -> None:
        side.register("r", 4096)
        a = Agent("short-lived", self.config())
        peer = self.connect(a, side)
        _, loc = self.local(a, 4096)
        a.close()
        a.close()
        with pytest.raises(ClosedError):
            a.transfer(peer, Op.READ, [((loc, 0, 10), (peer.info.region("r"), 0, 10))])
        with pytest.raises(ClosedError):
            a.register(np.zeros(4, np.uint8))



"""The ucx backend's one-sided mode (``transport.ucx_rma``): what differs from the serving
side's checks (the conformance suite runs in this mode too, in test_transport_ucx.py):
keys only for exposed host regions, the requester's range checks, revocation when a region
goes or its exposure changes, both agents must opt in, a stalled key request does not
hold up the call."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kvbm.errors import RemoteAccessError, TransportError
from kvbm.testing.transport_sides import ProcessSide, cancel_while_paused
from kvbm.transports import (
    ALL_PEERS,
    Access,
    Agent,
    Op,
    TransferHandle,
    TransferStatus,
    TransportConfig,
)

if importlib.util.find_spec("ucxx") is None:
    pytest.skip("the ucx backend needs ucxx (kvtier[ucx])", allow_module_level=True)

PEER = Path(__file__).with_name("transport_peer.py")
SECRET = "kvbm-ucx-rma-test-secret-0123456789"
MiB = 1 << 20


@pytest.fixture(autouse=True)
def _loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UCX_NET_DEVICES", "lo")
    monkeypatch.setenv("UCX_WARN_UNUSED_ENV_VARS", "n")


def _cfg(rma: bool = True, **over: object) -> TransportConfig:
    return TransportConfig(secret=SECRET, backends="ucx", require="ucx", io_timeout_s=10.0,
                           ucx_rma=rma, **over)  # type: ignore[arg-type]


@pytest.fixture
def pair() -> Iterator[tuple[Agent, Agent]]:
    with Agent("client", _cfg()) as a, Agent("server", _cfg()) as b:
        yield a, b


def _served(agent: Agent) -> int:
    return agent.stats.snapshot().events.get("served_requests", 0)


def _granted(agent: Agent) -> int:
    return agent.stats.snapshot().events.get("rma_keys_granted", 0)


def test_transfers_bypass_the_serving_side(pair: tuple[Agent, Agent]) -> None:
    a, b = pair
    src = np.arange(MiB, dtype=np.uint8)
    b.register(src, name="src", expose_to=ALL_PEERS)
    peer = a.connect(*b.address)
    dst = np.zeros(MiB, np.uint8)
    loc = a.register(dst)
    r = peer.info.region("src")
    for _ in range(3):
        with a.transfer(peer, Op.READ, [((loc, 0, MiB), (r, 0, MiB))]) as h:
            assert h.wait(30) is TransferStatus.DONE and h.backend == "ucx"
    assert np.array_equal(dst, src)
    dst[:] = 9
    a.transfer(peer, Op.WRITE, [((loc, 100, 1000), (r, 5000, 1000))]).wait(30)
    assert (src[5000:6000] == 9).all() and src[4999] == 4999 % 256
    # one key, asked once; no request ever reached the serving threads
    assert _granted(b) == 1 and _served(b) == 0


def test_the_requester_checks_every_range_before_anything_moves(
        pair: tuple[Agent, Agent]) -> None:
    a, b = pair
    remote = np.full(64 << 10, 5, np.uint8)
    b.register(remote, name="r", expose_to=ALL_PEERS)
    ro = np.full(4096, 6, np.uint8)
    b.register(ro, name="ro", expose_to=ALL_PEERS, access=Access.READ)
    peer = a.connect(*b.address)
    r, rro = peer.info.region("r"), peer.info.region("ro")
    buf = np.full(64 << 10, 1, np.uint8)
    loc = a.register(buf)
    # the last range runs past the region: the first two must not move either
    bad = [((loc, 0, 100), (r, 0, 100)), ((loc, 200, 100), (r, 200, 100)),
           ((loc, 400, 200), (r.id, (64 << 10) - 100, 200))]
    for op in (Op.WRITE, Op.READ):
        with pytest.raises(RemoteAccessError, match="outside"):
            a.transfer(peer, op, bad).wait(30)
    assert (remote == 5).all() and (buf == 1).all()
    with pytest.raises(RemoteAccessError, match=r"(?i)write"):  # by bare id: unchecked here
        a.transfer(peer, Op.WRITE, [((loc, 0, 10), (rro.id, 0, 10))]).wait(30)
    assert (ro == 6).all()
    a.transfer(peer, Op.READ, [((loc, 0, 10), (rro, 0, 10))]).wait(30)  # the link goes on
    assert (buf[:10] == 6).all()


def test_keys_only_for_regions_exposed_to_that_peer(pair: tuple[Agent, Agent]) -> None:
    a, b = pair
    mine = b.register(np.zeros(4096, np.uint8), name="theirs", expose_to="someone-else")
    peer = a.connect(*b.address)
    loc = a.register(np.zeros(4096, np.uint8))
    with pytest.raises(RemoteAccessError, match="not registered"):
        a.transfer(peer, Op.READ, [((loc, 0, 10), (mine.id, 0, 10))]).wait(30)
    assert _granted(b) == 0 and b.stats.snapshot().events.get("refused_requests") == 1


def test_a_deregistered_region_is_revoked(pair: tuple[Agent, Agent]) -> None:
    a, b = pair
    old = np.full(MiB, 3, np.uint8)
    h = b.register(old, name="old", expose_to=ALL_PEERS)
    peer = a.connect(*b.address)
    r = peer.info.region("old")
    buf = np.full(MiB, 8, np.uint8)
    loc = a.register(buf)
    a.transfer(peer, Op.READ, [((loc, 0, 10), (r, 0, 10))]).wait(30)
    assert (buf[:10] == 3).all()
    b.deregister(h)
    buf[:] = 8
    for op in (Op.WRITE, Op.READ):
        with pytest.raises(RemoteAccessError):
            a.transfer(peer, op, [((loc, 0, MiB), (r, 0, MiB))]).wait(30)
    assert (old == 3).all() and (buf == 8).all()
    # a new region on the same links works
    new = np.full(4096, 4, np.uint8)
    b.register(new, name="new", expose_to=ALL_PEERS)
    peer = a.refresh(peer)
    a.transfer(peer, Op.READ, [((loc, 0, 4096), (peer.info.region("new"), 0, 4096))]).wait(30)
    assert (buf[:4096] == 4).all()


def test_exposure_changes_revoke_keys(pair: tuple[Agent, Agent]) -> None:
    a, b = pair
    mem = np.full(4096, 2, np.uint8)
    h = b.register(mem, name="m", expose_to="client")
    peer = a.connect(*b.address)
    r = peer.info.region("m")
    buf = np.full(4096, 7, np.uint8)
    loc = a.register(buf)
    a.transfer(peer, Op.WRITE, [((loc, 0, 10), (r, 0, 10))]).wait(30)
    assert (mem[:10] == 7).all()
    b.expose(h, "client", Access.READ)  # writing no more: the key goes, a new one is asked
    with pytest.raises(RemoteAccessError, match=r"(?i)write"):
        a.transfer(peer, Op.WRITE, [((loc, 0, 100), (r.id, 100, 100))]).wait(30)
    assert (mem[100:200] == 2).all()
    a.transfer(peer, Op.READ, [((loc, 0, 100), (r, 100, 100))]).wait(30)
    assert (buf[:100] == 2).all()
    b.unexpose(h, "client")
    with pytest.raises(RemoteAccessError):
        a.transfer(peer, Op.READ, [((loc, 0, 100), (r, 0, 100))]).wait(30)
    assert _granted(b) == 2


@pytest.mark.parametrize(("client_rma", "server_rma"), [(True, False), (False, True)])
def test_both_agents_must_opt_in(client_rma: bool, server_rma: bool) -> None:
    with Agent("client", _cfg(client_rma)) as a, Agent("server", _cfg(server_rma)) as b:
        src = np.arange(4096, dtype=np.uint8)
        b.register(src, name="src", expose_to=ALL_PEERS)
        peer = a.connect(*b.address)
        dst = np.zeros(4096, np.uint8)
        a.transfer(peer, Op.READ, [((a.register(dst), 0, 4096),
                                    (peer.info.region("src"), 0, 4096))]).wait(30)
        assert np.array_equal(dst, src)
        assert _served(b) == 1 and _granted(b) == 0  # two-sided: the server checked it


def test_a_stalled_key_request_does_not_hold_up_the_call() -> None:
    side = ProcessSide("stopped", _cfg(), PEER)
    try:
        side.register("r", MiB, seed=3)
        side.register("later", MiB, seed=4)
        with Agent("a", _cfg()) as a:
            peer = a.connect(*side.address)
            loc = a.register(np.zeros(MiB, np.uint8))
            a.transfer(peer, Op.READ, [((loc, 0, 8), (peer.info.region("r"), 0, 8))]).wait(30)

            def start() -> TransferHandle:
                # a key held already needs no peer: one-sided reads go on meanwhile
                a.transfer(peer, Op.READ, [((loc, 0, 4096), (peer.info.region("r"), 0, 4096))]
                           ).wait(30)
                # "later" has no key yet: the paused peer must grant it
                return a.transfer(peer, Op.READ, [((loc, 0, MiB),
                                                   (peer.info.region("later"), 0, MiB))])

            cancel_while_paused(side, start)
            assert loc.view(0, 4096) == side.read("r", 0, 4096)
            a.transfer(peer, Op.READ, [((loc, 0, MiB), (peer.info.region("later"), 0, MiB))]
                       ).wait(30)
            assert loc.view(0, MiB) == side.read("later", 0, MiB)
    finally:
        side.close()


def test_the_setting_is_validated() -> None:
    from kvbm.errors import ConfigError

    with pytest.raises(ConfigError, match="ucx_rma"):
        TransportConfig(secret=SECRET, ucx_rma="yes")  # type: ignore[arg-type]
    assert TransportConfig.from_env({"KVBM_TRANSPORT_UCX_RMA": "true"}).ucx_rma is True


def test_a_revocation_waiting_on_the_socket_does_not_break_a_two_sided_transfer(
        pair: tuple[Agent, Agent], monkeypatch: pytest.MonkeyPatch) -> None:
    """Device memory goes two-sided on a one-sided link (needs CUDA: stood in for here by
    holding every transfer two-sided after the first); a revocation that reached the link
    meanwhile is applied, not taken for the peer's answer."""
    from kvbm.transports import ucx_client

    a, b = pair
    gone = b.register(np.full(4096, 1, np.uint8), name="gone", expose_to=ALL_PEERS)
    kept = np.full(4096, 2, np.uint8)
    b.register(kept, name="kept", expose_to=ALL_PEERS)
    peer = a.connect(*b.address)
    buf = np.zeros(4096, np.uint8)
    loc = a.register(buf)
    a.transfer(peer, Op.READ, [((loc, 0, 10), (peer.info.region("gone"), 0, 10))]).wait(30)
    b.deregister(gone)  # its revocation now waits on the link's socket
    monkeypatch.setattr(ucx_client, "_one_sided", lambda *_: False)
    served = _served(b)
    for op in (Op.READ, Op.WRITE):
        a.transfer(peer, op, [((loc, 0, 4096), (peer.info.region("kept"), 0, 4096))]).wait(30)
    assert (buf == 2).all() and (kept == 2).all() and _served(b) == served + 2


def test_keys_of_another_layout_are_refused_unread() -> None:
    """UCX unpacks a key without bounds checks (random bytes crash it): a peer's key must
    have the layout of this process's own; random, truncated and altered keys do not."""
    from kvbm.transports import ucx_io, ucx_rma

    like = ucx_rma.template(ucx_io.context({"NET_DEVICES": "lo"}, True))
    ucx_rma.verify(like, like)
    rng = np.random.default_rng(0)
    bad = [b"", like[:-1], like + b"\x00", b"\xff" * 200]
    bad += [rng.integers(0, 256, int(rng.integers(1, 300)), dtype=np.uint8).tobytes()
            for _ in range(2000)]
    for _ in range(2000):
        b = bytearray(like)
        b[int(rng.integers(0, len(b)))] ^= int(rng.integers(1, 256))
        bad.append(bytes(b))
    for b in bad:
        if b == like:
            continue
        with pytest.raises(TransportError, match="layout"):
            ucx_rma.verify(b, like)


def test_a_peer_whose_keys_do_not_verify_gets_two_sided_transfers(
        pair: tuple[Agent, Agent], monkeypatch: pytest.MonkeyPatch) -> None:
    from kvbm.transports import ucx_rma

    a, b = pair
    # this side's UCX "packs" keys of another layout than the peer's: none verifies
    monkeypatch.setattr(ucx_rma, "template", lambda _ctx: b"\x02" + bytes(7) + b"\x00\x00")
    src = np.arange(4096, dtype=np.uint8)
    h = b.register(src, name="src", expose_to=ALL_PEERS)
    other = np.full(4096, 3, np.uint8)
    b.register(other, name="other", expose_to=ALL_PEERS)
    peer = a.connect(*b.address)
    dst = np.zeros(4096, np.uint8)
    loc = a.register(dst)
    a.transfer(peer, Op.READ, [((loc, 0, 4096), (peer.info.region("src"), 0, 4096))]).wait(30)
    assert np.array_equal(dst, src) and _served(b) == 1 and _granted(b) == 1
    b.deregister(h)  # the granted (unused) key is revoked on the now two-sided link
    a.transfer(peer, Op.READ, [((loc, 0, 4096), (peer.info.region("other"), 0, 4096))]
               ).wait(30)
    assert (dst == 3).all() and _served(b) == 2


def test_a_peer_that_cannot_grant_keys_serves_two_sided(
        pair: tuple[Agent, Agent], monkeypatch: pytest.MonkeyPatch) -> None:
    from kvbm.transports import ucx_rma

    def refuse(*_: object) -> None:
        raise TransportError("ucx: ucp_mem_map failed (status -3)")

    a, b = pair
    monkeypatch.setattr(ucx_rma.Mapping, "__init__", refuse)  # the serving side's UCX
    src = np.arange(4096, dtype=np.uint8)
    b.register(src, name="src", expose_to=ALL_PEERS)
    peer = a.connect(*b.address)
    dst = np.zeros(4096, np.uint8)
    loc = a.register(dst)
    for _ in range(2):
        a.transfer(peer, Op.READ, [((loc, 0, 4096), (peer.info.region("src"), 0, 4096))]
                   ).wait(30)
    assert np.array_equal(dst, src) and _served(b) == 2 and _granted(b) == 0


def test_a_revocation_right_after_a_grant_is_applied_before_the_keys_are_used(
        pair: tuple[Agent, Agent], monkeypatch: pytest.MonkeyPatch) -> None:
    """The serving side revokes a key the requester holds just after answering a key
    request (as a deregistration or exposure change racing the grant would): the
    requester applies it before moving anything and asks for that key again."""
    from kvbm.transports.ucx import UcxBackend

    a, b = pair
    first = np.full(4096, 1, np.uint8)
    b.register(first, name="first", expose_to=ALL_PEERS)
    second = np.full(4096, 2, np.uint8)
    b.register(second, name="second", expose_to=ALL_PEERS)
    peer = a.connect(*b.address)
    r1, r2 = peer.info.region("first"), peer.info.region("second")
    buf = np.zeros(8192, np.uint8)
    loc = a.register(buf)
    a.transfer(peer, Op.READ, [((loc, 0, 4096), (r1, 0, 4096))]).wait(30)
    grant = UcxBackend._grant

    def grant_then_revoke(self: UcxBackend, served: Any, rids: list[int]) -> None:
        grant(self, served, rids)
        if r2.id in rids:
            with self._grant_lock:
                served.revoke(r1.id)

    monkeypatch.setattr(UcxBackend, "_grant", grant_then_revoke)
    a.transfer(peer, Op.READ, [((loc, 0, 4096), (r1, 0, 4096)),
                               ((loc, 4096, 4096), (r2, 0, 4096))]).wait(30)
    assert (buf[:4096] == 1).all() and (buf[4096:] == 2).all()
    assert _granted(b) == 3  # first, second, first again

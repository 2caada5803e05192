"""Path selection (kvbm.transports.select): the intersection of both agents' backends,
nvlink > ucx > tcp, ``require`` as an error instead of a fallback, and the choice visible
on the handle, in the counters, in the log and through ``explain``."""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from kvbm.errors import BackendUnavailableError
from kvbm.transports import Agent, Op, TransportConfig
from kvbm.transports.metadata import parse
from kvbm.transports.select import choose, common, explain, options

SECRET = "kvbm-select-test-secret-0123456789"
HAS_UCX = importlib.util.find_spec("ucxx") is not None
needs_ucx = pytest.mark.skipif(not HAS_UCX, reason="needs ucxx (kvtier[ucx])")


@pytest.fixture(autouse=True)
def _loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UCX_NET_DEVICES", "lo")


def cfg(backends: str) -> TransportConfig:
    return TransportConfig(secret=SECRET, backends=backends, io_timeout_s=10.0)


@pytest.fixture
def pair() -> Iterator[tuple[Agent, Agent]]:
    backends = "ucx,tcp" if HAS_UCX else "tcp"
    with Agent("decode", cfg(backends)) as a, Agent("prefill", cfg(backends)) as b:
        yield a, b


def claimed_peer(agent: Agent, *, ucx_cuda: bool, backends: tuple[str, ...] = ("ucx", "tcp")
                 ) -> Any:
    """A peer's metadata (through the real parser) claiming one CUDA region."""
    meta = agent.metadata_for("x")
    meta["agent"] = "gpu-peer"
    meta["backends"] = {n: ({"cuda": ucx_cuda} if n == "ucx" else {}) for n in backends}
    meta["regions"] = [{"id": 77, "name": "kv", "length": 4096, "device": "cuda",
                        "access": 3, "meta": {}, "backends": {}}]
    return parse(meta)


def segments(agent: Agent, n: int = 64) -> list[Any]:
    from kvbm.transports.descriptors import check_descriptors

    loc = agent.register(np.zeros(n, np.uint8))
    return check_descriptors(Op.READ, [((loc, 0, n), (77, 0, n))],
                             is_local=lambda r: r is loc)


def test_intersection_in_preference_order(pair: tuple[Agent, Agent]) -> None:
    a, b = pair
    p = a.connect(*b.address)
    assert common(a.backends, p.info) == [n for n in ("nvlink", "ucx", "tcp")
                                          if n in a.backends]
    with Agent("tcp-only", cfg("tcp")) as c:
        assert common(a.backends, a.connect(*c.address).info) == ["tcp"]


@needs_ucx
def test_best_common_backend_is_chosen_and_visible(pair: tuple[Agent, Agent],
                                                   caplog: pytest.LogCaptureFixture) -> None:
    a, b = pair
    src = b.register(np.arange(4096, dtype=np.uint8), name="src", expose_to="*")
    p = a.connect(*b.address)
    loc = a.register(np.zeros(4096, np.uint8))
    descs = [((loc, 0, 4096), (p.info.region("src"), 0, 4096))]
    opts = explain(a, p, Op.READ, descs)
    assert [o.backend for o in opts] == ["nvlink", "ucx", "tcp"]
    assert [o.backend for o in opts if o.chosen] == ["ucx"]
    assert opts[0].reason and not opts[0].usable  # no CUDA here: why nvlink is out
    with caplog.at_level(logging.INFO, logger="kvbm.transports.agent"), \
            a.transfer(p, Op.READ, descs) as h:
        h.wait(30)
    assert h.backend == "ucx" and src.id
    assert "go through ucx" in caplog.text
    snap = a.stats.snapshot()
    assert snap.backends["ucx"].transfers == 1 and "tcp" not in snap.backends
    # required: tcp although ucx is better; explain says so too
    assert [o.backend for o in explain(a, p, Op.READ, descs, require="tcp") if o.chosen] == [
        "tcp"]
    a.transfer(p, Op.READ, descs, require="tcp").wait(30)
    assert a.stats.snapshot().backends["tcp"].transfers == 1


def test_smaller_intersection_is_no_fallback(pair: tuple[Agent, Agent]) -> None:
    a, _ = pair
    with Agent("tcp-only", cfg("tcp")) as c:
        c.register(np.zeros(64, np.uint8), name="r", expose_to="*")
        p = a.connect(*c.address)
        loc = a.register(np.zeros(64, np.uint8))
        with a.transfer(p, Op.READ, [((loc, 0, 64), (p.info.region("r"), 0, 64))]) as h:
            h.wait(30)
        assert h.backend == "tcp"
        assert "path_fallbacks" not in a.stats.snapshot().events
        if HAS_UCX:
            with pytest.raises(BackendUnavailableError, match="ucx: tcp-only does not run it"):
                a.transfer(p, Op.READ, [((loc, 0, 64), (p.info.region("r"), 0, 64))],
                           require="ucx")


@needs_ucx
def test_fallback_is_counted_and_logged(pair: tuple[Agent, Agent],
                                        caplog: pytest.LogCaptureFixture) -> None:
    a, _ = pair
    peer = claimed_peer(a, ucx_cuda=False)
    segs = segments(a)
    counted: list[tuple[str, int]] = []
    with caplog.at_level(logging.INFO, logger="kvbm.transports.select"):
        got = choose(a.backends, peer, Op.READ, segs, None,
                     count=lambda e, n: counted.append((e, n)))
    assert got.name == "tcp" and counted == [("path_fallbacks", 1)]
    assert "fall back to tcp" in caplog.text and "cannot reach its CUDA memory" in caplog.text
    # the same peer with CUDA-capable UCX: ucx carries it, nothing counted
    counted.clear()
    assert choose(a.backends, claimed_peer(a, ucx_cuda=True), Op.READ, segs, None,
                  count=lambda e, n: counted.append((e, n))).name == "ucx"
    assert counted == []
    opts = options(a.backends, peer, Op.READ, segs)
    assert {o.backend: (o.usable, o.chosen) for o in opts} == {
        "nvlink": (False, False), "ucx": (False, False), "tcp": (True, True)}


@needs_ucx
def test_require_is_an_error_not_a_fallback(pair: tuple[Agent, Agent]) -> None:
    a, _ = pair
    peer = claimed_peer(a, ucx_cuda=False)
    segs = segments(a)
    with pytest.raises(BackendUnavailableError, match="ucx: gpu-peer's UCX cannot reach"):
        choose(a.backends, peer, Op.READ, segs, "ucx")
    with pytest.raises(BackendUnavailableError, match="nvlink: not running on this agent"):
        choose(a.backends, peer, Op.READ, segs, "nvlink")
    with pytest.raises(BackendUnavailableError, match="tcp: gpu-peer does not run it"):
        choose(a.backends, claimed_peer(a, ucx_cuda=False, backends=("ucx",)), Op.READ, segs,
               "tcp")
    assert choose(a.backends, peer, Op.READ, segs, "tcp").name == "tcp"


def test_no_common_backend(pair: tuple[Agent, Agent]) -> None:
    a, _ = pair
    peer = claimed_peer(a, ucx_cuda=False, backends=("nvlink",))
    with pytest.raises(BackendUnavailableError, match="no path to gpu-peer with a backend"):
        choose(a.backends, peer, Op.READ, segments(a), None)


def test_agent_counts_fallbacks_through_select(pair: tuple[Agent, Agent]) -> None:
    # The agent's own choice goes through kvbm.transports.select (its fallback counter).
    import kvbm.transports.agent as agent_mod
    import kvbm.transports.select as select_mod

    assert agent_mod.choose is select_mod.choose

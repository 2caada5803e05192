"""The nvlink transport backend (CUDA IPC): two processes on one GPU, device<->device and
device<->host in both directions, checked byte for byte against a plain ``copy_`` of the
same bytes; the serving side's checks; the path chosen over ucx and tcp. Marked ``gpu``
(skipped without CUDA). Without CUDA: the backend says why it cannot run and is not
advertised (those tests run everywhere)."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from kvbm.config import config_to_dict
from kvbm.errors import BackendUnavailableError, RemoteAccessError
from kvbm.transports import Agent, Op, TransferStatus, TransportConfig, available_backends

SECRET = "kvbm-nvlink-test-secret-0123456789"
MiB = 1 << 20
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")


def config(backends: str = "nvlink,tcp") -> TransportConfig:
    return TransportConfig(secret=SECRET, backends=backends, io_timeout_s=30.0)


class Peer:
    """The serving agent (``prefill``) in a process of its own (kvbm.testing.nvlink_peer)."""

    def __init__(self, cfg: TransportConfig) -> None:
        self._p = subprocess.Popen([sys.executable, "-m", "kvbm.testing.nvlink_peer",
                                    json.dumps(config_to_dict(cfg))],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        host, port = self.call("address")
        self.address = (str(host), int(port))

    def call(self, cmd: str, **kw: Any) -> Any:
        assert self._p.stdin is not None and self._p.stdout is not None
        self._p.stdin.write(json.dumps({"cmd": cmd, **kw}) + "\n")
        self._p.stdin.flush()
        line = self._p.stdout.readline()
        if not line:
            raise RuntimeError(f"nvlink peer exited ({self._p.poll()})")
        return json.loads(line)["ok"]

    def read(self, name: str, offset: int, length: int) -> bytes:
        return base64.b64decode(self.call("read", name=name, offset=offset, length=length))

    def close(self) -> None:
        if self._p.stdin is not None:
            self._p.stdin.close()
        try:
            self._p.wait(30)
        except subprocess.TimeoutExpired:
            self._p.kill()
            self._p.wait(30)


@pytest.fixture
def peer() -> Iterator[Peer]:
    p = Peer(config())
    try:
        yield p
    finally:
        p.close()


def _pattern(seed: int, n: int) -> torch.Tensor:
    return torch.randint(0, 256, (n,), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


# -- without CUDA ------------------------------------------------------------------------------
@pytest.mark.skipif(CUDA, reason="CUDA is present: the backend runs (the gpu tests cover it)")
def test_unavailable_without_cuda() -> None:
    why = available_backends(["nvlink"])["nvlink"]
    assert isinstance(why, str) and why  # a reason, not a class
    with Agent("cpu-only", config("auto")) as a, Agent("other", config("auto")) as b:
        assert "nvlink" not in a.backends
        meta = a.metadata_for(b.name)
        assert "nvlink" not in meta["backends"] and "tcp" in meta["backends"]
        p = b.connect(*a.address)
        region = a.register(np.zeros(64, np.uint8), name="r", expose_to="*")
        local = b.register(np.zeros(64, np.uint8))
        with pytest.raises(BackendUnavailableError, match="nvlink"):
            b.transfer(p, Op.READ, [((local, 0, 8), (b.refresh(p).info.region("r"), 0, 8))],
                       require="nvlink")
        assert region.id  # the region stays usable by the other backends


# -- two processes on one GPU ----------------------------------------------------------------
@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("remote_device", ["cuda", "cpu"])
def test_read_and_write_against_copy(peer: Peer, remote_device: str) -> None:
    size = 8 * MiB + 5
    peer.call("register", name="kv", size=size, device=remote_device, seed=1)
    with Agent("decode", config()) as agent:
        p = agent.connect(*peer.address)
        remote = p.info.region("kv")
        local = torch.zeros(size, dtype=torch.uint8, device="cuda")
        loc = agent.register(local)
        # READ: device <- device (or host), several ranges, odd offsets and lengths
        descs = [((loc, 3, MiB), (remote, 100, MiB)), ((loc, 2 * MiB, 7), (remote, 11, 7)),
                 ((loc, 4 * MiB, 4 * MiB + 5), (remote, 4 * MiB, 4 * MiB + 5))]
        with agent.transfer(p, Op.READ, descs) as h:
            assert h.wait(60) is TransferStatus.DONE and h.backend == "nvlink"
        expect = torch.zeros(size, dtype=torch.uint8, device="cuda")
        src = _pattern(1, size).to("cuda")
        for (_, lo, n), (_, ro, _) in descs:
            expect[lo:lo + n].copy_(src[ro:ro + n])  # the plain copy_ of the same bytes
        torch.cuda.synchronize()
        assert torch.equal(local, expect)
        # WRITE: device -> device (or host); the rest of the remote region is untouched
        local.copy_(_pattern(2, size).to("cuda"))
        agent.transfer(p, Op.WRITE, [((loc, 10, 3 * MiB), (remote, 20, 3 * MiB))]).wait(60)
        got = peer.read("kv", 0, size)
        want = bytearray(_pattern(1, size).numpy().tobytes())
        want[20:20 + 3 * MiB] = local[10:10 + 3 * MiB].cpu().numpy().tobytes()
        assert got == bytes(want)
        assert agent.stats.snapshot().backends["nvlink"].bytes == 6 * MiB + 12 + 3 * MiB


@pytest.mark.gpu
@needs_cuda
def test_serving_side_checks_and_selection(peer: Peer) -> None:
    peer.call("register", name="kv", size=MiB, device="cuda", seed=3)
    with Agent("decode", config("auto")) as agent:
        assert "nvlink" in agent.backends
        p = agent.connect(*peer.address)
        rid = p.info.region("kv").id
        local = torch.full((2 * MiB,), 7, dtype=torch.uint8, device="cuda")
        loc = agent.register(local)
        for off, n in ((MiB - 10, 11), (MiB, 1), (0, MiB + 1)):
            for op in (Op.READ, Op.WRITE):
                h = agent.transfer(p, op, [((loc, 0, n), (rid, off, n))])
                with pytest.raises(RemoteAccessError):
                    h.wait(60)
        h = agent.transfer(p, Op.READ, [((loc, 0, 10), (rid ^ 1, 0, 10))])
        with pytest.raises(RemoteAccessError):
            h.wait(60)
        torch.cuda.synchronize()
        assert bool((local == 7).all())  # nothing was written
        assert peer.read("kv", 0, MiB) == _pattern(3, MiB).numpy().tobytes()
        # the best path for device memory on one node: nvlink (over ucx and tcp)
        with agent.transfer(p, Op.READ, [((loc, 0, MiB), (rid, 0, MiB))]) as h:
            h.wait(60)
            assert h.backend == "nvlink"
        # host memory here: nvlink cannot carry it; the next best backend does
        host = agent.register(np.zeros(MiB, np.uint8))
        with agent.transfer(p, Op.READ, [((host, 0, MiB), (rid, 0, MiB))]) as h:
            h.wait(60)
            assert h.backend in ("ucx", "tcp")
        assert agent.stats.snapshot().events["path_fallbacks"] >= 1  # nvlink was passed over
        with pytest.raises(BackendUnavailableError, match="host"):
            agent.transfer(p, Op.READ, [((host, 0, 8), (rid, 0, 8))], require="nvlink")
        assert peer.call("stats")["refused_requests"] >= 7

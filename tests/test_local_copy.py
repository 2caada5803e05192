"""G1/G2 copies in standalone mode (kvbm's own G1) run on a copier, not inline in the
manager's calls: offloads land later, their pages stay held until then, and what reads G2
from the host (the tiers below, the events) waits for the landing.

CPU machines exercise the copy thread (the landing happens whenever the thread gets to it,
so the walks below see copies in flight at arbitrary points); the CUDA side stream runs
where a GPU is present.
"""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from kvbm import (  # noqa: E402
    BlockManager,
    CopyEngine,
    DeviceTierConfig,
    HostTierConfig,
    KVLayout,
    ManagerConfig,
    Medium,
)
from kvbm.config import OffloadConfig  # noqa: E402
from kvbm.errors import ConfigError, PoolExhaustedError  # noqa: E402
from kvbm.events import BlockStored  # noqa: E402
from kvbm.storage.disk import DiskTierConfig  # noqa: E402

BS = 4
LAYOUT = KVLayout(2, 2, 8, BS, "float32")


def tokens_for(family: int, n_blocks: int) -> np.ndarray:
    return np.repeat(np.arange(family * 100, family * 100 + n_blocks, dtype=np.uint32), BS)


def value_of(seq_hash: int) -> float:
    return float(seq_hash % 1_000_003)


def fill(mgr: BlockManager, block: int, value: float) -> None:
    view = mgr.block_view(block)
    for t in view if isinstance(view, list) else [view]:
        t.fill_(value)


def holds_value(mgr: BlockManager, block: int, value: float) -> bool:
    view = mgr.block_view(block)
    return all(bool((t == value).all()) for t in (view if isinstance(view, list) else [view]))


def test_copies_config(tmp_path) -> None:
    assert DeviceTierConfig(4, device="cpu").copies is CopyEngine.AUTO
    assert DeviceTierConfig(4, device="cpu", copies="thread").copies is CopyEngine.THREAD
    with pytest.raises(ConfigError, match="CUDA"):
        DeviceTierConfig(4, device="cpu", copies=CopyEngine.STREAM)
    with pytest.raises(ConfigError, match=r"device\.copies"):
        DeviceTierConfig(4, device="cpu", copies="dma")
    path = tmp_path / "kvbm.toml"
    path.write_text('[device]\nnum_blocks = 4\ndevice = "cpu"\ncopies = "thread"\n')
    cfg = ManagerConfig.from_toml(path, env={})
    assert cfg.device is not None and cfg.device.copies is CopyEngine.THREAD
    cfg = ManagerConfig.from_toml(path, env={"KVBM_DEVICE_COPIES": "inline"})
    assert cfg.device is not None and cfg.device.copies is CopyEngine.INLINE


class _Walk:
    """A seeded random engine: requests over shared prefixes, early releases, explicit
    offloads, flushes. After every step the manager's invariants hold and every page the
    engine holds carries its block's KV."""

    def __init__(self, mgr: BlockManager, seed: int) -> None:
        self.mgr = mgr
        self.rng = random.Random(seed)
        self.holds: Counter[int] = Counter()
        self.requests: list[tuple[list[int], list[int]]] = []

    def request(self) -> None:
        mgr, rng = self.mgr, self.rng
        toks = tokens_for(rng.randrange(6), rng.randrange(1, 6))
        m = mgr.match_prefix(toks)
        try:
            ids = mgr.onboard(m)
        except PoolExhaustedError:
            return
        for b, h in zip(ids, m.hashes.sequence, strict=False):
            assert holds_value(mgr, b, value_of(h)), "onboarded a wrong page"
        try:
            new = mgr.allocate(len(m.hashes) - len(ids))
        except PoolExhaustedError:
            mgr.release(ids)
            return
        for i, b in enumerate(new):
            fill(mgr, b, value_of(m.hashes.sequence[len(ids) + i]))
        final = mgr.commit(new, toks, start_block=len(ids), hashes=m.hashes)
        self.holds.update(ids + final)
        self.requests.append((ids + final, list(m.hashes.sequence)))

    def step(self) -> None:
        rng, mgr = self.rng, self.mgr
        op = rng.random()
        if op < 0.55 or not self.requests:
            self.request()
        elif op < 0.85:
            ids, _ = self.requests.pop(rng.randrange(len(self.requests)))
            mgr.release(ids)
            self.holds.subtract(ids)
        elif op < 0.95:
            mgr.offload()
        else:
            mgr.flush()
        self.check()

    def check(self) -> None:
        mgr = self.mgr
        mgr.check_invariants()
        alloc = mgr.device_pool.allocator
        settled = mgr.stats().copies_in_flight == 0
        for slot in range(alloc.num_slots):
            # a copy in flight holds its source pages as well
            if settled:
                assert alloc.refcount(slot) == self.holds[slot], f"refcount of {slot}"
            else:
                assert alloc.refcount(slot) >= self.holds[slot], f"refcount of {slot}"
        for ids, hashes in self.requests:
            for b, h in zip(ids, hashes[len(hashes) - len(ids):], strict=True):
                assert holds_value(mgr, b, value_of(h)), "held page changed"

    def finish(self) -> None:
        self.mgr.flush()
        assert self.mgr.stats().copies_in_flight == 0
        self.check()
        for ids, _ in self.requests:
            self.mgr.release(ids)
        self.mgr.check_invariants()


@pytest.mark.parametrize("eager", [True, False])
@pytest.mark.parametrize("seed", range(4))
def test_walk_with_copy_thread(seed: int, eager: bool) -> None:
    cfg = ManagerConfig(device=DeviceTierConfig(6, device="cpu", copies="thread"),
                        host=HostTierConfig(8, eager_offload=eager))
    with BlockManager(LAYOUT, cfg) as mgr:
        walk = _Walk(mgr, seed)
        for _ in range(300):
            walk.step()
        walk.finish()


@pytest.mark.parametrize("seed", range(2))
def test_walk_with_copy_thread_and_disk(tmp_path, seed: int) -> None:
    cfg = ManagerConfig(device=DeviceTierConfig(5, device="cpu", copies="thread"),
                        host=HostTierConfig(4, eager_offload=seed == 0),
                        disk=DiskTierConfig(tmp_path / "g3", capacity_bytes=64 << 20,
                                            slab_bytes=1 << 20),
                        offload=OffloadConfig(max_inflight_pages=2))
    with BlockManager(LAYOUT, cfg) as mgr:
        walk = _Walk(mgr, seed)
        for _ in range(200):
            walk.step()
        walk.finish()
        # every block that reached G2 was announced once its copy had landed, and the disk
        # tier received pages with the right KV: served back after G1 and G2 forget them
        stored_host = {h for e in mgr.take_events() if isinstance(e, BlockStored)
                       and e.medium is Medium.CPU_PINNED for h in e.block_hashes}
        assert stored_host
    with BlockManager(LAYOUT, cfg) as mgr:  # a restart: only the disk remains
        toks = tokens_for(0, 5)
        m = mgr.match_prefix(toks)
        ids = mgr.onboard(m)
        for b, h in zip(ids, m.hashes.sequence, strict=False):
            assert holds_value(mgr, b, value_of(h)), "a page the copy thread wrote is wrong"
        mgr.release(ids)


def test_write_back_through_copy_thread_keeps_the_kv() -> None:
    """eager_offload off: G1 victims are written back to G2 as they are evicted; the freed
    G1 page is reused by the next allocation only once its copy has landed."""
    cfg = ManagerConfig(device=DeviceTierConfig(3, device="cpu", copies="thread"),
                        host=HostTierConfig(32, eager_offload=False, admission=None))
    with BlockManager(LAYOUT, cfg) as mgr:
        firsts = []
        for fam in range(6):  # each request evicts the previous ones from G1
            toks = tokens_for(fam, 3)
            m = mgr.match_prefix(toks)
            ids = mgr.allocate(3)
            for b, h in zip(ids, m.hashes.sequence, strict=True):
                fill(mgr, b, value_of(h))
            mgr.release(mgr.commit(ids, toks, hashes=m.hashes))
            firsts.append(m.hashes.sequence)
        for fam, hashes in enumerate(firsts):
            m = mgr.match_prefix(tokens_for(fam, 3))
            assert m.num_blocks == 3
            ids = mgr.onboard(m)
            assert [holds_value(mgr, b, value_of(h)) for b, h in zip(ids, hashes,
                                                                      strict=True)] == [True] * 3
            mgr.release(ids)
        assert mgr.stats().offloaded_blocks >= 15


@pytest.mark.gpu
def test_cuda_side_stream_round_trip() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    cfg = ManagerConfig(device=DeviceTierConfig(4, device="cuda"),
                        host=HostTierConfig(32, eager_offload=False, admission=None))
    assert cfg.device is not None and cfg.device.copies is CopyEngine.AUTO
    with BlockManager(LAYOUT, cfg) as mgr:
        hashes_of = []
        for fam in range(8):
            toks = tokens_for(fam, 4)
            m = mgr.match_prefix(toks)
            ids = mgr.allocate(4)
            for b, h in zip(ids, m.hashes.sequence, strict=True):
                fill(mgr, b, value_of(h))  # queued on the current stream
            mgr.release(mgr.commit(ids, toks, hashes=m.hashes))
            hashes_of.append(m.hashes.sequence)
        for fam, hashes in enumerate(hashes_of):
            m = mgr.match_prefix(tokens_for(fam, 4))
            ids = mgr.onboard(m)
            # the current stream is ordered after the copies: no synchronize needed here
            ok = [holds_value(mgr, b, value_of(h)) for b, h in zip(ids, hashes, strict=False)]
            assert ok == [True] * len(ids) and len(ids) == 4
            mgr.release(ids)
        mgr.flush()
        assert mgr.stats().copies_in_flight == 0

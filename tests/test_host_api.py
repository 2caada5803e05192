"""The host-level API of a manager whose engine owns G1 (``device = None``): reserve G2 pages,
let a mover write them, commit them; stage a matched prefix in G2 (loading from disk in the
background) for a mover to copy into the engine's memory."""

from __future__ import annotations

import numpy as np
import pytest

from kvbm import BlockManager, BlockStored, HostTierConfig, Medium
from kvbm.config import ManagerConfig
from kvbm.errors import BlockStateError, ConfigError, InvalidKeyError
from kvbm.layout import KVLayout
from kvbm.manager import OnboardStatus
from kvbm.storage.disk import DiskTierConfig

BS = 4
LAYOUT = KVLayout(2, 2, 4, BS, "float32")


def toks(n_blocks: int, base: int = 0) -> np.ndarray:
    return np.arange(base, base + n_blocks * BS, dtype=np.uint32)


def value(seq_hash: int) -> float:
    return float(seq_hash % 999_983)


def cfg(tmp_path=None, g2: int = 8) -> ManagerConfig:
    disk = None if tmp_path is None else DiskTierConfig(
        tmp_path / "g3", capacity_bytes=1 << 22, slab_bytes=1 << 20)
    return ManagerConfig(device=None, host=HostTierConfig(g2), disk=disk)


def save(mgr: BlockManager, tokens: np.ndarray, start: int = 0) -> list[bool]:
    """What the connector does for new blocks: reserve, "mover" writes, commit."""
    m = mgr.match_prefix(tokens)
    hashes = m.hashes.sequence[start:]
    slots = mgr.reserve_host(hashes)
    pool = mgr.host_pool
    assert pool is not None
    for s, h in zip(slots, hashes, strict=False):
        pool.block_view(s).fill_(value(h))
    return mgr.commit_host(slots, tokens, start_block=start, hashes=m.hashes)


def test_no_device_tier_needs_host() -> None:
    with pytest.raises(ConfigError, match="host tier"):
        ManagerConfig(device=None)


def test_g1_calls_are_refused_without_a_device_tier() -> None:
    with BlockManager(LAYOUT, cfg()) as mgr:
        for call in (lambda: mgr.allocate(1), lambda: mgr.block_view(0),
                     lambda: mgr.onboard(mgr.match_prefix(toks(1)))):
            with pytest.raises(ConfigError, match="engine owns G1"):
                call()


def test_commit_then_stage_from_g2() -> None:
    with BlockManager(LAYOUT, cfg()) as mgr:
        t = toks(3)
        assert save(mgr, t) == [True, True, True]
        ev = mgr.take_events()
        assert [type(e) for e in ev] == [BlockStored] and ev[0].medium is Medium.CPU_PINNED
        m = mgr.match_prefix(t)
        assert m.num_blocks == 3 and m.by_medium == {Medium.CPU_PINNED: 3}
        with mgr.stage(m, start_block=1) as h:
            assert h.done() and h.num_blocks == 2
            assert h.sequence_hashes == m.sequence_hashes[1:]
            for s, hh in zip(h.slots, h.sequence_hashes, strict=True):
                assert bool((mgr.host_pool.block_view(s) == value(hh)).all())
            # held: a reservation of all of G2 cannot take them
            assert len(mgr.reserve_host(list(range(1, 9)))) == 8 - 2
        mgr.check_invariants()


def test_dedup_and_broken_lineage() -> None:
    with BlockManager(LAYOUT, cfg()) as mgr:
        t = toks(2)
        save(mgr, t)
        assert save(mgr, t) == [False, False]  # already cached: the new pages are freed
        mgr.check_invariants()
        other = toks(3, base=1000)
        m = mgr.match_prefix(other)
        slots = mgr.reserve_host(m.hashes.sequence[1:])
        # block 0 was never committed: blocks 1.. cannot be matched, so they are given back
        assert mgr.commit_host(slots, other, start_block=1, hashes=m.hashes) == [False, False]
        assert mgr.match_prefix(other).num_blocks == 0
        mgr.check_invariants()


def test_release_host_and_bad_input() -> None:
    with BlockManager(LAYOUT, cfg(g2=4)) as mgr:
        slots = mgr.reserve_host([11, 12])
        with pytest.raises(BlockStateError):
            mgr.release_host([slots[0], slots[0]])
        with pytest.raises(InvalidKeyError):
            mgr.reserve_host([-1])
        with pytest.raises(InvalidKeyError):
            mgr.reserve_host(["a"])
        mgr.release_host(slots)
        with pytest.raises(BlockStateError):
            mgr.release_host(slots)  # not reserved any more
        mgr.check_invariants()
        assert len(mgr.reserve_host(list(range(1, 10)))) == 4  # only as many as G2 holds


def test_stage_loads_from_disk_in_background(tmp_path) -> None:
    t = toks(6)
    with BlockManager(LAYOUT, cfg(tmp_path, g2=8)) as mgr:
        save(mgr, t)
        assert mgr.flush().complete
    # A restart: G2 is empty, the pages are on disk only.
    with BlockManager(LAYOUT, cfg(tmp_path, g2=8)) as mgr:
        m = mgr.match_prefix(t)
        assert m.num_blocks == 6 and m.by_medium == {Medium.DISK: 6}
        h = mgr.stage(m, start_block=2)
        assert h.loading_from == {Medium.DISK: 4}
        slots = h.wait(30)
        assert h.status is OnboardStatus.DONE and len(slots) == 4
        for s, hh in zip(slots, m.sequence_hashes[2:], strict=True):
            assert bool((mgr.host_pool.block_view(s) == value(hh)).all()), "wrong page"
        h.release()
        h.release()  # idempotent
        mgr.check_invariants()
        # now they are cached in G2 as well
        assert mgr.match_prefix(t).by_medium == {Medium.CPU_PINNED: 4, Medium.DISK: 2}


def test_stage_cut_at_a_corrupt_page(tmp_path) -> None:
    t = toks(4)
    with BlockManager(LAYOUT, cfg(tmp_path)) as mgr:
        save(mgr, t)
        mgr.flush()
    slabs = sorted((tmp_path / "g3").rglob("*.slab"))
    assert slabs
    with BlockManager(LAYOUT, cfg(tmp_path)) as mgr:
        m = mgr.match_prefix(t)
        # damage the page of block 2 on disk: flip bytes of its value everywhere it occurs
        target = np.float32(value(m.sequence_hashes[2])).tobytes()
        hit = False
        for p in slabs:
            data = bytearray(p.read_bytes())
            i = data.find(target * 4)
            if i >= 0:
                data[i] ^= 0xFF
                p.write_bytes(bytes(data))
                hit = True
        assert hit
        h = mgr.stage(m)
        slots = h.wait(30)
        assert len(slots) == 2, "the prefix ends before the corrupt page"
        for s, hh in zip(slots, m.sequence_hashes, strict=False):
            assert bool((mgr.host_pool.block_view(s) == value(hh)).all())
        h.release()
        mgr.check_invariants()

"""Blocks resident only below host memory leave the prefix index for the compact table of
unlinked pages (a few tens of bytes each instead of a Python record): matches still see
them, onboards and stages link them back with the query's tokens, their events stand
(nothing is announced when they are compacted), a tier dropping them is announced, and
``clear()`` withdraws them with everything else."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

pytest.importorskip("torch")

from kvbm import (
    BlockManager,
    BlockRemoved,
    BlockStored,
    DeviceTierConfig,
    HostTierConfig,
    KVLayout,
    ManagerConfig,
    Medium,
)
from kvbm.events import AllBlocksCleared
from kvbm.storage.disk import DiskTierConfig

BS = 4
LAYOUT = KVLayout(2, 2, 4, BS, "float32")
CHAIN = 4


def toks(chain: int) -> np.ndarray:
    return np.arange(chain * 1000, chain * 1000 + CHAIN * BS, dtype=np.uint32)


def value(seq_hash: int) -> float:
    return float(seq_hash % 999_983)


def fill(mgr: BlockManager, b: int, v: float) -> None:
    view = mgr.block_view(b)
    for t in view if isinstance(view, list) else [view]:
        t.fill_(v)


def holds(mgr: BlockManager, b: int, v: float) -> bool:
    view = mgr.block_view(b)
    return all(bool((t == v).all()) for t in (view if isinstance(view, list) else [view]))


def standalone(tmp_path, disk_bytes: int = 1 << 24) -> ManagerConfig:
    return ManagerConfig(device=DeviceTierConfig(CHAIN, device="cpu"),
                         host=HostTierConfig(CHAIN, admission=None),
                         disk=DiskTierConfig(tmp_path / "g3", capacity_bytes=disk_bytes,
                                             slab_bytes=1 << 20))


def put_chain(mgr: BlockManager, chain: int) -> list[int]:
    t = toks(chain)
    m = mgr.match_prefix(t)
    ids = mgr.allocate(CHAIN)
    for b, h in zip(ids, m.hashes.sequence, strict=True):
        fill(mgr, b, value(h))
    mgr.release(mgr.commit(ids, t, hashes=m.hashes))
    mgr.flush()  # on disk before the next chain pushes it out of G1 and G2
    return m.hashes.sequence


def compacted(mgr: BlockManager, seq_hash: int) -> bool:
    """A compacted block's lookup is a residency snapshot without its parent."""
    rec = mgr.lookup(seq_hash)
    return rec is not None and rec.parent is None and rec.tokens == b""


def test_lower_only_blocks_are_compacted_and_still_matched(tmp_path) -> None:
    with BlockManager(LAYOUT, standalone(tmp_path)) as mgr:
        chains = [put_chain(mgr, c) for c in range(6)]
        mgr.take_events()
        mgr.poll()
        st = mgr.stats()
        assert st.indexed_blocks == 6 * CHAIN and st.unlinked_pages == 0
        old = chains[0]
        assert all(compacted(mgr, h) for h in old[1:])
        m = mgr.match_prefix(toks(0))
        assert m.mediums == [Medium.DISK] * CHAIN
        assert mgr.take_events() == []  # a match of compacted blocks announces nothing
        ids = mgr.onboard(m)
        assert [holds(mgr, b, value(h)) for b, h in zip(ids, old, strict=True)] == [True] * 4
        stored = [e for e in mgr.take_events() if isinstance(e, BlockStored)]
        assert {e.medium for e in stored} >= {Medium.CPU_PINNED, Medium.GPU}
        # the records linked back carry the query's tokens into the events
        for e in stored:
            assert e.medium in (Medium.CPU_PINNED, Medium.GPU)
            assert e.token_ids == toks(0)[: len(e.token_ids)].tolist() or \
                e.token_ids == toks(0)[-len(e.token_ids):].tolist()
        assert not any(e.medium is Medium.DISK for e in stored)  # it never left the disk
        mgr.release(ids)
        mgr.check_invariants()
        assert mgr.stats().indexed_blocks == 6 * CHAIN


def test_a_tier_dropping_a_compacted_block_announces_it(tmp_path) -> None:
    # a disk of a few pages: older chains are evicted from it while compacted
    page = LAYOUT.bytes_per_block + 64
    with BlockManager(LAYOUT, standalone(tmp_path, disk_bytes=6 * CHAIN * page)) as mgr:
        first = put_chain(mgr, 0)
        removed: set[int] = set()
        for c in range(1, 12):
            put_chain(mgr, c)
            for e in mgr.take_events():
                if isinstance(e, BlockRemoved) and e.medium is Medium.DISK:
                    removed.update(e.block_hashes)
        assert set(first) & removed, "the first chain should have left the small disk"
        for h in set(first) & removed:
            rec = mgr.lookup(h)
            assert rec is None or not rec.mask & Medium.DISK.bit
        mgr.check_invariants()


def test_clear_withdraws_compacted_blocks_and_a_match_announces_them_again(tmp_path) -> None:
    with BlockManager(LAYOUT, standalone(tmp_path)) as mgr:
        chains = [put_chain(mgr, c) for c in range(4)]
        mgr.poll()
        n = mgr.clear()
        assert n == 4 * CHAIN
        events = mgr.take_events()
        assert isinstance(events[-1], AllBlocksCleared)
        st = mgr.stats()
        assert st.indexed_blocks == 0 and st.unlinked_pages == 4 * CHAIN
        m = mgr.match_prefix(toks(0))
        assert m.num_blocks == CHAIN
        again = [e for e in mgr.take_events() if isinstance(e, BlockStored)]
        assert [h for e in again for h in e.block_hashes] == chains[0]
        assert all(e.medium is Medium.DISK for e in again)
        assert again[0].token_ids == toks(0).tolist()
        mgr.check_invariants()


def test_commit_host_under_a_compacted_parent_links_it_back(tmp_path) -> None:
    """Engine-owned G1: the engine holds the prefix in its own memory while kvbm's copy of
    it is on disk only (compacted); saving the next blocks links the parent back."""
    cfg = ManagerConfig(device=None, host=HostTierConfig(CHAIN, admission=None),
                        disk=DiskTierConfig(tmp_path / "g3", capacity_bytes=1 << 24,
                                            slab_bytes=1 << 20))
    with BlockManager(LAYOUT, cfg) as mgr:
        def save(tokens: np.ndarray, start: int) -> list[bool]:
            m = mgr.match_prefix(tokens)
            hashes = m.hashes.sequence[start:]
            slots = mgr.reserve_host(hashes)
            pool = mgr.host_pool
            assert pool is not None
            for s, h in zip(slots, hashes, strict=False):
                pool.block_view(s).fill_(value(h))
            kept = mgr.commit_host(slots, tokens, start_block=start, hashes=m.hashes)
            mgr.flush()
            return kept

        long = np.arange(0, 2 * CHAIN * BS, dtype=np.uint32)
        assert save(long[: CHAIN * BS], 0) == [True] * CHAIN
        for c in range(1, 4):  # push the first blocks out of G2
            save(toks(c), 0)
        mgr.poll()
        h_parent = mgr.match_prefix(long).hashes.sequence[CHAIN - 1]
        assert compacted(mgr, h_parent)
        assert save(long, CHAIN) == [True] * CHAIN
        m = mgr.match_prefix(long)
        assert m.num_blocks == 2 * CHAIN
        mgr.check_invariants()


def test_compacted_blocks_cost_tens_of_bytes(tmp_path) -> None:
    """What the manager itself keeps per block that only the disk holds (the disk tier's
    own bookkeeping aside): measured with tracemalloc around the manager's structures."""
    with BlockManager(LAYOUT, standalone(tmp_path)) as mgr:
        for c in range(40):
            put_chain(mgr, c)
        mgr.poll()
        st = mgr.stats()
        assert st.indexed_blocks == 40 * CHAIN
        # Only G1/G2 blocks and their ancestors keep a record: what grows with the blocks
        # that went down to the disk is the table's few bytes each.
        tracemalloc.start()
        a = tracemalloc.take_snapshot()
        for c in range(40, 140):
            put_chain(mgr, c)
            mgr.take_events()
        mgr.poll()
        b = tracemalloc.take_snapshot()
        tracemalloc.stop()
        grown = sum(d.size_diff for d in b.compare_to(a, "filename")
                    if "manager.py" in d.traceback[0].filename
                    or ("index.py" in d.traceback[0].filename
                    and "disk" not in d.traceback[0].filename)
                    or "masks.py" in d.traceback[0].filename)
        per_block = grown / (100 * CHAIN)
        assert per_block < 200, f"{per_block:.0f} bytes per compacted block"
        print(f"{per_block:.0f} bytes per compacted block")

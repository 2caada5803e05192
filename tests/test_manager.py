import numpy as np
import pytest
import torch

from kvbm import (
    AllBlocksCleared,
    BlockManager,
    BlockRemoved,
    BlockStored,
    DeviceTierConfig,
    HostTierConfig,
    KVLayout,
    ManagerConfig,
    Medium,
    hash_blocks,
)
from kvbm.errors import (
    BlockIdError,
    BlockStateError,
    ConfigError,
    InvalidArgumentError,
    KvbmError,
    LayoutError,
    PoolExhaustedError,
    TokenError,
)

BS = 4
LAYOUT = KVLayout(2, 2, 4, BS, "float32")


def make(g1=8, g2=16, **host):
    hcfg = HostTierConfig(g2, **host) if g2 else None
    return BlockManager(LAYOUT, ManagerConfig(device=DeviceTierConfig(g1, device="cpu"), host=hcfg))


def run(mgr, tokens, fill=None):
    """One request: match, onboard, compute the rest, commit, release. Returns the match."""
    match = mgr.match_prefix(tokens)
    ids = mgr.onboard(match)
    new = mgr.allocate(len(match.hashes) - len(ids))
    for i, b in enumerate(new):
        view = mgr.block_view(b)
        for t in view if isinstance(view, list) else [view]:
            t.fill_(fill if fill is not None else float(len(ids) + i + 1))
    ids += mgr.commit(new, tokens, start_block=len(ids), hashes=match.hashes)
    mgr.check_invariants()
    mgr.release(ids)
    mgr.check_invariants()
    return match


def toks(n_blocks, base=0):
    return np.arange(base, base + n_blocks * BS, dtype=np.uint32)


def test_second_request_hits_first_prefix_and_partial_block_ignored():
    mgr = make()
    t = np.concatenate([toks(3), [7, 7]])  # 3 full blocks + a partial one
    m1 = run(mgr, t)
    assert m1.num_blocks == 0 and len(m1.hashes) == 3
    m2 = mgr.match_prefix(np.concatenate([toks(3), toks(2, 500)]))
    assert m2.num_blocks == 3 and m2.by_medium == {Medium.GPU: 3}
    assert m2.sequence_hashes == hash_blocks(t, BS).sequence
    assert mgr.stats().hit_blocks == 3


def test_commit_deduplicates_same_block():
    mgr = make()
    a = mgr.allocate(2)
    b = mgr.allocate(2)
    ids_a = mgr.commit(a, toks(2))
    ids_b = mgr.commit(b, toks(2))  # computed twice concurrently: stored once
    assert ids_a == a and ids_b == a
    assert mgr.stats().deduplicated_blocks == 2
    assert mgr.stats().tiers[Medium.GPU].free_blocks == 8 - 2
    mgr.release(ids_a + ids_b)
    mgr.check_invariants()
    with pytest.raises(BlockStateError):
        mgr.release(b)  # b's pages went back to the pool at commit


def test_eager_offload_and_onboard_from_host_restores_data():
    mgr = make(g1=4, g2=16)
    run(mgr, toks(3), fill=None)
    assert mgr.stats().offloaded_blocks == 3
    run(mgr, toks(4, 1000))  # evicts the first request from G1 (4 pages)
    m = mgr.match_prefix(toks(3))
    assert m.num_blocks == 3 and m.by_medium.get(Medium.CPU_PINNED, 0) >= 1
    ids = mgr.onboard(m)
    for i, b in enumerate(ids):
        assert bool((mgr.block_view(b) == float(i + 1)).all()), "wrong KV onboarded"
    assert mgr.stats().onboarded_blocks[Medium.CPU_PINNED] >= 1
    mgr.release(ids)
    mgr.check_invariants()


def test_write_back_mode_offloads_only_on_eviction():
    mgr = make(g1=4, g2=16, eager_offload=False)
    run(mgr, toks(3))
    assert mgr.stats().offloaded_blocks == 0
    run(mgr, toks(4, 1000))
    assert mgr.stats().offloaded_blocks == 3
    assert mgr.match_prefix(toks(3)).num_blocks == 3


def test_events_per_medium():
    mgr = make(g1=3, g2=3)
    run(mgr, toks(3))
    ev = mgr.take_events()
    stored = [e for e in ev if isinstance(e, BlockStored)]
    assert [e.medium for e in stored] == [Medium.GPU, Medium.CPU_PINNED]
    h = hash_blocks(toks(3), BS)
    assert stored[0].block_hashes == h.sequence and stored[0].local_hashes == h.local
    assert stored[0].parent_block_hash is None and stored[0].token_ids == toks(3).tolist()
    assert mgr.take_events() == []
    run(mgr, toks(3, 1000))  # evicts everything of the first request from both tiers
    ev = mgr.take_events()
    removed = {(e.medium, h_) for e in ev if isinstance(e, BlockRemoved) for h_ in e.block_hashes}
    for x in h.sequence:
        assert (Medium.GPU, x) in removed and (Medium.CPU_PINNED, x) in removed
    assert mgr.match_prefix(toks(3)).num_blocks == 0


def test_lineage_rule_drops_unreachable_children():
    # The root is committed (and last used) before its child, so LRU evicts the root; with
    # no other tier the child is unreachable then, and leaves the index with it.
    mgr = BlockManager(LAYOUT, ManagerConfig(device=DeviceTierConfig(4, device="cpu",
                                                                     eviction="lru")))
    t = toks(2)
    mgr.release(mgr.commit(mgr.allocate(1), t[:BS]))
    mgr.release(mgr.commit(mgr.allocate(1), t, start_block=1))
    assert mgr.match_prefix(t).num_blocks == 2
    ids = mgr.allocate(3)  # one eviction: the root
    mgr.check_invariants()
    assert mgr.match_prefix(t).num_blocks == 0
    assert mgr.stats().indexed_blocks == 0
    assert mgr.stats().tiers[Medium.GPU].free_blocks == 1  # the child's page was freed too
    removed = [e for e in mgr.take_events() if isinstance(e, BlockRemoved)]
    assert {h for e in removed for h in e.block_hashes} == set(hash_blocks(t, BS).sequence)
    mgr.release(ids)


def test_leaf_first_recency_keeps_prefixes():
    # With plain LRU a used chain's tail is the least recent: it goes before its prefix.
    mgr = BlockManager(LAYOUT, ManagerConfig(device=DeviceTierConfig(4, device="cpu",
                                                                     eviction="lru")))
    run(mgr, toks(3))
    ids = mgr.allocate(2)  # one eviction: the tail, not the root
    assert mgr.match_prefix(toks(3)).num_blocks == 2
    mgr.release(ids)
    mgr.check_invariants()


def test_lineage_detaches_a_held_child():
    cfg = ManagerConfig(device=DeviceTierConfig(5, device="cpu", eviction="lru"),
                        host=HostTierConfig(2, eviction="lru"))
    mgr = BlockManager(LAYOUT, cfg)
    new = mgr.allocate(3)
    ids = mgr.commit(new, toks(3))  # G2 has room for A and B only
    assert mgr.stats().tiers[Medium.CPU_PINNED].offload_skipped == 1
    mgr.release(ids[:2])  # the engine keeps only C
    x = mgr.allocate(4)  # evicts A then B from G1 (they stay in G2)
    assert mgr.match_prefix(toks(3)).by_medium == {Medium.CPU_PINNED: 2, Medium.GPU: 1}
    mgr.release(x)
    run(mgr, toks(2, 800))  # G2 evicts A and B: C is unreachable, though held
    mgr.check_invariants()
    assert mgr.lookup(hash_blocks(toks(3), BS).sequence[2]) is None
    assert mgr.match_prefix(toks(3)).num_blocks == 0
    used = mgr.stats().tiers[Medium.GPU].free_blocks
    mgr.release(ids[2:])  # the detached page goes back to the free list
    assert mgr.stats().tiers[Medium.GPU].free_blocks == used + 1
    mgr.check_invariants()


def test_stale_match_onboards_shorter_prefix():
    mgr = BlockManager(LAYOUT, ManagerConfig(device=DeviceTierConfig(3, device="cpu")))
    run(mgr, toks(2))
    m = mgr.match_prefix(toks(2))
    run(mgr, toks(3, 900))  # evicts the first request (no lower tier)
    assert mgr.onboard(m) == []


def test_pool_exhaustion_changes_nothing():
    mgr = make(g1=4, g2=8)
    m = mgr.match_prefix(toks(3))
    held = mgr.allocate(3)
    with pytest.raises(PoolExhaustedError):
        mgr.allocate(2)
    mgr.commit(held, toks(3), hashes=m.hashes)
    ev = len(mgr.take_events())
    # G1 is 3/4 pinned; onboarding 3 blocks from G2 after they left G1 needs 3 pages
    other = mgr.allocate(1)
    with pytest.raises(PoolExhaustedError):
        mgr.allocate(1)
    mgr.check_invariants()
    assert ev > 0 and mgr.take_events() == []
    mgr.release(held + other)


def test_release_batches_validate_first_and_free_pages_tail_first():
    mgr = make(g1=4, g2=0)
    held = mgr.allocate(4)
    # A bad id or an extra release anywhere in the batch releases nothing.
    for bad in ([*held, 99], [*held, held[3]], [held[0], np.int64(held[1]), -1]):
        with pytest.raises((BlockIdError, BlockStateError)):
            mgr.release(bad)
        with pytest.raises(PoolExhaustedError):
            mgr.allocate(1)
    # numpy ints are accepted; uncommitted pages go back to the free list tail first (the
    # last page of the batch is reused first), as when they are released one at a time.
    mgr.release([np.int32(b) for b in held])
    assert mgr.allocate(4) == held[::-1]


def test_bad_inputs_raise_clear_errors_and_change_nothing():
    mgr = make()
    run(mgr, toks(2))
    held = mgr.allocate(2)
    before = (mgr.stats(), len(mgr.take_events()))
    cases = [
        (lambda: mgr.release([99]), BlockIdError, IndexError),
        (lambda: mgr.release([-1]), BlockIdError, IndexError),
        (lambda: mgr.release([held[0], held[0]]), BlockStateError, ValueError),
        (lambda: mgr.release([7]), BlockStateError, ValueError),  # never allocated
        (lambda: mgr.commit(held, toks(1)), BlockStateError, ValueError),  # too few tokens
        (lambda: mgr.commit(held, [[1, 2], [3, 4]]), TokenError, ValueError),
        (lambda: mgr.commit(held, [1.5] * 8), TokenError, ValueError),
        (lambda: mgr.commit(held, [-1] * 8), TokenError, ValueError),
        (lambda: mgr.commit(held, [2**32] * 8), TokenError, ValueError),
        (lambda: mgr.commit([held[0], held[0]], toks(2)), BlockStateError, ValueError),
        (lambda: mgr.commit([held[0]], toks(2, 5000), start_block=1), BlockStateError, ValueError),
        (lambda: mgr.match_prefix("hello"), TokenError, ValueError),
        (lambda: mgr.allocate(-1), InvalidArgumentError, ValueError),
        (lambda: mgr.allocate(100), PoolExhaustedError, MemoryError),
        (lambda: mgr.block_view(8), BlockIdError, IndexError),
    ]
    for fn, err, builtin in cases:
        with pytest.raises(err) as e:
            fn()
        assert isinstance(e.value, builtin) and isinstance(e.value, KvbmError)
        assert str(e.value)
        mgr.check_invariants()
    after = (mgr.stats(), len(mgr.take_events()))
    assert before[0].tiers == after[0].tiers and after[1] == 0
    ids = mgr.commit(held, toks(2, 100))
    with pytest.raises(BlockStateError, match="already committed"):
        mgr.commit(ids, toks(2, 100))
    mgr.release(ids)
    mgr.check_invariants()


def test_constructor_validation():
    with pytest.raises(LayoutError):
        BlockManager("llama", ManagerConfig(device=DeviceTierConfig(4)))  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        BlockManager(LAYOUT, {"device": 4})  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        DeviceTierConfig(0)
    with pytest.raises(ValueError):
        make(eviction="most-recently-liked")


def test_commit_of_a_block_cached_only_in_host_reuses_the_record():
    mgr = make(g1=2, g2=8)
    run(mgr, toks(2))
    run(mgr, toks(2, 300))  # G1 now holds the second request only
    assert mgr.match_prefix(toks(2)).by_medium == {Medium.CPU_PINNED: 2}
    new = mgr.allocate(2)
    ids = mgr.commit(new, toks(2))  # recomputed instead of onboarded
    assert ids == new
    assert mgr.match_prefix(toks(2)).by_medium == {Medium.GPU: 2}
    mgr.release(ids)
    mgr.check_invariants()


def test_explicit_offload_and_clear():
    mgr = make(g1=4, g2=4, eager_offload=False)
    run(mgr, toks(2))
    assert mgr.offload() == 2
    assert mgr.offload() == 0
    held = mgr.allocate(1)
    with pytest.raises(BlockStateError):
        mgr.clear()
    mgr.release(held)
    stored = [h for e in mgr.take_events() if isinstance(e, BlockStored)
              and e.medium is Medium.CPU_PINNED for h in e.block_hashes]
    assert mgr.clear() == 2
    # host-memory copies are withdrawn one by one (a router reads vLLM's AllBlocksCleared
    # as the GPU cache only), then G1's clear
    assert mgr.take_events() == [BlockRemoved(stored, Medium.CPU_PINNED), AllBlocksCleared()]
    assert mgr.match_prefix(toks(2)).num_blocks == 0
    mgr.check_invariants()
    with pytest.raises(ConfigError):
        make(g2=0).offload()


def test_layer_separate_layout_round_trip():
    lay = KVLayout(3, 2, 4, BS, "bfloat16", "layer_separate")
    mgr = BlockManager(lay, ManagerConfig(device=DeviceTierConfig(2, device="cpu"),
                                          host=HostTierConfig(8)))
    assert len(mgr.kv_caches) == 3 and mgr.kv_caches[0].shape == (2, *lay.layer_shape)
    m = mgr.match_prefix(toks(2))
    new = mgr.allocate(2)
    for b in new:
        for li, t in enumerate(mgr.block_view(b)):
            t.fill_(10 * b + li)
    expect = [torch.stack([t.clone() for t in mgr.block_view(b)]) for b in new]
    mgr.release(mgr.commit(new, toks(2), hashes=m.hashes))
    run(mgr, toks(2, 700))  # pushes them out of G1
    ids = mgr.onboard(mgr.match_prefix(toks(2)))
    assert len(ids) == 2
    for b, e in zip(ids, expect, strict=True):
        assert torch.equal(torch.stack(mgr.block_view(b)), e)
    mgr.release(ids)


def test_lora_and_salt_separate_caches():
    a = BlockManager(LAYOUT, ManagerConfig(device=DeviceTierConfig(8, device="cpu"), salt="m1"))
    run(a, toks(2))
    assert a.match_prefix(toks(2)).num_blocks == 2
    assert a.match_prefix(toks(2), lora_name="adapter").num_blocks == 0
    m = a.match_prefix(toks(2), lora_name="adapter")
    new = a.allocate(2)
    a.release(a.commit(new, toks(2), hashes=m.hashes, lora_name="adapter"))
    assert a.match_prefix(toks(2), lora_name="adapter").num_blocks == 2
    assert hash_blocks(toks(2), BS, salt="m1").sequence == a.match_prefix(toks(2)).sequence_hashes

"""Hypothesis stateful test of the block manager's invariants.

Random requests over a small vocabulary of prefixes, random early releases, explicit
offloads and clears, with tiny pools so that eviction, lineage cascades, deduplication and
write-back happen all the time. After every step: the manager's own invariant check, the
refcounts equal what the model holds, and every block the engine holds carries the KV of
the block it is named after (never a wrong page).
"""

from collections import Counter

import numpy as np
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kvbm import BlockManager, DeviceTierConfig, HostTierConfig, KVLayout, ManagerConfig
from kvbm.errors import PoolExhaustedError

BS = 2
LAYOUT = KVLayout(1, 1, 2, BS, "float32")
POLICIES = ["lru", "lineage", "lfu", "arc", "s3fifo", "adaptive", "predictive"]


def tokens_for(prefix_id: int, n_blocks: int) -> np.ndarray:
    # Requests share prefixes: sequence k of family f is blocks f*100 + [0..n)
    return np.repeat(np.arange(prefix_id * 100, prefix_id * 100 + n_blocks, dtype=np.uint32), BS)


def value_of(seq_hash: int) -> float:
    return float(seq_hash % 1_000_003)


class ManagerMachine(RuleBasedStateMachine):
    @initialize(g1=st.integers(3, 8), g2=st.integers(0, 10), eager=st.booleans(),
                ev1=st.sampled_from(POLICIES), ev2=st.sampled_from(POLICIES),
                adm=st.sampled_from([None, "frequency"]))
    def setup(self, g1, g2, eager, ev1, ev2, adm):
        host = HostTierConfig(g2, eviction=ev2, admission=adm, eager_offload=eager) if g2 else None
        self.mgr = BlockManager(LAYOUT, ManagerConfig(
            device=DeviceTierConfig(g1, device="cpu", eviction=ev1), host=host))
        self.holds: Counter[int] = Counter()
        self.requests: list[tuple[list[int], list[int]]] = []  # (ids, seq hashes)

    @rule(fam=st.integers(0, 3), n=st.integers(1, 4))
    def request(self, fam, n):
        mgr = self.mgr
        toks = tokens_for(fam, n)
        m = mgr.match_prefix(toks)
        try:
            ids = mgr.onboard(m)
        except PoolExhaustedError:
            return
        for b, h in zip(ids, m.hashes.sequence, strict=False):
            got = mgr.block_view(b)
            assert bool((got == value_of(h)).all()), "onboarded a wrong page"
        try:
            new = mgr.allocate(len(m.hashes) - len(ids))
        except PoolExhaustedError:
            mgr.release(ids)
            return
        for i, b in enumerate(new):
            mgr.block_view(b).fill_(value_of(m.hashes.sequence[len(ids) + i]))
        final = mgr.commit(new, toks, start_block=len(ids), hashes=m.hashes)
        all_ids = ids + final
        self.holds.update(all_ids)
        self.requests.append((all_ids, list(m.hashes.sequence)))

    @precondition(lambda self: self.requests)
    @rule(data=st.data())
    def finish(self, data):
        i = data.draw(st.integers(0, len(self.requests) - 1))
        ids, _ = self.requests.pop(i)
        self.mgr.release(ids)
        self.holds.subtract(ids)

    @precondition(lambda self: self.requests)
    @rule(data=st.data())
    def release_prefix_early(self, data):
        # An engine may drop holds on the first blocks of a request and keep the tail.
        i = data.draw(st.integers(0, len(self.requests) - 1))
        ids, hashes = self.requests[i]
        k = data.draw(st.integers(0, len(ids)))
        self.mgr.release(ids[:k])
        self.holds.subtract(ids[:k])
        self.requests[i] = (ids[k:], hashes[k:])

    @rule()
    def offload(self):
        if self.mgr.host_pool is not None:
            self.mgr.offload()

    @precondition(lambda self: not self.requests)
    @rule()
    def clear(self):
        self.mgr.clear()

    @rule(n=st.integers(0, 3))
    def scratch(self, n):
        try:
            ids = self.mgr.allocate(n)
        except PoolExhaustedError:
            return
        self.mgr.release(ids)

    @invariant()
    def consistent(self):
        if not hasattr(self, "mgr"):
            return
        self.mgr.check_invariants()
        alloc = self.mgr.device_pool.allocator
        for slot in range(alloc.num_slots):
            assert alloc.refcount(slot) == self.holds[slot], f"refcount of {slot}"
        for ids, hashes in self.requests:
            for b, h in zip(ids, hashes[len(hashes) - len(ids):], strict=True):
                assert bool((self.mgr.block_view(b) == value_of(h)).all()), "held page changed"
        _ = torch  # pages are torch tensors


ManagerMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40,
                                            deadline=None)
TestManagerStateful = ManagerMachine.TestCase

"""Hypothesis stateful test of SlotAllocator against a plain model (sets and counters)."""

from collections import Counter

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from kvbm.errors import BlockStateError, PoolExhaustedError
from kvbm.pool import SlotAllocator


class AllocatorMachine(RuleBasedStateMachine):
    @initialize(n=st.integers(1, 40))
    def setup(self, n):
        self.a = SlotAllocator(n)
        self.n = n
        self.refs: Counter[int] = Counter()  # held slots and their refcounts

    @rule(k=st.integers(0, 12))
    def allocate(self, k):
        free_before = self.n - len(self.refs)
        if k > free_before:
            with pytest.raises(PoolExhaustedError):
                self.a.allocate(k)
            return
        got = self.a.allocate(k)
        assert len(set(got)) == k
        for s in got:
            assert s not in self.refs, "a held slot was handed out twice"
            self.refs[s] = 1

    @rule(data=st.data())
    def incref(self, data):
        if self.refs:
            s = data.draw(st.sampled_from(sorted(self.refs)))
            self.refs[s] += 1
            assert self.a.incref(s) == self.refs[s]

    @rule(data=st.data())
    def decref_and_free(self, data):
        if not self.refs:
            return
        s = data.draw(st.sampled_from(sorted(self.refs)))
        self.refs[s] -= 1
        assert self.a.decref(s) == self.refs[s]
        if self.refs[s] == 0:
            del self.refs[s]
            self.a.free([s])

    @rule(data=st.data())
    def bad_free_changes_nothing(self, data):
        if self.refs and len(self.refs) < self.n:
            held = data.draw(st.sampled_from(sorted(self.refs)))
            free = next(i for i in range(self.n) if i not in self.refs)
            before = self.a.free_slots()
            with pytest.raises(BlockStateError):
                self.a.free([held, free])
            assert self.a.free_slots() == before and self.a.refcount(held) == self.refs[held]

    @rule(data=st.data())
    def take_specific(self, data):
        free = [i for i in range(self.n) if i not in self.refs]
        if free:
            s = data.draw(st.sampled_from(free))
            self.a.take(s)
            self.refs[s] = 1

    @invariant()
    def matches_model(self):
        if not hasattr(self, "a"):
            return
        free = self.a.free_slots()
        assert len(free) == len(set(free)) == self.a.num_free == self.n - len(self.refs)
        assert set(free).isdisjoint(self.refs)
        for s in range(self.n):
            assert self.a.refcount(s) == self.refs.get(s, 0) >= 0
            assert self.a.is_free(s) == (s not in self.refs)


AllocatorMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=50,
                                              deadline=None)
TestAllocatorStateful = AllocatorMachine.TestCase

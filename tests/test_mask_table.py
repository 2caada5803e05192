"""kvbm.core.masks.MaskTable against a dict: the map of unlinked persistent-tier pages."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvbm.core.masks import MaskTable

KEYS = st.one_of(st.integers(0, 40), st.integers(0, 2**64 - 1))
OPS = st.lists(st.tuples(st.sampled_from(["set", "or", "pop", "del", "get", "zero"]), KEYS,
                         st.integers(1, 255)), max_size=300)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(OPS)
def test_behaves_like_a_dict(ops: list[tuple[str, int, int]]) -> None:
    t, d = MaskTable(), {}
    for op, k, m in ops:
        if op == "set":
            t[k] = m
            d[k] = m
        elif op == "or":
            t.or_many([k], m & -m)
            d[k] = d.get(k, 0) | (m & -m)
        elif op == "pop":
            assert t.pop(k, 0) == d.pop(k, 0)
        elif op == "del":
            if k in d:
                del t[k]
                del d[k]
            else:
                with pytest.raises(KeyError):
                    del t[k]
        elif op == "zero":  # a mask of 0 removes the key, as the manager's dict use did
            t[k] = 0
            d.pop(k, None)
        else:
            assert t.get(k, 0) == d.get(k, 0)
        assert len(t) == len(d) and bool(t) == bool(d)
    assert dict(t.items()) == d
    assert sorted(t) == sorted(d)
    for k in d:
        assert k in t and t[k] == d[k]


def test_many_keys_grow_delete_and_stay_compact() -> None:
    rng = random.Random(3)
    keys = [rng.getrandbits(64) for _ in range(50_000)]
    t = MaskTable()
    t.or_many(keys[:25_000], 4)
    t.or_many(keys, 8)
    assert len(t) == 50_000
    assert t[keys[0]] == 12 and t[keys[-1]] == 8
    for k in keys[::2]:
        del t[k]
    assert len(t) == 25_000
    assert all(t.get(k, 0) == (12 if i < 25_000 else 8)
               for i, k in enumerate(keys) if i % 2)
    assert t.nbytes() / 50_000 <= 40  # a dict of ints costs ~100 bytes per entry
    # sequential small keys (test hashes) spread too: no pathological probing
    s = MaskTable()
    s.or_many(range(1, 20_001), 2)
    assert len(s) == 20_000 and s[17] == 2


def test_bad_masks_are_refused() -> None:
    t = MaskTable()
    with pytest.raises(ValueError):
        t[1] = 256
    with pytest.raises(ValueError):
        t.or_many([1], 0)
    assert len(t) == 0


def test_and_all_clears_a_flag_and_refuses_to_empty_entries() -> None:
    t = MaskTable()
    for k in range(100):
        t[k * 7919] = 0x80 | (1 << (k % 3))
    t.and_all(0x7F)
    assert all(m == 1 << (k % 3) for k, m in ((k // 7919, m) for k, m in t.items()))
    assert len(t) == 100
    t[5] = 0x80
    with pytest.raises(ValueError, match="empty"):
        t.and_all(0x7F)
    assert t[5] == 0x80  # unchanged


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2**64 - 1), st.integers(1, 255)), max_size=300),
       st.lists(st.integers(0, 2**64 - 1), max_size=50))
def test_get_many_agrees_with_get(entries, extra) -> None:
    import numpy as np

    t = MaskTable()
    for k, m in entries:
        t[k] = m
    for k in list(dict(entries))[::3]:
        del t[k]
    keys = [k for k, _ in entries] + extra
    got = t.get_many(np.array(keys, dtype=np.uint64)).tolist()
    assert got == [t.get(k) for k in keys]

"""CompactIndex (kvbm.lab.compact_index) against a plain dict model: inserts, chains, lookups,
prefix matches, subtree removal (leaves first, iterative), residency and slots, row reuse,
growth across rehashes, adversarial hashes that share one bucket, and bad input that
changes nothing."""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from kvbm.errors import BlockStateError, InvalidArgumentError, InvalidKeyError, UnknownBlockError
from kvbm.lab.compact_index import CompactIndex
from kvbm.lab.hash_table import _GOLDEN, BUCKET
from kvbm.medium import Medium

U64 = (1 << 64) - 1
GPU, HOST, DISK = Medium.GPU.bit, Medium.CPU_PINNED.bit, Medium.DISK.bit


class Model:
    """The reference: hash -> (local, parent hash, mask, lora, g1, g2, tokens)."""

    def __init__(self) -> None:
        self.recs: dict[int, dict[str, object]] = {}

    def insert(self, h: int, local: int, parent: int | None, mask: int,
               lora: str | None = None, tokens: bytes | None = None) -> None:
        self.recs[h] = {"local": local, "parent": parent, "mask": mask, "lora": lora,
                        "g1": -1, "g2": -1, "tokens": tokens}

    def children(self, h: int) -> list[int]:
        return [k for k, r in self.recs.items() if r["parent"] == h]

    def subtree(self, h: int) -> list[int]:
        out, stack = [], [h]
        while stack:
            k = stack.pop()
            out.append(k)
            stack.extend(self.children(k))
        return out

    def match(self, hashes: list[int]) -> int:
        n = 0
        while n < len(hashes) and hashes[n] in self.recs:
            n += 1
        return n


def agree(ix: CompactIndex, model: Model) -> None:
    ix.check_invariants()
    assert len(ix) == len(model.recs)
    assert sorted(ix) == sorted(model.recs)
    for h, r in model.recs.items():
        row = ix.get(h)
        assert row >= 0 and h in ix
        assert ix.seq_hash(row) == h and ix.local_hash(row) == r["local"]
        assert ix.parent_hash(row) == r["parent"]
        assert (ix.mask(row), ix.g1(row), ix.g2(row)) == (r["mask"], r["g1"], r["g2"])
        assert ix.lora_name(row) == r["lora"] and ix.tokens(row) == r["tokens"]
        assert sorted(ix.seq_hash(c) for c in ix.children(row)) == sorted(model.children(h))


def same_bucket(n: int, bits: int, bucket: int = 3) -> list[int]:
    """``n`` distinct hashes whose home bucket is ``bucket`` in a table of 2**bits slots (the
    inverse of the Fibonacci spreading): they all collide, so runs span several buckets."""
    inv = pow(_GOLDEN, -1, 1 << 64)
    shift = 64 - bits + 3
    return [(((bucket << shift) + i * 7919) * inv) & U64 for i in range(n)]


HASHES = st.one_of(st.integers(0, 40), st.integers(0, U64), st.integers(U64 - 40, U64))


class IndexMachine(RuleBasedStateMachine):
    @initialize(capacity=st.integers(1, 8))
    def setup(self, capacity: int) -> None:
        self.ix = CompactIndex(capacity)  # tiny: every run grows it across rehashes
        self.model = Model()

    def _pick(self, data: st.DataObject) -> int | None:
        keys = sorted(self.model.recs)
        return data.draw(st.sampled_from([None, *keys])) if keys else None

    @rule(data=st.data(), h=HASHES, local=st.integers(0, U64),
          mask=st.integers(1, 15), lora=st.sampled_from([None, "a", "b"]))
    def insert(self, data: st.DataObject, h: int, local: int, mask: int,
               lora: str | None) -> None:
        parent = self._pick(data)
        if h in self.model.recs:
            with pytest.raises(BlockStateError):
                self.ix.insert(h, local, parent, mask, lora)
            return
        tokens = b"t%d" % h if mask & (GPU | HOST) else None
        self.ix.insert(h, local, parent, mask, lora, tokens)
        self.model.insert(h, local, parent, mask, lora, tokens)

    @rule(data=st.data(), hs=st.lists(HASHES, min_size=1, max_size=30, unique=True),
          mask=st.integers(1, 15))
    def insert_chain(self, data: st.DataObject, hs: list[int], mask: int) -> None:
        parent = self._pick(data)
        locs = [h ^ 0x5555 for h in hs]
        if any(h in self.model.recs for h in hs):
            with pytest.raises(BlockStateError):
                self.ix.insert_chain(hs, locs, parent, mask)
            return
        rows = self.ix.insert_chain(np.array(hs, dtype=np.uint64), locs, parent, mask, "c")
        assert len(rows) == len(hs)
        for h, loc in zip(hs, locs, strict=True):
            self.model.insert(h, loc, parent, mask, "c")
            parent = h

    @rule(data=st.data())
    def remove_subtree(self, data: st.DataObject) -> None:
        h = self._pick(data)
        if h is None:
            return
        expect = self.model.subtree(h)
        got = self.ix.remove_subtree(h)
        assert sorted(got) == sorted(expect) and got[-1] == h
        pos = {k: i for i, k in enumerate(got)}
        for k in got:  # leaves first: every block before its parent
            p = self.model.recs[k]["parent"]
            assert p is None or p not in pos or pos[k] < pos[p]  # type: ignore[operator]
        for k in got:
            del self.model.recs[k]
        assert all(self.ix.get(k) == -1 and k not in self.ix for k in got)

    @rule(data=st.data(), mask=st.integers(0, 15), g1=st.integers(-1, 99),
          g2=st.integers(-1, 99))
    def set_residency(self, data: st.DataObject, mask: int, g1: int, g2: int) -> None:
        h = self._pick(data)
        if h is None:
            return
        row, r = self.ix.get(h), self.model.recs[h]
        self.ix.set_mask(row, mask)
        self.ix.set_g1(row, g1)
        self.ix.set_g2(row, g2)
        r["mask"], r["g1"], r["g2"] = mask, g1, g2
        if not mask & (GPU | HOST):
            r["tokens"] = None
        elif data.draw(st.booleans()):
            self.ix.set_tokens(row, b"new")
            r["tokens"] = b"new"

    @rule(data=st.data(), tail=st.lists(HASHES, max_size=5))
    def match(self, data: st.DataObject, tail: list[int]) -> None:
        path: list[int] = []
        h = self._pick(data)
        while h is not None:  # the chain from a root down to h, then arbitrary hashes
            path.append(h)
            h = self.model.recs[h]["parent"]  # type: ignore[assignment]
        q = [*path[::-1], *tail]
        n = self.model.match(q)
        assert self.ix.match(q) == n
        rows = self.ix.match_rows(q)
        assert [self.ix.seq_hash(int(r)) for r in rows] == q[:n]
        assert self.ix.masks(rows).tolist() == [self.model.recs[k]["mask"] for k in q[:n]]
        assert self.ix.rows_of(q).tolist() == [self.ix.get(k) for k in q]

    @invariant()
    def agrees(self) -> None:
        agree(self.ix, self.model)


TestIndexMachine = IndexMachine.TestCase
TestIndexMachine.settings = settings(max_examples=40, stateful_step_count=40, deadline=None)


def test_randomized_growth_and_row_reuse() -> None:
    rng = np.random.default_rng(7)
    ix, model = CompactIndex(1), Model()
    roots: list[int] = []
    rows_seen: set[int] = set()
    peak = 0
    for step in range(400):
        if roots and step % 5 == 4:  # remove a random subtree; its rows are reused
            h = roots.pop(int(rng.integers(len(roots))))
            if h in model.recs:
                for k in ix.remove_subtree(h):
                    del model.recs[k]
            continue
        hs = rng.integers(0, 1 << 64, int(rng.integers(1, 60)), dtype=np.uint64).tolist()
        keys = list(model.recs)
        parent = None if not keys or step % 3 else keys[int(rng.integers(len(keys)))]
        rows_seen.update(ix.insert_chain(hs, hs, parent, DISK).tolist())
        p = parent
        for h in hs:
            model.insert(h, h, p, DISK)
            p = h
        roots.append(hs[0])
        peak = max(peak, len(model.recs))
    agree(ix, model)
    assert max(rows_seen) < peak  # removed rows were reused before any new one


def test_rows_of_removed_blocks_are_reused() -> None:
    ix = CompactIndex()
    rows = ix.insert_chain([1, 2, 3], [1, 2, 3], None, DISK).tolist()
    ix.remove_subtree(2)
    again = [ix.insert(10, 10, 1, DISK), ix.insert(11, 11, None, DISK)]
    assert sorted(again) == sorted(rows[1:])
    assert ix.insert(12, 12, None, DISK) == 3  # then fresh ones


def test_a_5000_deep_chain_is_removed_leaves_first_without_recursion() -> None:
    assert sys.getrecursionlimit() < 5000  # a recursive walk of this chain would fail
    ix = CompactIndex()
    hs = list(range(1, 5001))
    ix.insert(hs[0], 0, None, DISK)
    for p, h in itertools.pairwise(hs[:2500]):  # one at a time, then as one chain
        ix.insert(h, 0, p, DISK)
    ix.insert_chain(hs[2500:], hs[2500:], hs[2499], DISK)
    assert ix.match(hs) == 5000 and ix.match_rows(hs).size == 5000
    assert ix.subtree(hs[0]).size == 5000
    assert ix.remove_subtree(hs[0]) == hs[::-1]
    assert len(ix) == 0 and ix.match(hs) == 0
    ix.check_invariants()


def test_hashes_sharing_one_bucket_span_runs_and_survive_deletes() -> None:
    bits = CompactIndex(1024)._table.bits  # no rehash below 1024 blocks
    hs = same_bucket(5 * BUCKET, bits)
    ix, model = CompactIndex(1024), Model()
    ix.insert_chain(hs, hs, None, DISK)
    for p, h in itertools.pairwise(hs):
        model.insert(h, h, p, DISK)
    model.insert(hs[0], hs[0], None, DISK)
    assert ix.match(hs) == len(hs) and ix.rows_of(hs).min() >= 0
    # Delete the tail (tombstones inside the run), put some back under other parents.
    ix.remove_subtree(hs[10])
    for h in model.subtree(hs[10]):
        del model.recs[h]
    assert ix.match(hs) == 10 and ix.rows_of(hs)[10:].max() == -1
    for h in hs[20:30]:
        ix.insert(h, h, hs[3], GPU)
        model.insert(h, h, hs[3], GPU)
    assert ix.match([*hs[:4], hs[25]]) == 5
    assert ix.match(hs[20:30]) == 10  # a match checks presence, not lineage
    agree(ix, model)


def test_match_probes_past_the_home_bucket() -> None:
    bits = CompactIndex(1024)._table.bits
    hs = same_bucket(3 * BUCKET, bits)
    ix = CompactIndex(1024)
    ix.insert_chain(hs, hs, None, DISK)
    assert ix.match(hs) == len(hs)
    assert ix.match([*hs[:20], 12345, *hs[20:]]) == 20
    assert ix.match(same_bucket(3 * BUCKET + 1, bits)) == 3 * BUCKET  # last one: absent


def test_tokens_only_while_in_g1_or_g2() -> None:
    ix = CompactIndex()
    row = ix.insert(1, 1, None, GPU | DISK, tokens=b"abcd")
    assert ix.tokens(row) == b"abcd"
    ix.set_mask(row, HOST | DISK)
    assert ix.tokens(row) == b"abcd"
    ix.set_mask(row, DISK)
    assert ix.tokens(row) is None
    with pytest.raises(InvalidArgumentError):
        ix.set_tokens(row, b"x")  # a lower-tier-only block keeps none
    ix.set_mask(row, HOST)
    ix.set_tokens(row, b"x")
    ix.remove_subtree(1)
    assert ix.insert(2, 2, None, DISK) == row and ix.tokens(row) is None


def test_touch_and_memory() -> None:
    ix = CompactIndex()
    rows = ix.insert_chain([5, 6, 7], [5, 6, 7], None, DISK)
    ix.touch(rows[:2], 42)
    ix.touch(rows[:1], 43)
    assert [ix.last_access(int(r)) for r in rows] == [43, 42, 0]
    assert [ix.frequency(int(r)) for r in rows] == [2, 1, 0]
    assert ix.memory_bytes() > 0


BAD_HASHES = ["1", 1.0, None, True, -1, 1 << 64, np.float64(2.0)]


def snapshot(ix: CompactIndex) -> tuple[object, ...]:
    rows = ix.live_rows()
    return (len(ix), sorted(ix), [(ix.mask(int(r)), ix.g1(int(r)), ix.parent(int(r)),
                                   sorted(ix.children(int(r)))) for r in rows])


@pytest.mark.parametrize("bad", BAD_HASHES)
def test_bad_hashes_are_refused_and_change_nothing(bad: object) -> None:
    ix = CompactIndex()
    ix.insert_chain([1, 2, 3], [1, 2, 3], None, DISK)
    before = snapshot(ix)
    calls = [lambda: ix.insert(bad, 1, None, DISK), lambda: ix.insert(9, bad, None, DISK),
             lambda: ix.insert_chain([9, bad], [9, 9], None, DISK),
             lambda: ix.insert_chain([9, 10], [9, bad], 1, DISK),
             lambda: ix.get(bad), lambda: bad in ix, lambda: ix.match([1, bad]),
             lambda: ix.rows_of([bad]), lambda: ix.remove_subtree(bad)]
    if bad is not None:  # None is "no parent", a valid parent_hash
        calls.append(lambda: ix.insert(9, 9, bad, DISK))
    for call in calls:
        with pytest.raises(InvalidKeyError):
            call()
    assert snapshot(ix) == before
    ix.check_invariants()


def test_other_bad_input_is_refused_and_changes_nothing() -> None:
    ix = CompactIndex()
    rows = ix.insert_chain([1, 2, 3], [1, 2, 3], None, DISK)
    before = snapshot(ix)
    cases: list[tuple[type[Exception], object]] = [
        (UnknownBlockError, lambda: ix.insert(9, 9, 77, DISK)),  # unknown parent
        (UnknownBlockError, lambda: ix.insert_chain([9], [9], 77, DISK)),
        (UnknownBlockError, lambda: ix.remove_subtree(77)),
        (BlockStateError, lambda: ix.insert(2, 2, 1, DISK)),  # already indexed
        (BlockStateError, lambda: ix.insert_chain([9, 3], [9, 3], None, DISK)),
        (InvalidArgumentError, lambda: ix.insert_chain([9, 9], [9, 9], None, DISK)),
        (InvalidArgumentError, lambda: ix.insert_chain([9, 10], [9], None, DISK)),
        (InvalidKeyError, lambda: ix.insert_chain(np.zeros((2, 2), np.uint64), [1], None, 1)),
        (InvalidKeyError, lambda: ix.insert_chain(np.array([-1]), [1], None, DISK)),
        (InvalidKeyError, lambda: ix.match("abc")),
        (InvalidArgumentError, lambda: ix.insert(9, 9, None, 16)),  # mask out of range
        (InvalidArgumentError, lambda: ix.insert(9, 9, None, True)),
        (InvalidArgumentError, lambda: ix.insert(9, 9, None, DISK, lora_name=5)),  # type: ignore[arg-type]
        (InvalidArgumentError, lambda: ix.insert(9, 9, None, DISK, tokens=b"x")),  # not G1/G2
        (InvalidArgumentError, lambda: ix.insert(9, 9, None, GPU, tokens="x")),  # type: ignore[arg-type]
        (InvalidArgumentError, lambda: ix.set_mask(int(rows[0]), -1)),
        (InvalidArgumentError, lambda: ix.set_g1(int(rows[0]), -2)),
        (InvalidArgumentError, lambda: ix.set_g2(int(rows[0]), 1.5)),
        (InvalidArgumentError, lambda: ix.mask("0")),
        (UnknownBlockError, lambda: ix.mask(99)),
        (UnknownBlockError, lambda: ix.set_mask(-1, 1)),
        (UnknownBlockError, lambda: ix.masks([0, 99])),
        (InvalidArgumentError, lambda: ix.masks([[0]])),
        (InvalidArgumentError, lambda: ix.touch(rows, -1)),
        (InvalidArgumentError, lambda: ix.touch(rows, 1 << 32)),
        (InvalidArgumentError, lambda: CompactIndex(0)),
    ]
    for exc, call in cases:
        with pytest.raises(exc):
            call()  # type: ignore[operator]
    assert snapshot(ix) == before
    assert [ix.last_access(int(r)) for r in rows] == [0, 0, 0]
    ix.check_invariants()
    ix.clear()
    assert len(ix) == 0 and ix.match([1]) == 0


def _core_ops() -> ModuleType:
    path = Path(__file__).resolve().parent.parent / "bench" / "core_ops.py"
    spec = importlib.util.spec_from_file_location("bench_core_ops_index", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_core_ops_index_scale_report_shape() -> None:
    core_ops = _core_ops()  # figures are not asserted: the shape of the report is
    rows = [core_ops.index_child(kind, 10_000, 5) for kind in ("compact", "PrefixIndex")]
    for row in rows:
        assert row["blocks"] == 10_000 and row["hit_us_median"] > 0
        row.update(bytes_x_target=1.0, match_x_target=1.0)
    assert rows[0]["array_bytes_per_block"] > 0 and rows[1]["array_bytes_per_block"] is None
    lines = core_ops.format_index_scale(rows).splitlines()
    assert "RSS B/block" in lines[0] and "hit us p99" in lines[0] and len(lines) == 5
    assert core_ops.index_sizes("10k, 10M") == [10_000, 10_000_000]
    assert core_ops.index_sizes("none") == []
    for bad in ("", "5k", "1M,x"):
        with pytest.raises(argparse.ArgumentTypeError):
            core_ops.index_sizes(bad)

"""KvIndexer (kvbm.router.indexer): prefixes per worker and medium, from events.

Expected hashes come from kvbm.hashing.hash_blocks over the whole prefix (the hashing has its
own tests); a randomized run compares the indexer with a plain reference model after every
event.
"""

from __future__ import annotations

import random

import pytest
import xxhash

from kvbm.errors import InvalidArgumentError, InvalidKeyError
from kvbm.events import AllBlocksCleared, BlockRemoved, BlockStored
from kvbm.events.records import AllMediaCleared
from kvbm.hashing import hash_blocks
from kvbm.medium import Medium
from kvbm.router import ClearScope, KvIndexer

BS = 4
GPU, CPU, DISK, OBJ = Medium.GPU, Medium.CPU_PINNED, Medium.DISK, Medium.OBJECT


def toks(n_blocks: int, start: int = 0) -> list[int]:
    return list(range(start, start + n_blocks * BS))


def seqs(tokens: list[int], **kw: object) -> list[int]:
    return hash_blocks(tokens, BS, **kw).sequence  # type: ignore[arg-type]


def vllm_hash(seq: int) -> int:
    """An opaque publisher hash (vLLM's are sha256-based): anything but kvbm's."""
    return xxhash.xxh3_64_intdigest(seq.to_bytes(8, "little"), seed=99)


def stored(hs: list[int], parent: int | None, tokens: list[int], medium: Medium,
           **kw: object) -> BlockStored:
    return BlockStored(hs, parent, tokens, BS, medium, **kw)  # type: ignore[arg-type]


def test_vllm_and_kvbm_events_for_the_same_tokens_meet_on_one_node() -> None:
    t = toks(6)
    s = seqs(t)
    v = [vllm_hash(x) for x in s]
    idx = KvIndexer()
    # vLLM: blocks 0..3 on the GPU under its own hashes, in two events chained by parent
    idx.apply("a", [stored(v[:2], None, t[:8], GPU), stored(v[2:4], v[1], t[8:16], GPU)])
    # kvbm's connector: blocks 0..5 on disk under kvbm's hashes
    idx.apply("a", [stored(s[:6], None, t, DISK)])
    assert idx.find_matches(t) == {"a": {GPU: 4, DISK: 2}}
    assert idx.find_matches(hashes=s) == {"a": {GPU: 4, DISK: 2}}
    # a kvbm store whose parent only vLLM announced (as kvbm's hash) still chains
    idx.apply("b", [stored(v[:1], None, t[:4], GPU)])
    idx.apply("b", [stored(s[1:3], s[0], t[4:12], CPU)])
    assert idx.find_matches(t)["b"] == {GPU: 1, CPU: 2}
    assert idx.stats().unknown_parents == 0
    assert idx.worker_blocks("a") == {**{h: frozenset({GPU}) for h in v[:4]},
                                      **{h: frozenset({DISK}) for h in s}}


def test_match_is_a_contiguous_prefix_counted_in_the_best_medium() -> None:
    t = toks(5)
    s = seqs(t)
    idx = KvIndexer(BS)
    idx.apply("w", [stored(s[:5], None, t, DISK), stored(s[:2], None, t[:8], GPU)])
    idx.apply("w", [BlockRemoved([s[2]], DISK)])  # a hole: blocks 3, 4 are unreachable
    assert idx.find_matches(t) == {"w": {GPU: 2}}
    assert idx.find_matches(t[:7]) == {"w": {GPU: 1}}  # a partial block is not matched
    assert idx.find_matches(toks(3, start=1000)) == {}
    assert idx.find_matches([]) == {}


def test_removal_from_one_medium_keeps_the_others() -> None:
    t = toks(3)
    s = seqs(t)
    idx = KvIndexer(BS)
    idx.apply("w", [stored(s, None, t, GPU), stored(s, None, t, OBJ)])
    idx.apply("w", [BlockRemoved(s[1:], GPU)])
    assert idx.find_matches(t) == {"w": {GPU: 1, OBJ: 2}}
    idx.apply("w", [BlockRemoved(s, OBJ)])
    assert idx.find_matches(t) == {"w": {GPU: 1}}
    idx.apply("w", [BlockRemoved(s[:1], GPU)])
    assert idx.find_matches(t) == {} and idx.worker_blocks("w") == {}
    assert idx.stats().nodes == 0


def test_unknown_parent_and_unknown_removal_are_counted_not_guessed() -> None:
    t = toks(4)
    s = seqs(t)
    idx = KvIndexer(BS)
    idx.apply("w", [stored([vllm_hash(s[2]), vllm_hash(s[3])], 12345, t[8:], GPU)])
    idx.apply("w", [BlockRemoved([777], GPU)])
    st = idx.stats()
    assert (st.unknown_parents, st.unknown_removals, st.nodes) == (1, 1, 0)
    assert idx.find_matches(t) == {} and idx.worker_blocks("w") == {}


def test_all_blocks_cleared_and_remove_worker_touch_only_that_worker() -> None:
    t = toks(3)
    s = seqs(t)
    idx = KvIndexer(BS)
    for w in ("a", "b", "c"):
        idx.apply(w, [stored(s, None, t, GPU)])
    idx.apply("a", [AllBlocksCleared()])  # a's blocks were on the GPU alone
    idx.remove_worker("b")
    assert idx.find_matches(t) == {"c": {GPU: 3}}
    assert idx.workers() == ["a", "c"]
    idx.apply("d", [stored(s[:1], None, t[:4], CPU)])  # takes b's freed slot
    assert idx.find_matches(t) == {"c": {GPU: 3}, "d": {CPU: 1}}
    idx.clear_worker("c")
    idx.remove_worker("nobody")
    assert idx.find_matches(t) == {"d": {CPU: 1}}


def test_two_publisher_hashes_for_one_node_need_two_removals() -> None:
    # two vLLM hashes for the same tokens on one worker (e.g. two cache salts the router
    # cannot see): the node stays resident until both are gone
    t = toks(2)
    s = seqs(t)
    idx = KvIndexer(BS)
    idx.apply("w", [stored([1, 2], None, t, GPU), stored([3, 4], None, t, GPU)])
    idx.apply("w", [BlockRemoved([1, 2], GPU)])
    assert idx.find_matches(t) == {"w": {GPU: 2}}
    idx.apply("w", [BlockRemoved([3, 4], GPU)])
    assert idx.find_matches(hashes=s) == {}


def test_a_hash_announced_again_for_other_tokens_replaces_the_old_blocks() -> None:
    idx = KvIndexer(BS)
    idx.apply("w", [stored([5], None, toks(1), GPU)])
    idx.apply("w", [stored([5], None, toks(1, start=50), DISK)])
    assert idx.find_matches(toks(1)) == {}
    assert idx.find_matches(toks(1, start=50)) == {"w": {DISK: 1}}
    assert idx.stats().conflicts == 1


def test_object_residency_is_shared_within_an_object_group() -> None:
    t = toks(4)
    s = seqs(t)
    idx = KvIndexer(BS)
    idx.apply("a", [stored(s, None, t, OBJ), stored(s[:1], None, t[:4], GPU)])
    idx.add_worker("b")
    idx.add_worker("c")
    assert idx.find_matches(t) == {"a": {GPU: 1, OBJ: 3}}
    idx.set_object_group("a", "bucket-1")
    idx.set_object_group("b", "bucket-1")
    idx.set_object_group("c", "bucket-2")
    assert idx.find_matches(t) == {"a": {GPU: 1, OBJ: 3}, "b": {OBJ: 4}}
    # b's own faster copy wins over the bucket
    idx.apply("b", [stored(s[:2], None, t[:8], DISK)])
    assert idx.find_matches(t)["b"] == {DISK: 2, OBJ: 2}
    idx.set_object_group("b", None)
    assert idx.find_matches(t)["b"] == {DISK: 2}
    assert idx.object_group("a") == "bucket-1" and idx.object_group("b") is None


def test_lora_and_salt_name_different_prefixes() -> None:
    t = toks(2)
    idx = KvIndexer(BS, salt="model-x")
    idx.apply("w", [stored([1, 2], None, t, GPU, lora_name="sql")])
    idx.apply("v", [stored([3, 4], None, t, GPU)])
    assert idx.find_matches(t) == {"v": {GPU: 2}}
    assert idx.find_matches(t, lora_name="sql") == {"w": {GPU: 2}}
    assert idx.find_matches(hashes=seqs(t, salt="model-x")) == {"v": {GPU: 2}}
    assert idx.find_matches(hashes=seqs(t)) == {}


def test_extra_keys_keep_a_block_from_matching_bare_tokens() -> None:
    t = toks(2)
    idx = KvIndexer(BS)
    idx.apply("w", [stored([1, 2], None, t, GPU, extra_keys=[["salt-a"], None])])
    idx.apply("v", [stored([3, 4], None, t, GPU, lora_name="l",
                           extra_keys=[["l"], ["l"]])])  # only the LoRA name: no media
    assert idx.find_matches(t) == {}
    assert idx.find_matches(t, lora_name="l") == {"v": {GPU: 2}}


def test_a_bad_event_refuses_the_whole_call() -> None:
    t = toks(2)
    s = seqs(t)
    idx = KvIndexer()
    good = stored(s, None, t, GPU)
    bad_events = [
        stored(s, None, t[:5], GPU),                       # token count != blocks * size
        stored([2**64], None, t[:4], GPU),                 # hash out of range
        stored([-1], None, t[:4], GPU),
        stored(s, 2**64, t, GPU),                          # parent out of range
        stored(s, None, [*t[:7], 2**32], GPU),             # token out of range
        stored(s, None, t, "GPU"),                         # type: ignore[arg-type]
        BlockStored(s, None, t, 0, GPU),                   # block size
        BlockRemoved(["x"], GPU),                          # type: ignore[list-item]
        "BlockStored",
    ]
    for bad in bad_events:
        with pytest.raises(InvalidArgumentError):
            idx.apply("w", [good, bad])
    assert idx.stats().events_applied == 0 and idx.workers() == []
    assert idx.block_size is None  # not adopted from a refused call
    assert idx.stats().rejected_events == len(bad_events)
    idx.apply("w", [good])
    with pytest.raises(InvalidArgumentError, match="block_size 8"):
        idx.apply("w", [BlockStored(s[:1], None, toks(1) * 2, 8, GPU)])
    assert idx.find_matches(t) == {"w": {GPU: 2}}


@pytest.mark.parametrize("call", [
    lambda i: i.apply(3, []),
    lambda i: i.apply("", []),
    lambda i: i.apply("w", 5),
    lambda i: i.apply("w", AllBlocksCleared()),
    lambda i: i.find_matches(),
    lambda i: i.find_matches([1], hashes=[1]),
    lambda i: i.find_matches(hashes=[2**64]),
    lambda i: i.find_matches(hashes="abc"),
    lambda i: i.find_matches(hashes=[1], lora_name="x"),
    lambda i: i.find_matches([-1, 2, 3, 4]),
    lambda i: i.find_matches("text"),
    lambda i: i.set_object_group("w", ""),
    lambda i: i.set_object_group(None, "g"),
    lambda i: i.worker_blocks(None),
])
def test_bad_arguments(call: object) -> None:
    idx = KvIndexer(BS)
    with pytest.raises(InvalidArgumentError):
        call(idx)  # type: ignore[operator]
    assert idx.workers() == []


def test_bad_constructor_arguments() -> None:
    for kw in ({"block_size": 0}, {"block_size": 1.5}, {"block_size": True}, {"salt": 1.5}):
        with pytest.raises(InvalidArgumentError):
            KvIndexer(**kw)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="no block size"):
        KvIndexer().find_matches([1, 2, 3, 4])
    with pytest.raises(InvalidKeyError):
        KvIndexer().find_matches(hashes=[-1])


# ------------------------------------------------------------------ reference model --

class Model:
    """What the indexer should hold: per worker, publisher hash -> (seq hash, media)."""

    def __init__(self) -> None:
        self.pubs: dict[str, dict[int, tuple[int, set[Medium]]]] = {}

    def nodes(self) -> set[int]:
        return {s for p in self.pubs.values() for s, media in p.values() if media}

    def store(self, w: str, pubs: list[int], parent: int | None, parent_seq: int | None,
              seq: list[int], medium: Medium, kvbm_style: bool) -> None:
        mine = self.pubs.setdefault(w, {})
        if parent is not None and parent not in mine and not (
                kvbm_style and parent_seq in self.nodes()):
            return  # unknown parent: dropped
        for h, s in zip(pubs, seq, strict=True):
            media = mine.setdefault(h, (s, set()))[1]
            media.add(medium)

    def remove(self, w: str, pubs: list[int], medium: Medium) -> None:
        mine = self.pubs.setdefault(w, {})
        for h in pubs:
            if h in mine:
                mine[h][1].discard(medium)
                if not mine[h][1]:
                    del mine[h]

    def blocks(self, w: str) -> dict[int, frozenset[Medium]]:
        return {h: frozenset(m) for h, (_, m) in self.pubs.get(w, {}).items()}

    def matches(self, seq: list[int]) -> dict[str, dict[Medium, int]]:
        out: dict[str, dict[Medium, int]] = {}
        for w, pubs in self.pubs.items():
            held: dict[int, set[Medium]] = {}
            for s, media in pubs.values():
                held.setdefault(s, set()).update(media)
            per: dict[Medium, int] = {}
            for s in seq:
                if not held.get(s):
                    break
                best = min(held[s], key=list(Medium).index)
                per[best] = per.get(best, 0) + 1
            if per:
                out[w] = per
        return out


@pytest.mark.parametrize("seed", range(6))
def test_random_events_against_a_reference_model(seed: int) -> None:
    # even seeds: AllBlocksCleared clears the GPU (the default), odd ones every medium
    scope = ClearScope.ALL if seed % 2 else ClearScope.GPU
    rng = random.Random(seed)
    # prompts sharing prefixes: a few roots, branches of them
    prompts: list[list[int]] = []
    for _ in range(8):
        base = rng.choice(prompts)[: BS * rng.randrange(0, 4)] if prompts else []
        prompts.append(base + [rng.randrange(100) for _ in range(BS * rng.randrange(1, 6))])
    workers = ["w0", "w1", "w2"]
    idx, model = KvIndexer(BS, clear_scope=scope), Model()
    for _ in range(300):
        w = rng.choice(workers)
        p = rng.choice(prompts)
        s = seqs(p)
        op = rng.random()
        kvbm_style = rng.random() < 0.5  # kvbm names blocks by seq hash, vLLM otherwise
        pub = (lambda x: x) if kvbm_style else vllm_hash
        medium = rng.choice(list(Medium)) if kvbm_style else GPU
        a = rng.randrange(len(s))
        b = rng.randrange(a, len(s)) + 1
        if op < 0.55:
            parent = pub(s[a - 1]) if a else None
            idx.apply(w, [stored([pub(x) for x in s[a:b]], parent, p[a * BS: b * BS], medium)])
            model.store(w, [pub(x) for x in s[a:b]], parent, s[a - 1] if a else None,
                        s[a:b], medium, kvbm_style)
        elif op < 0.95:
            idx.apply(w, [BlockRemoved([pub(x) for x in s[a:b]], medium)])
            model.remove(w, [pub(x) for x in s[a:b]], medium)
        elif op < 0.98:
            idx.apply(w, [AllBlocksCleared()])
            if scope is ClearScope.ALL:
                model.pubs[w] = {}
            else:
                model.remove(w, list(model.pubs.get(w, {})), GPU)
        else:
            idx.apply(w, [AllMediaCleared()])  # the router's own reset: every medium
            model.pubs[w] = {}
        assert idx.worker_blocks(w) == model.blocks(w)
    for p in prompts:
        assert idx.find_matches(p) == model.matches(seqs(p))
    counts = idx.block_counts()
    for w in workers:
        expected = {m: sum(m in media for media in model.blocks(w).values()) for m in Medium}
        assert counts.get(w, dict.fromkeys(Medium, 0)) == expected
    assert idx.stats().nodes == len(model.nodes())


@pytest.fixture(params=["native", "numpy"])
def walk(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Long walks in C (kvbm._xxh3) and through numpy (where it is not built): same runs."""
    import kvbm.router.table as table_mod

    if request.param == "numpy":
        monkeypatch.setattr(table_mod, "_native", None)
    elif table_mod._native is None:
        pytest.skip("kvbm._xxh3 was not built")
    return str(request.param)


@pytest.mark.parametrize("seed", range(3))
def test_long_prompts_against_the_reference_model(seed: int, walk: str) -> None:
    """Prompts of 64+ blocks take the table's copy for walks (kvbm.router.probe), hashed
    as walked (in C) or lazily (numpy); queries between events see every change."""
    rng = random.Random(seed)
    prompts: list[list[int]] = []
    for _ in range(6):
        base = rng.choice(prompts)[: BS * rng.randrange(0, 80)] if prompts else []
        prompts.append(base + [rng.randrange(100) for _ in range(BS * rng.randrange(20, 90))])
    workers = ["w0", "w1", "w2"]
    idx, model = KvIndexer(BS), Model()
    for step in range(400):
        w = rng.choice(workers)
        p = rng.choice(prompts)
        s = seqs(p)
        op = rng.random()
        medium = rng.choice(list(Medium))
        a = rng.randrange(len(s))
        b = min(len(s), a + rng.randrange(1, 40))
        if op < 0.6:
            parent = s[a - 1] if a else None
            idx.apply(w, [stored(s[a:b], parent, p[a * BS: b * BS], medium)])
            model.store(w, s[a:b], parent, parent, s[a:b], medium, True)
        elif op < 0.97:
            idx.apply(w, [BlockRemoved(s[a:b], medium)])
            model.remove(w, s[a:b], medium)
        else:
            idx.apply(w, [AllBlocksCleared()])
            model.remove(w, list(model.pubs.get(w, {})), GPU)
        if step % 5 == 0:
            q = rng.choice(prompts)
            expected = model.matches(seqs(q))
            assert idx.find_matches(q) == expected
            assert idx.find_matches(hashes=seqs(q)) == expected
            assert idx.find_matches(q + [1] * (BS - 1)) == expected  # a partial block


def test_long_prompts_with_lora_and_salt(walk: str) -> None:
    """The walk of a long prompt seeds its first block with the salt and every block with
    the adapter's seed, as hash_blocks does."""
    t = [i % 977 for i in range(120 * BS)]
    idx = KvIndexer(BS, salt="model-x")
    lora = seqs(t, lora_name="sql", salt="model-x")
    plain = seqs(t, salt="model-x")
    idx.apply("w", [stored(lora, None, t, GPU, lora_name="sql")])
    idx.apply("v", [stored(plain[:70], None, t[:70 * BS], DISK)])
    assert idx.find_matches(t) == {"v": {DISK: 70}}
    assert idx.find_matches(t, lora_name="sql") == {"w": {GPU: 120}}
    assert idx.find_matches(hashes=lora) == {"w": {GPU: 120}}
    assert idx.find_matches(hashes=seqs(t)) == {}  # unsalted: another prefix
    with pytest.raises(InvalidArgumentError):
        idx.find_matches(t, lora_name=b"sql")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError):
        idx.find_matches([*t[:-1], -1])


@pytest.mark.parametrize("bs", [1, 16, 61, 64])
def test_long_prompts_of_any_block_size(walk: str, bs: int) -> None:
    """Blocks of more than 240 bytes (60 tokens) take xxh3's long-input path."""
    t = [(i * 7919) % 50_000 for i in range(100 * bs)]
    s = hash_blocks(t, bs, salt=3).sequence
    idx = KvIndexer(bs, salt=3)
    idx.apply("w", [BlockStored(s[:90], None, t[:90 * bs], bs, CPU)])
    assert idx.find_matches(t) == {"w": {CPU: 90}}
    assert idx.find_matches(t[:80 * bs]) == {"w": {CPU: 80}}


def test_long_walks_after_a_mass_change_see_it(walk: str) -> None:
    """More changes than the walk's copy takes one by one: it is rebuilt."""
    t = [i % 50_000 for i in range(6000 * BS)]
    s = seqs(t)
    idx = KvIndexer(BS)
    idx.apply("a", [stored(s, None, t, DISK)])
    idx.apply("b", [stored(s[:100], None, t[:400], GPU)])
    assert idx.find_matches(t) == {"a": {DISK: 6000}, "b": {GPU: 100}}
    idx.apply("b", [stored(s[100:5000], s[99], t[400:20000], GPU)])
    assert idx.find_matches(t) == {"a": {DISK: 6000}, "b": {GPU: 5000}}
    idx.clear_worker("a")
    assert idx.find_matches(hashes=s) == {"b": {GPU: 5000}}
    idx.apply("b", [AllBlocksCleared()])
    assert idx.find_matches(t) == {}
    assert idx.find_matches([7] * (100 * BS)) == {}  # a miss at the first block


def test_the_walks_hash_table_wraps_around_and_deletes() -> None:
    """kvbm.router.probe: keys that share the last home slot wrap around to the first
    slots, in a build and in an update; a deleted key leaves a tombstone probes pass."""
    import numpy as np

    from kvbm.router.probe import EMPTY, ProbeIndex

    cap = ProbeIndex({}).cap
    rows = [("r", i) for i in range(3)]
    last = [k * cap + cap - 1 for k in range(1, 9)]  # all at home slot cap - 1
    table = {h: rows[i % 3] for i, h in enumerate(last)}
    p = ProbeIndex(table)
    assert p.cap == cap
    q = np.array([*last, 5, cap - 1], np.uint64)
    got = p.lookup(q).tolist()
    assert [p.rows[r] for r in got[:8]] == [table[h] for h in last] and got[8:] == [EMPTY] * 2
    more = [k * cap + cap - 2 for k in range(1, 4)]
    table.update((h, rows[0]) for h in more)
    del table[last[2]], table[last[5]]
    p.update([*more, last[2], last[5]], table)
    keys = [*last, *more]
    got = p.lookup(np.array(keys, np.uint64)).tolist()
    assert [None if r == EMPTY else p.rows[r] for r in got] == [table.get(h) for h in keys]


def test_the_native_walk_reads_the_same_table() -> None:
    """kvbm._xxh3.walk_hashes over a table with wrapped keys and tombstones: the runs of
    row ids of the leading keys found, as ProbeIndex.lookup finds them; a table of the
    wrong size is refused."""
    import array

    import numpy as np

    from kvbm.router.probe import ProbeIndex

    native = pytest.importorskip("kvbm._xxh3")
    cap = ProbeIndex({}).cap
    rows = [("r", i) for i in range(3)]
    last = [k * cap + cap - 1 for k in range(1, 9)]
    table = {h: rows[i // 3] for i, h in enumerate(last)}
    p = ProbeIndex(table)
    del table[last[4]]
    p.update([last[4]], table)  # a tombstone inside the wrapped cluster

    def walk(keys: list[int]) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = native.walk_hashes(p.table, p.cap - 1,
                                                         array.array("Q", keys))
        return out

    got = [(p.rows[r], n) for r, n in walk([last[0], last[1], last[3], last[5], last[7]])]
    assert got == [(rows[0], 2), (rows[1], 2), (rows[2], 1)]
    assert [(p.rows[r], n) for r, n in walk([last[0], last[4], last[1]])] == [(rows[0], 1)]
    assert walk([]) == [] and walk([5]) == []
    ids = p.lookup(np.array([last[0], last[7]], np.uint64)).tolist()
    assert [r for r, _ in walk([last[0], last[7]])] == ids
    with pytest.raises(ValueError):
        native.walk_hashes(p.table[:-1], p.cap - 1, array.array("Q", [1]))
    with pytest.raises(ValueError):
        native.walk_hashes(p.table, p.cap, array.array("Q", [1]))
    with pytest.raises(ValueError):
        native.walk_hashes(p.table, p.cap - 1, b"123")  # not u64 words
    with pytest.raises(ValueError):
        native.walk_tokens(p.table, p.cap - 1, b"", 0, 1, 1)

"""Every public entry point, fed malformed arguments: it raises a kvbm.errors class (never a
bare TypeError, AttributeError, UnicodeEncodeError ...) and changes nothing: counters,
events, index, residency and held pages are the same afterwards."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from kvbm import BlockManager, DeviceTierConfig, HostTierConfig, KVLayout, ManagerConfig
from kvbm.config import OffloadConfig
from kvbm.errors import ConfigError, InvalidArgumentError, InvalidKeyError, KvbmError
from kvbm.hashing import BlockHashes, hash_blocks
from kvbm.index import MatchResult
from kvbm.storage.disk import DiskTierConfig

BS = 4
LAYOUT = KVLayout(2, 2, 4, BS, "float32")
SURROGATE = "adapter-\ud800"  # a lone surrogate: a str with no UTF-8 form


def toks(n_blocks: int, base: int = 0) -> np.ndarray:
    return np.arange(base, base + n_blocks * BS, dtype=np.uint32)


class World:
    """One manager with every tier kind in memory and on disk, in a known state: a cached
    conversation (G1, G2, disk), held committed and uncommitted pages, a match result."""

    def __init__(self, root: Any) -> None:
        self.mgr = BlockManager(LAYOUT, ManagerConfig(
            device=DeviceTierConfig(8, device="cpu"), host=HostTierConfig(16),
            disk=DiskTierConfig(root / "g3", capacity_bytes=1 << 22, slab_bytes=1 << 20)))
        mgr = self.mgr
        for base in (0, 1000):
            m = mgr.match_prefix(toks(3, base))
            mgr.release(mgr.commit(mgr.allocate(3), toks(3, base), hashes=m.hashes))
        self.match = mgr.match_prefix(toks(3))
        self.held = mgr.onboard(self.match)  # committed, held by the "engine"
        self.loose = mgr.allocate(2)  # uncommitted, held
        self.done_handle = mgr.onboard_async(self.match)
        assert self.done_handle.done()
        mgr.release(self.done_handle.block_ids)
        mgr.flush()
        mgr.take_events()

    def snapshot(self) -> tuple[Any, ...]:
        mgr = self.mgr
        mgr.check_invariants()
        g1 = mgr.device_pool.allocator
        g2 = mgr.host_pool.allocator  # type: ignore[union-attr]
        index = sorted((r.seq_hash, r.mask, r.g1, r.g2, r.frequency, r.last_access)
                       for r in mgr._index)
        return (mgr.stats(), [g1.refcount(s) for s in range(g1.num_slots)],
                [g2.refcount(s) for s in range(g2.num_slots)], g1.num_free, g2.num_free,
                index, len(mgr.take_events()), mgr.closed)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = World(tmp_path_factory.mktemp("bad-input"))
    yield w
    w.mgr.close()


def forged_match(w: World, sequence_hashes: Any) -> MatchResult:
    m = w.match
    return MatchResult(m.num_blocks, m.by_medium, sequence_hashes, m.hashes, m.mediums)


#: values that are wrong almost everywhere an int, a float, a str or a list is expected
JUNK: list[Any] = [None, 1.5, math.nan, math.inf, -math.inf, True, np.bool_(True), "x", b"x",
                   -1, 2**64, 10**30, np.float64(1.0), np.float32(math.nan), [None], {"a": 1},
                   object(), {1, 2}, (1.5,), bytearray(b"ab")]
BAD_TOKENS: list[Any] = [None, 1.5, "hello", b"abcd", [[1, 2], [3, 4]], [1.5] * 8, [-1] * 8,
                         [2**32] * 8, [2**64] * 8, np.full(8, 1.5), np.full(8, math.nan),
                         np.array([[1, 2], [3, 4]]), [True] * 8, [None] * 8, {1, 2, 3},
                         {"a": 1}, object(), np.array([-1] * 8), ["1"] * 8,
                         np.array([2**40] * 8, dtype=np.uint64)]
BAD_LORA: list[Any] = [SURROGATE, "\udfff", 5, 1.5, b"adapter", ["a"], math.nan, True,
                       object()]
BAD_MM: list[Any] = [5, "x", b"x", 1.5, {0: [-1]}, {0: [2**64]}, {0: [1.5]}, {0: ["a"]},
                     {-1: [1]}, {"a": [1]}, {0: 5}, [[math.nan]], {True: [1]}, {0: [True]},
                     {1.5: [1]}, {0: "abc"}, object(), [object()]]
BAD_TIMEOUTS: list[Any] = [math.nan, math.inf, -math.inf, -1, -0.5, "1", b"1", True,
                           np.bool_(False), [1], 10**400, np.float64(math.nan), object()]
BAD_IDS_CONTAINER: list[Any] = [None, "ab", b"\x00\x01", 5, 1.5, math.nan, {0: 1}, object(),
                                np.zeros((1, 1), dtype=np.int64), np.int64(0)]
BAD_IDS: list[Any] = [[1.5], [None], [-1], [2**64], [99], [True], [np.bool_(True)], ["0"],
                      [math.nan], [[0]], [np.float64(0.0)]]


def bad_hashes() -> list[Any]:
    return [None, "x", [1, 2], (1, 2), 5, BlockHashes([1], [1, 2]), BlockHashes(["a"], ["b"]),
            BlockHashes([-1], [-1]), BlockHashes([2**64], [2**64]), BlockHashes([1.5], [1.5]),
            BlockHashes([True], [True]), BlockHashes(None, None),  # type: ignore[arg-type]
            BlockHashes([np.uint64(1)], [np.uint64(1)])]


def cases() -> Iterator[tuple[str, Callable[[World], object]]]:
    """(name, call) pairs; the call gets the world and makes one bad call."""
    for i, t in enumerate(BAD_TOKENS):
        yield f"match_prefix-tokens-{i}", lambda w, t=t: w.mgr.match_prefix(t)
        yield f"commit-tokens-{i}", lambda w, t=t: w.mgr.commit(w.loose, t)
    for i, v in enumerate(BAD_LORA):
        yield f"match_prefix-lora-{i}", lambda w, v=v: w.mgr.match_prefix(toks(2), lora_name=v)
        yield f"match_hashes-lora-{i}", lambda w, v=v: w.mgr.match_hashes(w.match.hashes,
                                                                           lora_name=v)
        yield f"commit-lora-{i}", lambda w, v=v: w.mgr.commit(w.loose, toks(2, 500),
                                                               lora_name=v)
        yield f"commit-lora-hashes-{i}", lambda w, v=v: w.mgr.commit(
            w.loose, toks(2, 500), hashes=hash_blocks(toks(2, 500), BS), lora_name=v)
        yield f"hash_blocks-lora-{i}", lambda w, v=v: hash_blocks(toks(2), BS, lora_name=v)
    for i, v in enumerate([SURROGATE, "\udfff", -1, 2**64, 1.5, ["a"], math.nan, True,
                           object(), bytearray(b"x")]):
        yield f"hash_blocks-salt-{i}", lambda w, v=v: hash_blocks(toks(2), BS, salt=v)
    for i, v in enumerate(BAD_MM):
        yield f"match_prefix-mm-{i}", lambda w, v=v: w.mgr.match_prefix(toks(2), mm_hashes=v)
        yield f"commit-mm-{i}", lambda w, v=v: w.mgr.commit(w.loose, toks(2, 500), mm_hashes=v)
    for i, h in enumerate(bad_hashes()):
        yield f"match_hashes-{i}", lambda w, h=h: w.mgr.match_hashes(h)
        if h is not None:  # None: computed from the tokens
            yield f"commit-hashes-{i}", lambda w, h=h: w.mgr.commit(w.loose, toks(2, 500),
                                                                     hashes=h)
    for i, v in enumerate([*BAD_TOKENS[1:6], 5]):  # (None: no tokens given)
        yield f"match_hashes-tokens-{i}", lambda w, v=v: w.mgr.match_hashes(w.match.hashes,
                                                                             tokens=v)
    for name in ("onboard", "onboard_async"):
        for i, v in enumerate(JUNK):
            yield f"{name}-{i}", lambda w, v=v, name=name: getattr(w.mgr, name)(v)
        yield f"{name}-hashes", lambda w, name=name: getattr(w.mgr, name)(w.match.hashes)
    for i, keys in enumerate([["a"], [[1]], [-1], [2**64], [1.5], [None], [True], "abc", None,
                              5, {1: 2}]):
        for name in ("onboard", "onboard_async"):
            yield f"{name}-forged-{i}", lambda w, k=keys, name=name: getattr(w.mgr, name)(
                forged_match(w, k))
    for i, v in enumerate([*JUNK[:4], *JUNK[5:9], -1, np.float64(1.0), [1], "1",
                           np.bool_(True)]):
        yield f"allocate-{i}", lambda w, v=v: w.mgr.allocate(v)
    for i, v in enumerate([10**30, 2**64, 9]):  # more than G1 holds: refused, nothing taken
        yield f"allocate-huge-{i}", lambda w, v=v: w.mgr.allocate(v)
    for i, v in enumerate([*BAD_IDS_CONTAINER, {0, 1}, iter([0, 1])]):
        yield f"commit-ids-{i}", lambda w, v=v: w.mgr.commit(v, toks(2, 500))
    for i, v in enumerate(BAD_IDS):
        yield f"commit-id-{i}", lambda w, v=v: w.mgr.commit([w.loose[0], *v], toks(2, 500))
    yield "commit-held-committed", lambda w: w.mgr.commit(w.held[:1], toks(1))
    yield "commit-duplicates", lambda w: w.mgr.commit([w.loose[0]] * 2, toks(2, 500))
    for i, v in enumerate([-1, 1.5, None, "0", True, math.nan, np.float64(0), 2**64, 10**30,
                           [0]]):
        yield f"commit-start_block-{i}", lambda w, v=v: w.mgr.commit(w.loose, toks(4, 500),
                                                                      start_block=v)
    yield "commit-start_block-orphan", lambda w: w.mgr.commit(w.loose, toks(4, 500),
                                                               start_block=2)
    for name in ("release", "offload"):
        for i, v in enumerate(BAD_IDS_CONTAINER):
            if v is None and name == "offload":
                continue  # offload(None) means "every committed block"
            yield f"{name}-ids-{i}", lambda w, v=v, name=name: getattr(w.mgr, name)(v)
        for i, v in enumerate(BAD_IDS):
            yield f"{name}-id-{i}", lambda w, v=v, name=name: getattr(w.mgr, name)(
                [w.held[0], *v])
    yield "release-more-than-held", lambda w: w.mgr.release([w.loose[0]] * 2)
    yield "offload-uncommitted", lambda w: w.mgr.offload(w.loose)
    for i, v in enumerate([*JUNK[:8], 99, 8, np.float64(0), [0], "0"]):
        yield f"block_view-{i}", lambda w, v=v: w.mgr.block_view(v)
    for i, v in enumerate([*JUNK[:12], np.float64(1.0), -(2**70), "abc"]):
        yield f"lookup-{i}", lambda w, v=v: w.mgr.lookup(v)
    for i, v in enumerate(BAD_TIMEOUTS):
        yield f"flush-{i}", lambda w, v=v: w.mgr.flush(timeout=v)
        yield f"close-timeout-{i}", lambda w, v=v: w.mgr.close(timeout=v)
        yield f"onboard_handle-wait-{i}", lambda w, v=v: w.done_handle.wait(v)
    for i, v in enumerate(["yes", 1, 0, 1.5, math.nan, [True], np.bool_(True)]):
        yield f"close-flush-{i}", lambda w, v=v: w.mgr.close(flush=v)
    for i, v in enumerate([-1, 2**64, 1.5, "x", True, math.nan, [1], np.int64(-1)]):
        yield f"hash_blocks-parent-{i}", lambda w, v=v: hash_blocks(toks(2), BS, parent_hash=v)
    for i, v in enumerate([0, -1, 1.5, None, "4", True, 2**64 * 1.0]):
        yield f"hash_blocks-block_size-{i}", lambda w, v=v: hash_blocks(toks(2), v)


CASES = list(cases())


@pytest.mark.parametrize("call", [c for _, c in CASES], ids=[n for n, _ in CASES])
def test_bad_argument_raises_a_kvbm_error_and_changes_nothing(world: World, call) -> None:
    before = world.snapshot()
    with pytest.raises(KvbmError) as e:
        call(world)
    assert str(e.value)
    after = world.snapshot()
    assert after == before


def test_the_sweep_covers_every_public_entry_point() -> None:
    entry = {n.split("-")[0] for n, _ in CASES}
    public = {"match_prefix", "match_hashes", "onboard", "onboard_async", "allocate", "commit",
              "release", "offload", "block_view", "lookup", "flush", "close",
              "onboard_handle", "hash_blocks"}
    assert public <= entry


def test_the_world_still_works_after_the_sweep(world: World) -> None:
    mgr = world.mgr
    mgr.release(world.held)
    mgr.release(world.loose)
    m = mgr.match_prefix(toks(3, 1000))
    ids = mgr.onboard(m)
    assert len(ids) == 3
    mgr.release(ids)
    mgr.check_invariants()


def test_type_errors_are_also_type_errors() -> None:
    """InvalidArgumentError subclasses TypeError and ValueError: code that catches either,
    knowing nothing of kvbm, still handles it."""
    mgr = BlockManager(LAYOUT, ManagerConfig(device=DeviceTierConfig(4, device="cpu")))
    with pytest.raises(TypeError):
        mgr.release(None)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        mgr.allocate(-1)
    with pytest.raises(InvalidKeyError):
        mgr.lookup(-1)
    with pytest.raises(InvalidArgumentError, match="UTF-8"):
        mgr.match_prefix(toks(2), lora_name=SURROGATE)
    mgr.close()


@pytest.mark.parametrize("salt", [SURROGATE, 5, b"x", 1.5])
def test_manager_config_salt_must_be_a_utf8_string(salt) -> None:
    with pytest.raises(ConfigError, match="salt"):
        ManagerConfig(device=DeviceTierConfig(4, device="cpu"), salt=salt)


@pytest.mark.parametrize("field,bad", [("load_timeout_s", math.nan),
                                       ("close_timeout_s", math.nan),
                                       ("exit_flush_timeout_s", -1)])
def test_nan_and_negative_deadlines_in_config_are_refused(field, bad) -> None:
    with pytest.raises(ConfigError):
        OffloadConfig(**{field: bad})


def test_a_match_tampered_with_after_the_fact_is_refused(world: World) -> None:
    import dataclasses

    before = world.snapshot()
    m = world.mgr.match_prefix(toks(3))
    replaced = dataclasses.replace(m, sequence_hashes=[-1, *m.sequence_hashes])
    with pytest.raises(InvalidKeyError):
        world.mgr.onboard(replaced)  # a copy is checked again
    m.sequence_hashes.insert(0, [1])  # an unhashable "hash" in a real match's own list
    with pytest.raises(InvalidKeyError):
        world.mgr.onboard(m)
    after = world.snapshot()
    assert after[1:] == before[1:]  # (the two matches counted as lookups)


def test_offload_engine_entry_points_validate() -> None:
    from kvbm.offload import OffloadEngine

    engine = OffloadEngine()
    try:
        for bad in ("x", None, 5):
            with pytest.raises(InvalidArgumentError):
                engine.submit(bad)  # type: ignore[arg-type]
        for t in (math.nan, math.inf, -1.0, "1", True):
            with pytest.raises(InvalidArgumentError):
                engine.shutdown(timeout=t)  # type: ignore[arg-type]
        assert engine.run(_answer()) == 42  # still running
    finally:
        engine.shutdown()


async def _answer() -> int:
    return 42

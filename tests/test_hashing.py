"""Block hashing (docs/architecture.md): hand-computed vectors, native == pure Python, bad input.

Expected values are built here byte by byte from ``xxhash`` and ``struct``, never from kvbm,
so a wrong seed, byte order, chain step or block split in kvbm makes these tests fail.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from kvbm import hashing
from kvbm.errors import TokenError
from kvbm.hashing import BlockHashes, as_token_array, hash_blocks

X = xxhash.xxh3_64_intdigest
U64 = 2**64 - 1
SEED = 1337


def tok(ts: list[int]) -> bytes:
    """Token ids as u32 little-endian bytes."""
    return struct.pack(f"<{len(ts)}I", *ts)


def pair(a: int, b: int) -> bytes:
    return struct.pack("<QQ", a, b)


def expected_chain(local: list[int], parent: int | None = None) -> list[int]:
    seq: list[int] = []
    for loc in local:
        if not seq and parent is None:
            seq.append(loc)
        else:
            prev = seq[-1] if seq else parent
            assert prev is not None
            seq.append(X(pair(prev, loc), SEED))
    return seq


@contextmanager
def python_path() -> Iterator[None]:
    """Force kvbm.hashing onto its pure-Python path (usable inside hypothesis tests)."""
    saved = hashing._accel
    hashing._accel = None
    try:
        yield
    finally:
        hashing._accel = saved


@pytest.fixture(params=["native", "python"])
def impl(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "python":
        monkeypatch.setattr(hashing, "_accel", None)
    elif hashing._accel is None:
        pytest.skip("kvbm._xxh3 was not built (no C compiler?)")
    return str(request.param)


def tokens(n: int, start: int = 0) -> list[int]:
    # spread over the whole u32 range so every byte of the encoding matters
    return [(start + i) * 2654435761 % 2**32 for i in range(n)]


# ---------------------------------------------------------------- (a) hand-computed vectors


@pytest.mark.parametrize("bs", [1, 2, 3, 4, 16, 32, 33, 60, 61, 64, 80, 300])
def test_plain_tokens(impl: str, bs: int) -> None:
    ts = tokens(3 * bs)
    blocks = [ts[i * bs:(i + 1) * bs] for i in range(3)]
    local = [X(tok(b), SEED) for b in blocks]
    seq = [local[0], X(pair(local[0], local[1]), SEED)]
    seq.append(X(pair(seq[1], local[2]), SEED))
    for given_tokens in (ts, np.array(ts, dtype=np.uint32), np.array(ts, dtype=np.int64)):
        h = hash_blocks(given_tokens, bs)
        assert h.local == local
        assert h.sequence == seq
        assert len(h) == 3


def test_known_value_of_empty_seeded_block() -> None:
    # One fixed published-format value, so a broken xxhash install cannot hide behind itself.
    assert X(b"", 0) == 0x2D06800538D394C2


def test_lora_seed(impl: str) -> None:
    ts = tokens(32)
    lora_seed = (SEED + X(b"my-adapter")) % 2**64
    local = [X(tok(ts[:16]), lora_seed), X(tok(ts[16:]), lora_seed)]
    h = hash_blocks(ts, 16, lora_name="my-adapter")
    assert h.local == local
    assert h.sequence == [local[0], X(pair(local[0], local[1]), SEED)]  # chain seed stays 1337
    assert h.local != hash_blocks(ts, 16).local


def test_multimodal(impl: str) -> None:
    ts = tokens(48)
    m1, m2, m3 = 0xFFFF_0000_1234_5678, 42, 2**63 + 7
    local = [
        X(tok(ts[:16]), SEED),
        X(tok(ts[16:32]) + struct.pack("<QQ", m2, m1), SEED),  # sorted: 42 < m1
        X(tok(ts[32:48]) + struct.pack("<Q", m3), SEED),
    ]
    for mm in ({1: [m1, m2], 2: [m3]}, [None, [m1, m2], [m3]], {1: [m2, m1], 2: [m3], 3: [5]}):
        h = hash_blocks(ts, 16, mm_hashes=mm)
        assert h.local == local
        assert h.sequence == expected_chain(local)
    # media in the first block of a salted sequence: hashed with the salted seed
    seed0 = (SEED + X(b"tenant")) % 2**64
    h = hash_blocks(ts, 16, mm_hashes={0: [m1, m3]}, salt="tenant")  # sorted: m3 < m1
    assert h.local == [X(tok(ts[:16]) + struct.pack("<QQ", m3, m1), seed0),
                       X(tok(ts[16:32]), SEED), X(tok(ts[32:]), SEED)]


def test_salt_changes_only_first_seed(impl: str) -> None:
    ts = tokens(48)
    plain = [X(tok(ts[i:i + 16]), SEED) for i in (0, 16, 32)]
    for salt, salt_bytes in (("model-a", b"model-a"), (b"\x00\x01", b"\x00\x01"),
                             (7, struct.pack("<Q", 7))):
        seed0 = (SEED + X(salt_bytes)) % 2**64
        local = [X(tok(ts[:16]), seed0), plain[1], plain[2]]
        h = hash_blocks(ts, 16, salt=salt)
        assert h.local == local
        assert h.sequence == expected_chain(local)
        assert all(a != b for a, b in zip(h.sequence, expected_chain(plain), strict=True))
    # salt composes with a LoRA seed by addition
    lseed = (SEED + X(b"lora")) % 2**64
    seed0 = (lseed + X(b"salt")) % 2**64
    h = hash_blocks(ts, 16, lora_name="lora", salt="salt")
    assert h.local == [X(tok(ts[:16]), seed0), X(tok(ts[16:32]), lseed), X(tok(ts[32:]), lseed)]


def test_parent_hash_continuation(impl: str) -> None:
    ts = tokens(64)
    local = [X(tok(ts[i:i + 16]), SEED) for i in range(0, 64, 16)]
    parent = 0xDEAD_BEEF_0BAD_F00D
    h = hash_blocks(ts, 16, parent_hash=parent)
    s0 = X(pair(parent, local[0]), SEED)
    s1 = X(pair(s0, local[1]), SEED)
    assert h.local == local
    assert h.sequence[:2] == [s0, s1]
    assert h.sequence == expected_chain(local, parent)
    # continuing from a prefix's last sequence hash reproduces the whole sequence's tail
    full = hash_blocks(ts, 16)
    tail = hash_blocks(ts[32:], 16, parent_hash=full.sequence[1])
    assert tail.sequence == full.sequence[2:]
    assert full[2:] == BlockHashes(full.local[2:], full.sequence[2:])
    # the salt only seeds a sequence's first block, so it is ignored when continuing
    assert hash_blocks(ts, 16, parent_hash=parent, salt="x") == h
    # chain() on its own, with parent 0 (falsy but not None) and the u64 extremes
    assert hashing.chain(local, 0) == expected_chain(local, 0)
    assert hashing.chain([U64, 0], U64) == expected_chain([U64, 0], U64)
    assert hashing.chain([]) == []


def test_partial_trailing_block_ignored(impl: str) -> None:
    ts = tokens(16 * 2 + 5)
    local = [X(tok(ts[:16]), SEED), X(tok(ts[16:32]), SEED)]
    h = hash_blocks(ts, 16)
    assert h.local == local
    assert h.sequence == expected_chain(local)
    assert hash_blocks(ts[:15], 16) == BlockHashes([], [])
    assert hash_blocks([], 16) == BlockHashes([], [])
    # media in the partial block are ignored with it
    assert hash_blocks(ts, 16, mm_hashes={2: [99]}) == h


# ------------------------------------------------------------ (b) native == pure Python


needs_native = pytest.mark.skipif(hashing._accel is None, reason="kvbm._xxh3 was not built")


@needs_native
def test_native_local_hashes_every_length() -> None:
    """Lengths 1..2100 cross the 1-3 / 4-8 / 9-16 / 17-128 / 129-240 / long (incl. several
    1024-byte blocks) paths; seeds include 0 (long path on the default secret) and 2**64-1."""
    accel = hashing._accel
    assert accel is not None
    seeds = [0, SEED, U64, 0x0123_4567_89AB_CDEF]
    for length in [*range(1, 2100), 4096, 4097, 10_000]:
        buf = os.urandom(length * 2)
        for seed in seeds:
            first = seeds[(seeds.index(seed) + 1) % len(seeds)]
            assert accel.local_hashes(buf, length, seed, first) == [
                X(buf[:length], first), X(buf[length:], seed)], (length, seed)


@needs_native
def test_native_chain_and_buffers() -> None:
    accel = hashing._accel
    assert accel is not None
    local = [X(bytes([i]), 0) for i in range(50)]
    assert accel.chain(local, None) == expected_chain(local)
    assert accel.chain(tuple(local), 3) == expected_chain(local, 3)
    assert accel.chain(np.array(local, dtype=np.uint64), np.uint64(3)) == expected_chain(local, 3)
    arr = np.arange(32, dtype="<u4")
    assert accel.local_hashes(arr, 64, 1, 2) == [X(arr[:16].tobytes(), 2),
                                                 X(arr[16:].tobytes(), 1)]
    assert accel.local_hashes(b"", 16, 1, 1) == []


@needs_native
@settings(max_examples=300, deadline=None)
@given(
    toks=st.lists(st.integers(0, 2**32 - 1), max_size=400),
    bs=st.integers(1, 80),
    lora=st.none() | st.text(max_size=8),
    salt=st.none() | st.binary(max_size=8) | st.integers(0, U64),
    parent=st.none() | st.integers(0, U64),
)
def test_native_equals_python(toks: list[int], bs: int, lora: str | None,
                              salt: bytes | int | None, parent: int | None) -> None:
    arr = np.array(toks, dtype=np.uint32)
    native = hash_blocks(arr, bs, lora_name=lora, salt=salt, parent_hash=parent)
    with python_path():
        python = hash_blocks(arr, bs, lora_name=lora, salt=salt, parent_hash=parent)
    assert native == python
    assert len(native) == len(toks) // bs


@needs_native
@settings(max_examples=300, deadline=None)
@given(data=st.binary(min_size=1, max_size=330), n=st.integers(1, 3),
       seed=st.integers(0, U64), first=st.integers(0, U64))
def test_native_local_hashes_random_seeds(data: bytes, n: int, seed: int, first: int) -> None:
    accel = hashing._accel
    assert accel is not None
    buf = data * n
    step = len(data)
    got = accel.local_hashes(buf, step, seed, first)
    assert got == [X(buf[i * step:(i + 1) * step], first if i == 0 else seed) for i in range(n)]


# ------------------------------------------------------------------------- (c) bad input


@pytest.mark.parametrize(("bad", "index"), [
    ([1, 2, -1], 2),
    ([0, 2**32], 1),
    ([5, 2**70, 3], 1),  # too big even for int64: object dtype
    (np.array([0, 1, 2, 3, 4, 2**32 + 1], dtype=np.int64), 5),
    (np.array([7, -3], dtype=np.int8), 1),
    (np.array([1, 2**63], dtype=np.uint64), 1),
])
def test_tokens_outside_u32_name_the_index(impl: str, bad: object, index: int) -> None:
    with pytest.raises(ValueError, match=rf"index {index}\b"):
        hash_blocks(bad, 1)


@pytest.mark.parametrize("bad", [
    [[1, 2], [3, 4]],
    np.zeros((2, 16), dtype=np.uint32),
    [1.0, 2.0],
    np.array([1.5]),
    "abcd",
    ["a", "b"],
    [1, "x"],
    [True, False],
    7,
])
def test_malformed_tokens_raise_token_error(impl: str, bad: object) -> None:
    with pytest.raises(TokenError):
        hash_blocks(bad, 1)
    assert issubclass(TokenError, ValueError)


@pytest.mark.parametrize("bs", [0, -1, 1.0, True, None])
def test_bad_block_size(impl: str, bs: object) -> None:
    with pytest.raises(ValueError, match="block_size"):
        hash_blocks([1, 2, 3], bs)  # type: ignore[arg-type]


def test_bad_mm_hashes_and_salt(impl: str) -> None:
    with pytest.raises(ValueError):
        hash_blocks(tokens(4), 2, mm_hashes={0: [-1]})
    with pytest.raises(ValueError):
        hash_blocks(tokens(4), 2, mm_hashes={0: [2**64]})
    with pytest.raises(ValueError):
        hash_blocks(tokens(4), 2, salt=-1)


@pytest.mark.parametrize("kw", [
    {"lora_name": "lora-\ud800"}, {"lora_name": 5}, {"lora_name": b"lora"},
    {"salt": "salt-\udc80"}, {"salt": 1.5}, {"salt": 2**64}, {"salt": True},
    {"parent_hash": -1}, {"parent_hash": 2**64}, {"parent_hash": 1.5}, {"parent_hash": True},
    {"mm_hashes": {0: [1.5]}}, {"mm_hashes": {0: ["7"]}}, {"mm_hashes": {0: [True]}},
    {"mm_hashes": {-1: [7]}}, {"mm_hashes": {"0": [7]}}, {"mm_hashes": {0: 7}},
    {"mm_hashes": 7}, {"mm_hashes": "ab"}, {"mm_hashes": {9: [-1]}},
])
@pytest.mark.parametrize("n_tokens", [0, 4])
def test_bad_arguments_raise_kvbm_errors_even_where_unused(impl: str, kw: dict[str, object],
                                                           n_tokens: int) -> None:
    """Lone surrogates (no UTF-8 form), wrong types and out-of-range values are refused with
    a kvbm error, also when they would not change the result (no full block, media of the
    partial block, a salt after a parent)."""
    from kvbm.errors import KvbmError

    if "salt" in kw:
        kw = {**kw, "parent_hash": 7} if n_tokens else kw
    with pytest.raises(KvbmError):
        hash_blocks(tokens(n_tokens), 2, **kw)  # type: ignore[arg-type]


def test_lora_and_salt_are_hashed_as_utf8(impl: str) -> None:
    ts = tokens(2)
    seed = (SEED + X("é".encode())) % 2**64
    assert hash_blocks(ts, 2, lora_name="é").local[0] == X(tok(ts), seed)
    assert hash_blocks(ts, 2, mm_hashes={0: [np.uint64(5)]}) == hash_blocks(
        ts, 2, mm_hashes={0: [5]})  # numpy ints are ints


@needs_native
def test_native_rejects_bad_arguments() -> None:
    accel = hashing._accel
    assert accel is not None
    with pytest.raises(OverflowError, match="index 1"):
        accel.chain([1, -1], None)
    with pytest.raises(OverflowError, match="index 0"):
        accel.chain([2**64], None)
    with pytest.raises(TypeError, match="index 2"):
        accel.chain([1, 2, "x"], None)
    with pytest.raises(TypeError, match="index 0"):
        accel.chain([1.0], None)
    with pytest.raises(OverflowError, match="parent_hash"):
        accel.chain([1], -1)
    with pytest.raises(TypeError):
        accel.chain(5, None)
    with pytest.raises(ValueError, match="multiple"):
        accel.local_hashes(b"abc", 2, 0, 0)
    with pytest.raises(ValueError, match="step"):
        accel.local_hashes(b"abcd", 0, 0, 0)
    with pytest.raises(OverflowError, match="seed"):
        accel.local_hashes(b"abcd", 4, 2**64, 0)
    with pytest.raises(TypeError):
        accel.local_hashes("abcd", 4, 0, 0)


@needs_native
def test_native_list_conversion_matches_array() -> None:
    # kvbm._xxh3.list_u32 stands in for array.array("I", ...) on the list fast path: same
    # values, same items accepted, the same exceptions (the slow path then names the index).
    import array

    accel = hashing._accel
    assert accel is not None
    ok = [0, 1, 2**32 - 1, True, np.int64(7), np.uint32(9), *tokens(300)]
    assert bytes(accel.list_u32(ok)) == np.array(array.array("I", ok), dtype="<u4").tobytes()
    assert accel.list_u32([]) == bytearray()
    for bad, err in (([1, -1], OverflowError), ([1, 2**32], OverflowError),
                     ([1, 2**70], OverflowError), ([1, 2.0], TypeError), ([1, "3"], TypeError)):
        with pytest.raises(err):
            accel.list_u32(bad)
        with pytest.raises(err):
            array.array("I", bad)
    with pytest.raises(TypeError):
        accel.list_u32((1, 2))   # only lists take this path

    class Shrinks:
        """An item whose __index__ empties the list being converted."""

        def __init__(self, victim: list[object]) -> None:
            self.victim = victim

        def __index__(self) -> int:
            self.victim.clear()
            return 3

    lst: list[object] = [1, 2]
    lst.append(Shrinks(lst))
    lst.append(4)
    with pytest.raises(RuntimeError, match="changed size"):
        accel.list_u32(lst)
    # Through as_token_array: a list, numpy ints inside, same array as from numpy.
    assert as_token_array(ok).tobytes() == np.array(
        [int(x) for x in ok], dtype="<u4").tobytes()


def test_local_block_hashes_are_hash_blocks_local(impl: str) -> None:
    """What the router hashes its events with: hash_blocks' local hashes, without the
    sequence (lists, arrays, a trailing partial block, a LoRA, long blocks)."""
    rng = np.random.default_rng(11)
    for bs in (1, 16, 64):
        toks = rng.integers(0, 2**32, 10 * bs + 3, dtype=np.uint64)
        for tokens in (toks.tolist(), toks.astype(np.uint32), toks.astype(np.int64)):
            for lora in (None, "sql"):
                assert hashing.local_block_hashes(tokens, bs, lora_name=lora) == \
                    hash_blocks(tokens, bs, lora_name=lora).local
    assert hashing.local_block_hashes([1, 2, 3], 4) == []
    with pytest.raises(TokenError):
        hashing.local_block_hashes([1, -2, 3, 4], 2)
    with pytest.raises(TokenError):
        hashing.local_block_hashes([1, 2], 0)

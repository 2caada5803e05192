"""Block hashing, compatible with Dynamo's KV router (DESIGN.md §4).

* Tokens of a block are encoded as unsigned 32-bit little-endian integers.
* Local hash: ``xxh3_64(token bytes, seed)``, ``seed = 1337``; with a LoRA adapter,
  ``seed = (1337 + xxh3_64(lora_name)) mod 2**64``. A multimodal block appends its sorted
  media hashes (u64 LE) to the token bytes.
* Sequence hash: ``seq[0] = local[0]``; ``seq[i] = xxh3_64(u64le(seq[i-1]) || u64le(local[i]),
  seed=1337)``.
* A namespace salt (model id, tenant ...) changes the seed of the first block only:
  ``seed0 = (seed + xxh3_64(salt)) mod 2**64``; every later sequence hash differs through the
  chain while the local hashes of later blocks stay comparable.

Only full blocks are hashed. The chain is inherently serial, so the hot loop lives in a small
C extension (``kvbm._xxh3``) when it could be built; the pure-Python path computes the same
values and is what the tests compare against.
"""

from __future__ import annotations

import array
import struct
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
import xxhash

from kvbm.errors import TokenError

BASE_SEED = 1337
_U64 = (1 << 64) - 1
_MAX_U32 = (1 << 32) - 1
# array('I') is the platform's unsigned int: the fast path needs it 4 bytes, little-endian.
_U32_ARRAY_OK = array.array("I").itemsize == 4 and sys.byteorder == "little"

_xxh3 = xxhash.xxh3_64_intdigest
_pack_pair = struct.Struct("<QQ").pack

_accel: ModuleType | None  # kvbm/_xxh3.pyi types the functions; None: not built
try:  # the optional native hot loop; identical results, ~3x faster end to end
    from kvbm import _xxh3 as _accel
except ImportError:  # pragma: no cover - exercised when the extension was not built
    _accel = None

MmHashes = Mapping[int, Sequence[int]] | Sequence[Sequence[int] | None]


@dataclass(frozen=True, slots=True)
class BlockHashes:
    """Hashes of the full blocks of a token sequence, one entry per block."""

    local: list[int]
    sequence: list[int]

    def __len__(self) -> int:
        return len(self.sequence)

    def __getitem__(self, s: slice) -> BlockHashes:
        return BlockHashes(self.local[s], self.sequence[s])


def lora_seed(lora_name: str | None) -> int:
    """The local-hash seed for a LoRA adapter (``1337`` without one)."""
    if lora_name is None:
        return BASE_SEED
    return (BASE_SEED + _xxh3(lora_name.encode())) & _U64


def _salt_bytes(salt: str | bytes | int) -> bytes:
    if isinstance(salt, str):
        return salt.encode()
    if isinstance(salt, bytes):
        return salt
    if isinstance(salt, int) and not isinstance(salt, bool) and 0 <= salt <= _U64:
        return salt.to_bytes(8, "little")
    raise TokenError(f"salt must be str, bytes or a u64 int, got {salt!r}")


def as_token_array(tokens: Any) -> np.ndarray:
    """Validate ``tokens`` and return them as a contiguous little-endian u32 array.

    Raises :class:`~kvbm.errors.TokenError` (a ``ValueError``) for anything that is not a
    1-D sequence of integers in ``[0, 2**32)``, naming the first offending index.
    """
    if hasattr(tokens, "detach") and hasattr(tokens, "cpu"):  # torch tensor, without importing
        tokens = tokens.detach().cpu().numpy()
    if isinstance(tokens, np.ndarray):
        arr = tokens
    elif isinstance(tokens, list) and (_accel is not None or _U32_ARRAY_OK) and tokens \
            and type(tokens[0]) is int:
        # The native loop (~4x faster again) or array.array (~4x faster than np.asarray)
        # convert a list of ints and reject anything outside u32 themselves; on failure the
        # slow path below names the culprit.
        try:
            if _accel is not None:
                return np.frombuffer(_accel.list_u32(tokens), dtype="<u4")
            return np.frombuffer(array.array("I", tokens), dtype=np.uint32)
        except (OverflowError, TypeError):
            arr = np.asarray(tokens, dtype=object)
    else:
        try:
            arr = np.asarray(tokens)
        except (OverflowError, ValueError) as e:
            raise TokenError(f"tokens are not a sequence of integers: {e}") from None
    if arr.ndim != 1:
        raise TokenError(f"tokens must be 1-D, got shape {arr.shape}")
    if arr.dtype == object:  # Python ints too large for int64, or mixed types
        for i, t in enumerate(arr.tolist()):
            if isinstance(t, bool) or not isinstance(t, int | np.integer) or not 0 <= t <= _MAX_U32:
                raise TokenError(f"token at index {i} is {t!r}; tokens must be integers in "
                                 f"[0, 2**32)")
        return arr.astype("<u4")
    if arr.dtype.kind not in "iu" or arr.dtype == np.bool_:
        if arr.size == 0:
            return np.empty(0, "<u4")
        raise TokenError(f"tokens must be integers, got dtype {arr.dtype}")
    if (arr.dtype.kind == "i" or arr.dtype.itemsize > 4) and arr.size and (
            arr.min() < 0 or arr.max() > _MAX_U32):
        bad = int(np.flatnonzero((arr < 0) | (arr > _MAX_U32))[0])
        raise TokenError(f"token at index {bad} is {arr[bad]}; tokens must be in [0, 2**32)")
    return np.ascontiguousarray(arr, dtype="<u4")


def _mm_for_block(mm_hashes: MmHashes | None, n_blocks: int) -> dict[int, list[int]]:
    if not mm_hashes:
        return {}
    items: Any = mm_hashes.items() if isinstance(mm_hashes, Mapping) else enumerate(mm_hashes)
    out: dict[int, list[int]] = {}
    for i, hs in items:
        if not hs:
            continue
        if not 0 <= i < n_blocks:
            continue  # media in the trailing partial block: that block is never hashed
        vals = sorted(int(h) for h in hs)
        if any(not 0 <= h <= _U64 for h in vals):
            raise TokenError(f"multimodal hashes of block {i} must be u64, got {vals}")
        out[i] = vals
    return out


def hash_blocks(
    tokens: Any,
    block_size: int,
    *,
    lora_name: str | None = None,
    mm_hashes: MmHashes | None = None,
    salt: str | bytes | int | None = None,
    parent_hash: int | None = None,
) -> BlockHashes:
    """Hash the full blocks of ``tokens``.

    ``parent_hash`` continues a chain: it is the sequence hash of the block just before
    ``tokens[0]`` (the salt then does not apply, it only seeds a sequence's first block).
    ``mm_hashes`` maps a block index to the hashes of the media in that block.
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise TokenError(f"block_size must be a positive int, got {block_size!r}")
    arr = as_token_array(tokens)
    n = arr.size // block_size
    if n == 0:
        return BlockHashes([], [])
    seed = lora_seed(lora_name)
    first_seed = seed
    if salt is not None and parent_hash is None:
        first_seed = (seed + _xxh3(_salt_bytes(salt))) & _U64
    buf = arr[: n * block_size].tobytes()
    local = _local_hashes(buf, block_size * 4, n, seed, first_seed)
    for i, media in _mm_for_block(mm_hashes, n).items():
        start = i * block_size * 4
        data = buf[start: start + block_size * 4] + struct.pack(f"<{len(media)}Q", *media)
        local[i] = _xxh3(data, first_seed if i == 0 else seed)
    return BlockHashes(local, chain(local, parent_hash))


def _local_hashes(buf: bytes, step: int, n: int, seed: int, first_seed: int) -> list[int]:
    if _accel is not None:
        out: list[int] = _accel.local_hashes(buf, step, seed, first_seed)
        return out
    mv = memoryview(buf)
    h = _xxh3
    local = [h(mv[i: i + step], seed) for i in range(0, n * step, step)]
    if first_seed != seed:
        local[0] = h(mv[:step], first_seed)
    return local


def chain(local: Sequence[int], parent_hash: int | None = None) -> list[int]:
    """Sequence hashes from local hashes (optionally continuing after ``parent_hash``)."""
    if _accel is not None:
        out: list[int] = _accel.chain(local, parent_hash)
        return out
    seq: list[int] = []
    if not local:
        return seq
    append = seq.append
    h, pack = _xxh3, _pack_pair
    it = iter(local)
    prev = next(it) if parent_hash is None else h(pack(parent_hash, next(it)), BASE_SEED)
    append(prev)
    for loc in it:
        prev = h(pack(prev, loc), BASE_SEED)
        append(prev)
    return seq

"""Block hashing, compatible with Dynamo's KV router.

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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np
import xxhash

from kvbm.errors import InvalidArgumentError, InvalidKeyError, TokenError, TokenTypeError

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
    #: made by :func:`hash_blocks`: two lists of u64 ints of one length, which the block
    #: manager need not check again (one built by hand is checked where it is used)
    _computed: bool = field(default=False, init=False, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.sequence)

    def __getitem__(self, s: slice) -> BlockHashes:
        # A slice only: an int index would make a "BlockHashes" of two ints, which the
        # manager trusts (when computed) without checking it again.
        if not isinstance(s, slice):
            raise InvalidArgumentError(f"BlockHashes takes a slice (hashes[a:b]), got {s!r}; "
                                       f"block i's hashes are .local[i] and .sequence[i]")
        try:
            local, sequence = self.local[s], self.sequence[s]
        except TypeError as e:  # slice bounds that are not ints
            raise InvalidArgumentError(f"bad BlockHashes slice {s!r}: {e}") from None
        return _computed(local, sequence) if self._computed else BlockHashes(local, sequence)


def _computed(local: list[int], sequence: list[int]) -> BlockHashes:
    out = BlockHashes(local, sequence)
    object.__setattr__(out, "_computed", True)  # frozen; not an init field on purpose
    return out


def _utf8(value: str, what: str) -> bytes:
    try:
        return value.encode()
    except UnicodeEncodeError as e:  # a lone surrogate: no UTF-8 form, so no hash either
        raise InvalidArgumentError(f"{what} is not encodable as UTF-8 ({e.reason} at index "
                                   f"{e.start}): {value!r}") from None


def check_lora_name(lora_name: object) -> None:
    """Raise :class:`~kvbm.errors.InvalidArgumentError` unless ``lora_name`` is ``None`` or a
    string with a UTF-8 form (it seeds hashes and travels in events)."""
    if lora_name is not None:
        if not isinstance(lora_name, str):
            raise InvalidArgumentError(f"lora_name must be a str or None, got {lora_name!r}")
        _utf8(lora_name, "lora_name")


def lora_seed(lora_name: str | None) -> int:
    """The local-hash seed for a LoRA adapter (``1337`` without one)."""
    if lora_name is None:
        return BASE_SEED
    if not isinstance(lora_name, str):
        raise InvalidArgumentError(f"lora_name must be a str or None, got {lora_name!r}")
    return (BASE_SEED + _xxh3(_utf8(lora_name, "lora_name"))) & _U64


def root_seeds(lora_name: str | None, salt: str | bytes | int | None) -> tuple[int, int]:
    """``(seed, first_seed)``: the local-hash seed of every block of a chain, and the one of
    its first block when the chain starts at the root (the salt seeds only that block).
    Both arguments are checked as :func:`hash_blocks` checks them."""
    seed = lora_seed(lora_name)
    if salt is None:
        return seed, seed
    return seed, (seed + _xxh3(_salt_bytes(salt))) & _U64


def _salt_bytes(salt: str | bytes | int) -> bytes:
    if isinstance(salt, str):
        return _utf8(salt, "salt")
    if isinstance(salt, bytes):
        return salt
    if isinstance(salt, int) and not isinstance(salt, bool) and 0 <= salt <= _U64:
        return salt.to_bytes(8, "little")
    raise InvalidArgumentError(f"salt must be str, bytes or a u64 int, got {salt!r}")


def as_token_array(tokens: Any) -> np.ndarray:
    """Validate ``tokens`` and return them as a contiguous little-endian u32 array.

    Raises :class:`~kvbm.errors.TokenError` (a ``ValueError``) for anything that is not a
    1-D sequence of integers in ``[0, 2**32)``, naming the first offending index; where the
    kind is wrong (not a sequence, not integers) a :class:`~kvbm.errors.TokenTypeError`,
    also a ``TypeError``.
    """
    if hasattr(tokens, "detach") and hasattr(tokens, "cpu"):  # torch tensor, without importing
        tokens = _tensor_tokens(tokens)
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
        if isinstance(tokens, str | bytes | bytearray) or (
                isinstance(tokens, memoryview) and tokens.format in ("B", "b", "c")):
            # numpy reads a bytearray as one token per byte (and bytes as one string)
            raise TokenTypeError(f"tokens must be a sequence of integer token ids, got "
                                 f"{type(tokens).__name__} (text or bytes)")
        if not isinstance(tokens, Iterable):  # None, a number, an object
            raise TokenTypeError(f"tokens must be a sequence of integer token ids, got "
                                 f"{type(tokens).__name__}")
        try:
            arr = np.asarray(tokens)
        except (OverflowError, ValueError, TypeError) as e:
            raise TokenError(f"tokens are not a sequence of integers: {e}") from None
    if arr.ndim != 1:
        raise TokenError(f"tokens must be 1-D, got shape {arr.shape}")
    if arr.dtype == object:  # Python ints too large for int64, or mixed types
        for i, t in enumerate(arr.tolist()):
            if isinstance(t, bool) or not isinstance(t, int | np.integer):
                raise TokenTypeError(f"token at index {i} is {t!r}; tokens must be integers "
                                     f"in [0, 2**32)")
            if not 0 <= t <= _MAX_U32:
                raise TokenError(f"token at index {i} is {t!r}; tokens must be integers in "
                                 f"[0, 2**32)")
        return arr.astype("<u4")
    if arr.dtype.kind not in "iu" or arr.dtype == np.bool_:
        if arr.size == 0:
            return np.empty(0, "<u4")
        raise TokenTypeError(f"tokens must be integers, got dtype {arr.dtype}")
    if (arr.dtype.kind == "i" or arr.dtype.itemsize > 4) and arr.size and (
            arr.min() < 0 or arr.max() > _MAX_U32):
        bad = int(np.flatnonzero((arr < 0) | (arr > _MAX_U32))[0])
        raise TokenError(f"token at index {bad} is {arr[bad]}; tokens must be in [0, 2**32)")
    return np.ascontiguousarray(arr, dtype="<u4")


def _tensor_tokens(t: Any) -> np.ndarray:
    """A torch tensor's tokens as a numpy array (float and complex ones refused first:
    numpy has no bfloat16 or float8)."""
    dtype = getattr(t, "dtype", None)
    if getattr(dtype, "is_floating_point", False) or getattr(dtype, "is_complex", False):
        raise TokenTypeError(f"tokens must be integers, got a tensor of {dtype}")
    try:
        out: np.ndarray = t.detach().cpu().numpy()
    except (TypeError, ValueError, RuntimeError) as e:  # sparse, nested, meta (a subclass)
        raise TokenTypeError(f"tokens: cannot read a {getattr(t, 'layout', '')} tensor of "
                             f"{dtype} on {getattr(t, 'device', '?')} ({e}); pass a dense "
                             f"tensor with data") from None
    return out


def check_mm_hashes(mm_hashes: object) -> None:
    """Raise :class:`~kvbm.errors.TokenError` unless ``mm_hashes`` is ``None`` or maps
    block indices to lists of u64 media hashes (see :func:`hash_blocks`)."""
    _mm_for_block(mm_hashes, 0)  # type: ignore[arg-type]


def _is_sequence(value: object) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, str | bytes | bytearray)


def _is_int(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _mm_for_block(mm_hashes: MmHashes | None, n_blocks: int) -> dict[int, list[int]]:
    if mm_hashes is None:
        return {}
    items: Any
    if isinstance(mm_hashes, Mapping):
        items = mm_hashes.items()
    elif _is_sequence(mm_hashes):
        items = enumerate(mm_hashes)
    else:
        raise TokenTypeError(f"mm_hashes must map block indices to lists of u64 media "
                             f"hashes, got {type(mm_hashes).__name__}")
    out: dict[int, list[int]] = {}
    for i, hs in items:
        # Everything is checked, also the media of a trailing partial block (never hashed):
        # malformed input is refused whatever its position.
        if not _is_int(i) or i < 0:
            raise TokenError(f"mm_hashes: block index {i!r} is not a non-negative int")
        if hs is None:
            continue
        if not (_is_sequence(hs) or (isinstance(hs, np.ndarray) and hs.ndim == 1)):
            raise TokenTypeError(f"multimodal hashes of block {i} must be a list of ints, "
                                 f"got {hs!r}")
        vals = sorted(int(h) if _is_int(h) and 0 <= h <= _U64 else -1 for h in hs)
        if vals and vals[0] < 0:
            raise TokenError(f"multimodal hashes of block {i} must be u64 ints, got {list(hs)}")
        if vals and i < n_blocks:  # media in the trailing partial block: never hashed
            out[int(i)] = vals
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
    if parent_hash is not None and (type(parent_hash) is not int or not 0 <= parent_hash <= _U64):
        raise InvalidKeyError(f"parent_hash must be an int in [0, 2**64) or None, "
                              f"got {parent_hash!r}")
    arr = as_token_array(tokens)
    n = arr.size // block_size
    # Every argument is checked even where it does not change the result (no full block,
    # a salt after a parent): malformed input is refused the same way each time.
    seed, salted = root_seeds(lora_name, salt)
    mm = _mm_for_block(mm_hashes, n)
    if n == 0:
        return _computed([], [])
    first_seed = seed if parent_hash is not None else salted
    local = _local_of(arr, n, block_size, seed, first_seed, mm)
    return _computed(local, _chain(local, parent_hash))


def local_block_hashes(tokens: Any, block_size: int, *, lora_name: str | None = None
                       ) -> list[int]:
    """The local hashes of the full blocks of ``tokens`` (no salt, no media): what
    :func:`hash_blocks` gives as ``local``, without the sequence hashes, for callers that
    chain them onto a parent of their own (the router's events)."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise TokenError(f"block_size must be a positive int, got {block_size!r}")
    arr = as_token_array(tokens)
    seed = lora_seed(lora_name)
    return _local_of(arr, arr.size // block_size, block_size, seed, seed, {})


def _local_of(arr: np.ndarray, n: int, block_size: int, seed: int, first_seed: int,
              mm: dict[int, list[int]]) -> list[int]:
    if n == 0:
        return []
    step = block_size * 4
    if not mm and _accel is not None:  # the native loop reads the array where it lies
        out: list[int] = _accel.local_hashes(arr[: n * block_size], step, seed, first_seed)
        return out
    buf = arr[: n * block_size].tobytes()
    local = _local_hashes(buf, step, n, seed, first_seed)
    for i, media in mm.items():
        start = i * step
        data = buf[start: start + step] + struct.pack(f"<{len(media)}Q", *media)
        local[i] = _xxh3(data, first_seed if i == 0 else seed)
    return local


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
    """Sequence hashes from local hashes (optionally continuing after ``parent_hash``).

    Raises :class:`~kvbm.errors.InvalidKeyError` unless every hash is an int in
    ``[0, 2**64)``."""
    try:
        if _accel is None:  # the native loop checks as it goes; the Python one must first
            local = list(local)
            for i, v in enumerate([*local, 0 if parent_hash is None else parent_hash]):
                if not _is_int(v) or not 0 <= v <= _U64:
                    what = "parent_hash" if i == len(local) else f"local hash at index {i}"
                    raise TypeError(f"{what} must be an int in [0, 2**64), got {v!r}")
        return _chain(local, parent_hash)
    except (TypeError, OverflowError) as e:
        raise InvalidKeyError(f"chain: {e}") from None


def _chain(local: Sequence[int], parent_hash: int | None) -> list[int]:
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

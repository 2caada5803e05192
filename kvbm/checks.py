"""Argument checks of the manager's public entry points.

Every public call validates its arguments before it changes anything and raises only
:mod:`kvbm.errors` classes; these are the checks they share.
"""

from __future__ import annotations

import math
import reprlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from kvbm.errors import ClosedError, InvalidArgumentError, InvalidKeyError
from kvbm.hashing import BlockHashes
from kvbm.index import MatchResult

U64 = (1 << 64) - 1

#: The longest single wait handed to a queue, lock, future or thread join. The OS refuses
#: longer ones (``threading.TIMEOUT_MAX`` and ``queue.SimpleQueue.get`` overflow near 9.2e9
#: s), so a longer finite timeout (about 32 years and up) means "no limit" in practice.
MAX_WAIT_S = 1e9


def os_wait(seconds: float | None) -> float | None:
    """``seconds`` as a timeout that every blocking primitive accepts: ``None`` (no limit)
    for one longer than :data:`MAX_WAIT_S`. Waiting loops recheck their own deadline."""
    return None if seconds is None or seconds > MAX_WAIT_S else seconds


def as_flag(value: object, name: str) -> bool:
    """A bool (``numpy.bool_`` too); anything else is refused rather than taken for its
    truth value."""
    if isinstance(value, bool | np.bool_):
        return bool(value)
    raise InvalidArgumentError(f"{name} must be true or false, got {value!r}")


def closed_error() -> ClosedError:
    return ClosedError("the manager is closed: after close() only close(), stats(), "
                       "take_events() and the closed/layout/config attributes are available; "
                       "create a new BlockManager")


def as_seconds(value: object, name: str) -> float | None:
    """``None``, or a finite number of seconds >= 0 as a float."""
    if value is None:
        return None
    if isinstance(value, bool | np.bool_) or not isinstance(
            value, int | float | np.integer | np.floating):
        raise InvalidArgumentError(f"{name} must be a number of seconds or None, got {value!r}")
    try:
        v = float(value)
    except OverflowError:  # an int beyond float range
        v = math.inf
    if not 0 <= v < math.inf:  # also false for NaN
        raise InvalidArgumentError(f"{name} must be a finite number of seconds >= 0 (None: no "
                                   f"limit), got {value!r}")
    return v


def as_count(value: object, name: str) -> int:
    if type(value) is int and value >= 0:  # the common case, first (hot path)
        return value
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | np.integer):
        raise InvalidArgumentError(f"{name} must be a non-negative int, got {value!r}")
    if value < 0:
        raise InvalidArgumentError(f"{name} must be >= 0, got {value}")
    return int(value)


def check_id_container(block_ids: Any, name: str, *, ordered: bool) -> Sequence[Any]:
    """The container of block ids (the pool checks each id), as a sequence read once.
    ``ordered``: a sequence (a list, tuple, range or 1-D array); otherwise any iterable
    collection (a generator is consumed here, once). Strings, bytes, mappings and 0-d
    arrays or tensors are refused: iterating them yields something else than the ids
    meant, or fails."""
    if type(block_ids) is list or type(block_ids) is tuple:  # the common case (hot path)
        return block_ids
    ok = (isinstance(block_ids, Sequence | np.ndarray) if ordered
          else isinstance(block_ids, Iterable))
    if (not ok or isinstance(block_ids, str | bytes | bytearray | memoryview | Mapping)
            or getattr(block_ids, "ndim", 1) != 1):  # numpy arrays and torch tensors
        raise InvalidArgumentError(
            f"{name} must be a {'sequence' if ordered else 'collection'} of block ids, got "
            f"{type(block_ids).__name__} {reprlib.repr(block_ids)}")
    try:
        return list(block_ids)
    except TypeError as e:  # an iterable that cannot be iterated after all
        raise InvalidArgumentError(f"{name}: cannot iterate over the block ids "
                                   f"({type(block_ids).__name__}): {e}") from None


def check_keys(keys: object, name: str) -> None:
    """A list of block hashes: ints in ``[0, 2**64)``."""
    if not isinstance(keys, list | tuple):
        raise InvalidArgumentError(f"{name} must be a list of block hashes, got "
                                   f"{type(keys).__name__}")
    # Checked in C-speed passes (type, then range): this runs on every onboard.
    if keys and (not all(type(h) is int for h in keys) or min(keys) < 0 or max(keys) > U64):
        bad = next(h for h in keys if type(h) is not int or not 0 <= h <= U64)
        raise InvalidKeyError(f"{name}: a block hash must be an int in [0, 2**64), got {bad!r}")


def check_hashes(hashes: object) -> None:
    if type(hashes) is BlockHashes and hashes._computed:  # by hash_blocks: valid
        return
    if not isinstance(hashes, BlockHashes):
        raise InvalidArgumentError(f"hashes must be a BlockHashes (kvbm.hashing.hash_blocks), "
                                   f"got {type(hashes).__name__}")
    check_keys(hashes.local, "hashes.local")
    check_keys(hashes.sequence, "hashes.sequence")
    if len(hashes.local) != len(hashes.sequence):
        raise InvalidArgumentError(f"hashes has {len(hashes.local)} local and "
                                   f"{len(hashes.sequence)} sequence hashes")


def check_match(match: object) -> MatchResult:
    if not isinstance(match, MatchResult):
        raise InvalidArgumentError(f"onboard needs the MatchResult of match_prefix or "
                                   f"match_hashes, got {type(match).__name__}")
    if not match._checked:
        check_keys(match.sequence_hashes, "match.sequence_hashes")
    return match

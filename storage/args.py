"""Argument checks of the page stores' public calls (disk and object tiers), run before
anything is changed.

Keys are block hashes: ints in ``[0, 2**64)`` (numpy integers are taken as their value; a
bool, a float or a string is refused, not coerced). A batch of plain ints in range, the
common case, is checked in a few C-level passes: these run on every put and get.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from typing import TYPE_CHECKING, Any

from kvbm.errors import InvalidArgumentError, InvalidKeyError

if TYPE_CHECKING:
    from typing_extensions import Buffer

_U64_MAX = (1 << 64) - 1


def check_key(key: Any) -> int:
    """``key`` as an int in ``[0, 2**64)``, or :class:`InvalidKeyError`."""
    if isinstance(key, bool) or not hasattr(type(key), "__index__"):
        raise InvalidKeyError(f"a page key must be an int in [0, 2**64), got {key!r}")
    value = operator.index(key)
    if not 0 <= value <= _U64_MAX:
        raise InvalidKeyError(f"a page key must be in [0, 2**64), got {value}")
    return value


def _batch(values: object, what: str) -> list[Any]:
    # An unordered collection would make the per-item results meaningless; a string is
    # iterable but certainly not a batch of keys.
    if (isinstance(values, (str, bytes, bytearray, Mapping, AbstractSet))
            or not isinstance(values, Iterable)):
        raise InvalidArgumentError(f"{what} must be a sequence, got {type(values).__name__}")
    return list(values)


def check_keys(keys: object, what: str = "keys") -> list[int]:
    """``keys`` as a list of valid keys (see :func:`check_key`)."""
    out = _batch(keys, what)
    if out and (not all(type(k) is int for k in out) or min(out) < 0 or max(out) > _U64_MAX):
        out = [check_key(k) for k in out]
    return out


def check_items(items: object) -> tuple[list[int], list[Buffer]]:
    """``(key, buffer)`` pairs as their keys (checked) and their buffers (unchecked)."""
    pairs = _batch(items, "items")
    try:
        keys = [key for key, _ in pairs]
    except (TypeError, ValueError):
        bad = next((p for p in pairs
                    if not isinstance(p, (tuple, list)) or len(p) != 2), pairs)
        raise InvalidArgumentError(f"items must be (key, buffer) pairs, got {bad!r:.80}"
                                   ) from None
    return check_keys(keys, "item keys"), [buf for _, buf in pairs]


def check_parents(parents: object, n: int) -> list[int | None] | None:
    """One parent per item (a key, or ``None`` for a block without one), or ``None``."""
    if parents is None:
        return None
    out = _batch(parents, "parents")
    if len(out) != n:
        raise InvalidArgumentError(f"{len(out)} parents for {n} pages")
    return [None if p is None else check_key(p) for p in out]


"""Type stub for the optional native hot loop of :mod:`kvbm.hashing` (``kvbm/_xxh3.c``)."""

from collections.abc import Sequence
from typing import SupportsIndex

from typing_extensions import Buffer

def local_hashes(
    buf: Buffer, step: int, seed: SupportsIndex, first_seed: SupportsIndex, /
) -> list[int]:
    """``xxh3_64`` of each ``step``-byte slice of ``buf``; slice 0 is hashed with ``first_seed``."""

def chain(local: Sequence[SupportsIndex], parent: SupportsIndex | None, /) -> list[int]:
    """Sequence hashes: ``seq[i] = xxh3_64(u64le(seq[i-1]) || u64le(local[i]), seed=1337)``."""

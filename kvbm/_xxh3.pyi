"""Type stub for the optional native hot loop of :mod:`kvbm.hashing` (``kvbm/_xxh3.c``)."""

from collections.abc import Sequence
from typing import Any, SupportsIndex

from typing_extensions import Buffer

def local_hashes(
    buf: Buffer, step: int, seed: SupportsIndex, first_seed: SupportsIndex, /
) -> list[int]:
    """``xxh3_64`` of each ``step``-byte slice of ``buf``; slice 0 is hashed with ``first_seed``."""

def list_u32(tokens: list[Any], /) -> bytearray:
    """A list of ints in ``[0, 2**32)`` as little-endian u32, 4 bytes each (what
    ``array.array("I", ...)`` accepts; OverflowError / TypeError like it)."""

def walk_hashes(table: Buffer, mask: SupportsIndex, keys: Buffer, /) -> list[tuple[int, int]]:
    """Runs ``(row id, blocks)`` of the leading native-u64 ``keys`` found in the router's
    probe table (``kvbm.router.probe``: ``mask + 1`` pairs of int64 key, row id)."""

def walk_tokens(
    table: Buffer,
    mask: SupportsIndex,
    tokens: Buffer,
    block_size: int,
    seed: SupportsIndex,
    first_seed: SupportsIndex,
    /,
) -> list[tuple[int, int]]:
    """:func:`walk_hashes` of the sequence hashes (from the root) of the full blocks of the
    little-endian u32 ``tokens``, each block hashed only once those before it were found."""

def chain(local: Sequence[SupportsIndex], parent: SupportsIndex | None, /) -> list[int]:
    """Sequence hashes: ``seq[i] = xxh3_64(u64le(seq[i-1]) || u64le(local[i]), seed=1337)``."""

def seal_pages(
    payloads: Sequence[Buffer],
    keys: Sequence[SupportsIndex],
    prefix: bytes,
    fingerprint: SupportsIndex,
    page_bytes: int,
    image: Buffer,
    slot_bytes: int,
    heads: Buffer,
    align: int,
    /,
) -> tuple[list[bytes], bytes]:
    """Per page: ``xxh3_128_digest``, its 64-byte header at ``heads[64*j]`` and, unless it
    goes zero-copy (any page when ``align`` is 0; a writable one whose address ``align`` > 0
    divides; none when ``align`` < 0), its payload at ``image[j*slot_bytes]``. Returns the
    digests, and 1 (zero-copy) or 0 (staged) per page. ``page_bytes`` > 240."""

def check_pages(
    dests: Sequence[Buffer],
    keys: Sequence[SupportsIndex],
    prefix: bytes,
    fingerprint: SupportsIndex,
    page_bytes: int,
    image: Buffer,
    slot_bytes: int,
    heads: Buffer,
    checksums: Sequence[bytes],
    zero_copy: Buffer,
    got: int,
    /,
) -> bytes:
    """Per page as read: payload ``j`` at ``image[j*slot_bytes]`` (or in ``dests[j]`` when its
    ``zero_copy`` flag is set), header at ``heads[64*j]``; only the first ``got`` pages were
    read whole: 0 verified (and now in ``dests[j]``), 1 truncated, 2 not
    the expected header, 3 bad payload checksum. ``page_bytes`` > 240."""

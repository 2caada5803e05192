"""The pack object's format: pages back to back, then a manifest and a trailer.

Pack object ``{prefix}{fingerprint:016x}/{pack_id}.kvpack`` (see storage/objectstore.py)::

    page 0: 64-byte header (storage/page.py) + payload
    page 1: ...
    manifest: msgpack [PACK_VERSION, fingerprint, [[seq_hash, offset, length], ...]]
    trailer (24 bytes): b"KVBMPACK", u64 manifest length, u64 xxh3-64 of the manifest
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

import msgpack
import xxhash

from kvbm.storage.objectindex import Location
from kvbm.storage.page import HEADER_SIZE, make_header

MiB = 1 << 20
GiB = 1 << 30
#: The largest object one S3 PutObject may upload (GCS allows more; the pack must also fit in
#: memory while it is built).
MAX_PACK_BYTES = 5 * GiB
PACK_VERSION = 1
PACK_SUFFIX = ".kvpack"
#: magic, manifest length, xxh3-64 of the manifest
TRAILER = struct.Struct("<8sQQ")
_TRAILER_MAGIC = b"KVBMPACK"


@dataclass(frozen=True)
class BuiltPack:
    pack_id: bytes
    data: bytearray
    entries: list[tuple[int, Location]]


def build_pack(fingerprint: int, pages: Sequence[tuple[int, memoryview]]) -> BuiltPack:
    """Lay out ``pages`` (distinct keys) as one pack object, manifest and trailer included."""
    offsets: list[int] = []
    pos = 0
    for _, payload in pages:
        offsets.append(pos)
        pos += HEADER_SIZE + payload.nbytes
    manifest = msgpack.packb([PACK_VERSION, fingerprint,
                              [[k, off, HEADER_SIZE + p.nbytes]
                               for (k, p), off in zip(pages, offsets, strict=True)]])
    size = pos + len(manifest) + TRAILER.size
    data = bytearray(size)
    view = memoryview(data)
    ids = xxhash.xxh3_128()
    for (k, payload), off in zip(pages, offsets, strict=True):
        body = view[off + HEADER_SIZE: off + HEADER_SIZE + payload.nbytes]
        # Copy first, checksum the copy: a caller that scribbles on its buffer during the
        # put cannot make the header disagree with the bytes actually uploaded.
        body[:] = payload
        header = make_header(fingerprint, k, body)
        view[off: off + HEADER_SIZE] = header
        ids.update(header)
    view[pos: pos + len(manifest)] = manifest
    view[pos + len(manifest):] = TRAILER.pack(_TRAILER_MAGIC, len(manifest),
                                               xxhash.xxh3_64_intdigest(manifest))
    pack_id = ids.digest()
    entries = [(k, Location(pack_id, off, HEADER_SIZE + p.nbytes, size))
               for (k, p), off in zip(pages, offsets, strict=True)]
    return BuiltPack(pack_id, data, entries)


class ManifestError(ValueError):
    """A pack's trailer or manifest is damaged."""


def parse_manifest(tail: bytes, *, pack_size: int) -> tuple[int, list[tuple[int, int, int]]] | int:
    """Decode a pack's manifest from its last bytes.

    Returns ``(fingerprint, [(seq_hash, offset, length)])``, or the number of tail bytes
    needed when ``tail`` is too short to hold the whole manifest.
    """
    if len(tail) < TRAILER.size:
        raise ManifestError("pack shorter than its trailer")
    magic, mlen, msum = TRAILER.unpack_from(tail, len(tail) - TRAILER.size)
    if magic != _TRAILER_MAGIC or mlen + TRAILER.size > pack_size:
        raise ManifestError("bad pack trailer")
    if mlen + TRAILER.size > len(tail):
        return int(mlen + TRAILER.size)
    raw = tail[len(tail) - TRAILER.size - mlen: len(tail) - TRAILER.size]
    if xxhash.xxh3_64_intdigest(raw) != msum:
        raise ManifestError("manifest checksum mismatch")
    try:
        version, fingerprint, pages = msgpack.unpackb(raw)
    except (ValueError, TypeError, RecursionError, msgpack.UnpackException) as e:
        raise ManifestError(f"undecodable manifest: {e}") from None
    if version != PACK_VERSION:
        raise ManifestError(f"unknown pack version {version!r}")
    # A checksum proves the manifest is what its writer wrote, not that it makes sense (a
    # buggy or hostile writer of the bucket): every number must fit where the index puts it.
    pages_end = pack_size - TRAILER.size - mlen
    if not _is_u64(fingerprint) or not isinstance(pages, list):
        raise ManifestError("manifest is not [version, fingerprint, pages]")
    out: list[tuple[int, int, int]] = []
    end = 0  # build_pack lays the pages out back to back, the manifest right after them
    for page in pages:
        if (not isinstance(page, list) or len(page) != 3 or not all(map(_is_u64, page))
                or page[1] != end or page[2] == 0):
            raise ManifestError(f"manifest entry {page!r:.80} is not [key, offset, length] "
                                f"of the page after the one before")
        end += page[2]
        out.append((page[0], page[1], page[2]))
    if end != pages_end:
        raise ManifestError(f"the manifest's pages end at {end}, the pack's at {pages_end}")
    return fingerprint, out


def _is_u64(value: object) -> bool:
    return type(value) is int and 0 <= value < 1 << 64

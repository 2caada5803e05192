"""The head object: the list of a writer's newest packs that other writers read.

``{prefix}{fingerprint:016x}/heads/{writer id hex}.kvhead`` (storage/objectdiscovery.py)::

    header (56 bytes): b"KVBMHEAD", u32 version, u32 record count, u64 fingerprint,
                       u64 seq (the number of the newest pack in the writer's log),
                       16-byte writer id, u64 xxh3-64 of the 48 bytes before it
    record i (40 bytes), newest first: 16-byte pack id, u64 pack size, u64 tail length
                       (manifest + trailer), u64 xxh3-64 of writer id || fingerprint ||
                       (seq - i) || the 32 bytes before it

Each record checks out on its own, bound to its writer, layout and place in the log: a
head can be read in parts, and a part that comes from a newer version of it is caught.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

import xxhash

from kvbm.storage.objectindex import Announced
from kvbm.storage.objectpack import MAX_PACK_BYTES, TRAILER

HEADS_DIR = "heads/"
HEAD_SUFFIX = ".kvhead"
HEAD_VERSION = 1
_MAGIC = b"KVBMHEAD"
#: magic, version, record count, fingerprint, seq (the newest record's number), writer id
_HEAD = struct.Struct("<8sIIQQ16s")
_RECORD = struct.Struct("<16sQQ")  # pack id, pack size, tail (manifest + trailer) length
_CHECK = struct.Struct("<Q")
_U64 = struct.Struct("<Q")
HEAD_SIZE = _HEAD.size + _CHECK.size
RECORD_SIZE = _RECORD.size + _CHECK.size
#: The most records a head may hold (the largest ``announce_packs``).
MAX_HEAD_PACKS = 4096
#: Largest pack and manifest tail a record may claim (S3's largest object; a manifest of
#: far more pages than a pack of it holds).
_MAX_PACK = MAX_PACK_BYTES
_MAX_TAIL = 32 << 20


class HeadError(ValueError):
    """A head object, or a record of it, is damaged or not what its name says."""


def head_key(heads_prefix: str, writer: bytes) -> str:
    return f"{heads_prefix}{writer.hex()}{HEAD_SUFFIX}"


def _record_check(writer: bytes, fingerprint: int, number: int, record: bytes) -> int:
    # Binds each record to its writer, layout and place in the log: a record checks out on
    # its own, so a head can be read in parts (and a part from a newer version is caught).
    return xxhash.xxh3_64_intdigest(writer + _U64.pack(fingerprint) + _U64.pack(number)
                                    + record)


def encode_head(fingerprint: int, writer: bytes, seq: int, packs: Sequence[Announced]) -> bytes:
    """A head object: header, then one record per pack, newest (number ``seq``) first."""
    header = _HEAD.pack(_MAGIC, HEAD_VERSION, len(packs), fingerprint, seq, writer)
    out = bytearray(header + _CHECK.pack(xxhash.xxh3_64_intdigest(header)))
    for i, p in enumerate(packs):
        rec = _RECORD.pack(p.pack_id, p.size, p.tail)
        out += rec + _CHECK.pack(_record_check(writer, fingerprint, seq - i, rec))
    return bytes(out)


@dataclass(frozen=True, slots=True)
class HeadInfo:
    count: int
    seq: int


def decode_header(data: bytes, *, fingerprint: int, writer: bytes) -> HeadInfo:
    if len(data) < HEAD_SIZE:
        raise HeadError("shorter than a head's header")
    magic, version, count, fp, seq, who = _HEAD.unpack_from(data)
    if magic != _MAGIC:
        raise HeadError("not a head (bad magic)")
    if _CHECK.unpack_from(data, _HEAD.size)[0] != xxhash.xxh3_64_intdigest(data[:_HEAD.size]):
        raise HeadError("header checksum mismatch")
    if version != HEAD_VERSION:
        raise HeadError(f"unknown head version {version}")
    if fp != fingerprint:
        raise HeadError(f"fingerprint {fp:#018x} is not this layout's {fingerprint:#018x}")
    if who != writer:
        raise HeadError("the writer id inside is not the one in its name")
    if count > MAX_HEAD_PACKS or count > seq:
        raise HeadError(f"{count} record(s) for a log of {seq} pack(s)")
    return HeadInfo(count, seq)


def decode_records(data: bytes, *, info: HeadInfo, fingerprint: int, writer: bytes,
                   first: int) -> list[Announced]:
    """Records ``first``, ``first + 1``, ... (0 is the newest) from ``data``, which starts at
    record ``first``; every record is checked."""
    out: list[Announced] = []
    for j in range(len(data) // RECORD_SIZE):
        i = first + j
        if i >= info.count:
            break
        rec = data[j * RECORD_SIZE: j * RECORD_SIZE + _RECORD.size]
        (check,) = _CHECK.unpack_from(data, j * RECORD_SIZE + _RECORD.size)
        if check != _record_check(writer, fingerprint, info.seq - i, rec):
            raise HeadError(f"record {i} fails its checksum")
        pack_id, size, tail = _RECORD.unpack(rec)
        if not (TRAILER.size <= tail <= min(size, _MAX_TAIL) and size <= _MAX_PACK):
            raise HeadError(f"record {i} claims a pack of {size} bytes with a {tail}-byte tail")
        out.append(Announced(pack_id, size, tail))
    return out

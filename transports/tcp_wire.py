"""The tcp backend's data-connection wire: fixed binary headers, no msgpack.

A data connection carries one request at a time (after the authenticated handshake, which
is msgpack like the control channel's)::

    request   op:u8 ('r' | 'w')  flags:u8 (0)  pad:u16  count:u32   (8 bytes)
              count x (region:u64  offset:u64  length:u64)          (24 bytes each)
              WRITE only: pad zero bytes, then the bytes of every range in order
    answer    status:u8 (0 ok, 1 refused, 2 error)  flags:u8 (0)  pad:u16  size:u32
              status != 0: ``size`` bytes of UTF-8 message
              READ and ok: pad zero bytes, then the bytes of every range in order

Big-endian throughout. ``pad`` (below 4096) puts a payload of 64 KiB or more at a multiple of
4 KiB in its byte stream (see :mod:`kvbm.transports.sockio`). Fixed headers cost a fraction
of a msgpack round trip and let the first range travel in the same read as the header: a
one-range request is one 32-byte read on the serving side.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from kvbm.transports.control import ProtocolError
from kvbm.transports.descriptors import MAX_DESCRIPTORS, Op

HEAD = struct.Struct(">BBHI")
RANGE = struct.Struct(">QQQ")
#: A request's header and its first range: what the serving side reads first.
FIRST = HEAD.size + RANGE.size
ANSWER = struct.Struct(">BBHI")
OK, REFUSED, FAILED = 0, 1, 2
_OPS = {ord("r"): Op.READ, ord("w"): Op.WRITE}
_CODES = {Op.READ: ord("r"), Op.WRITE: ord("w")}
#: Region ids, offsets and lengths are below 2**63 (what the table can hold).
_LIMIT = 1 << 63
#: Longest error message sent (longer ones are cut).
MAX_MESSAGE = 1024
ALIGN = 4096

ANSWER_OK = ANSWER.pack(OK, 0, 0, 0)


_ONE = struct.Struct(">BBHIQQQ")  # a request header and its one range, packed at once


def pack_request(op: Op, flat: Sequence[int], pad: int = 0) -> bytes:
    """The request for ranges ``flat`` (region, offset, length, region, ...)."""
    if len(flat) == 3:
        return _ONE.pack(_CODES[op], 0, pad, 1, *flat)
    return HEAD.pack(_CODES[op], 0, pad, len(flat) // 3) + struct.pack(
        f">{len(flat)}Q", *flat)


def parse_head(head: bytes | bytearray | memoryview, max_bytes: int) -> tuple[Op, int, int]:
    """``(op, pad, count)`` of a request header; :class:`ProtocolError` if malformed or
    if its ranges would take more than ``max_bytes``."""
    code, flags, pad, count = HEAD.unpack_from(head)
    op = _OPS.get(code)
    if op is None or flags or pad >= ALIGN:
        raise ProtocolError("not a tcp transfer request")
    if not 0 < count <= MAX_DESCRIPTORS or count * RANGE.size > max_bytes:
        raise ProtocolError(f"a tcp transfer request of {count} ranges")
    return op, pad, count


def parse_ranges(data: bytes | bytearray | memoryview, count: int
                 ) -> list[tuple[int, int, int]]:
    """``count`` ranges from ``data`` (every value below 2**63, else ProtocolError)."""
    if count == 1:
        one = RANGE.unpack_from(data)
        if one[0] >= _LIMIT or one[1] >= _LIMIT or one[2] >= _LIMIT:
            raise ProtocolError("a range beyond 2**63 in a tcp transfer request")
        return [one]
    flat = struct.unpack_from(f">{3 * count}Q", data)
    if max(flat) >= _LIMIT:
        raise ProtocolError("a range beyond 2**63 in a tcp transfer request")
    it = iter(flat)
    return list(zip(it, it, it, strict=True))


def pack_error(status: int, message: str) -> bytes:
    msg = message.encode("utf-8", "replace")[:MAX_MESSAGE]
    return ANSWER.pack(status, 0, 0, len(msg)) + msg


def parse_answer(data: bytes | bytearray | memoryview, max_bytes: int) -> tuple[int, int, int]:
    """``(status, pad, size)`` of an answer header; :class:`ProtocolError` if malformed."""
    status, flags, pad, size = ANSWER.unpack_from(data)
    if status not in (OK, REFUSED, FAILED) or flags or pad >= ALIGN or size > max_bytes or (
            status == OK and size):
        raise ProtocolError("malformed answer on a tcp data connection")
    return status, pad, size

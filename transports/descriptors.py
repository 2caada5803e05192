"""Transfer descriptors: which local bytes go to (or come from) which remote bytes.

A transfer is a list of descriptors, each ``(local region, offset) <-> (remote region,
offset)`` over ``length`` bytes, written as a :class:`Desc` or as a pair of triples
``((local, offset, length), (remote, offset, length))`` with equal lengths. The remote region
is a :class:`~kvbm.transports.regions.RemoteRegion` from the peer's metadata or its bare id.

What the requester can check, it checks before anything moves (:class:`InvalidArgumentError`):
types, local bounds, and remote bounds where the remote region's length is known. The
serving agent checks every remote descriptor again against what it exposed to this peer:
that check is the one that protects it, the local one only fails early.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from kvbm.errors import InvalidArgumentError
from kvbm.transports.regions import Access, RegionHandle, RemoteRegion

#: Descriptors in one transfer at most (each costs up to 27 bytes in a request frame).
MAX_DESCRIPTORS = 1 << 18
_ID_LIMIT = 1 << 63


class Op(enum.Enum):
    """READ: remote bytes land in local memory. WRITE: local bytes land in remote memory."""

    READ = "read"
    WRITE = "write"

    @property
    def access(self) -> Access:
        return Access.READ if self is Op.READ else Access.WRITE


@dataclass(frozen=True, slots=True)
class Desc:
    local: RegionHandle
    local_offset: int
    remote: RemoteRegion | int
    remote_offset: int
    length: int


class Segment(NamedTuple):
    """A checked descriptor: what a backend moves."""

    local: RegionHandle
    local_offset: int
    remote_id: int
    remote_offset: int
    length: int


def _int(what: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value < high:
        raise InvalidArgumentError(f"{what} must be an int in [{low}, {high}), got {value!r}")
    return value


def _as_desc(d: object, i: int) -> Desc:
    if isinstance(d, Desc):
        return d
    if (isinstance(d, tuple | list) and len(d) == 2 and all(
            isinstance(side, tuple | list) and len(side) == 3 for side in d)):
        (loc, loff, ln), (rem, roff, rn) = d
        if ln != rn:
            raise InvalidArgumentError(f"descriptor {i}: local length {ln!r} differs from "
                                       f"remote length {rn!r}")
        return Desc(loc, loff, rem, roff, ln)
    raise InvalidArgumentError(f"descriptor {i} must be a Desc or ((local, offset, length), "
                               f"(remote, offset, length)), got {d!r}")


def check_descriptors(op: object, descs: object, *,
                      is_local: Callable[[RegionHandle], bool]) -> list[Segment]:
    """The checked, coalesced segments of ``descs`` (see the module).

    ``is_local`` says whether a handle belongs to the requesting agent. Adjacent descriptors
    (contiguous on both sides, same regions) merge into one segment."""
    if not isinstance(op, Op):
        raise InvalidArgumentError(f"op must be Op.READ or Op.WRITE, got {op!r}")
    if not isinstance(descs, Sequence) or isinstance(descs, str | bytes):
        raise InvalidArgumentError(f"descs must be a list of descriptors, got "
                                   f"{type(descs).__name__}")
    if not descs:
        raise InvalidArgumentError("a transfer needs at least one descriptor")
    if len(descs) > MAX_DESCRIPTORS:
        raise InvalidArgumentError(f"{len(descs)} descriptors, at most {MAX_DESCRIPTORS}")
    out: list[Segment] = []
    for i, raw in enumerate(descs):
        d = _as_desc(raw, i)
        if not isinstance(d.local, RegionHandle) or not is_local(d.local):
            raise InvalidArgumentError(f"descriptor {i}: local side must be a region this "
                                       f"agent registered, got {d.local!r}")
        d.local.check_open()
        n = _int(f"descriptor {i} length", d.length, 1, d.local.length + 1)
        loff = _int(f"descriptor {i} local offset", d.local_offset, 0, d.local.length)
        if loff + n > d.local.length:
            raise InvalidArgumentError(f"descriptor {i}: [{loff}, {loff + n}) is outside the "
                                       f"local region ({d.local.length} bytes)")
        if op is Op.READ and not d.local.writable:
            raise InvalidArgumentError(f"descriptor {i}: READ into a read-only region")
        roff = _int(f"descriptor {i} remote offset", d.remote_offset, 0, _ID_LIMIT)
        if isinstance(d.remote, RemoteRegion):
            rid = d.remote.id
            if roff + n > d.remote.length:
                raise InvalidArgumentError(
                    f"descriptor {i}: [{roff}, {roff + n}) is outside remote region "
                    f"{d.remote.name or rid} ({d.remote.length} bytes)")
            if not d.remote.access & op.access:
                raise InvalidArgumentError(f"descriptor {i}: the peer does not allow "
                                           f"{op.value} on region {d.remote.name or rid}")
        else:
            rid = _int(f"descriptor {i} remote region id", d.remote, 1, _ID_LIMIT)
        last = out[-1] if out else None
        if (last is not None and last.local is d.local and last.remote_id == rid
                and last.local_offset + last.length == loff
                and last.remote_offset + last.length == roff):
            out[-1] = last._replace(length=last.length + n)
        else:
            out.append(Segment(d.local, loff, rid, roff, n))
    return out


def total_bytes(segments: Sequence[Segment]) -> int:
    return sum(s.length for s in segments)

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
from typing import Any, NamedTuple

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
    if type(value) is not int or not low <= value < high:  # also refuses bool
        raise InvalidArgumentError(f"{what} must be an int in [{low}, {high}), got {value!r}")
    return value


def _unpack(d: object, i: int) -> tuple[Any, Any, Any, Any, Any]:
    """``(local, local_offset, remote, remote_offset, length)`` of one descriptor."""
    if type(d) is tuple or type(d) is list:
        if len(d) == 2:
            a, b = d
            if (type(a) is tuple or type(a) is list) and (
                    type(b) is tuple or type(b) is list) and len(a) == 3 and len(b) == 3:
                if a[2] != b[2] or type(a[2]) is not type(b[2]):
                    raise InvalidArgumentError(f"descriptor {i}: local length {a[2]!r} "
                                               f"differs from remote length {b[2]!r}")
                return a[0], a[1], b[0], b[1], a[2]
    elif isinstance(d, Desc):
        return d.local, d.local_offset, d.remote, d.remote_offset, d.length
    raise InvalidArgumentError(f"descriptor {i} must be a Desc or ((local, offset, length), "
                               f"(remote, offset, length)), got {d!r}")


def check_descriptors(op: object, descs: object, *,
                      is_local: Callable[[RegionHandle], bool]) -> list[Segment]:
    """The checked, coalesced segments of ``descs`` (see the module).

    ``is_local`` says whether a handle belongs to the requesting agent. Adjacent descriptors
    (contiguous on both sides, same regions) merge into one segment. (Written for speed: it
    runs once per descriptor of every transfer.)"""
    if type(op) is not Op:
        raise InvalidArgumentError(f"op must be Op.READ or Op.WRITE, got {op!r}")
    if type(descs) is not list and type(descs) is not tuple:
        raise InvalidArgumentError(f"descs must be a list of descriptors, got "
                                   f"{type(descs).__name__}")
    if not descs:
        raise InvalidArgumentError("a transfer needs at least one descriptor")
    if len(descs) > MAX_DESCRIPTORS:
        raise InvalidArgumentError(f"{len(descs)} descriptors, at most {MAX_DESCRIPTORS}")
    reading = op is Op.READ
    need = 1 if reading else 2  # Access.READ / Access.WRITE, without enum lookups
    out: list[Segment] = []
    last: Segment | None = None
    checked: RegionHandle | None = None  # the last local region found registered and open
    for i, raw in enumerate(descs):
        local, loff, remote, roff, n = _unpack(raw, i)
        if local is not checked:
            if type(local) is not RegionHandle or not is_local(local):
                raise InvalidArgumentError(f"descriptor {i}: local side must be a region "
                                           f"this agent registered, got {local!r}")
            local.check_open()
            if reading and not local.writable:
                raise InvalidArgumentError(f"descriptor {i}: READ into a read-only region")
            checked = local
        size = local.length
        if type(n) is not int or not 0 < n <= size:
            _int(f"descriptor {i} length", n, 1, size + 1)
        if type(loff) is not int or loff < 0 or loff + n > size:
            _int(f"descriptor {i} local offset", loff, 0, size)
            raise InvalidArgumentError(f"descriptor {i}: [{loff}, {loff + n}) is outside "
                                       f"the local region ({size} bytes)")
        if type(roff) is not int or not 0 <= roff < _ID_LIMIT:
            _int(f"descriptor {i} remote offset", roff, 0, _ID_LIMIT)
        if type(remote) is RemoteRegion:
            rid = remote.id
            if roff + n > remote.length:
                raise InvalidArgumentError(
                    f"descriptor {i}: [{roff}, {roff + n}) is outside remote region "
                    f"{remote.name or rid} ({remote.length} bytes)")
            if not remote.access.value & need:
                raise InvalidArgumentError(f"descriptor {i}: the peer does not allow "
                                           f"{op.value} on region {remote.name or rid}")
        else:
            rid = _int(f"descriptor {i} remote region id", remote, 1, _ID_LIMIT)
        if (last is not None and last.local is local and last.remote_id == rid
                and last.local_offset + last.length == loff
                and last.remote_offset + last.length == roff):
            last = out[-1] = last._replace(length=last.length + n)
        else:
            last = Segment(local, loff, rid, roff, n)
            out.append(last)
    return out


def total_bytes(segments: Sequence[Segment]) -> int:
    if len(segments) == 1:  # the usual transfer: no generator
        return segments[0].length
    return sum(s.length for s in segments)

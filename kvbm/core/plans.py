"""Transfer plans: what the control plane asks the data plane to copy, as typed records.

The manager (control plane) decides which blocks move between the engine's memory (G1) and
the host pool (G2); a mover (data plane, in the engine's worker process) executes the copies.
A plan names blocks by the engine's block id, the G2 slot and the block's sequence hash (the
mover checks each G2 page's tag against that hash, so a page that is not the block's is never
loaded). Plans and their results cross processes as plain msgpack data, never pickle.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

from kvbm.errors import InvalidArgumentError

_U64 = (1 << 64) - 1
_I32 = (1 << 31) - 1

#: Version tag of the wire form (a peer speaking another one is refused, not guessed at).
WIRE_VERSION = 1


class Direction(enum.Enum):
    """Which way a plan copies."""

    #: G2 -> G1: a prefix hit brought into the engine's memory
    LOAD = "load"
    #: G1 -> G2: newly computed blocks kept in host memory
    SAVE = "save"


class CopyStatus(enum.Enum):
    """How one block copy of a plan ended."""

    DONE = "done"
    #: the G2 page did not carry the block's tag (overwritten, never written, or torn): the
    #: block was not loaded and must be recomputed
    MISMATCH = "mismatch"
    #: the copy itself failed (bad block id, device error)
    FAILED = "failed"


def _int(value: Any, name: str, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= hi:
        raise InvalidArgumentError(f"{name} must be an int in [0, {hi}], got {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class BlockCopy:
    """One block: the engine's block id, the G2 slot, and the block's sequence hash."""

    g1_block: int
    g2_slot: int
    seq_hash: int

    def __post_init__(self) -> None:
        _int(self.g1_block, "g1_block", _I32)
        _int(self.g2_slot, "g2_slot", _I32)
        _int(self.seq_hash, "seq_hash", _U64)
        if self.seq_hash == 0:
            # 0 is the tag of a page being written (see kvbm.memory.shm): no block carries it.
            raise InvalidArgumentError("seq_hash 0 is reserved for pages being written")


@dataclass(frozen=True, slots=True)
class TransferPlan:
    """Copies in one direction, for one request (``request_id``, for completion reports)."""

    plan_id: int
    direction: Direction
    copies: tuple[BlockCopy, ...]
    request_id: str = ""

    def __post_init__(self) -> None:
        _int(self.plan_id, "plan_id", _U64)
        if not isinstance(self.direction, Direction):
            raise InvalidArgumentError(f"direction must be a Direction, got {self.direction!r}")
        if not isinstance(self.copies, tuple) or not all(
                isinstance(c, BlockCopy) for c in self.copies):
            raise InvalidArgumentError("copies must be a tuple of BlockCopy")
        if not isinstance(self.request_id, str):
            raise InvalidArgumentError(f"request_id must be a str, got {self.request_id!r}")
        slots = [c.g2_slot for c in self.copies]
        if len(set(slots)) != len(slots):
            raise InvalidArgumentError(f"plan {self.plan_id}: a G2 slot appears twice")
        if self.direction is Direction.SAVE:
            blocks = [c.g1_block for c in self.copies]
            if len(set(blocks)) != len(blocks):
                raise InvalidArgumentError(f"plan {self.plan_id}: a block is saved twice")

    def to_plain(self) -> list[Any]:
        return [self.plan_id, self.direction.value, self.request_id,
                [[c.g1_block, c.g2_slot, c.seq_hash] for c in self.copies]]

    @classmethod
    def from_plain(cls, obj: Any) -> TransferPlan:
        try:
            plan_id, direction, request_id, copies = obj
            return cls(plan_id, Direction(direction),
                       tuple(BlockCopy(*c) for c in copies), request_id)
        except InvalidArgumentError:
            raise
        except (TypeError, ValueError) as e:
            raise InvalidArgumentError(f"malformed transfer plan {obj!r:.200}: {e}") from None


@dataclass(frozen=True, slots=True)
class PlanResult:
    """What one worker (``rank``) did with one plan: a status per copy, in plan order."""

    plan_id: int
    rank: int
    statuses: tuple[CopyStatus, ...]

    def __post_init__(self) -> None:
        _int(self.plan_id, "plan_id", _U64)
        _int(self.rank, "rank", _I32)
        if not isinstance(self.statuses, tuple) or not all(
                isinstance(s, CopyStatus) for s in self.statuses):
            raise InvalidArgumentError("statuses must be a tuple of CopyStatus")

    @property
    def ok(self) -> bool:
        return all(s is CopyStatus.DONE for s in self.statuses)

    def to_plain(self) -> list[Any]:
        return [self.plan_id, self.rank, [s.value for s in self.statuses]]

    @classmethod
    def from_plain(cls, obj: Any) -> PlanResult:
        try:
            plan_id, rank, statuses = obj
            return cls(plan_id, rank, tuple(CopyStatus(s) for s in statuses))
        except InvalidArgumentError:
            raise
        except (TypeError, ValueError) as e:
            raise InvalidArgumentError(f"malformed plan result {obj!r:.200}: {e}") from None


def encode_plans(plans: Iterable[TransferPlan]) -> bytes:
    """The wire form of a list of plans (msgpack)."""
    out: bytes = msgpack.packb([WIRE_VERSION, [p.to_plain() for p in plans]])
    return out


def decode_plans(data: bytes) -> list[TransferPlan]:
    """Inverse of :func:`encode_plans`; garbage raises
    :class:`~kvbm.errors.InvalidArgumentError`."""
    body = _unpack(data, "transfer plans")
    return [TransferPlan.from_plain(p) for p in body]


def encode_results(results: Iterable[PlanResult]) -> bytes:
    out: bytes = msgpack.packb([WIRE_VERSION, [r.to_plain() for r in results]])
    return out


def decode_results(data: bytes) -> list[PlanResult]:
    body = _unpack(data, "plan results")
    return [PlanResult.from_plain(r) for r in body]


def _unpack(data: bytes, what: str) -> Sequence[Any]:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise InvalidArgumentError(f"{what}: expected bytes, got {type(data).__name__}")
    try:
        obj = msgpack.unpackb(data, strict_map_key=True, raw=False)
    except Exception as e:  # msgpack raises several unrelated classes on garbage
        raise InvalidArgumentError(f"{what}: not msgpack ({e})") from None
    if (not isinstance(obj, list) or len(obj) != 2 or obj[0] != WIRE_VERSION
            or not isinstance(obj[1], list)):
        raise InvalidArgumentError(f"{what}: unknown wire form {obj!r:.200}")
    return obj[1]

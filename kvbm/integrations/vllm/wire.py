"""What crosses between the connector's scheduler side and its workers, as plain msgpack.

vLLM carries the payloads inside its own connector metadata objects; kvbm objects never
cross a process, so nothing here is pickled. Garbage raises
:class:`~kvbm.errors.InvalidArgumentError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgpack

from kvbm.core.plans import PlanResult, TransferPlan
from kvbm.errors import InvalidArgumentError

_VERSION = 1


@dataclass(frozen=True)
class PoolInfo:
    """Where the shared G2 pool is: a worker attaches to it by name."""

    name: str
    layout: dict[str, Any]
    num_blocks: int
    tag_columns: int


@dataclass(frozen=True)
class StepPlan:
    """The scheduler's instructions to every worker for one engine step."""

    step: int
    pool: PoolInfo | None
    plans: list[TransferPlan] = field(default_factory=list)
    #: engine block ids the scheduler promised but cannot provide: vLLM recomputes them
    load_errors: list[int] = field(default_factory=list)
    #: requests whose asynchronous load ends with this step's plans (report as received)
    recv_done: list[str] = field(default_factory=list)
    #: finished requests whose last saves are in this step (report as sent: vLLM frees them)
    send_done: list[str] = field(default_factory=list)

    def encode(self) -> bytes:
        pool = None if self.pool is None else [self.pool.name, self.pool.layout,
                                               self.pool.num_blocks, self.pool.tag_columns]
        out: bytes = msgpack.packb([_VERSION, self.step, pool,
                                    [p.to_plain() for p in self.plans], self.load_errors,
                                    self.recv_done, self.send_done])
        return out

    @classmethod
    def decode(cls, data: bytes) -> StepPlan:
        obj = unpack(data, "step plan")
        try:
            version, step, pool, plans, errors, recv, send = obj
            if version != _VERSION:
                raise ValueError(f"version {version}")
            info = None if pool is None else PoolInfo(str(pool[0]), dict(pool[1]),
                                                      int(pool[2]), int(pool[3]))
            out = cls(int(step), info, [TransferPlan.from_plain(p) for p in plans],
                      [int(b) for b in errors], [str(r) for r in recv],
                      [str(r) for r in send])
        except InvalidArgumentError:
            raise
        except (TypeError, ValueError, IndexError, KeyError) as e:
            raise InvalidArgumentError(f"malformed step plan: {e}") from None
        return out


@dataclass(frozen=True)
class WorkerReport:
    """What one worker did in one step: a result per plan. ``step``: the last step plan the
    worker executed (every plan of it and of earlier steps is in this report or an earlier
    one: a plan without a result by then lost its report)."""

    rank: int
    results: list[PlanResult]
    step: int = 0

    def encode(self) -> bytes:
        out: bytes = msgpack.packb([_VERSION, self.rank, [r.to_plain() for r in self.results],
                                    self.step])
        return out

    @classmethod
    def decode(cls, data: bytes) -> WorkerReport:
        obj = unpack(data, "worker report")
        try:
            version, rank, results, step = obj
            if version != _VERSION:
                raise ValueError(f"version {version}")
            return cls(int(rank), [PlanResult.from_plain(r) for r in results], int(step))
        except InvalidArgumentError:
            raise
        except (TypeError, ValueError) as e:
            raise InvalidArgumentError(f"malformed worker report: {e}") from None


def unpack(data: Any, what: str) -> Any:
    """msgpack ``data`` decoded; anything else (not bytes, garbage) an InvalidArgumentError
    naming ``what``: one refusal for every message between the connector's processes."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise InvalidArgumentError(f"{what}: expected bytes, got {type(data).__name__}")
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated classes on garbage
        raise InvalidArgumentError(f"{what}: not msgpack ({e})") from None

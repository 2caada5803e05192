"""Disaggregated prefill/decode: what crosses processes, as plain msgpack (never pickle).

* :class:`DisaggStep` -- the scheduler side's instructions to its workers for one step:
  blocks to hold for a decode side (prefill) and transfers to run (decode). It travels in
  vLLM's connector metadata next to kvbm's own step plan.
* :class:`Note` -- a notification between a decode worker and a prefill worker, carried by
  the transport (``Agent.transfer(..., notify=...)`` or ``Agent.notify``, see pd_jobs):
  DONE / DROP (the decode side has the blocks, or will not take them), WRITE (please
  write them into my staging region), WRITTEN / REFUSED (the prefill side's answer).
* :class:`Handshake` -- a worker's agent address, handed to its scheduler side by vLLM's
  ``get_handshake_metadata`` / ``set_xfer_handshake_metadata``.

Garbage raises :class:`~kvbm.errors.InvalidArgumentError`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import msgpack

from kvbm.errors import InvalidArgumentError
from kvbm.integrations.vllm.pd_params import MAX_BLOCKS, AgentAddr, Lease
from kvbm.integrations.vllm.wire import unpack

_VERSION = 1
_U64 = 1 << 64


@dataclass(frozen=True)
class Hold:
    """Prefill worker: keep ``block_ids`` (vLLM keeps them allocated) until the decode side
    says it has them, or ``lease_s`` passed; write the lease's token into its word now."""

    request_id: str
    lease: Lease
    lease_s: float
    block_ids: tuple[int, ...]


@dataclass(frozen=True)
class Recv:
    """Decode worker: get the remote blocks of a request into ``local_blocks`` (the same
    count), from ``agents[rank]``. With no local blocks it only tells the prefill side to
    let them go (the request was aborted, or vLLM found them all in its own cache)."""

    request_id: str
    remote_request_id: str
    agents: tuple[AgentAddr, ...]
    remote_blocks: tuple[int, ...]
    local_blocks: tuple[int, ...]
    lease: Lease


@dataclass(frozen=True)
class DisaggStep:
    holds: list[Hold] = field(default_factory=list)
    recvs: list[Recv] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.holds or self.recvs)

    def encode(self) -> bytes:
        holds = [[h.request_id, h.lease.slot, h.lease.token, h.lease.prev, h.lease_s,
                  list(h.block_ids)] for h in self.holds]
        recvs = [[r.request_id, r.remote_request_id, [a.to_plain() for a in r.agents],
                  list(r.remote_blocks), list(r.local_blocks), r.lease.slot, r.lease.token,
                  r.lease.prev] for r in self.recvs]
        out: bytes = msgpack.packb([_VERSION, holds, recvs])
        return out

    @classmethod
    def decode(cls, data: Any) -> DisaggStep:
        obj = unpack(data, "disaggregation step")
        try:
            version, holds, recvs = obj
            if version != _VERSION:
                raise ValueError(f"version {version}")
            hs = [Hold(_s(rid), Lease(_i(slot), _i(tok), _i(prev)), float(ls), _blocks(b))
                  for rid, slot, tok, prev, ls, b in holds]
            rs = [Recv(_s(rid), _s(rrid), tuple(AgentAddr.from_plain(a) for a in agents),
                       _blocks(rb), _blocks(lb), Lease(_i(slot), _i(tok), _i(prev)))
                  for rid, rrid, agents, rb, lb, slot, tok, prev in recvs]
        except InvalidArgumentError:
            raise
        except (TypeError, ValueError) as e:
            raise InvalidArgumentError(f"malformed disaggregation step: {e}") from None
        if any(len(r.remote_blocks) != len(r.local_blocks) and r.local_blocks for r in rs):
            raise InvalidArgumentError("a transfer with unequal remote and local blocks")
        return cls(hs, rs)


class NoteKind(enum.Enum):
    DONE = "done"
    DROP = "drop"
    WRITE = "write"
    WRITTEN = "written"
    REFUSED = "refused"


@dataclass(frozen=True)
class Note:
    """See the module. ``request_id`` is the prefill side's; ``token`` its lease's token
    (a note whose token is not the hold's is someone else's and ignored)."""

    kind: NoteKind
    request_id: str
    token: int
    #: WRITE: the decode worker's agent, the held blocks to write (the decode side's own
    #: prefix hit is not written) and the staging region they go to, one after another;
    #: DONE: the blocks the decode side read
    agent: AgentAddr | None = None
    blocks: tuple[int, ...] = ()
    region: str = ""
    #: REFUSED: why; DONE and WRITTEN: the transport backend that carried the blocks
    why: str = ""

    def encode(self) -> bytes:
        out: bytes = msgpack.packb([_VERSION, self.kind.value, self.request_id, self.token,
                                    None if self.agent is None else self.agent.to_plain(),
                                    list(self.blocks), self.region, self.why[:512]])
        return out

    @classmethod
    def decode(cls, data: Any) -> Note:
        obj = unpack(data, "note")
        try:
            version, kind, rid, token, agent, blocks, region, why = obj
            if version != _VERSION:
                raise ValueError(f"version {version}")
            note = cls(NoteKind(kind), _s(rid), _i(token),
                       None if agent is None else AgentAddr.from_plain(agent),
                       _blocks(blocks), str(region)[:128], str(why)[:512])
        except InvalidArgumentError:
            raise
        except (TypeError, ValueError) as e:
            raise InvalidArgumentError(f"malformed note: {e}") from None
        if note.kind is NoteKind.WRITE and (note.agent is None or not note.blocks
                                            or not note.region):
            raise InvalidArgumentError("a WRITE note without its agent, blocks or region")
        return note


@dataclass(frozen=True)
class Handshake:
    """One worker's agent, for its scheduler side (which puts it in the params)."""

    rank: int
    agent: AgentAddr

    def encode(self) -> bytes:
        out: bytes = msgpack.packb([_VERSION, self.rank, self.agent.to_plain()])
        return out

    @classmethod
    def decode(cls, data: Any) -> Handshake:
        obj = unpack(data, "handshake")
        try:
            version, rank, agent = obj
            if version != _VERSION:
                raise ValueError(f"version {version}")
            return cls(_i(rank), AgentAddr.from_plain(agent))
        except InvalidArgumentError:
            raise
        except (TypeError, ValueError) as e:
            raise InvalidArgumentError(f"malformed handshake: {e}") from None


def _i(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < _U64:
        raise ValueError(f"expected an unsigned 64-bit int, got {v!r}")
    return v


def _s(v: Any) -> str:
    if not isinstance(v, str) or not v:
        raise ValueError(f"expected a non-empty string, got {v!r}")
    return v


def _blocks(v: Any) -> tuple[int, ...]:
    if not isinstance(v, list | tuple) or len(v) > MAX_BLOCKS:
        raise ValueError("expected a list of block ids")
    out = tuple(_i(b) for b in v)
    if any(b >= 1 << 31 for b in out):
        raise ValueError("block id out of range")
    return out

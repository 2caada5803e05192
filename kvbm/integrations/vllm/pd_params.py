"""Disaggregated prefill/decode: the settings and the ``kv_transfer_params`` that travel
between the two vLLM instances through the proxy.

The request-level protocol is vLLM's own (its P/D connectors speak it): a proxy sends the
request to the prefill instance with ``kv_transfer_params={"do_remote_decode": True}`` and
one output token; the prefill instance returns, from ``request_finished``, the params that
say where the request's KV is; the proxy sends the request on to the decode instance with
those params, which now carry ``do_remote_prefill=True``. kvbm's params keep vLLM's field
names at the top level (a proxy written for vLLM forwards them unchanged) and add a
``"kvbm"`` map: every worker's transport agent, the layout fingerprint, a digest of the
prompt tokens, and the lease of the held blocks. Everything is JSON-safe (64-bit values as
hex strings: a proxy in JavaScript would round them).

A lease word guards the prefill side's blocks: the prefill worker writes the lease's token
into a registered word while it holds the blocks and a *release marker* (the token with the
top bit set) before it lets vLLM free them. A decode worker reads the word after reading the
blocks: the data is the request's KV only if the word then still holds the token, or the
slot's previous marker (the prefill worker has not taken the hold yet, so the blocks are
still the request's). A token is never reused, so a word that moved on means "released".
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvbm.errors import ConfigError, InvalidArgumentError

PARAMS_VERSION = 1
#: The top bit of a lease word: set in release markers, never in tokens.
RELEASED_BIT = 1 << 63
#: Blocks one request may hand off at most (a bound on what a peer's params make us do).
MAX_BLOCKS = 1 << 20
_U63 = (1 << 63) - 1
_HEX = re.compile(r"[0-9a-f]+")


class PdMode(enum.Enum):
    """How a decode worker gets the blocks: it READs them from the prefill worker's KV
    memory, or it asks the prefill worker to WRITE them into its own."""

    READ = "read"
    WRITE = "write"


@dataclass(frozen=True)
class Roles:
    """What this instance does in disaggregated serving (from vLLM's ``kv_role``)."""

    produce: bool = False
    consume: bool = False

    @property
    def any(self) -> bool:
        return self.produce or self.consume


@dataclass(frozen=True)
class DisaggConfig:
    """``kv_connector_extra_config["kvbm_disagg"]`` (docs/vllm.md)."""

    #: How this instance receives as the decode side (the prefill side serves both).
    mode: PdMode = PdMode.READ
    #: The prefill side holds a finished request's blocks at most this long for the decode
    #: side; then they are freed and a late decode side recomputes.
    lease_s: float = 60.0
    #: The decode side gives up a transfer after this long and recomputes.
    timeout_s: float = 30.0
    #: Requests the prefill side holds at once; beyond, a request is handed off without KV
    #: (the decode side computes its prompt).
    max_handoffs: int = 4096
    #: Transfers a worker runs at once.
    threads: int = 4

    def __post_init__(self) -> None:
        if not isinstance(self.mode, PdMode):
            raise ConfigError(f"kvbm_disagg.mode must be 'read' or 'write', got {self.mode!r}")
        for name in ("lease_s", "timeout_s"):
            v = getattr(self, name)
            if (isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v)
                    or not 0 < v <= 86_400):
                raise ConfigError(f"kvbm_disagg.{name} must be a number of seconds in "
                                  f"(0, 86400], got {v!r}")
        for name, high in (("max_handoffs", 1 << 20), ("threads", 64)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= high:
                raise ConfigError(f"kvbm_disagg.{name} must be an int in [1, {high}], "
                                  f"got {v!r}")

    @classmethod
    def from_mapping(cls, data: Any) -> DisaggConfig:
        from kvbm.config import _build  # the same coercion and errors as kvbm's config

        if data is None:
            return cls()
        return _build(cls, data, "kvbm_disagg")


def roles_for(kv_role: object, configured: bool) -> Roles:
    """vLLM's ``kv_role``: ``kv_producer`` prefills, ``kv_consumer`` decodes, ``kv_both``
    does either (per request, by its params) when ``kvbm_disagg`` is configured, and is
    kvbm's plain tiered cache otherwise."""
    if kv_role == "kv_producer":
        return Roles(produce=True)
    if kv_role == "kv_consumer":
        return Roles(consume=True)
    if kv_role in ("kv_both", None):
        return Roles(produce=configured, consume=configured)
    raise ConfigError(f"unknown kv_role {kv_role!r}")


@dataclass(frozen=True)
class AgentAddr:
    """Where one worker's transport agent listens."""

    name: str
    host: str
    port: int

    def to_plain(self) -> list[Any]:
        return [self.name, self.host, self.port]

    @classmethod
    def from_plain(cls, obj: Any) -> AgentAddr:
        if not (isinstance(obj, list | tuple) and len(obj) == 3):
            raise InvalidArgumentError(f"an agent address is [name, host, port], got {obj!r}")
        name, host, port = obj
        if not isinstance(name, str) or not name or not isinstance(host, str) or not host:
            raise InvalidArgumentError(f"agent name and host must be strings, got {obj!r}")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise InvalidArgumentError(f"agent port must be in [1, 65535], got {port!r}")
        return cls(name, host, port)


@dataclass(frozen=True)
class Lease:
    """A held request's lease word: its slot, its token, and the slot's previous marker."""

    slot: int
    token: int
    prev: int

    def accepts(self, word: int) -> bool:
        """Whether a lease word read after the blocks proves they were the request's."""
        return word == self.token or word == self.prev


def release_marker(token: int) -> int:
    return token | RELEASED_BIT


def token_digest(tokens: Sequence[int] | np.ndarray[Any, Any]) -> int:
    """xxh3-64 of the tokens as u32 little-endian: the decode side's prompt must be the
    prefill side's, up to the handed-off tokens."""
    import xxhash

    arr = np.asarray(tokens, dtype="<u4")
    return int(xxhash.xxh3_64_intdigest(arr.tobytes()))


@dataclass(frozen=True)
class HandoffParams:
    """What the prefill side says of a finished request (see the module)."""

    engine_id: str
    request_id: str
    #: one per tensor-parallel rank
    agents: tuple[AgentAddr, ...]
    block_ids: tuple[int, ...]
    num_tokens: int
    block_size: int
    #: the kvbm layout's fingerprint (model id, shape, dtype)
    layout: int
    tokens: int
    lease: Lease
    lease_s: float

    def to_json(self) -> dict[str, Any]:
        first = self.agents[0]
        return {"do_remote_prefill": True, "do_remote_decode": False,
                "remote_engine_id": self.engine_id, "remote_request_id": self.request_id,
                "remote_host": first.host, "remote_port": first.port,
                "remote_block_ids": list(self.block_ids),
                "remote_num_tokens": self.num_tokens, "tp_size": len(self.agents),
                "kvbm": {"v": PARAMS_VERSION, "agents": [a.to_plain() for a in self.agents],
                         "block_size": self.block_size, "layout": _hex(self.layout),
                         "tokens": _hex(self.tokens),
                         "lease": [self.lease.slot, _hex(self.lease.token),
                                   _hex(self.lease.prev)],
                         "lease_s": self.lease_s}}

    @classmethod
    def from_json(cls, params: Any) -> HandoffParams:
        """Parse a request's params; :class:`InvalidArgumentError` if malformed."""
        if not isinstance(params, Mapping):
            raise InvalidArgumentError("kv_transfer_params must be a mapping")
        k = params.get("kvbm")
        if not isinstance(k, Mapping) or k.get("v") != PARAMS_VERSION:
            raise InvalidArgumentError(f"not kvbm's params of version {PARAMS_VERSION}")
        try:
            agents = tuple(AgentAddr.from_plain(a) for a in k["agents"])
            blocks = params["remote_block_ids"]
            if not isinstance(blocks, list | tuple) or len(blocks) > MAX_BLOCKS:
                raise InvalidArgumentError("remote_block_ids must be a list")
            slot, token, prev = k["lease"]
            out = cls(engine_id=_str(params["remote_engine_id"], "remote_engine_id"),
                      request_id=_str(params["remote_request_id"], "remote_request_id"),
                      agents=agents, block_ids=tuple(_int(b, "block id", 1 << 31)
                                                     for b in blocks),
                      num_tokens=_int(params["remote_num_tokens"], "remote_num_tokens", 1 << 40),
                      block_size=_int(k["block_size"], "block_size", 1 << 20),
                      layout=_unhex(k["layout"], "layout"), tokens=_unhex(k["tokens"], "tokens"),
                      lease=Lease(_int(slot, "lease slot", 1 << 20), _unhex(token, "token"),
                                  _unhex(prev, "prev")),
                      lease_s=float(k["lease_s"]))
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, InvalidArgumentError):
                raise
            raise InvalidArgumentError(f"malformed kvbm kv_transfer_params: {e!r}") from None
        if not agents or out.block_size < 1 or out.num_tokens < 1:
            raise InvalidArgumentError("kvbm kv_transfer_params without agents or tokens")
        if -(-out.num_tokens // out.block_size) != len(out.block_ids):
            raise InvalidArgumentError(f"{len(out.block_ids)} remote blocks for "
                                       f"{out.num_tokens} tokens of block size "
                                       f"{out.block_size}")
        if not 0 < out.lease.token <= _U63 or not math.isfinite(out.lease_s):
            raise InvalidArgumentError("malformed lease in kvbm kv_transfer_params")
        return out


def wants_handoff(params: Any) -> bool:
    """The proxy asks this (prefill) instance to hand the request's KV off."""
    return isinstance(params, Mapping) and bool(params.get("do_remote_decode"))


def wants_remote_prefill(params: Any) -> bool:
    """The request's KV was computed by a prefill instance (kvbm's params)."""
    return (isinstance(params, Mapping) and bool(params.get("do_remote_prefill"))
            and "kvbm" in params)


def _hex(v: int) -> str:
    return format(v, "016x")


def _unhex(v: Any, what: str) -> int:
    if not isinstance(v, str) or not 0 < len(v) <= 16 or not _HEX.fullmatch(v):
        raise InvalidArgumentError(f"{what} must be a hex string, got {v!r}")
    return int(v, 16)


def _int(v: Any, what: str, high: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < high:
        raise InvalidArgumentError(f"{what} must be an int in [0, {high}), got {v!r}")
    return v


def _str(v: Any, what: str) -> str:
    if not isinstance(v, str) or not v or len(v) > 1024:
        raise InvalidArgumentError(f"{what} must be a non-empty string, got {v!r}")
    return v

"""Disaggregated prefill/decode, the scheduler side: vLLM's P/D request protocol over kvbm.

**Prefill instance** (``kv_role="kv_producer"``, or ``kv_both``): a request whose params say
``do_remote_decode`` runs as usual (the proxy asks for one output token); when it finishes,
:meth:`DisaggScheduler.request_finished` takes a lease slot, tells the workers to hold the
request's blocks (:class:`~kvbm.integrations.vllm.pd_wire.Hold`) and returns the
``kv_transfer_params`` for the decode instance (:mod:`~kvbm.integrations.vllm.pd_params`);
the connector asks vLLM to keep the blocks (``delay_free``). Each worker reports the request
as sent once the decode side said it has the blocks, or the lease ran out; vLLM then frees
them and the slot is given back (:meth:`DisaggScheduler.on_sent`).

**Decode instance** (``kv_consumer``, or ``kv_both``): a request with kvbm's params and
``do_remote_prefill`` is answered with the remote tokens beyond vLLM's own prefix hit and
``load_async=True``, once its params check out (layout fingerprint, tensor-parallel size,
block size, and a digest of the prompt tokens: a proxy that sent another prompt gets a
recompute, not another prompt's KV). Once vLLM allocated the blocks, the workers get the
transfer (:class:`~kvbm.integrations.vllm.pd_wire.Recv`) and report the request received
when it is over, with every block of a failed transfer as a load error (vLLM recomputes
them). A request that never gets that far (aborted, all in vLLM's cache, refused) still
tells the prefill side to let its blocks go. Afterwards the received blocks are vLLM's
computed blocks like any other: kvbm saves them to G2 and below and announces them.

Duck-typed on vLLM's request objects (attributes only): testable without vLLM.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from kvbm.errors import InvalidArgumentError, LayoutError
from kvbm.integrations.vllm.config import ConnectorSettings
from kvbm.integrations.vllm.pd_params import (
    AgentAddr,
    DisaggConfig,
    HandoffParams,
    Lease,
    Roles,
    release_marker,
    token_digest,
    wants_handoff,
    wants_remote_prefill,
)
from kvbm.integrations.vllm.pd_stats import HandoffFailure, LoadFailure, PdMeter
from kvbm.integrations.vllm.pd_wire import DisaggStep, Handshake, Hold, Recv
from kvbm.integrations.vllm.stats import KvbmConnectorStats

log = logging.getLogger(__name__)

_FINISHED_OK = ("FINISHED_LENGTH_CAPPED", "FINISHED_STOPPED")


@dataclass
class PdCounters:
    """What the scheduler side decided (plain data; the workers count the bytes)."""

    #: prefill: requests handed off with params (blocks held)
    handoffs: int = 0
    #: prefill: held requests every worker reported released
    released: int = 0
    #: prefill: requests not handed off: every lease slot in use
    no_slot: int = 0
    #: decode: transfers planned, and the tokens they bring
    transfers: int = 0
    transfer_tokens: int = 0
    #: decode: params refused (malformed, another layout, other tokens): recomputed
    refused: int = 0
    #: decode: prefill sides told to let go without a transfer
    drops: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


class LeaseSlots:
    """The prefill side's lease words: a slot per held request (see pd_params)."""

    def __init__(self, n: int) -> None:
        self._free = list(range(n - 1, -1, -1))
        self._last = [0] * n

    def take(self) -> Lease | None:
        if not self._free:
            return None
        slot = self._free.pop()
        return Lease(slot, secrets.randbits(63) or 1, self._last[slot])

    def give_back(self, lease: Lease) -> None:
        """Every worker wrote the lease's release marker (it reported the request sent)."""
        self._last[lease.slot] = release_marker(lease.token)
        self._free.append(lease.slot)

    @property
    def in_use(self) -> int:
        return len(self._last) - len(self._free)


@dataclass
class _Ask:
    params: HandoffParams | None
    #: vLLM's own prefix hit, in blocks (the transfer starts there)
    start: int = 0
    #: the params check out: transfer; else only drop
    ok: bool = False


class DisaggScheduler:
    """See the module docstring. One per vLLM engine, beside kvbm's SchedulerSide."""

    def __init__(self, settings: ConnectorSettings, config: DisaggConfig, roles: Roles,
                 engine_id: str) -> None:
        self.settings = settings
        self.config = config
        self.roles = roles
        self.engine_id = engine_id
        self.block_size = settings.layout.block_size
        self.counters = PdCounters()
        #: the same, and why requests were refused, for vLLM's stats (see pd_stats)
        self.meter = PdMeter()
        self._agents: tuple[AgentAddr, ...] | None = None
        self._slots = LeaseSlots(config.max_handoffs)
        self._held: dict[str, Lease] = {}
        self._asked: dict[str, _Ask] = {}
        self._step = DisaggStep()
        self._warned_no_agents = False

    # -------------------------------------------------------------------------- setup --
    def set_handshake(self, payloads: Mapping[int, bytes]) -> None:
        """Every worker's agent (vLLM's ``set_xfer_handshake_metadata``)."""
        agents: dict[int, AgentAddr] = {}
        for rank, data in payloads.items():
            hs = Handshake.decode(data)
            if hs.rank != rank:
                raise InvalidArgumentError(f"handshake of rank {hs.rank} given as rank {rank}")
            agents[rank] = hs.agent
        world = self.settings.world_size
        if sorted(agents) != list(range(world)):
            raise InvalidArgumentError(f"handshakes from ranks {sorted(agents)}, expected "
                                       f"0..{world - 1}")
        self._agents = tuple(agents[r] for r in range(world))
        log.info("kvbm: prefill/decode agents %s", ", ".join(
            f"{a.name}@{a.host}:{a.port}" for a in self._agents))

    @property
    def agents(self) -> tuple[AgentAddr, ...] | None:
        return self._agents

    # ------------------------------------------------------------------------- decode --
    def owns(self, request: Any) -> bool:
        """Whether this side answers ``request``'s prefix query (remote prefill)."""
        return self.roles.consume and wants_remote_prefill(
            getattr(request, "kv_transfer_params", None))

    def num_new_matched_tokens(self, request: Any, num_computed_tokens: int
                               ) -> tuple[int, bool]:
        """Remote tokens beyond vLLM's own hit, loaded asynchronously; ``(0, False)``
        when the params do not check out (the decode side then computes them)."""
        rid = request.request_id
        # vLLM asks again while it cannot schedule the request: a refusal is counted once
        first = rid not in self._asked
        try:
            hp = HandoffParams.from_json(request.kv_transfer_params)
        except InvalidArgumentError as e:
            log.warning("kvbm: request %s: %s; its prompt is computed here", rid, e)
            self._refuse(first, LoadFailure.BAD_PARAMS)
            self._asked[rid] = _Ask(None)
            return 0, False
        ask = self._asked[rid] = _Ask(hp)
        checked = self._check(hp, request)
        if checked is not None:
            reason, why = checked
            log.error("kvbm: request %s: the prefill side's KV is not used: %s; its prompt "
                      "is computed here", rid, why)
            self._refuse(first, reason)
            return 0, False
        bs = self.block_size
        if num_computed_tokens % bs or num_computed_tokens >= hp.num_tokens:
            return 0, False
        ask.ok, ask.start = True, num_computed_tokens // bs
        return hp.num_tokens - num_computed_tokens, True

    def _refuse(self, first: bool, reason: LoadFailure) -> None:
        if first:
            self.counters.refused += 1
            self.meter.add("pd_load_failures", 1, (reason,))

    def _check(self, hp: HandoffParams, request: Any) -> tuple[LoadFailure, str] | None:
        layout = self.settings.layout
        if hp.layout != layout.fingerprint or hp.block_size != layout.block_size:
            return LoadFailure.LAYOUT_MISMATCH, str(LayoutError(
                f"the prefill instance's KV layout {hp.layout:016x} (block size "
                f"{hp.block_size}) is not this instance's {layout.fingerprint:016x} (block "
                f"size {layout.block_size}): serve the same model, dtype and block size on "
                f"both, with the same kvbm_model_id"))
        if len(hp.agents) != self.settings.world_size:
            return LoadFailure.LAYOUT_MISMATCH, str(LayoutError(
                f"the prefill instance runs {len(hp.agents)} tensor-parallel ranks, this "
                f"one {self.settings.world_size}: they must be equal"))
        tokens = request.all_token_ids
        if hp.num_tokens > _num_prompt(request) \
                or token_digest(tokens[:hp.num_tokens]) != hp.tokens:
            return LoadFailure.OTHER_PROMPT, (
                f"the prefill instance computed other tokens ({hp.num_tokens} tokens, digest "
                f"{hp.tokens:016x}) than this request's prompt")
        return None

    def after_alloc(self, request: Any, block_ids: list[int], num_external_tokens: int
                    ) -> None:
        """vLLM allocated the request's blocks: plan the transfer (or let the prefill side
        go). Only once per request: its params are marked as used, as vLLM's own P/D
        connectors do (a preempted request is not transferred again)."""
        if not self.owns(request):
            return
        rid = request.request_id
        ask = self._asked.pop(rid, None)
        request.kv_transfer_params["do_remote_prefill"] = False
        if ask is None or ask.params is None:
            return
        hp, bs = ask.params, self.block_size
        end = -(-(ask.start * bs + num_external_tokens) // bs) if num_external_tokens > 0 else 0
        if not ask.ok or end <= ask.start or len(block_ids) < end:
            self._drop(rid, hp)
            return
        self._step.recvs.append(Recv(rid, hp.request_id, hp.agents,
                                     hp.block_ids[ask.start:end],
                                     tuple(block_ids[ask.start:end]), hp.lease))
        self.counters.transfers += 1
        self.counters.transfer_tokens += num_external_tokens
        self.meter.add("pd_loads_started")
        self.meter.add("pd_load_tokens", num_external_tokens)

    def _drop(self, rid: str, hp: HandoffParams) -> None:
        self._step.recvs.append(Recv(rid, hp.request_id, hp.agents, (), (), hp.lease))
        self.counters.drops += 1
        self.meter.add("pd_drops")

    # ------------------------------------------------------------------------ prefill --
    def request_finished(self, request: Any, block_ids: list[int]) -> dict[str, Any] | None:
        """The params for the decode instance when ``request`` is handed off (its blocks
        are then held: the connector asks vLLM to keep them); else ``None``."""
        rid = request.request_id
        params = getattr(request, "kv_transfer_params", None)
        self._asked.pop(rid, None)
        if self.owns(request):  # never allocated (aborted while waiting): let P go
            request.kv_transfer_params["do_remote_prefill"] = False
            with contextlib.suppress(InvalidArgumentError):
                self._drop(rid, HandoffParams.from_json(params))
            return None
        if not (self.roles.produce and wants_handoff(params)):
            return None
        if getattr(request.status, "name", None) not in _FINISHED_OK or not block_ids:
            return None
        if self._agents is None:
            if not self._warned_no_agents:
                self._warned_no_agents = True
                log.error("kvbm: no worker agent announced itself (vLLM's handshake); "
                          "requests are handed off without their KV")
            self.meter.add("pd_handoff_failures", 1, (HandoffFailure.NO_AGENTS,))
            return None
        bs = self.block_size
        tokens = request.all_token_ids
        # The prompt's KV only: with vLLM's asynchronous scheduling a step past the prompt
        # may be counted already (its token is the decode side's to compute).
        num = min(int(request.num_computed_tokens), _num_prompt(request))
        blocks = tuple(block_ids[: -(-num // bs)])
        if num < 1 or len(blocks) * bs < num:
            return None
        lease = self._slots.take()
        if lease is None:
            self.counters.no_slot += 1
            self.meter.add("pd_handoff_failures", 1, (HandoffFailure.NO_SLOT,))
            log.warning("kvbm: %d requests hold their blocks for decode instances already "
                        "(kvbm_disagg.max_handoffs); request %s is handed off without KV",
                        self.config.max_handoffs, rid)
            return None
        self._held[rid] = lease
        self._step.holds.append(Hold(rid, lease, self.config.lease_s, blocks))
        self.counters.handoffs += 1
        self.meter.add("pd_handoffs")
        hp = HandoffParams(self.engine_id, rid, self._agents, blocks, num, bs,
                           self.settings.layout.fingerprint, token_digest(tokens[:num]),
                           lease, self.config.lease_s)
        return hp.to_json()

    def holds(self, request_id: str) -> bool:
        return request_id in self._held

    def on_sent(self, request_ids: Any) -> None:
        """vLLM's aggregated ``finished_sending``: the held requests every worker let go."""
        for rid in request_ids or ():
            lease = self._held.pop(rid, None)
            if lease is not None:
                self._slots.give_back(lease)
                self.counters.released += 1
                self.meter.add("pd_handoffs_released")

    # ------------------------------------------------------------------------- steps --
    def build_step(self) -> bytes | None:
        """This step's holds and transfers for the workers (``None``: nothing)."""
        step, self._step = self._step, DisaggStep()
        return step.encode() if step else None

    @property
    def held(self) -> int:
        """Requests whose blocks are held for a decode side now."""
        return len(self._held)

    def take_stats(self) -> KvbmConnectorStats | None:
        """What this half counted since the last call (with the connector's own stats, in
        vLLM's scheduler-side ``get_kv_connector_stats``)."""
        if self.roles.produce:
            self.meter.gauge("pd_held_requests", len(self._held))
        return self.meter.take()


def _num_prompt(request: Any) -> int:
    n = getattr(request, "num_prompt_tokens", None)
    return int(n) if isinstance(n, int) else len(request.all_token_ids)

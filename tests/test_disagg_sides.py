"""Disaggregated prefill/decode through the connector's halves, without vLLM: two fake
engines (a prefill and a decode instance), each with kvbm's scheduler side, its
prefill/decode half and one worker per tensor-parallel rank over small KV tensors in vLLM's
CPU format, orchestrated as ``connector.py`` does in vLLM's step loop. The transfers are
real: transport agents on 127.0.0.1 with a shared secret.

What must hold: the decode side's blocks are the prefill side's, byte for byte; anything
that goes wrong (another layout, other tokens, a wrong secret, a peer that died, a lease
that ran out, a write that never came) ends in load errors for every block of the request
(vLLM recomputes them), never in other KV; and the prefill side always lets its blocks go.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from kvbm.config import HostTierConfig, ManagerConfig  # noqa: E402
from kvbm.errors import InvalidArgumentError  # noqa: E402
from kvbm.events import BlockStored  # noqa: E402
from kvbm.integrations.vllm.config import ConnectorSettings  # noqa: E402
from kvbm.integrations.vllm.disagg import DisaggScheduler  # noqa: E402
from kvbm.integrations.vllm.pd_params import (  # noqa: E402
    DisaggConfig,
    HandoffParams,
    PdMode,
    Roles,
)
from kvbm.integrations.vllm.pd_worker import DisaggWorker  # noqa: E402
from kvbm.integrations.vllm.scheduler import SchedulerSide  # noqa: E402
from kvbm.layout import KVLayout  # noqa: E402
from kvbm.transports import Agent, TransportConfig, available_backends  # noqa: E402

BS = 32
G1_BLOCKS = 16
SECRET = "pd-sides-secret-0123456789"
SPAWN = multiprocessing.get_context("spawn")
#: The longest a test waits for a transfer or a child (a guard against hangs, not a timing
#: assertion).
WAIT_S = 300
PRODUCER, CONSUMER = Roles(produce=True), Roles(consume=True)


def layout(model: str = "pd-test") -> KVLayout:
    return KVLayout(2, 4, 32, BS, "float32", model_id=model)


def settings(lay: KVLayout, world: int = 1, secret: str = SECRET, backends: str = "tcp"
             ) -> ConnectorSettings:
    cfg = ManagerConfig(device=None, host=HostTierConfig(32),
                        transport=TransportConfig(secret=secret, backends=backends))
    return ConnectorSettings(lay, cfg, world, "engine")


# -- vLLM's objects, duck-typed ------------------------------------------------------------
@dataclass
class Status:
    name: str


@dataclass
class Req:
    request_id: str
    all_token_ids: list[int]
    kv_transfer_params: dict[str, Any] | None = None
    num_computed_tokens: int = 0
    status: Status = field(default_factory=lambda: Status("RUNNING"))
    num_prompt_tokens: int | None = None
    lora_request: Any = None
    cache_salt: str | None = None
    mm_features: list[Any] = field(default_factory=list)
    prompt_embeds: Any = None


@dataclass
class NewReq:
    req_id: str
    block_ids: tuple[list[int], ...]
    num_computed_tokens: int


@dataclass
class CachedReqs:
    req_ids: list[str] = field(default_factory=list)
    new_block_ids: list[Any] = field(default_factory=list)
    num_computed_tokens: list[int] = field(default_factory=list)
    resumed_req_ids: set[str] = field(default_factory=set)


@dataclass
class SchedOut:
    scheduled_new_reqs: list[NewReq] = field(default_factory=list)
    scheduled_cached_reqs: CachedReqs = field(default_factory=CachedReqs)
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)


def toks(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(1, 30_000, n).tolist()


# -- one fake engine -----------------------------------------------------------------------
class Rank:
    """One TP rank: kvbm's worker side and its prefill/decode half over KV tensors."""

    def __init__(self, s: ConnectorSettings, cfg: DisaggConfig, roles: Roles, engine: str,
                 rank: int, isa: str = "vec") -> None:
        from kvbm.integrations.vllm.worker import WorkerSide

        lay = s.layout
        shape = (G1_BLOCKS, lay.num_kv_heads // s.world_size, BS, 2 * lay.head_dim)
        self.tensors = {f"model.layers.{i}.self_attn.attn":
                        torch.zeros(shape, dtype=lay.torch_dtype())
                        for i in range(lay.num_layers)}
        self.side = WorkerSide(s, rank)
        self.side.register(self.tensors, cpu_isa=isa)
        self.pd = DisaggWorker(s, cfg, roles, engine, rank)
        self.pd.register(self.side.engine_kv, self.side.kv_tensors())

    def run(self, payload: bytes, disagg: bytes | None
            ) -> tuple[bytes | None, set[str], set[str], set[int]]:
        w = self.side
        w.bind(payload)
        self.pd.bind(disagg)
        w.start_load()
        w.wait_for_save()
        s1, r1 = w.finished()
        s2, r2 = self.pd.finished()
        errors = w.load_errors() | self.pd.load_errors()
        report = w.report()
        w.clear()
        return report, (s1 or set()) | (s2 or set()), (r1 or set()) | (r2 or set()), errors

    def blocks(self, ids: Sequence[int]) -> torch.Tensor:
        return torch.stack([t[list(ids)] for t in self.tensors.values()])

    def close(self) -> None:
        self.pd.close()
        self.side.close()


class Engine:
    """The connector's orchestration of both halves (see connector.py), vLLM's
    aggregation of the ranks' finished sets included."""

    def __init__(self, s: ConnectorSettings, roles: Roles, cfg: DisaggConfig | None = None,
                 engine: str = "P", isa: str = "vec") -> None:
        self.s, self.cfg = s, cfg or DisaggConfig()
        self.sched = SchedulerSide(s)
        self.pd = DisaggScheduler(s, self.cfg, roles, engine)
        self.ranks: list[Rank] = []
        try:
            for r in range(s.world_size):
                self.ranks.append(Rank(s, self.cfg, roles, engine, r, isa))
            self.pd.set_handshake({r: k.pd.handshake() for r, k in enumerate(self.ranks)})
        except BaseException:
            self.close()
            raise
        self.sent: set[str] = set()
        self.recvd: set[str] = set()
        self.errors: set[int] = set()
        self._counts: dict[tuple[str, str], int] = {}

    def step(self, so: SchedOut | None = None) -> None:
        payload = self.sched.build_step(so or SchedOut())
        disagg = self.pd.build_step()
        reports, sent, recvd = [], set(), set()
        for rank in self.ranks:
            report, sending, recving, errors = rank.run(payload, disagg)
            if report is not None:
                reports.append(report)
            self.errors |= errors
            for kind, ids, done in (("s", sending, sent), ("r", recving, recvd)):
                for rid in ids:  # vLLM reports a request once every rank did
                    n = self._counts[(kind, rid)] = self._counts.get((kind, rid), 0) + 1
                    if n == len(self.ranks):
                        done.add(rid)
        self.sched.on_worker_reports(reports)
        self.pd.on_sent(sent)
        self.sent |= sent
        self.recvd |= recvd

    def until(self, what: str, rid: str, *others: Engine) -> None:
        """Step this engine (and ``others``: vLLM's engines run on their own) until
        ``rid`` is reported ``what``."""
        end = time.monotonic() + WAIT_S
        while rid not in (self.sent if what == "sent" else self.recvd):
            assert time.monotonic() < end, f"{rid} never {what}"
            self.step()
            for o in others:
                o.step()
            time.sleep(0.01)

    def query(self, req: Req, local_hit: int = 0) -> tuple[int, bool]:
        if self.pd.owns(req):
            return self.pd.num_new_matched_tokens(req, local_hit)
        return self.sched.num_new_matched_tokens(req, local_hit)

    def alloc(self, req: Req, blocks: list[int], n_ext: int) -> None:
        if self.pd.owns(req):
            self.pd.after_alloc(req, blocks, n_ext)
            n_ext = 0
        self.sched.after_alloc(req, blocks, n_ext)

    def finish(self, req: Req, blocks: list[int]) -> tuple[bool, dict[str, Any] | None]:
        params = self.pd.request_finished(req, blocks)
        saving = self.sched.request_finished(req, blocks, report_sent=params is None)
        return saving or params is not None, params

    def compute(self, req: Req, blocks: list[int], seed: int) -> None:
        """Run the whole prompt in one step; the "model" writes KV of ``seed``."""
        n = len(req.all_token_ids)
        self.alloc(req, blocks, 0)
        g = torch.Generator().manual_seed(seed)
        for rank in self.ranks:
            for t in rank.tensors.values():
                t[blocks] = torch.randn(t[blocks].shape, generator=g).to(t.dtype)
        self.step(SchedOut([NewReq(req.request_id, (blocks,), 0)],
                           num_scheduled_tokens={req.request_id: n}))
        req.num_computed_tokens = n

    def kv(self, blocks: Sequence[int]) -> list[torch.Tensor]:
        return [r.blocks(blocks) for r in self.ranks]

    def close(self) -> None:
        for r in self.ranks:
            r.close()
        self.sched.close()


def prefill(p: Engine, rid: str, prompt: list[int], blocks: list[int], *,
            step_ahead: bool = False) -> dict[str, Any]:
    """The proxy's first leg: the request with do_remote_decode and one output token.
    ``step_ahead``: vLLM's asynchronous scheduling had counted the next step already."""
    req = Req(rid, list(prompt), {"do_remote_decode": True}, num_prompt_tokens=len(prompt))
    assert p.query(req) == (0, False)
    p.compute(req, blocks, seed=len(prompt))
    if step_ahead:
        req.all_token_ids.append(17)
        req.num_computed_tokens += 1
    req.status = Status("FINISHED_LENGTH_CAPPED")
    delay, params = p.finish(req, blocks)
    assert delay and params is not None
    p.step()  # the hold reaches the workers
    return json.loads(json.dumps(params))  # what travels through the proxy is JSON


def decode(d: Engine, rid: str, prompt: list[int], params: dict[str, Any],
           blocks: list[int]) -> tuple[int, bool]:
    req = Req(rid, prompt, params)
    n, is_async = d.query(req)
    d.alloc(req, blocks, n)
    d.step()
    return n, is_async


@pytest.fixture
def pair(request: pytest.FixtureRequest) -> Any:
    made: list[Engine] = []

    def make(s: ConnectorSettings, roles: Roles, **kw: Any) -> Engine:
        e = Engine(s, roles, **kw)
        made.append(e)
        return e

    yield make
    for e in made:
        e.close()


BACKENDS = ["tcp"] + (["ucx"] if not isinstance(available_backends(["ucx"])["ucx"], str)
                      else [])


# -- the params ----------------------------------------------------------------------------
def test_params_round_trip_and_garbage() -> None:
    from kvbm.integrations.vllm.pd_params import AgentAddr, Lease

    hp = HandoffParams("eng", "req-1", (AgentAddr("a-0", "127.0.0.1", 5000),), (3, 4, 9),
                       70, BS, (1 << 64) - 1, 12345, Lease(7, (1 << 63) - 1, 1 << 63), 30.0)
    wire = json.loads(json.dumps(hp.to_json()))
    assert wire["do_remote_prefill"] is True and wire["do_remote_decode"] is False
    assert HandoffParams.from_json(wire) == hp
    bad: list[Any] = [None, [], {}, {**wire, "kvbm": {**wire["kvbm"], "v": 2}},
                      {**wire, "remote_block_ids": [3, 4]},           # 3 blocks for 70 tokens
                      {**wire, "remote_block_ids": [3, -4, 9]},
                      {**wire, "remote_block_ids": [3, True, 9]},
                      {**wire, "remote_num_tokens": "70"},
                      {**wire, "kvbm": {**wire["kvbm"], "tokens": "-1"}},
                      {**wire, "kvbm": {**wire["kvbm"], "tokens": "0x12"}},
                      {**wire, "kvbm": {**wire["kvbm"], "agents": [["a", "h", 0]]}},
                      {**wire, "kvbm": {**wire["kvbm"], "agents": []}},
                      {**wire, "kvbm": {**wire["kvbm"], "lease": [1, "0", "0"]}},
                      {k: v for k, v in wire.items() if k != "remote_engine_id"}]
    for b in bad:
        with pytest.raises(InvalidArgumentError):
            HandoffParams.from_json(b)


def test_disagg_config_is_checked() -> None:
    from kvbm.errors import ConfigError

    assert DisaggConfig.from_mapping({"mode": "write", "lease_s": "5"}).mode is PdMode.WRITE
    for bad in ({"mode": "push"}, {"lease_s": float("nan")}, {"timeout_s": 0},
                {"threads": 0}, {"max_handoffs": True}, {"nope": 1}):
        with pytest.raises(ConfigError):
            DisaggConfig.from_mapping(bad)


# -- handoffs ------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", [PdMode.READ, PdMode.WRITE])
@pytest.mark.parametrize("world", [1, 2])
def test_decode_side_gets_the_prefill_sides_blocks(pair: Any, backend: str, mode: PdMode,
                                                   world: int) -> None:
    lay = layout()
    p = pair(settings(lay, world, backends=backend), PRODUCER, engine="P")
    d = pair(settings(lay, world, backends=backend), CONSUMER,
             cfg=DisaggConfig(mode=mode), engine="D")
    prompt = toks(4 * BS + 10, 1)  # 4 full blocks and a tail: 5 blocks move
    params = prefill(p, "r1", prompt, [2, 5, 6, 7, 11])
    assert params["remote_num_tokens"] == len(prompt)
    n, is_async = decode(d, "d1", prompt, params, [9, 3, 4, 1, 14])
    assert (n, is_async) == (len(prompt), True)
    d.until("recvd", "d1", p)
    assert not d.errors
    for mine, theirs in zip(d.kv([9, 3, 4, 1, 14]), p.kv([2, 5, 6, 7, 11]), strict=True):
        assert torch.equal(mine, theirs)
    p.until("sent", "r1")  # the decode side said it has them: the prefill side lets go
    assert p.pd.held == 0 and p.pd.counters.released == 1
    c = p.ranks[0].pd.counters
    assert (c.released_done, c.released_written) == ((1, 0) if mode is PdMode.READ
                                                     else (0, 1))
    recent = d.ranks[0].pd.counters.recent[-1] if mode is PdMode.READ else \
        p.ranks[0].pd.counters.recent[-1]
    assert recent.ok and recent.backend == backend
    # a second, smaller request (WRITE: into a part of the first one's staging buffer)
    prompt = toks(2 * BS + 3, 2)
    params = prefill(p, "r2", prompt, [12, 0, 1])
    decode(d, "d2", prompt, params, [13, 15, 0])
    d.until("recvd", "d2", p)
    assert not d.errors
    for mine, theirs in zip(d.kv([13, 15, 0]), p.kv([12, 0, 1]), strict=True):
        assert torch.equal(mine, theirs)


def test_prefill_hands_off_the_prompt_only(pair: Any) -> None:
    """With vLLM's asynchronous scheduling the finished request may count a step past
    its prompt; the handoff is the prompt's KV (the decode side's request is the prompt)."""
    lay = layout()
    p = pair(settings(lay), PRODUCER, engine="P")
    d = pair(settings(lay), CONSUMER, engine="D")
    prompt = toks(4 * BS, 12)  # the extra token would start a block of its own
    params = prefill(p, "r1", prompt, [2, 5, 6, 7, 11], step_ahead=True)
    assert params["remote_num_tokens"] == len(prompt)
    assert params["remote_block_ids"] == [2, 5, 6, 7]
    assert decode(d, "d1", prompt, params, [9, 3, 4, 1]) == (len(prompt), True)
    d.until("recvd", "d1", p)
    assert not d.errors


def test_kv_both_instances_hand_off_either_way(pair: Any) -> None:
    from kvbm.integrations.vllm.pd_params import roles_for

    assert roles_for("kv_both", False) == Roles()  # kvbm's plain tiered cache
    both = roles_for("kv_both", True)
    assert both == Roles(produce=True, consume=True)
    assert (roles_for("kv_producer", False), roles_for("kv_consumer", False)) == (PRODUCER,
                                                                                  CONSUMER)
    lay = layout()
    a = pair(settings(lay), both, engine="A")
    b = pair(settings(lay), both, engine="B")
    for src, dst, seed in ((a, b, 20), (b, a, 21)):
        prompt = toks(2 * BS + 5, seed)
        params = prefill(src, f"p{seed}", prompt, [0, 1, 2])
        assert decode(dst, f"d{seed}", prompt, params, [4, 5, 6]) == (len(prompt), True)
        dst.until("recvd", f"d{seed}", src)
        assert not dst.errors
        assert all(torch.equal(x, y) for x, y in zip(dst.kv([4, 5, 6]), src.kv([0, 1, 2]),
                                                     strict=True))
        src.until("sent", f"p{seed}", dst)


def test_received_blocks_are_ordinary_kvbm_blocks(pair: Any) -> None:
    """Once in, the decode side's kvbm saves the blocks like computed ones: they are in
    G2, matched by a later request, and announced."""
    lay = layout()
    p = pair(settings(lay), PRODUCER, engine="P")
    d = pair(settings(lay), CONSUMER, engine="D")
    prompt = toks(4 * BS + 10, 2)
    params = prefill(p, "r1", prompt, [0, 1, 2, 3, 4])
    n, _ = decode(d, "d1", prompt, params, [5, 6, 7, 8, 9])
    d.until("recvd", "d1")
    d.sched.take_events()
    # vLLM schedules it once received: the last prompt token is computed again
    d.step(SchedOut([NewReq("d1", ([5, 6, 7, 8, 9],), n - 1)],
                    num_scheduled_tokens={"d1": 1}))
    d.sched.mgr.poll()
    hit = d.sched.num_new_matched_tokens(Req("later", [*prompt, 1, 2, 3]), 0)
    assert hit == (4 * BS, False)  # every full block, from G2
    stored = [h for e in d.sched.take_events() if isinstance(e, BlockStored)
              for h in e.block_hashes]
    assert len(stored) == 4


def test_other_layout_is_refused_and_recomputed(pair: Any, caplog: pytest.LogCaptureFixture
                                                ) -> None:
    p = pair(settings(layout("model-a")), PRODUCER, engine="P")
    d = pair(settings(layout("model-b")), CONSUMER, engine="D")
    prompt = toks(3 * BS, 3)
    params = prefill(p, "r1", prompt, [0, 1, 2])
    d.ranks[0].tensors["model.layers.0.self_attn.attn"].fill_(7.0)
    with caplog.at_level(logging.ERROR):
        assert decode(d, "d1", prompt, params, [3, 4, 5]) == (0, False)
    assert "KV layout" in caplog.text and d.pd.counters.refused == 1
    p.until("sent", "r1")  # told to let go (DROP), not left to its lease
    assert p.ranks[0].pd.counters.released_drop == 1
    assert bool((d.ranks[0].tensors["model.layers.0.self_attn.attn"] == 7.0).all())


def test_other_packing_fails_the_transfer_at_the_worker(pair: Any) -> None:
    """Same model, but the decode side's KV tensors are packed another way (the engines'
    attention kernels differ): the regions' fingerprints differ, nothing moves, every
    block is a load error."""
    lay = KVLayout(2, 4, 32, BS, "bfloat16", model_id="pd-test")
    p = pair(settings(lay), PRODUCER, engine="P", isa="vec")
    d = pair(settings(lay), CONSUMER, engine="D", isa="amx")
    prompt = toks(3 * BS, 4)
    params = prefill(p, "r1", prompt, [0, 1, 2])
    before = d.kv([3, 4, 5])[0].clone()
    decode(d, "d1", prompt, params, [3, 4, 5])
    d.until("recvd", "d1")
    assert d.errors == {3, 4, 5}
    assert torch.equal(d.kv([3, 4, 5])[0], before)
    assert "LayoutError" in d.ranks[0].pd.counters.recent[-1].why
    p.until("sent", "r1")


def test_other_prompt_is_refused(pair: Any) -> None:
    lay = layout()
    p = pair(settings(lay), PRODUCER, engine="P")
    d = pair(settings(lay), CONSUMER, engine="D")
    prompt = toks(3 * BS, 5)
    params = prefill(p, "r1", prompt, [0, 1, 2])
    other = [*prompt[:-1], prompt[-1] + 1]
    assert decode(d, "d1", other, params, [3, 4, 5]) == (0, False)
    p.until("sent", "r1")


def test_wrong_secret_is_a_recompute(pair: Any) -> None:
    lay = layout()
    p = pair(settings(lay), PRODUCER, engine="P")
    d = pair(settings(lay, secret="another-secret-0123456789"), CONSUMER, engine="D")
    prompt = toks(3 * BS, 6)
    params = prefill(p, "r1", prompt, [0, 1, 2])
    before = d.kv([3, 4, 5])[0].clone()
    decode(d, "d1", prompt, params, [3, 4, 5])
    d.until("recvd", "d1")
    assert d.errors == {3, 4, 5}
    assert torch.equal(d.kv([3, 4, 5])[0], before)
    assert "Authentication" in d.ranks[0].pd.counters.recent[-1].why


def test_params_naming_an_agent_without_the_secret_are_a_recompute(pair: Any) -> None:
    """The params name the prefill worker's agent but another address, where an agent
    without the shared secret answers (while the decode worker is connected to the real
    one): the decode side must not take the real connection for it."""
    lay = layout()
    p = pair(settings(lay), PRODUCER, engine="P")
    d = pair(settings(lay), CONSUMER, engine="D")
    first = toks(3 * BS, 13)
    decode(d, "d0", first, prefill(p, "r0", first, [0, 1, 2]), [3, 4, 5])
    d.until("recvd", "d0", p)
    assert not d.errors
    prompt = toks(3 * BS, 14)
    params = prefill(p, "r1", prompt, [6, 7, 8])
    with Agent("impostor", TransportConfig(secret="not-the-shared-secret-000",
                                           backends="tcp")) as imp:
        host, port = imp.address
        params["kvbm"]["agents"][0][1:] = [host, port]
        before = d.kv([9, 10, 11])[0].clone()
        decode(d, "d1", prompt, params, [9, 10, 11])
        d.until("recvd", "d1")
    assert d.errors == {9, 10, 11}
    assert torch.equal(d.kv([9, 10, 11])[0], before)


def test_lease_that_ran_out_is_never_used(pair: Any) -> None:
    """The prefill side's lease ends before the decode side reads: it frees the blocks
    (vLLM reuses them); the decode side still reads bytes, but the lease word says they
    were no longer the request's, so they are load errors."""
    lay = layout()
    p = pair(settings(lay), PRODUCER, cfg=DisaggConfig(lease_s=0.2), engine="P")
    d = pair(settings(lay), CONSUMER, engine="D")
    prompt = toks(3 * BS, 7)
    params = prefill(p, "r1", prompt, [0, 1, 2])
    time.sleep(0.3)
    p.until("sent", "r1")
    assert p.ranks[0].pd.counters.expired == 1
    p.compute(Req("r2", toks(3 * BS, 8)), [0, 1, 2], seed=99)  # vLLM reuses the blocks
    decode(d, "d1", prompt, params, [3, 4, 5])
    d.until("recvd", "d1")
    assert d.errors == {3, 4, 5}
    assert "LeaseLost" in d.ranks[0].pd.counters.recent[-1].why


@pytest.mark.parametrize("mode", [PdMode.READ, PdMode.WRITE])
def test_transfer_past_its_timeout_is_released_and_recomputed(pair: Any, mode: PdMode
                                                              ) -> None:
    """A timeout far below what the transfer takes: it is released where it stands and
    every block is a load error; or, had it finished first, the blocks are whole. Never
    some blocks, never torn ones."""
    lay = KVLayout(2, 8, 128, BS, "float32", model_id="pd-test")  # 256 KiB a block a layer
    p = pair(settings(lay), PRODUCER, engine="P")
    d = pair(settings(lay), CONSUMER, cfg=DisaggConfig(mode=mode, timeout_s=1e-6),
             engine="D")
    prompt = toks(12 * BS, 15)
    src, dst = list(range(12)), list(range(4, 16))
    params = prefill(p, "r1", prompt, src)
    before = d.kv(dst)[0].clone()
    decode(d, "d1", prompt, params, dst)
    d.until("recvd", "d1", p)
    out = d.ranks[0].pd.counters.recent[-1]
    if out.ok:
        assert not d.errors and torch.equal(d.kv(dst)[0], p.kv(src)[0])
    else:
        assert d.errors == set(dst)
        if mode is PdMode.WRITE:  # (a READ may have moved some bytes: they are not used)
            assert torch.equal(d.kv(dst)[0], before)
    p.until("sent", "r1", d)  # the prefill side lets go too (its lease, at the latest)


def test_write_that_never_comes_is_fenced(pair: Any) -> None:
    """WRITE mode: the prefill side does not answer in time (it is not stepping). The
    decode side gives up, fences its regions and reports every block; the prefill side's
    late write then reaches nothing."""
    lay = layout()
    p = pair(settings(lay), PRODUCER, engine="P")
    d = pair(settings(lay), CONSUMER, cfg=DisaggConfig(mode=PdMode.WRITE, timeout_s=0.5),
             engine="D")
    prompt = toks(3 * BS, 9)
    params = prefill(p, "r1", prompt, [0, 1, 2])
    decode(d, "d1", prompt, params, [3, 4, 5])
    d.until("recvd", "d1")  # (the prefill side is not stepped meanwhile)
    assert d.errors == {3, 4, 5}
    d.ranks[0].tensors["model.layers.1.self_attn.attn"][[3, 4, 5]] = -1.0
    p.until("sent", "r1")  # now it takes the WRITE note, tries, and is refused
    assert p.ranks[0].pd.counters.write_failures == 1
    assert bool((d.ranks[0].tensors["model.layers.1.self_attn.attn"][[3, 4, 5]] == -1.0)
                .all())


def test_garbage_notes_are_counted_not_fatal(pair: Any) -> None:
    lay = layout()
    p = pair(settings(lay), PRODUCER, engine="P")
    prompt = toks(3 * BS, 10)
    params = prefill(p, "r1", prompt, [0, 1, 2])
    host, port = params["kvbm"]["agents"][0][1:]
    with Agent("intruder", TransportConfig(secret=SECRET, backends="tcp")) as a:
        peer = a.connect(host, port)
        scratch = a.register(np.zeros(8, dtype=np.uint8))
        lease = peer.info.region("lease")
        for junk in (b"", b"\x00garbage", json.dumps(params).encode()):
            from kvbm.transports import Op

            a.transfer(peer, Op.READ, [((scratch, 0, 8), (lease, 0, 8))], notify=junk
                       ).wait(WAIT_S)
    p.step()
    assert p.ranks[0].pd.counters.stray_notes >= 2
    assert p.pd.held == 1  # the hold is untouched


# -- a prefill side that dies --------------------------------------------------------------
def _prefill_process(conn: Any) -> None:
    e = Engine(settings(layout()), PRODUCER, engine="P")
    params = prefill(e, "r1", toks(3 * BS, 11), [0, 1, 2])
    conn.send_bytes(json.dumps(params).encode())
    conn.recv_bytes()  # killed while waiting here


def test_dead_prefill_side_is_a_recompute(pair: Any) -> None:
    conn, child = SPAWN.Pipe()
    proc = SPAWN.Process(target=_prefill_process, args=(child,), daemon=True)
    proc.start()
    try:
        assert conn.poll(WAIT_S), "the prefill process did not answer"
        params = json.loads(conn.recv_bytes())
    finally:
        proc.kill()
        proc.join(WAIT_S)
    d = pair(settings(layout()), CONSUMER, engine="D")
    before = d.kv([3, 4, 5])[0].clone()
    decode(d, "d1", toks(3 * BS, 11), params, [3, 4, 5])
    d.until("recvd", "d1")
    assert d.errors == {3, 4, 5}
    assert torch.equal(d.kv([3, 4, 5])[0], before)

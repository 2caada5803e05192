"""The vLLM connector's two halves driven together without vLLM: SchedulerSide (control plane)
and WorkerSide (data plane) over small fake KV tensors, in vLLM's step loop::

    num_new_matched_tokens -> after_alloc -> build_step -> (each rank) bind, start_load,
    forward, wait_for_save, finished, load_errors, report -> on_worker_reports

How pages are keyed per tensor-parallel rank: a G2 page holds one block of the whole model,
every layer and every KV head, whichever ranks computed them; it is found by the block's
sequence hash alone (not by rank). With MHA each rank writes its own heads of the page and
tags them in its own tag column (``tags[slot, rank]``); a page is whole, and a save is
committed, only once every rank reported its copy done and every column carries the block's
hash. Each rank loads back only its own heads. With MLA the latent is replicated on every
rank, so the page is written once, by rank 0, into one tag column; every rank loads all of it.

The fake engine's "model": the KV of a block is a function of its sequence hash (the same
prefix gives the same KV, as in a real model); each rank computes its part of it.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from kvbm.config import HostTierConfig, ManagerConfig, OffloadConfig  # noqa: E402
from kvbm.errors import ConfigError, InvalidArgumentError  # noqa: E402
from kvbm.events import AllBlocksCleared, BlockRemoved, BlockStored  # noqa: E402
from kvbm.hashing import hash_blocks  # noqa: E402
from kvbm.integrations.vllm.config import (  # noqa: E402
    DEFAULT_HOST_BLOCKS,
    ConnectorSettings,
    manager_config,
)
from kvbm.integrations.vllm.scheduler import SchedulerSide  # noqa: E402
from kvbm.integrations.vllm.wire import StepPlan, WorkerReport  # noqa: E402
from kvbm.integrations.vllm.worker import WorkerSide  # noqa: E402
from kvbm.layout import KVKind, KVLayout  # noqa: E402
from kvbm.medium import Medium  # noqa: E402
from kvbm.memory.engine_kv import EngineKV  # noqa: E402
from kvbm.storage.disk import DiskStore, DiskTierConfig  # noqa: E402

BS = 32
MHA = KVLayout(2, 4, 32, BS, "float32", model_id="sides-test")
MLA = KVLayout(2, 1, 64, BS, "float32", model_id="sides-test", kind=KVKind.MLA)
G1_BLOCKS = 16
SPAWN = multiprocessing.get_context("spawn")
#: The longest a test waits for a child or a background load (a guard against hangs, not a
#: timing assertion).
WAIT_S = 120


def settings(layout: KVLayout = MHA, world: int = 1, g2: int = 16, *, disk: Path | None = None,
             offload: OffloadConfig | None = None) -> ConnectorSettings:
    d = None if disk is None else DiskTierConfig(disk, capacity_bytes=1 << 24,
                                                 slab_bytes=1 << 22)
    cfg = ManagerConfig(device=None, host=HostTierConfig(g2), disk=d,
                        offload=offload or OffloadConfig())
    return ConnectorSettings(layout, cfg, world, "engine-test")


def toks(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(1, 30_000, n).tolist()


def seqs(tokens: Sequence[int], s: ConnectorSettings) -> list[int]:
    return hash_blocks(np.asarray(tokens, dtype=np.uint32), BS, salt=s.config.salt).sequence


# -- the fake model and one rank's KV tensors ---------------------------------------------------
def block_kv(layout: KVLayout, seq_hash: int) -> torch.Tensor:
    """The whole model's KV of one block, per layer, as the engine's tensors hold it: MHA
    ``[L, H, T, 2D]`` (vLLM's CPU format), MLA ``[L, T, W]``."""
    g = torch.Generator().manual_seed(seq_hash & ((1 << 63) - 1))
    if layout.kind is KVKind.MLA:
        shape: tuple[int, ...] = (layout.num_layers, BS, layout.head_dim)
    else:
        shape = (layout.num_layers, layout.num_kv_heads, BS, 2 * layout.head_dim)
    return torch.randn(shape, generator=g)


def rank_part(layout: KVLayout, world: int, rank: int, seq_hash: int, *, computed: bool
              ) -> torch.Tensor:
    """What ``rank`` holds of a block: its heads (MHA) or the latent (MLA). An MLA rank
    other than 0 computes a *different* latent here (a lying replica), so that a test can
    tell that only rank 0's copy is stored; what every rank must load is rank 0's."""
    kv = block_kv(layout, seq_hash)
    if layout.kind is KVKind.MLA:
        return kv + 1000 * rank if computed else kv
    h = layout.num_kv_heads // world
    return kv[:, rank * h:(rank + 1) * h]


def local_shape(layout: KVLayout, world: int) -> tuple[int, ...]:
    if layout.kind is KVKind.MLA:
        return (G1_BLOCKS, BS, layout.head_dim)
    return (G1_BLOCKS, layout.num_kv_heads // world, BS, 2 * layout.head_dim)


def canonical_page(layout: KVLayout, seq_hash: int) -> torch.Tensor:
    """The block's G2 page as kvbm lays it out: ``[L, planes, T, heads, D]``."""
    kv = block_kv(layout, seq_hash)
    ekv = EngineKV([kv[li][None].clone() for li in range(layout.num_layers)], layout)
    return torch.stack([torch.stack([ekv.plane(li, p)[0] for p in range(layout.kv_planes)])
                        for li in range(layout.num_layers)])


@dataclass
class RankStep:
    report: bytes | None
    sending: set[str]
    recving: set[str]
    errors: set[int]


class LocalRank:
    """One TP rank in this process: its KV tensors registered with a WorkerSide."""

    def __init__(self, s: ConnectorSettings, rank: int) -> None:
        self.layout, self.world, self.rank = s.layout, s.world_size, rank
        self.tensors = {f"model.layers.{i}.self_attn.attn":
                        torch.zeros(local_shape(s.layout, s.world_size))
                        for i in range(s.layout.num_layers)}
        self.side = WorkerSide(s, rank)
        self.side.register(self.tensors)

    def run(self, payload: bytes, fills: Sequence[tuple[int, int]]) -> RankStep:
        """vLLM's worker in one step: bind, load, forward (compute ``fills``: block id,
        sequence hash), save, then what the connector reports."""
        w = self.side
        w.bind(payload)
        w.start_load()
        for b, h in fills:
            part = rank_part(self.layout, self.world, self.rank, h, computed=True)
            for li, t in enumerate(self.tensors.values()):
                t[b] = part[li]
        w.wait_for_save()
        sending, recving = w.finished()
        out = RankStep(None, sending or set(), recving or set(), w.load_errors())
        out.report = w.report()
        w.clear()
        return out

    def read(self, block: int) -> torch.Tensor:
        return torch.stack([t[block] for t in self.tensors.values()])

    def fill(self, blocks: Sequence[int], value: float) -> None:
        for t in self.tensors.values():
            t[list(blocks)] = value

    def close(self) -> None:
        self.side.close()


def _rank_process(conn: Any, spec: bytes) -> None:
    """A TP rank in its own (spawned) process: gets msgpack commands as bytes, answers bytes;
    nothing of kvbm crosses the pipe but what its wire formats encode."""
    d = msgpack.unpackb(spec)
    s = ConnectorSettings(KVLayout.from_dict(d["layout"]),
                          ManagerConfig(device=None, host=HostTierConfig(d["g2"])),
                          d["world"], "engine-test")
    rank = LocalRank(s, d["rank"])
    while True:
        op, *args = msgpack.unpackb(conn.recv_bytes())
        if op == "run":
            r = rank.run(args[0], [tuple(f) for f in args[1]])
            conn.send_bytes(msgpack.packb([r.report, sorted(r.sending), sorted(r.recving),
                                           sorted(r.errors)]))
        elif op == "read":
            conn.send_bytes(rank.read(args[0]).numpy().tobytes())
        elif op == "fill":
            rank.fill(args[0], args[1])
            conn.send_bytes(b"ok")
        else:
            rank.close()
            conn.send_bytes(b"bye")
            return


class RemoteRank:
    """The same rank in a spawned process, driven through a pipe with bytes only."""

    def __init__(self, s: ConnectorSettings, rank: int) -> None:
        self.layout, self.world = s.layout, s.world_size
        self.conn, child = SPAWN.Pipe()
        spec = msgpack.packb({"layout": s.layout.to_dict(), "world": s.world_size,
                              "rank": rank, "g2": s.config.host.num_blocks})
        self.proc = SPAWN.Process(target=_rank_process, args=(child, spec), daemon=True)
        self.proc.start()
        child.close()

    def _ask(self, *msg: Any) -> bytes:
        self.conn.send_bytes(msgpack.packb(list(msg)))
        assert self.conn.poll(WAIT_S), "the rank process did not answer"
        out: bytes = self.conn.recv_bytes()
        return out

    def run(self, payload: bytes, fills: Sequence[tuple[int, int]]) -> RankStep:
        report, sending, recving, errors = msgpack.unpackb(
            self._ask("run", payload, [list(f) for f in fills]))
        return RankStep(report, set(sending), set(recving), set(errors))

    def read(self, block: int) -> torch.Tensor:
        data = np.frombuffer(self._ask("read", block), dtype=np.float32).copy()
        return torch.from_numpy(data).reshape(self.layout.num_layers,
                                              *local_shape(self.layout, self.world)[1:])

    def fill(self, blocks: Sequence[int], value: float) -> None:
        self._ask("fill", list(blocks), value)

    def close(self) -> None:
        try:
            if self.proc.is_alive():
                self._ask("stop")
        finally:
            self.proc.join(WAIT_S)
            if self.proc.is_alive():
                self.proc.kill()
        assert self.proc.exitcode == 0


# -- vLLM's objects, duck-typed -------------------------------------------------------------
@dataclass
class Req:
    request_id: str
    all_token_ids: list[int]
    num_computed_tokens: int = 0
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
    new_block_ids: list[tuple[list[int], ...] | None] = field(default_factory=list)
    num_computed_tokens: list[int] = field(default_factory=list)
    resumed_req_ids: set[str] = field(default_factory=set)


@dataclass
class SchedOut:
    scheduled_new_reqs: list[NewReq] = field(default_factory=list)
    scheduled_cached_reqs: CachedReqs = field(default_factory=CachedReqs)
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)


@dataclass
class Step:
    plan: StepPlan
    ranks: list[RankStep]

    @property
    def reports(self) -> list[bytes]:
        return [r.report for r in self.ranks if r.report is not None]


class Engine:
    """A fake vLLM engine: the scheduler side and one worker side per TP rank."""

    def __init__(self, s: ConnectorSettings, *, spawn: bool = False) -> None:
        self.s = s
        self.sched = SchedulerSide(s)
        self.ranks: list[LocalRank | RemoteRank] = []
        try:
            for r in range(s.world_size):
                self.ranks.append(RemoteRank(s, r) if spawn else LocalRank(s, r))
        except BaseException:
            self.close()
            raise

    def step(self, so: SchedOut | None = None, fills: Sequence[tuple[int, int]] = (), *,
             deliver: bool = True, before_workers: Callable[[], None] | None = None) -> Step:
        payload = self.sched.build_step(so or SchedOut())
        if before_workers is not None:
            before_workers()
        out = Step(StepPlan.decode(payload), [r.run(payload, fills) for r in self.ranks])
        if deliver:
            self.sched.on_worker_reports(out.reports)
        return out

    def admit(self, req: Req, block_ids: list[int], local_hit: int = 0) -> tuple[int, bool]:
        """vLLM's scheduler taking a waiting request: ask, allocate, tell."""
        ext, is_async = self.sched.num_new_matched_tokens(req, local_hit)
        self.sched.after_alloc(req, block_ids, ext)
        return ext, is_async

    def prefill(self, req: Req, block_ids: list[int], computed: int, **kw: Any) -> Step:
        """One step that computes the rest of the prompt from token ``computed`` on."""
        n = len(req.all_token_ids)
        so = SchedOut([NewReq(req.request_id, (block_ids,), computed)],
                      num_scheduled_tokens={req.request_id: n - computed})
        hashes = seqs(req.all_token_ids, self.s)
        fills = [(block_ids[i], hashes[i]) for i in range(computed // BS, n // BS)]
        out = self.step(so, fills, **kw)
        req.num_computed_tokens = n
        return out

    def read(self, rank: int, block: int) -> torch.Tensor:
        return self.ranks[rank].read(block)

    def close(self) -> None:
        try:
            for r in self.ranks:
                r.close()
        finally:
            self.sched.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def assert_holds(eng: Engine, block: int, seq_hash: int) -> None:
    """Every rank's G1 ``block`` holds exactly its part of the block ``seq_hash``."""
    for r in range(eng.s.world_size):
        want = rank_part(eng.s.layout, eng.s.world_size, r, seq_hash, computed=False)
        assert torch.equal(eng.read(r, block), want), f"rank {r}, block {block}"


def save_prompt(eng: Engine, req: Req, block_ids: list[int]) -> list[int]:
    """A cold request computes its prompt and saves it; returns its blocks' hashes."""
    assert eng.admit(req, block_ids) == (0, False)
    step = eng.prefill(req, block_ids, 0)
    assert [p.direction.value for p in step.plan.plans] == ["save"]
    return seqs(req.all_token_ids, eng.s)


# -- 1. save, then load into other blocks -----------------------------------------------------
def test_save_then_load_round_trip_into_other_blocks():
    s = settings()
    with Engine(s) as eng:
        tokens = toks(3 * BS + 10, 1)
        r1 = Req("r1", tokens)
        hashes = save_prompt(eng, r1, [0, 1, 2, 3])
        mgr = eng.sched.mgr
        assert eng.sched.counters.saved_blocks == 3
        assert mgr.stats().committed_blocks == 3
        for i in range(3):
            rec = mgr.lookup(hashes[i])
            assert rec is not None and rec.g2 >= 0
            assert torch.equal(eng.sched.pool.buffer[rec.g2], canonical_page(MHA, hashes[i]))
        assert not eng.sched.request_finished(r1, [0, 1, 2, 3])  # all saved already

        # What kvbm offers: block-aligned, beyond vLLM's own hit, never the last token.
        tail = toks(20, 2)
        ask = eng.sched.num_new_matched_tokens
        assert ask(Req("q1", tokens[:3 * BS] + tail), 0) == (3 * BS, False)
        assert ask(Req("q2", tokens[:3 * BS] + tail), BS) == (2 * BS, False)
        assert ask(Req("q3", tokens[:3 * BS]), 0) == (2 * BS, False)
        assert ask(Req("q4", tokens[:3 * BS] + tail), 3 * BS) == (0, False)
        assert ask(Req("q5", tokens[:3 * BS] + tail), 5) == (0, False)  # not block-aligned
        assert ask(Req("q6", toks(3 * BS + 10, 3)), 0) == (0, False)

        # r2 shares the prefix; block 0 is a hit in vLLM's own cache (its block 0).
        r2 = Req("r2", tokens[:3 * BS] + tail)
        eng.ranks[0].fill([9, 10, 11], -7.0)
        assert eng.admit(r2, [0, 9, 10, 11], local_hit=BS) == (2 * BS, False)
        step = eng.prefill(r2, [0, 9, 10, 11], 3 * BS)
        (load,) = step.plan.plans
        assert load.direction.value == "load"
        assert [c.g1_block for c in load.copies] == [9, 10]
        assert [c.seq_hash for c in load.copies] == hashes[1:3]
        assert step.ranks[0].errors == set()
        assert_holds(eng, 9, hashes[1])
        assert_holds(eng, 10, hashes[2])
        assert bool((eng.read(0, 11) == -7).all())  # the tail is vLLM's to compute
        c = eng.sched.counters
        assert c.loaded_blocks == 2 and c.load_errors == 0
        assert c.hit_tokens == {Medium.CPU_PINNED.value: 2 * BS}
        # the load's holds on the pages are given back
        mgr.check_invariants()
        held = {h for e in eng.sched.take_events() if isinstance(e, BlockStored)
                and e.medium is Medium.CPU_PINNED for h in e.block_hashes}
        assert held
        assert eng.sched.reset()
        # vLLM's reset_prefix_cache(reset_connector=True): vLLM sends AllBlocksCleared for
        # its GPU cache; kvbm withdraws its own blocks one by one (a router reads vLLM's
        # clear as the GPU only), and never sends a clear of vLLM's GPU blocks itself
        after = eng.sched.take_events()
        assert not any(isinstance(e, AllBlocksCleared) for e in after)
        assert {h for e in after if isinstance(e, BlockRemoved)
                and e.medium is Medium.CPU_PINNED for h in e.block_hashes} == held


# -- 2. tensor parallelism ------------------------------------------------------------------
@pytest.mark.parametrize("where", ["one_process", "two_processes"])
def test_tp_save_commits_once_both_ranks_reported_and_each_loads_its_heads(where):
    s = settings(MHA, world=2)
    with Engine(s, spawn=where == "two_processes") as eng:
        tokens = toks(3 * BS + 5, 4)
        r1 = Req("r1", tokens)
        assert eng.admit(r1, [0, 1, 2, 3]) == (0, False)
        step = eng.prefill(r1, [0, 1, 2, 3], 0, deliver=False)
        hashes = seqs(tokens, s)
        assert len(step.reports) == 2
        (save,) = step.plan.plans
        slots = [c.g2_slot for c in save.copies]
        pool = eng.sched.pool
        assert pool.tags.shape[1] == 2  # a tag column per rank
        assert pool.tags[slots].tolist() == [[h, h] for h in hashes[:3]]
        # one report only: nothing committed, nothing matchable
        eng.sched.on_worker_reports(step.reports[:1])
        assert all(eng.sched.mgr.lookup(h) is None for h in hashes)
        assert eng.sched.num_new_matched_tokens(Req("probe", tokens), 0) == (0, False)
        assert eng.sched.counters.saved_blocks == 0
        eng.sched.on_worker_reports(step.reports[1:])
        assert eng.sched.counters.saved_blocks == 3
        for h, slot in zip(hashes, slots, strict=False):
            assert eng.sched.mgr.lookup(h).g2 == slot
            # one page per block, holding the heads of both ranks
            assert torch.equal(pool.buffer[slot], canonical_page(MHA, h))

        r2 = Req("r2", [*tokens[:3 * BS], *toks(7, 5)])
        for rank in eng.ranks:
            rank.fill([8, 9, 10, 11], -7.0)
        assert eng.admit(r2, [8, 9, 10, 11]) == (3 * BS, False)
        step = eng.prefill(r2, [8, 9, 10, 11], 3 * BS)
        assert [r.errors for r in step.ranks] == [set(), set()]
        for i in range(3):
            assert_holds(eng, 8 + i, hashes[i])  # rank r: heads 2r, 2r+1 only
        assert eng.sched.counters.loaded_blocks == 3


def test_mla_page_is_written_once_by_rank_zero_and_loaded_by_both():
    s = settings(MLA, world=2)
    with Engine(s) as eng:
        tokens = toks(2 * BS + 3, 6)
        r1 = Req("r1", tokens)
        assert eng.admit(r1, [0, 1, 2]) == (0, False)
        step = eng.prefill(r1, [0, 1, 2], 0, deliver=False)
        hashes = seqs(tokens, s)
        (save,) = step.plan.plans
        slots = [c.g2_slot for c in save.copies]
        pool = eng.sched.pool
        assert pool.tags.shape[1] == 1  # stored once
        eng.sched.on_worker_reports(step.reports[1:])  # rank 1 only: not committed
        assert eng.sched.mgr.lookup(hashes[0]) is None
        eng.sched.on_worker_reports(step.reports[:1])
        assert eng.sched.counters.saved_blocks == 2
        for h, slot in zip(hashes, slots, strict=True):
            # rank 0's latent, not rank 1's (which differs here on purpose)
            assert torch.equal(pool.buffer[slot], canonical_page(MLA, h))

        r2 = Req("r2", [*tokens[:2 * BS], *toks(4, 7)])
        for rank in eng.ranks:
            rank.fill([5, 6, 7], -7.0)
        assert eng.admit(r2, [5, 6, 7]) == (2 * BS, False)
        step = eng.prefill(r2, [5, 6, 7], 2 * BS)
        assert [r.errors for r in step.ranks] == [set(), set()]
        assert_holds(eng, 5, hashes[0])
        assert_holds(eng, 6, hashes[1])


# -- 3. failure paths -------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["zeroed", "overwritten"])
def test_a_page_whose_tag_is_not_the_blocks_is_a_load_error(damage):
    s = settings()
    with Engine(s) as eng:
        tokens = toks(3 * BS + 4, 8)
        hashes = save_prompt(eng, Req("r1", tokens), [0, 1, 2, 3])
        slot = eng.sched.mgr.lookup(hashes[1]).g2
        pool = eng.sched.pool
        garbage = canonical_page(MHA, 12345)

        def strike() -> None:  # after the plan is made, before a worker copies
            if damage == "zeroed":  # a writer died between its tag 0 and its copy
                pool.tags[slot, 0] = 0
            else:  # another block's page now
                pool.buffer[slot] = garbage
                pool.tags[slot, 0] = 12345

        r2 = Req("r2", [*tokens[:3 * BS], *toks(9, 9)])
        eng.ranks[0].fill([8, 9, 10, 11], -7.0)
        assert eng.admit(r2, [8, 9, 10, 11]) == (3 * BS, False)
        step = eng.prefill(r2, [8, 9, 10, 11], 3 * BS, before_workers=strike)
        assert step.ranks[0].errors == {9}  # vLLM recomputes it
        assert_holds(eng, 8, hashes[0])
        assert_holds(eng, 10, hashes[2])
        assert bool((eng.read(0, 9) == -7).all()), "a page not the block's reached G1"
        c = eng.sched.counters
        assert (c.loaded_blocks, c.load_errors) == (2, 1)


def test_a_page_damaged_before_the_plan_is_never_loaded_and_leaves_g2():
    """Another block's KV and tag in a cached G2 page, before any load is planned: the
    scheduler must not vouch for it (it once re-tagged every page it planned to load), and
    the bad copy leaves G2 so that later hits do not fail the same way."""
    s = settings()
    with Engine(s) as eng:
        tokens = toks(3 * BS + 4, 8)
        hashes = save_prompt(eng, Req("r1", tokens), [0, 1, 2, 3])
        slot = eng.sched.mgr.lookup(hashes[1]).g2
        pool = eng.sched.pool
        pool.buffer[slot] = canonical_page(MHA, 12345)
        pool.tags[slot, 0] = 12345
        r2 = Req("r2", [*tokens[:3 * BS], *toks(9, 9)])
        eng.ranks[0].fill([8, 9, 10, 11], -7.0)
        assert eng.admit(r2, [8, 9, 10, 11]) == (3 * BS, False)
        step = eng.prefill(r2, [8, 9, 10, 11], 3 * BS)
        assert step.ranks[0].errors == {9}
        assert bool((eng.read(0, 9) == -7).all()), "another block's KV reached G1"
        assert eng.sched.counters.discarded_pages == 1
        assert eng.sched.mgr.lookup(hashes[1]) is None
        r3 = Req("r3", [*tokens[:3 * BS], *toks(9, 10)])
        assert eng.admit(r3, [12, 13, 14, 15]) == (BS, False)  # block 0 only


@dataclass
class Lora:
    lora_name: str


def test_lora_blocks_are_their_own_and_say_so_in_events():
    s = settings()
    with Engine(s) as eng:
        eng.sched.take_events()
        tokens = toks(2 * BS + 3, 22)
        r1 = Req("r1", tokens, lora_request=Lora("adapter-a"))
        assert eng.admit(r1, [0, 1, 2]) == (0, False)
        step = eng.prefill(r1, [0, 1, 2], 0)
        (save,) = step.plan.plans
        lora_hashes = hash_blocks(np.asarray(tokens, dtype=np.uint32), BS,
                                  lora_name="adapter-a").sequence
        assert [c.seq_hash for c in save.copies] == lora_hashes[:2]
        assert eng.sched.counters.saved_blocks == 2
        stored = [e for e in eng.sched.take_events() if type(e).__name__ == "BlockStored"]
        assert [h for e in stored for h in e.block_hashes] == lora_hashes[:2]
        assert {e.lora_name for e in stored} == {"adapter-a"}
        ask = eng.sched.num_new_matched_tokens
        assert ask(Req("plain", tokens), 0) == (0, False)
        assert ask(Req("other", tokens, lora_request=Lora("adapter-b")), 0) == (0, False)
        assert ask(Req("same", tokens, lora_request=Lora("adapter-a")), 0) == (2 * BS, False)


def test_a_save_whose_page_lost_its_tag_is_not_committed():
    s = settings(world=2)
    with Engine(s) as eng:
        tokens = toks(3 * BS + 2, 21)
        r1 = Req("r1", tokens)
        assert eng.admit(r1, [0, 1, 2, 3]) == (0, False)
        step = eng.prefill(r1, [0, 1, 2, 3], 0, deliver=False)
        hashes = seqs(tokens, s)
        (save,) = step.plan.plans
        eng.sched.pool.tags[save.copies[1].g2_slot, 1] = 0  # rank 1's half of block 1 is torn
        eng.sched.on_worker_reports(step.reports)  # both said DONE
        c = eng.sched.counters
        assert (c.saved_blocks, c.failed_saves) == (1, 2)  # block 2 hangs below block 1
        assert eng.sched.mgr.lookup(hashes[0]) is not None
        assert eng.sched.mgr.lookup(hashes[1]) is None
        assert eng.sched.num_new_matched_tokens(Req("r2", tokens), 0) == (BS, False)
        eng.sched.mgr.check_invariants()  # the failed pages are given back


class GatedLoadStore(DiskStore):
    """A real disk store whose reads wait for a gate: 'the disk is slow', deterministically."""

    gate: threading.Event

    async def get(self, items):  # type: ignore[override]
        await asyncio.get_running_loop().run_in_executor(None, self.gate.wait)
        return await super().get(items)


def gate_disk(eng: Engine) -> threading.Event:
    store = eng.sched.mgr._lower[0].store  # test-only: slow down the real store
    store.__class__ = GatedLoadStore
    store.gate = threading.Event()
    return store.gate


def steps_until_received(eng: Engine, rid: str) -> tuple[Step, int]:
    """Empty steps (the request waits for its KV) until a worker reports ``rid`` received."""
    for n in range(1, 10_000):
        step = eng.step()
        if any(rid in r.recving for r in step.ranks):
            return step, n
        assert rid not in step.plan.recv_done
        time.sleep(0.01)
    raise AssertionError(f"{rid} never received")


def saved_on_disk(tmp_path: Path, tokens: list[int]) -> tuple[ConnectorSettings, list[int],
                                                                 list[bytes]]:
    """A first engine saves ``tokens``' blocks and closes (flushing them to disk). Returns
    the settings, the hashes and each block's G2 page bytes."""
    s = settings(disk=tmp_path / "g3")
    with Engine(s) as eng:
        hashes = save_prompt(eng, Req("r1", tokens), [0, 1, 2, 3])
        pages = [eng.sched.pool.buffer[eng.sched.mgr.lookup(h).g2].numpy().tobytes()
                 for h in hashes]
    return s, hashes, pages


def test_a_restart_loads_from_disk_asynchronously(tmp_path):
    tokens = toks(3 * BS + 6, 10)
    s, hashes, _ = saved_on_disk(tmp_path, tokens)
    with Engine(s) as eng:  # a restart: G2 is empty, the pages are on disk
        gate = gate_disk(eng)
        try:
            r2 = Req("r2", [*tokens[:3 * BS], *toks(8, 11)])
            eng.ranks[0].fill([8, 9, 10, 11], -7.0)
            assert eng.admit(r2, [8, 9, 10, 11]) == (3 * BS, True)
            for _ in range(3):  # vLLM keeps stepping; the request waits for its KV
                step = eng.step()
                assert step.plan.plans == [] and step.ranks[0].recving == set()
        finally:
            gate.set()
        step, _ = steps_until_received(eng, "r2")
        assert step.plan.recv_done == ["r2"]
        assert [c.g1_block for c in step.plan.plans[0].copies] == [8, 9, 10]
        assert step.ranks[0].errors == set()
        for i in range(3):
            assert_holds(eng, 8 + i, hashes[i])
        # Then vLLM schedules it with its KV computed: no second load, no save of the hit.
        eng.sched.after_alloc(r2, [8, 9, 10, 11], 0)
        step = eng.prefill(r2, [8, 9, 10, 11], 3 * BS)
        assert step.plan.plans == []
        c = eng.sched.counters
        assert c.hit_tokens == {Medium.DISK.value: 3 * BS}
        assert (c.loaded_blocks, c.load_errors, c.load_timeouts) == (3, 0, 0)


def test_a_corrupt_page_on_disk_ends_the_prefix_and_the_rest_is_recomputed(tmp_path):
    tokens = toks(3 * BS + 6, 12)
    s, hashes, pages = saved_on_disk(tmp_path, tokens)
    page = pages[1]
    needle = page[len(page) // 2: len(page) // 2 + 64]
    hit = 0
    for f in (tmp_path / "g3").rglob("*"):
        data = bytearray(f.read_bytes()) if f.is_file() else bytearray()
        i = data.find(needle)
        if i >= 0:
            data[i + 8] ^= 0x5A
            f.write_bytes(bytes(data))
            hit += 1
    assert hit == 1
    with Engine(s) as eng:
        r2 = Req("r2", [*tokens[:3 * BS], *toks(8, 13)])
        eng.ranks[0].fill([8, 9, 10, 11], -7.0)
        assert eng.admit(r2, [8, 9, 10, 11]) == (3 * BS, True)  # the index cannot tell
        step, _ = steps_until_received(eng, "r2")
        assert [c.g1_block for c in step.plan.plans[0].copies] == [8]
        assert sorted(step.plan.load_errors) == [9, 10]
        assert step.ranks[0].errors == {9, 10}
        assert_holds(eng, 8, hashes[0])
        for b in (9, 10):
            assert bool((eng.read(0, b) == -7).all())
        c = eng.sched.counters
        assert (c.loaded_blocks, c.load_errors) == (1, 2)
        assert eng.sched.mgr.stats().lower_tiers[Medium.DISK][0].corrupt >= 1
        # vLLM recomputes blocks 1 and 2 (kv_load_failure_policy "recompute"); kvbm saves
        # them again, so that the next request with this prefix hits all of it.
        eng.sched.after_alloc(r2, [8, 9, 10, 11], 0)
        step = eng.prefill(r2, [8, 9, 10, 11], BS)
        assert [c.g1_block for p in step.plan.plans for c in p.copies] == [9, 10]
        assert eng.sched.num_new_matched_tokens(Req("r3", r2.all_token_ids), 0) == (3 * BS,
                                                                                     False)


def test_a_load_past_its_timeout_is_a_load_error_not_a_hang(tmp_path):
    tokens = toks(3 * BS + 6, 14)
    s, hashes, _ = saved_on_disk(tmp_path, tokens)
    s = settings(disk=tmp_path / "g3", offload=OffloadConfig(load_timeout_s=0.001))
    with Engine(s) as eng:
        gate = gate_disk(eng)
        try:
            r2 = Req("r2", [*tokens[:3 * BS], *toks(8, 15)])
            eng.ranks[0].fill([8, 9, 10, 11], -7.0)
            assert eng.admit(r2, [8, 9, 10, 11]) == (3 * BS, True)
            time.sleep(0.01)  # past the deadline (the disk never answers meanwhile)
            step = eng.step()
            assert step.ranks[0].recving == {"r2"}
            assert step.plan.plans == []
            assert step.ranks[0].errors == {8, 9, 10}
            for b in (8, 9, 10):
                assert bool((eng.read(0, b) == -7).all())
            c = eng.sched.counters
            assert (c.load_timeouts, c.load_errors, c.loaded_blocks) == (1, 3, 0)
        finally:
            gate.set()
        # The reads finish later: their pages are cached in G2, a later request hits them.
        mgr = eng.sched.mgr
        for _ in range(10_000):
            mgr.poll()
            if all(mgr.lookup(h).g2 >= 0 for h in hashes):
                break
            time.sleep(0.01)
        assert eng.sched.num_new_matched_tokens(Req("r3", r2.all_token_ids), 0) == (3 * BS,
                                                                                     False)


GARBAGE = [b"", b"\xc1", b"not msgpack at all", msgpack.packb([1, 2]),
           msgpack.packb(["x"] * 7), msgpack.packb([99, 1, None, [], [], [], []]),
           msgpack.packb([1, 1, None, [[1, "load", "r", [[-1, 0, 5]]]], [], [], []]),
           msgpack.packb([1, 1, None, [[1, "sideways", "r", []]], [], [], []]),
           msgpack.packb({"a": 1}), None, "text", 42]


def test_garbage_step_plans_are_refused_and_the_worker_keeps_working():
    s = settings()
    with Engine(s) as eng:
        w = eng.ranks[0].side
        tokens = toks(2 * BS + 1, 16)
        r1 = Req("r1", tokens)
        assert eng.admit(r1, [0, 1, 2]) == (0, False)
        so = SchedOut([NewReq("r1", ([0, 1, 2],), 0)], num_scheduled_tokens={"r1": 2 * BS + 1})
        payload = eng.sched.build_step(so)
        w.bind(payload)
        w.start_load()
        w.wait_for_save()
        good = w.report()
        assert good is not None
        for bad in GARBAGE:
            with pytest.raises(InvalidArgumentError):
                w.bind(bad)
            # a refused plan leaves no plan bound: last step's saves are not run again
            w.start_load()
            w.wait_for_save()
            # (the report says which step it got to, with no results)
            assert WorkerReport.decode(w.report()).results == []
            assert w.load_errors() == set()
        eng.sched.on_worker_reports([good])
        assert eng.sched.counters.saved_blocks == 2
        # and the next real step still works
        r2 = Req("r2", [*tokens[:2 * BS], 7, 8])
        eng.ranks[0].fill([4, 5, 6], -7.0)
        assert eng.admit(r2, [4, 5, 6]) == (2 * BS, False)
        eng.prefill(r2, [4, 5, 6], 2 * BS)
        assert eng.sched.counters.loaded_blocks == 2


def test_garbage_worker_reports_are_refused_and_good_ones_are_not_lost():
    s = settings(world=2)
    with Engine(s) as eng:
        tokens = toks(2 * BS + 1, 17)
        r1 = Req("r1", tokens)
        assert eng.admit(r1, [0, 1, 2]) == (0, False)
        step = eng.prefill(r1, [0, 1, 2], 0, deliver=False)
        rank0, rank1 = step.reports
        bad_reports = [x for x in GARBAGE if x is not None]
        bad_reports += [msgpack.packb([1, 0, [[1, 0, ["bogus"]]]]),
                        msgpack.packb([1, -1, []]), msgpack.packb([2, 0, []])]
        for bad in bad_reports:
            with pytest.raises(InvalidArgumentError):
                eng.sched.on_worker_reports([bad])
        with pytest.raises(InvalidArgumentError):
            eng.sched.on_worker_reports(None)
        # A report naming a rank the engine does not have must not stand in for rank 1.
        (save,) = step.plan.plans
        forged = WorkerReport(7, WorkerReport.decode(rank1).results).encode()
        with pytest.raises(InvalidArgumentError, match="rank"):
            eng.sched.on_worker_reports([rank0, forged])
        assert eng.sched.counters.saved_blocks == eng.sched.counters.failed_saves == 0
        # garbage next to a good report: the good one is applied all the same
        with pytest.raises(InvalidArgumentError):
            eng.sched.on_worker_reports([b"\xc1", rank1])
        assert eng.sched.counters.saved_blocks == 2
        assert eng.sched.counters.failed_saves == 0
        assert all(eng.sched.mgr.lookup(c.seq_hash) is not None for c in save.copies)
        # a result for a plan that is not (or no longer) pending is ignored
        eng.sched.on_worker_reports([rank0])
        assert eng.sched.counters.saved_blocks == 2


def test_request_finished_with_unsaved_blocks_delays_the_free_until_saved():
    s = settings()
    with Engine(s) as eng:
        prompt = toks(2 * BS + 26, 18)
        out = toks(8, 19)
        r1 = Req("r1", list(prompt))
        assert eng.admit(r1, [0, 1, 2, 3]) == (0, False)
        eng.prefill(r1, [0, 1, 2, 3], 0)
        assert eng.sched.counters.saved_blocks == 2
        # Decoding with asynchronous scheduling: the step that computes token 95 (the last of
        # block 2) is planned before that token is in all_token_ids, so block 2 is not
        # saved then.
        r1.all_token_ids += out[:5]  # 95 tokens
        hashes = seqs([*r1.all_token_ids, out[5]], s)
        so = SchedOut(scheduled_cached_reqs=CachedReqs(["r1"], [None], [95]),
                      num_scheduled_tokens={"r1": 1})
        step = eng.step(so, [(2, hashes[2])])
        assert step.plan.plans == []
        r1.all_token_ids += out[5:7]
        r1.num_computed_tokens = 96
        # The request stops: its last full block is not saved yet, vLLM must keep it.
        assert eng.sched.request_finished(r1, [0, 1, 2, 3]) is True
        step = eng.step()
        assert step.plan.send_done == ["r1"]
        assert [c.g1_block for c in step.plan.plans[0].copies] == [2]
        assert step.ranks[0].sending == {"r1"}
        (copy,) = step.plan.plans[0].copies
        assert eng.sched.pool.tags[copy.g2_slot, 0] == hashes[2]  # the save ran
        assert eng.sched.counters.saved_blocks == 3
        assert torch.equal(eng.sched.pool.buffer[eng.sched.mgr.lookup(hashes[2]).g2],
                           canonical_page(MHA, hashes[2]))
        assert eng.step().ranks[0].sending == set()  # reported once
        # a finished request with nothing left to save frees at once
        r2 = Req("r2", toks(BS + 3, 20))
        assert eng.admit(r2, [5, 6]) == (0, False)
        eng.prefill(r2, [5, 6], 0)
        assert eng.sched.request_finished(r2, [5, 6]) is False
        assert eng.step().plan.send_done == []
        assert eng.sched.request_finished(Req("never-seen", [1, 2, 3]), []) is False


# -- configuration ------------------------------------------------------------------------------
def test_manager_config_from_kv_connector_extra_config(tmp_path):
    inline = {"host": {"num_blocks": 7}, "offload": {"load_timeout_s": 5}}
    cfg = manager_config({"kvbm": inline}, env={})
    assert cfg.device is None and cfg.host.num_blocks == 7
    assert cfg.offload.load_timeout_s == 5
    f = tmp_path / "kvbm.toml"
    f.write_text("salt = \"m1\"\n[host]\nnum_blocks = 9\n")
    cfg = manager_config({"kvbm_config_file": str(f)}, env={})
    assert (cfg.host.num_blocks, cfg.salt, cfg.device) == (9, "m1", None)
    assert manager_config({}, env={}).host.num_blocks == DEFAULT_HOST_BLOCKS
    with pytest.raises(ConfigError, match="not both"):
        manager_config({"kvbm": inline, "kvbm_config_file": str(f)}, env={})
    # KVBM_* variables win over both
    env = {"KVBM_HOST_NUM_BLOCKS": "11"}
    assert manager_config({"kvbm": inline}, env=env).host.num_blocks == 11
    assert manager_config({"kvbm_config_file": str(f)}, env=env).host.num_blocks == 11
    # G1 is vLLM's: a device section is refused, inline or in the file
    with pytest.raises(ConfigError, match="device"):
        manager_config({"kvbm": {"device": {"num_blocks": 4}}}, env={})
    f.write_text("[device]\nnum_blocks = 4\n[host]\nnum_blocks = 9\n")
    with pytest.raises(ConfigError, match="device"):
        manager_config({"kvbm_config_file": str(f)}, env={})
    for bad in ({"kvbm": [1]}, {"kvbm": {"host": None}}, {"kvbm_config_file": 3},
                {"kvbm_config_file": str(tmp_path / "missing.toml")}, ["kvbm"]):
        with pytest.raises(ConfigError):
            manager_config(bad, env={})


def test_kvbm_events_publisher_is_refused_inside_vllm():
    with pytest.raises(ConfigError, match="vLLM's own publisher"):
        manager_config({"kvbm": {"events": {"enabled": True}}}, env={})
    with pytest.raises(ConfigError, match="vLLM's own publisher"):
        manager_config({}, env={"KVBM_EVENTS_ENABLED": "1"})
    assert not manager_config({"kvbm": {"events": {"enabled": False}}}, env={}).events.enabled


def test_kvbm_device_variables_are_refused_inside_vllm():
    with pytest.raises(ConfigError, match="KVBM_DEVICE"):
        manager_config({}, env={"KVBM_DEVICE_NUM_BLOCKS": "8"})


def test_cache_salts_keep_tenants_apart():
    """vLLM's per-request cache_salt takes part in kvbm's hashes: another tenant's (or an
    unsalted) request with the same tokens never gets the KV."""
    with Engine(settings()) as eng:
        tokens = toks(3 * BS + 4, 8)
        eng.admit(Req("r1", tokens, cache_salt="tenant-a"), [0, 1, 2, 3])
        eng.prefill(Req("r1", tokens, cache_salt="tenant-a"), [0, 1, 2, 3], 0)
        assert eng.sched.counters.saved_blocks == 3
        assert eng.admit(Req("r2", tokens, cache_salt="tenant-b"), [4, 5, 6, 7]) == (0, False)
        assert eng.admit(Req("r3", tokens), [8, 9, 10, 11]) == (0, False)
        assert eng.admit(Req("r4", tokens, cache_salt="tenant-a"),
                         [12, 13, 14, 15]) == (3 * BS, False)


def test_events_of_salted_requests_mark_their_first_block_as_vllm_does():
    """vLLM marks the first block of a cache_salt request with extra_keys [(salt,), ...]
    so that a router folds the salt into its hash; kvbm's events for those blocks in its
    tiers say the same, so a router never offers a tenant's blocks to a bare prompt."""
    import dataclasses

    from kvbm.events import BlockStored
    from kvbm.router import KvIndexer

    with Engine(settings()) as eng:
        tokens = toks(3 * BS + 4, 8)
        eng.sched.take_events()
        eng.admit(Req("r1", tokens, cache_salt="tenant-a"), [0, 1, 2, 3])
        eng.prefill(Req("r1", tokens, cache_salt="tenant-a"), [0, 1, 2, 3], 0)
        stored = [e for e in eng.sched.take_events() if isinstance(e, BlockStored)]
        roots = [e for e in stored if e.parent_block_hash is None]
        assert roots
        for e in stored:
            keys = eng.sched.extra_keys(list(e.block_hashes), e.parent_block_hash)
            if e.parent_block_hash is None:
                assert keys == [("tenant-a",)] + [None] * (len(e.block_hashes) - 1)
            else:
                assert keys is None
        ix = KvIndexer(BS)
        ix.apply("w", [dataclasses.replace(e, extra_keys=eng.sched.extra_keys(
            list(e.block_hashes), e.parent_block_hash)) for e in stored])
        assert ix.find_matches(list(tokens)) == {}  # a bare prompt: not the tenant's KV
        other = toks(3 * BS + 4, 9)
        save_prompt(eng, Req("r2", other), [4, 5, 6, 7])
        for e in eng.sched.take_events():
            if isinstance(e, BlockStored):
                assert eng.sched.extra_keys(list(e.block_hashes), e.parent_block_hash) is None


@pytest.mark.parametrize("extra", [{"mm_features": [object()]}, {"prompt_embeds": object()}])
def test_requests_whose_kv_is_not_their_tokens_are_neither_served_nor_saved(extra):
    """Images or prompt embeddings change the KV of the same token ids (placeholders):
    kvbm's hashes do not cover them, so such requests get no hit and save nothing."""
    with Engine(settings()) as eng:
        tokens = toks(3 * BS + 4, 8)
        save_prompt(eng, Req("r1", tokens), [0, 1, 2, 3])
        r2 = Req("r2", tokens, **extra)
        assert eng.admit(r2, [4, 5, 6, 7]) == (0, False)
        other = Req("r3", toks(3 * BS + 4, 9), **extra)
        assert eng.admit(other, [8, 9, 10, 11]) == (0, False)
        step = eng.prefill(other, [8, 9, 10, 11], 0)
        assert step.plan.plans == []
        assert eng.sched.counters.saved_blocks == 3  # r1's only


def test_an_object_tier_that_dies_before_a_load_gives_load_errors_not_a_hang(
        tmp_path, aws_test_env):
    """The bucket's server dies before a restarted engine's hit is loaded from it: the
    scheduler still answers from its local index (no I/O), the load fails within the retry
    deadline, every promised block comes back as a load error (vLLM recomputes) and the
    request is reported as received once."""
    import boto3

    from kvbm.storage.resilience import RetryPolicy
    from kvbm.storage.s3 import S3TierConfig
    from kvbm.testing.servers import moto_server

    server = moto_server()
    server.start()
    try:
        boto3.client("s3", endpoint_url=server.endpoint).create_bucket(Bucket="down")
        s3 = S3TierConfig(bucket="down", endpoint_url=server.endpoint,
                          index_path=str(tmp_path / "s3-index"),
                          retry=RetryPolicy(max_attempts=2, deadline_s=3.0))
        cfg = ManagerConfig(device=None, host=HostTierConfig(16), s3=s3)
        s = ConnectorSettings(MHA, cfg, 1, "engine-test")
        tokens = toks(3 * BS + 6, 21)
        with Engine(s) as eng:
            save_prompt(eng, Req("r1", tokens), [0, 1, 2, 3])
        with Engine(s) as eng:  # a restart; then the server dies
            server.kill()
            r2 = Req("r2", [*tokens[:3 * BS], *toks(8, 22)])
            eng.ranks[0].fill([8, 9, 10, 11], -7.0)
            assert eng.admit(r2, [8, 9, 10, 11]) == (3 * BS, True)
            step, _ = steps_until_received(eng, "r2")
            assert step.plan.recv_done == ["r2"]
            assert step.ranks[0].errors == {8, 9, 10}
            assert bool((eng.read(0, 8) == -7).all())
            assert eng.sched.counters.load_errors == 3
            for _ in range(3):  # reported once
                assert eng.step().ranks[0].recving == set()
    finally:
        server.kill()


def test_the_worker_takes_vllms_cpu_packing_rather_than_guessing():
    """A page must be kvbm's canonical layout whatever the machine (disk and bucket pages
    are shared): the worker takes the ISA vLLM chose; one kvbm does not know is refused."""
    from kvbm.errors import LayoutError
    from kvbm.memory.engine_kv import CpuPacking

    s = settings()
    tensors = {f"l{i}": torch.zeros(local_shape(s.layout, 1)) for i in range(s.layout.num_layers)}
    w = WorkerSide(s, 0)
    w.register(tensors, cpu_isa="vec")
    assert w._kv.cpu_packing is CpuPacking.VEC
    with pytest.raises(LayoutError, match="neon"):
        WorkerSide(s, 0).register(tensors, cpu_isa="neon")

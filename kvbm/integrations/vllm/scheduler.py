"""The connector's scheduler side: kvbm's control plane inside vLLM's scheduler process.

It owns the block manager (G2 in shared memory, G3/G4 below it; G1 is vLLM's), answers
vLLM's prefix queries from the index alone, and turns vLLM's scheduling decisions into
transfer plans for the workers: LOAD (G2 -> vLLM's blocks) for prefix hits, SAVE (vLLM's
blocks -> G2) for newly computed full blocks. Hits only on disk or in object storage are
first staged into G2 by the offload engine in the background (vLLM's asynchronous load);
the scheduler never waits on a disk or a bucket. Saved pages become cached blocks only
once every worker reported its copy done and each page carries the block's tag.

Duck-typed on vLLM's request and scheduler-output objects (attributes only), so that it can
be driven without vLLM in tests.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvbm.core.handles import StageHandle
from kvbm.core.plans import BlockCopy, CopyStatus, Direction, PlanResult, TransferPlan
from kvbm.errors import InvalidArgumentError
from kvbm.events import KVEvent
from kvbm.hashing import hash_blocks
from kvbm.integrations.vllm.config import ConnectorSettings
from kvbm.integrations.vllm.saves import SaveJob, SavePlanner, hash_key
from kvbm.integrations.vllm.stats import ConnectorCounters, KvbmConnectorStats, SchedulerMeter
from kvbm.integrations.vllm.wire import PoolInfo, StepPlan, WorkerReport
from kvbm.layout import KVKind
from kvbm.manager import BlockManager
from kvbm.medium import Medium

log = logging.getLogger(__name__)

_LOWER = (Medium.DISK, Medium.OBJECT)


@dataclass
class _Load:
    handle: StageHandle
    start: int
    #: vLLM's block ids of blocks start .. start + len(g1) - 1
    g1: list[int]
    is_async: bool
    deadline: float


@dataclass
class _Req:
    request: Any
    block_ids: list[int] = field(default_factory=list)
    #: blocks [0, saved) are cached in kvbm or have a save planned
    saved: int = 0
    load: _Load | None = None
    #: vLLM recomputes from this block (its load failed). Until vLLM schedules the request
    #: back there, what it computes attends to a block that was not loaded (async scheduling
    #: plans the next step before it learns of the failure): nothing of it is saved
    redo: int = -1


@dataclass
class _Job:
    plan: TransferPlan
    handle: StageHandle | None = None
    saves: SaveJob | None = None
    statuses: dict[int, tuple[CopyStatus, ...]] = field(default_factory=dict)
    #: the step that planned it
    step: int = 0
    #: a SAVE computed on top of blocks that failed to load in its step: never committed
    tainted: bool = False


class SchedulerSide:
    """See the module docstring. One per vLLM engine (its scheduler process)."""

    def __init__(self, settings: ConnectorSettings, *, keep_events: bool = True,
                 metrics: tuple[str, int] | None = None) -> None:
        """``metrics``: (host, port) to serve kvbm's Prometheus endpoint on (see
        :mod:`kvbm.integrations.vllm.prom`)."""
        from kvbm.memory.shm import SharedHostPool

        self.settings = settings
        layout = settings.layout
        self.block_size = layout.block_size
        host = settings.config.host
        assert host is not None
        # MHA: each rank writes its heads and its own tag column; MLA: rank 0 alone writes.
        self._writers = 1 if layout.kind is KVKind.MLA else settings.world_size
        self.pool = SharedHostPool.create(layout, host.num_blocks, tag_columns=self._writers,
                                          prefix="kvbm-vllm", pin_memory=host.pin_memory)
        try:
            self.mgr = BlockManager(layout, settings.config, host_pool=self.pool)
        except BaseException:
            self.pool.close()
            raise
        # Pages the offload engine loads from disk or object storage (verified there by their
        # checksums) are written by no worker: tag them the moment they become G2 copies.
        self.mgr.set_host_fill_hook(self._tag_filled)
        # And a page goes down to disk or the bucket only while it still carries its tag:
        # their checksums would vouch for whatever it held.
        self.mgr.set_host_check_hook(self._tags_hold)
        self._pool_info = PoolInfo(self.pool.name, layout.to_dict(), host.num_blocks,
                                   self._writers)
        self._keep_events = keep_events
        self._reqs: dict[str, _Req] = {}
        self._matches: dict[str, tuple[Any, int, int, bool]] = {}
        self._jobs: dict[int, _Job] = {}
        #: last saves of finished requests: (request id to report sent, or None when the
        #: request is reported by whoever else keeps its blocks; the plan)
        self._final: list[tuple[str | None, TransferPlan | None]] = []
        #: requests aborted while their asynchronous load ran: reported received once
        self._aborted: list[str] = []
        self._sources: dict[str, dict[Medium, int]] = {}
        self._plan_ids = itertools.count(1)
        self._step = 0
        self._asked: dict[str, int] = {}
        #: the last step each rank reported (see _expire_lost)
        self._rank_step: dict[int, int] = {}
        self.counters = ConnectorCounters()
        self._saves = SavePlanner(self.mgr, self.pool, self._writers, self.counters,
                                  settings.config.salt)
        self.meter = SchedulerMeter()
        self.metrics_server: Any = None
        if metrics is not None:
            from kvbm.integrations.vllm.prom import serve_metrics

            try:
                self.metrics_server = serve_metrics(self.mgr, self.counters, self.meter,
                                                    *metrics)
            except BaseException:
                self.close()
                raise

    # ------------------------------------------------------------------ vLLM's questions --
    def num_new_matched_tokens(self, request: Any, num_computed_tokens: int
                               ) -> tuple[int, bool]:
        """Tokens kvbm can provide beyond vLLM's own hit, and whether loading them is
        asynchronous (some only on disk or in object storage). Index only: no I/O."""
        bs = self.block_size
        tokens = request.all_token_ids
        if num_computed_tokens % bs:
            return 0, False
        start = num_computed_tokens // bs
        # vLLM must compute at least the last token itself.
        most = (len(tokens) - 1) // bs
        self.counters.queries += 1
        if most <= start:
            return 0, False
        key = hash_key(request, self.settings.config.salt)
        if key is None:  # KV that depends on more than the tokens: never from kvbm
            return 0, False
        salt, lora = key
        self._asked[request.request_id] = most - start
        arr = np.asarray(tokens[: most * bs], dtype=np.uint32)
        hashes = hash_blocks(arr, bs, lora_name=lora, salt=salt)
        if hashes.sequence:
            self._saves.roots.note(request, hashes.sequence[0])
        m = self.mgr.match_hashes(hashes, lora_name=lora, tokens=arr)
        # Promise no more than G2 can stage now: a disk hit without a page to land in
        # would be a load error (and a wait for a load that never runs), not a miss.
        n = start + self.mgr.stageable(m, start) if m.num_blocks > start else m.num_blocks
        if n <= start:
            return 0, False
        is_async = any(med in _LOWER for med in m.mediums[start:n])
        self._matches[request.request_id] = (m, start, n, is_async)
        return (n - start) * bs, is_async

    def after_alloc(self, request: Any, block_ids: list[int], num_external_tokens: int) -> None:
        """vLLM allocated blocks for ``request``; stage the promised hit in G2."""
        rid = request.request_id
        st = self._reqs.get(rid)
        if st is None:
            st = self._reqs[rid] = _Req(request)
        st.request = request
        st.block_ids = list(block_ids)
        found = self._matches.pop(rid, None)
        asked = self._asked.pop(rid, 0)
        if asked:
            self.counters.query_tokens += asked * self.block_size
            held = 0 if found is None else found[2] - found[1]
            self.counters.miss_tokens += (asked - held) * self.block_size
        if num_external_tokens <= 0 or found is None:
            return
        m, start, n, is_async = found
        n = min(n, start + num_external_tokens // self.block_size)
        if n < m.num_blocks:
            m = dataclasses.replace(m, num_blocks=n, sequence_hashes=m.sequence_hashes[:n],
                                    mediums=m.mediums[:n])
        handle = self.mgr.stage(m, start_block=start)
        timeout = self.settings.config.offload.load_timeout_s
        st.load = _Load(handle, start, st.block_ids[start:n], is_async,
                        time.monotonic() + timeout)
        # The promised blocks are cached in kvbm already: never save them again.
        st.saved = max(st.saved, n)
        self.counters.hit_tokens_by_medium_add(m.mediums[start:n], self.block_size)
        split: dict[Medium, int] = {}
        for med in m.mediums[start:n]:
            split[med] = split.get(med, 0) + self.block_size
        self._sources[rid] = split

    def hit_sources(self, request_id: str) -> dict[Medium, int]:
        """Tokens of the last promised hit of ``request_id`` by the tier holding them."""
        return self._sources.pop(request_id, {})

    def build_step(self, scheduler_output: Any) -> bytes:
        """This step's plans for the workers (vLLM's ``build_connector_meta``)."""
        self._step += 1
        self.mgr.poll()
        step = StepPlan(self._step, self._pool_info)
        self._plan_loads(step)
        self._plan_saves(step, scheduler_output)
        for rid, plan in self._final:
            if plan is not None:
                step.plans.append(plan)
                job = self._jobs.get(plan.plan_id)
                if job is not None:  # planned at request_finished, sent with this step
                    job.step = self._step
            if rid is not None:
                step.send_done.append(rid)
        self._final = []
        step.recv_done.extend(self._aborted)
        self._aborted = []
        if not self._keep_events:
            self.mgr.take_events()
        return step.encode()

    def request_finished(self, request: Any, block_ids: list[int], *,
                         report_sent: bool = True) -> bool:
        """The request ended; save its last full blocks. True: vLLM must keep its blocks
        until the workers report the save done. ``report_sent=False``: the workers do not
        report it for the save (something else holds the blocks longer and reports them:
        a prefill/decode handoff, whose hold goes to the workers in the same step)."""
        rid = request.request_id
        self._matches.pop(rid, None)
        self._asked.pop(rid, None)
        self._sources.pop(rid, None)
        st = self._reqs.pop(rid, None)
        if st is None:
            return False
        if st.load is not None:  # never handed to the workers (aborted while loading)
            st.load.handle.release()
            is_async, st.load = st.load.is_async, None
            if is_async:
                # vLLM keeps the blocks of a request aborted in WAITING_FOR_REMOTE_KVS until
                # a worker reports it received (and frees them again on a send report).
                self._aborted.append(rid)
                return False
        st.request = request
        st.block_ids = list(block_ids)
        full = min(int(request.num_computed_tokens), len(request.all_token_ids)) \
            // self.block_size
        plan = self._save_plan(st, full)
        if plan is None:
            return False
        self._final.append((rid if report_sent else None, plan))
        return True

    def on_worker_reports(self, payloads: list[bytes]) -> None:
        """Every worker's results of one step (vLLM's ``update_connector_output``). A payload
        that is not a report of one of the engine's ranks raises
        :class:`~kvbm.errors.InvalidArgumentError`, once the good ones are applied (losing
        those would hold their pages forever)."""
        if not isinstance(payloads, list | tuple):
            raise InvalidArgumentError(f"worker reports must be a list of bytes, got "
                                       f"{type(payloads).__name__}")
        bad: list[str] = []
        for data in payloads:
            try:
                report = WorkerReport.decode(data)
                if not 0 <= report.rank < self.settings.world_size:
                    raise InvalidArgumentError(f"worker report from rank {report.rank}; the "
                                               f"engine has {self.settings.world_size}")
            except InvalidArgumentError as e:
                bad.append(str(e))
                continue
            for res in report.results:
                self._on_result(report.rank, res)
            self._rank_step[report.rank] = max(self._rank_step.get(report.rank, 0),
                                               report.step)
        self._expire_lost()
        if bad:
            raise InvalidArgumentError("; ".join(bad))

    def _expire_lost(self) -> None:
        """Plans of steps every rank has reported past without a result lost their report
        (a refused payload, a worker exception): give their pages back rather than hold
        them forever. Steps run one after another on each worker, so their copies are over;
        a load is counted as failed (vLLM was told nothing: it recomputes nothing, but its
        blocks were never marked loaded by kvbm either), a save is not committed."""
        if len(self._rank_step) < self.settings.world_size or not self._jobs:
            return
        through = min(self._rank_step.values())
        for plan_id in [p for p, j in self._jobs.items() if j.step <= through]:
            job = self._jobs.pop(plan_id)
            log.warning("kvbm: plan %d of step %d lost its report from %d of %d ranks; its "
                        "pages are given back", plan_id, job.step,
                        self.settings.world_size - len(job.statuses), self.settings.world_size)
            self.counters.lost_reports += 1
            if job.handle is not None:
                job.handle.release()
            if job.saves is not None:
                self._saves.abandon(job.saves)

    def take_events(self) -> list[KVEvent]:
        return self.mgr.take_events()

    def extra_keys(self, block_hashes: list[int], parent: int | None
                   ) -> list[tuple[Any, ...] | None] | None:
        """vLLM's ``extra_keys`` for kvbm's BlockStored of salted requests' first blocks."""
        return self._saves.roots.extra_keys(block_hashes, parent)

    def reset(self) -> bool:
        """Drop every cached block (vLLM's ``reset_prefix_cache(reset_connector=True)``)."""
        if self._jobs or any(r.load is not None for r in self._reqs.values()):
            return False
        # Clearing waits for the stores to disk or the bucket in flight: the scheduler must
        # not (vLLM asks again later).
        if any(q.inflight_pages for _, q in self.mgr.stats(drain=False).lower_tiers.values()):
            return False
        try:
            self.mgr.clear()
        except Exception:  # blocks in use: vLLM retries later
            return False
        return True

    def take_stats(self) -> KvbmConnectorStats | None:
        """What changed since the last call (vLLM's scheduler-side
        ``get_kv_connector_stats``, once per step)."""
        gauges = {"pending_loads": sum(1 for r in self._reqs.values() if r.load is not None),
                  "inflight_plans": len(self._jobs)}
        return self.meter.take(self.counters, self.mgr.stats(drain=False), gauges)

    def close(self) -> None:
        if self.metrics_server is not None:
            self.metrics_server.close()
            self.metrics_server = None
        for job in self._jobs.values():
            if job.handle is not None:
                job.handle.release()
        self._jobs.clear()
        try:
            self.mgr.close()
        finally:
            self.pool.close()

    # ---------------------------------------------------------------------- internals --
    def _plan_loads(self, step: StepPlan) -> None:
        now = time.monotonic()
        for rid, st in self._reqs.items():
            ld = st.load
            if ld is None:
                continue
            h = ld.handle
            if not h.done():
                if ld.is_async and now < ld.deadline:
                    continue
                h.cancel()  # (a sync promise cannot wait: vLLM computes in this step)
                self.counters.load_timeouts += 1
            slots = h.slots
            k = min(len(slots), len(ld.g1))
            hashes = h.sequence_hashes
            copies = tuple(BlockCopy(ld.g1[i], slots[i], hashes[i]) for i in range(k))
            if len(ld.g1) > k:
                step.load_errors.extend(ld.g1[k:])
                self.counters.load_errors += len(ld.g1) - k
                # vLLM recomputes them: save them then (those still cached are skipped).
                st.saved = min(st.saved, ld.start + k)
                st.redo = ld.start + k if st.redo < 0 else min(st.redo, ld.start + k)
            if copies:
                plan = TransferPlan(next(self._plan_ids), Direction.LOAD, copies, rid)
                step.plans.append(plan)
                self._jobs[plan.plan_id] = _Job(plan, handle=h, step=self._step)
            else:
                h.release()
            if ld.is_async:
                step.recv_done.append(rid)
            st.load = None

    def _plan_saves(self, step: StepPlan, so: Any) -> None:
        bs = self.block_size
        scheduled = so.num_scheduled_tokens
        for new in so.scheduled_new_reqs:
            st = self._reqs.get(new.req_id)
            if st is None:
                continue
            st.block_ids = list(new.block_ids[0])
            done = new.num_computed_tokens + scheduled.get(new.req_id, 0)
            full = min(done, len(st.request.all_token_ids)) // bs
            self._add_save(step, st, full, new.num_computed_tokens)
        cached = so.scheduled_cached_reqs
        resumed: set[str] = getattr(cached, "resumed_req_ids", set())
        for i, rid in enumerate(cached.req_ids):
            st = self._reqs.get(rid)
            if st is None:
                continue
            new_ids = cached.new_block_ids[i]
            if new_ids is not None:
                if rid in resumed:
                    st.block_ids = list(new_ids[0])
                else:
                    st.block_ids.extend(new_ids[0])
            done = cached.num_computed_tokens[i] + scheduled.get(rid, 0)
            full = min(done, len(st.request.all_token_ids)) // bs
            self._add_save(step, st, full, cached.num_computed_tokens[i])

    def _add_save(self, step: StepPlan, st: _Req, full: int, computed: int) -> None:
        plan = self._save_plan(st, full, computed)
        if plan is not None:
            step.plans.append(plan)

    def _save_plan(self, st: _Req, full: int, computed: int | None = None
                   ) -> TransferPlan | None:
        """A SAVE plan for blocks [st.saved, full) not cached yet (G2 room permitting);
        ``computed``: the tokens vLLM had computed when it scheduled this step."""
        if st.redo >= 0:
            if computed is None or computed > st.redo * self.block_size:
                return None  # vLLM has not gone back to the block that failed to load
            st.redo = -1
        full = min(full, len(st.block_ids))
        if full <= st.saved:
            return None
        job = self._saves.plan(next(self._plan_ids), st.request, st.block_ids, st.saved, full)
        st.saved = full
        if job is None:
            return None
        self._jobs[job.plan.plan_id] = _Job(job.plan, saves=job, step=self._step)
        return job.plan

    def _tags_hold(self, pages: list[tuple[int, int]]) -> list[bool]:
        tags = self.pool.tags
        w = self._writers
        return [bool((tags[slot, :w] == seq_hash).all()) for slot, seq_hash in pages]

    def _tag_filled(self, pages: list[tuple[int, int]]) -> None:
        tags = self.pool.tags
        for slot, seq_hash in pages:
            tags[slot, : self._writers] = seq_hash

    def _on_result(self, rank: int, res: PlanResult) -> None:
        job = self._jobs.get(res.plan_id)
        if job is None or len(res.statuses) != len(job.plan.copies):
            log.warning("kvbm: result for unknown plan %d from rank %d ignored",
                        res.plan_id, rank)
            return
        job.statuses[rank] = res.statuses
        if len(job.statuses) < self.settings.world_size:
            return
        del self._jobs[res.plan_id]
        ok = [all(s[i] is CopyStatus.DONE for s in job.statuses.values())
              for i in range(len(job.plan.copies))]
        if job.plan.direction is Direction.LOAD:
            assert job.handle is not None
            job.handle.release()
            self.counters.loaded_blocks += sum(ok)
            self.counters.load_errors += len(ok) - sum(ok)
            # A page that failed a worker's tag check is not the block's: drop that G2 copy
            # (every later hit would fail the same way); copies below stay.
            bad = [c.seq_hash for i, c in enumerate(job.plan.copies)
                   if any(s[i] is CopyStatus.MISMATCH for s in job.statuses.values())]
            if bad:
                self.counters.discarded_pages += self.mgr.discard_host(bad)
            if not all(ok):
                self._load_failed(job, ok)
            return
        assert job.saves is not None
        self._saves.finish(job.saves, [False] * len(ok) if job.tainted else ok)

    def _load_failed(self, job: _Job, ok: list[bool]) -> None:
        """vLLM recomputes the blocks of LOAD ``job`` that are not ``ok``. What its step's
        forward pass (and the next one's, planned before vLLM learnt of it) computed after
        them attended to whatever they held: those saves of the request are not the blocks'
        KV and are never committed. The blocks are saved once recomputed."""
        rid = job.plan.request_id
        for other in self._jobs.values():  # (a rank reports its loads before its saves)
            if other.saves is not None and other.step >= job.step \
                    and other.plan.request_id == rid:
                other.tainted = True
        st = self._reqs.get(rid)
        if st is not None:
            where = {b: i for i, b in enumerate(st.block_ids)}
            bad = [where[c.g1_block] for c, good in zip(job.plan.copies, ok, strict=True)
                   if not good and c.g1_block in where]
            if bad:
                st.saved = min(st.saved, min(bad))
                st.redo = min(bad) if st.redo < 0 else min(st.redo, min(bad))

"""The connector's worker side: kvbm's data plane inside each vLLM worker process.

It registers vLLM's KV tensors (a view, never a copy), attaches to the scheduler's shared G2
pool by the name the step plan carries, and executes the plans: LOAD copies pages into
vLLM's blocks (before the forward pass when the step needs them), SAVE copies newly computed
blocks into G2 pages (after the forward pass). A page whose tag is not the block's hash is
never loaded: the block is reported to vLLM as a load error and recomputed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from kvbm.core.plans import CopyStatus, Direction, PlanResult, TransferPlan
from kvbm.errors import LayoutError
from kvbm.integrations.vllm.config import ConnectorSettings
from kvbm.integrations.vllm.stats import WorkerMeter
from kvbm.integrations.vllm.wire import PoolInfo, StepPlan, WorkerReport
from kvbm.layout import KVLayout

log = logging.getLogger(__name__)


class WorkerSide:
    """See the module docstring. One per vLLM worker (TP rank)."""

    def __init__(self, settings: ConnectorSettings, rank: int) -> None:
        self.settings = settings
        self.rank = rank
        self._kv: Any = None
        self._kv_caches: dict[str, Any] | None = None
        self._pool: Any = None
        self._pool_name: str | None = None
        self._mover: Any = None
        self._step: StepPlan | None = None
        self._results: list[PlanResult] = []
        self._last_step = -1
        #: loads started this step, finished before the step's saves and reports
        self._loading: list[tuple[TransferPlan, Any, float]] = []
        self._errors: set[int] = set()
        self._recving: set[str] = set()
        self._sending: set[str] = set()
        self._loaded_step = -1
        #: what this rank copied, for vLLM's get_kv_connector_stats
        self.meter = WorkerMeter()

    def register(self, kv_caches: Mapping[str, Any], *, cpu_isa: str | None = None) -> None:
        """vLLM's KV tensors, one per attention layer (``register_kv_caches``). ``cpu_isa``:
        the ISA vLLM's CPU attention packs KV for (``vec``, ``vec16``, ``amx``), as vLLM
        itself chose it; without it kvbm repeats vLLM's rule."""
        from kvbm.memory.engine_kv import CpuPacking, EngineKV, TPShard

        packing = None if cpu_isa is None else CpuPacking.for_vllm_isa(cpu_isa)
        self._kv_caches = dict(kv_caches)
        self._kv = EngineKV(dict(kv_caches), self.settings.layout,
                            shard=TPShard(self.rank, self.settings.world_size),
                            cpu_packing=packing)

    @property
    def engine_kv(self) -> Any:
        """vLLM's KV tensors as kvbm sees them (a :class:`~kvbm.memory.engine_kv.EngineKV`;
        ``None`` before ``register``)."""
        return self._kv

    def kv_tensors(self) -> list[Any]:
        """vLLM's KV tensors as registered (one per layer)."""
        return [] if self._kv_caches is None else list(self._kv_caches.values())

    def bind(self, payload: bytes) -> None:
        # Unbind first: after a refused payload the last step's saves must not run again
        # (its blocks may hold other KV by now).
        self._step = None
        self._step = StepPlan.decode(payload)
        self._last_step = self._step.step

    def clear(self) -> None:
        self._step = None

    def start_load(self) -> None:
        """Execute this step's LOAD plans (vLLM's ``start_load_kv``)."""
        step = self._step
        if step is None or self._loaded_step == step.step:
            return
        self._loaded_step = step.step
        self._errors.update(step.load_errors)
        loads = [p for p in step.plans if p.direction is Direction.LOAD]
        for plan in loads:
            # Started, not waited for: on CUDA the copies run on the mover's stream and
            # each layer's attention waits for its own layer only (wait_layer).
            t0 = time.perf_counter()
            try:  # (a pool this rank cannot map fails the plan, like a failed copy)
                mover = self._ensure_mover(step.pool)
                self._loading.append((plan, mover.start_load(plan), t0))
            except Exception as e:  # a failed copy must not take the engine down
                log.error("kvbm: load plan %d failed on rank %d: %s", plan.plan_id,
                          self.rank, e)
                self._record(plan, self._failed(plan), t0)
        self._recving.update(step.recv_done)

    def wait_layer(self, layer_name: str) -> None:
        """Before a layer's attention (vLLM's ``wait_for_layer_load``): its KV is in."""
        if not self._loading or self._kv is None:
            return
        try:
            index = self._kv.layer_index(layer_name)
        except Exception:  # a layer kvbm does not hold (not an attention layer's cache)
            return
        for _, handle, _ in self._loading:
            handle.wait_layer(index)

    def _finish_loads(self) -> None:
        loading, self._loading = self._loading, []
        for plan, handle, t0 in loading:
            try:
                res: PlanResult = handle.finish()
            except Exception as e:
                log.error("kvbm: load plan %d failed on rank %d: %s", plan.plan_id,
                          self.rank, e)
                res = self._failed(plan)
            self._record(plan, res, t0)

    def wait_for_save(self) -> None:
        """Execute this step's SAVE plans (after the forward pass)."""
        self._finish_loads()
        step = self._step
        if step is None:
            return
        saves = [p for p in step.plans if p.direction is Direction.SAVE]
        for plan in saves:
            self._run(step.pool, plan)
        self._sending.update(step.send_done)

    def finished(self) -> tuple[set[str] | None, set[str] | None]:
        self._finish_loads()
        sending, recving = self._sending, self._recving
        self._sending, self._recving = set(), set()
        return sending or None, recving or None

    def load_errors(self) -> set[int]:
        self._finish_loads()
        out, self._errors = self._errors, set()
        return out

    def report(self) -> bytes | None:
        """This step's results, and the step: sent every step once plans arrive, so that
        the scheduler can tell a lost report from a late one."""
        self._finish_loads()
        if self._last_step < 0:
            return None
        out = WorkerReport(self.rank, self._results, self._last_step).encode()
        self._results = []
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None
            self._mover = None

    # ---------------------------------------------------------------------- internals --
    def _run(self, pool: PoolInfo | None, plan: TransferPlan) -> PlanResult:
        t0 = time.perf_counter()
        try:
            mover = self._ensure_mover(pool)
            res: PlanResult = (mover.load(plan) if plan.direction is Direction.LOAD
                               else mover.save(plan))
        except Exception as e:  # a failed copy must not take the engine down: recompute
            log.error("kvbm: %s plan %d failed on rank %d: %s", plan.direction.value,
                      plan.plan_id, self.rank, e)
            res = self._failed(plan)
        return self._record(plan, res, t0)

    def _failed(self, plan: TransferPlan) -> PlanResult:
        return PlanResult(plan.plan_id, self.rank, tuple(CopyStatus.FAILED for _ in plan.copies))

    def _record(self, plan: TransferPlan, res: PlanResult, t0: float) -> PlanResult:
        if plan.direction is Direction.LOAD:
            self._errors.update(c.g1_block for c, st in zip(plan.copies, res.statuses,
                                                             strict=True)
                                if st is not CopyStatus.DONE)
        if res.rank != self.rank:
            res = PlanResult(res.plan_id, self.rank, res.statuses)
        self.meter.record(plan.direction, res.statuses, time.perf_counter() - t0,
                          self._copy_bytes(plan.direction))
        self._results.append(res)
        return res

    def _copy_bytes(self, direction: Direction) -> int:
        """Bytes one block copy moves on this rank: its heads of a page (MLA: the whole
        latent, loaded by every rank and saved by rank 0 alone)."""
        kv, layout = self._kv, self.settings.layout
        if kv is None or (direction is Direction.SAVE and not kv.writes_pages):
            return 0
        return int(layout.bytes_per_block // layout.num_kv_heads * kv.local_heads)

    def _ensure_mover(self, info: PoolInfo | None) -> Any:
        if self._kv is None:
            raise LayoutError("kvbm: the worker got plans before vLLM registered its KV "
                              "caches")
        if info is None:
            raise LayoutError("kvbm: a step plan without its pool")
        if self._mover is None or self._pool_name != info.name:
            from kvbm.memory.mover import BlockMover
            from kvbm.memory.shm import SharedHostPool

            if self._pool is not None:
                self._pool.close()
            layout = KVLayout.from_dict(info.layout)
            if layout.fingerprint != self.settings.layout.fingerprint:
                raise LayoutError("kvbm: the scheduler's pool holds another layout")
            self._pool = SharedHostPool.attach(info.name, layout)
            self._pool_name = info.name
            self._mover = BlockMover(self._kv, self._pool)
        return self._mover

"""``KvbmConnector``: vLLM's KV connector interface (``KVConnectorBase_V1``) over kvbm.

A thin adapter: the scheduler role delegates to :class:`SchedulerSide` (control plane), the
worker role to :class:`WorkerSide` (data plane). What crosses between them travels inside
vLLM's metadata objects as msgpack bytes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_events import AllBlocksCleared as VllmAllBlocksCleared
from vllm.distributed.kv_events import BlockRemoved as VllmBlockRemoved
from vllm.distributed.kv_events import BlockStored as VllmBlockStored
from vllm.distributed.kv_events import KVCacheEvent
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorHandshakeMetadata,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from kvbm.errors import KvbmError
from kvbm.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from kvbm.integrations.vllm.config import settings_from_vllm
from kvbm.integrations.vllm.pd_params import DisaggConfig, roles_for
from kvbm.integrations.vllm.prom import KvbmPromMetrics, metrics_endpoint
from kvbm.integrations.vllm.scheduler import SchedulerSide
from kvbm.integrations.vllm.stats import KvbmConnectorStats, merged
from kvbm.integrations.vllm.worker import WorkerSide
from kvbm.medium import Medium

if TYPE_CHECKING:
    import torch

    from kvbm.integrations.vllm.disagg import DisaggScheduler
    from kvbm.integrations.vllm.pd_worker import DisaggWorker

log = logging.getLogger(__name__)

_SOURCE = {Medium.CPU_PINNED: CacheHitSource.HOST, Medium.DISK: CacheHitSource.DISK,
           Medium.OBJECT: CacheHitSource.EXTERNAL_UNSPECIFIED}


class KvbmMetadata(KVConnectorMetadata):
    """Scheduler -> workers, one per step: a msgpack payload (see ``wire.StepPlan``), and
    the step's prefill/decode work (``pd_wire.DisaggStep``) when there is some."""

    def __init__(self, payload: bytes, disagg: bytes | None = None) -> None:
        self.payload = payload
        self.disagg = disagg


class KvbmHandshake(KVConnectorHandshakeMetadata):
    """Worker -> its scheduler side, once: the worker's transport agent (msgpack,
    ``pd_wire.Handshake``), for the prefill side's ``kv_transfer_params``."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload


class KvbmWorkerMetadata(KVConnectorWorkerMetadata):
    """Workers -> scheduler, one per step: every worker's msgpack report."""

    def __init__(self, reports: list[bytes]) -> None:
        self.reports = reports

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        if isinstance(other, KvbmWorkerMetadata):
            return KvbmWorkerMetadata(self.reports + other.reports)
        return self


class KvbmConnector(KVConnectorBase_V1):
    """kvbm as vLLM's KV connector: host memory, disk and object storage below vLLM's GPU
    prefix cache. See :mod:`kvbm.integrations.vllm`."""

    def __init__(self, vllm_config: Any, role: KVConnectorRole,
                 kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self._settings = settings_from_vllm(vllm_config)
        metrics = metrics_endpoint(self._kv_transfer_config.kv_connector_extra_config or {})
        if self._kv_transfer_config.kv_load_failure_policy != "recompute":
            log.warning("kvbm: kv_load_failure_policy is %r; set it to 'recompute' so that "
                        "a block kvbm could not load (corrupt page, tier down) is recomputed "
                        "instead of failing the request",
                        self._kv_transfer_config.kv_load_failure_policy)
        self._scheduler: SchedulerSide | None = None
        self._worker: WorkerSide | None = None
        #: disaggregated prefill/decode (docs/vllm.md), where kv_role or kvbm_disagg asks
        self._pd: DisaggScheduler | None = None
        self._pdw: DisaggWorker | None = None
        extra = self._kv_transfer_config.kv_connector_extra_config or {}
        pd_config = DisaggConfig.from_mapping(extra.get("kvbm_disagg"))
        roles = roles_for(self._kv_transfer_config.kv_role, "kvbm_disagg" in extra)
        if roles.any:
            self._settings.config.transport.resolve_secret()  # none: refuse at start
        engine_id = str(self._kv_transfer_config.engine_id)
        if role == KVConnectorRole.SCHEDULER:
            events = vllm_config.kv_events_config
            keep = bool(events is not None and events.enable_kv_cache_events)
            self._scheduler = SchedulerSide(self._settings, keep_events=keep, metrics=metrics)
            if roles.any:
                from kvbm.integrations.vllm.disagg import DisaggScheduler

                self._pd = DisaggScheduler(self._settings, pd_config, roles, engine_id)
        else:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            rank = get_tensor_model_parallel_rank()
            self._worker = WorkerSide(self._settings, rank)
            if roles.any:
                from kvbm.integrations.vllm.pd_worker import DisaggWorker

                self._pdw = DisaggWorker(self._settings, pd_config, roles, engine_id, rank)

    # ------------------------------------------------------------------------ accessors --
    @property
    def scheduler_side(self) -> SchedulerSide:
        assert self._scheduler is not None, "not the scheduler role"
        return self._scheduler

    @property
    def worker_side(self) -> WorkerSide:
        assert self._worker is not None, "not the worker role"
        return self._worker

    @property
    def disagg(self) -> DisaggScheduler | None:
        """The scheduler side's prefill/decode half (``None`` when not configured)."""
        return self._pd

    @property
    def disagg_worker(self) -> DisaggWorker | None:
        """The worker side's prefill/decode half (``None`` when not configured)."""
        return self._pdw

    # ---------------------------------------------------------------------- worker side --
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        first = next(iter(kv_caches.values()), None)
        isa = None
        if first is not None and first.device.type == "cpu":
            isa = _vllm_cpu_isa(self._vllm_config)
        self.worker_side.register(kv_caches, cpu_isa=isa)
        if self._pdw is not None:
            self._pdw.register(self.worker_side.engine_kv, self.worker_side.kv_tensors())

    def get_handshake_metadata(self) -> KVConnectorHandshakeMetadata | None:
        return None if self._pdw is None else KvbmHandshake(self._pdw.handshake())

    def set_xfer_handshake_metadata(self, metadata: dict[int, KVConnectorHandshakeMetadata]
                                    ) -> None:
        if self._pd is not None:
            self._pd.set_handshake({rank: m.payload for rank, m in metadata.items()
                                    if isinstance(m, KvbmHandshake)})

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        if isinstance(connector_metadata, KvbmMetadata) and self._worker is not None:
            self._worker.bind(connector_metadata.payload)
            if self._pdw is not None:
                try:
                    self._pdw.bind(connector_metadata.disagg)
                except KvbmError as e:  # garbage must not take vLLM down
                    log.error("kvbm: prefill/decode step refused: %s", e)

    def clear_connector_metadata(self) -> None:
        super().clear_connector_metadata()
        if self._worker is not None:
            self._worker.clear()

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        self.worker_side.start_load()

    def wait_for_layer_load(self, layer_name: str) -> None:
        # CPU: the copies are done when start_load_kv returns. CUDA: the engine's stream
        # waits for this layer's copies only, so attention overlaps the later layers' loads.
        self.worker_side.wait_layer(layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any,
                      **kwargs: Any) -> None:
        # Saves run in wait_for_save, once every layer of the step is computed.
        return

    def wait_for_save(self) -> None:
        self.worker_side.wait_for_save()

    def get_finished(self, finished_req_ids: set[str]
                     ) -> tuple[set[str] | None, set[str] | None]:
        sending, recving = self.worker_side.finished()
        if self._pdw is not None:
            pd_sending, pd_recving = self._pdw.finished()
            sending = (sending or set()) | (pd_sending or set()) or None
            recving = (recving or set()) | (pd_recving or set()) or None
        return sending, recving

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors = self.worker_side.load_errors()
        if self._pdw is not None:
            errors |= self._pdw.load_errors()
        return errors

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        report = self.worker_side.report()
        return None if report is None else KvbmWorkerMetadata([report])

    # -------------------------------------------------------------------------- metrics --
    def get_kv_connector_stats(self) -> KvbmConnectorStats | None:
        """What this side measured since the last step (workers: copies; scheduler: hits,
        misses, loads, saves, the tiers' traffic and queues; both: the prefill/decode
        handoffs, see pd_stats); vLLM adds them up."""
        if self._worker is not None:
            own = self._worker.meter.take()
            return own if self._pdw is None else merged(own, self._pdw.take_stats())
        if self._scheduler is None:
            return None
        own = self._scheduler.take_stats()
        pd = None if self._pd is None else self._pd.take_stats()
        if pd is not None:  # (the workers' reach kvbm's endpoint in update_connector_output)
            self._scheduler.meter.absorb(pd)
        return merged(own, pd)

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None
                                 ) -> KvbmConnectorStats | None:
        return KvbmConnectorStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(cls, vllm_config: Any, metric_types: dict[Any, Any],
                           labelnames: list[str], per_engine_labelvalues: dict[int, list[object]]
                           ) -> KvbmPromMetrics:
        return KvbmPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def shutdown(self) -> None:
        if self._pdw is not None:
            self._pdw.close()
        if self._worker is not None:
            self._worker.close()
        if self._scheduler is not None:
            self._scheduler.close()

    # ------------------------------------------------------------------- scheduler side --
    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int
                                   ) -> tuple[int | None, bool]:
        if self._pd is not None and self._pd.owns(request):  # KV from a prefill instance
            return self._pd.num_new_matched_tokens(request, num_computed_tokens)
        return self.scheduler_side.num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Any, blocks: Any,
                                 num_external_tokens: int) -> None:
        ids = blocks.get_block_ids()
        block_ids = list(ids[0]) if ids else []
        if self._pd is not None and self._pd.owns(request):
            # The remote tokens are the prefill side's; kvbm saves the blocks once they
            # are in (computed blocks like any other).
            self._pd.after_alloc(request, block_ids, num_external_tokens)
            num_external_tokens = 0
        self.scheduler_side.after_alloc(request, block_ids, num_external_tokens)

    def get_external_cache_hit_sources(self, request: Any, num_external_tokens: int
                                       ) -> dict[CacheHitSource, int]:
        if num_external_tokens == 0:
            return {}
        out: dict[CacheHitSource, int] = {}
        for medium, n in self.scheduler_side.hit_sources(request.request_id).items():
            src = _SOURCE[medium]
            out[src] = out.get(src, 0) + n
        if sum(out.values()) != num_external_tokens:  # vLLM then reports it unspecified
            return {CacheHitSource.EXTERNAL_UNSPECIFIED: num_external_tokens}
        return out

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        return KvbmMetadata(self.scheduler_side.build_step(scheduler_output),
                            None if self._pd is None else self._pd.build_step())

    def update_connector_output(self, connector_output: Any) -> None:
        if self._pd is not None:
            self._pd.on_sent(getattr(connector_output, "finished_sending", None))
        stats = getattr(connector_output, "kv_connector_stats", None)
        if isinstance(stats, KvbmConnectorStats):  # the workers' copies, for kvbm's endpoint
            self.scheduler_side.meter.absorb(stats)
        meta = connector_output.kv_connector_worker_meta
        if isinstance(meta, KvbmWorkerMetadata):
            try:
                self.scheduler_side.on_worker_reports(meta.reports)
            except KvbmError as e:  # garbage from a worker must not take vLLM down
                log.error("kvbm: a worker report was refused: %s", e)

    def request_finished(self, request: Any, block_ids: list[int]
                         ) -> tuple[bool, dict[str, Any] | None]:
        params = None if self._pd is None else self._pd.request_finished(request, block_ids)
        # A handed-off request is reported sent by the workers once the decode side has
        # its blocks (after its last saves, which run in the same step as the hold).
        saving = self.scheduler_side.request_finished(request, block_ids,
                                                      report_sent=params is None)
        return saving or params is not None, params

    def take_events(self) -> Iterable[KVCacheEvent]:
        side = self.scheduler_side
        return [_to_vllm(e, side.extra_keys) for e in side.take_events()]

    def reset_cache(self) -> bool | None:
        return self.scheduler_side.reset()


def _vllm_cpu_isa(vllm_config: Any) -> str | None:
    """The ISA vLLM's CPU attention packs this model's KV for, asked of vLLM's own rule:
    a page must be kvbm's canonical layout whatever the machine (pages on disk or in a
    bucket are shared), so kvbm reads the packing rather than guessing it."""
    try:
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa
    except ImportError:  # another vLLM layout: EngineKV repeats the rule itself
        return None
    mc, cc = vllm_config.model_config, vllm_config.cache_config
    isa: str = _get_attn_isa(mc.dtype, cc.block_size, mc.get_head_size(), cc.cache_dtype)
    return isa


def _to_vllm(e: KVEvent, extra_keys: Callable[[list[int], int | None],
                                               list[tuple[Any, ...] | None] | None]
             ) -> KVCacheEvent:
    if isinstance(e, BlockStored):
        hashes: list[int] = list(e.block_hashes)
        return VllmBlockStored(block_hashes=list[bytes | int](hashes),
                               parent_block_hash=e.parent_block_hash,
                               token_ids=list(e.token_ids), block_size=e.block_size,
                               lora_id=e.lora_id, medium=e.medium.value,
                               lora_name=e.lora_name,
                               extra_keys=extra_keys(hashes, e.parent_block_hash))
    if isinstance(e, BlockRemoved):
        return VllmBlockRemoved(block_hashes=list(e.block_hashes), medium=e.medium.value)
    assert isinstance(e, AllBlocksCleared)
    return VllmAllBlocksCleared()

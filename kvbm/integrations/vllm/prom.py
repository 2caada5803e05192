"""The connector's Prometheus metrics, two ways.

* In vLLM's own ``/metrics``: :class:`KvbmPromMetrics` (vLLM's ``build_prom_metrics``)
  registers ``vllm:kvbm_<name>`` for every name of
  :func:`~kvbm.integrations.vllm.stats.metric_specs` (counters get Prometheus' ``_total``,
  with vLLM's engine labels plus their own: ``medium``, ``direction``, ``reason``,
  ``backend``, ``op``) and the histograms ``vllm:kvbm_load_time_seconds`` /
  ``vllm:kvbm_save_time_seconds`` / ``vllm:kvbm_pd_handoff_time_seconds``, and
  observes each step's :class:`~kvbm.integrations.vllm.stats.KvbmConnectorStats` data.
* kvbm's own endpoint, in vLLM's scheduler process, when ``kv_connector_extra_config`` says:

  ``kvbm_metrics_port``
      int in [0, 65535]: serve ``http://HOST:PORT/metrics`` (0: a free port, logged). Needs
      prometheus-client (``pip install 'kvtier[metrics]'``).
  ``kvbm_metrics_host``
      the address to listen on, default ``127.0.0.1`` (``0.0.0.0``: every interface).

  It exports the block manager's ``kvbm_*`` metrics (:mod:`kvbm.metrics`: hits and misses per
  tier, pages and bytes moved, latency, corrupt pages, skipped offloads, queue depths) and
  the connector's ``kvbm_connector_<name>``: every :class:`ConnectorCounters` field, the
  workers' ``copied_blocks``, ``copied_bytes``, ``copy_failures``, the histogram
  ``kvbm_connector_copy_seconds{direction}``, and the gauges ``pending_loads`` and
  ``inflight_plans``; with disaggregated prefill/decode every ``pd_*`` counter, the gauge
  ``pd_held_requests`` and the histogram ``kvbm_connector_pd_handoff_seconds``. It stops
  when the connector shuts down.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    PromMetric,
    PromMetricT,
)

from kvbm.errors import ConfigError
from kvbm.integrations.vllm.stats import (
    TIMES,
    ConnectorCounters,
    MetricKind,
    SchedulerMeter,
    counter_rows,
    metric_specs,
)

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from kvbm.manager import BlockManager
    from kvbm.metrics import MetricsServer
    from kvbm.offload import LatencyHistogram

log = logging.getLogger(__name__)

PREFIX = "vllm:kvbm_"
#: Seconds per plan of a G1<->G2 copy: from a few pages in host memory to a large prefix.
COPY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                0.25, 0.5, 1.0, 2.5)
#: Seconds of one prefill/decode handoff: a few blocks on one host to a long prompt across
#: hosts, up to the default transfer timeout.
HANDOFF_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0, 60.0)
_BUCKETS = {"pd_handoff": HANDOFF_BUCKETS}
#: The workers' counters kvbm's own endpoint exports (the scheduler's are ConnectorCounters),
#: besides the prefill/decode ones (every ``pd_*`` counter of metric_specs).
WORKER_COUNTERS = ("copied_blocks", "copied_bytes", "copy_failures")
#: Gauges of the connector itself on kvbm's endpoint (the manager's are in kvbm.metrics).
CONNECTOR_GAUGES = ("pending_loads", "inflight_plans", "pd_held_requests")
#: The histograms of seconds per G1<->G2 plan (the rest of TIMES have their own).
COPY_TIMES = ("load", "save")


class KvbmPromMetrics(KVConnectorPromMetrics):
    """kvbm's metrics in vLLM's Prometheus registry (see the module docstring)."""

    def __init__(self, vllm_config: Any, metric_types: dict[type[PromMetric], type[PromMetricT]],
                 labelnames: list[str], per_engine_labelvalues: dict[int, list[object]]
                 ) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self.specs = metric_specs()
        # vLLM's classes (its own wrappers under Ray); typed loosely by vLLM
        counter_cls: Any = self._counter_cls
        gauge_cls: Any = self._gauge_cls
        histogram_cls: Any = self._histogram_cls
        self._metrics: dict[str, Any] = {}
        for name, spec in self.specs.items():
            names = list(labelnames) + list(spec.labels)
            if spec.kind is MetricKind.COUNTER:
                self._metrics[name] = counter_cls(
                    name=PREFIX + name, documentation=spec.doc, labelnames=names)
            else:
                # vLLM's front ends may run several processes: a gauge is the latest value
                self._metrics[name] = gauge_cls(
                    name=PREFIX + name, documentation=spec.doc, labelnames=names,
                    multiprocess_mode="mostrecent")
        self._times = {d: histogram_cls(name=f"{PREFIX}{d}_time_seconds", documentation=doc,
                                        labelnames=list(labelnames),
                                        buckets=list(_BUCKETS.get(d, COPY_BUCKETS)))
                       for d, doc in TIMES.items()}
        self._children: dict[tuple[int, str, str], Any] = {}

    def _child(self, engine_idx: int, name: str, key: str) -> Any:
        child = self._children.get((engine_idx, name, key))
        if child is None:
            spec = self.specs.get(name)
            extra = key.split(",") if key else []
            if name in self._metrics:
                assert spec is not None
                if len(extra) != len(spec.labels):
                    return None
                metric = self._metrics[name]
            elif name in self._times and not extra:
                metric = self._times[name]
            else:
                return None
            values = [str(v) for v in self.per_engine_labelvalues[engine_idx]] + extra
            child = self._children[(engine_idx, name, key)] = metric.labels(*values)
        return child

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        """Record one step's stats data (vLLM calls it with the aggregated payload). A name
        or label it does not know is skipped: a malformed payload never raises into vLLM."""
        from kvbm.integrations.vllm.stats import KvbmConnectorStats

        data = KvbmConnectorStats(data=dict(transfer_stats_data or {})).data
        for section in ("counters", "gauges"):
            for name, row in data[section].items():
                spec = self.specs.get(name)
                if spec is None or (spec.kind is MetricKind.COUNTER) != (section == "counters"):
                    log.debug("kvbm: unknown %s %r in connector stats skipped", section, name)
                    continue
                for key, v in row.items():
                    child = self._child(engine_idx, name, key)
                    if child is None:
                        continue
                    if section == "gauges":
                        child.set(v)
                    elif v > 0:
                        child.inc(v)
        for d, t in data["times"].items():
            child = self._child(engine_idx, d, "")
            if child is not None:
                for s in t["samples"]:
                    child.observe(max(0.0, s))


def metrics_endpoint(extra: Mapping[str, Any]) -> tuple[str, int] | None:
    """``(host, port)`` of kvbm's own endpoint from ``kv_connector_extra_config``, or None
    when it names no ``kvbm_metrics_port``. :class:`~kvbm.errors.ConfigError` when a value is
    not of its kind."""
    if not isinstance(extra, Mapping):
        raise ConfigError(f"kv_connector_extra_config must be a mapping, got {extra!r}")
    port, host = extra.get("kvbm_metrics_port"), extra.get("kvbm_metrics_host")
    if host is not None and (not isinstance(host, str) or not host or "\0" in host):
        raise ConfigError(f"kvbm_metrics_host must be a host name or address, got {host!r}")
    if port is None:
        if host is not None:
            raise ConfigError("kvbm_metrics_host is set but kvbm_metrics_port is not: give "
                              "the port to serve kvbm's metrics on (0: any free one)")
        return None
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ConfigError(f"kvbm_metrics_port must be an int in [0, 65535], got {port!r}")
    return (host or "127.0.0.1", port)


class ConnectorCollector:
    """The connector's ``kvbm_connector_*`` metrics, read at scrape time."""

    def __init__(self, counters: ConnectorCounters, meter: SchedulerMeter) -> None:
        self._counters = counters
        self._meter = meter

    def describe(self) -> Iterator[Metric]:
        return self.collect()

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )
        specs = metric_specs()
        worker, times, gauges = self._meter.totals()
        names = [f.name for f in dataclasses.fields(ConnectorCounters)] + list(WORKER_COUNTERS)
        names += [n for n, s in specs.items()
                  if n.startswith("pd_") and s.kind is MetricKind.COUNTER]
        families = {n: CounterMetricFamily(f"kvbm_connector_{n}", specs[n].doc,
                                           labels=list(specs[n].labels)) for n in names}
        rows = counter_rows(self._counters)
        rows.update(worker)
        for (name, key), v in sorted(rows.items()):
            fam = families.get(name)
            if fam is not None:
                fam.add_metric(key.split(",") if key else [], v)
        yield from families.values()
        for name in CONNECTOR_GAUGES:
            yield GaugeMetricFamily(f"kvbm_connector_{name}", specs[name].doc,
                                    value=gauges.get((name, ""), 0))
        hist = HistogramMetricFamily("kvbm_connector_copy_seconds",
                                     "seconds a worker spent on one plan of G1<->G2 copies",
                                     labels=["direction"])
        for d in COPY_TIMES:
            hist.add_metric([d], *_buckets(times[d]))
        yield hist
        handoff = HistogramMetricFamily("kvbm_connector_pd_handoff_seconds", TIMES["pd_handoff"])
        handoff.add_metric([], *_buckets(times["pd_handoff"]))
        yield handoff


def _buckets(h: LatencyHistogram) -> tuple[list[tuple[str, float]], float]:
    out = [(repr(float(b)), float(c)) for b, c in zip(h.bounds, h.buckets, strict=True)]
    out.append(("+Inf", float(h.count)))
    return out, h.sum_seconds


def serve_metrics(manager: BlockManager, counters: ConnectorCounters, meter: SchedulerMeter,
                  host: str, port: int) -> MetricsServer:
    """kvbm's own endpoint for a connector's scheduler side (see the module docstring)."""
    from kvbm.metrics import _prometheus, start_metrics_server

    pc = _prometheus()
    registry = pc.CollectorRegistry()
    registry.register(ConnectorCollector(counters, meter))
    return start_metrics_server(manager, port, host, registry=registry)


"""Prometheus metrics of a :class:`~kvbm.manager.BlockManager` (extra ``kvtier[metrics]``).

The numbers are read from :meth:`BlockManager.stats` when Prometheus scrapes, by a custom
collector: nothing is added to the engine's hot path. An engine that already exports
metrics registers the collector in its own registry::

    from prometheus_client import REGISTRY
    KvbmCollector(mgr, registry=REGISTRY)

otherwise kvbm serves them itself::

    with start_metrics_server(mgr, 9400) as srv:   # http://127.0.0.1:9400/metrics
        ...

Metric names start with ``kvbm_``; the tier is the ``medium`` label, with the wire names
of events (GPU, CPU_PINNED, DISK, OBJECT). ``kvbm_tier_info`` says what backs a tier
(G1's torch device, whether G2 is pinned) and its human name. prometheus-client is
imported only when a collector or server is made, so this module imports without it.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Iterator
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from kvbm.errors import ClosedError, InvalidArgumentError, MetricsError, MissingDependencyError
from kvbm.medium import Medium, display_name

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import CollectorRegistry

    from kvbm.manager import BlockManager
    from kvbm.reports import ManagerStats

log = logging.getLogger(__name__)

#: breaker state gauge: 0 closed, 1 half-open, 2 open (TierStats.extra["breaker_state"])
BREAKER_STATES = ("closed", "half_open", "open")


def _prometheus() -> Any:
    try:
        import prometheus_client
    except ImportError as e:
        raise MissingDependencyError("kvbm metrics need prometheus-client: "
                                     "pip install 'kvtier[metrics]'") from e
    return prometheus_client


def _check_manager(manager: Any) -> BlockManager:
    from kvbm.manager import BlockManager

    if not isinstance(manager, BlockManager):
        raise InvalidArgumentError(f"manager must be a BlockManager, got "
                                   f"{type(manager).__name__}")
    return manager


def _tier_labels(manager: BlockManager) -> dict[Medium, dict[str, str]]:
    """Per configured tier, the labels saying what backs it (read once: they never change)."""
    cfg = manager.config
    out: dict[Medium, dict[str, str]] = {}
    if cfg.device is not None:  # none: the engine owns G1 (vLLM), kvbm has no device tier
        out[Medium.GPU] = {"device": str(manager.device_pool.device)}
    host = manager.host_pool
    if host is not None:
        out[Medium.CPU_PINNED] = {"pinned": "true" if host.pinned else "false"}
    if cfg.disk is not None:
        out[Medium.DISK] = {}
    if cfg.s3 is not None or cfg.gcs is not None:
        out[Medium.OBJECT] = {}
    for m, labels in out.items():
        labels["display"] = display_name(m, cpu_tensor=labels.get("device") == "cpu",
                                         pinned=labels.get("pinned") != "false")
    return out


def tier_display_names(manager: BlockManager) -> dict[Medium, str]:
    """The human name of each configured tier of ``manager`` (see
    :func:`kvbm.medium.display_name`), fastest first."""
    return {m: labels["display"] for m, labels in _tier_labels(_check_manager(manager)).items()}


class KvbmCollector:
    """A Prometheus collector reading a manager's stats at scrape time.

    Safe to scrape from any thread (it takes the snapshot without completing transfers,
    which only the owner thread may do) and after the manager is closed (the last numbers
    it read). ``registry``: register into it now.
    """

    def __init__(self, manager: BlockManager, *,
                 registry: CollectorRegistry | None = None) -> None:
        pc = _prometheus()
        self._mgr = _check_manager(manager)
        if registry is not None and not isinstance(registry, pc.CollectorRegistry):
            raise InvalidArgumentError(f"registry must be a prometheus_client "
                                       f"CollectorRegistry, got {type(registry).__name__}")
        self._page_bytes = manager.layout.bytes_per_block
        self._tiers = _tier_labels(manager)
        self._last: ManagerStats | None = None
        if registry is not None:
            try:
                registry.register(self)
            except ValueError as e:  # prometheus_client: "Duplicated timeseries ..."
                raise InvalidArgumentError(
                    f"this registry already has kvbm's metrics (a second collector would "
                    f"expose every family twice, which a scrape refuses): {e}; use one "
                    f"registry per manager") from None

    def describe(self) -> Iterator[Metric]:
        """The families :meth:`collect` returns: a registry learns their names from this
        and refuses a second kvbm collector, whose series would clash."""
        return self.collect()

    def _snapshot(self) -> ManagerStats | None:
        with contextlib.suppress(ClosedError):  # then serve the last numbers read
            self._last = self._mgr.stats(drain=False)
        return self._last

    def collect(self) -> Iterator[Metric]:
        st = self._snapshot()
        if st is None:
            return
        yield from _families(st, self._tiers, self._page_bytes)


def _families(st: ManagerStats, tiers: dict[Medium, dict[str, str]],
              page_bytes: int) -> list[Metric]:
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        Metric,
    )
    out: list[Metric] = []

    def counter(name: str, doc: str, value: float) -> None:
        out.append(CounterMetricFamily(name, doc, value=value))

    def gauge(name: str, doc: str, value: float) -> None:
        out.append(GaugeMetricFamily(name, doc, value=value))

    def per_medium(family: Any, name: str, doc: str, values: dict[Medium, float]) -> None:
        f = family(name, doc, labels=["medium"])
        for m, v in values.items():
            f.add_metric([m.value], v)
        out.append(f)

    counter("kvbm_lookups", "prefix lookups (match_prefix calls)", st.lookups)
    counter("kvbm_query_blocks", "full blocks asked for by lookups", st.query_blocks)
    counter("kvbm_miss_blocks", "blocks asked for and cached in no tier",
            st.query_blocks - st.hit_blocks)
    per_medium(CounterMetricFamily, "kvbm_hit_blocks",
               "blocks found by lookups, by the fastest tier holding them",
               {m: st.hits_by_medium.get(m, 0) for m in tiers})
    counter("kvbm_committed_blocks", "blocks committed by the engine", st.committed_blocks)
    counter("kvbm_deduplicated_blocks", "commits of blocks already cached",
            st.deduplicated_blocks)
    counter("kvbm_events_dropped", "KV events dropped (the consumer fell behind)",
            st.events_dropped)
    counter("kvbm_staging_misses", "onboards cut short for want of a G2 staging page",
            st.staging_misses)
    gauge("kvbm_indexed_blocks", "blocks in the prefix index", st.indexed_blocks)
    gauge("kvbm_unlinked_pages", "persistent-tier pages whose prefix is not indexed",
          st.unlinked_pages)

    # Pages moved: onboard = up into G1 from the labelled tier; offload = G1 -> G2;
    # store / load = host memory <-> the labelled lower tier.
    moved: list[tuple[Medium, str, int]] = [
        (m, "onboard", n) for m, n in st.onboarded_blocks.items()
        if m in tiers and m is not Medium.GPU]
    if Medium.CPU_PINNED in tiers:
        moved.append((Medium.CPU_PINNED, "offload", st.offloaded_blocks))
    pages = CounterMetricFamily("kvbm_pages_moved", "pages moved between tiers",
                                labels=["medium", "direction"])
    nbytes = CounterMetricFamily("kvbm_bytes_moved", "payload bytes moved between tiers",
                                 labels=["medium", "direction"])
    for m, direction, n in moved:
        pages.add_metric([m.value, direction], n)
        nbytes.add_metric([m.value, direction], n * page_bytes)
    for m, (_, q) in st.lower_tiers.items():
        for direction, n, b in (("store", q.pages_stored, q.bytes_stored),
                                ("load", q.pages_loaded, q.bytes_loaded)):
            pages.add_metric([m.value, direction], n)
            nbytes.add_metric([m.value, direction], b)
    out += [pages, nbytes]

    mem = st.tiers
    for name, doc, attr in (
            ("kvbm_tier_capacity_pages", "pages of an in-memory tier", "capacity_blocks"),
            ("kvbm_tier_used_pages", "pages holding a block (cached or in use)", "used_blocks"),
            ("kvbm_tier_free_pages", "free pages", "free_blocks"),
            ("kvbm_tier_pinned_pages", "pages in use by requests (not evictable)",
             "pinned_blocks"),
            ("kvbm_tier_cached_pages", "committed pages in the index", "cached_blocks")):
        per_medium(GaugeMetricFamily, name, doc, {m: getattr(u, attr) for m, u in mem.items()})
    lower = st.lower_tiers
    evictions: dict[Medium, float] = {m: u.evictions for m, u in mem.items()}
    evictions.update({m: s.evicted for m, (s, _) in lower.items()})
    per_medium(CounterMetricFamily, "kvbm_evictions", "pages evicted to make room", evictions)
    per_medium(CounterMetricFamily, "kvbm_admission_rejected_blocks",
               "blocks the admission policy kept out", {m: u.admission_rejected
                                                        for m, u in mem.items()})
    per_medium(CounterMetricFamily, "kvbm_offload_skipped_blocks",
               "offloads into the tier skipped: every page in use",
               {m: u.offload_skipped for m, u in mem.items()})
    per_medium(CounterMetricFamily, "kvbm_offload_skipped_transfers",
               "offload batches refused by backpressure (pages in flight at the bound)",
               {m: q.skipped for m, (_, q) in lower.items()})
    per_medium(CounterMetricFamily, "kvbm_corrupt_pages_dropped",
               "pages that failed verification and were dropped (served as misses)",
               {m: s.corrupt for m, (s, _) in lower.items()})
    per_medium(CounterMetricFamily, "kvbm_tier_errors", "tier operations that failed",
               {m: s.errors for m, (s, _) in lower.items()})
    per_medium(GaugeMetricFamily, "kvbm_tier_degraded",
               "1 while the tier answers misses because its location failed a check",
               {m: s.degraded for m, (s, _) in lower.items()})
    per_medium(CounterMetricFamily, "kvbm_index_rebuilds",
               "times the tier rebuilt a damaged or missing index at open",
               {m: s.index_rebuilds for m, (s, _) in lower.items()})
    per_medium(CounterMetricFamily, "kvbm_pages_recovered", "pages index rebuilds found again",
               {m: s.pages_recovered for m, (s, _) in lower.items()})
    per_medium(CounterMetricFamily, "kvbm_transfers_failed", "transfer batches the tier raised on",
               {m: q.failed for m, (_, q) in lower.items()})
    reads = CounterMetricFamily("kvbm_tier_read_pages", "page reads of a lower tier",
                                labels=["medium", "result"])
    for m, (s, _) in lower.items():
        reads.add_metric([m.value, "hit"], s.hits)
        reads.add_metric([m.value, "miss"], s.misses)
    out.append(reads)
    per_medium(GaugeMetricFamily, "kvbm_inflight_pages", "pages submitted to the tier, unfinished",
               {m: q.inflight_pages for m, (_, q) in lower.items()})
    per_medium(GaugeMetricFamily, "kvbm_queued_transfers", "transfers waiting in the tier's queue",
               {m: q.queued_transfers for m, (_, q) in lower.items()})
    breakers = {m: _breaker_state(s.extra) for m, (s, _) in lower.items()}
    per_medium(GaugeMetricFamily, "kvbm_breaker_state",
               "circuit breaker: 0 closed, 1 half-open, 2 open",
               {m: v for m, v in breakers.items() if v is not None})
    per_medium(CounterMetricFamily, "kvbm_breaker_opens", "times the circuit breaker opened",
               {m: s.extra["breaker_opens"] for m, (s, _) in lower.items()
                if "breaker_opens" in s.extra})

    lat = HistogramMetricFamily("kvbm_transfer_latency_seconds",
                                "seconds from submit to finish of transfers that ran",
                                labels=["medium", "direction"])
    for m, (_, q) in lower.items():
        for direction, h in (("store", q.store_latency), ("load", q.load_latency)):
            buckets = [(repr(float(b)), float(c))
                       for b, c in zip(h.bounds, h.buckets, strict=True)]
            buckets.append(("+Inf", float(h.count)))
            lat.add_metric([m.value, direction], buckets, h.sum_seconds)
    out.append(lat)

    info = Metric("kvbm_tier", "what backs each tier, and its name in human output", "info")
    for m, labels in tiers.items():
        info.add_sample("kvbm_tier_info", {"medium": m.value, **labels}, 1.0)
    out.append(info)
    return out


def _breaker_state(extra: dict[str, int]) -> int | None:
    extra = dict(extra)  # a tier thread may add keys meanwhile
    if "breaker_state" in extra:
        return extra["breaker_state"]
    if "breaker_open" in extra:
        return 2 * extra["breaker_open"]
    return None


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a hung scraper must not keep the process alive


class _Server6(_Server):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        log.debug("metrics %s: " + format, self.address_string(), *args)


class MetricsServer:
    """The HTTP endpoint of :func:`start_metrics_server`; ``close()`` stops it."""

    def __init__(self, httpd: WSGIServer, registry: CollectorRegistry,
                 collector: KvbmCollector) -> None:
        self._httpd = httpd
        self.registry = registry
        self.collector = collector
        self.addr = str(httpd.server_address[0])
        self.port = int(httpd.server_address[1])
        self._thread = threading.Thread(target=httpd.serve_forever, name="kvbm-metrics",
                                        daemon=True)
        self._thread.start()
        self._closed = False

    @property
    def url(self) -> str:
        host = f"[{self.addr}]" if ":" in self.addr else self.addr
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving and unregister the collector. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()
        self.registry.unregister(self.collector)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_metrics_server(manager: BlockManager, port: int, addr: str = "127.0.0.1",
                         registry: CollectorRegistry | None = None) -> MetricsServer:
    """Serve the manager's metrics over HTTP (``GET /metrics``) on a daemon thread.

    ``port`` 0 picks a free one (see ``.port``). ``registry``: serve this registry (the
    engine's own metrics too) with kvbm's collector added; default: a fresh one. Listens on
    loopback by default: pass ``addr="0.0.0.0"`` to be scraped from other machines.
    """
    if type(port) is not int or not 0 <= port <= 65535:
        raise InvalidArgumentError(f"port must be an int in [0, 65535], got {port!r}")
    if not isinstance(addr, str) or not addr:
        raise InvalidArgumentError(f"addr must be a host name or address, got {addr!r}")
    pc = _prometheus()
    _check_manager(manager)
    reg = registry if registry is not None else pc.CollectorRegistry()
    collector = KvbmCollector(manager, registry=reg)
    try:
        httpd = make_server(addr, port, pc.make_wsgi_app(reg),
                            server_class=_Server6 if ":" in addr else _Server,
                            handler_class=_QuietHandler)
    except OSError as e:
        reg.unregister(collector)
        raise MetricsError(f"cannot serve metrics on {addr}:{port}: {e}") from e
    except (TypeError, ValueError) as e:  # a NUL or a lone surrogate: no host name form
        reg.unregister(collector)
        raise InvalidArgumentError(f"addr {addr!r} is not a host name or address: {e}") from None
    srv = MetricsServer(httpd, reg, collector)
    log.info("serving kvbm metrics on %s", srv.url)
    return srv

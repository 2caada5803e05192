"""Stats as plain data, transfer latency histograms, the Prometheus collector and its HTTP
endpoint, and the human tier labels."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
import urllib.error
import urllib.request

import pytest
from engine_flow import LAYOUT, run, toks

from kvbm import BlockManager, DeviceTierConfig, HostTierConfig, ManagerStats, Medium, TierUsage
from kvbm.config import ManagerConfig
from kvbm.errors import InvalidArgumentError, MissingDependencyError
from kvbm.medium import display_name
from kvbm.offload import LATENCY_BUCKETS, LatencyHistogram, TierQueueStats
from kvbm.storage.disk import DiskTierConfig


def settle(mgr: BlockManager) -> None:
    """Wait (public API only) until no page is in flight to a lower tier."""
    deadline = time.monotonic() + 30
    while any(q.inflight_pages for _, q in mgr.stats().lower_tiers.values()):
        assert time.monotonic() < deadline, "offloads did not finish"
        time.sleep(0.01)


def tiered(tmp_path) -> BlockManager:
    disk = DiskTierConfig(tmp_path / "g3", capacity_bytes=1 << 22, slab_bytes=1 << 20)
    return BlockManager(LAYOUT, ManagerConfig(device=DeviceTierConfig(4, device="cpu"),
                                              host=HostTierConfig(8), disk=disk))


def disk_round_trip(mgr: BlockManager) -> None:
    """Push a 3-block prefix down to disk, then serve it from there."""
    run(mgr, toks(3))
    for i in range(1, 6):
        run(mgr, toks(3, 1000 * i))
        settle(mgr)
    m = mgr.match_prefix(toks(3))
    assert m.by_medium.get(Medium.DISK) == 3
    mgr.release(mgr.onboard(m))


# -- plain data ---------------------------------------------------------------------------------
def test_stats_to_dict_is_json_and_matches(tmp_path):
    with tiered(tmp_path) as mgr:
        disk_round_trip(mgr)
        st = mgr.stats()
    d = st.to_dict()
    back = json.loads(json.dumps(d))
    assert back == d  # nothing but plain JSON types inside
    for f in dataclasses.fields(ManagerStats):  # fields added later are covered too
        assert f.name in d
    assert d["lookups"] == st.lookups and d["hit_blocks"] == st.hit_blocks
    assert d["hit_ratio"] == st.hit_ratio
    assert d["hits_by_medium"]["DISK"] == st.hits_by_medium[Medium.DISK] == 3
    assert d["onboarded_blocks"]["DISK"] == 3
    assert set(d["tiers"]) == {"GPU", "CPU_PINNED"}
    g1 = d["tiers"]["GPU"]
    assert g1["medium"] == "GPU"
    assert g1["capacity_blocks"] == st.tiers[Medium.GPU].capacity_blocks == 4
    assert g1 == st.tiers[Medium.GPU].to_dict()
    store, queue = st.lower_tiers[Medium.DISK]
    disk = d["lower_tiers"]["DISK"]
    assert disk["store"]["puts"] == store.puts > 0
    assert disk["store"]["hits"] == store.hits == 3
    assert disk["queue"]["pages_stored"] == queue.pages_stored > 0
    assert disk["queue"]["load_latency"]["count"] == queue.load_latency.count >= 1
    assert disk["queue"]["load_latency"]["bounds"] == list(LATENCY_BUCKETS)


def test_tier_usage_to_dict_names_the_medium():
    u = TierUsage(Medium.CPU_PINNED, 8, 3, 5, 1, 2, 0, 0, 0)
    d = u.to_dict()
    assert d["medium"] == "CPU_PINNED" and d["free_blocks"] == 5
    json.dumps(d)


# -- latency histograms -------------------------------------------------------------------------
def test_latency_histogram_is_cumulative_with_inclusive_bounds():
    h = LatencyHistogram()
    b = h.bounds
    for s in (b[0], b[0] / 2, b[1] * 0.99, b[-1] * 10):  # a bound itself counts in its bucket
        h.observe(s)
    assert h.count == 4
    assert h.buckets[0] == 2 and h.buckets[1] == 3 and h.buckets[-1] == 3
    assert all(x <= y for x, y in zip(h.buckets, h.buckets[1:], strict=False))
    assert h.sum_seconds == pytest.approx(b[0] * 1.5 + b[1] * 0.99 + b[-1] * 10)
    c = h.copy()
    h.observe(0.0)
    assert c.count == 4 and c.buckets[0] == 2  # a copy is a snapshot


def test_transfer_latency_recorded_per_kind(tmp_path):
    with tiered(tmp_path) as mgr:
        disk_round_trip(mgr)
        q = mgr.stats().lower_tiers[Medium.DISK][1]
        assert isinstance(q, TierQueueStats)
        assert q.store_latency.count >= 1 and q.load_latency.count >= 1
        assert q.pages_loaded == 3 and q.bytes_loaded == 3 * LAYOUT.bytes_per_block
        assert q.bytes_stored == q.pages_stored * LAYOUT.bytes_per_block
        for h in (q.store_latency, q.load_latency):
            assert h.buckets[-1] <= h.count and h.sum_seconds >= 0
        # stats are snapshots: later transfers do not change one already taken
        before = q.load_latency.count
        run(mgr, toks(3, 50_000))
        assert q.load_latency.count == before


# -- tier labels ----------------------------------------------------------------------------------
def test_display_name_says_what_the_hardware_is():
    assert display_name(Medium.GPU, cpu_tensor=True) == "GPU (CPU tensor)"
    assert display_name(Medium.GPU, cpu_tensor=False) == "GPU"
    assert display_name(Medium.CPU_PINNED, pinned=False) == "CPU_PINNED (not pinned)"
    assert display_name(Medium.CPU_PINNED, pinned=True) == "CPU_PINNED"
    assert display_name(Medium.DISK, cpu_tensor=True, pinned=False) == "DISK"


def test_tier_display_names_of_a_cpu_manager(tmp_path):
    from kvbm.metrics import tier_display_names

    with tiered(tmp_path) as mgr:
        names = tier_display_names(mgr)
        pinned = mgr.host_pool is not None and mgr.host_pool.pinned
    assert names[Medium.GPU] == "GPU (CPU tensor)"  # device="cpu"
    assert names[Medium.CPU_PINNED] == ("CPU_PINNED" if pinned else "CPU_PINNED (not pinned)")
    assert names[Medium.DISK] == "DISK"


def test_demo_hit_table_uses_display_names(tmp_path):
    from kvbm.lab.demo import _hit_table

    with tiered(tmp_path) as mgr:
        run(mgr, toks(2))
        run(mgr, toks(2))
        table = _hit_table(mgr)
    assert "GPU (CPU tensor)" in table


# -- Prometheus collector -------------------------------------------------------------------------
prometheus_client = pytest.importorskip("prometheus_client")


def sample(reg, name: str, **labels: str) -> float:
    v = reg.get_sample_value(name, labels)
    assert v is not None, f"{name}{labels} not exposed"
    return float(v)


def test_collector_counts_follow_the_manager(tmp_path):
    from kvbm.metrics import KvbmCollector

    reg = prometheus_client.CollectorRegistry()
    with tiered(tmp_path) as mgr:
        KvbmCollector(mgr, registry=reg)
        assert sample(reg, "kvbm_lookups_total") == 0
        assert sample(reg, "kvbm_hit_blocks_total", medium="DISK") == 0
        disk_round_trip(mgr)
        st = mgr.stats()
        assert sample(reg, "kvbm_lookups_total") == st.lookups > 0
        assert sample(reg, "kvbm_query_blocks_total") == st.query_blocks
        assert sample(reg, "kvbm_miss_blocks_total") == st.query_blocks - st.hit_blocks
        assert sample(reg, "kvbm_hit_blocks_total", medium="DISK") == 3
        assert sample(reg, "kvbm_hit_blocks_total", medium="GPU") == st.hits_by_medium[Medium.GPU]
        stored = sample(reg, "kvbm_pages_moved_total", medium="DISK", direction="store")
        assert stored == st.lower_tiers[Medium.DISK][1].pages_stored > 0
        assert sample(reg, "kvbm_bytes_moved_total", medium="DISK", direction="store") == (
            stored * LAYOUT.bytes_per_block)
        assert sample(reg, "kvbm_pages_moved_total", medium="DISK", direction="onboard") == 3
        assert sample(reg, "kvbm_pages_moved_total", medium="DISK", direction="load") == 3
        assert sample(reg, "kvbm_pages_moved_total", medium="CPU_PINNED",
                      direction="offload") == st.offloaded_blocks
        assert sample(reg, "kvbm_tier_capacity_pages", medium="GPU") == 4
        assert sample(reg, "kvbm_tier_used_pages", medium="CPU_PINNED") == (
            st.tiers[Medium.CPU_PINNED].used_blocks)
        assert sample(reg, "kvbm_evictions_total", medium="GPU") == st.tiers[Medium.GPU].evictions
        assert sample(reg, "kvbm_corrupt_pages_dropped_total", medium="DISK") == 0
        assert sample(reg, "kvbm_inflight_pages", medium="DISK") == 0
        assert sample(reg, "kvbm_offload_skipped_transfers_total", medium="DISK") == (
            st.lower_tiers[Medium.DISK][1].skipped)
        n = sample(reg, "kvbm_transfer_latency_seconds_count", medium="DISK", direction="load")
        assert n == st.lower_tiers[Medium.DISK][1].load_latency.count >= 1
        assert sample(reg, "kvbm_transfer_latency_seconds_bucket", medium="DISK",
                      direction="load", le="+Inf") == n
        assert sample(reg, "kvbm_tier_info", medium="GPU", device="cpu",
                      display="GPU (CPU tensor)") == 1
        assert sample(reg, "kvbm_tier_info", medium="DISK", display="DISK") == 1


def test_collector_does_not_raise_after_close(tmp_path):
    from kvbm.metrics import KvbmCollector

    reg = prometheus_client.CollectorRegistry()
    mgr = tiered(tmp_path)
    KvbmCollector(mgr, registry=reg)
    run(mgr, toks(2))
    mgr.close()
    text = prometheus_client.generate_latest(reg).decode()
    assert "kvbm_lookups_total 1.0" in text
    mgr.close()
    prometheus_client.generate_latest(reg)


def test_collector_argument_checks(tmp_path):
    from kvbm.metrics import KvbmCollector, start_metrics_server

    with pytest.raises(InvalidArgumentError):
        KvbmCollector(object())  # type: ignore[arg-type]
    with tiered(tmp_path) as mgr:
        with pytest.raises(InvalidArgumentError):
            KvbmCollector(mgr, registry="not a registry")  # type: ignore[arg-type]
        for port in (-1, 65536, True, 8080.0, "8080"):
            with pytest.raises(InvalidArgumentError):
                start_metrics_server(mgr, port)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgumentError):
            start_metrics_server(mgr, 0, addr="")


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.status == 200
        return str(r.read().decode())


def value_in(text: str, line_prefix: str) -> float:
    for line in text.splitlines():
        if line.startswith(line_prefix + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{line_prefix} not in the exposition")


def test_metrics_server_serves_live_counts(tmp_path):
    from kvbm.metrics import start_metrics_server

    with tiered(tmp_path) as mgr:
        with start_metrics_server(mgr, 0) as srv:
            assert srv.port > 0 and srv.url == f"http://127.0.0.1:{srv.port}/metrics"
            first = scrape(srv.url)
            assert value_in(first, "kvbm_lookups_total") == 0
            run(mgr, toks(2))
            run(mgr, toks(2))
            second = scrape(srv.url)
            assert value_in(second, "kvbm_lookups_total") == 2
            assert value_in(second, 'kvbm_hit_blocks_total{medium="GPU"}') == 2
        with pytest.raises(urllib.error.URLError):
            scrape(srv.url)  # closed: nothing listens any more
        srv.close()  # idempotent


def test_metrics_server_in_the_engines_registry(tmp_path):
    from kvbm.metrics import start_metrics_server

    reg = prometheus_client.CollectorRegistry()
    own = prometheus_client.Counter("engine_requests", "the engine's own metric", registry=reg)
    own.inc(5)
    with tiered(tmp_path) as mgr, start_metrics_server(mgr, 0, registry=reg) as srv:
        text = scrape(srv.url)
    assert value_in(text, "engine_requests_total") == 5
    assert value_in(text, "kvbm_lookups_total") == 0


def test_without_prometheus_client_a_clear_error(tmp_path, monkeypatch):
    import kvbm.metrics

    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # as if not installed
    with tiered(tmp_path) as mgr:
        with pytest.raises(MissingDependencyError, match=r"kvtier\[metrics\]"):
            kvbm.metrics.KvbmCollector(mgr)
        with pytest.raises(MissingDependencyError):
            kvbm.metrics.start_metrics_server(mgr, 0)


def test_closed_error_is_not_what_a_scrape_sees(tmp_path):
    """A scrape racing a close gets the last numbers, not an error page."""
    from kvbm.metrics import start_metrics_server

    mgr = tiered(tmp_path)
    with start_metrics_server(mgr, 0) as srv:
        run(mgr, toks(2))
        mgr.close()
        text = scrape(srv.url)
    assert value_in(text, "kvbm_lookups_total") == 1


def test_breaker_state_of_an_unreachable_object_tier(tmp_path, aws_test_env):
    """Nothing listens on the endpoint: requests fail, the breaker opens, the gauge says 2
    (or 1 once the cool-down has passed: half-open, the next call is a probe)."""
    pytest.importorskip("boto3")
    import socket

    from kvbm.metrics import KvbmCollector
    from kvbm.storage.resilience import BreakerConfig, RetryPolicy
    from kvbm.storage.s3 import S3TierConfig

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again at once: connections are refused
    s3 = S3TierConfig(bucket="b", endpoint_url=f"http://127.0.0.1:{port}",
                      index_path=str(tmp_path / "idx"), start_degraded=True,
                      connect_timeout_s=0.5, read_timeout_s=0.5,
                      retry=RetryPolicy(max_attempts=1),
                      breaker=BreakerConfig(failure_threshold=1, cooldown_s=0.3,
                                            max_cooldown_s=0.3))
    cfg = ManagerConfig(device=DeviceTierConfig(4, device="cpu"), host=HostTierConfig(8), s3=s3)
    reg = prometheus_client.CollectorRegistry()
    with BlockManager(LAYOUT, cfg) as mgr:
        KvbmCollector(mgr, registry=reg)
        run(mgr, toks(2))
        settle(mgr)
        assert sample(reg, "kvbm_breaker_opens_total", medium="OBJECT") >= 1
        assert sample(reg, "kvbm_breaker_state", medium="OBJECT") in (1, 2)
        time.sleep(0.35)  # past the cool-down: the next look finds it half-open
        assert sample(reg, "kvbm_breaker_state", medium="OBJECT") == 1
        assert sample(reg, "kvbm_tier_info", medium="OBJECT", display="OBJECT") == 1
        assert sample(reg, "kvbm_tier_degraded", medium="OBJECT") == 1  # start_degraded


def test_breaker_state_of_a_healthy_object_tier(tmp_path, s3_bucket, moto_endpoint):
    from kvbm.metrics import KvbmCollector
    from kvbm.storage.s3 import S3TierConfig

    s3 = S3TierConfig(bucket=s3_bucket, endpoint_url=moto_endpoint, prefix="metrics/",
                      index_path=str(tmp_path / "idx"))
    cfg = ManagerConfig(device=DeviceTierConfig(4, device="cpu"), host=HostTierConfig(8), s3=s3)
    reg = prometheus_client.CollectorRegistry()
    with BlockManager(LAYOUT, cfg) as mgr:
        KvbmCollector(mgr, registry=reg)
        run(mgr, toks(2))
        settle(mgr)
        assert sample(reg, "kvbm_breaker_state", medium="OBJECT") == 0
        assert sample(reg, "kvbm_tier_degraded", medium="OBJECT") == 0
        assert sample(reg, "kvbm_pages_moved_total", medium="OBJECT", direction="store") == 2

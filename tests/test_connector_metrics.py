"""The vLLM connector's metrics without a vLLM engine: the per-step stats the workers and the
scheduler side hand vLLM (KvbmConnectorStats: aggregate, reduce, empty), their Prometheus
metrics in a fresh registry through vLLM's own classes, and kvbm's own endpoint scraped over
HTTP on 127.0.0.1. The two sides run in this process over small fake KV tensors (see
test_connector_sides)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("vllm")
prometheus_client = pytest.importorskip("prometheus_client")

from test_connector_sides import (  # noqa: E402
    BS,
    MHA,
    MLA,
    Engine,
    LocalRank,
    Req,
    save_prompt,
    settings,
    toks,
)

from kvbm import BlockManager  # noqa: E402
from kvbm.config import HostTierConfig, ManagerConfig  # noqa: E402
from kvbm.errors import ConfigError, MetricsError  # noqa: E402
from kvbm.integrations.vllm import KvbmConnector  # noqa: E402
from kvbm.integrations.vllm.prom import KvbmPromMetrics, metrics_endpoint  # noqa: E402
from kvbm.integrations.vllm.scheduler import SchedulerSide  # noqa: E402
from kvbm.integrations.vllm.stats import (  # noqa: E402
    MAX_SAMPLES,
    KvbmConnectorStats,
    metric_specs,
)
from kvbm.layout import KVLayout  # noqa: E402

WAIT_S = 60  # a guard against hangs, not a timing assertion


def worker_stats(eng: Engine) -> KvbmConnectorStats | None:
    """Every rank's stats of the last step, added up as vLLM's output aggregator does (the
    first rank's object is the accumulator)."""
    out: KvbmConnectorStats | None = None
    for r in eng.ranks:
        assert isinstance(r, LocalRank)
        st = r.side.meter.take()
        if st is not None:
            out = st if out is None else out.aggregate(st)  # type: ignore[assignment]
    return out


def counter(st: KvbmConnectorStats | None, name: str, *labels: str) -> float:
    assert st is not None
    return float(st.data["counters"].get(name, {}).get(",".join(labels), 0))


def gauge(st: KvbmConnectorStats | None, name: str, *labels: str) -> float | None:
    assert st is not None
    v = st.data["gauges"].get(name, {}).get(",".join(labels))
    return None if v is None else float(v)


def reload(eng: Engine, tokens: list[int], blocks: list[int], **kw: Any) -> Any:
    """A second request with ``tokens``' 3-block prefix and a new tail: loaded from kvbm."""
    r2 = Req("r2", [*tokens[:3 * BS], *toks(9, 99)])
    assert eng.admit(r2, blocks) == (3 * BS, False)
    return eng.prefill(r2, blocks, 3 * BS, **kw)


# -- the stats payload ----------------------------------------------------------------------
def test_stats_aggregate_reduce_and_round_trip_through_plain_data():
    a, b = KvbmConnectorStats(), KvbmConnectorStats()
    assert a.is_empty() and a.reduce() == {}
    a.add("copied_bytes", 100, ("load",))
    a.add("copied_blocks", 0, ("load",))  # nothing happened: stays empty of it
    a.add("hit_tokens", 32, ("DISK",))
    a.observe_time("load", 0.002)
    b.add("copied_bytes", 50, ("load",))
    b.add("copied_bytes", 7, ("save",))
    b.add("loaded_blocks", 3)
    b.set_gauge("inflight_pages", 4, ("DISK",))
    b.observe_time("load", 0.004)
    b.observe_time("save", 0.001)
    assert a.aggregate(b) is a
    assert counter(a, "copied_bytes", "load") == 150 and counter(a, "copied_bytes", "save") == 7
    assert "copied_blocks" not in a.data["counters"]
    assert gauge(a, "inflight_pages", "DISK") == 4
    r = a.reduce()
    assert r["copied_bytes[load]"] == 150 and r["hit_tokens[DISK]"] == 32
    assert r["loaded_blocks"] == 3 and r["inflight_pages[DISK]"] == 4
    assert r["load_plans"] == 2 and r["load_ms_avg"] == pytest.approx(3.0)
    assert r["load_ms_p90"] == pytest.approx(4.0) and r["save_plans"] == 1
    # through vLLM's serialisers and back: plain data, the same numbers
    payload = json.loads(json.dumps(a.to_dict()))
    back = KvbmConnector.build_kv_connector_stats(payload)
    assert isinstance(back, KvbmConnectorStats) and back.reduce() == r
    # adding into a rebuilt one never changes the payload it came from (vLLM hands one
    # payload to several loggers)
    back.aggregate(b)
    assert payload["counters"]["copied_bytes"]["load"] == 150
    assert payload["times"]["load"]["n"] == 2
    # a gauge alone is news; zero counters are not
    g = KvbmConnectorStats()
    g.set_gauge("pending_loads", 0)
    assert not g.is_empty()
    assert KvbmConnectorStats(data={"counters": {"x": {"": 0}}}).is_empty()


def test_stats_from_garbage_are_dropped_not_raised():
    bad = {"counters": {"a": {"": "x"}, "b": [1], "c": {"": float("nan")}, "d": {"": 2}},
           "gauges": 5, "times": {"load": {"n": "2"}, "save": {"n": 1, "sum": 0.5,
                                                              "samples": "zz"}}}
    st = KvbmConnectorStats(data=bad)
    assert st.data["counters"] == {"a": {}, "c": {}, "d": {"": 2}}
    assert st.data["gauges"] == {} and list(st.data["times"]) == ["save"]
    assert st.reduce() == {"d": 2, "save_plans": 1, "save_ms_avg": 500.0}
    assert KvbmConnectorStats(data="junk").is_empty()  # type: ignore[arg-type]
    empty = KvbmConnectorStats()
    assert empty.aggregate(SimpleNamespace()) is empty  # type: ignore[arg-type]
    assert empty.is_empty()


def test_samples_are_bounded_but_count_and_sum_stay_exact():
    st = KvbmConnectorStats()
    for _ in range(MAX_SAMPLES + 10):
        st.observe_time("save", 0.5)
    other = KvbmConnectorStats()
    other.observe_time("save", 1.5)
    st.aggregate(other)
    t = st.data["times"]["save"]
    assert t["n"] == MAX_SAMPLES + 11 and t["sum"] == pytest.approx(0.5 * (MAX_SAMPLES + 10) + 1.5)
    assert len(t["samples"]) == MAX_SAMPLES and t["samples"][-1] == 1.5


# -- the workers' side ----------------------------------------------------------------------
@pytest.mark.parametrize(("layout", "world"), [(MHA, 1), (MHA, 2), (MLA, 2)],
                         ids=["mha", "mha-tp2", "mla-tp2"])
def test_workers_count_what_each_rank_copies(layout: KVLayout, world: int):
    s = settings(layout, world=world)
    page = layout.bytes_per_block
    with Engine(s) as eng:
        tokens = toks(3 * BS + 7, 31)
        save_prompt(eng, Req("r1", tokens), [0, 1, 2, 3])
        st = worker_stats(eng)
        # MHA: each rank copies its heads of every block, the pages once in all; MLA: rank 0
        # alone writes the whole latent
        writers = 1 if layout is MLA else world
        assert counter(st, "copied_blocks", "save") == 3 * writers
        assert counter(st, "copied_bytes", "save") == 3 * page
        assert st is not None and st.data["times"]["save"]["n"] == world  # a plan per rank
        assert "load" not in st.data["times"]
        assert worker_stats(eng) is None  # taken: nothing since

        reload(eng, tokens, [8, 9, 10, 11])
        st = worker_stats(eng)
        assert counter(st, "copied_blocks", "load") == 3 * world
        # MLA: every rank loads the whole latent
        assert counter(st, "copied_bytes", "load") == 3 * page * (world if layout is MLA else 1)
        assert counter(st, "copy_failures", "load", "mismatch") == 0
        assert st is not None and st.data["times"]["load"]["n"] == world
        assert all(x >= 0 for x in st.data["times"]["load"]["samples"])


def test_a_page_a_worker_refuses_is_a_copy_failure():
    s = settings()
    with Engine(s) as eng:
        tokens = toks(3 * BS + 4, 32)
        hashes = save_prompt(eng, Req("r1", tokens), [0, 1, 2, 3])
        worker_stats(eng)
        slot = eng.sched.mgr.lookup(hashes[1]).g2
        step = reload(eng, tokens, [8, 9, 10, 11],
                      before_workers=lambda: eng.sched.pool.tags.__setitem__((slot, 0), 0))
        assert step.ranks[0].errors == {9}
        st = worker_stats(eng)
        assert counter(st, "copy_failures", "load", "mismatch") == 1
        assert counter(st, "copied_blocks", "load") == 2
        assert counter(st, "copied_bytes", "load") == 2 * MHA.bytes_per_block


# -- the scheduler's side -------------------------------------------------------------------
def test_scheduler_stats_say_what_changed_per_step():
    s = settings(g2=16)
    with Engine(s) as eng:
        sched = eng.sched
        first = sched.take_stats()  # G2's size and emptiness: news once
        assert gauge(first, "tier_capacity_pages", "CPU_PINNED") == 16
        assert gauge(first, "tier_used_pages", "CPU_PINNED") == 0
        assert sched.take_stats() is None  # nothing changed

        tokens = toks(3 * BS + 4, 33)
        save_prompt(eng, Req("r1", tokens), [0, 1, 2, 3])  # cold: 3 blocks asked, missed
        st = sched.take_stats()
        assert counter(st, "query_tokens") == counter(st, "miss_tokens") == 3 * BS
        assert counter(st, "saved_blocks") == 3 and counter(st, "queries") == 1
        assert gauge(st, "tier_used_pages", "CPU_PINNED") == 3
        assert gauge(st, "tier_capacity_pages", "CPU_PINNED") is None  # unchanged: not sent

        reload(eng, tokens, [8, 9, 10, 11])
        st = sched.take_stats()
        assert counter(st, "query_tokens") == 3 * BS and counter(st, "miss_tokens") == 0
        assert counter(st, "hit_tokens", "CPU_PINNED") == 3 * BS
        assert counter(st, "loaded_blocks") == 3 and counter(st, "load_errors") == 0
        assert sched.take_stats() is None
        # the names it sends are all known to the Prometheus side
        specs = metric_specs()
        assert st is not None and set(st.data["counters"]) <= set(specs)


def test_scheduler_stats_show_the_disk_tiers_traffic_and_corrupt_pages(tmp_path):
    s = settings(disk=tmp_path / "g3")
    page = MHA.bytes_per_block
    tokens = toks(3 * BS + 6, 34)
    with Engine(s) as eng:
        hashes = save_prompt(eng, Req("r1", tokens), [0, 1, 2, 3])
        total = KvbmConnectorStats()
        deadline = time.monotonic() + WAIT_S
        while counter(total, "tier_pages", "DISK", "store") < 3:
            assert time.monotonic() < deadline, "the offload to disk did not finish"
            total.aggregate(eng.sched.take_stats() or KvbmConnectorStats())
            time.sleep(0.01)
        assert counter(total, "tier_bytes", "DISK", "store") == 3 * page
        assert counter(total, "tier_transfers", "DISK", "store") >= 1
        pages = [eng.sched.pool.buffer[eng.sched.mgr.lookup(h).g2].numpy().tobytes()
                 for h in hashes[:3]]
    # damage block 1 on disk; a restarted engine stages the prefix from there
    needle = pages[1][len(pages[1]) // 2: len(pages[1]) // 2 + 64]
    for f in (tmp_path / "g3").rglob("*"):
        data = bytearray(f.read_bytes()) if f.is_file() else bytearray()
        i = data.find(needle)
        if i >= 0:
            data[i + 8] ^= 0x5A
            f.write_bytes(bytes(data))
    with Engine(s) as eng:
        eng.sched.take_stats()
        r2 = Req("r2", [*tokens[:3 * BS], *toks(8, 35)])
        assert eng.admit(r2, [8, 9, 10, 11]) == (3 * BS, True)
        total = KvbmConnectorStats()
        deadline = time.monotonic() + WAIT_S
        while not counter(total, "loaded_blocks"):
            assert time.monotonic() < deadline, "the staged load never came"
            eng.step()
            total.aggregate(eng.sched.take_stats() or KvbmConnectorStats())
            time.sleep(0.01)
        assert counter(total, "hit_tokens", "DISK") == 3 * BS
        assert counter(total, "corrupt_pages", "DISK") >= 1
        # block 0 at least (pages read beside the corrupt one may arrive too)
        assert 1 <= counter(total, "tier_pages", "DISK", "load") <= 2
        assert counter(total, "tier_bytes", "DISK", "load") \
            == counter(total, "tier_pages", "DISK", "load") * page
        assert counter(total, "loaded_blocks") == 1 and counter(total, "load_errors") == 2


# -- vLLM's Prometheus ----------------------------------------------------------------------
def fresh_types(reg: Any) -> dict[Any, Any]:
    """vLLM's metric_types, registering into ``reg`` instead of the global registry."""
    from prometheus_client import Counter, Gauge, Histogram

    def bound(cls: Any) -> Any:
        return type(cls.__name__, (cls,), {"__init__": lambda self, *a, **k: cls.__init__(
            self, *a, registry=reg, **k)})

    return {Gauge: bound(Gauge), Counter: bound(Counter), Histogram: bound(Histogram)}


def test_prom_metrics_register_and_observe_in_a_fresh_registry():
    reg = prometheus_client.CollectorRegistry()
    cfg = SimpleNamespace(kv_transfer_config=None)
    prom = KvbmConnector.build_prom_metrics(cfg, fresh_types(reg), ["model_name", "engine"],
                                            {0: ["m", "0"], 1: ["m", "1"]})
    assert isinstance(prom, KvbmPromMetrics)
    names = {m.name for m in reg.collect()}
    for want in ("vllm:kvbm_loaded_blocks", "vllm:kvbm_hit_tokens", "vllm:kvbm_copied_bytes",
                 "vllm:kvbm_corrupt_pages", "vllm:kvbm_skipped_offloads",
                 "vllm:kvbm_inflight_pages", "vllm:kvbm_queued_transfers",
                 "vllm:kvbm_tier_pages", "vllm:kvbm_load_time_seconds",
                 "vllm:kvbm_save_time_seconds", "vllm:kvbm_miss_tokens"):
        assert want in names, want

    st = KvbmConnectorStats()
    st.add("loaded_blocks", 3)
    st.add("hit_tokens", 64, ("DISK",))
    st.add("copy_failures", 1, ("load", "mismatch"))
    st.add("tier_pages", 5, ("DISK", "store"))
    st.set_gauge("inflight_pages", 7, ("DISK",))
    st.observe_time("load", 0.003)
    st.observe_time("load", 0.2)
    st.add("not_a_metric", 9)  # from a newer kvbm: skipped
    st.add("hit_tokens", 1, ("DISK", "extra-label"))  # wrong labels: skipped
    payload = json.loads(json.dumps(st.to_dict()))
    prom.observe(payload, engine_idx=1)
    prom.observe(payload, engine_idx=1)
    st2 = KvbmConnectorStats()
    st2.set_gauge("inflight_pages", 2, ("DISK",))
    prom.observe(st2.to_dict(), engine_idx=1)
    prom.observe({"counters": {"loaded_blocks": {"": -4}}}, engine_idx=0)  # never decreases

    e1 = {"model_name": "m", "engine": "1"}
    get = reg.get_sample_value
    assert get("vllm:kvbm_loaded_blocks_total", e1) == 6
    assert get("vllm:kvbm_hit_tokens_total", {**e1, "medium": "DISK"}) == 128
    assert get("vllm:kvbm_copy_failures_total",
               {**e1, "direction": "load", "reason": "mismatch"}) == 2
    assert get("vllm:kvbm_tier_pages_total", {**e1, "medium": "DISK", "direction": "store"}) == 10
    assert get("vllm:kvbm_inflight_pages", {**e1, "medium": "DISK"}) == 2  # the latest
    assert get("vllm:kvbm_load_time_seconds_count", e1) == 4
    assert get("vllm:kvbm_load_time_seconds_bucket", {**e1, "le": "0.005"}) == 2
    assert get("vllm:kvbm_load_time_seconds_sum", e1) == pytest.approx(0.406)
    assert get("vllm:kvbm_loaded_blocks_total", {"model_name": "m", "engine": "0"}) in (None, 0)
    assert b"vllm:kvbm_loaded_blocks_total" in prometheus_client.generate_latest(reg)


def test_vllms_own_logging_and_prometheus_paths_load_kvbms_classes():
    """vLLM's KVConnectorLogging and KVConnectorProm find the connector by its module path
    and rebuild kvbm's stats from the plain payload, as its front end does."""
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
        KVConnectorLogging,
        KVConnectorProm,
    )

    kv = KVTransferConfig(kv_connector="KvbmConnector",
                          kv_connector_module_path="kvbm.integrations.vllm", kv_role="kv_both")
    logging_ = KVConnectorLogging(kv)
    one, two = KvbmConnectorStats(), KvbmConnectorStats()
    one.add("saved_blocks", 2)
    two.add("saved_blocks", 3)
    two.observe_time("save", 0.01)
    logging_.observe(one.to_dict())
    logging_.observe(two.to_dict())
    lines: list[str] = []
    logging_.log(log_fn=lambda fmt, *a: lines.append(fmt % a))
    assert lines and "saved_blocks=5" in lines[0] and "save_plans=1" in lines[0]

    reg = prometheus_client.CollectorRegistry()
    types = fresh_types(reg)

    class Prom(KVConnectorProm):
        _gauge_cls = types[prometheus_client.Gauge]
        _counter_cls = types[prometheus_client.Counter]
        _histogram_cls = types[prometheus_client.Histogram]

    prom = Prom(SimpleNamespace(kv_transfer_config=kv), ["engine"], {0: ["0"]})
    assert isinstance(prom.prom_metrics, KvbmPromMetrics)
    prom.observe(two.to_dict(), 0)
    assert reg.get_sample_value("vllm:kvbm_saved_blocks_total", {"engine": "0"}) == 3


# -- kvbm's own endpoint --------------------------------------------------------------------
def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.status == 200
        return str(r.read().decode())


def value_in(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{series} not in the exposition")


def test_kvbm_endpoint_serves_a_manager_without_a_device_tier():
    """Inside vLLM, G1 is vLLM's: the manager has no device tier; its metrics still serve."""
    from kvbm.metrics import start_metrics_server

    cfg = ManagerConfig(device=None, host=HostTierConfig(8))
    with BlockManager(MHA, cfg) as mgr, start_metrics_server(mgr, 0) as srv:
        text = scrape(srv.url)
    assert value_in(text, 'kvbm_tier_capacity_pages{medium="CPU_PINNED"}') == 8
    assert 'medium="GPU"' not in text


class MeteredEngine(Engine):
    """The fake engine with kvbm's endpoint on, the workers' stats passed to the scheduler
    side as the connector's update_connector_output does."""

    def __init__(self, s: Any, metrics: tuple[str, int]) -> None:
        self.s = s
        self.sched = SchedulerSide(s, metrics=metrics)
        self.ranks = [LocalRank(s, 0)]

    def step(self, *a: Any, **kw: Any) -> Any:
        out = super().step(*a, **kw)
        st = worker_stats(self)
        if st is not None:
            self.sched.meter.absorb(st)
        return out


def test_kvbm_endpoint_exports_the_connector_over_http():
    s = settings()
    with MeteredEngine(s, ("127.0.0.1", 0)) as eng:
        srv = eng.sched.metrics_server
        assert srv is not None and srv.port > 0
        assert srv.url == f"http://127.0.0.1:{srv.port}/metrics"
        before = scrape(srv.url)
        assert value_in(before, "kvbm_connector_loaded_blocks_total") == 0
        tokens = toks(3 * BS + 4, 36)
        save_prompt(eng, Req("r1", tokens), [0, 1, 2, 3])
        reload(eng, tokens, [8, 9, 10, 11])
        text = scrape(srv.url)
        assert value_in(text, "kvbm_connector_loaded_blocks_total") == 3
        assert value_in(text, "kvbm_connector_saved_blocks_total") == 3
        assert value_in(text, 'kvbm_connector_hit_tokens_total{medium="CPU_PINNED"}') == 3 * BS
        assert value_in(text, "kvbm_connector_miss_tokens_total") == 3 * BS
        assert value_in(text, 'kvbm_connector_copied_bytes_total{direction="save"}') \
            == 3 * MHA.bytes_per_block
        assert value_in(text, 'kvbm_connector_copied_blocks_total{direction="load"}') == 3
        assert value_in(text, 'kvbm_connector_copy_seconds_count{direction="load"}') == 1
        assert value_in(text, "kvbm_connector_pending_loads") == 0
        # and the block manager's own metrics beside them
        assert value_in(text, 'kvbm_hit_blocks_total{medium="CPU_PINNED"}') >= 3
        assert value_in(text, 'kvbm_tier_used_pages{medium="CPU_PINNED"}') == 3
        url = srv.url
    with pytest.raises(urllib.error.URLError):
        scrape(url)  # the connector shut down: nothing listens


def test_kvbm_endpoint_on_a_taken_port_fails_cleanly():
    s = settings()
    with MeteredEngine(s, ("127.0.0.1", 0)) as eng:
        port = eng.sched.metrics_server.port
        with pytest.raises(MetricsError):
            SchedulerSide(s, metrics=("127.0.0.1", port))
        assert scrape(eng.sched.metrics_server.url)  # the first one still serves


def test_metrics_endpoint_from_kv_connector_extra_config():
    assert metrics_endpoint({}) is None
    assert metrics_endpoint({"kvbm": {}}) is None
    assert metrics_endpoint({"kvbm_metrics_port": 0}) == ("127.0.0.1", 0)
    assert metrics_endpoint({"kvbm_metrics_port": 9400, "kvbm_metrics_host": "0.0.0.0"}) \
        == ("0.0.0.0", 9400)
    for bad in ({"kvbm_metrics_port": "9400"}, {"kvbm_metrics_port": True},
                {"kvbm_metrics_port": -1}, {"kvbm_metrics_port": 65536},
                {"kvbm_metrics_port": 9400.0}, {"kvbm_metrics_port": 1, "kvbm_metrics_host": ""},
                {"kvbm_metrics_port": 1, "kvbm_metrics_host": 5},
                {"kvbm_metrics_host": "127.0.0.1"}):
        with pytest.raises(ConfigError):
            metrics_endpoint(bad)
    with pytest.raises(ConfigError):
        metrics_endpoint(["kvbm_metrics_port"])  # type: ignore[arg-type]

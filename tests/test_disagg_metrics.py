"""The prefill/decode handoff's counters (kvbm.integrations.vllm.pd_stats) without vLLM:
the two fake engines of test_disagg_sides over real transport agents on 127.0.0.1, their
stats taken and added up as vLLM does (every rank's, then the scheduler side's, across
steps), then shown through vLLM's Prometheus classes in a fresh registry and kvbm's own
endpoint over HTTP. The real engines' run is in test_vllm_disagg."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest

pytest.importorskip("vllm")
prometheus_client = pytest.importorskip("prometheus_client")

from test_connector_metrics import fresh_types  # noqa: E402
from test_disagg_sides import (  # noqa: E402
    BS,
    CONSUMER,
    PRODUCER,
    SPAWN,
    WAIT_S,
    Engine,
    Req,
    Status,
    _prefill_process,
    decode,
    layout,
    prefill,
    settings,
    toks,
)

from kvbm.integrations.vllm import KvbmConnector  # noqa: E402
from kvbm.integrations.vllm.pd_params import DisaggConfig, PdMode  # noqa: E402
from kvbm.integrations.vllm.pd_stats import PdMeter  # noqa: E402
from kvbm.integrations.vllm.prom import serve_metrics  # noqa: E402
from kvbm.integrations.vllm.stats import KvbmConnectorStats, merged, metric_specs  # noqa: E402


@pytest.fixture
def engines() -> Iterator[Callable[..., Engine]]:
    """Makes fake engines (test_disagg_sides' Engine), closed after the test."""
    made: list[Engine] = []

    def make(*a: Any, **kw: Any) -> Engine:
        made.append(Engine(*a, **kw))
        return made[-1]

    yield make
    for e in made:
        e.close()


def take(e: Engine) -> KvbmConnectorStats | None:
    """One engine's stats of a step as vLLM gets them: the ranks' (their copies and their
    handoffs) added up, then the scheduler side's (the connector's get_kv_connector_stats
    on both roles); the scheduler side keeps the totals for kvbm's endpoint."""
    workers: KvbmConnectorStats | None = None
    for r in e.ranks:
        workers = merged(workers, merged(r.side.meter.take(), r.pd.take_stats()))
    if workers is not None:
        e.sched.meter.absorb(workers)  # (the connector's update_connector_output)
    pd = e.pd.take_stats()
    if pd is not None:
        e.sched.meter.absorb(pd)
    return merged(workers, merged(e.sched.take_stats(), pd))


class Totals:
    """What vLLM's logger adds up over the steps (its KVConnectorLogging)."""

    def __init__(self) -> None:
        self.stats = KvbmConnectorStats()

    def step(self, *engines: Engine) -> None:
        for e in engines:
            st = take(e)
            if st is not None:  # through vLLM's serialisers, as its front end gets it
                self.stats.aggregate(KvbmConnector.build_kv_connector_stats(
                    json.loads(json.dumps(st.to_dict()))))  # type: ignore[arg-type]

    def c(self, name: str, *labels: str) -> float:
        return float(self.stats.data["counters"].get(name, {}).get(",".join(labels), 0))


def until(what: str, rid: str, e: Engine, totals: Totals, *others: Engine) -> None:
    """Engine.until, with ``e``'s stats taken every step as vLLM takes them (``others``
    keep theirs until their own totals take them)."""
    end = time.monotonic() + WAIT_S
    while rid not in (e.sent if what == "sent" else e.recvd):
        assert time.monotonic() < end, f"{rid} never {what}"
        e.step()
        totals.step(e)
        for x in others:
            x.step()
        time.sleep(0.01)
    totals.step(e)  # (it may have been over before the first step here)


# -- the payload -----------------------------------------------------------------------------
def test_pd_stats_add_up_across_ranks_and_steps() -> None:
    ranks = [PdMeter(), PdMeter()]
    for i, m in enumerate(ranks):
        m.add("pd_loads_done", 1, ("tcp",))
        m.add("pd_received_bytes", 1000 * (i + 1), ("tcp",))
        m.add("pd_load_failures", i, ("timeout",))  # rank 0: nothing (kept out)
        m.observe("pd_handoff", 0.01 * (i + 1))
    sched = PdMeter()
    sched.add("pd_loads_started", 1)
    sched.gauge("pd_held_requests", 3)
    step = merged(merged(ranks[0].take(), ranks[1].take()), sched.take())
    assert step is not None
    assert step.data["counters"]["pd_loads_done"] == {"tcp": 2}
    assert step.data["counters"]["pd_received_bytes"] == {"tcp": 3000}
    assert step.data["counters"]["pd_load_failures"] == {"timeout": 1}
    assert step.data["gauges"]["pd_held_requests"] == {"": 3}
    r = step.reduce()
    assert r["pd_loads_done[tcp]"] == 2 and r["pd_loads_started"] == 1
    assert r["pd_handoff_n"] == 2 and r["pd_handoff_ms_avg"] == pytest.approx(15.0)
    # the meters start over; a gauge that did not change is not news, one that did is
    assert ranks[0].take() is None
    sched.gauge("pd_held_requests", 3)
    assert sched.take() is None
    sched.gauge("pd_held_requests", 0)
    nxt = sched.take()
    assert nxt is not None and nxt.data["gauges"]["pd_held_requests"] == {"": 0}
    # across steps (vLLM's logger): counters and times add, the gauge is the latest
    total = KvbmConnector.build_kv_connector_stats(json.loads(json.dumps(step.to_dict())))
    assert total is not None
    total.aggregate(KvbmConnector.build_kv_connector_stats(nxt.to_dict()))  # type: ignore[arg-type]
    again = PdMeter()
    again.add("pd_loads_done", 1, ("ucx",))
    again.observe("pd_handoff", 0.03)
    total.aggregate(again.take())  # type: ignore[arg-type]
    r = total.reduce()
    assert (r["pd_loads_done[tcp]"], r["pd_loads_done[ucx]"]) == (2, 1)
    assert r["pd_held_requests"] == 0 and r["pd_handoff_n"] == 3
    assert r["pd_handoff_ms_avg"] == pytest.approx(20.0)
    assert step.data["counters"]["pd_loads_done"] == {"tcp": 2}  # the payload untouched


def test_pd_metrics_in_vllms_prometheus_classes() -> None:
    reg = prometheus_client.CollectorRegistry()
    prom = KvbmConnector.build_prom_metrics(SimpleConfig(), fresh_types(reg), ["engine"],
                                            {0: ["0"]})
    specs = metric_specs()
    names = {m.name for m in reg.collect()}
    for n in specs:
        if n.startswith("pd_"):
            assert f"vllm:kvbm_{n}" in names, n
    assert "vllm:kvbm_pd_handoff_time_seconds" in names
    st = KvbmConnectorStats()
    st.add("pd_loads_done", 2, ("tcp",))
    st.add("pd_load_failures", 1, ("peer_dead",))
    st.add("pd_served_bytes", 4096, ("read", "tcp"))
    st.add("pd_served_bytes", 1, ("read",))  # too few labels: skipped, never raised
    st.set_gauge("pd_held_requests", 5)
    st.observe_time("pd_handoff", 0.02)
    st.observe_time("pd_handoff", 7.0)
    prom.observe(json.loads(json.dumps(st.to_dict())), 0)
    get, e = reg.get_sample_value, {"engine": "0"}
    assert get("vllm:kvbm_pd_loads_done_total", {**e, "backend": "tcp"}) == 2
    assert get("vllm:kvbm_pd_load_failures_total", {**e, "reason": "peer_dead"}) == 1
    assert get("vllm:kvbm_pd_served_bytes_total", {**e, "op": "read", "backend": "tcp"}) == 4096
    assert get("vllm:kvbm_pd_held_requests", e) == 5
    assert get("vllm:kvbm_pd_handoff_time_seconds_count", e) == 2
    # its own buckets: a handoff of seconds is not in the copies' last bucket
    assert get("vllm:kvbm_pd_handoff_time_seconds_bucket", {**e, "le": "10.0"}) == 2
    assert get("vllm:kvbm_pd_handoff_time_seconds_bucket", {**e, "le": "5.0"}) == 1


class SimpleConfig:
    kv_transfer_config = None


# -- the handoff, counted on both sides ------------------------------------------------------
@pytest.mark.parametrize("mode", [PdMode.READ, PdMode.WRITE])
@pytest.mark.parametrize("world", [1, 2])
def test_a_handoff_is_counted_where_it_happens(engines: Any, mode: PdMode, world: int) -> None:
    lay = layout()
    p = engines(settings(lay, world), PRODUCER, engine="P")
    d = engines(settings(lay, world), CONSUMER, cfg=DisaggConfig(mode=mode), engine="D")
    pt, dt = Totals(), Totals()
    prompt = toks(4 * BS + 10, 31)
    params = prefill(p, "r1", prompt, [2, 5, 6, 7, 11])
    pt.step(p)
    assert pt.c("pd_handoffs") == 1
    assert pt.stats.data["gauges"]["pd_held_requests"] == {"": 1}
    decode(d, "d1", prompt, params, [9, 3, 4, 1, 14])
    until("recvd", "d1", d, dt, p)
    until("sent", "r1", p, pt)
    pt.step(p)
    assert not d.errors
    # every rank moved its share: 5 blocks of block_bytes each
    bb = p.ranks[0].pd._ctx.kv.block_bytes  # type: ignore[union-attr]
    op = "read" if mode is PdMode.READ else "write"
    assert pt.c("pd_served_blocks", op, "tcp") == 5 * world
    assert pt.c("pd_served_bytes", op, "tcp") == 5 * world * bb
    assert pt.c("pd_leases_released", "done" if mode is PdMode.READ else "written") == world
    assert pt.c("pd_handoffs_released") == 1
    assert pt.stats.data["gauges"]["pd_held_requests"] == {"": 0}
    assert dt.c("pd_loads_started") == 1 and dt.c("pd_load_tokens") == len(prompt)
    assert dt.c("pd_loads_done", "tcp") == world
    assert dt.c("pd_received_blocks", "tcp") == 5 * world
    assert dt.c("pd_received_bytes", "tcp") == 5 * world * bb
    assert dt.stats.data["times"]["pd_handoff"]["n"] == world
    assert not dt.stats.data["counters"].get("pd_load_failures")
    # each side counts its own half only
    assert not any(k.startswith("pd_load") for k in pt.stats.data["counters"])
    assert not any(k.startswith(("pd_served", "pd_lease", "pd_handoffs"))
                   for k in dt.stats.data["counters"])


def test_failures_are_counted_by_reason(engines: Any) -> None:
    lay = layout()
    p = engines(settings(lay), PRODUCER, cfg=DisaggConfig(max_handoffs=1), engine="P")
    d = engines(settings(lay), CONSUMER, engine="D")
    other = engines(settings(layout("other-model")), CONSUMER, engine="O")
    pt, dt, ot = Totals(), Totals(), Totals()
    # another model: refused from the params (per request), the prefill side told to drop
    prompt = toks(3 * BS, 40)
    params = prefill(p, "r1", prompt, [0, 1, 2])
    assert decode(other, "o1", prompt, params, [3, 4, 5]) == (0, False)
    ot.step(other)
    until("sent", "r1", p, pt, other)
    assert ot.c("pd_load_failures", "layout_mismatch") == 1 and ot.c("pd_drops") == 1
    assert pt.c("pd_leases_released", "drop") == 1
    # another prompt; malformed params (counted once however often vLLM asks)
    prompt = toks(3 * BS, 42)  # (a new one: the first is in the prefill side's G2 now)
    params = prefill(p, "r2", prompt, [0, 1, 2])
    assert decode(d, "d2", [*prompt[:-1], 7], params, [3, 4, 5]) == (0, False)
    bad = Req("d3", prompt, {"do_remote_prefill": True, "kvbm": {"v": 99}})
    assert d.query(bad) == (0, False) and d.query(bad) == (0, False)
    dt.step(d)
    assert dt.c("pd_load_failures", "other_prompt") == 1
    assert dt.c("pd_load_failures", "bad_params") == 1
    until("sent", "r2", p, pt, d)
    # the only lease slot taken: the next request is handed off without its KV
    prompt = toks(3 * BS, 43)
    params = prefill(p, "r3", prompt, [0, 1, 2])
    late = Req("r4", list(prompt), {"do_remote_decode": True}, num_prompt_tokens=len(prompt))
    p.compute(late, [6, 7, 8], seed=3)
    late.status = Status("FINISHED_LENGTH_CAPPED")
    assert p.finish(late, [6, 7, 8])[1] is None
    pt.step(p)
    assert pt.c("pd_handoff_failures", "no_slot") == 1 and pt.c("pd_handoffs") == 3
    assert pt.stats.data["gauges"]["pd_held_requests"] == {"": 1}
    # a lease that runs out before the decode side reads: expired there, lease_lost here
    q = engines(settings(lay), PRODUCER, cfg=DisaggConfig(lease_s=0.2), engine="Q")
    qt = Totals()
    params = prefill(q, "q1", prompt, [0, 1, 2])
    time.sleep(0.3)
    until("sent", "q1", q, qt)
    assert qt.c("pd_leases_released", "expired") == 1
    q.compute(Req("q2", toks(3 * BS, 41)), [0, 1, 2], seed=5)  # vLLM reuses the blocks
    decode(d, "d4", prompt, params, [3, 4, 5])
    until("recvd", "d4", d, dt)
    assert dt.c("pd_load_failures", "lease_lost") == 1
    assert dt.c("pd_loads_started") == 1 and not dt.c("pd_loads_done", "tcp")


def test_a_wrong_secret_and_a_dead_peer_are_told_apart(engines: Any) -> None:
    lay = layout()
    p = engines(settings(lay), PRODUCER, engine="P")
    d = engines(settings(lay, secret="another-secret-0123456789"), CONSUMER, engine="D")
    dt = Totals()
    prompt = toks(3 * BS, 50)
    decode(d, "d1", prompt, prefill(p, "r1", prompt, [0, 1, 2]), [3, 4, 5])
    until("recvd", "d1", d, dt)
    assert dt.c("pd_load_failures", "auth") == 1
    conn, child = SPAWN.Pipe()
    proc = SPAWN.Process(target=_prefill_process, args=(child,), daemon=True)
    proc.start()
    try:
        assert conn.poll(WAIT_S), "the prefill process did not answer"
        params = json.loads(conn.recv_bytes())
    finally:
        proc.kill()
        proc.join(WAIT_S)
    d2 = engines(settings(lay), CONSUMER, engine="D2")
    decode(d2, "d2", toks(3 * BS, 11), params, [3, 4, 5])
    until("recvd", "d2", d2, dt)
    assert dt.c("pd_load_failures", "peer_dead") == 1


def test_kvbm_endpoint_shows_both_sides_counters(engines: Any) -> None:
    lay = layout()
    p = engines(settings(lay), PRODUCER, engine="P")
    d = engines(settings(lay), CONSUMER, engine="D")
    servers = [serve_metrics(e.sched.mgr, e.sched.counters, e.sched.meter, "127.0.0.1", 0)
               for e in (p, d)]
    try:
        pt, dt = Totals(), Totals()
        prompt = toks(2 * BS + 3, 60)
        decode(d, "d1", prompt, prefill(p, "r1", prompt, [0, 1, 2]), [3, 4, 5])
        until("recvd", "d1", d, dt, p)
        until("sent", "r1", p, pt)
        pt.step(p)
        ptext, dtext = (_scrape(s.url) for s in servers)
    finally:
        for s in servers:
            s.close()
    assert _value(ptext, "kvbm_connector_pd_handoffs_total") == 1
    assert _value(ptext, 'kvbm_connector_pd_leases_released_total{reason="done"}') == 1
    assert _value(ptext, 'kvbm_connector_pd_served_blocks_total{backend="tcp",op="read"}') == 3
    assert _value(ptext, "kvbm_connector_pd_held_requests") == 0
    assert _value(dtext, 'kvbm_connector_pd_loads_done_total{backend="tcp"}') == 1
    assert _value(dtext, "kvbm_connector_pd_loads_started_total") == 1
    assert _value(dtext, "kvbm_connector_pd_handoff_seconds_count") == 1
    assert _value(dtext, 'kvbm_connector_pd_received_blocks_total{backend="tcp"}') == 3


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as r:
        return str(r.read().decode())


def _value(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{series} not in the exposition")

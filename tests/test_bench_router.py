"""The router benchmarks run end to end with tiny parameters, and their --json documents have
the shape the issue fixes: bench/events_throughput.py (figures with targets and same-run
references, both transports' rows) and bench/router_replay.py (one row per router with hit
ratios by medium, prefill tokens saved and imbalance; the KV routers' indexers, fed by the
managers' own events, predict every match exactly)."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import kvbm

pytest.importorskip("zmq")
pytest.importorskip("torch")

BENCH = Path(__file__).resolve().parent.parent / "bench"
ROUTERS = ["round_robin", "least_loaded", "gpu_overlap", "tier_aware"]


def _bench(args: list[str]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    doc: dict[str, Any] = json.loads(proc.stdout)  # one document, nothing else on stdout
    return doc


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def test_events_throughput_json_rows() -> None:
    local = Path(sys.executable).parent / "nats-server"
    jet = (local.exists() or shutil.which("nats-server") is not None) \
        and importlib.util.find_spec("nats") is not None
    doc = _bench([str(BENCH / "events_throughput.py"), "--json", "--events", "400",
                  "--index-blocks", "3000", "--workers", "8", "--prompt-blocks", "100",
                  "--queries", "10", "--repeat", "1", "--seed", "2",
                  *([] if jet else ["--skip-jetstream"])])
    assert doc["meta"]["seed"] == 2 and doc["meta"]["kvbm_version"] == kvbm.__version__
    rows = doc["rows"]
    keys = {"name", "unit", "value", "target", "vs_target", "reference", "reference_name",
            "ratio"}
    for r in rows:
        assert keys <= set(r), r
        assert r["unit"] in ("events/s", "blocks/s", "s"), r
        assert _finite(r["value"]) and r["value"] > 0, r
        if r["target"] is not None:
            assert _finite(r["vs_target"]) and r["vs_target"] > 0, r
        if r["reference"] is not None:
            assert _finite(r["ratio"]) and r["reference_name"], r
    names = " | ".join(r["name"] for r in rows)
    for part in ("decode_batch", "KvIndexer.apply, stores of 16 blocks",
                 "find_matches p50, hashes given", "find_matches p99",
                 "ZMQ end to end", "ZMQ end to end, blocks applied"):
        assert part in names, (part, names)
    # the two targets: 1 M blocks/s applied, find_matches p50 <= 200 us
    by_name = {r["name"]: r for r in rows}
    assert by_name["KvIndexer.apply, stores of 16 blocks (64 events a call)"]["target"] == 1e6
    p50 = next(r for r in rows if r["name"].startswith("find_matches p50, hashes given"))
    assert p50["target"] == pytest.approx(200e-6) and p50["unit"] == "s"
    transports = {r.get("transport") for r in rows}
    assert "zmq" in transports
    if jet:
        assert "jetstream" in transports
    else:
        assert any("JetStream skipped" in n for n in doc["notes"])


def _check_router_rows(doc: dict[str, Any], routers: list[str]) -> dict[str, dict[str, Any]]:
    rows = doc["rows"]
    assert [r["router"] for r in rows] == routers
    for r in rows:
        assert {"router", "hit_ratio", "hit_ratio_by_medium", "prefill_tokens_saved",
                "imbalance"} <= set(r), r
        assert 0.0 <= r["hit_ratio"] <= 1.0
        by = r["hit_ratio_by_medium"]
        assert set(by) <= {"GPU", "CPU_PINNED", "DISK", "OBJECT"}, by
        assert sum(by.values()) == pytest.approx(r["hit_ratio"]), r
        assert isinstance(r["prefill_tokens_saved"], int) and r["prefill_tokens_saved"] >= 0
        assert r["prefill_tokens_saved"] <= r["prefill_tokens"]
        assert r["imbalance"] >= 1.0 and sum(r["requests_per_worker"]) == r["requests"]
    return {r["router"]: r for r in rows}


def test_router_replay_over_zmq_predicts_every_match() -> None:
    doc = _bench([str(BENCH / "router_replay.py"), "--generate", "--requests", "80",
                  "--workers", "2", "--seed", "3", "--json"])
    rows = _check_router_rows(doc, ROUTERS)
    assert doc["meta"]["seed"] == 3
    assert "ZMQ" in doc["transport"]
    assert rows["round_robin"]["imbalance"] == pytest.approx(1.0)
    for name in ("gpu_overlap", "tier_aware"):
        # the router is synced before each decision: its indexer, built from the managers'
        # events over ZMQ, knows exactly what the chosen worker then matches
        assert rows[name]["prediction_exact"] == 1.0, rows[name]
        assert rows[name]["events"]["events"] > 0
    assert rows["round_robin"]["prediction_exact"] is None
    g = doc["goal"]
    assert g["target"] == 1.2 and _finite(g["saved_ratio"]) and isinstance(g["met"], bool)
    # tier_aware ran under the benchmark's bounded shares, gpu_overlap under the cost alone
    # (as Dynamo's KV router): each row and the goal say which
    assert doc["cost"]["share_bound"] == {"gpu_overlap": None, "tier_aware": 0.02}
    assert rows["tier_aware"]["share_bound"] == 0.02
    assert rows["gpu_overlap"]["share_bound"] is None
    assert rows["round_robin"]["share_bound"] is None
    assert g["share_bound"] == {"gpu_overlap": None, "tier_aware": 0.02}


def test_router_replay_from_a_trace_file_with_disk(tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    subprocess.run([sys.executable, str(BENCH / "make_trace.py"), "--requests", "60",
                    "--seed", "4", "--out", str(trace)], check=True, capture_output=True)
    doc = _bench([str(BENCH / "router_replay.py"), "--trace", str(trace), "--workers", "2",
                  "--disk", "--transport", "inproc", "--router", "gpu_overlap",
                  "--router", "tier_aware", "--baseline-share-bound", "0.05",
                  "--share-bound", "none", "--json"])
    rows = _check_router_rows(doc, ["gpu_overlap", "tier_aware"])
    c = doc["cluster"]
    assert c["disk_blocks"] > 0
    # 60 requests: 1 % of their blocks cannot hold the largest one, so G1 was raised to it
    # and G2 and G3 grew with it (the default fractions: G2 5x, G3 25x G1)
    assert c["floor_growth"] > 1
    assert c["host_blocks"] == pytest.approx(5 * c["device_blocks"], abs=2)
    assert c["disk_blocks"] == pytest.approx(25 * c["device_blocks"], abs=2)
    assert "in process" in doc["transport"]
    # each KV router under its own bound, as given
    assert rows["gpu_overlap"]["share_bound"] == 0.05
    assert rows["tier_aware"]["share_bound"] is None


@pytest.mark.parametrize("argv, message", [
    (["--generate", "--workers", "0"], "--workers"),
    (["--generate", "--host-fraction", "nan"], "--host-fraction"),
    (["--generate", "--device-fraction", "0"], "--device-fraction"),
    (["--generate", "--load", "0"], "--load"),
    (["--generate", "--host-weight", "2"], "--host-weight"),
    (["--generate", "--share-bound", "-1"], "--share-bound"),
    (["--generate", "--share-bound", "nan"], "--share-bound"),
    (["--generate", "--baseline-share-bound", "-0.5"], "--baseline-share-bound"),
    (["--generate", "--share-window", "0"], "--share-window"),
    (["--trace", "/nonexistent/t.jsonl"], "t.jsonl"),
])
def test_router_replay_bad_input_is_a_usage_error(argv: list[str], message: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        _load("router_replay").main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "error:" in err and message in err, err


@pytest.mark.parametrize("argv, message", [
    (["--events", "3"], "--events"), (["--queries", "0"], "--queries"),
    (["--seed", "-1"], "--seed"),
])
def test_events_throughput_bad_input_is_a_usage_error(argv: list[str], message: str,
                                                      capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    with pytest.raises(SystemExit) as e:
        _load("events_throughput").main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "error:" in err and message in err, err

"""bench/transfer_bandwidth.py and bench/nvlink_check.py: a fast smoke run with tiny sizes
checks the --json document's shape (rows of {backend, op, bytes, gbps, ceiling_gbps,
ratio, nixl_gbps}, latency, handoff, what happened to NIXL, meta); bad arguments are a
usage error, not a traceback."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
ROW_KEYS = {"backend", "op", "bytes", "gbps", "ceiling_gbps", "ratio", "nixl_gbps"}
HAS_UCX = importlib.util.find_spec("ucxx") is not None


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(*args: str) -> dict:
    proc = subprocess.run([sys.executable, str(BENCH / "transfer_bandwidth.py"), *args,
                           "--json", "--sizes", "32K,64K", "--repeat", "1",
                           "--budget-mib", "1", "--latency-iters", "3", "--layout", "small",
                           "--handoff-tokens", "64"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)  # one document, nothing else on stdout


def test_json_shape_without_nixl() -> None:
    doc = _run("--no-nixl")
    backends = {"tcp", "ucx", "ucx-rma"} if HAS_UCX else {"tcp"}
    assert {r["backend"] for r in doc["rows"]} == backends
    assert all(set(r) == ROW_KEYS for r in doc["rows"])
    assert {(r["op"], r["bytes"]) for r in doc["rows"]} == {
        (op, n) for op in ("READ", "WRITE") for n in (32 << 10, 64 << 10)}
    for r in doc["rows"]:
        assert r["gbps"] > 0 and r["ceiling_gbps"] > 0 and r["nixl_gbps"] is None
        assert r["ratio"] == pytest.approx(r["gbps"] / r["ceiling_gbps"], rel=0.02, abs=2e-3)
    assert doc["nixl"] == "skipped (--no-nixl)"
    assert {(x["backend"], x["op"]) for x in doc["latency"]} == {
        (b, op) for b in backends | {"socket"} for op in ("READ", "WRITE")}
    assert all(0 < x["p50_ms"] <= x["p99_ms"] and x["bytes"] == 2 << 20
               for x in doc["latency"])
    req = doc["handoff_request"]
    assert req["blocks"] == 4 and req["bytes"] == 4 * req["block_bytes"]
    assert {(h["backend"], h["op"]) for h in doc["handoff"]} == {
        (b, op) for b in backends for op in ("READ", "WRITE")}
    assert all(h["ms"] > 0 and h["socket_ms"] > 0 and h["bytes"] == req["bytes"]
               for h in doc["handoff"])
    assert doc["meta"]["command"][0] == "transfer_bandwidth.py" and doc["meta"]["seed"] == 0
    assert doc["ucx_env"]["UCX_NET_DEVICES"] == "lo"


def test_nixl_column_says_what_happened() -> None:
    doc = _run("--backend", "tcp")
    assert {r["backend"] for r in doc["rows"]} == {"tcp"}
    installed = any(importlib.util.find_spec(m) is not None for m in ("nixl_cu12", "nixl"))
    if installed:
        assert doc["nixl"] == "measured in this run", doc["nixl"]
        assert all(r["nixl_gbps"] > 0 for r in doc["rows"])
        assert {x["backend"] for x in doc["latency"]} == {"tcp", "socket", "nixl"}
        assert {h["backend"] for h in doc["handoff"]} == {"tcp", "nixl"}
    else:
        assert doc["nixl"].startswith("not installed")
        assert all(r["nixl_gbps"] is None for r in doc["rows"])


def test_table_names_its_units() -> None:
    tb = _load("transfer_bandwidth")
    doc = {"rows": [{"backend": "ucx", "op": "READ", "bytes": 2 << 20, "gbps": 5.0,
                     "ceiling_gbps": 2.5, "ratio": 2.0, "nixl_gbps": 4.0}],
           "latency": [{"backend": "ucx", "op": "READ", "bytes": 2 << 20, "p50_ms": 0.4,
                        "p99_ms": 0.6}],
           "handoff": [{"backend": "ucx", "op": "READ", "bytes": 4 << 20, "blocks": 2,
                        "ms": 1.0, "gbps": 4.2, "socket_ms": 2.0, "vs_socket": 2.0}],
           "handoff_request": {"layout": "llama3-8b", "blocks": 2, "block_bytes": 2 << 20,
                               "bytes": 4 << 20, "tokens": 32},
           "nixl": "measured in this run", "ucx_env": {"UCX_NET_DEVICES": "lo"}}
    text = tb.format_doc(doc)
    header = text.splitlines()[0]
    assert "GB/s" in header and "socket" in header and "NIXL" in header
    assert "2 MiB" in text and "1.25" in text  # 5.0 / 4.0 against NIXL
    assert "p50 ms" in text and "x socket" in text


@pytest.mark.parametrize("argv,message", [
    (["--sizes", "0"], "--sizes"), (["--sizes", "12Q"], "--sizes"),
    (["--repeat", "0"], "--repeat"), (["--budget-mib", "-1"], "--budget-mib"),
    (["--handoff-tokens", "0"], "--handoff-tokens"), (["--layout", "nope"], "--layout"),
    (["--backend", "carrier-pigeon"], "--backend"),
])
def test_bad_input_is_a_usage_error(argv: list[str], message: str,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        _load("transfer_bandwidth").main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_nvlink_check_without_cuda_says_so() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is present: bench/nvlink_check.py measures instead")
    proc = subprocess.run([sys.executable, str(BENCH / "nvlink_check.py"), "--json"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["rows"] == [] and "no CUDA" in doc["skipped"] and doc["meta"]["seed"] is None

"""Disaggregated prefill/decode with two real vLLMs (as tests/test_vllm_disagg.py) whose
transports run ucx one-sided (``transport.ucx_rma`` on both): the decode worker reads the
prefill worker's KV (vLLM's own CPU tensors) by UCX RMA, with no serving thread of the
prefill side involved. Its greedy output equals one instance's; the prefill side still lets
the blocks go when told; a control (the prefill instance's KV scribbled over after its leg)
changes the output, so the decode instance did decode from what it read. Skipped where
ucxx is not installed."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("vllm")
if importlib.util.find_spec("ucxx") is None:
    pytest.skip("one-sided transfers need ucxx (kvtier[ucx])", allow_module_level=True)

HERE = Path(__file__).parent
BS = 32
SECRET = "vllm-disagg-rma-secret-01234"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Any:
    sys.path.insert(0, str(HERE))
    from pd_driver import answer, ask, start
    from vllm_driver import write_model

    tmp = tmp_path_factory.mktemp("vllm-pd-rma")
    write_model(tmp / "model")

    def spec(role: str, disagg: dict[str, Any]) -> dict[str, Any]:
        return {"model": str(tmp / "model"), "role": role, "disagg": disagg,
                "kvbm": {"host": {"num_blocks": 64},
                         "transport": {"secret": SECRET, "backends": "ucx", "ucx_rma": True}}}

    procs = {"prefill": start(tmp, "prefill", spec("kv_producer", {"lease_s": 20})),
             "decode": start(tmp, "decode", spec("kv_consumer",
                                                 {"mode": "read", "timeout_s": 20}))}
    try:
        for name, proc in procs.items():
            hello = answer(proc, 900)
            assert hello.get("ready"), (name, hello)
        p, d = procs["prefill"], procs["decode"]
        rng = np.random.default_rng(17)
        prompts = [rng.integers(1, 1000, 6 * BS + 9 + i).tolist() for i in range(2)]
        out: dict[str, Any] = {}
        ref = ask(p, {"op": "generate", "requests": [
            {"prompt": q, "params": None, "max_tokens": 8} for q in prompts]})
        out["ref"] = [o["tokens"] for o in ref["outputs"]]
        ask(p, {"op": "reset", "connector": True})

        def prefill(i: int) -> dict[str, Any]:
            res = ask(p, {"op": "generate", "requests": [
                {"prompt": prompts[i], "params": {"do_remote_decode": True},
                 "max_tokens": 1}]})
            return json.loads(json.dumps(res["outputs"][0]["params"]))

        def decode(i: int, params: dict[str, Any]) -> dict[str, Any]:
            res = ask(d, {"op": "generate", "requests": [
                {"prompt": prompts[i], "params": params, "max_tokens": 8}]})
            return {**res["outputs"][0], "stats": res["stats"]}

        out["read"] = decode(0, prefill(0))
        out["p_after_read"] = ask(p, {"op": "pump", "seconds": 30})
        params = prefill(1)
        ask(p, {"op": "scribble"})
        out["control"] = decode(1, params)
        yield out
    finally:
        for name, proc in procs.items():
            if proc.poll() is None:
                with contextlib.suppress(RuntimeError):
                    ask(proc, {"op": "exit"}, 60)
            try:
                proc.wait(60)
            except Exception:
                proc.kill()
            err = tmp / f"{name}.stderr"
            if err.exists():
                print(f"--- {name} stderr (tail) ---\n{err.read_text()[-4000:]}")


def test_decode_output_equals_one_instance_read_one_sided(runs: dict[str, Any]) -> None:
    r = runs["read"]
    assert r["tokens"] == runs["ref"][0]
    w = r["stats"]["worker"]
    assert (w["received"], w["receive_failures"]) == (1, 0)
    assert w["recent"][-1]["backend"] == "ucx"
    assert w["received_bytes"] == 7 * 32 * 1024


def test_prefill_side_lets_go_when_told(runs: dict[str, Any]) -> None:
    s = runs["p_after_read"]
    assert s["held"] == 0 and not s["has_requests"]
    assert s["worker"]["released_done"] == 1 and s["worker"]["expired"] == 0
    # one-sided: keys granted (the KV tensors, the lease word), no request served
    assert s["agent"].get("rma_keys_granted", 0) >= 2
    assert s["agent"].get("served_requests", 0) == 0


def test_control_altered_prefill_kv_changes_the_output(runs: dict[str, Any]) -> None:
    r = runs["control"]
    assert r["stats"]["worker"]["received"] == 2
    assert r["tokens"] != runs["ref"][1]

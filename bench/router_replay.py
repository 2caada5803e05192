"""Replay a Mooncake-format trace on a cluster of kvbm workers behind four routers.

    python bench/router_replay.py --trace FILE --workers N [--disk] [--json]
    python bench/router_replay.py --generate [--family chat] [--requests 4000] --workers 4

Each router gets a fresh cluster of ``--workers`` workers (real BlockManagers with G1 + G2,
and G3 with ``--disk``; CPU tensors, a tiny layout) and the same requests at the trace's
times (bench/_router_cluster.py has the worker model):

- ``round_robin``; ``least_loaded`` (fewest running requests, then fewest prompt tokens
  queued for prefill);
- ``gpu_overlap``: kvbm's KvRouter fed only the workers' GPU events, and configured as
  Dynamo's KV router is: the cost alone picks, no bounded shares (``--baseline-share-bound``,
  none by default). It stands for what a router that sees only G1 does today, so it gets
  that router's settings, not kvbm's;
- ``tier_aware``: the same KvRouter and cost fed every medium's events (a block held in G2
  or G3 costs its tier's weight of computing it), with kvbm's recommended cluster setting of
  bounded shares (``--share-bound``, 0.02 by default: a worker that had 1.02x its share of
  the router's recent picks is skipped). Its cost is stickier than a G1-only one (a
  conversation's history keeps pulling after it left the GPU), so it is the router that
  needs the bound (without it, it balances worse: docs/router.md).

Both KV routers get the same loads (running requests and their blocks), the same cost
weights and the same tie breaks; they differ in what their index sees and in the share
bound, which every row (``share_bound``), the goal and ``cost`` echo. ``--share-bound
0.02 --baseline-share-bound 0.02`` replays both under the same bound (the figures before
this split); ``none`` for both: the cost alone for both.

The KV routers' indexers are fed by the managers' own events, over ZMQ on 127.0.0.1 by
default (``--transport inproc``: the same codec, no sockets). Reported per router: the
cluster's prefix-hit ratio (hit blocks / requested blocks) in total and by the medium each
hit was served from, prompt tokens whose prefill was saved (``--trace-block-tokens`` per
hit trace block), load imbalance (max / mean requests per worker), simulated time to first
token, and how often the router's ``find_matches`` predicted the worker's match exactly.
The goal (printed, not asserted): tier_aware saves >= 1.2x the prefill tokens gpu_overlap
saves at equal or better balance. With ``--json``: ``{"rows": [{"router", "hit_ratio",
"hit_ratio_by_medium", "prefill_tokens_saved", "imbalance", ...}], "goal": {...},
"meta": {...}}``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import replace
from typing import Any

import numpy as np

from kvbm.errors import KvbmError
from kvbm.lab.workload import FAMILIES, generate
from kvbm.router import CostConfig, KvRouter, TieBreak, WorkerLoad

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:  # loaded by path (tests)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _meta
from _router_cluster import Cluster, ClusterConfig, Request, make_trace_requests

ROUTERS = ("round_robin", "least_loaded", "gpu_overlap", "tier_aware")
GOAL = 1.2


#: tier_aware's bounded shares (``--share-bound``): kvbm's recommended cluster setting.
BENCH_SHARE_BOUND = 0.02
#: gpu_overlap's (``--baseline-share-bound``): none, as Dynamo's KV router (see the module).
BASELINE_SHARE_BOUND: float | None = None


def run_router(name: str, reqs: list[Request], cfg: ClusterConfig, cost: CostConfig,
               progress: bool) -> dict[str, Any]:
    """Replay ``reqs`` on a fresh cluster behind router ``name`` (``cost``: a KV router's
    configuration, its own share bound included)."""
    kv = name in ("gpu_overlap", "tier_aware")
    t_start = time.perf_counter()
    cluster = Cluster(cfg, with_events=kv)
    try:
        router = KvRouter(cluster.full if name == "tier_aware" else cluster.gpu, cost)
        workers = cluster.workers
        index = {w.name: j for j, w in enumerate(workers)}
        n = len(workers)
        blocks = hits = saved = tokens = exact = short = 0
        by_medium: dict[str, int] = {}
        ttft: list[float] = []
        step = max(1, len(reqs) // 40)
        for k, req in enumerate(reqs):
            loads = [w.load(req.t) for w in workers]
            if name == "round_robin":
                i = k % n
            elif name == "least_loaded":  # fewest running, then least prefill queued
                i = min(range(n), key=lambda j: (loads[j][0], loads[j][2], (j - k) % n))
            else:
                cluster.sync()
                sel = router.select(req.tokens, {w.name: WorkerLoad(loads[j][1], loads[j][0])
                                                 for j, w in enumerate(workers)})
                i = index[sel.worker]
                predicted = cluster.full.find_matches(req.tokens).get(sel.worker, {})
            served = workers[i].serve(req)
            cluster.served(i)
            if kv:
                exact += predicted == served.matched
            short += sum(served.matched.values()) - served.hit_blocks
            blocks += req.blocks
            hits += served.hit_blocks
            saved += served.saved_tokens
            tokens += req.input_length
            for m, c in served.by_medium.items():
                by_medium[m.value] = by_medium.get(m.value, 0) + c
            ttft.append(served.ttft)
            if progress and k % step == 0:
                sys.stderr.write(f"\r  {name:<13} {k / len(reqs):4.0%}")
                sys.stderr.flush()
        if progress:
            sys.stderr.write(f"\r  {name:<13} done\n")
        assigned = [w.assigned for w in workers]
        mean = sum(assigned) / n
        return {
            "router": name, "hit_ratio": hits / blocks if blocks else 0.0,
            "hit_ratio_by_medium": {m: c / blocks for m, c in sorted(by_medium.items())},
            "prefill_tokens_saved": saved, "imbalance": max(assigned) / mean if mean else 1.0,
            "requests": len(reqs), "blocks": blocks, "prefill_tokens": tokens,
            "saved_fraction": saved / tokens if tokens else 0.0,
            "requests_per_worker": assigned,
            "ttft_mean_s": float(np.mean(ttft)) if ttft else 0.0,
            "ttft_p90_s": float(np.percentile(ttft, 90)) if ttft else 0.0,
            "prediction_exact": exact / len(reqs) if kv and reqs else None,
            "onboard_short_blocks": short,
            "events": dict(cluster.event_counts) if kv else None,
            # the router's own bounded shares (None: the cost alone picks; not a KV router)
            "share_bound": cost.share_bound if kv else None,
            "share_window": cost.share_window if kv and cost.share_bound is not None
            else None,
            "seconds": round(time.perf_counter() - t_start, 2),
        }
    finally:
        cluster.close()


def goal(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    by = {r["router"]: r for r in rows}
    if "gpu_overlap" not in by or "tier_aware" not in by:
        return None
    g, t = by["gpu_overlap"], by["tier_aware"]
    ratio = t["prefill_tokens_saved"] / g["prefill_tokens_saved"] \
        if g["prefill_tokens_saved"] else math.inf
    return {"saved_ratio": ratio, "target": GOAL,
            "imbalance": {"gpu_overlap": g["imbalance"], "tier_aware": t["imbalance"]},
            "share_bound": {"gpu_overlap": g["share_bound"], "tier_aware": t["share_bound"]},
            "met": ratio >= GOAL and t["imbalance"] <= g["imbalance"] + 1e-9}


def format_table(doc: dict[str, Any]) -> str:
    media = sorted({m for r in doc["rows"] for m in r["hit_ratio_by_medium"]})
    head = (f"{'router':13}  {'hit ratio':>9}  " + "  ".join(f"{m + ' hit':>14}" for m in media)
            + f"  {'tokens saved':>13}  {'saved %':>7}  {'imbalance x':>11}  "
              f"{'TTFT mean s':>11}  {'TTFT p90 s':>10}  {'predicted %':>11}")
    out = [doc["title"], head, "-" * len(head)]
    for r in doc["rows"]:
        pred = "-" if r["prediction_exact"] is None else f"{100 * r['prediction_exact']:.1f}"
        out.append(f"{r['router']:13}  {r['hit_ratio']:9.3f}  "
                   + "  ".join(f"{r['hit_ratio_by_medium'].get(m, 0.0):14.3f}" for m in media)
                   + f"  {r['prefill_tokens_saved']:13,}  {100 * r['saved_fraction']:7.1f}  "
                     f"{r['imbalance']:11.3f}  {r['ttft_mean_s']:11.3f}  "
                     f"{r['ttft_p90_s']:10.3f}  {pred:>11}")
    g = doc["goal"]
    if g is not None:
        out.append(f"tier_aware / gpu_overlap prefill tokens saved: {g['saved_ratio']:.3f}x "
                   f"(goal >= {g['target']}x at equal or better balance: imbalance "
                   f"{g['imbalance']['tier_aware']:.3f} vs {g['imbalance']['gpu_overlap']:.3f}"
                   f"; {'met' if g['met'] else 'not met'})")
        out.append(f"share bound: tier_aware {g['share_bound']['tier_aware']}, gpu_overlap "
                   f"{g['share_bound']['gpu_overlap']} (None: the cost alone picks)")
    out.append(f"events: {doc['transport']}")
    return "\n".join(out)


def build_parser() -> argparse.ArgumentParser:
    ap = _meta.parser(__doc__)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--trace", help="Mooncake-format JSON-lines file")
    src.add_argument("--generate", action="store_true",
                     help="generate a trace (as bench/make_trace.py does) instead")
    ap.add_argument("--workers", type=int, default=4, help="workers of the cluster")
    ap.add_argument("--router", action="append", choices=ROUTERS,
                    help="a router to compare, repeatable (default: all four)")
    ap.add_argument("--disk", action="store_true", help="give every worker a G3 disk tier")
    ap.add_argument("--device-fraction", type=float, default=0.01,
                    help="G1 of the whole cluster, as a fraction of the trace's distinct "
                         "blocks (never less than the largest request per worker: where "
                         "that raises G1, G2 and G3 grow in proportion)")
    ap.add_argument("--host-fraction", type=float, default=0.05,
                    help="G2 of the whole cluster, as a fraction of the distinct blocks "
                         "(times G1's growth; never less than the largest request per worker)")
    ap.add_argument("--disk-fraction", type=float, default=0.25,
                    help="G3 of the whole cluster, as a fraction of the distinct blocks "
                         "(times G1's growth; with --disk)")
    ap.add_argument("--load", type=float, default=0.8,
                    help="prefill utilization of the cluster if nothing were cached: sets "
                         "each worker's prefill tokens/s from the trace's offered tokens")
    ap.add_argument("--tpot", type=float, default=0.02, help="decode seconds per output token")
    ap.add_argument("--prefill-weight", type=float, default=1.0,
                    help="KV routers: weight of prefill blocks against decode blocks")
    ap.add_argument("--request-weight", type=float, default=0.0,
                    help="KV routers: block-equivalents added per request running on a "
                         "worker")
    ap.add_argument("--host-weight", type=float, default=0.1,
                    help="tier_aware: cost of a prefix block in G2, as a fraction of "
                         "computing it")
    ap.add_argument("--disk-weight", type=float, default=0.3,
                    help="tier_aware: cost of a prefix block in G3")
    ap.add_argument("--share-bound", type=_bound, default=BENCH_SHARE_BOUND,
                    help="tier_aware: a worker that got (1 + this) x its share of the "
                         "router's recent picks is not a candidate; 'none': no bound "
                         "(the router's own default) (default: %(default)s)")
    ap.add_argument("--baseline-share-bound", type=_bound, default=BASELINE_SHARE_BOUND,
                    help="gpu_overlap: the same, for the GPU-only router; 'none' (the "
                         "default): the cost alone picks, as Dynamo's KV router does")
    ap.add_argument("--share-window", type=int, default=CostConfig().share_window,
                    help="KV routers with a share bound: recent picks per worker the share "
                         "counts (default: %(default)s)")
    ap.add_argument("--transport", choices=("zmq", "inproc"), default="zmq",
                    help="how events reach the router: ZMQ on 127.0.0.1, or the codec in "
                         "process")
    ap.add_argument("--block-size", type=int, default=16,
                    help="tokens each trace block (hash id) stands for in the replay")
    ap.add_argument("--trace-block-tokens", type=int, default=512,
                    help="prompt tokens one hash id of the trace covers (Mooncake: 512)")
    ap.add_argument("--json", action="store_true", help="print one JSON document only")
    ap.add_argument("--requests", type=int, default=4000,
                    help="requests to generate (with --generate)")
    ap.add_argument("--seed", type=_meta.seed, default=0,
                    help="seed of the generated trace and of the routers' tie breaks")
    ap.add_argument("--family", choices=sorted(FAMILIES), default="chat",
                    help="generated workload family (with --generate)")
    return ap


def _bound(text: str) -> float | None:
    if text.strip().lower() == "none":
        return None
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number >= 0 or 'none', got {text!r}") from None
    if not (math.isfinite(v) and 0 <= v <= 1e6):
        raise argparse.ArgumentTypeError(f"a finite number in [0, 1e6] or 'none', got {text!r}")
    return v


def _records(ap: argparse.ArgumentParser, args: argparse.Namespace) -> list[dict[str, Any]]:
    if args.generate:
        return generate(args.requests, seed=args.seed, family=args.family)
    _meta.read_trace(ap, args.trace)  # a usage error for a missing or malformed file
    with open(args.trace) as fp:
        return [json.loads(line) for line in fp if line.strip()]


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    for name in ("workers", "block_size", "trace_block_tokens", "requests", "share_window"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    for name, hi in (("device_fraction", 1.0), ("host_fraction", 10.0),
                     ("disk_fraction", 100.0), ("load", 100.0), ("tpot", 60.0),
                     ("prefill_weight", 1e6), ("request_weight", 1e6), ("host_weight", 1.0),
                     ("disk_weight", 1.0)):
        v = getattr(args, name)
        if not (math.isfinite(v) and 0 <= v <= hi) or (v == 0 and name.endswith("fraction")):
            ap.error(f"--{name.replace('_', '-')} must be a finite number in "
                     f"{'(0' if name.endswith('fraction') else '[0'}, {hi:g}], got {v}")
    if args.load == 0:
        ap.error("--load must be > 0")
    records = _records(ap, args)
    reqs = make_trace_requests(records, args.block_size, args.trace_block_tokens)
    if not reqs:
        ap.error("the trace has no request with a block")
    distinct = len({h for r in records for h in r["hash_ids"]})
    span = max(reqs[-1].t - reqs[0].t, 1.0)
    tokens = sum(r.input_length for r in reqs)
    n = args.workers
    largest = max(r.blocks for r in reqs)
    # G1 must hold the largest request. Where that floor raises it above the fraction asked,
    # G2 and G3 grow by the same factor: the tiers keep the proportions asked for (else
    # more workers would mean a cluster ever richer in G1 next to a fixed G2 and G3, and
    # the comparison would drift towards the routers that see G1 alone)
    asked = args.device_fraction * distinct / n
    device = max(largest, math.ceil(asked))
    grow = max(1.0, largest / asked)
    cfg = ClusterConfig(
        workers=n, block_size=args.block_size, device_blocks=device,
        host_blocks=max(largest, math.ceil(args.host_fraction * distinct / n * grow)),
        disk_blocks=math.ceil(args.disk_fraction * distinct / n * grow) if args.disk else 0,
        prefill_tps=tokens / span / n / args.load, tpot=args.tpot,
        trace_block_tokens=args.trace_block_tokens, transport=args.transport)
    try:
        cost = CostConfig(prefill_weight=args.prefill_weight, cpu_pinned_weight=args.host_weight,
                          disk_weight=args.disk_weight, request_weight=args.request_weight,
                          tie_break=TieBreak.RANDOM, seed=args.seed, share_bound=args.share_bound,
                          share_window=args.share_window)
    except KvbmError as e:
        ap.error(str(e))
    costs = {"gpu_overlap": replace(cost, share_bound=args.baseline_share_bound)}
    progress = not args.json and sys.stderr.isatty()
    rows = [run_router(name, reqs, cfg, costs.get(name, cost), progress)
            for name in (args.router or ROUTERS)]
    transport = ("ZMQ PUB/SUB on 127.0.0.1 (one publisher per worker, kvbm's Subscriber)"
                 if args.transport == "zmq" else
                 "in process, through the wire codec (msgpack encode + decode)")
    title = (f"{len(reqs):,} requests, {distinct:,} distinct blocks, {n} workers: G1 "
             f"{cfg.device_blocks:,} + G2 {cfg.host_blocks:,}"
             + (f" + G3 {cfg.disk_blocks:,}" if cfg.disk_blocks else "")
             + f" blocks each; prefill {cfg.prefill_tps:,.0f} tokens/s per worker "
               f"(load {args.load:g})")
    doc: dict[str, Any] = {
        "title": title, "rows": rows, "goal": goal(rows), "transport": transport,
        "cluster": {"workers": n, "device_blocks": cfg.device_blocks,
                    "floor_growth": grow,
                    "host_blocks": cfg.host_blocks, "disk_blocks": cfg.disk_blocks,
                    "prefill_tps": cfg.prefill_tps, "tpot": cfg.tpot,
                    "distinct_blocks": distinct},
        "cost": {"prefill_weight": cost.prefill_weight, "request_weight": cost.request_weight,
                 "cpu_pinned_weight": cost.cpu_pinned_weight, "disk_weight": cost.disk_weight,
                 "share_window": cost.share_window,
                 "share_bound": {"gpu_overlap": args.baseline_share_bound,
                                 "tier_aware": args.share_bound}},
        "meta": _meta.run_meta(args.seed)}
    if args.json:
        json.dump(doc, sys.stdout)
        sys.stdout.write("\n")
    else:
        print(format_table(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

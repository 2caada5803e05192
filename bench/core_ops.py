"""Core operation throughput of the block manager, on one core.

Measures, in one run: block hashing (local + sequence), ``match_prefix`` latency for a
1,000-block prompt (hashing included; full hit and full miss), slot allocate/free in
batches of 64 (allocator alone and through ``BlockManager.allocate/release``), and commit
throughput. Each figure is printed next to its target and next to a reference measured in
the same run (the floor Python itself imposes on that kind of work), as a ratio.

    python bench/core_ops.py [--json] [--repeat N] [--seed S]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import xxhash

from kvbm import BlockManager, DeviceTierConfig, HostTierConfig, KVLayout, ManagerConfig
from kvbm.hashing import _accel, hash_blocks
from kvbm.pool import SlotAllocator

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:  # loaded by path (tests)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _meta

BS = 16


def timed(fn: Callable[[], Any], repeat: int) -> list[float]:
    """Seconds of each of ``repeat`` runs of ``fn``."""
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def best_of(fn: Callable[[], Any], repeat: int) -> float:
    """The fastest run: the least disturbed by a shared machine (throughput figures)."""
    return min(timed(fn, repeat))


def median_of(fn: Callable[[], Any], repeat: int) -> float:
    """The median run (latency figures)."""
    return statistics.median(timed(fn, repeat))


def bench_hash(repeat: int, seed: int) -> dict[str, Any]:
    n = 100_000
    toks = np.random.default_rng(seed).integers(0, 2**31, n * BS).astype(np.uint32)
    t = best_of(lambda: hash_blocks(toks, BS), repeat)
    buf = toks.tobytes()
    # reference: one xxh3 pass over the same bytes (memory-speed hashing, no per-block work)
    ref = best_of(lambda: xxhash.xxh3_64_intdigest(buf), repeat)
    return {"op": "hash_blocks (local+sequence)", "unit": "blocks/s", "value": n / t,
            "target": 5e6, "reference": n / ref, "reference_name": "one xxh3 over all bytes"}


def bench_match(repeat: int, seed: int) -> list[dict[str, Any]]:
    layout = KVLayout(1, 1, 4, BS, "float16")
    mgr = BlockManager(layout, ManagerConfig(device=DeviceTierConfig(1200, device="cpu")))
    toks = np.random.default_rng(seed + 1).integers(0, 2**31, 1000 * BS).astype(np.uint32)
    m = mgr.match_prefix(toks)
    ids = mgr.allocate(1000)
    mgr.release(mgr.commit(ids, toks, hashes=m.hashes))
    hit = median_of(lambda: mgr.match_prefix(toks), repeat * 20)
    miss_toks = toks + 1
    miss = median_of(lambda: mgr.match_prefix(miss_toks), repeat * 20)
    as_list = toks.tolist()
    hit_list = median_of(lambda: mgr.match_prefix(as_list), repeat * 20)
    hashes = hash_blocks(toks, BS).sequence
    table = {h: h for h in hashes}
    ref = median_of(lambda: [table.get(h) for h in hashes], repeat * 20)
    rows = []
    for name, t in (("match_prefix 1k blocks, full hit", hit),
                    ("match_prefix 1k blocks, miss", miss),
                    ("match_prefix 1k blocks, full hit, list input", hit_list)):
        rows.append({"op": name, "unit": "us", "value": t * 1e6, "target": 500.0,
                     "reference": ref * 1e6, "reference_name": "1k dict lookups"})
    assert mgr.match_prefix(toks).num_blocks == 1000
    return rows


def bench_alloc(repeat: int) -> list[dict[str, Any]]:
    n_slots, batch, rounds = 65_536, 64, 1000
    alloc = SlotAllocator(n_slots)

    def allocator() -> None:
        for _ in range(rounds):
            got = alloc.allocate(batch)
            alloc.free(got)

    free_list = list(range(n_slots))

    def reference() -> None:  # the cheapest Python free list: pop/extend on a list of ints
        for _ in range(rounds):
            got = free_list[-batch:]
            del free_list[-batch:]
            free_list.extend(got)

    layout = KVLayout(1, 1, 4, BS, "float16")
    mgr = BlockManager(layout, ManagerConfig(device=DeviceTierConfig(n_slots, device="cpu")))

    def manager() -> None:
        for _ in range(rounds):
            mgr.release(mgr.allocate(batch))

    ops = rounds * batch
    ref = ops / best_of(reference, repeat)
    return [
        {"op": "SlotAllocator allocate+free, batches of 64", "unit": "blocks/s",
         "value": ops / best_of(allocator, repeat), "target": 1e6, "reference": ref,
         "reference_name": "list slice pop/extend"},
        {"op": "BlockManager allocate+release, batches of 64", "unit": "blocks/s",
         "value": ops / best_of(manager, repeat), "target": 1e6, "reference": ref,
         "reference_name": "list slice pop/extend"},
    ]


def bench_commit(repeat: int, seed: int) -> list[dict[str, Any]]:
    layout = KVLayout(1, 1, 4, BS, "float16")
    n_req, blocks = 200, 64
    rng = np.random.default_rng(seed + 2)
    reqs = [rng.integers(0, 2**31, blocks * BS).astype(np.uint32) for _ in range(n_req)]
    hashes = [hash_blocks(t, BS) for t in reqs]
    rows = []
    for name, host in (("commit (G1 only)", None), ("commit + eager offload to G2",
                                                     HostTierConfig(n_req * blocks))):
        def run(host: HostTierConfig | None = host) -> None:
            mgr = BlockManager(layout, ManagerConfig(
                device=DeviceTierConfig(n_req * blocks, device="cpu"), host=host))
            for t, h in zip(reqs, hashes, strict=True):
                ids = mgr.allocate(blocks)
                mgr.commit(ids, t, hashes=h)
        t = best_of(run, repeat)
        rows.append({"op": name + ", batches of 64", "unit": "blocks/s",
                     "value": n_req * blocks / t, "target": None, "reference": None,
                     "reference_name": ""})
    return rows


#: Per unit: how values print, the column unit, and whether lower is better.
_UNITS = {"blocks/s": (1e-6, "{:,.3f}", "M blocks/s", False), "us": (1.0, "{:,.0f}", "us", True)}


def compare(rows: list[dict[str, Any]]) -> None:
    """Add ``vs_target`` and ``ratio`` to each row (> 1: better than the target, faster than
    the reference), whichever way its unit runs."""
    for r in rows:
        lower_is_better = _UNITS[r["unit"]][3]
        if r["target"]:
            r["vs_target"] = (r["target"] / r["value"]) if lower_is_better else \
                r["value"] / r["target"]
        if r["reference"]:
            r["ratio"] = (r["reference"] / r["value"]) if lower_is_better else \
                r["value"] / r["reference"]


def format_rows(rows: list[dict[str, Any]]) -> str:
    """One text table per unit, the unit in every numeric column's header."""
    out: list[str] = []
    for unit, (scale, fmt, label, _) in _UNITS.items():
        group = [r for r in rows if r["unit"] == unit]
        if not group:
            continue
        w = max(len(label) + 7, 12)
        head = (f"{'operation':46}  {label:>{w}}  {'target ' + label:>{w}}  {'vs target x':>11}"
                f"  {'reference ' + label:>{w + 3}}  {'ratio x':>7}  reference measured as")
        out += ["", head, "-" * len(head)]
        def num(v: float | None, fmt: str = fmt, scale: float = scale) -> str:
            return "-" if not v else fmt.format(v * scale)

        for r in group:
            vt = f"{r['vs_target']:.2f}" if "vs_target" in r else "-"
            ratio = f"{r['ratio']:.2f}" if "ratio" in r else "-"
            out.append(f"{r['op']:46}  {num(r['value']):>{w}}  {num(r['target']):>{w}}  "
                       f"{vt:>11}  {num(r['reference']):>{w + 3}}  {ratio:>7}  "
                       f"{r['reference_name'] or '-'}")
    return "\n".join(out[1:])


def build_parser() -> argparse.ArgumentParser:
    ap = _meta.parser(__doc__)
    ap.add_argument("--json", action="store_true", help="print one JSON document only")
    ap.add_argument("--repeat", type=int, default=5,
                    help="timed runs per figure: the best is kept for a throughput, the median "
                         "of 20x as many for a latency")
    ap.add_argument("--seed", type=_meta.seed, default=0,
                    help="seed of the random tokens (each section adds its offset, 0 to 2)")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error("--repeat must be >= 1")
    rows = [bench_hash(args.repeat, args.seed), *bench_match(args.repeat, args.seed),
            *bench_alloc(args.repeat), *bench_commit(args.repeat, args.seed)]
    compare(rows)
    meta = {**_meta.run_meta(args.seed), "native_hashing": _accel is not None,
            "repeat": args.repeat}
    if args.json:
        print(json.dumps({"meta": meta, "rows": rows}))
        return 0
    m = meta["machine"]
    print(f"kvbm {meta['kvbm_version']} ({(meta['git_commit'] or 'no git')[:12]}); "
          f"{m['cpu']}, {m['cores']} cores; native hashing: {meta['native_hashing']}; "
          f"seed {args.seed}")
    print(format_rows(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

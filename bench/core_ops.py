"""Core operation throughput of the block manager, on one core.

Measures, in one run: block hashing (local + sequence), ``match_prefix`` latency for a
1,000-block prompt (hashing included; full hit and full miss), slot allocate/free in
batches of 64 (allocator alone and through ``BlockManager.allocate/release``), and commit
throughput. Each figure is printed next to its target and next to a reference measured in
the same run (the floor Python itself imposes on that kind of work), as a ratio.

Then the scale of the prefix index ("index scale"): for each size in ``--index-sizes``, a
fresh process builds an index of that many blocks (chains of 1,000, as on a disk tier: no
tokens kept) and reports its resident memory per block (RSS delta) and the latency of a
1,000-block prefix match (median and p99 over 200 full hits and 200 full misses, hashes
given as a list), as ratios to the targets (200 bytes, 200 us; <= 1 meets them): the
compact index (``kvbm.lab.compact_index``) at every size, the object index of the block
manager today (``kvbm.index.PrefixIndex`` of ``BlockRecord``, built as the manager builds
them, tokens included) up to 1 M blocks.

    python bench/core_ops.py [--json] [--repeat N] [--seed S] [--index-sizes SIZES]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import xxhash

from kvbm import BlockManager, DeviceTierConfig, HostTierConfig, KVLayout, ManagerConfig
from kvbm.hashing import _accel, hash_blocks
from kvbm.index import BlockRecord, PrefixIndex
from kvbm.lab.compact_index import CompactIndex
from kvbm.medium import Medium
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


# ------------------------------------------------------------------------ index scale --
INDEX_SIZES = {"10k": 10_000, "1M": 1_000_000, "10M": 10_000_000}
#: The object index is measured up to this size (1 M blocks already cost about 1 GB).
OBJECT_INDEX_MAX = 1_000_000
CHAIN = 1000  # blocks per indexed chain, and per matched prompt
QUERIES = 200  # prompts timed per kind (hit, miss)
BYTES_TARGET, MATCH_US_TARGET = 200.0, 200.0


def index_sizes(text: str) -> list[int]:
    """``--index-sizes``: a comma-separated list of 10k, 1M and 10M, or ``none``."""
    if text.strip().lower() == "none":
        return []
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in names if t not in INDEX_SIZES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"sizes are a comma-separated list of "
                                         f"{', '.join(INDEX_SIZES)} (or none), got {text!r}")
    return sorted({INDEX_SIZES[t] for t in names})


def _rss() -> int:
    """Resident bytes of this process now (Linux /proc; 0 where it cannot be read)."""
    try:
        with open("/proc/self/statm") as fp:
            return int(fp.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _chain(seed: int, c: int) -> tuple[np.ndarray, np.ndarray]:
    """Sequence and local hashes of chain ``c``: regenerated on demand, so that the inputs
    held while measuring are one chain, not the whole index."""
    rng = np.random.default_rng([seed, c])
    return (rng.integers(0, 1 << 64, CHAIN, dtype=np.uint64),
            rng.integers(0, 1 << 64, CHAIN, dtype=np.uint64))


def _build_compact(n: int, seed: int) -> tuple[Any, Callable[[list[int]], int]]:
    ix = CompactIndex()
    for c in range(n // CHAIN):
        seq, local = _chain(seed, c)
        ix.insert_chain(seq, local, None, Medium.DISK.bit)
    return ix, ix.match


def _build_objects(n: int, seed: int) -> tuple[Any, Callable[[list[int]], int]]:
    """As ``BlockManager.commit`` builds them: one record per block, its tokens' bytes
    sliced from the request's, Python ints for the hashes, a set of children per parent."""
    ix = PrefixIndex()
    bit = Medium.DISK.bit
    for c in range(n // CHAIN):
        seq, local = (a.tolist() for a in _chain(seed, c))
        tok = np.random.default_rng([seed, c, 1]).integers(
            0, 2**31, CHAIN * BS, dtype=np.uint32).tobytes()
        parent = None
        for i in range(CHAIN):
            rec = BlockRecord(seq[i], local[i], parent, tok[i * BS * 4:(i + 1) * BS * 4], None)
            rec.mask = bit
            ix.insert(rec)
            parent = rec
    return ix, lambda q: len(ix.match(q))


def _build_manager(n: int, seed: int) -> tuple[Any, Callable[[list[int]], int]]:
    """A block manager holding ``n`` blocks only below host memory, as compaction leaves
    them (its table of unlinked pages, flagged announced: what it keeps per such block);
    matched through ``match_hashes``, the public call. Filling the table directly stands in
    for writing ``n`` pages through a disk tier (hours at 10 M)."""
    from kvbm import BlockManager, HostTierConfig, KVLayout, ManagerConfig
    from kvbm.core.tier_state import ANNOUNCED
    from kvbm.hashing import BlockHashes

    mgr = BlockManager(KVLayout(1, 1, 8, BS, "float16"),
                       ManagerConfig(device=None, host=HostTierConfig(16)))
    table = mgr._orphans
    flags = ANNOUNCED | Medium.DISK.bit
    for c in range(n // CHAIN):
        for h in _chain(seed, c)[0].tolist():
            table[h] = flags
    mgr._announced = len(table)

    def match(q: list[int]) -> int:
        hashes = BlockHashes(q, q)
        object.__setattr__(hashes, "_computed", True)  # as hash_blocks makes them
        return mgr.match_hashes(hashes).num_blocks

    return mgr, match


def _latencies(match: Callable[[list[int]], int], queries: list[list[int]],
               expect: int) -> tuple[float, float]:
    """Median and p99 of one match per query, in us."""
    times = []
    for q in queries:
        t = time.perf_counter()
        got = match(q)
        times.append(time.perf_counter() - t)
        assert got == expect, (got, expect)
    times.sort()
    return (statistics.median(times) * 1e6,
            times[min(len(times) - 1, round(0.99 * (len(times) - 1)))] * 1e6)


def index_child(kind: str, n: int, seed: int) -> dict[str, Any]:
    """One measurement, in a fresh process (run by :func:`bench_index_scale`)."""
    build = {"compact": _build_compact, "manager": _build_manager}.get(kind, _build_objects)
    # A small index first, dropped: one-time costs (lazy imports, first-call caches) are not
    # the index's, and would weigh on the small sizes.
    warm = build(CHAIN, seed + 7)
    del warm
    gc.collect()
    before = _rss()
    t = time.perf_counter()
    ix, match = build(n, seed)
    built = time.perf_counter() - t
    gc.collect()
    grown = _rss() - before
    chains = n // CHAIN
    hits = [_chain(seed, c % chains)[0].tolist() for c in range(min(QUERIES, chains))]
    hits = (hits * (QUERIES // len(hits) + 1))[:QUERIES]
    misses = [_chain(seed + 1, c)[0].tolist() for c in range(QUERIES)]
    hit = _latencies(match, hits, CHAIN)
    miss = _latencies(match, misses, 0)
    arrays = (ix.memory_bytes() if kind == "compact" else
              ix._orphans.nbytes() if kind == "manager" else None)
    blocks = ix.stats().indexed_blocks if kind == "manager" else len(ix)
    return {"index": kind, "blocks": blocks, "bytes_per_block": grown / n,
            "array_bytes_per_block": None if arrays is None else arrays / n,
            "build_s": built, "hit_us_median": hit[0], "hit_us_p99": hit[1],
            "miss_us_median": miss[0], "miss_us_p99": miss[1]}


def bench_index_scale(sizes: list[int], seed: int) -> list[dict[str, Any]]:
    here = os.path.dirname(os.path.abspath(__file__))
    rows = []
    for n in sizes:
        for kind in ("manager", "compact", "PrefixIndex"):
            if kind == "PrefixIndex" and n > OBJECT_INDEX_MAX:
                continue
            code = (f"import sys, json; sys.path.insert(0, {here!r}); import core_ops; "
                    f"print(json.dumps(core_ops.index_child({kind!r}, {n}, {seed})))")
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True,
                                  text=True, check=False)
            if proc.returncode != 0:
                raise RuntimeError(f"index scale ({kind}, {n} blocks) failed:\n{proc.stderr}")
            row = json.loads(proc.stdout)
            worst = max(row["hit_us_median"], row["miss_us_median"])
            row.update(bytes_target=BYTES_TARGET, match_us_target=MATCH_US_TARGET,
                       bytes_x_target=row["bytes_per_block"] / BYTES_TARGET,
                       match_x_target=worst / MATCH_US_TARGET)
            rows.append(row)
    return rows


def format_index_scale(rows: list[dict[str, Any]]) -> str:
    head = (f"{'index scale':12}  {'blocks':>10}  {'RSS B/block':>11}  {'x 200 B':>7}  "
            f"{'arrays B/block':>14}  {'build s':>7}  {'hit us med':>10}  {'hit us p99':>10}  "
            f"{'miss us med':>11}  {'miss us p99':>11}  {'x 200 us':>8}")
    out = [head, "-" * len(head)]
    for r in rows:
        arrays = "-" if r["array_bytes_per_block"] is None else f"{r['array_bytes_per_block']:.0f}"
        out.append(f"{r['index']:12}  {r['blocks']:>10,}  {r['bytes_per_block']:>11.0f}  "
                   f"{r['bytes_x_target']:>7.2f}  {arrays:>14}  {r['build_s']:>7.1f}  "
                   f"{r['hit_us_median']:>10.0f}  {r['hit_us_p99']:>10.0f}  "
                   f"{r['miss_us_median']:>11.0f}  {r['miss_us_p99']:>11.0f}  "
                   f"{r['match_x_target']:>8.2f}")
    out.append("x 200 B: RSS bytes per block / 200; x 200 us: the slower median (hit, miss) / "
               "200 (<= 1 meets the target)")
    return "\n".join(out)


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
                    help="seed of the random tokens (each section adds its offset, 0 to 3)")
    ap.add_argument("--index-sizes", type=index_sizes, default="10k,1M,10M",
                    help="indexed blocks of the index scale report: a comma-separated list "
                         "of 10k, 1M, 10M (10M: about 15 s and 1.7 GB at its peak), or none")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error("--repeat must be >= 1")
    rows = [bench_hash(args.repeat, args.seed), *bench_match(args.repeat, args.seed),
            *bench_alloc(args.repeat), *bench_commit(args.repeat, args.seed)]
    compare(rows)
    scale = bench_index_scale(args.index_sizes, args.seed + 3)
    meta = {**_meta.run_meta(args.seed), "native_hashing": _accel is not None,
            "repeat": args.repeat}
    if args.json:
        print(json.dumps({"meta": meta, "rows": rows, "index_scale": scale}))
        return 0
    m = meta["machine"]
    print(f"kvbm {meta['kvbm_version']} ({(meta['git_commit'] or 'no git')[:12]}); "
          f"{m['cpu']}, {m['cores']} cores; native hashing: {meta['native_hashing']}; "
          f"seed {args.seed}")
    print(format_rows(rows))
    if scale:
        print()
        print(format_index_scale(scale))
    return 0


if __name__ == "__main__":
    sys.exit(main())

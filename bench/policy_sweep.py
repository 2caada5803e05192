"""Replay traces at several host-tier sizes and print one hit-ratio table per trace.

    python bench/policy_sweep.py --trace conversation_trace.jsonl --trace chat.jsonl \\
        [--capacity-fraction 0.01,0.02,0.03,0.05,0.1,0.2,0.5] \\
        [--policy lru --policy predictive] [--jobs 2] [--model] [--out DIR] [--json]
    python bench/policy_sweep.py --generate chat:1 --generate code:7 [--requests 12000]

Each (trace, fraction) cell is one ``bench/policy_replay.py --json`` process, up to
``--jobs`` at a time (results come back as JSON on stdout: nothing is pickled between
processes). ``--out DIR`` keeps each cell's document as ``DIR/NAME-FRACTION.json``; ``--json``
prints ``{"traces": {NAME: {FRACTION: document}}, "meta": ...}`` instead of the tables. The
tables are the ones in docs/policies.md: each policy's hit ratio and its ratio to LRU, Belady,
and the share of the LRU -> Belady gap the configured default closes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from kvbm.lab.replay import format_sweep, parse_fractions
from kvbm.lab.workload import FAMILIES

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:  # loaded by path (tests)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _meta

DEFAULT_FRACTIONS = (0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 0.5)
REPLAY = Path(__file__).resolve().parent / "policy_replay.py"


def _fractions(text: str) -> list[float]:
    try:
        return parse_fractions(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _generated(spec: str) -> tuple[str, int]:
    family, _, seed = spec.partition(":")
    if family not in FAMILIES:
        raise argparse.ArgumentTypeError(f"{spec!r}: the family is one of "
                                         f"{', '.join(sorted(FAMILIES))}")
    try:
        return family, _meta.seed(seed or "0")
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected FAMILY[:SEED] with SEED an integer >= 0, "
                                         f"got {spec!r}") from None


def _cells(args: argparse.Namespace) -> list[tuple[str, float, list[str]]]:
    """(trace name, fraction, policy_replay.py arguments) for every cell."""
    common = ["--block-size", str(args.block_size), "--json", *(["--model"] if args.model else []),
              *(["--write-back"] if args.write_back else [])]
    for p in args.policy or []:
        common += ["--policy", p]
    sources: list[tuple[str, list[str]]] = []
    for path in args.trace or []:
        sources.append((Path(path).stem, ["--trace", path]))
    for family, seed in args.generate or []:
        sources.append((f"{family}-s{seed}", ["--generate", "--family", family, "--seed",
                                              str(seed), "--requests", str(args.requests)]))
    names = [n for n, _ in sources]
    if len(set(names)) != len(names):
        raise SystemExit(f"policy_sweep: two traces have the same name: {sorted(names)}")
    return [(name, f, [*src, "--capacity-fraction", repr(f), *common])
            for name, src in sources for f in args.capacity_fraction]


def _replay(cell: tuple[str, float, list[str]]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(REPLAY), *cell[2]], capture_output=True,
                          text=True, check=False)


def sweep(args: argparse.Namespace) -> dict[str, dict[float, dict[str, Any]]]:
    cells = _cells(args)
    out: dict[str, dict[float, dict[str, Any]]] = {}
    failed: list[str] = []
    # Threads only wait on the replay processes; each answers with one JSON document.
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for (name, f, _), proc in zip(cells, pool.map(_replay, cells), strict=True):
            if proc.returncode != 0:
                failed.append(f"{name} at {f:g}: {proc.stderr.strip().splitlines()[-1:]}")
                continue
            doc = json.loads(proc.stdout)
            out.setdefault(name, {})[f] = doc
            if args.out:
                Path(args.out, f"{name}-{f:g}.json").write_text(json.dumps(doc) + "\n")
            print(f"  {name} {f:g}: done", file=sys.stderr)
    if failed:
        raise SystemExit("policy_sweep: replays failed:\n  " + "\n  ".join(failed))
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = _meta.parser(__doc__)
    ap.add_argument("--trace", action="append", metavar="FILE",
                    help="Mooncake-format JSON-lines file (repeatable)")
    ap.add_argument("--generate", action="append", type=_generated, metavar="FAMILY[:SEED]",
                    help="a generated trace instead (repeatable), e.g. chat:1 (seed 0 if "
                         "not given)")
    ap.add_argument("--requests", type=int, default=12000,
                    help="requests to generate (with --generate)")
    ap.add_argument("--capacity-fraction", type=_fractions,
                    default=",".join(f"{f:g}" for f in DEFAULT_FRACTIONS), metavar="F[,F...]",
                    help="host tier sizes as fractions of the distinct blocks, in (0, 1]")
    # The name before the scripts agreed on one: still accepted, no longer shown.
    ap.add_argument("--fractions", type=_fractions, dest="capacity_fraction",
                    help=argparse.SUPPRESS)
    ap.add_argument("--policy", action="append", metavar="NAME",
                    help="EVICTION[+ADMISSION], repeatable (default: every eviction policy "
                         "and the configured default)")
    ap.add_argument("--block-size", type=int, default=16,
                    help="tokens each trace block (hash id) stands for in the replay")
    ap.add_argument("--model", action="store_true",
                    help="policy-level model instead of the manager (same hit ratios, faster)")
    ap.add_argument("--write-back", action="store_true",
                    help="offload to the host tier only on G1 eviction (see policy_replay.py)")
    ap.add_argument("--jobs", type=int, default=2, help="replays run side by side")
    ap.add_argument("--out", metavar="DIR", help="also write each cell's JSON document here")
    ap.add_argument("--json", action="store_true", help="print one JSON document only")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if not args.trace and not args.generate:
        ap.error("give at least one --trace or --generate")
    if args.jobs < 1:
        ap.error("--jobs must be at least 1")
    if args.requests < 1 or args.block_size < 1:
        ap.error("--requests and --block-size must be positive")
    for path in args.trace or []:
        if not Path(path).is_file():
            ap.error(f"no such trace file: {path}")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
    results = sweep(args)
    if args.json:
        seeds = {f"{family}-s{seed}": seed for family, seed in args.generate or []}
        json.dump({"traces": {n: {repr(f): d for f, d in docs.items()}
                              for n, docs in results.items()},
                   "meta": _meta.run_meta(seeds or None)}, sys.stdout)
        sys.stdout.write("\n")
    else:
        for name, docs in results.items():
            print(format_sweep(name, list(docs.values())))
            print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Write a synthetic request trace in Mooncake's public format (see kvbm/lab/workload.py).

    python bench/make_trace.py --family chat --requests 12000 --seed 1 --out chat.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any

from kvbm.lab.workload import FAMILIES, generate, summarize, write

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:  # loaded by path (tests)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _meta

_FAMILY = "(default: the family's)"


def build_parser() -> argparse.ArgumentParser:
    ap = _meta.parser(__doc__)
    ap.add_argument("--out", help="output file (default: stdout)")
    ap.add_argument("--requests", type=int, default=12000, help="requests to generate")
    ap.add_argument("--seed", type=_meta.seed, default=0, help="seed of the generated trace")
    ap.add_argument("--family", choices=sorted(FAMILIES), default="chat",
                    help="workload parameter set (see kvbm/lab/workload.py)")
    ap.add_argument("--block-size", type=int, default=512,
                    help="tokens per trace block: one hash id per this many prompt tokens "
                         "(Mooncake: 512)")
    ap.add_argument("--rate", type=float, help=f"requests per second {_FAMILY}")
    ap.add_argument("--system-prompts", type=int,
                    help=f"distinct system prompts {_FAMILY}")
    ap.add_argument("--system-zipf", type=float,
                    help=f"Zipf exponent of system prompt popularity {_FAMILY}")
    ap.add_argument("--single-shot", type=float,
                    help=f"fraction of one-request sessions {_FAMILY}")
    ap.add_argument("--turns", type=float, help=f"mean turns of a conversation {_FAMILY}")
    ap.add_argument("--think-seconds", type=float,
                    help=f"median think time between turns, seconds {_FAMILY}")
    ap.add_argument("--doc-fraction", type=float,
                    help=f"fraction of sessions that carry a shared document {_FAMILY}")
    ap.add_argument("--doc-zipf", type=float,
                    help=f"Zipf exponent of document popularity {_FAMILY}")
    ap.add_argument("--documents", type=int, help=f"distinct shared documents {_FAMILY}")
    ap.add_argument("--stats", action="store_true",
                    help="print a summary on stderr (always, with --out)")
    return ap


#: Workload options: (lowest, highest, whether the lowest itself is allowed). Outside these
#: the generator fails deep in numpy or, for a NaN rate, never returns.
_RANGES: dict[str, tuple[float, float, bool]] = {
    "rate": (0.0, math.inf, False), "system_prompts": (1, math.inf, True),
    "system_zipf": (0.0, math.inf, True), "single_shot": (0.0, 1.0, True),
    "turns": (1.0, math.inf, True), "think_seconds": (0.0, math.inf, False),
    "doc_fraction": (0.0, 1.0, True), "doc_zipf": (0.0, math.inf, True),
    "documents": (1, math.inf, True),
}


def _check_ranges(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name, (lo, hi, lo_ok) in _RANGES.items():
        v = getattr(args, name)
        if v is None:
            continue
        if not (math.isfinite(v) and (v >= lo if lo_ok else v > lo) and v <= hi):
            opt = "--" + name.replace("_", "-")
            want = (f"in [{lo:g}, {hi:g}]" if math.isfinite(hi)
                    else f"{'>=' if lo_ok else '>'} {lo:g}")
            ap.error(f"{opt} must be a finite number {want}, got {v}")


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.requests < 1 or args.block_size < 1:
        ap.error("--requests and --block-size must be positive")
    _check_ranges(ap, args)
    over: dict[str, Any] = {}
    for name in ("rate", "system_prompts", "system_zipf", "single_shot", "turns",
                 "doc_fraction", "doc_zipf", "documents"):
        v = getattr(args, name)
        if v is not None:
            over[name] = v
    if args.think_seconds is not None:
        over["think_seconds"] = (args.think_seconds, FAMILIES[args.family].think_seconds[1])
    recs = generate(args.requests, seed=args.seed, family=args.family,
                    block_size_tokens=args.block_size, **over)
    if args.out:
        try:
            with open(args.out, "w") as fp:
                write(recs, fp)
        except OSError as e:
            ap.error(f"--out {args.out}: {e.strerror or e}")
    else:
        try:
            write(recs, sys.stdout)
            sys.stdout.flush()
        except BrokenPipeError:  # ``| head``: the reader has what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 1
    if args.stats or args.out:
        print(json.dumps(summarize(recs)), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

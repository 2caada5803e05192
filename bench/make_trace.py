"""Write a synthetic request trace in Mooncake's public format (see kvbm/workload.py).

    python bench/make_trace.py --family chat --requests 12000 --seed 1 --out chat.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from kvbm.workload import FAMILIES, generate, summarize, write


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="output file (default: stdout)")
    ap.add_argument("--requests", type=int, default=12000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--family", choices=sorted(FAMILIES), default="chat",
                    help="workload parameter set (see the module docstring)")
    ap.add_argument("--block-size-tokens", type=int, default=512,
                    help="tokens per hash id (Mooncake: 512)")
    ap.add_argument("--rate", type=float, help="requests per second")
    ap.add_argument("--system-prompts", type=int)
    ap.add_argument("--system-zipf", type=float)
    ap.add_argument("--single-shot", type=float, help="fraction of one-request sessions")
    ap.add_argument("--turns", type=float, help="mean turns of a conversation")
    ap.add_argument("--think-seconds", type=float, help="median think time")
    ap.add_argument("--doc-fraction", type=float)
    ap.add_argument("--doc-zipf", type=float)
    ap.add_argument("--documents", type=int)
    ap.add_argument("--stats", action="store_true", help="print a summary on stderr")
    args = ap.parse_args(argv)
    over: dict[str, Any] = {}
    for name in ("rate", "system_prompts", "system_zipf", "single_shot", "turns",
                 "doc_fraction", "doc_zipf", "documents"):
        v = getattr(args, name)
        if v is not None:
            over[name] = v
    if args.think_seconds is not None:
        over["think_seconds"] = (args.think_seconds, FAMILIES[args.family].think_seconds[1])
    recs = generate(args.requests, seed=args.seed, family=args.family,
                    block_size_tokens=args.block_size_tokens, **over)
    if args.out:
        with open(args.out, "w") as fp:
            write(recs, fp)
    else:
        write(recs, sys.stdout)
    if args.stats or args.out:
        print(json.dumps(summarize(recs)), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

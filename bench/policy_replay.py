"""Replay a Mooncake-format trace through the BlockManager and compare host-tier policies.

    python bench/policy_replay.py --trace FILE --capacity-fraction 0.03 \\
        [--policy lru --policy lineage+frequency ...] [--block-size 16] [--model]
        [--write-back] [--json]
    python bench/policy_replay.py --generate [--family rag] --capacity-fraction 0.03

Method (tokens per trace block, G1 sizing, Belady) in kvbm/lab/replay.py; results and the
choice of the default in docs/policies.md. With ``--json``, one JSON document:
``{"capacity_fraction", "blocks", "hit_ratio": {name: x, ..., "belady": y}, "default", ...,
"meta"}`` (``meta``: bench/_meta.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from kvbm.errors import KvbmError
from kvbm.lab.replay import STANDARD, default_name, format_table, generated_trace, run
from kvbm.lab.workload import FAMILIES

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:  # loaded by path (tests)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _meta


def build_parser() -> argparse.ArgumentParser:
    ap = _meta.parser(__doc__)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--trace", help="Mooncake-format JSON-lines file")
    src.add_argument("--generate", action="store_true",
                     help="generate a trace (as bench/make_trace.py does) instead")
    ap.add_argument("--capacity-fraction", type=float, required=True, metavar="F",
                    help="host tier size as a fraction of the trace's distinct blocks, in "
                         "(0, 1] (one; bench/policy_sweep.py takes several)")
    ap.add_argument("--policy", action="append", metavar="NAME",
                    help="EVICTION[+ADMISSION], repeatable (default: every eviction policy "
                         "and the configured default)")
    ap.add_argument("--block-size", type=int, default=16,
                    help="tokens each trace block (hash id) stands for in the replay")
    ap.add_argument("--model", action="store_true",
                    help="replay through the policy-level model (kvbm/lab/simulate.py: the "
                         "manager's hit ratios, several times faster) instead of the manager")
    ap.add_argument("--write-back", action="store_true",
                    help="offload to the host tier only when G1 evicts a block (the manager's "
                         "eager_offload = false) instead of at commit")
    ap.add_argument("--json", action="store_true", help="print one JSON document only")
    ap.add_argument("--requests", type=int, default=12000,
                    help="requests to generate (with --generate)")
    ap.add_argument("--seed", type=_meta.seed, default=0,
                    help="seed of the generated trace (with --generate)")
    ap.add_argument("--family", choices=sorted(FAMILIES), default="chat",
                    help="generated workload family (with --generate)")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if not 0 < args.capacity_fraction <= 1:
        ap.error("--capacity-fraction must be in (0, 1]")
    if args.block_size <= 0 or args.requests <= 0:
        ap.error("--block-size and --requests must be positive")
    if args.trace:
        trace = _meta.read_trace(ap, args.trace)
    else:
        try:
            trace = generated_trace(args.requests, args.seed, args.family)
        except KvbmError as e:
            ap.error(str(e))
    try:
        policies = args.policy or list(dict.fromkeys([*STANDARD, default_name()]))
        doc = run(trace, args.capacity_fraction, policies, block_size=args.block_size,
                  progress=not args.json and sys.stderr.isatty(), model=args.model,
                  eager_offload=not args.write_back)
    except KvbmError as e:
        ap.error(str(e))
    doc["meta"] = _meta.run_meta(args.seed if args.generate else None)
    if args.json:
        json.dump(doc, sys.stdout)
        sys.stdout.write("\n")
    else:
        print(format_table(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

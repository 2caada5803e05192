"""``kvbm demo``: replay a generated multi-turn workload through a tiered manager."""

from __future__ import annotations

import argparse
from typing import Any


def _run(args: argparse.Namespace) -> int:
    from kvbm.lab.demo import run_demo

    return run_demo(requests=args.requests, seed=args.seed, out_dir=args.dir)


def register(sub: Any) -> None:
    p = sub.add_parser("demo", help="replay a generated multi-turn workload and print hit tables",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--requests", type=int, default=3000, help="requests to replay")
    p.add_argument("--seed", type=int, default=7, help="workload seed")
    p.add_argument("--dir", default=".kvbm", help="working directory for tier data")
    p.set_defaults(fn=_run)

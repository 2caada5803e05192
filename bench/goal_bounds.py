"""How much of the hit-ratio goal any online policy could reach: LRU and the default policy
next to admission oracles that know part of the future, on generated traces.

    python bench/goal_bounds.py --family chat --seed 1 [--capacity-fraction 0.02,0.03,0.05]
                                [--requests 12000] [--block-size 16] [--json]
    python bench/goal_bounds.py --trace FILE [...]   # any Mooncake-format trace: no
                                                     # session oracle (no sessions known)

Replays through the policy-level model of the manager (kvbm/lab/simulate.py: G1 with
``lineage``, the host tier with the policy, eager offload). For each host-tier size it
gives LRU, the default policy, each of them behind two admission oracles, and Belady
(furthest next use over G1 + host capacity, the ceiling), every figure also as a ratio to
LRU in the same run:

* ``reuse`` oracle: admits a block to the host tier only if a later request uses it. It
  knows *which* blocks will be used again, not *when*.
* ``session`` oracle: knows, from the generator, whether each request belongs to a one-shot
  session or a conversation, which no cache can see in a real trace. It admits every block
  of a conversation's prompt but the last (partial) one, whether or not the conversation
  will go on, and otherwise only what a later request uses: it knows what a policy could
  learn by telling one-shot prompts from conversations, but not whether a conversation
  continues (a coin flip in the generator).

An online policy knows less than either oracle, so where the default policy behind an
oracle stays under a target, reaching the target takes information the trace does not hold
(docs/policies.md, "The 1.1x goal").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvbm.lab.replay import (
    belady,
    default_name,
    distinct_blocks,
    manager_keys,
    parse_fractions,
)
from kvbm.lab.simulate import simulate
from kvbm.lab.workload import FAMILIES, generate
from kvbm.policies.base import AdmissionPolicy

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:  # loaded by path (tests)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _meta


class ReuseOracle(AdmissionPolicy):
    """Admit a key only if a request after the current one uses it."""

    name = "reuse-oracle"

    def __init__(self, keys: Sequence[Sequence[int]]) -> None:
        self._last: dict[int, int] = {}
        for i, ids in enumerate(keys):
            for k in ids:
                self._last[k] = i
        self.current = 0

    def at(self, i: int) -> None:
        """The model is about to replay request ``i``."""
        self.current = i

    def admit(self, key: int) -> bool:
        return self._last.get(key, -1) > self.current


class SessionOracle(ReuseOracle):
    """Also admit every block of a conversation's prompt but its last one."""

    name = "session-oracle"

    def __init__(self, keys: Sequence[Sequence[int]], records: Sequence[dict[str, Any]]
                 ) -> None:
        super().__init__(keys)
        if len(records) != len(keys):
            raise ValueError(f"{len(records)} records for {len(keys)} requests")
        self._conversation = [int(r["turns"]) > 1 for r in records]
        self._last_block = [ids[-1] if ids else None for ids in keys]

    def admit(self, key: int) -> bool:
        i = self.current
        return super().admit(key) or (self._conversation[i] and key != self._last_block[i])


def bounds(records: Sequence[dict[str, Any]], fractions: Sequence[float], *,
           block_size: int = 16, policy: str | None = None) -> dict[str, Any]:
    """The ``--json`` document for ``records``; the session oracle only where every record
    has the generator's session fields (``workload.generate(..., sessions=True)``)."""
    policy = policy or default_name()
    sessions = bool(records) and all("turns" in r for r in records)
    trace = [r["hash_ids"] for r in records]
    keys = manager_keys(trace, block_size)
    distinct = distinct_blocks(trace)
    device = max((len(ids) for ids in trace), default=1)
    cells = []
    for f in fractions:
        cap = max(1, int(distinct * f))
        ratios: dict[str, float] = {}
        for ev in dict.fromkeys(["lru", policy]):
            ratios[ev] = simulate(keys, cap, ev, device_blocks=device)["hit_ratio"]
            oracles: list[tuple[str, ReuseOracle]] = [("reuse", ReuseOracle(keys))]
            if sessions:
                oracles.append(("session", SessionOracle(keys, records)))
            for label, oracle in oracles:
                ratios[f"{ev}+{label}-oracle"] = simulate(
                    keys, cap, ev, oracle, device_blocks=device,
                    before_request=oracle.at)["hit_ratio"]
        ratios["belady"] = belady(trace, cap + device)
        cells.append({"capacity_fraction": f, "blocks": cap, "hit_ratio": ratios})
    return {"requests": len(records), "distinct_blocks": distinct, "device_blocks": device,
            "default": policy, "cells": cells}


def format_bounds(doc: dict[str, Any], title: str) -> str:
    cells = doc["cells"]
    names = list(cells[0]["hit_ratio"]) if cells else []
    lines = [f"{title}: {doc['requests']} requests, {doc['distinct_blocks']} distinct blocks, "
             f"G1 {doc['device_blocks']} blocks; host tier sized in % of the distinct blocks",
             f"{'policy: hit ratio (x LRU)':<32}"
             + "".join(f"{'host ' + format(100 * c['capacity_fraction'], 'g') + '%':>18}"
                       for c in cells)]
    for name in names:
        row = f"{name:<32}"
        for c in cells:
            x, lru = c["hit_ratio"][name], c["hit_ratio"]["lru"]
            row += f"{x:>10.4f} ({x / lru if lru else float('nan'):5.3f})"
        lines.append(row)
    return "\n".join(lines)


def _fractions(text: str) -> list[float]:
    try:
        return parse_fractions(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    ap = _meta.parser(__doc__)
    ap.add_argument("--trace", help="a Mooncake-format JSON-lines file instead of a "
                    "generated trace (reuse oracle only)")
    ap.add_argument("--family", choices=sorted(FAMILIES), default="chat",
                    help="generated workload family")
    ap.add_argument("--seed", type=_meta.seed, default=0, help="seed of the generated trace")
    ap.add_argument("--requests", type=int, default=12000, help="requests to generate")
    ap.add_argument("--capacity-fraction", type=_fractions, default="0.02,0.03,0.05",
                    metavar="F[,F...]",
                    help="host tier sizes as fractions of the distinct blocks, in (0, 1]")
    # The name before the scripts agreed on one: still accepted, no longer shown.
    ap.add_argument("--fractions", type=_fractions, dest="capacity_fraction",
                    help=argparse.SUPPRESS)
    ap.add_argument("--block-size", type=int, default=16,
                    help="tokens each trace block (hash id) stands for in the replay")
    ap.add_argument("--json", action="store_true", help="print one JSON document only")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.requests < 1 or args.block_size < 1:
        ap.error("--requests and --block-size must be positive")
    if args.trace:
        records = [{"hash_ids": ids} for ids in _meta.read_trace(ap, args.trace)]
        title = Path(args.trace).stem
        doc = bounds(records, args.capacity_fraction, block_size=args.block_size)
        doc.update(trace=args.trace, meta=_meta.run_meta(None))
    else:
        records = generate(args.requests, seed=args.seed, family=args.family, sessions=True)
        title = f"{args.family} seed {args.seed}"
        doc = bounds(records, args.capacity_fraction, block_size=args.block_size)
        doc.update(family=args.family, seed=args.seed, meta=_meta.run_meta(args.seed))
    if args.json:
        json.dump(doc, sys.stdout)
        sys.stdout.write("\n")
    else:
        print(format_bounds(doc, title))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Replay a Mooncake-format trace through the BlockManager and compare host-tier policies.

    python bench/policy_replay.py --trace FILE --capacity-fraction 0.03 \\
        [--policy lru --policy lineage+frequency ...] [--block-size 16] [--json]
    python bench/policy_replay.py --generate [--family rag] --capacity-fraction 0.03

Each trace record (JSON lines: ``timestamp``, ``input_length``, ``output_length``,
``hash_ids``) is one request; each hash id is one block. A request hits the longest cached
run of its leading blocks (prefix semantics). Every request goes through the real manager,
as an engine would drive it: ``match_prefix`` -> ``onboard`` -> ``allocate`` -> ``commit``
-> ``release``, with committed blocks offloaded eagerly to the host tier.

* Tokens: hash id ``h`` becomes ``block_size`` tokens equal to ``h mod 2**32``; the chained
  block hashes then reproduce the trace's prefix identity. The layout is tiny (one layer,
  one head, head_dim 4) because this measures policy, not bytes.
* Host tier (G2): ``capacity-fraction`` x the trace's distinct blocks, with the policy under
  test (``EVICTION[+ADMISSION]``, e.g. ``lineage+frequency``).
* Device tier (G1): as small as the manager allows, i.e. the largest request's block count
  (a request pins its whole prefix there), with ``lineage`` eviction in every run so that
  only the host policy varies. G1 also serves hits, so Belady is computed for host + G1
  capacity, which keeps it an upper bound of every replay.
* Belady: furthest-next-use over the same trace, computed here: blocks never used again
  bypass the cache, ties go to the deeper block (its next use can be no earlier than its
  parent's, so the simulated cache stays prefix-closed and a cached block is a hit).

The hit ratio is hit blocks / requested blocks. Without ``--json`` a table shows each
policy next to LRU and the fraction of the LRU -> Belady gap it closes; with ``--json`` one
JSON document: ``{"capacity_fraction", "blocks", "hit_ratio": {name: x, ..., "belady": y},
"default": name, ...}``.
"""

from __future__ import annotations

import argparse
import json
import sys

from kvbm.errors import KvbmError
from kvbm.replay import STANDARD, default_name, format_table, generated_trace, load_trace, run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--trace", help="Mooncake-format JSON-lines file")
    src.add_argument("--generate", action="store_true",
                     help="generate a trace with bench/make_trace.py instead")
    ap.add_argument("--capacity-fraction", type=float, required=True,
                    help="host tier size as a fraction of the trace's distinct blocks")
    ap.add_argument("--policy", action="append", metavar="NAME",
                    help="EVICTION[+ADMISSION], repeatable (default: every eviction policy "
                         "and the configured default)")
    ap.add_argument("--block-size", type=int, default=16, help="tokens per trace block")
    ap.add_argument("--json", action="store_true", help="print one JSON document")
    ap.add_argument("--requests", type=int, default=12000, help="with --generate")
    ap.add_argument("--seed", type=int, default=0, help="with --generate")
    ap.add_argument("--family", default="chat", help="with --generate: chat, agent or rag")
    args = ap.parse_args(argv)
    if not 0 < args.capacity_fraction <= 1:
        ap.error("--capacity-fraction must be in (0, 1]")
    if args.block_size <= 0:
        ap.error("--block-size must be positive")
    try:
        trace = (load_trace(args.trace) if args.trace
                 else generated_trace(args.requests, args.seed, args.family))
        policies = args.policy or list(dict.fromkeys([*STANDARD, default_name()]))
        doc = run(trace, args.capacity_fraction, policies, block_size=args.block_size,
                  progress=not args.json and sys.stderr.isatty())
    except KvbmError as e:
        ap.error(str(e))
    if args.json:
        json.dump(doc, sys.stdout)
        sys.stdout.write("\n")
    else:
        print(format_table(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

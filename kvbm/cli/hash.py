"""``kvbm hash``: print the block hashes of some tokens."""

from __future__ import annotations

import argparse
from typing import Any


def _run(args: argparse.Namespace) -> int:
    from kvbm.hashing import hash_blocks

    h = hash_blocks([int(t) for t in args.tokens], args.block_size, lora_name=args.lora,
                    salt=args.salt)
    for i, (loc, seq) in enumerate(zip(h.local, h.sequence, strict=True)):
        print(f"block {i}: local {loc:#018x} sequence {seq:#018x}")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("hash", help="print the block hashes of some tokens")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--lora")
    p.add_argument("--salt")
    p.add_argument("tokens", nargs="+")
    p.set_defaults(fn=_run)

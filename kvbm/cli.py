"""The ``kvbm`` command (also ``python -m kvbm``)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from kvbm.errors import KvbmError


def _cmd_info(_: argparse.Namespace) -> int:
    import numpy
    import torch

    from kvbm import __version__
    from kvbm.hashing import _accel

    print(f"kvbm {__version__}")
    print(f"python {sys.version.split()[0]}, numpy {numpy.__version__}, torch {torch.__version__}")
    cuda = torch.cuda.is_available()
    print(f"cuda: {cuda}" + (f" ({torch.cuda.get_device_name(0)})" if cuda else
                            " (G1 runs on a CPU tensor, G2 is not pinned)"))
    print(f"native hashing: {'yes' if _accel is not None else 'no (pure-Python fallback)'}")
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    import dataclasses

    from kvbm.config import ManagerConfig

    cfg = ManagerConfig.from_toml(args.file) if args.file else ManagerConfig.from_env()
    print(json.dumps(dataclasses.asdict(cfg), indent=2))
    return 0


def _cmd_hash(args: argparse.Namespace) -> int:
    from kvbm.hashing import hash_blocks

    h = hash_blocks([int(t) for t in args.tokens], args.block_size, lora_name=args.lora,
                    salt=args.salt)
    for i, (loc, seq) in enumerate(zip(h.local, h.sequence, strict=True)):
        print(f"block {i}: local {loc:#018x} sequence {seq:#018x}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from kvbm.demo import run_demo

    return run_demo(requests=args.requests, seed=args.seed, out_dir=args.dir)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="kvbm", description="KV-cache block manager tools")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("demo", help="replay a generated multi-turn workload and print hit tables")
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--dir", default=".kvbm", help="working directory for tier data")
    p.set_defaults(fn=_cmd_demo)
    p = sub.add_parser("info", help="environment: torch, CUDA, native hashing")
    p.set_defaults(fn=_cmd_info)
    p = sub.add_parser("config", help="print the effective configuration")
    p.add_argument("--file", help="TOML file (KVBM_* variables override it)")
    p.set_defaults(fn=_cmd_config)
    p = sub.add_parser("hash", help="print the block hashes of some tokens")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--lora")
    p.add_argument("--salt")
    p.add_argument("tokens", nargs="+")
    p.set_defaults(fn=_cmd_hash)
    args = ap.parse_args(argv)
    try:
        rc: int = args.fn(args)
    except KvbmError as e:
        print(f"kvbm: error: {e}", file=sys.stderr)
        return 2
    return rc

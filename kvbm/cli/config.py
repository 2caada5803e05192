"""``kvbm config``: print the effective configuration."""

from __future__ import annotations

import argparse
import json
from typing import Any


def _run(args: argparse.Namespace) -> int:
    import dataclasses

    from kvbm.config import ManagerConfig

    cfg = ManagerConfig.from_toml(args.file) if args.file else ManagerConfig.from_env()
    print(json.dumps(dataclasses.asdict(cfg), indent=2))
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("config", help="print the effective configuration")
    p.add_argument("--file", help="TOML file (KVBM_* variables override it)")
    p.set_defaults(fn=_run)

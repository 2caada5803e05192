"""``kvbm config``: load, validate and print the effective configuration.

The file (if any) with ``KVBM_*`` variables applied, every default filled in, as JSON or as
TOML that loads back to the same configuration.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Mapping
from typing import Any


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return repr(value) if math.isfinite(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, str):
        # A JSON string is a TOML basic string, except that TOML also wants DEL escaped.
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


def to_toml(data: Mapping[str, Any], table: str = "") -> str:
    """``config_to_dict`` output as TOML. TOML has no null: an unset (``None``) key is written
    as a comment, which loads back as unset, the default of every optional key."""
    lines: list[str] = []
    tables: list[tuple[str, Mapping[str, Any]]] = []
    for key, value in data.items():
        if isinstance(value, Mapping):
            tables.append((f"{table}.{key}" if table else key, value))
        elif value is None:
            lines.append(f"# {key}: unset")
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    out = "\n".join(lines)
    for name, sub in tables:
        out += f"\n\n[{name}]\n" + to_toml(sub, name)
    return out.strip("\n") + "\n" if not table else out.strip("\n")


#: Keys whose values are credentials: printed as set or not, never their value (the output
#: of ``kvbm config`` ends up in logs and bug reports).
_SECRET_KEYS = frozenset({"secret", "password", "token", "secret_access_key",
                          "aws_secret_access_key", "session_token"})
REDACTED = "<redacted>"


def _redacted(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: (REDACTED if k in _SECRET_KEYS and v is not None else _redacted(v))
                for k, v in data.items()}
    if isinstance(data, list):
        return [_redacted(v) for v in data]
    return data


def _run(args: argparse.Namespace) -> int:
    from kvbm.config import ManagerConfig

    cfg = ManagerConfig.from_toml(args.file) if args.file else ManagerConfig.from_env()
    data = _redacted(cfg.to_dict())
    if args.toml:
        print(to_toml(data), end="")
    else:
        print(json.dumps(data, indent=2))
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("config", help="validate and print the effective configuration")
    p.add_argument("--file", help="TOML file (KVBM_* variables override it); without it, "
                                  "the KVBM_* variables alone")
    p.add_argument("--toml", action="store_true", help="print TOML instead of JSON")
    p.set_defaults(fn=_run)

"""The ``kvbm`` command (also ``python -m kvbm``).

One module per subcommand; each exposes ``register(subparsers)``. Only the chosen command's
module imports anything heavy, so ``kvbm --version`` and ``kvbm hash`` work without torch.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from kvbm.errors import KvbmError

#: Subcommand modules, in the order ``kvbm --help`` lists them.
_COMMANDS = ("demo", "info", "config", "hash", "stats")


def build_parser() -> argparse.ArgumentParser:
    import importlib

    from kvbm import __version__

    ap = argparse.ArgumentParser(prog="kvbm", description="KV-cache block manager tools")
    ap.add_argument("--version", action="version", version=f"kvbm {__version__}")
    sub = ap.add_subparsers(dest="cmd", metavar="COMMAND", required=True)
    for name in _COMMANDS:
        importlib.import_module(f"kvbm.cli.{name}").register(sub)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rc: int = args.fn(args)
        sys.stdout.flush()
    except KvbmError as e:
        print(f"kvbm: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (``kvbm config | head``): not an error of ours. Point stdout
        # at /dev/null so that the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return rc

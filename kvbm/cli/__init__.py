"""The ``kvbm`` command (also ``python -m kvbm``).

One module per subcommand; each exposes ``register(subparsers)``. Only the chosen command's
module imports anything heavy, so ``kvbm --version`` and ``kvbm hash`` work without torch.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from kvbm.errors import KvbmError

#: Subcommand modules, in the order ``kvbm --help`` lists them.
_COMMANDS = ("demo", "info", "config", "hash", "stats", "events", "router")


class _Parser(argparse.ArgumentParser):
    """Usage errors of every subcommand end in ``kvbm: error: ...`` like the errors found
    after parsing (argparse would say ``kvbm hash: error:``; the usage line above it still
    names the subcommand)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"kvbm: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    import importlib

    from kvbm import __version__

    ap = _Parser(prog="kvbm", description="KV-cache block manager tools")
    ap.add_argument("--version", action="version", version=f"kvbm {__version__}")
    sub = ap.add_subparsers(dest="cmd", metavar="COMMAND", required=True, parser_class=_Parser)
    for name in _COMMANDS:
        importlib.import_module(f"kvbm.cli.{name}").register(sub)
    ap.set_defaults(parser_of=sub.choices)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:  # reported by the subcommand's parser, whose usage is the one that helps
        args.parser_of[args.cmd].error(f"unrecognized arguments: {' '.join(unknown)}")
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

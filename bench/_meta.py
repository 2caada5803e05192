"""What the bench scripts share: their --help style and the ``meta`` of every --json document.

A benchmark figure is only comparable with another when both say what produced them, so
every ``--json`` document carries :func:`run_meta`: the kvbm version, the git commit of the
checkout (``null`` outside one) and whether it had uncommitted changes, the seed(s) of the
inputs, the command line, and the machine (cores, memory, CPU model, Python, platform).

The scripts run as ``python bench/NAME.py`` (this folder is then ``sys.path[0]``); loaded by
path (the tests do), each puts this folder on ``sys.path`` itself before importing this.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``(default: X)`` after every option's help, except where there is no value to show
    (``None``: the option is unset unless given; ``False``: a flag)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def seed(text: str) -> int:
    """``--seed``: numpy's generators take non-negative integers only."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"a seed is an integer >= 0, got {text!r}")
    return value


def parser(doc: str | None) -> argparse.ArgumentParser:
    """An ArgumentParser described by the first paragraph of a script's docstring."""
    return argparse.ArgumentParser(description=(doc or "").split("\n\n")[0],
                                   formatter_class=HelpFormatter)


def read_trace(ap: argparse.ArgumentParser, path: str) -> list[list[int]]:
    """A Mooncake-format trace's hash ids per request, or a usage error naming ``--trace``
    (missing, unreadable, malformed or empty)."""
    from kvbm.errors import KvbmError
    from kvbm.lab.replay import load_trace

    try:
        trace = load_trace(path)
    except OSError as e:
        ap.error(f"--trace {path}: {e.strerror or e}")
    except KvbmError as e:
        ap.error(str(e))
    if not trace:
        ap.error(f"--trace {path}: no requests in it (a Mooncake trace has one JSON record "
                 f"per line)")
    return trace


def _git(*args: str) -> str | None:
    try:
        proc = subprocess.run(["git", "-C", str(HERE), *args], capture_output=True,
                              text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def _memory_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as fp:
            for line in fp:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fp:
            for line in fp:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def machine() -> dict[str, Any]:
    """The machine a figure was measured on."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {"cores": os.cpu_count(), "cores_usable": usable, "memory_bytes": _memory_bytes(),
            "cpu": _cpu_model(), "python": platform.python_version(),
            "platform": platform.platform()}


def run_meta(seed: int | dict[str, int] | None) -> dict[str, Any]:
    """Metadata for a --json document. ``seed``: the seed of the generated inputs, one per
    generated trace where there are several, ``None`` where no input is seeded."""
    from kvbm import __version__

    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"kvbm_version": __version__, "git_commit": commit,
            "git_dirty": None if status is None else bool(status), "seed": seed,
            "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine()}


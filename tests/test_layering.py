"""One room, one job: what an engine imports is the runtime. The research and demo tooling
(``kvbm.lab``) is imported only by ``bench/``, the tests and the ``kvbm demo`` command."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: The runtime: what an engine, a router or the ``kvbm`` command (before a subcommand runs)
#: imports.
RUNTIME = ("kvbm", "kvbm.manager", "kvbm.config", "kvbm.hashing", "kvbm.offload", "kvbm.metrics",
           "kvbm.cli", "kvbm.tiers", "kvbm.storage", "kvbm.transports")
#: Where an import of kvbm.lab is allowed (relative to the repository root).
_ALLOWED = ("kvbm/lab/", "kvbm/cli/demo.py", "bench/", "tests/")
#: The code that ships or runs, searched for imports of kvbm.lab.
_SEARCHED = ("kvbm", "storage", "transports", "bench", "tests")


def _imports_lab(tree: ast.AST) -> list[int]:
    """Line numbers of the statements of ``tree`` that import kvbm.lab (or a module in it)."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        if any(n == "kvbm.lab" or n.startswith("kvbm.lab.") for n in names):
            lines.append(node.lineno)
    return lines


def test_runtime_imports_nothing_from_lab():
    # A child interpreter: this one has imported the tests' own modules already.
    code = ("import importlib, json, sys\n"
            f"for name in {RUNTIME!r}: importlib.import_module(name)\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('kvbm'))))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout
    loaded = json.loads(out)
    assert "kvbm.manager" in loaded  # the check sees what was imported
    assert not [m for m in loaded if m == "kvbm.lab" or m.startswith("kvbm.lab.")]


def test_no_module_outside_lab_bench_tests_imports_lab():
    offenders = []
    for top in _SEARCHED:
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel.startswith(_ALLOWED):
                continue
            lines = _imports_lab(ast.parse(path.read_text(), filename=rel))
            offenders += [f"{rel}:{n}" for n in lines]
    assert not offenders, f"runtime modules import kvbm.lab: {offenders}"


def test_the_static_check_sees_an_import_of_lab():
    # The check above must be able to fail: each spelling of an import of kvbm.lab is seen.
    for src in ("import kvbm.lab", "import kvbm.lab.replay as r", "from kvbm.lab import demo",
                "from kvbm.lab.workload import generate", "from kvbm import lab",
                "def f():\n    from kvbm.lab.bandwidth import quick_report\n"):
        assert _imports_lab(ast.parse(src)), src
    assert not _imports_lab(ast.parse("from kvbm import layout\nimport kvbm.labels"))

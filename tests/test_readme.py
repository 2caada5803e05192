"""The README's quick start runs as written: every Python block of its "Quick start"
section, in order, in one namespace, with nothing defined for it beforehand."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def quick_start_code() -> list[str]:
    text = README.read_text()
    section = re.search(r"^## Quick start\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert section, "README.md has no '## Quick start' section"
    return re.findall(r"^```python[ \t]*\n(.*?)^```", section.group(1), flags=re.M | re.S)


def test_quick_start_runs_as_written(monkeypatch, tmp_path, capsys):
    for var in list(os.environ):
        if var.startswith("KVBM_"):
            monkeypatch.delenv(var)
    monkeypatch.chdir(tmp_path)
    blocks = quick_start_code()
    assert blocks, "no python block in the quick start"
    namespace: dict[str, object] = {"__name__": "__readme__"}
    for i, code in enumerate(blocks):
        exec(compile(code, f"README.md quick start #{i}", "exec"), namespace)
    assert capsys.readouterr().out  # it shows what it did


@pytest.mark.parametrize("needle", [
    "partial",              # the trailing partial block stays the engine's own
    "start_block=len(ids)",  # later blocks are committed after those already committed
])
def test_quick_start_shows_what_every_engine_needs(needle):
    assert any(needle in code for code in quick_start_code())


def test_readme_shows_every_command_and_points_to_every_doc():
    from kvbm.cli import _COMMANDS

    text = README.read_text()
    assert "kvbm --version" in text
    assert not [c for c in _COMMANDS if f"kvbm {c}" not in text]
    docs = sorted(p.name for p in (README.parent / "docs").glob("*.md"))
    assert not [d for d in docs if f"`{d}`" not in text]

"""What a new user meets first: ``kvbm demo`` refusing bad arguments with one error line,
never deleting a directory it did not make, and the command's usage naming what is missing.

Each case fails before anything is replayed, so these stay fast.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kvbm.cli import main


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse usage errors
        rc = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("argv, message", [
    (["demo", "--requests", "0"], "--requests"),
    (["demo", "--requests", "-5"], "--requests"),
    (["demo", "--requests", "1", "--seed", "-1"], "--seed"),
])
def test_demo_refuses_bad_arguments_with_status_2(argv: list[str], message: str,
                                                  tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = _run([*argv, "--dir", str(tmp_path)], capsys)
    assert rc == 2, (out, err)
    assert err.startswith("kvbm: error: ") and message in err
    assert list(tmp_path.iterdir()) == []  # nothing made


def test_demo_leaves_a_directory_it_did_not_make_alone(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # `kvbm demo --dir ~` must not wipe ~/demo.
    mine = tmp_path / "demo" / "notes.txt"
    mine.parent.mkdir()
    mine.write_text("not kvbm's")
    rc, out, err = _run(["demo", "--requests", "1", "--dir", str(tmp_path)], capsys)
    assert mine.read_text() == "not kvbm's"
    assert rc == 2, (out, err)
    assert err.startswith("kvbm: error: ") and "--dir" in err and str(mine.parent) in err


def test_demo_in_an_unusable_directory_is_an_error_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    rc, out, err = _run(["demo", "--requests", "1", "--dir", str(blocker / "sub")], capsys)
    assert rc == 2, (out, err)
    assert err.startswith("kvbm: error: ") and "--dir" in err


def test_a_missing_command_is_named_for_what_it_is() -> None:
    proc = subprocess.run([sys.executable, "-m", "kvbm"], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 2
    assert "required: COMMAND" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("argv", [
    ["hash", "--block-size", "x", "1"],
    ["hash"],
    ["stats", "--timeout", "soon"],
    ["config", "--nope"],
    ["demo", "--requests", "many"],
])
def test_a_malformed_command_line_is_a_kvbm_error_line(
        argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    # One prefix for every error a user can meet, whichever subcommand's parser finds it.
    rc, out, err = _run(argv, capsys)
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    assert lines[0].startswith(f"usage: kvbm {argv[0]}")  # the usage says which subcommand
    assert lines[-1].startswith("kvbm: error: "), err

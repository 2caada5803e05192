"""The ``kvbm`` command: --version, and ``kvbm hash`` validating its input.

Most cases call :func:`kvbm.cli.main` in this process (argparse exits with status 2 through
``SystemExit``); the ones about what reaches a real terminal (bytes that are not UTF-8,
tracebacks) run ``python -m kvbm`` in a child.
"""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys

import pytest

import kvbm
from kvbm.cli import main
from kvbm.hashing import hash_blocks


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse: --version, --help and usage errors
        rc = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return rc, out, err


def _child(argv: list[str | bytes]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "kvbm", *argv], capture_output=True,
                          timeout=120, check=False)


def test_version_is_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = _run(["--version"], capsys)
    assert rc == 0
    assert out.strip() == f"kvbm {kvbm.__version__}"
    assert kvbm.__version__ == importlib.metadata.version("kvtier")


def test_hash_prints_each_full_block(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = _run(["hash", "--block-size", "2", "1", "2", "3", "4", "5"], capsys)
    assert rc == 0
    h = hash_blocks([1, 2, 3, 4, 5], 2)
    lines = out.splitlines()
    assert lines[:2] == [f"block {i}: local {loc:#018x} sequence {seq:#018x}"
                         for i, (loc, seq) in enumerate(zip(h.local, h.sequence, strict=True))]
    assert "1 trailing token" in out and "not hashed" in out


def test_hash_says_when_there_is_no_full_block(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = _run(["hash", "1", "2", "3"], capsys)
    assert rc == 0
    assert "no full block" in out and "block_size 16" in out and "3 tokens" in out


def test_hash_counts_in_plain_english(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = _run(["hash", "5"], capsys)
    assert rc == 0 and "1 token " in out and "1 tokens" not in out


def test_hash_json_matches_the_library(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = _run(["hash", "--json", "--block-size", "2", "--lora", "a", "--salt", "s",
                       "7", "8", "9", "10", "11"], capsys)
    assert rc == 0
    doc = json.loads(out)
    h = hash_blocks([7, 8, 9, 10, 11], 2, lora_name="a", salt="s")
    assert doc["block_size"] == 2 and doc["tokens"] == 5 and doc["unhashed_tokens"] == 1
    assert doc["lora"] == "a" and doc["salt"] == "s"
    assert [b["local"] for b in doc["blocks"]] == h.local
    assert [b["sequence"] for b in doc["blocks"]] == h.sequence


@pytest.mark.parametrize("argv, message", [
    (["hash", "abc"], "'abc'"),
    (["hash", "1", "2.5"], "'2.5'"),
    (["hash", "--", "-1"], "'-1'"),
    # int() also reads these; a token id is plain ASCII decimal digits.
    (["hash", "1_000"], "'1_000'"),
    (["hash", "+5"], "'+5'"),
    (["hash", " 5"], "' 5'"),
    (["hash", "\u0661\u0662"], "token 0"),  # Arabic-Indic digits
    (["hash", str(2**32)], str(2**32)),
    (["hash", "--block-size", "0", "1"], "--block-size"),
    (["hash", "--block-size", "-4", "1"], "--block-size"),
    (["hash", "--lora", "\udcff", "1"], "--lora"),
    (["hash", "--salt", "x\ud800", "1"], "--salt"),
])
def test_hash_rejects_bad_input_with_status_2(argv: list[str], message: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = _run(argv, capsys)
    assert rc == 2
    assert out == ""
    assert "error:" in err and message in err


def test_bad_input_from_a_terminal_is_an_error_line_not_a_traceback() -> None:
    # b"\xff" is not UTF-8: Python hands it over as a lone surrogate.
    for argv in (["hash", "abc"], ["hash", "--lora", b"\xff", "1", "2"], ["hash", "1e3"]):
        proc = _child(list(argv))
        assert proc.returncode == 2, proc.stderr
        err = proc.stderr.decode(errors="replace")
        assert err.startswith("kvbm: error: ") and "Traceback" not in err


def test_info_reports_torch(capsys: pytest.CaptureFixture[str]) -> None:
    torch = pytest.importorskip("torch")
    rc, out, _ = _run(["info"], capsys)
    assert rc == 0
    assert f"torch: {torch.__version__}" in out and "native hashing:" in out


def test_a_reader_that_stops_early_gets_no_traceback() -> None:
    # ~600 KB of output against a 64 KB pipe: the child is still writing when the pipe closes.
    tokens = [str(t) for t in range(10_000)]
    proc = subprocess.Popen([sys.executable, "-m", "kvbm", "hash", "--block-size", "1",
                             *tokens], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline().startswith(b"block 0:")
    proc.stdout.close()
    err = proc.stderr.read()
    proc.stderr.close()
    assert proc.wait(timeout=120) == 1
    assert b"Traceback" not in err


def test_config_never_prints_a_secret(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "kvbm.toml"
    path.write_text('[device]\nnum_blocks = 4\n'
                    '[transport]\nsecret = "correct horse battery staple"\n')
    for extra in ([], ["--toml"]):
        rc, out, _ = _run(["config", "--file", str(path), *extra], capsys)
        assert rc == 0
        assert "correct horse" not in out and "<redacted>" in out

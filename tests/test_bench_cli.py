"""The benchmark scripts' command lines (bench/*.py): --help shows every default, one name per
option across scripts, units in every table column, and --json documents that say what
produced them (kvbm version, git commit, seed, machine)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import kvbm

BENCH = Path(__file__).resolve().parent.parent / "bench"
SCRIPTS = sorted(p.stem for p in BENCH.glob("*.py") if not p.stem.startswith("_"))
#: Names that an earlier version used for an option another script spells differently.
OLD_NAMES = {"--block-size-tokens", "--fractions"}


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _visible(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions
            if a.help != argparse.SUPPRESS and not isinstance(a, argparse._HelpAction)]


def _flat(text: str) -> str:
    return " ".join(text.split())


def _bench(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          timeout=300, check=False)


def test_every_script_is_covered() -> None:
    assert {"core_ops", "goal_bounds", "make_trace", "offload_bandwidth", "policy_replay",
            "policy_sweep"} <= set(SCRIPTS)


def _help_entries(text: str) -> dict[str, str]:
    """Option string -> its entry in ``--help`` output (flattened to one line)."""
    entries: dict[str, str] = {}
    current: list[str] = []
    for line in [*text.split("options:", 1)[-1].splitlines(), "  -"]:
        if re.match(r"  -", line) and current:
            entry = _flat(" ".join(current))
            head = re.split(r"\s{2,}", current[0].strip())[0]  # "-s, --seed SEED"
            for opt in re.findall(r"(?:^|, )(--?[\w-]+)", head):
                entries[opt] = entry
            current = []
        if line.strip():
            current.append(line)
    return entries


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_shows_every_default(name: str) -> None:
    proc = _bench([str(BENCH / f"{name}.py"), "--help"])
    assert proc.returncode == 0, proc.stderr
    entries = _help_entries(proc.stdout)
    for action in _visible(_load(name).build_parser()):
        assert action.help, f"{name}: {action.option_strings or action.dest} has no help"
        if action.default in (None, False) or not action.option_strings:
            continue
        entry = entries[action.option_strings[0]]
        assert f"(default: {action.default})" in entry, (name, entry)


def test_one_name_per_option_across_scripts() -> None:
    names: dict[str, set[str]] = {}
    types: dict[str, set[Any]] = {}
    for script in SCRIPTS:
        for action in _visible(_load(script).build_parser()):
            if not action.option_strings:
                continue
            names.setdefault(action.dest, set()).update(action.option_strings)
            types.setdefault(action.option_strings[-1], set()).add(
                getattr(action.type, "__name__", action.type))
    for dest, options in names.items():
        assert len(options) == 1, f"{dest} is spelled {sorted(options)}"
        assert not options & OLD_NAMES, options
    for option in ("--seed", "--requests", "--block-size", "--repeat"):
        assert len(types.get(option, {None})) == 1, (option, types.get(option))


def test_core_ops_table_has_a_unit_on_every_column() -> None:
    core_ops = _load("core_ops")
    rows = [{"op": "hash", "unit": "blocks/s", "value": 2e6, "target": 1e6, "reference": 4e6,
             "reference_name": "xxh3"},
            {"op": "match", "unit": "us", "value": 100.0, "target": 500.0, "reference": 50.0,
             "reference_name": "dict"}]
    core_ops.compare(rows)
    lines = core_ops.format_rows(rows).splitlines()
    headers = [ln for ln in lines if ln.startswith("operation")]
    assert len(headers) == 2  # one table per unit
    for header in headers:
        # every numeric column names its unit; "operation" and the reference's name are text
        columns = re.split(r"\s{2,}", header.strip())
        assert columns[0].startswith("operation") and columns[-1] == "reference measured as"
        for col in columns[1:-1]:
            assert re.search(r"M blocks/s|\bus\b|\bx\b", col), (col, header)


def test_goal_bounds_table_names_its_units() -> None:
    goal_bounds = _load("goal_bounds")
    doc = {"requests": 1, "distinct_blocks": 10, "device_blocks": 2, "cells": [
        {"capacity_fraction": 0.05, "blocks": 1, "hit_ratio": {"lru": 0.5, "belady": 0.6}}]}
    header = goal_bounds.format_bounds(doc, "t").splitlines()[1]
    assert "hit ratio" in header and "x LRU" in header and "host 5%" in header


def _check_meta(meta: dict[str, Any], seed: Any, *, in_process: bool = False) -> None:
    assert meta["kvbm_version"] == kvbm.__version__
    head = subprocess.run(["git", "-C", str(BENCH), "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=False)
    assert meta["git_commit"] == (head.stdout.strip() if head.returncode == 0 else None)
    assert meta["seed"] == seed
    machine = meta["machine"]
    assert machine["cores"] == os.cpu_count()
    assert isinstance(machine["memory_bytes"], int) and machine["memory_bytes"] > 1 << 20
    assert machine["python"] == ".".join(map(str, sys.version_info[:3]))
    assert machine["platform"]
    assert isinstance(meta["command"], list)
    assert in_process or meta["command"][0].endswith(".py")  # in-process: pytest's argv


def test_replay_json_carries_the_run_metadata() -> None:
    proc = _bench([str(BENCH / "policy_replay.py"), "--generate", "--requests", "40",
                   "--seed", "3", "--capacity-fraction", "0.1", "--policy", "lru",
                   "--block-size", "2", "--model", "--json"])
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    _check_meta(doc["meta"], 3)
    assert doc["meta"]["command"][1:] == ["--generate", "--requests", "40", "--seed", "3",
                                          "--capacity-fraction", "0.1", "--policy", "lru",
                                          "--block-size", "2", "--model", "--json"]


def test_goal_bounds_and_sweep_json_carry_the_run_metadata(tmp_path: Path) -> None:
    proc = _bench([str(BENCH / "goal_bounds.py"), "--family", "chat", "--requests", "40",
                   "--seed", "5", "--capacity-fraction", "0.1", "--block-size", "2", "--json"])
    assert proc.returncode == 0, proc.stderr
    _check_meta(json.loads(proc.stdout)["meta"], 5)
    proc = _bench([str(BENCH / "policy_sweep.py"), "--generate", "rag:4", "--requests", "40",
                   "--capacity-fraction", "0.1,0.2", "--policy", "lru", "--block-size", "2",
                   "--model", "--jobs", "1", "--json"])
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    _check_meta(doc["meta"], {"rag-s4": 4})
    assert set(doc["traces"]["rag-s4"]) == {"0.1", "0.2"}


def test_the_old_fractions_spelling_still_parses() -> None:
    # --capacity-fraction is the name; --fractions stays accepted (hidden) for old commands.
    for name in ("goal_bounds", "policy_sweep"):
        parser = _load(name).build_parser()
        assert "--fractions" not in parser.format_help()
        args = parser.parse_args(["--fractions", "0.1,0.2", "--generate", "chat"]
                                 if name == "policy_sweep" else ["--fractions", "0.1,0.2"])
        assert args.capacity_fraction == [0.1, 0.2]


# -- bad input: one usage error line (status 2), never a traceback ----------------------------
def _bad_cases(tmp: Path) -> list[tuple[str, list[str], str]]:
    if tmp.is_dir():
        (tmp / "empty.jsonl").write_text("")
        (tmp / "file").write_text("")
    missing = str(tmp / "missing.jsonl")
    return [
        ("core_ops", ["--seed", "-1"], "--seed"),
        ("make_trace", ["--requests", "5", "--seed", "-1"], "--seed"),
        ("make_trace", ["--requests", "5", "--rate", "-1"], "--rate"),
        ("make_trace", ["--requests", "5", "--rate", "nan"], "--rate"),
        ("make_trace", ["--requests", "5", "--single-shot", "5"], "--single-shot"),
        ("make_trace", ["--requests", "5", "--doc-fraction", "-0.1"], "--doc-fraction"),
        ("make_trace", ["--requests", "5", "--turns", "nan"], "--turns"),
        ("make_trace", ["--requests", "5", "--turns", "0.5"], "--turns"),
        ("make_trace", ["--requests", "5", "--think-seconds", "0"], "--think-seconds"),
        ("make_trace", ["--requests", "5", "--documents", "-3"], "--documents"),
        ("make_trace", ["--requests", "5", "--system-prompts", "0"], "--system-prompts"),
        ("make_trace", ["--requests", "5", "--system-zipf", "inf"], "--system-zipf"),
        ("make_trace", ["--requests", "5", "--out", str(tmp / "file" / "t.jsonl")], "--out"),
        ("policy_replay", ["--trace", missing, "--capacity-fraction", "0.1"], "missing.jsonl"),
        ("policy_replay", ["--trace", str(tmp), "--capacity-fraction", "0.1"], str(tmp)),
        ("policy_replay", ["--trace", str(tmp / "empty.jsonl"), "--capacity-fraction", "0.1"],
         "no request"),
        ("policy_replay", ["--generate", "--seed", "-1", "--capacity-fraction", "0.1"],
         "--seed"),
        ("goal_bounds", ["--trace", str(tmp / "empty.jsonl")], "no request"),
        ("goal_bounds", ["--seed", "-2"], "--seed"),
        ("policy_sweep", ["--generate", "nope"], "nope"),
        ("policy_sweep", ["--generate", "chat:-1"], "chat:-1"),
        ("offload_bandwidth", ["--skip-object", "--layout", "tiny", "--memory-mib", "1",
                               "--disk-mib", "1", "--dir", str(tmp / "file" / "sub")], "--dir"),
        ("vllm_offload", ["--models", "tiny,nope"], "--models"),
        ("vllm_offload", ["--repeat", "0"], "--repeat"),
        ("vllm_offload", ["--quick", "--dir", str(tmp / "file" / "sub")], "--dir"),
    ]


_BAD = _bad_cases(Path("/nonexistent"))


@pytest.mark.parametrize("case", range(len(_BAD)),
                         ids=[f"{n}{' '.join(a[-2:])}" for n, a, _ in _BAD])
def test_bad_input_is_a_usage_error_not_a_traceback(case: int, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    name, argv, message = _bad_cases(tmp_path)[case]
    with pytest.raises(SystemExit) as e:
        _load(name).main(argv)
    out, err = capsys.readouterr()
    assert e.value.code == 2, (name, argv, out, err)
    assert "error:" in err and message in err, (name, argv, err)


def test_offload_bandwidth_runs_with_the_smallest_pages(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    # The disk tier of the measurement must hold every measured page, headers included,
    # whatever the page size (256-byte pages of "tiny" once left it one slot short).
    rc = _load("offload_bandwidth").main(
        ["--skip-object", "--layout", "tiny", "--repeat", "1", "--memory-mib", "1",
         "--disk-mib", "1", "--no-progress", "--json", "--dir", str(tmp_path)])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    assert {r["path"] for r in doc["rows"]} >= {"G2->G3", "G3->G2"}
    _check_meta(doc["meta"], None, in_process=True)


def test_core_ops_json_is_one_document_with_the_run_metadata() -> None:
    proc = _bench([str(BENCH / "core_ops.py"), "--repeat", "1", "--seed", "4", "--json",
                   "--index-sizes", "10k"])
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)  # one document, nothing else on stdout
    _check_meta(doc["meta"], 4)
    assert doc["rows"] and all("unit" in r for r in doc["rows"])


def test_replay_and_sweep_tables_name_their_units() -> None:
    from kvbm.lab.replay import format_sweep, format_table

    doc = {"hit_ratio": {"lru": 0.1, "predictive": 0.12, "belady": 0.2}, "blocks": 1,
           "capacity_fraction": 0.05, "distinct_blocks": 20, "requests": 1, "block_refs": 2,
           "device_blocks": 1, "default": "predictive", "seconds": {"lru": 0.1}}
    header = re.split(r"\s{2,}|(?<=policy) ", format_table(doc).splitlines()[1].strip())
    # a ratio to LRU is written "x LRU", as goal_bounds.py writes it
    assert header == ["policy", "hit ratio", "x LRU", "gap closed", "time s"], header
    title = format_sweep("t", [doc]).splitlines()[0]
    assert "% of the distinct blocks" in title and "hit ratio (× LRU)" in title, title


def test_bandwidth_table_columns_stand_apart_with_units() -> None:
    from kvbm.lab import bandwidth as bw

    rows = [bw.Row.timed(bw.G2_G3, "write", 2 << 20, 10, seconds=2.0, ceiling_seconds=1.0)]
    header = bw.format_table(rows).splitlines()[0]
    # two spaces at least between headers: "GB/s ceil GB/s ratio x" read as one column
    assert re.split(r"\s{2,}", header.strip()) == [
        "path", "op", "page", "pages", "GB/s", "ceil GB/s", "ratio x", "target x",
        "ceiling measured as"], header

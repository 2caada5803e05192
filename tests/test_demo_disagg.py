"""``kvbm demo --disagg``'s plumbing without vLLM: the command line reaches it, its report
says where each prompt's prefix came from, and it refuses a directory it did not make. (The
demo itself starts two vLLM engines: ``make demo`` runs it.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from kvbm.cli import main
from kvbm.lab.demo_disagg import format_report, served_from


def _answer(cached: int, hits: dict[str, int], transfer: int) -> dict[str, object]:
    zero = {"kvbm": {"hit_tokens": {}}, "pd": {"transfer_tokens": 0}, "worker": {}}
    return {"cached": cached, "before": zero,
            "after": {"kvbm": {"hit_tokens": hits}, "pd": {"transfer_tokens": transfer},
                      "worker": {}}}


def test_served_from_splits_gpu_tiers_and_handoff():
    assert served_from(_answer(0, {}, 0)) == {}
    assert served_from(_answer(128, {}, 0)) == {"GPU": 128}
    assert served_from(_answer(160, {"CPU_PINNED": 32, "DISK": 0}, 0)) == {
        "GPU": 128, "CPU_PINNED": 32}
    assert served_from(_answer(224, {"DISK": 96}, 128)) == {"DISK": 96, "handoff": 128}


def test_report_names_the_pick_its_costs_the_tier_and_the_handoff():
    score = {"cost": 7.3, "matched": {"GPU": 4}}
    rows = [{"name": "c1.t0", "tokens": 169, "worker": "prefill",
             "scores": {"prefill": score, "decode": {"cost": 8.8, "matched": {}}},
             "served": {"GPU": 128}, "handoff_bytes": 65536, "handoff_s": 0.021,
             "ttft": 0.009, "ttft_cold": 0.019},
            {"name": "c0.t1", "tokens": 315, "worker": "decode", "scores": {},
             "served": {}, "handoff_bytes": 0, "handoff_s": 0.0, "ttft": 0.01,
             "ttft_cold": 0.012}]
    text = format_report(rows)
    line = next(ln for ln in text.splitlines() if ln.startswith("c1.t0"))
    for part in ("p=7.3(GPU:4)", "d=8.8(-)", "prefill", "GPU:128", "64K/21ms", "9ms", "19ms"):
        assert part in line, (part, line)
    line = next(ln for ln in text.splitlines() if ln.startswith("c0.t1"))
    assert "decode" in line and "none" in line


def test_cli_routes_disagg_and_keeps_a_foreign_directory(tmp_path: Path, capsys):
    mine = tmp_path / "demo-disagg" / "notes.txt"
    mine.parent.mkdir()
    mine.write_text("mine")
    pytest.importorskip("vllm")
    rc = main(["demo", "--disagg", "--dir", str(tmp_path)])
    assert rc == 2 and "not made by kvbm demo" in capsys.readouterr().err
    assert mine.read_text() == "mine"


def test_standalone_and_disagg_are_exclusive(capsys):
    with pytest.raises(SystemExit) as e:
        main(["demo", "--disagg", "--standalone"])
    assert e.value.code == 2

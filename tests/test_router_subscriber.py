"""Subscriber (kvbm.router.subscriber): real ZMQ sockets on 127.0.0.1.

A ScriptedPublisher (tests/router_pubs.py) chooses every seq, which batches the subscriber
misses and what the replay buffer still holds; the indexer's state is then compared with
what the publisher said, block by block.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

zmq = pytest.importorskip("zmq")

from router_pubs import WAIT_S, ScriptedPublisher, WorkerModel, payload_of, wait_until  # noqa: E402

from kvbm.errors import ClosedError, InvalidArgumentError  # noqa: E402
from kvbm.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent  # noqa: E402
from kvbm.events.records import AllMediaCleared  # noqa: E402
from kvbm.medium import Medium  # noqa: E402
from kvbm.router import KvIndexer, SubscriberConfig  # noqa: E402
from kvbm.router.subscriber import Subscriber  # noqa: E402

GPU = Medium.GPU


def ev(h: int, medium: Medium = GPU) -> BlockStored:
    return BlockStored([h], None, [h % 1000] * 4, 4, medium)


@pytest.fixture
def pub() -> Iterator[ScriptedPublisher]:
    p = ScriptedPublisher()
    yield p
    p.close()


@pytest.fixture
def idx() -> KvIndexer:
    return KvIndexer(4)


@pytest.fixture
def sub(idx: KvIndexer) -> Iterator[Subscriber]:
    # generous: a replay that does not answer in time is a resync, which these tests
    # must not see merely because the machine is busy
    s = Subscriber(idx, SubscriberConfig(replay_timeout_s=30.0))
    s.start()
    yield s
    s.close()


def caught_up(sub: Subscriber, name: str, next_seq: int) -> None:
    assert sub.wait_for(name, next_seq, WAIT_S), sub.status().get(name)


def counters(sub: Subscriber, name: str) -> dict[str, int]:
    return sub.status()[name].counters


def test_first_contact_replays_the_history(pub: ScriptedPublisher, sub: Subscriber,
                                           idx: KvIndexer) -> None:
    for s in range(5):  # before anyone listens: only the replay buffer has them
        pub.batch(s, [ev(s)], live=False)
    sub.add_worker("w", pub.endpoint, pub.replay_endpoint)
    caught_up(sub, "w", 5)
    assert set(idx.worker_blocks("w")) == set(range(5))
    pub.wait_subscriber()
    pub.batch(5, [ev(5)])
    caught_up(sub, "w", 6)
    assert set(idx.worker_blocks("w")) == set(range(6))
    st = sub.status()["w"]
    assert st.complete and st.counters["resyncs"] == 0 and pub.replays == [0]


def test_a_gap_is_healed_from_the_replay_buffer(pub: ScriptedPublisher, sub: Subscriber,
                                                idx: KvIndexer) -> None:
    sub.add_worker("w", pub.endpoint, pub.replay_endpoint)
    pub.wait_subscriber()
    pub.batch(0, [ev(0)])
    caught_up(sub, "w", 1)
    pub.batch(1, [ev(1)], live=False)  # missed by the subscriber
    pub.batch(2, [BlockRemoved([1], GPU)], live=False)
    pub.batch(3, [ev(3)])
    caught_up(sub, "w", 4)
    assert set(idx.worker_blocks("w")) == {0, 3}
    c = counters(sub, "w")
    assert c["gaps"] == 1 and c["resyncs"] == 0 and c["replayed_batches"] >= 2
    assert 1 in pub.replays and sub.status()["w"].complete


def test_a_gap_older_than_the_buffer_clears_the_worker_until_it_resyncs(
        pub: ScriptedPublisher, sub: Subscriber, idx: KvIndexer) -> None:
    sub.add_worker("w", pub.endpoint, pub.replay_endpoint)
    pub.wait_subscriber()
    pub.batch(0, [ev(0), ev(1), ev(9, Medium.DISK)])
    caught_up(sub, "w", 1)
    pub.batch(1, [BlockRemoved([0], GPU)], live=False)
    pub.forget(1)  # gone from the buffer too: nobody can say what batch 1 held
    pub.batch(2, [ev(2)])
    caught_up(sub, "w", 3)
    # block 0 may or may not be held: the worker is cleared rather than over-claimed, in
    # every medium (a plain AllBlocksCleared would clear its GPU alone)
    assert set(idx.worker_blocks("w")) == {2}
    st = sub.status()["w"]
    assert not st.complete and st.counters["resyncs"] == 1
    pub.batch(3, [AllBlocksCleared(), ev(1), ev(2)])  # the publisher's own resync
    caught_up(sub, "w", 4)
    assert set(idx.worker_blocks("w")) == {1, 2} and sub.status()["w"].complete


def test_without_a_replay_socket_a_gap_is_a_resync(idx: KvIndexer, sub: Subscriber) -> None:
    p = ScriptedPublisher(replay=False)
    try:
        sub.add_worker("w", p.endpoint)
        p.wait_subscriber()
        p.batch(0, [ev(0)])
        p.batch(2, [ev(2)])
        caught_up(sub, "w", 3)
        assert set(idx.worker_blocks("w")) == {2}
        assert counters(sub, "w")["resyncs"] == 1
    finally:
        p.close()


def test_a_sequence_going_back_is_a_restart(pub: ScriptedPublisher, sub: Subscriber,
                                            idx: KvIndexer) -> None:
    sub.add_worker("w", pub.endpoint, pub.replay_endpoint)
    pub.wait_subscriber()
    for s in range(4):
        pub.batch(s, [ev(s), ev(50 + s, Medium.DISK)])
    caught_up(sub, "w", 4)
    pub.buffer.clear()  # a new process: a new buffer, seqs from 0
    pub.batch(0, [ev(100)], live=False)
    pub.batch(1, [ev(101)])  # batch 0 of the new process was missed: replayed
    wait_until(lambda: counters(sub, "w")["restarts"] == 1, what="the restart")
    caught_up(sub, "w", 2)
    assert set(idx.worker_blocks("w")) == {100, 101}
    assert sub.status()["w"].complete


def test_a_restarted_publisher_past_the_old_seq_is_recognized(sub: Subscriber,
                                                              idx: KvIndexer) -> None:
    """The new process published more batches than the old one before the subscriber
    reconnected: its seqs look like a gap. The reconnect check (is the last batch applied
    still in the replay buffer, byte for byte?) tells them apart."""
    old = ScriptedPublisher()
    port, rport = old.port, old.replay_port
    sub.add_worker("w", old.endpoint, old.replay_endpoint)
    old.wait_subscriber()
    for s in range(3):
        old.batch(s, [ev(s)])
    caught_up(sub, "w", 3)
    old.close()
    new = ScriptedPublisher(port, rport,
                            buffer={s: payload_of([ev(200 + s)]) for s in range(6)})
    try:
        new.wait_subscriber()
        wait_until(lambda: counters(sub, "w")["restarts"] == 1, what="the restart")
        caught_up(sub, "w", 6)
        assert set(idx.worker_blocks("w")) == {200 + s for s in range(6)}
        new.batch(6, [ev(206)])
        caught_up(sub, "w", 7)
        assert set(idx.worker_blocks("w")) == {200 + s for s in range(7)}
    finally:
        new.close()


def test_a_reconnect_to_the_same_publisher_keeps_the_state(sub: Subscriber,
                                                           idx: KvIndexer) -> None:
    p = ScriptedPublisher()
    sub.add_worker("w", p.endpoint, p.replay_endpoint)
    p.wait_subscriber()
    p.batch(0, [ev(0)])
    caught_up(sub, "w", 1)
    buffer = dict(p.buffer)
    port, rport = p.port, p.replay_port
    p.close()
    # the same process, its sockets back (a network blip): same buffer, same bytes
    q = ScriptedPublisher(port, rport, buffer={**buffer, 1: payload_of([ev(1)])})
    try:
        q.wait_subscriber()
        caught_up(sub, "w", 2)
        assert set(idx.worker_blocks("w")) == {0, 1}
        assert counters(sub, "w")["restarts"] == 0 and counters(sub, "w")["resyncs"] == 0
    finally:
        q.close()


def test_garbage_is_counted_and_skipped(pub: ScriptedPublisher, sub: Subscriber,
                                        idx: KvIndexer) -> None:
    sub.add_worker("w", pub.endpoint, pub.replay_endpoint)
    pub.wait_subscriber()
    pub.batch(0, [ev(0)])
    caught_up(sub, "w", 1)  # the first replay is over: what follows comes live only
    pub.send_raw([b"only one frame"])
    pub.send_raw([b"", b"1", b"short seq frame"])
    pub.send_raw([b"", b"a", b"b", b"four frames"])
    # a batch whose events are partly garbage: unknown type, hash out of range
    import msgpack

    payload = msgpack.packb([1.0, [{"type": "Bogus"},
                                   {"type": "BlockRemoved", "block_hashes": [-1],
                                    "medium": "GPU"},
                                   ["BlockStored", [7], None, [1, 2, 3, 4], 4, None, "GPU"]],
                             None])
    pub.send_raw([b"", (1).to_bytes(8, "big"), payload])
    pub.send_raw([b"", (2).to_bytes(8, "big"), b"\xc1 not msgpack"])  # a lost batch
    pub.batch(3, [ev(3)])
    caught_up(sub, "w", 4)
    c = counters(sub, "w")
    assert c["bad_messages"] == 4 and c["skipped_events"] == 2 and c["resyncs"] == 1
    assert set(idx.worker_blocks("w")) == {3}  # cleared at the lost batch 2, then 3


def test_garbage_on_the_replay_socket_is_counted_and_skipped(pub: ScriptedPublisher,
                                                             sub: Subscriber,
                                                             idx: KvIndexer) -> None:
    pub.bad_replies = [[b"x"], [b"not empty", b"t", (1).to_bytes(8, "big"), b"p"],
                       [b"", b"t", b"short", b"p"], [b"", b"a", b"b", b"c", b"d"]]
    for s in range(3):
        pub.batch(s, [ev(s)], live=False)
    sub.add_worker("w", pub.endpoint, pub.replay_endpoint)
    caught_up(sub, "w", 3)
    assert set(idx.worker_blocks("w")) == {0, 1, 2}
    c = counters(sub, "w")
    assert c["bad_messages"] == 4 and c["resyncs"] == 0 and sub.status()["w"].complete


def test_events_the_indexer_refuses_are_skipped_one_by_one(pub: ScriptedPublisher,
                                                           sub: Subscriber,
                                                           idx: KvIndexer) -> None:
    sub.add_worker("w", pub.endpoint, pub.replay_endpoint)
    pub.wait_subscriber()
    bad = BlockStored([9], None, [1, 2, 3, 4, 5, 6, 7, 8], 8, GPU)  # another block size
    pub.batch(0, [ev(0), bad, ev(1)])
    caught_up(sub, "w", 1)
    assert set(idx.worker_blocks("w")) == {0, 1}
    assert counters(sub, "w")["rejected_events"] == 1


def test_remove_and_add_workers_while_running(pub: ScriptedPublisher, sub: Subscriber,
                                              idx: KvIndexer) -> None:
    other = ScriptedPublisher()
    try:
        sub.add_worker("a", pub.endpoint, pub.replay_endpoint)
        sub.add_worker("b", other.endpoint, other.replay_endpoint)
        pub.wait_subscriber()
        other.wait_subscriber()
        pub.batch(0, [ev(1)])
        other.batch(0, [ev(2)])
        caught_up(sub, "a", 1)
        caught_up(sub, "b", 1)
        assert idx.find_matches([1] * 4) == {"a": {GPU: 1}}
        sub.remove_worker("a")
        wait_until(lambda: "a" not in idx.workers(), what="the removal")
        assert sub.workers() == ["b"] and "a" not in sub.status()
        with pytest.raises(InvalidArgumentError):
            sub.remove_worker("a")
        sub.add_worker("a", pub.endpoint, pub.replay_endpoint)  # back: history replayed
        caught_up(sub, "a", 1)
        assert set(idx.worker_blocks("a")) == {1}
    finally:
        other.close()


def test_a_callable_sink_gets_events_and_resets() -> None:
    got: list[tuple[str, list[KVEvent]]] = []
    p = ScriptedPublisher()
    s = Subscriber(lambda w, events: got.append((w, list(events))))
    try:
        s.start()
        s.add_worker("w", p.endpoint, p.replay_endpoint)
        p.wait_subscriber()
        p.batch(0, [ev(0)])
        s.wait_for("w", 1, WAIT_S)
        s.remove_worker("w")
        wait_until(lambda: len(got) == 2, what="the removal")
        assert got == [("w", [ev(0)]), ("w", [AllMediaCleared()])]
    finally:
        s.close()
        p.close()


def test_a_failing_sink_does_not_stop_the_subscriber() -> None:
    calls = []

    def sink(w: str, events: list[KVEvent]) -> None:
        calls.append(w)
        raise RuntimeError("sink bug")

    p = ScriptedPublisher()
    s = Subscriber(sink)
    try:
        s.start()
        s.add_worker("w", p.endpoint, p.replay_endpoint)
        p.wait_subscriber()
        p.batch(0, [ev(0)])
        p.batch(1, [ev(1)])
        assert s.wait_for("w", 2, WAIT_S)
        assert s.totals()["sink_errors"] == 2 and len(calls) == 2
    finally:
        s.close()
        p.close()


def test_many_random_changes_end_in_the_publishers_state(pub: ScriptedPublisher,
                                                         sub: Subscriber,
                                                         idx: KvIndexer) -> None:
    model = WorkerModel(seed=3)
    sub.add_worker("w", pub.endpoint, pub.replay_endpoint)
    pub.wait_subscriber()
    seq = 0
    for i in range(3000):
        events = model.step()
        if events:
            pub.batch(seq, events, live=i % 97 != 5)  # a few batches missed: replayed
            seq += 1
    caught_up(sub, "w", seq)
    assert idx.worker_blocks("w") == model.blocks()
    assert sub.status()["w"].complete and counters(sub, "w")["gaps"] > 0


@pytest.mark.parametrize("call", [
    lambda s: s.add_worker("", "tcp://127.0.0.1:1"),
    lambda s: s.add_worker("w", "http://127.0.0.1:1"),
    lambda s: s.add_worker("w", "tcp://127.0.0.1:1", "tcp://*:2"),
    lambda s: s.add_worker("w", 5),
    lambda s: s.remove_worker("nobody"),
])
def test_bad_arguments(call: Any) -> None:
    with Subscriber(KvIndexer()) as s:
        with pytest.raises(InvalidArgumentError):
            call(s)
        assert s.workers() == []


def test_constructor_and_lifecycle() -> None:
    for args, kw in (((object(),), {}), ((KvIndexer(), "config"), {}),
                     ((KvIndexer(),), {"topic": 5})):
        with pytest.raises(InvalidArgumentError):
            Subscriber(*args, **kw)  # type: ignore[arg-type]
    s = Subscriber(KvIndexer())
    s.add_worker("w", "tcp://127.0.0.1:1")  # before start: queued
    with pytest.raises(InvalidArgumentError, match="already"):
        s.add_worker("w", "tcp://127.0.0.1:2")
    s.close()
    s.close()
    with pytest.raises(ClosedError):
        s.add_worker("x", "tcp://127.0.0.1:1")
    with pytest.raises(ClosedError):
        s.start()

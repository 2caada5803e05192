"""A block manager with ``[events] enabled`` publishes every residency change on ZMQ in
vLLM's wire format: what a subscriber rebuilds from the stream equals the manager's
residency, block by block and medium by medium — through evictions, write-down to disk,
compaction, ``clear()``, and publisher queue overflows healed by a snapshot resync."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")
zmq = pytest.importorskip("zmq")

from kvbm import (  # noqa: E402
    AllBlocksCleared,
    AllMediaCleared,
    BlockManager,
    BlockRemoved,
    BlockStored,
    DeviceTierConfig,
    HostTierConfig,
    KVLayout,
    ManagerConfig,
    Medium,
)
from kvbm.config import EventsConfig  # noqa: E402
from kvbm.events.wire import decode_batch, parse_frames, parse_replay_reply, replay_request  # noqa: E402
from kvbm.storage.disk import DiskTierConfig  # noqa: E402

BS = 4
LAYOUT = KVLayout(2, 2, 4, BS, "float32")
RECV_MS = 20_000


def events_cfg(**kw: Any) -> EventsConfig:
    base: dict[str, Any] = dict(enabled=True, endpoint="tcp://127.0.0.1:*",
                                replay_endpoint="tcp://127.0.0.1:*", topic="kv",
                                batch_interval_s=0.002, buffer_steps=100_000)
    base.update(kw)
    return EventsConfig(**base)


def config(tmp_path, **events: Any) -> ManagerConfig:
    return ManagerConfig(device=DeviceTierConfig(8, device="cpu"),
                         host=HostTierConfig(8, admission=None),
                         disk=DiskTierConfig(tmp_path / "g3", capacity_bytes=40 * 4096,
                                             slab_bytes=1 << 20),
                         events=events_cfg(**events))


def workload(mgr: BlockManager, rng: np.random.Generator, n: int) -> None:
    for i in range(n):
        fam, length = int(rng.integers(0, 12)), int(rng.integers(1, 6))
        toks = np.arange(fam * 1000, fam * 1000 + length * BS, dtype=np.uint32)
        m = mgr.match_prefix(toks)
        ids = mgr.onboard(m)
        new = mgr.allocate(len(m.hashes) - len(ids))
        mgr.release(ids + mgr.commit(new, toks, start_block=len(ids), hashes=m.hashes))
        if i % 7 == 0:
            mgr.flush()


def replay_all(endpoint: str) -> list[Any]:
    """Every batch the publisher sent, in seq order, from its replay socket."""
    ctx = zmq.Context.instance()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.RCVTIMEO, RECV_MS)
    dealer.connect(endpoint)
    try:
        dealer.send_multipart(replay_request(0))
        seqs, events = [], []
        while True:
            seq, payload = parse_replay_reply(dealer.recv_multipart())
            if payload is None:
                break
            seqs.append(seq)
            events.extend(decode_batch(payload, strict=True).events)
        assert seqs == list(range(len(seqs))), "the replay buffer lost batches"
        return events
    finally:
        dealer.close(linger=0)


def rebuild(events: list[Any]) -> dict[int, set[Medium]]:
    state: dict[int, set[Medium]] = {}
    for e in events:
        if isinstance(e, AllMediaCleared):
            state.clear()
        elif isinstance(e, AllBlocksCleared):  # as a router reads it: the GPU cache only
            for ms in state.values():
                ms.discard(Medium.GPU)
        elif isinstance(e, BlockStored):
            for h in e.block_hashes:
                state.setdefault(h, set()).add(e.medium)
        elif isinstance(e, BlockRemoved):
            for h in e.block_hashes:
                state.get(h, set()).discard(e.medium)
    return {h: ms for h, ms in state.items() if ms}


def residency(mgr: BlockManager, hashes: set[int]) -> dict[int, set[Medium]]:
    out = {}
    for h in hashes:
        rec = mgr.lookup(h)
        if rec is not None and rec.mask:
            out[h] = {m for m in Medium if rec.mask & m.bit}
    return out


def check_equal(mgr: BlockManager) -> dict[int, set[Medium]]:
    pub = mgr.publisher
    assert pub is not None
    # stats() completes what the tiers finished; nothing else changes the manager until
    # the next call (lookup does not drain), so the stream and the state are compared at
    # one point
    indexed = mgr.stats().indexed_blocks
    assert pub.flush(20)
    seen = rebuild(replay_all(pub.replay_endpoint))
    truth = residency(mgr, set(seen))
    assert seen == truth
    assert len(seen) == indexed
    return seen


def test_the_stream_equals_the_managers_residency(tmp_path) -> None:
    with BlockManager(LAYOUT, config(tmp_path)) as mgr:
        # a live subscriber too: the frames are vLLM's
        sub = zmq.Context.instance().socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"kv")
        sub.setsockopt(zmq.RCVTIMEO, RECV_MS)
        sub.connect(mgr.publisher.endpoint)
        workload(mgr, np.random.default_rng(1), 150)
        mgr.poll()
        seen = check_equal(mgr)
        assert any(Medium.DISK in ms for ms in seen.values())
        mgr.clear()
        workload(mgr, np.random.default_rng(2), 40)
        mgr.poll()
        check_equal(mgr)
        try:
            topic, seq, payload = parse_frames(sub.recv_multipart())
            assert topic == b"kv" and seq >= 0
            decode_batch(payload, strict=True)
        finally:
            sub.close(linger=0)
        assert mgr.take_events() == []  # published, not queued


def test_an_overflowing_queue_resyncs_from_a_snapshot(tmp_path) -> None:
    # a queue of a few events: bursts overflow it; the publisher clears its subscribers and
    # re-announces the manager's residency from a snapshot built on the owner thread
    with BlockManager(LAYOUT, config(tmp_path, max_queue_size=4,
                                     batch_interval_s=0.05)) as mgr:
        workload(mgr, np.random.default_rng(3), 120)
        pub = mgr.publisher
        assert pub is not None
        for _ in range(400):  # the owner serves the snapshot the publisher asks for
            mgr.poll()
            if pub.stats.resyncs and not pub.stats.queued_events:
                break
            pub.flush(0.05)
        assert pub.stats.overflows > 0 and pub.stats.resyncs > 0
        for _ in range(100):
            mgr.poll()
            pub.flush(0.05)
        check_equal(mgr)


def test_close_stops_the_publisher_and_refuses_nothing(tmp_path) -> None:
    mgr = BlockManager(LAYOUT, config(tmp_path))
    workload(mgr, np.random.default_rng(4), 10)
    pub = mgr.publisher
    assert pub is not None
    endpoint = pub.replay_endpoint
    mgr.close()
    ctx = zmq.Context.instance()
    probe = ctx.socket(zmq.ROUTER)
    try:
        probe.bind(endpoint)  # the port was released
    finally:
        probe.close(linger=0)


def test_the_jetstream_stream_equals_the_managers_residency(tmp_path) -> None:
    """``[events.nats]``: the same changes go to NATS JetStream; a durable consumer feeding
    kvbm's router indexer ends with the manager's residency, block by block."""
    pytest.importorskip("nats")
    from nats_servers import NatsServer, nats_server_binary

    if nats_server_binary() is None:
        pytest.skip("nats-server binary not installed (dev extra)")
    from kvbm.events.jetstream import NatsConfig
    from kvbm.events.nats_consumer import JetStreamConsumer
    from kvbm.router import KvIndexer

    server = NatsServer(tmp_path / "js")
    server.start()
    try:
        nats = NatsConfig(url=server.url, worker="w0", timeout_s=2.0,
                          checkpoint_interval_s=0.2)
        cfg = ManagerConfig(device=DeviceTierConfig(8, device="cpu"),
                            host=HostTierConfig(8, admission=None),
                            disk=DiskTierConfig(tmp_path / "g3", capacity_bytes=40 * 4096,
                                                slab_bytes=1 << 20),
                            events=events_cfg(nats=nats))
        with BlockManager(LAYOUT, cfg) as mgr:
            workload(mgr, np.random.default_rng(5), 80)
            mgr.poll()
            indexed = mgr.stats().indexed_blocks
            js = mgr.nats_publisher
            assert js is not None and js.flush(30)
            idx = KvIndexer(BS)
            with JetStreamConsumer(nats, idx.apply, durable="t") as consumer:
                assert consumer.wait_caught_up(60)
                got = {h: set(ms) for h, ms in idx.worker_blocks("w0").items()}
            assert got == residency(mgr, set(got))
            assert len(got) == indexed
    finally:
        server.stop()

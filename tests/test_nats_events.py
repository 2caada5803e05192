"""Cache events through NATS JetStream, against a real nats-server on 127.0.0.1.

Publishers (in this process or in tests/nats_procs.py subprocesses) -> JetStream -> a
JetStreamConsumer -> KvIndexer; the server and the router are killed with SIGKILL mid-stream
and restarted (same store directory, same durable name); at the end the index must equal
every publisher's own model of what it holds, block by block.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from nats_procs import BLOCK_SIZE, Workload
from nats_servers import HOST, NatsServer, free_port, nats_server_binary

from kvbm.errors import ConfigError, EventDecodeError, InvalidArgumentError
from kvbm.events.jetstream import NatsConfig, msg_headers
from kvbm.events.ledger import Ledger
from kvbm.events.records import (
    AllBlocksCleared,
    AllMediaCleared,
    BlockRemoved,
    BlockStored,
    KVEvent,
)
from kvbm.events.wire import EventBatch, encode_batch
from kvbm.medium import Medium
from kvbm.router import KvIndexer

pytest.importorskip("nats")
pytestmark = pytest.mark.skipif(nats_server_binary() is None,
                                reason="nats-server binary not installed (dev extra)")

from kvbm.events.nats import NatsEventPublisher  # noqa: E402
from kvbm.events.nats_consumer import JetStreamConsumer  # noqa: E402

PROCS = str(Path(__file__).with_name("nats_procs.py"))
TESTS_DIR = str(Path(__file__).parent)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[NatsServer]:
    s = NatsServer(tmp_path / "jetstream")
    s.start()
    try:
        yield s
    finally:
        s.stop()


def config(server: NatsServer, **kw: Any) -> NatsConfig:
    kw.setdefault("checkpoint_interval_s", 0.2)
    kw.setdefault("timeout_s", 2.0)
    return NatsConfig(url=server.url, **kw)


def as_json(blocks: dict[int, frozenset[Medium]]) -> dict[str, list[str]]:
    return {str(h): sorted(m.value for m in media) for h, media in blocks.items()}


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def spawn(role: str, args: dict[str, Any]) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=TESTS_DIR + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, PROCS, role, json.dumps(args)], env=env,
                            stdin=subprocess.DEVNULL)


def finish(proc: subprocess.Popen[bytes], timeout: float = 120.0) -> None:
    try:
        rc = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        raise AssertionError(f"{proc.args[2]} did not finish in {timeout} s") from None
    assert rc == 0, f"{proc.args[2]} exited with {rc}"


def read_stream(cfg: NatsConfig) -> list[tuple[str, dict[str, str] | None, bytes]]:
    """Every message the stream holds, raw."""
    import nats

    async def main() -> list[tuple[str, dict[str, str] | None, bytes]]:
        nc = await nats.connect(cfg.url)
        try:
            js = nc.jetstream()
            last = (await js.stream_info(cfg.stream)).state.last_seq
            sub = await js.pull_subscribe(f"{cfg.subject_prefix}.*", stream=cfg.stream)
            out: list[tuple[str, dict[str, str] | None, bytes]] = []
            seen = 0
            while seen < last:
                for m in await sub.fetch(256, timeout=5):
                    await m.ack()
                    seen = m.metadata.sequence.stream
                    out.append((m.subject, m.headers, m.data))
            return out
        finally:
            await nc.close()

    return asyncio.run(main())


def assert_stream_integrity(cfg: NatsConfig) -> None:
    """Each epoch of each worker: seqs 0, 1, 2 ... exactly once (no retried publish doubled,
    none lost), and seq 0 starts with AllBlocksCleared."""
    from kvbm.events.wire import decode_batch

    seqs: dict[tuple[str, str], list[int]] = {}
    for subject, headers, data in read_stream(cfg):
        assert headers is not None
        key = (subject, headers["Kvbm-Epoch"])
        seq = int(headers["Kvbm-Seq"])
        if seq == 0:
            assert isinstance(decode_batch(data).events[0], AllBlocksCleared)
        seqs.setdefault(key, []).append(seq)
    assert seqs
    for key, s in seqs.items():
        assert s == list(range(len(s))), f"{key}: {s[:20]} ..."


# ------------------------------------------------------------------------ no server --
def _random_events(rng: random.Random, n: int) -> list[KVEvent]:
    """Stores chained to any earlier hash (resident or not), removals of anything, clears:
    what a lossy publisher can produce."""
    known: list[int] = []
    out: list[KVEvent] = []
    for _ in range(n):
        r = rng.random()
        if r < 0.5 or not known:
            parent = rng.choice(known) if known and rng.random() < 0.8 else None
            k = rng.randint(1, 4)
            hashes = [rng.getrandbits(64) for _ in range(k)]
            tokens = [rng.getrandbits(20) for _ in range(k * BLOCK_SIZE)]
            out.append(BlockStored(hashes, parent, tokens, BLOCK_SIZE, rng.choice(list(Medium))))
            known.extend(hashes)
        elif r < 0.97:
            out.append(BlockRemoved(rng.sample(known, min(len(known), rng.randint(1, 4))),
                                    rng.choice(list(Medium))))
        else:
            out.append(AllBlocksCleared())
    return out


def test_ledger_snapshot_rebuilds_what_the_events_built() -> None:
    """A ledger's snapshot (and its checkpoint round trip) gives an indexer the state the
    events themselves gave it: parents removed while children stay included."""
    ghosts = 0
    for seed in range(300):
        events = _random_events(random.Random(seed), 80)
        direct, led = KvIndexer(BLOCK_SIZE), Ledger()
        for e in events:
            direct.apply("w", [e])
            led.apply([e])
        ghosts += sum(1 for e in led.snapshot_events()[-1:] if isinstance(e, BlockRemoved))
        for source in (led, Ledger.load(msgpack.unpackb(msgpack.packb(led.dump())))):
            rebuilt = KvIndexer(BLOCK_SIZE)
            rebuilt.apply("w", source.snapshot_events())
            assert rebuilt.worker_blocks("w") == direct.worker_blocks("w"), seed
        assert led.blocks() == direct.worker_blocks("w"), seed
    assert ghosts > 10  # the ghost path was exercised


def test_ledger_reads_vllms_clear_as_its_gpu_cache_only() -> None:
    """vLLM's AllBlocksCleared (its GPU prefix cache was reset) leaves the lower tiers a
    connector inside vLLM keeps; a clean slate (AllMediaCleared) drops everything."""
    led = Ledger()
    toks = [3] * (2 * BLOCK_SIZE)
    led.apply([BlockStored([1, 2], None, toks, BLOCK_SIZE, Medium.GPU),
               BlockStored([1, 2], None, toks, BLOCK_SIZE, Medium.DISK),
               BlockStored([5], None, [4] * BLOCK_SIZE, BLOCK_SIZE, Medium.GPU)])
    led.apply([AllBlocksCleared()])
    assert led.blocks() == {1: frozenset({Medium.DISK}), 2: frozenset({Medium.DISK})}
    led.apply([AllMediaCleared()])
    assert len(led) == 0


def test_ledger_forgets_a_long_chain_of_ghosts_without_recursion() -> None:
    led = Ledger()
    n = 5000
    hashes = list(range(1, n + 1))
    led.apply([BlockStored(hashes, None, [7] * (n * BLOCK_SIZE), BLOCK_SIZE, Medium.GPU)])
    led.apply([BlockRemoved(hashes[:-1], Medium.GPU)])  # all ghosts but the leaf
    assert len(led) == 1
    led.apply([BlockRemoved(hashes[-1:], Medium.GPU)])
    assert len(led) == 0 and led.snapshot_events() == [AllMediaCleared()]


@pytest.mark.parametrize("doc", [None, 3, {"metas": []}, {"metas": [[0] * 9], "blocks": []},
                                 {"metas": [[4, None, None, None, None, None, None, None, None]],
                                  "blocks": [[1, None, b"short", 1, 0, None]]}])
def test_ledger_refuses_a_bad_checkpoint(doc: object) -> None:
    with pytest.raises(EventDecodeError):
        Ledger.load(doc)


@pytest.mark.parametrize("kw", [
    {"url": "http://127.0.0.1:4222"}, {"url": ""}, {"stream": "a.b"}, {"stream": "x y"},
    {"durable": "r*"}, {"subject_prefix": "kvbm.>"}, {"subject_prefix": "kvbm..x"},
    {"max_msgs": -1}, {"max_bytes": 1.5}, {"max_age_s": math.nan}, {"timeout_s": 0},
    {"timeout_s": math.inf}, {"checkpoint_every": 0}, {"replicas": True},
    {"storage": "disk"}, {"max_queue_events": 0}])
def test_config_refuses_bad_values(kw: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        NatsConfig(**kw)


def test_config_from_toml_and_environment(tmp_path: Path) -> None:
    from kvbm.config import ManagerConfig
    from kvbm.events.jetstream import StreamStorage

    p = tmp_path / "kvbm.toml"
    p.write_text('[device]\nnum_blocks = 4\n[events.nats]\nurl = "nats://10.0.0.2:4222"\n'
                 'max_age_s = 3600\n')
    cfg = ManagerConfig.from_toml(p, env={"KVBM_EVENTS_NATS_STORAGE": "memory",
                                          "KVBM_EVENTS_NATS_DURABLE": "r1"})
    nats_cfg = cfg.events.nats
    assert nats_cfg is not None
    assert (nats_cfg.url, nats_cfg.max_age_s, nats_cfg.storage, nats_cfg.durable) == (
        "nats://10.0.0.2:4222", 3600.0, StreamStorage.MEMORY, "r1")
    assert ManagerConfig.from_mapping(cfg.to_dict()) == cfg
    assert ManagerConfig.from_env({"KVBM_DEVICE_NUM_BLOCKS": "4"}).events.nats is None
    with pytest.raises(ConfigError, match="subject_prefix"):
        ManagerConfig.from_env({"KVBM_DEVICE_NUM_BLOCKS": "4",
                                "KVBM_EVENTS_NATS_SUBJECT_PREFIX": "kvbm.*"})


def test_bad_arguments_are_refused_before_anything_is_sent() -> None:
    cfg = NatsConfig(url=f"nats://{HOST}:{free_port()}")  # nobody there: nothing is sent
    for worker in ("", "a.b", "w>", "w 1", 3):
        with pytest.raises(InvalidArgumentError):
            NatsEventPublisher(cfg, worker)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError):
        JetStreamConsumer(cfg, "not callable")  # type: ignore[arg-type]
    with NatsEventPublisher(cfg, "w0") as pub:
        for bad in ([BlockStored([2**64], None, [1] * 4, 4, Medium.GPU)], "x",
                    AllBlocksCleared(), [object()]):
            with pytest.raises(InvalidArgumentError):
                pub.publish(bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgumentError):
            pub.flush(math.nan)
        assert pub.stats().queued_events == 1  # only the epoch's opening clear
        assert not pub.flush(0.2)  # no server: nothing acknowledged, nothing lost


# --------------------------------------------------------------------- with a server --
def publish_workload(pub: NatsEventPublisher, seed: int, steps: int) -> Workload:
    work = Workload(seed)
    for _ in range(steps):
        pub.publish(work.step())
    return work


def test_publishers_to_router_block_by_block(server: NatsServer) -> None:
    """Two workers publish; a consumer feeds an indexer that ends equal to both."""
    cfg = config(server)
    idx = KvIndexer(BLOCK_SIZE)
    with JetStreamConsumer(cfg, idx.apply, durable="router-a") as consumer:
        pubs = {w: NatsEventPublisher(cfg, w) for w in ("w0", "w1")}
        works = {w: publish_workload(p, seed, 3000) for seed, (w, p) in enumerate(pubs.items())}
        for p in pubs.values():
            assert p.flush(60)
            assert p.stats().overflows == 0
            p.close()
        assert consumer.wait_caught_up(60)
        for w, work in works.items():
            assert as_json(idx.worker_blocks(w)) == work.blocks(), w
            assert len(work.blocks()) > 50
        st = consumer.stats()
        assert st.gaps == 0 and st.bad_msgs == 0 and st.rejected_events == 0
    assert_stream_integrity(cfg)


def test_server_killed_mid_stream(server: NatsServer, tmp_path: Path) -> None:
    """kill -9 of nats-server twice while two publisher processes publish and a router
    consumes; restarted on the same store: nothing lost, nothing doubled."""
    cfg = config(server)
    idx = KvIndexer(BLOCK_SIZE)
    consumer = JetStreamConsumer(cfg, idx.apply, durable="router-k")
    try:
        procs = {w: spawn("publisher", {"config": {"url": cfg.url, "timeout_s": 2.0},
                                        "worker": w, "seed": 10 + i, "steps": 6000,
                                        "pace_every": 2, "out": str(tmp_path / f"{w}.json")})
                 for i, w in enumerate(("p0", "p1"))}
        wait_for(lambda: consumer.stats().msgs > 20, 60, "the first messages")
        for _ in range(2):
            server.kill()
            time.sleep(0.5)
            server.start()
            time.sleep(1.0)
        assert all(p.poll() is None for p in procs.values())  # the kills were mid-stream
        for p in procs.values():
            finish(p)
        assert consumer.wait_caught_up(60)
        for w in procs:
            truth = json.loads((tmp_path / f"{w}.json").read_text())
            assert truth["flushed"] and truth["stats"]["retries"] > 0
            assert as_json(idx.worker_blocks(w)) == truth["blocks"], w
        assert consumer.stats().gaps == 0
    finally:
        consumer.close()
    assert_stream_integrity(cfg)
    # a router that never saw any of it (a new durable) replays the stream to the same index
    fresh = KvIndexer(BLOCK_SIZE)
    with JetStreamConsumer(cfg, fresh.apply, durable="router-new") as late:
        assert late.wait_caught_up(60)
    for w in procs:
        assert fresh.worker_blocks(w) == idx.worker_blocks(w)


def test_router_killed_and_resumed(server: NatsServer, tmp_path: Path) -> None:
    """kill -9 of the router process mid-stream; restarted with the same durable, it
    resumes from its checkpoint (not from nothing) and ends equal to the publishers."""
    cfg = config(server)
    stop = tmp_path / "stop"
    router_args = {"config": {"url": cfg.url, "checkpoint_interval_s": 0.2, "timeout_s": 2.0},
                   "durable": "router-r", "stop": str(stop), "out": str(tmp_path / "r.json")}
    router = spawn("router", router_args)
    pub = spawn("publisher", {"config": {"url": cfg.url}, "worker": "p0", "seed": 7,
                              "steps": 8000, "pace_every": 2, "out": str(tmp_path / "p0.json")})
    try:
        # killed once it has checkpointed some of the stream
        wait_for(lambda: _checkpointed(cfg, "router-r"), 60, "a checkpoint of the router")
        assert pub.poll() is None  # mid-stream
        router.kill()
        router.wait(10)
        time.sleep(0.5)
        router = spawn("router", router_args)
        finish(pub)
        stop.touch()
        finish(router)
    finally:
        for p in (router, pub):
            if p.poll() is None:
                p.kill()
                p.wait(10)
    out = json.loads((tmp_path / "r.json").read_text())
    truth = json.loads((tmp_path / "p0.json").read_text())
    assert out["caught_up"] and truth["flushed"]
    assert out["workers"]["p0"] == truth["blocks"]
    assert out["stats"]["restored_blocks"] > 0, out["stats"]  # resumed from the checkpoint


def _checkpointed(cfg: NatsConfig, durable: str) -> bool:
    import nats

    async def main() -> bool:
        nc = await nats.connect(cfg.url)
        try:
            info = await nc.jetstream().consumer_info(cfg.stream, durable)
            return bool(info.ack_floor and info.ack_floor.stream_seq > 10)
        except Exception:
            return False
        finally:
            await nc.close()

    return asyncio.run(main())


def test_stream_limits_dropped_old_messages_a_late_router_resyncs(server: NatsServer) -> None:
    """The stream keeps only its last 40 messages: a router that starts late misses the
    worker's beginning, finds the hole, clears the worker and asks for a resync, which the
    publisher answers from its ledger: the router ends equal to the worker."""
    cfg = config(server, max_msgs=40)
    with NatsEventPublisher(cfg, "w0") as pub:
        work = Workload(3)
        for _ in range(300):  # one message each: the stream drops all but the last 40
            pub.publish(work.step())
            assert pub.flush(30)
        idx = KvIndexer(BLOCK_SIZE)
        with JetStreamConsumer(cfg, idx.apply, durable="late") as consumer:
            wait_for(lambda: consumer.stats().gaps >= 1, 30, "the hole")
            wait_for(lambda: consumer.cursors()["w0"].synced, 30, "the resync")
            assert consumer.wait_caught_up(30)
            assert as_json(idx.worker_blocks("w0")) == work.blocks()
            assert consumer.stats().resync_requests >= 1
        assert pub.stats().resyncs >= 1


def test_overflow_while_the_server_is_down_is_a_resync(server: NatsServer) -> None:
    """The server is down, the queue overflows: counted, and once the server is back the
    publisher sends AllBlocksCleared + its whole state; the router ends equal."""
    cfg = config(server, max_queue_events=200)
    idx = KvIndexer(BLOCK_SIZE)
    with JetStreamConsumer(cfg, idx.apply, durable="ov") as consumer, \
            NatsEventPublisher(cfg, "w0") as pub:
        work = publish_workload(pub, 4, 200)
        assert pub.flush(30)
        server.kill()
        for _ in range(2000):
            pub.publish(work.step())
        st = pub.stats()
        assert st.overflows >= 1 and st.dropped_events > 0
        server.start()
        assert pub.flush(60)
        assert pub.stats().resyncs >= 1
        assert consumer.wait_caught_up(60)
        assert as_json(idx.worker_blocks("w0")) == work.blocks()


def test_garbage_on_the_subjects_is_counted_and_skipped(server: NatsServer) -> None:
    """Messages that are not a publisher's batches: no headers, headers that are not
    numbers, a payload that is not msgpack, a subject that names no valid worker. Counted,
    skipped; the real events around them are applied."""
    import nats

    cfg = config(server)
    idx = KvIndexer(BLOCK_SIZE)
    with JetStreamConsumer(cfg, idx.apply, durable="g") as consumer, \
            NatsEventPublisher(cfg, "w0") as pub:
        work = publish_workload(pub, 5, 300)
        assert pub.flush(30)
        good = encode_batch(EventBatch(0.0, [AllBlocksCleared()]))

        async def junk() -> None:
            nc = await nats.connect(cfg.url)
            js = nc.jetstream()
            await js.publish("kvbm.events.w0", good)  # no headers
            await js.publish("kvbm.events.w0", good, headers={"Kvbm-Epoch": "x",
                                                              "Kvbm-Seq": "1"})
            await js.publish("kvbm.events.w0", good, headers={"Kvbm-Epoch": "-1",
                                                              "Kvbm-Seq": "1"})
            await js.publish("kvbm.events.w0", b"\xc1garbage",
                             headers=msg_headers("w0", 1, 0))
            await js.publish("kvbm.events.w@1", good, headers=msg_headers("w@1", 1, 0))
            await nc.close()

        asyncio.run(junk())
        for _ in range(300):
            pub.publish(work.step())
        assert pub.flush(30)
        assert consumer.wait_caught_up(30)
        st = consumer.stats()
        assert st.bad_msgs == 5, st
        assert as_json(idx.worker_blocks("w0")) == work.blocks()
        assert "w@1" not in idx.workers()


# ------------------------------------------------------------------------ the bridge --
def test_bridge_forwards_a_zmq_publisher(server: NatsServer) -> None:
    """ZmqEventPublisher (what vLLM speaks) -> bridge -> JetStream -> router. The events
    published before the bridge started come from the replay socket."""
    pytest.importorskip("zmq")
    from kvbm.config import EventsConfig
    from kvbm.events.bridge import EventBridge
    from kvbm.events.publisher import ZmqEventPublisher

    cfg = config(server)
    work = Workload(21)
    zcfg = EventsConfig(enabled=True, endpoint=f"tcp://{HOST}:*",
                        replay_endpoint=f"tcp://{HOST}:*", batch_interval_s=0.002)
    idx = KvIndexer(BLOCK_SIZE)
    with ZmqEventPublisher(zcfg) as zpub:
        for _ in range(500):  # before the bridge: only the replay socket has them
            zpub.publish(work.step())
        assert zpub.flush(10)
        bridge = EventBridge(zpub.endpoint, cfg, worker="vllm0",
                             replay_endpoint=zpub.replay_endpoint)
        bridge.start()
        try:
            wait_for(lambda: bridge.stats().replayed > 0, 30, "the replay")
            for _ in range(2000):
                zpub.publish(work.step())
            assert zpub.flush(10)
            batches = zpub.stats.batches_sent
            wait_for(lambda: bridge.stats().batches >= batches, 30, "the bridge")
            assert bridge.publisher.flush(30)
        finally:
            bridge.close()
    st = bridge.stats()
    assert st.unhealed == 0 and st.bad_msgs == 0 and st.restarts == 0
    with JetStreamConsumer(cfg, idx.apply, durable="bridged") as consumer:
        assert consumer.wait_caught_up(30)
    assert as_json(idx.worker_blocks("vllm0")) == work.blocks()


class FakeWorker:
    """A vLLM-like ZMQ publisher whose sequence numbers the test controls: PUB frames, and a
    ROUTER replay socket answering from ``buffer`` (vLLM 0.32's reply shape)."""

    def __init__(self) -> None:
        import threading

        import zmq

        from kvbm.events.wire import (
            encode_frames,
            encode_replay_end,
            encode_replay_reply,
            parse_replay_request,
        )

        self._frames, self._reply, self._end = encode_frames, encode_replay_reply, \
            encode_replay_end
        self._parse = parse_replay_request
        self.ctx = zmq.Context()
        self.pub = self.ctx.socket(zmq.PUB)
        port = self.pub.bind_to_random_port(f"tcp://{HOST}")
        self.endpoint = f"tcp://{HOST}:{port}"
        self.router = self.ctx.socket(zmq.ROUTER)
        rport = self.router.bind_to_random_port(f"tcp://{HOST}")
        self.replay_endpoint = f"tcp://{HOST}:{rport}"
        self.buffer: dict[int, bytes] = {}
        self.lock = threading.Lock()
        self.requests = 0
        self.gate = threading.Event()  # cleared: replay requests wait for it
        self.gate.set()
        self.running = True
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while self.running:
            if not self.router.poll(50):
                continue
            ident, start = self._parse(self.router.recv_multipart())
            self.requests += 1
            while self.running and not self.gate.wait(0.05):
                pass
            with self.lock:
                items = sorted((s, p) for s, p in self.buffer.items() if s >= start)
            for s, p in items:
                self.router.send_multipart([ident, *self._reply(b"", s, p)])
            self.router.send_multipart([ident, *self._end()])

    def send(self, seq: int, events: list[KVEvent], *, live: bool = True,
             buffered: bool = True) -> None:
        payload = encode_batch(EventBatch(time.time(), events, 0))
        if buffered:
            with self.lock:
                self.buffer[seq] = payload
        if live:
            self.pub.send_multipart(self._frames(b"", seq, payload))

    def close(self) -> None:
        self.running = False
        self.thread.join(5)
        self.pub.close(0)
        self.router.close(0)
        self.ctx.term()


def test_bridge_heals_holes_restarts_and_says_less_when_it_cannot(server: NatsServer) -> None:
    pytest.importorskip("zmq")
    from kvbm.events.bridge import EventBridge

    cfg = config(server)
    fake = FakeWorker()
    truth = KvIndexer(BLOCK_SIZE)  # what the stream must say, batch by batch
    rng = random.Random(5)
    parent: list[int | None] = [None]

    def events() -> list[KVEvent]:
        h = rng.getrandbits(64)
        e = BlockStored([h], parent[0], [rng.getrandbits(20) for _ in range(BLOCK_SIZE)],
                        BLOCK_SIZE, Medium.GPU)
        parent[0] = h
        return [e]

    # a generous replay timeout: a replay that times out is a hole left unhealed, which a
    # busy machine must not cause here (every hole below is answered or refused outright)
    bridge = EventBridge(fake.endpoint, cfg, worker="fake", replay_endpoint=fake.replay_endpoint,
                         replay_timeout_s=30.0)
    bridge.start()
    try:
        seq = 0
        # 0..19 live; the first ones may reach the SUB before it is connected: then the
        # next one shows a hole, which the replay fills
        for _ in range(20):
            ev = events()
            truth.apply("fake", ev)
            fake.send(seq, ev)
            seq += 1
            time.sleep(0.01)
        # a hole on the wire (20, 21 only in the replay buffer), then 22
        for _ in range(3):
            ev = events()
            truth.apply("fake", ev)
            fake.send(seq, ev, live=seq == 22)
            seq += 1
        wait_for(lambda: bridge.stats().batches >= 23, 30, "the healed hole")
        assert bridge.stats().gaps >= 1 and bridge.stats().unhealed == 0
        # the worker restarts: its seq starts over (its cache is empty)
        with fake.lock:
            fake.buffer.clear()
        truth.apply("fake", [AllMediaCleared()])
        parent[0] = None
        for seq in range(5):
            ev = events()
            truth.apply("fake", ev)
            fake.send(seq, ev)
            time.sleep(0.01)
        wait_for(lambda: bridge.stats().restarts == 1, 30, "the restart")
        # a hole the replay buffer no longer holds: the stream forgets the worker
        ev = events()
        fake.send(5, ev, live=False, buffered=False)
        truth.apply("fake", [AllMediaCleared()])
        parent[0] = None
        ev = events()
        truth.apply("fake", ev)
        fake.send(6, ev)
        wait_for(lambda: bridge.stats().unhealed == 1, 30, "the unhealable hole")
        fake.pub.send_multipart([b"", b"short"])  # garbage frames: counted, skipped
        wait_for(lambda: bridge.stats().bad_msgs == 1, 30, "the bad message")
        assert bridge.publisher.flush(30)
    finally:
        bridge.close()
        fake.close()
    idx = KvIndexer(BLOCK_SIZE)
    with JetStreamConsumer(cfg, idx.apply, durable=None) as consumer:
        assert consumer.wait_caught_up(30)
    assert idx.worker_blocks("fake") == truth.worker_blocks("fake")
    assert len(truth.worker_blocks("fake")) == 1


def test_bridge_command(server: NatsServer) -> None:
    """``kvbm events bridge`` forwards a publisher's history and stops cleanly on SIGTERM."""
    pytest.importorskip("zmq")
    import signal

    from kvbm.config import EventsConfig
    from kvbm.events.publisher import ZmqEventPublisher

    cfg = config(server)
    work = Workload(31)
    zcfg = EventsConfig(enabled=True, endpoint=f"tcp://{HOST}:*",
                        replay_endpoint=f"tcp://{HOST}:*")
    idx = KvIndexer(BLOCK_SIZE)
    with ZmqEventPublisher(zcfg) as zpub:
        for _ in range(300):
            zpub.publish(work.step())
        assert zpub.flush(10)
        proc = subprocess.Popen(
            [sys.executable, "-m", "kvbm", "events", "bridge", zpub.endpoint, cfg.url,
             "--replay", str(zpub.replay_endpoint), "--worker", "cli0", "--timeout", "120"],
            stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            with JetStreamConsumer(cfg, idx.apply, durable=None) as consumer:
                wait_for(lambda: as_json(idx.worker_blocks("cli0")) == work.blocks(), 60,
                         "the bridged history")
                for _ in range(300):
                    zpub.publish(work.step())
                assert zpub.flush(10)
                wait_for(lambda: as_json(idx.worker_blocks("cli0")) == work.blocks(), 60,
                         "the live events")
                assert consumer.stats().gaps == 0
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    assert proc.returncode == 0, err
    assert "0 unhealed" in err and "0 events left unpublished" in err, err


def test_bridge_live_copies_of_replayed_batches_are_not_a_restart(server: NatsServer) -> None:
    """Batches published while the bridge's first replay runs reach it twice: in the replay
    and live, after it. The live copies are skipped, not taken for a worker restart."""
    pytest.importorskip("zmq")
    from kvbm.events.bridge import EventBridge

    cfg = config(server)
    fake = FakeWorker()
    fake.gate.clear()
    truth = KvIndexer(BLOCK_SIZE)
    bridge = EventBridge(fake.endpoint, cfg, worker="dup", replay_endpoint=fake.replay_endpoint,
                         replay_timeout_s=30.0)
    bridge.start()
    try:
        wait_for(lambda: fake.requests == 1, 30, "the first replay request")
        time.sleep(0.3)  # the SUB is connected by now: these arrive live too
        parent = None
        for seq in range(10):
            h = seq + 1
            ev: list[KVEvent] = [BlockStored([h], parent, [seq] * BLOCK_SIZE, BLOCK_SIZE,
                                             Medium.GPU)]
            truth.apply("dup", ev)
            fake.send(seq, ev)
            parent = h
        fake.gate.set()
        wait_for(lambda: bridge.stats().batches >= 10, 30, "the replay")
        time.sleep(0.3)  # the live copies are read
        assert bridge.publisher.flush(30)
        st = bridge.stats()
        assert st.restarts == 0 and st.batches == 10 and st.replayed == 10, st
    finally:
        bridge.close()
        fake.close()
    idx = KvIndexer(BLOCK_SIZE)
    with JetStreamConsumer(cfg, idx.apply, durable=None) as consumer:
        assert consumer.wait_caught_up(30)
    assert idx.worker_blocks("dup") == truth.worker_blocks("dup")


def test_router_command_consumes_jetstream(server: NatsServer) -> None:
    """``kvbm router --nats URL --durable NAME``: /dump and /metrics show the JetStream
    consumer and the workers it learned; /select finds a worker's prefix; SIGTERM stops it
    after a checkpoint, and a restart with the same durable resumes from it."""
    import signal
    import urllib.request

    cfg = config(server)
    with NatsEventPublisher(cfg, "w0") as pub:
        tokens = list(range(10 * BLOCK_SIZE))
        pub.publish([BlockStored(list(range(1, 11)), None, tokens, BLOCK_SIZE, Medium.DISK)])
        work = publish_workload(pub, 41, 500)
        assert pub.flush(30)

    def start() -> tuple[subprocess.Popen[str], str]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kvbm", "router", "--nats", cfg.url, "--durable", "svc",
             "--port", "0", "--block-size", str(BLOCK_SIZE)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "listening on http://" in line and "durable svc" in line, line
        return proc, line.split("listening on ")[1].split()[0]

    def get(url: str) -> Any:
        with urllib.request.urlopen(url, timeout=10) as r:
            body = r.read().decode()
        return json.loads(body) if url.endswith("/dump") else body

    def held(url: str) -> int:
        blocks = get(url + "/dump")["workers"].get("w0", {}).get("blocks", {})
        return sum(blocks.values())

    expected = 10 + sum(len(m) for m in work.blocks().values())  # the prompt's 10 + the rest
    proc, url = start()
    try:
        wait_for(lambda: held(url) == expected, 60, "the router's index")
        dump = get(url + "/dump")
        assert dump["jetstream"]["durable"] == "svc" and dump["jetstream"]["gaps"] == 0
        assert dump["workers"]["w0"]["jetstream"]["synced"] is True
        assert "kvbm_router_jetstream_msgs_total" in get(url + "/metrics")
        req = urllib.request.Request(url + "/select", method="POST",
                                     data=json.dumps({"token_ids": tokens}).encode())
        with urllib.request.urlopen(req, timeout=10) as r:
            assert json.loads(r.read())["worker"] == "w0"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        proc, url = start()  # resumes from the checkpoint taken on the way out
        wait_for(lambda: held(url) == expected, 60, "the resumed index")
        assert get(url + "/dump")["jetstream"]["restored_blocks"] > 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_resync_from_the_owners_snapshot_is_retried_until_it_works(server: NatsServer) -> None:
    """With ``snapshot=`` (what a BlockManager gives) the publisher keeps no ledger: an
    overflow's resync asks the owner; a snapshot that fails is retried (the queue goes on
    meanwhile), an invalid event in it is left out; the router ends equal."""
    cfg = config(server, max_queue_events=100)
    owner = Ledger()  # the owner's state, as its snapshot() says it
    calls = {"n": 0}

    def snapshot() -> list[KVEvent]:
        calls["n"] += 1
        if calls["n"] <= 2:
            raise RuntimeError("the owner thread is busy")
        return [*owner.snapshot_events()[1:], "not an event"]  # type: ignore[list-item]

    idx = KvIndexer(BLOCK_SIZE)
    with JetStreamConsumer(cfg, idx.apply, durable="snap") as consumer, \
            NatsEventPublisher(cfg, "w0", snapshot=snapshot) as pub:
        work = Workload(51)
        for _ in range(100):
            ev = work.step()
            owner.apply(ev)
            pub.publish(ev)
        assert pub.flush(30)
        server.kill()
        for _ in range(1000):
            ev = work.step()
            owner.apply(ev)
            pub.publish(ev)
        assert pub.stats().overflows >= 1
        server.start()
        assert pub.flush(60)
        st = pub.stats()
        assert calls["n"] >= 3 and st.resyncs >= 1 and st.snapshot_errors >= 3, st
        assert consumer.wait_caught_up(60)
        assert as_json(idx.worker_blocks("w0")) == work.blocks()


def test_a_checkpoint_that_does_not_fit_is_ignored(server: NatsServer) -> None:
    """A checkpoint that does not read back (garbage in its place), or one of a stream that
    was deleted and made again (its sequence starts over), is ignored: the router replays the
    stream it finds, and holds nothing of the old one."""
    import nats

    cfg = config(server)

    def run_router() -> tuple[KvIndexer, Any]:
        idx = KvIndexer(BLOCK_SIZE)
        with JetStreamConsumer(cfg, idx.apply, durable="cp") as consumer:
            assert consumer.wait_caught_up(30)
        return idx, consumer.stats()

    with NatsEventPublisher(cfg, "w0") as pub:
        old = publish_workload(pub, 61, 300)
        assert pub.flush(30)
    idx, st = run_router()
    assert as_json(idx.worker_blocks("w0")) == old.blocks() and st.checkpoints >= 1

    async def put(data: bytes | None) -> None:
        nc = await nats.connect(cfg.url)
        js = nc.jetstream()
        if data is None:
            await js.delete_stream(cfg.stream)
        else:
            await (await js.object_store(cfg.checkpoint_bucket)).put("cp", data)
        await nc.close()

    asyncio.run(put(b"\x93garbage"))
    idx, st = run_router()
    assert st.restored_blocks == 0 and as_json(idx.worker_blocks("w0")) == old.blocks()
    asyncio.run(put(None))  # the stream goes; the checkpoint (just rewritten) stays
    with NatsEventPublisher(cfg, "w1") as pub:
        new = publish_workload(pub, 62, 200)
        assert pub.flush(30)
    idx, st = run_router()
    assert st.restored_blocks == 0 and "w0" not in idx.workers()
    assert as_json(idx.worker_blocks("w1")) == new.blocks()

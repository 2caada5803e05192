"""The processes of bench/events_throughput.py's end-to-end figures, and their workload.

``python bench/_events_procs.py ROLE JSON_ARGS`` runs one side of one transport:

- ``zmq-pub`` / ``zmq-sub``: kvbm's ZmqEventPublisher -> Subscriber + KvIndexer;
- ``raw-pub`` / ``raw-sub``: plain pyzmq PUB/SUB of the same msgpack batches, nothing
  decoded (the transport's ceiling); ``raw-pub`` / ``zmq-sub``: kvbm's subscriber side fed
  as fast as a socket can (its own ceiling, the publisher out of the way);
- ``nats-pub`` / ``nats-sub``: NatsEventPublisher -> JetStreamConsumer + KvIndexer;
- ``rawnats-pub`` / ``rawnats-sub``: plain nats-py: one JetStream publish per batch, each
  acknowledged before the next (as kvbm's publisher sends), a pull consumer that only counts.

A process talks to the bench on stdin/stdout, one JSON object per line. A publisher answers
``warm`` (publish one small event, flushed) and ``go`` (publish the workload as an engine
would, a few events per call, then wait until everything was sent: ``{"t0", "t_sent",
"events", ...}``). A subscriber answers ``count`` (what it has applied or received so far)
and ``target N`` (``{"t_done"}``: when its count first reached N). Times are
``time.monotonic()``, one clock for every process of the machine. Both stop at ``quit``.
"""

from __future__ import annotations

import asyncio
import json
import select
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import numpy as np

from kvbm.events.records import BlockRemoved, BlockStored, KVEvent
from kvbm.events.wire import event_to_wire, pack_batch
from kvbm.medium import Medium

#: Events handed to a publisher per publish() call (an engine's step publishes a few).
EVENTS_PER_CALL = 4
_POLL_S = 0.002


def workload(n_events: int, *, seed: int = 0, blocks: int = 16, block_size: int = 16,
             pool: int = 2048) -> list[KVEvent]:
    """``n_events`` events: stores of ``blocks`` chained blocks (eight stores make one
    conversation) and, ``pool // 2`` stores later, the removal of each; the ``pool`` distinct
    stores are used again in turn, so the index stays bounded however long the stream."""
    rng = np.random.default_rng(seed)
    hashes = rng.integers(1, 2**63, (pool, blocks), dtype=np.int64).tolist()
    tokens = rng.integers(0, 2**31, (pool, blocks * block_size), dtype=np.int64).tolist()
    media = list(Medium)
    stores = [BlockStored(hashes[i], hashes[i - 1][-1] if i % 8 else None, tokens[i],
                          block_size, media[i % 8 // 2]) for i in range(pool)]
    removes = [BlockRemoved(hashes[i], stores[i].medium) for i in range(pool)]
    window = pool // 2
    out: list[KVEvent] = []
    s = 0
    while len(out) < n_events:
        out.append(stores[s % pool])
        if s >= window and len(out) < n_events:
            out.append(removes[(s - window) % pool])
        s += 1
    return out


def batches(events: list[KVEvent], per_batch: int) -> list[bytes]:
    """The events as msgpack batches of ``per_batch`` events (vLLM's encoding)."""
    wire = [event_to_wire(e) for e in events]
    return [pack_batch(time.time(), wire[i:i + per_batch], None)
            for i in range(0, len(wire), per_batch)]


def blocks_in(events: list[KVEvent]) -> int:
    return sum(len(e.block_hashes) for e in events if isinstance(e, BlockStored | BlockRemoved))


def _say(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _commands() -> Any:
    for line in sys.stdin:
        line = line.strip()
        if line:
            yield line


# ------------------------------------------------------------------------- publishers --
def _serve_publisher(publish: Callable[[list[KVEvent]], None], flush: Callable[[], object],
                     events: list[KVEvent], stats: Callable[[], dict[str, Any]]) -> None:
    warm = 0
    for cmd in _commands():
        if cmd == "warm":
            warm += 1
            publish([BlockStored([2**63 + warm], None, [warm] * 16, 16, Medium.GPU)])
            flush()
            _say({"warm": warm})
        elif cmd == "go":
            t0 = time.monotonic()
            for i in range(0, len(events), EVENTS_PER_CALL):
                publish(events[i:i + EVENTS_PER_CALL])
            t_called = time.monotonic()
            flush()
            _say({"t0": t0, "t_called": t_called, "t_sent": time.monotonic(),
                  "events": len(events), "warm": warm, "stats": stats()})
        elif cmd == "quit":
            return


def zmq_pub(args: dict[str, Any]) -> None:
    from kvbm.config import EventsConfig
    from kvbm.events.publisher import ZmqEventPublisher

    events = workload(args["events"], seed=args["seed"])
    cfg = EventsConfig(enabled=True, endpoint="tcp://127.0.0.1:*",
                       replay_endpoint="tcp://127.0.0.1:*", buffer_steps=100_000,
                       max_queue_size=max(100_000, 2 * len(events)))
    with ZmqEventPublisher(cfg) as pub:
        _say({"endpoint": pub.endpoint, "replay": pub.replay_endpoint})
        _serve_publisher(pub.publish, lambda: pub.flush(600), events,
                         lambda: asdict(pub.stats))


def raw_pub(args: dict[str, Any]) -> None:
    import zmq

    payloads = batches(workload(args["events"], seed=args["seed"]), args["per_batch"])
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.SNDHWM, 0)  # queue rather than drop: the ceiling must count them all
    pub.setsockopt(zmq.LINGER, 1000)
    pub.bind("tcp://127.0.0.1:*")
    _say({"endpoint": pub.getsockopt_string(zmq.LAST_ENDPOINT)})
    seq = 0
    for cmd in _commands():
        if cmd == "warm":  # one small batch, which a kvbm Subscriber can apply too
            warm = batches([BlockStored([2**63 + seq], None, [seq] * 16, 16, Medium.GPU)], 1)
            pub.send_multipart([b"", seq.to_bytes(8, "big"), warm[0]])
            seq += 1
            _say({"warm": seq})
        elif cmd == "go":
            t0 = time.monotonic()
            for p in payloads:
                pub.send_multipart([b"", seq.to_bytes(8, "big"), p])
                seq += 1
            _say({"t0": t0, "t_called": time.monotonic(), "t_sent": time.monotonic(),
                  "messages": len(payloads)})
        elif cmd == "quit":
            break
    pub.close()
    ctx.term()


def nats_pub(args: dict[str, Any]) -> None:
    from kvbm.events.jetstream import NatsConfig
    from kvbm.events.nats import NatsEventPublisher

    events = workload(args["events"], seed=args["seed"])
    cfg = NatsConfig(url=args["url"], stream="KVBM_BENCH", subject_prefix="bench.events",
                     max_queue_events=max(100_000, 2 * len(events)), timeout_s=30.0)
    with NatsEventPublisher(cfg, "w0") as pub:
        pub.flush(60)  # the epoch's opening AllBlocksCleared: the stream exists now
        _say({"ready": True})
        _serve_publisher(pub.publish, lambda: pub.flush(600), events,
                         lambda: asdict(pub.stats()))


def rawnats_pub(args: dict[str, Any]) -> None:
    import nats

    payloads = batches(workload(args["events"], seed=args["seed"]), args["per_batch"])

    async def main() -> None:
        from nats.js.api import StorageType, StreamConfig

        nc = await nats.connect(args["url"])
        js = nc.jetstream(timeout=30.0)
        await js.add_stream(StreamConfig(name="RAW_BENCH", subjects=["rawbench.*"],
                                         storage=StorageType.FILE))
        await js.publish("rawbench.w0", payloads[0])
        _say({"ready": True})
        loop = asyncio.get_running_loop()
        while True:
            cmd = (await loop.run_in_executor(None, sys.stdin.readline)).strip()
            if cmd == "go":
                t0 = time.monotonic()
                for p in payloads:
                    await js.publish("rawbench.w0", p)
                _say({"t0": t0, "t_called": time.monotonic(), "t_sent": time.monotonic(),
                      "messages": len(payloads)})
            elif cmd in ("quit", ""):
                break
        await nc.close()

    asyncio.run(main())


# ------------------------------------------------------------------------ subscribers --
def _serve_counter(count: Callable[[], int], extra: Callable[[], dict[str, Any]]) -> None:
    """Poll ``count()`` every few ms, note when it changed; answer the bench's commands."""
    trail: list[tuple[float, int]] = [(time.monotonic(), count())]
    target: int | None = None
    while True:
        if select.select([sys.stdin], [], [], _POLL_S)[0]:
            cmd = sys.stdin.readline().strip()
            if cmd == "count":
                _say({"count": trail[-1][1]})
            elif cmd.startswith("target "):
                target = int(cmd.split()[1])
            elif cmd in ("quit", ""):
                return
        c = count()
        if c != trail[-1][1]:
            trail.append((time.monotonic(), c))
        if target is not None and c >= target:
            t_done = next(t for t, n in trail if n >= target)
            _say({"t_done": t_done, "count": c, **extra()})
            target = None


def zmq_sub(args: dict[str, Any]) -> None:
    from kvbm.router import KvIndexer, Subscriber

    idx = KvIndexer(16)
    with Subscriber(idx) as sub:
        sub.add_worker("w0", args["endpoint"], args.get("replay"))
        _say({"ready": True})
        _serve_counter(lambda: idx.stats().events_applied,
                       lambda: {"subscriber": sub.totals(), "indexer": asdict(idx.stats())})


def raw_sub(args: dict[str, Any]) -> None:
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.connect(args["endpoint"])
    n = [0]
    stop = threading.Event()

    def recv() -> None:
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        while not stop.is_set():
            if poller.poll(50):
                while True:
                    try:
                        sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    n[0] += 1

    t = threading.Thread(target=recv, daemon=True)
    t.start()
    _say({"ready": True})
    _serve_counter(lambda: n[0], dict)
    stop.set()
    t.join()
    sock.close(0)
    ctx.term()


def nats_sub(args: dict[str, Any]) -> None:
    from kvbm.events.jetstream import NatsConfig
    from kvbm.events.nats_consumer import JetStreamConsumer
    from kvbm.router import KvIndexer

    idx = KvIndexer(16)
    cfg = NatsConfig(url=args["url"], stream="KVBM_BENCH", subject_prefix="bench.events",
                     timeout_s=30.0)
    with JetStreamConsumer(cfg, idx.apply, durable=None) as consumer:
        _say({"ready": True})
        _serve_counter(lambda: idx.stats().events_applied,
                       lambda: {"consumer": asdict(consumer.stats()),
                                "indexer": asdict(idx.stats())})


def rawnats_sub(args: dict[str, Any]) -> None:
    import nats

    n = [0]
    stop = threading.Event()
    ready = threading.Event()

    async def main() -> None:
        from nats.js.api import AckPolicy, ConsumerConfig

        nc = await nats.connect(args["url"])
        js = nc.jetstream(timeout=30.0)
        sub = await js.pull_subscribe("rawbench.*", durable=None, stream="RAW_BENCH",
                                      config=ConsumerConfig(ack_policy=AckPolicy.NONE))
        ready.set()
        while not stop.is_set():
            try:
                msgs = await sub.fetch(256, timeout=0.5)
            except asyncio.TimeoutError:
                continue
            n[0] += len(msgs)
        await nc.close()

    t = threading.Thread(target=lambda: asyncio.run(main()), daemon=True)
    t.start()
    ready.wait(60)
    _say({"ready": True})
    _serve_counter(lambda: n[0], dict)
    stop.set()
    t.join(5)


ROLES: dict[str, Callable[[dict[str, Any]], None]] = {
    "zmq-pub": zmq_pub, "zmq-sub": zmq_sub, "raw-pub": raw_pub, "raw-sub": raw_sub,
    "nats-pub": nats_pub, "nats-sub": nats_sub, "rawnats-pub": rawnats_pub,
    "rawnats-sub": rawnats_sub,
}

if __name__ == "__main__":
    ROLES[sys.argv[1]](json.loads(sys.argv[2]))

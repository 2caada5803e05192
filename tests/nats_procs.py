"""Processes for the JetStream tests (run as ``python tests/nats_procs.py ROLE JSON_ARGS``).

``publisher``: a worker that changes its residency at random (stores chained to resident
parents, stores of resident blocks in other media, removals, now and then a clear),
publishes every change through :class:`~kvbm.events.nats.NatsEventPublisher`, keeps its own
model of what is resident, and at the end (after a flush) writes that model as JSON:
``{"blocks": {hash: [medium, ...]}, "stats": {...}}``.

``router``: ``kvbm router``'s :class:`~kvbm.router.service.RouterService` consuming from
JetStream with a durable name; once the file ``stop`` names exists it waits to be caught up
with the stream and writes every worker's blocks (its indexer's) as JSON, then exits.

Both exit on their own after ``deadline_s`` (a test can never hang on them).
"""

from __future__ import annotations

import dataclasses
import json
import random
import sys
import threading
import time
from pathlib import Path
from typing import Any

from kvbm.events.jetstream import NatsConfig
from kvbm.events.records import AllMediaCleared, BlockRemoved, BlockStored, KVEvent
from kvbm.medium import Medium

BLOCK_SIZE = 4
MEDIA = list(Medium)


class Workload:
    """Random residency changes that a consumer can always apply (parents are resident)."""

    def __init__(self, seed: int, max_blocks: int = 1500) -> None:
        self.rng = random.Random(seed)
        self.max_blocks = max_blocks
        self.resident: dict[int, set[Medium]] = {}
        self.info: dict[int, tuple[int | None, list[int]]] = {}  # hash -> (parent, tokens)

    def step(self) -> list[KVEvent]:
        rng = self.rng
        r = rng.random()
        if r < 0.0003:
            self.resident.clear()
            self.info.clear()
            return [AllMediaCleared()]  # a clean slate of every medium
        if r < 0.55 or not self.resident:
            return [self._store_new()]
        if r < 0.7:
            e = self._store_again()
            if e is not None:
                return [e]
        return [self._remove()]

    def _store_new(self) -> BlockStored:
        rng = self.rng
        parent = rng.choice(list(self.resident)) if self.resident and rng.random() < 0.8 \
            else None
        n = rng.randint(1, 8)
        hashes = [rng.getrandbits(64) for _ in range(n)]
        tokens = [rng.getrandbits(31) for _ in range(n * BLOCK_SIZE)]
        medium = rng.choice(MEDIA)
        p = parent
        for i, h in enumerate(hashes):
            self.info[h] = (p, tokens[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE])
            self.resident.setdefault(h, set()).add(medium)
            p = h
        return BlockStored(hashes, parent, tokens, BLOCK_SIZE, medium)

    def _store_again(self) -> BlockStored | None:
        h = self.rng.choice(list(self.resident))
        parent, tokens = self.info[h]
        if parent is not None and parent not in self.resident:
            return None
        medium = self.rng.choice(MEDIA)
        self.resident[h].add(medium)
        return BlockStored([h], parent, tokens, BLOCK_SIZE, medium)

    def _remove(self) -> BlockRemoved:
        rng = self.rng
        over = len(self.resident) > self.max_blocks
        k = rng.randint(4, 16) if over else rng.randint(1, 3)
        medium = rng.choice(MEDIA)
        hashes = []
        for h in rng.sample(list(self.resident), min(k * (4 if over else 1),
                                                     len(self.resident))):
            media = self.resident[h]
            if medium in media:
                hashes.append(h)
                media.discard(medium)
                if not media:
                    del self.resident[h]
        return BlockRemoved(hashes, medium)

    def blocks(self) -> dict[str, list[str]]:
        return {str(h): sorted(m.value for m in media) for h, media in self.resident.items()}


def _watchdog(deadline_s: float) -> None:
    def fire() -> None:
        time.sleep(deadline_s)
        print(f"nats_procs: deadline of {deadline_s} s passed", file=sys.stderr, flush=True)
        import os
        os._exit(3)
    threading.Thread(target=fire, daemon=True).start()


def publisher(args: dict[str, Any]) -> None:
    from kvbm.events.nats import NatsEventPublisher

    cfg = NatsConfig(**args["config"])
    work = Workload(args["seed"])
    pub = NatsEventPublisher(cfg, args["worker"])
    pace = args.get("pace_every", 0)
    for i in range(args["steps"]):
        pub.publish(work.step())
        if pace and i % pace == 0:
            time.sleep(0.001)  # spread the workload over the kills of the tests
    ok = pub.flush(args.get("flush_s", 60.0))
    stats = pub.stats()
    pub.close()
    Path(args["out"]).write_text(json.dumps({"flushed": ok, "blocks": work.blocks(),
                                             "stats": dataclasses.asdict(stats)}))


def router(args: dict[str, Any]) -> None:
    """``kvbm router``'s service (HTTP on a free port) consuming from JetStream."""
    from kvbm.router.config import RouterConfig, ServiceConfig
    from kvbm.router.service import RouterService

    nats = NatsConfig(**args["config"], durable=args.get("durable"))
    cfg = RouterConfig(block_size=BLOCK_SIZE, service=ServiceConfig(port=0), nats=nats)
    service = RouterService(cfg)
    service.start()
    consumer = service.jetstream
    assert consumer is not None
    stop = Path(args["stop"])
    while not stop.exists():
        time.sleep(0.05)
    caught = consumer.wait_caught_up(60)
    stats = consumer.stats()
    idx = service.indexer
    service.close()
    out = {w: {str(h): sorted(m.value for m in media)
               for h, media in idx.worker_blocks(w).items()} for w in idx.workers()}
    Path(args["out"]).write_text(json.dumps({"caught_up": caught, "workers": out,
                                             "stats": dataclasses.asdict(stats)}))


if __name__ == "__main__":
    role, raw = sys.argv[1], json.loads(sys.argv[2])
    _watchdog(raw.get("deadline_s", 120.0))
    {"publisher": publisher, "router": router}[role](raw)

"""A worker's event publisher in a process of its own, for the router's end-to-end tests.

``python router_pub_proc.py PORT REPLAY_PORT SEED STEPS OUT [--max-queue N] [--burst N]``
publishes the events of ``STEPS`` random changes to a :class:`router_pubs.WorkerModel`
through kvbm's ZmqEventPublisher (its snapshot is the model, for resyncs), then writes
``OUT`` (JSON: the final blocks and the publisher's stats) and serves replays until
killed. ``--burst`` publishes that many changes between short pauses (with a small
``--max-queue`` the queue overflows: a resync follows).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import threading
import time

from router_pubs import WorkerModel

from kvbm.config import EventsConfig
from kvbm.events.publisher import ZmqEventPublisher


def main() -> None:
    ap = argparse.ArgumentParser()
    for name in ("port", "replay_port", "seed", "steps"):
        ap.add_argument(name, type=int)
    ap.add_argument("out")
    ap.add_argument("--max-queue", type=int, default=100_000)
    ap.add_argument("--burst", type=int, default=0)
    args = ap.parse_args()
    model = WorkerModel(args.seed)
    lock = threading.Lock()

    def snapshot() -> list:  # type: ignore[type-arg]
        with lock:
            return model.snapshot()

    cfg = EventsConfig(enabled=True, endpoint=f"tcp://127.0.0.1:{args.port}", bind=True,
                       replay_endpoint=f"tcp://127.0.0.1:{args.replay_port}",
                       buffer_steps=1_000_000, max_queue_size=args.max_queue,
                       batch_interval_s=0.005)
    pub = ZmqEventPublisher(cfg, snapshot=snapshot)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    for i in range(args.steps):
        with lock:  # the change and its events, atomic with respect to a snapshot
            events = model.step()
            if events:
                pub.publish(events)
        if args.burst and i % args.burst == args.burst - 1:
            time.sleep(0.002)
    pub.flush(60)
    with lock:
        state = {str(h): sorted(m.value for m in media) for h, media in model.blocks().items()}
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"blocks": state, "stats": dataclasses.asdict(pub.stats)}, f)
    os.replace(tmp, args.out)
    stop.wait()
    pub.close()


if __name__ == "__main__":
    main()

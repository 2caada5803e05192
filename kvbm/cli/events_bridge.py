"""``kvbm events bridge ZMQ_ENDPOINT NATS_URL``: a ZMQ publisher (vLLM) into JetStream.

Runs :class:`~kvbm.events.bridge.EventBridge` until interrupted (Ctrl-C, SIGTERM) or for
``--timeout`` seconds, then publishes what is queued and prints its counters on stderr.
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
import threading
from types import FrameType
from typing import Any

from kvbm.config import check_endpoint
from kvbm.errors import InvalidArgumentError


def _run(args: argparse.Namespace) -> int:
    from kvbm.events.bridge import EventBridge
    from kvbm.events.jetstream import NatsConfig

    check_endpoint("ZMQ_ENDPOINT", args.endpoint)
    if args.replay is not None:
        check_endpoint("--replay", args.replay)
    if args.timeout is not None and not (math.isfinite(args.timeout) and args.timeout > 0):
        raise InvalidArgumentError(f"--timeout must be a number of seconds > 0, "
                                   f"got {args.timeout}")
    cfg = NatsConfig(url=args.nats_url, stream=args.stream, subject_prefix=args.subject_prefix)
    bridge = EventBridge(args.endpoint, cfg, worker=args.worker, replay_endpoint=args.replay,
                         topic=args.topic)
    print(f"kvbm events bridge: {args.endpoint} -> {cfg.url} stream {cfg.stream} subject "
          f"{cfg.subject(bridge.worker)}", file=sys.stderr, flush=True)

    def stop(signum: int, frame: FrameType | None) -> None:
        bridge.stop()

    previous = signal.signal(signal.SIGTERM, stop) if (
        threading.current_thread() is threading.main_thread()) else None
    timer = threading.Timer(args.timeout, bridge.stop) if args.timeout else None
    rc = 0
    try:
        if timer is not None:
            timer.daemon = True
            timer.start()
        bridge.run()
    except KeyboardInterrupt:
        rc = 130  # as a shell reports an interrupted command
    finally:
        if timer is not None:
            timer.cancel()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        bridge.close()
        st, pub = bridge.stats(), bridge.publisher.stats()
        print(f"kvbm events bridge: {st.batches} batches ({st.events} events) forwarded, "
              f"{st.replayed} replayed, {st.gaps} gaps, {st.restarts} restarts, "
              f"{st.unhealed} unhealed, {st.bad_msgs} bad; published {pub.published_msgs} "
              f"messages, {pub.queued_events} events left unpublished", file=sys.stderr)
    return rc


def register_bridge(cmds: Any) -> None:
    """The ``bridge`` subcommand of ``kvbm events``."""
    b = cmds.add_parser(
        "bridge", help="forward a ZMQ publisher's events (vLLM) into NATS JetStream",
        description="Subscribe to ZMQ_ENDPOINT and publish every batch on the JetStream "
                    "subject <subject-prefix>.<worker> of NATS_URL, filling sequence gaps "
                    "from --replay (give it: without it, a restarted bridge cannot tell "
                    "routers what the worker held before). See docs/events-nats.md.")
    b.add_argument("endpoint", metavar="ZMQ_ENDPOINT",
                   help="the worker's PUB endpoint, e.g. tcp://127.0.0.1:5557")
    b.add_argument("nats_url", metavar="NATS_URL", help="e.g. nats://127.0.0.1:4222")
    b.add_argument("--replay", metavar="ENDPOINT", help="the worker's replay endpoint")
    b.add_argument("--worker", metavar="NAME",
                   help="the worker's name in the stream (default: made of ZMQ_ENDPOINT)")
    b.add_argument("--topic", default="", help="ZMQ topic prefix to subscribe to (default: all)")
    b.add_argument("--stream", default="KVBM_EVENTS",
                   help="JetStream stream (default: %(default)s)")
    b.add_argument("--subject-prefix", default="kvbm.events",
                   help="subject prefix (default: %(default)s)")
    b.add_argument("--timeout", type=float, metavar="S", help="stop after S seconds")
    b.set_defaults(fn=_run)

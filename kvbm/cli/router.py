"""``kvbm router``: subscribe to workers' cache events and serve routing decisions over HTTP.

Workers come from ``--worker NAME=PUB[,REPLAY]`` (repeatable) and/or the ``[router.workers]``
table of ``--config FILE``; ``KVBM_ROUTER_*`` variables override the file, flags override
both. The service runs until SIGINT or SIGTERM; it prints its URL on stdout first.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
import threading
from typing import Any

from kvbm.errors import ConfigError


def _pairs(values: list[str] | None, flag: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for v in values or []:
        name, sep, rest = v.partition("=")
        if not sep or not name or not rest:
            raise ConfigError(f"{flag} takes NAME=VALUE, got {v!r}")
        out[name] = rest
    return out


def _config(args: argparse.Namespace) -> Any:
    from kvbm.router.config import RouterConfig, WorkerEndpoints

    cfg = (RouterConfig.from_toml(args.config) if args.config is not None
           else RouterConfig.from_env())
    workers = list(cfg.workers)
    for spec in args.worker or []:
        workers.append(WorkerEndpoints.parse(spec))
    groups = _pairs(args.object_group, "--object-group")
    known = {w.name for w in workers}
    for name in groups:
        if name not in known:
            raise ConfigError(f"--object-group names an unknown worker {name!r}")
    workers = [dataclasses.replace(w, object_group=groups.get(w.name, w.object_group))
               for w in workers]
    service = dataclasses.replace(
        cfg.service, **{k: v for k, v in (("host", args.host), ("port", args.port))
                        if v is not None})
    changes: dict[str, Any] = {"workers": tuple(workers), "service": service}
    if args.block_size is not None:
        changes["block_size"] = args.block_size
    if args.salt is not None:
        changes["salt"] = args.salt
    if args.clear_scope is not None:
        from kvbm.router.config import ClearScope

        changes["clear_scope"] = ClearScope(args.clear_scope)
    if args.nats is not None or args.durable is not None or args.no_durable:
        from kvbm.events.jetstream import NatsConfig

        if args.nats is None and cfg.nats is None:
            raise ConfigError("--durable / --no-durable need --nats URL (or [router.nats])")
        if args.durable is not None and args.no_durable:
            raise ConfigError("give --durable NAME or --no-durable, not both")
        nats = cfg.nats or NatsConfig(url=args.nats)
        if args.nats is not None:
            nats = dataclasses.replace(nats, url=args.nats)
        if args.no_durable or args.durable is not None:
            nats = dataclasses.replace(nats, durable=args.durable)
        changes["nats"] = nats
    return dataclasses.replace(cfg, **changes)


def _run(args: argparse.Namespace) -> int:
    from kvbm.router.service import RouterService

    logging.basicConfig(level=getattr(logging, args.log_level),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = _config(args)
    if not cfg.workers and cfg.nats is None:
        print("kvbm router: no worker (give --worker NAME=PUB[,REPLAY] or a [router.workers] "
              "table, or --nats URL); serving anyway", file=sys.stderr)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with RouterService(cfg) as service:
        nats = "" if cfg.nats is None else (
            f", JetStream {cfg.nats.url} stream {cfg.nats.stream} durable {cfg.nats.durable}")
        print(f"kvbm router listening on {service.url} ({len(cfg.workers)} worker(s){nats})",
              flush=True)
        while not stop.wait(0.5):
            pass
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("router", help="KV-aware router: subscribe to workers' cache events, "
                                      "serve /select over HTTP",
                       description="Subscribe to workers' cache events (ZMQ, vLLM's wire), "
                                   "keep which worker holds which prefix in which tier, and "
                                   "answer POST /select, GET /dump, /healthz, /metrics.")
    p.add_argument("--worker", action="append", metavar="NAME=PUB[,REPLAY]",
                   help="a worker's PUB endpoint and optional replay endpoint (repeatable)")
    p.add_argument("--object-group", action="append", metavar="NAME=GROUP",
                   help="the worker shares a bucket with the other workers of GROUP: their "
                        "OBJECT pages count for it too (repeatable)")
    p.add_argument("--config", metavar="FILE", help="a TOML file with a [router] table")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port to listen on (default 8390; 0: any free)")
    p.add_argument("--block-size", type=int, help="tokens per block (default: the events')")
    p.add_argument("--salt", help="kvbm's namespace salt of the workers (their `salt`)")
    p.add_argument("--clear-scope", choices=["gpu", "all"],
                   help="what a worker's AllBlocksCleared clears: its GPU blocks (default; "
                        "vLLM's prefix-cache reset) or every medium (docs/router.md)")
    p.add_argument("--nats", metavar="URL",
                   help="also consume the workers' events from NATS JetStream at URL "
                        "(docs/events-nats.md)")
    p.add_argument("--durable", metavar="NAME",
                   help="the JetStream durable consumer name: a restart with the same name "
                        "resumes from its checkpoint (default kvbm-router)")
    p.add_argument("--no-durable", action="store_true",
                   help="no durable consumer: read the whole stream at every start")
    p.add_argument("--log-level", default="WARNING",
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.set_defaults(fn=_run)

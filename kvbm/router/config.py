"""The router's configuration: the ``[router]`` table of a TOML file, ``KVBM_ROUTER_*``.

Sections nest as in :mod:`kvbm.config`: ``[router.cost] disk_weight = 0.3`` is
``KVBM_ROUTER_COST_DISK_WEIGHT=0.3``. Workers are a table of name to endpoints::

    [router.workers]
    w0 = "tcp://10.0.0.5:5557,tcp://10.0.0.5:5558"       # PUB[,REPLAY]
    w1 = { endpoint = "tcp://10.0.0.6:5557", replay = "tcp://10.0.0.6:5558",
           object_group = "bucket-a" }

or ``KVBM_ROUTER_WORKERS="w0=tcp://...,tcp://...;w1=tcp://..."``.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvbm.config import _build, _merge, env_overrides
from kvbm.errors import ConfigError
from kvbm.events.jetstream import NatsConfig
from kvbm.medium import Medium

ENV_PREFIX = "KVBM_ROUTER_"


class TieBreak(enum.Enum):
    """How :class:`~kvbm.router.KvRouter` picks among workers of equal cost."""

    RANDOM = "random"  # a random one (seeded by ``cost.seed``): spreads cold requests
    NAME = "name"  # the first name in sort order: reproducible


class ClearScope(enum.Enum):
    """What a worker's ``AllBlocksCleared`` event clears in the router's index."""

    #: its GPU medium only: vLLM sends it from its GPU block pool's ``reset_prefix_cache``,
    #: while the lower tiers (kvbm's connector) keep their blocks and announce their own
    #: removals; kvbm's publisher removes lower-tier blocks explicitly too
    GPU = "gpu"
    #: every medium (publishers whose reset means everything, Dynamo-style)
    ALL = "all"


def _number(where: str, value: object, *, low: float = 0.0, high: float = math.inf,
            low_open: bool = False) -> None:
    ok = (not isinstance(value, bool) and isinstance(value, int | float)
          and math.isfinite(value) and (value > low if low_open else value >= low)
          and value <= high)
    if not ok:
        bound = f"> {low}" if low_open else f">= {low}"
        raise ConfigError(f"{where} must be a finite number {bound}"
                          f"{'' if high == math.inf else f' and <= {high}'}, got {value!r}")


def _int(where: str, value: object, low: int, high: int = 2**63 - 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{where} must be an int in [{low}, {high}], got {value!r}")


@dataclass(frozen=True)
class CostConfig:
    """The cost of sending a prompt to a worker, in blocks (Dynamo's, tier-aware):
    ``prefill_weight * prefill_blocks + decode_blocks + request_weight * active_requests``,
    where ``prefill_blocks`` counts each block to compute as 1 and each block already held
    as its medium's weight (the cost of loading it, as a fraction of computing it)."""

    #: Weight of prefill against decode load (Dynamo's ``overlap_score_weight``).
    prefill_weight: float = 1.0
    gpu_weight: float = 0.0
    cpu_pinned_weight: float = 0.1
    disk_weight: float = 0.3
    object_weight: float = 0.5
    #: Block-equivalents added per request already running on the worker.
    request_weight: float = 0.0
    #: 0: the cheapest worker; > 0: a softmax draw over normalized costs (more spread).
    temperature: float = 0.0
    tie_break: TieBreak = TieBreak.RANDOM
    #: Seed of the draws (ties, temperature); unset: a fresh seed per router.
    seed: int | None = None
    #: Bounded shares (epsilon): a worker that got ``1 + share_bound`` times its share of
    #: the router's recent picks is not a candidate (:mod:`kvbm.router.cost`); ``None``
    #: (the default): the cost alone picks, so a prompt goes where its prefix is, however
    #: often it comes (0.02 caps a hot prefix's pile-up at ~2 % above an even share).
    share_bound: float | None = None
    #: Recent picks the share counts, per candidate worker.
    share_window: int = 4096

    def __post_init__(self) -> None:
        _number("cost.prefill_weight", self.prefill_weight)
        for m in Medium:
            _number(f"cost.{m.value.lower()}_weight", self.weight(m), high=1.0)
        _number("cost.request_weight", self.request_weight)
        _number("cost.temperature", self.temperature, high=1e6)
        if self.share_bound is not None:
            _number("cost.share_bound", self.share_bound, high=1e6)
        _int("cost.share_window", self.share_window, 1, 1 << 20)
        if not isinstance(self.tie_break, TieBreak):
            raise ConfigError(f"cost.tie_break must be one of "
                              f"{[t.value for t in TieBreak]}, got {self.tie_break!r}")
        if self.seed is not None:
            _int("cost.seed", self.seed, 0)

    def weight(self, medium: Medium) -> float:
        """The cost of a block held in ``medium``, as a fraction of computing it."""
        value: float = getattr(self, f"{medium.value.lower()}_weight")
        return value


@dataclass(frozen=True)
class SubscriberConfig:
    """How the subscriber listens to the workers' publishers."""

    #: A replay that sends nothing for this long is given up (the worker is resynced).
    replay_timeout_s: float = 5.0
    #: Live batches held per worker while a replay runs; beyond it they are dropped and
    #: replayed too (a live message is never applied out of order).
    max_held_batches: int = 100_000
    #: ZMQ receive high-water mark of each SUB socket (0: unlimited). Messages dropped
    #: at a finite mark show up as gaps, which replay heals.
    rcvhwm: int = 0

    def __post_init__(self) -> None:
        _number("subscriber.replay_timeout_s", self.replay_timeout_s, low_open=True,
                high=3600)
        _int("subscriber.max_held_batches", self.max_held_batches, 1)
        _int("subscriber.rcvhwm", self.rcvhwm, 0, 2**31 - 1)


@dataclass(frozen=True)
class ServiceConfig:
    """The HTTP service of ``kvbm router``."""

    host: str = "127.0.0.1"
    port: int = 8390
    #: Largest request body accepted, in bytes (a larger one is refused with 413).
    max_body_bytes: int = 16 << 20

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host:
            raise ConfigError(f"service.host must be a host name or address, got "
                              f"{self.host!r}")
        _int("service.port", self.port, 0, 65535)
        _int("service.max_body_bytes", self.max_body_bytes, 1024)


@dataclass(frozen=True)
class WorkerEndpoints:
    """One worker's publisher: its PUB endpoint, optional replay (ROUTER) endpoint, and
    the object group (shared bucket) it belongs to."""

    name: str
    endpoint: str
    replay: str | None = None
    object_group: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or "=" in self.name:
            raise ConfigError(f"a worker name is a non-empty string without '=', "
                              f"got {self.name!r}")
        check_endpoint(f"worker {self.name!r} endpoint", self.endpoint)
        if self.replay is not None:
            check_endpoint(f"worker {self.name!r} replay endpoint", self.replay)
        if self.object_group is not None and (not isinstance(self.object_group, str)
                                              or not self.object_group):
            raise ConfigError(f"worker {self.name!r}: object_group must be a non-empty "
                              f"string, got {self.object_group!r}")

    @classmethod
    def parse(cls, spec: str) -> WorkerEndpoints:
        """``NAME=PUB[,REPLAY]`` (the ``--worker`` flag's form)."""
        if not isinstance(spec, str) or "=" not in spec:
            raise ConfigError(f"a worker is NAME=PUB_ENDPOINT[,REPLAY_ENDPOINT], got {spec!r}")
        name, _, rest = spec.partition("=")
        parts = [p.strip() for p in rest.split(",")]
        if len(parts) > 2:
            raise ConfigError(f"a worker is NAME=PUB_ENDPOINT[,REPLAY_ENDPOINT], got {spec!r}")
        return cls(name.strip(), parts[0], parts[1] if len(parts) == 2 else None)


def check_endpoint(where: str, value: object) -> None:
    """A ZMQ endpoint to connect to: ``tcp://HOST:PORT``, ``ipc://PATH``, ``inproc://NAME``."""
    if not isinstance(value, str) or not value.startswith(("tcp://", "ipc://", "inproc://")):
        raise ConfigError(f"{where} must be a ZMQ endpoint (tcp://HOST:PORT, ipc://PATH or "
                          f"inproc://NAME), got {value!r}")
    scheme, _, rest = value.partition("://")
    if scheme == "tcp":
        host, _, port = rest.rpartition(":")
        if not host or "*" in host or not (port.isdigit() and 0 < int(port) < 65536):
            raise ConfigError(f"{where}: {value!r} needs tcp://HOST:PORT (a host to "
                              f"connect to, PORT in [1, 65535])")
    elif not rest:
        raise ConfigError(f"{where}: {value!r} names no path")


@dataclass(frozen=True)
class RouterConfig:
    """Everything ``kvbm router`` needs."""

    #: Tokens per block of the workers' events; unset: the first event's.
    block_size: int | None = None
    #: kvbm's namespace salt (the workers' ``salt``), for kvbm-hashed queries to match.
    salt: str | None = None
    cost: CostConfig = CostConfig()
    subscriber: SubscriberConfig = SubscriberConfig()
    service: ServiceConfig = ServiceConfig()
    workers: tuple[WorkerEndpoints, ...] = ()
    #: Also consume the workers' events from NATS JetStream (``[router.nats]``,
    #: ``KVBM_ROUTER_NATS_*``; docs/events-nats.md). Unset: ZMQ only.
    nats: NatsConfig | None = None
    #: What a worker's ``AllBlocksCleared`` clears: ``gpu`` (vLLM's prefix-cache reset) or
    #: ``all`` (docs/router.md). Resets the router makes itself always clear everything.
    clear_scope: ClearScope = ClearScope.GPU

    def __post_init__(self) -> None:
        if not isinstance(self.clear_scope, ClearScope):
            raise ConfigError(f"router.clear_scope must be one of "
                              f"{[s.value for s in ClearScope]}, got {self.clear_scope!r}")
        if self.block_size is not None:
            _int("router.block_size", self.block_size, 1, 1 << 20)
        if self.nats is not None and not isinstance(self.nats, NatsConfig):
            raise ConfigError(f"router.nats must be a NatsConfig, got {self.nats!r}")
        if self.salt is not None and not isinstance(self.salt, str):
            raise ConfigError(f"router.salt must be a string, got {self.salt!r}")
        for name, cls in (("cost", CostConfig), ("subscriber", SubscriberConfig),
                          ("service", ServiceConfig)):
            if not isinstance(getattr(self, name), cls):
                raise ConfigError(f"router.{name} must be a {cls.__name__}")
        if not isinstance(self.workers, tuple) or not all(
                isinstance(w, WorkerEndpoints) for w in self.workers):
            raise ConfigError("router.workers must be a tuple of WorkerEndpoints")
        names = [w.name for w in self.workers]
        if len(set(names)) != len(names):
            raise ConfigError(f"router.workers names a worker twice: {sorted(names)}")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> RouterConfig:
        """Build from the plain data of a ``[router]`` table."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"router must be a table, got {data!r}")
        data = dict(data)
        workers = _workers(data.pop("workers", None))
        return dataclasses.replace(_build(cls, data, "router"), workers=workers)

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str], *, env: Mapping[str, str] | None = None
                  ) -> RouterConfig:
        """The ``[router]`` table of a TOML file; ``KVBM_ROUTER_*`` in ``env`` (default:
        os.environ) override it."""
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover - Python 3.10
            import tomli as tomllib
        if not isinstance(path, str | os.PathLike):
            raise ConfigError(f"a config path is a str or a path, got {path!r}")
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError, TypeError) as e:
            raise ConfigError(f"cannot read config {path!r}: {e}") from None
        table = data.get("router", {})
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: [router] must be a table")
        return cls.from_mapping(_merge(table, _env(env)))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> RouterConfig:
        """Build from ``KVBM_ROUTER_*`` variables alone."""
        return cls.from_mapping(_env(env))


@dataclass(frozen=True)
class _File:
    router: RouterConfig = RouterConfig()


def _env(env: Mapping[str, str] | None) -> dict[str, Any]:
    env = os.environ if env is None else env
    if not isinstance(env, Mapping):
        raise ConfigError(f"the environment must be a mapping, got {type(env).__name__}")
    mine = {k: v for k, v in env.items() if isinstance(k, str) and k.startswith(ENV_PREFIX)}
    out: dict[str, Any] = env_overrides(_File, mine).get("router", {})
    return out


def _workers(raw: object) -> tuple[WorkerEndpoints, ...]:
    if raw is None:
        return ()
    if isinstance(raw, str):  # KVBM_ROUTER_WORKERS="a=tcp://...,tcp://...;b=tcp://..."
        return tuple(WorkerEndpoints.parse(s.strip()) for s in raw.split(";") if s.strip())
    if not isinstance(raw, Mapping):
        raise ConfigError(f"router.workers must be a table of name = endpoints, got {raw!r}")
    out = []
    for name, spec in raw.items():
        if isinstance(spec, str):
            out.append(WorkerEndpoints.parse(f"{name}={spec}"))
        elif isinstance(spec, Mapping):
            unknown = set(spec) - {"endpoint", "replay", "object_group"}
            if unknown or "endpoint" not in spec:
                raise ConfigError(f"router.workers.{name}: keys are endpoint (required), "
                                  f"replay, object_group; got {sorted(spec)}")
            out.append(WorkerEndpoints(name, spec["endpoint"], spec.get("replay"),
                                       spec.get("object_group")))
        else:
            raise ConfigError(f"router.workers.{name} must be \"PUB[,REPLAY]\" or a table, "
                              f"got {spec!r}")
    return tuple(out)

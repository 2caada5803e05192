"""Configuration: frozen dataclasses, loadable from a TOML file and from ``KVBM_*`` variables.

A section is a nested dataclass (``device``, ``host`` ...). In TOML it is a table
(``[host] num_blocks = 4096``); in the environment it is ``KVBM_<SECTION>_<FIELD>``
(``KVBM_HOST_NUM_BLOCKS=4096``), top-level fields are ``KVBM_<FIELD>``, and a section's own
sections nest the same way (``KVBM_S3_RETRY_MAX_ATTEMPTS``). Environment values override the
file. See docs/configuration.md.

Loading validates everything that can be checked without side effects: types, ranges,
policy names, CUDA-only settings on a machine without CUDA, misspelt keys and ``KVBM_*``
variables. Whether the pools fit in memory depends on the layout too, so that is checked
when a :class:`kvbm.BlockManager` allocates them (:mod:`kvbm.pool`). Nothing here imports
torch unless a setting needs CUDA (``pin_memory = true``, ``device = "cuda"``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import enum
import math
import os
import sys
import types
import typing
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from kvbm.errors import ConfigError
from kvbm.events.jetstream import NatsConfig
from kvbm.storage.disk.config import DiskTierConfig
from kvbm.storage.gcs import GCSTierConfig
from kvbm.storage.s3 import S3TierConfig
from kvbm.transports.config import TransportConfig

#: Default eviction policy of every tier, chosen from bench/policy_replay.py (docs/policies.md).
DEFAULT_EVICTION = "predictive"
#: Default admission filter of the host tier (``None`` admits everything).
DEFAULT_HOST_ADMISSION: str | None = None

ENV_PREFIX = "KVBM_"
#: ``KVBM_*`` variables that are not configuration (``env_overrides`` lets them pass):
#: ``KVBM_XXH3_SCALAR`` makes the native hashing use its portable loop (tests cover both).
NON_CONFIG_VARIABLES = frozenset({"KVBM_XXH3_SCALAR"})
#: Prefixes of ``KVBM_*`` variables that another configuration reads (``KVBM_ROUTER_*``:
#: :mod:`kvbm.router.config`): a class without such fields leaves them alone, so one
#: environment can serve a whole deployment.
OTHER_CONFIG_PREFIXES = ("KVBM_ROUTER_",)


def _closest(word: str, choices: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the nearest of ``choices``, or ``""``."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def check_policy_name(where: str, name: object, kind: str) -> None:
    """Raise :class:`ConfigError` unless ``name`` is an eviction (``kind="eviction"``) or
    admission policy that :mod:`kvbm.policies` can make (``None``/``"none"`` admit all)."""
    # Imported here: the registry pulls in every policy module, which config users that
    # never build a manager (the CLI, routers) need not pay for. It never imports torch.
    from kvbm.policies import ADMISSION_POLICIES, EVICTION_POLICIES

    choices = sorted(EVICTION_POLICIES if kind == "eviction" else ADMISSION_POLICIES)
    if kind == "admission":
        if name is None:
            return
        choices.append("none")
    key = name.strip().lower() if isinstance(name, str) else None
    if key in choices or (kind == "admission" and key == ""):
        return
    raise ConfigError(f"{where} = {name!r} is not an {kind} policy"
                      f"{_closest(key or '', choices)} valid names: {', '.join(choices)}")


def _cuda_devices() -> int | None:
    """CUDA devices torch sees; ``None`` without torch. Imports torch: call only when a
    setting needs CUDA."""
    try:
        import torch
    except ImportError:
        return None
    return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0


def _check_positive(owner: str, name: str, value: int, *, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{owner}.{name} must be an int, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{owner}.{name} must be {'>= 0' if allow_zero else '> 0'}, "
                          f"got {value}")


class CopyEngine(enum.Enum):
    """Who copies pages between G1 and G2 when kvbm owns G1 (standalone mode).

    The control thread never waits for a device: with ``STREAM`` the copies run on a CUDA
    side stream and complete through events polled by the manager, and the engine's stream
    is ordered after a copy only where it reads or rewrites the pages (onboarded blocks, a
    page freed by write-back).
    """

    AUTO = "auto"  # STREAM when G1 is on a GPU, INLINE for a CPU G1
    #: on the calling thread, within the call: a CPU G1 is host memory, the copy a memcpy
    INLINE = "inline"
    #: on a copy thread: offloads of committed blocks overlap the engine's own work (CPU
    #: G1); a copy the engine must see (onboard, write-back) is waited for
    THREAD = "thread"
    STREAM = "stream"  # a CUDA side stream with events (needs a CUDA G1)


@dataclass(frozen=True)
class DeviceTierConfig:
    """G1: the pool the engine computes into."""

    num_blocks: int
    #: ``"auto"`` (cuda when available, else cpu), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    device: str = "auto"
    eviction: str = DEFAULT_EVICTION
    #: Who copies pages between G1 and G2 (see :class:`CopyEngine`).
    copies: CopyEngine = CopyEngine.AUTO

    def __post_init__(self) -> None:
        _check_positive("device", "num_blocks", self.num_blocks)
        dev = self.device
        if not isinstance(dev, str) or not (
                dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
            raise ConfigError(f"device.device must be auto, cpu, cuda or cuda:N, got {dev!r}")
        if isinstance(self.copies, str) and self.copies in {c.value for c in CopyEngine}:
            object.__setattr__(self, "copies", CopyEngine(self.copies))  # frozen: the one fixup
        if not isinstance(self.copies, CopyEngine):
            raise ConfigError(f"device.copies must be one of "
                              f"{[c.value for c in CopyEngine]}, got {self.copies!r}")
        if self.copies is CopyEngine.STREAM and dev == "cpu":
            raise ConfigError("device.copies = \"stream\" needs a CUDA device; a CPU G1 copies "
                              "\"inline\" or on a \"thread\"")
        check_policy_name("device.eviction", self.eviction, "eviction")
        if dev.startswith("cuda"):
            n = _cuda_devices()
            index = int(dev[5:]) if ":" in dev else 0
            if not n or index >= n:
                seen = ("torch is not installed" if n is None else
                        f"torch sees {n} CUDA device(s)" if n else "torch sees no CUDA device")
                raise ConfigError(f"device.device = {dev!r} needs CUDA device {index}, and "
                                  f"{seen}: set device = \"auto\" (cuda where present, else "
                                  f"cpu) or \"cpu\"")


@dataclass(frozen=True)
class HostTierConfig:
    """G2: host memory, pinned where CUDA is present."""

    num_blocks: int
    #: ``None``: pin when CUDA is available. ``True`` on a machine without CUDA is an error.
    pin_memory: bool | None = None
    eviction: str = DEFAULT_EVICTION
    #: ``None`` admits every offloaded block; ``"frequency"`` admits on the second sighting.
    admission: str | None = DEFAULT_HOST_ADMISSION
    #: Offload every committed block at commit time (Dynamo's behaviour). When false,
    #: blocks are offloaded only by an explicit ``BlockManager.offload`` call.
    eager_offload: bool = True

    def __post_init__(self) -> None:
        _check_positive("host", "num_blocks", self.num_blocks)
        for name in ("pin_memory", "eager_offload"):
            value = getattr(self, name)
            if not (isinstance(value, bool) or (value is None and name == "pin_memory")):
                raise ConfigError(f"host.{name} must be true or false, got {value!r}")
        check_policy_name("host.eviction", self.eviction, "eviction")
        check_policy_name("host.admission", self.admission, "admission")
        if isinstance(self.admission, str) and self.admission.strip().lower() in ("", "none"):
            # One spelling of "admit everything", so that users of the field need not
            # know the others (the manager passes options to any non-None policy).
            object.__setattr__(self, "admission", None)
        if self.pin_memory and not (n := _cuda_devices()):
            seen = "torch is not installed" if n is None else "torch sees no GPU"
            raise ConfigError(f"host.pin_memory = true needs CUDA, and {seen}: set "
                              f"pin_memory = false, or leave it unset to pin host memory "
                              f"only where CUDA is present")


@dataclass(frozen=True)
class OffloadConfig:
    """The background workers that move pages between G2 and the tiers below."""

    #: Pages in flight to one tier at most; an offload beyond it is skipped and counted
    #: (the engine is never blocked on a slow tier).
    max_inflight_pages: int = 4096
    #: Queued transfers of one tier are coalesced into calls of up to this many bytes.
    batch_bytes: int = 128 << 20
    #: On close (and at exit): write committed blocks down to the tiers below host memory
    #: first, as ``BlockManager.flush()`` does (True), or drop queued offloads (False).
    flush_on_close: bool = True
    #: Longest wait of a synchronous onboard on a lower tier, in seconds.
    load_timeout_s: float = 60.0
    #: Longest wait of ``close()`` for its flush and for the offload workers to stop, in
    #: seconds (a slow tier is then left behind with a warning, never waited on forever).
    close_timeout_s: float = 60.0
    #: At interpreter exit, a manager that was not closed is flushed and closed, waiting at
    #: most this long, in seconds; 0 turns that off (see BlockManager, "Durability").
    exit_flush_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        _check_positive("offload", "max_inflight_pages", self.max_inflight_pages)
        _check_positive("offload", "batch_bytes", self.batch_bytes)
        if not isinstance(self.flush_on_close, bool):
            raise ConfigError(f"offload.flush_on_close must be true or false, got "
                              f"{self.flush_on_close!r}")
        # Finite: each is handed to a wait that refuses infinity (as would an onboard)
        for name, zero_ok in (("load_timeout_s", False), ("close_timeout_s", False),
                              ("exit_flush_timeout_s", True)):
            value = getattr(self, name)
            # ``not 0 <= v < inf`` also rejects NaN (every comparison with it is false)
            if (isinstance(value, bool) or not isinstance(value, int | float)
                    or not 0 <= value < float("inf") or (value == 0 and not zero_ok)):
                raise ConfigError(f"offload.{name} must be a finite number of seconds "
                                  f"{'>= 0' if zero_ok else '> 0'}, got {value!r}")


_ENDPOINT_SCHEMES = ("tcp://", "ipc://", "inproc://")


def check_endpoint(where: str, value: object) -> None:
    """A ZMQ endpoint as vLLM takes it: ``tcp://HOST:PORT`` (PORT a number or ``*``),
    ``ipc://PATH`` or ``inproc://NAME``."""
    if not isinstance(value, str) or not value.startswith(_ENDPOINT_SCHEMES):
        raise ConfigError(f"{where} must be a ZMQ endpoint (tcp://HOST:PORT, ipc://PATH or "
                          f"inproc://NAME), got {value!r}")
    scheme, _, rest = value.partition("://")
    if scheme == "tcp":
        host, _, port = rest.rpartition(":")
        if not host or not (port == "*" or (port.isdigit() and int(port) < 65536)):
            raise ConfigError(f"{where}: {value!r} needs tcp://HOST:PORT with PORT in "
                              f"[0, 65535] or *")
    elif not rest:
        raise ConfigError(f"{where}: {value!r} names no path")


@dataclass(frozen=True)
class EventsConfig:
    """Cache events on ZMQ in vLLM 0.32's wire format (:mod:`kvbm.events.publisher`).

    As in vLLM, an endpoint with a wildcard (``tcp://*:5557``, ``tcp://127.0.0.1:*``),
    ``::``, ``ipc://`` or ``inproc://`` is bound; any other is connected to (a SUB or a
    proxy that binds), unless ``bind`` says otherwise. The replay endpoint is always bound."""

    enabled: bool = False
    #: Where the PUB socket binds or connects (vLLM's default).
    endpoint: str = "tcp://*:5557"
    #: ``None``: vLLM's rule above; ``True``: bind ``endpoint`` (``tcp://127.0.0.1:5557``
    #: then listens on loopback only); ``False``: connect to it.
    bind: bool | None = None
    #: ROUTER socket answering replay requests; unset: no replay.
    replay_endpoint: str | None = None
    topic: str = ""
    #: Batches kept for replay.
    buffer_steps: int = 10_000
    #: Messages queued for one subscriber at most before the publisher stalls (counted).
    hwm: int = 100_000
    #: Events waiting for the publisher thread at most; beyond it events are dropped,
    #: counted, and the whole state is announced again (a resync).
    max_queue_size: int = 100_000
    #: Events are collected for this long into one batch, in seconds.
    batch_interval_s: float = 0.01
    #: Events in one batch at most.
    max_batch_events: int = 1024
    #: Stamped on every batch; also offsets the tcp ports (vLLM's rule for DP ranks).
    data_parallel_rank: int = 0
    #: Publish to NATS JetStream too (``[events.nats]``, ``KVBM_EVENTS_NATS_*``; see
    #: docs/events-nats.md). Unset: ZMQ only.
    nats: NatsConfig | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ConfigError(f"events.enabled must be true or false, got {self.enabled!r}")
        check_endpoint("events.endpoint", self.endpoint)
        if self.bind is not None and not isinstance(self.bind, bool):
            raise ConfigError(f"events.bind must be true, false or unset, got {self.bind!r}")
        if self.replay_endpoint is not None:
            check_endpoint("events.replay_endpoint", self.replay_endpoint)
            if self.replay_endpoint == self.endpoint and not self.endpoint.endswith(
                    (":*", ":0")):  # a port the system picks differs for each socket
                raise ConfigError("events.replay_endpoint must differ from events.endpoint")
        if not isinstance(self.topic, str):
            raise ConfigError(f"events.topic must be a string, got {self.topic!r}")
        try:
            self.topic.encode()
        except UnicodeEncodeError:
            raise ConfigError(f"events.topic has no UTF-8 form: {self.topic!r}") from None
        for name in ("buffer_steps", "hwm", "max_queue_size", "max_batch_events"):
            _check_positive("events", name, getattr(self, name))
        _check_positive("events", "data_parallel_rank", self.data_parallel_rank,
                        allow_zero=True)
        if self.nats is not None and not isinstance(self.nats, NatsConfig):
            raise ConfigError(f"events.nats must be a NatsConfig, got {self.nats!r}")
        value = self.batch_interval_s
        if (isinstance(value, bool) or not isinstance(value, int | float)
                or not 0 < value <= 60):  # also refuses NaN
            raise ConfigError(f"events.batch_interval_s must be a number of seconds in "
                              f"(0, 60], got {value!r}")


@dataclass(frozen=True)
class ManagerConfig:
    """Everything a :class:`kvbm.BlockManager` needs besides the layout."""

    #: G1, kvbm's own device pool. ``None`` when the engine owns its KV memory and its
    #: prefix cache (vLLM through :mod:`kvbm.integrations.vllm`): kvbm then keeps G2 and
    #: the tiers below, and moves pages between G2 and the engine's memory through plans.
    device: DeviceTierConfig | None
    host: HostTierConfig | None = None
    #: G3: local disk (needs a host tier: pages move through G2).
    disk: DiskTierConfig | None = None
    #: G4: object storage, S3 or GCS (at most one; needs a host tier).
    s3: S3TierConfig | None = None
    gcs: GCSTierConfig | None = None
    offload: OffloadConfig = OffloadConfig()
    #: Cache events for routers (off by default).
    events: EventsConfig = EventsConfig()
    #: The transport agent of disaggregated serving (``[transport]``, ``KVBM_TRANSPORT_*``;
    #: see docs/transports.md). Used only where an agent is started.
    transport: TransportConfig = dataclasses.field(default_factory=TransportConfig)
    #: Namespace salt for block hashes (model id, tenant): caches with different salts
    #: never match each other.
    salt: str | None = None
    #: Keep at most this many undrained events; older ones are dropped and counted.
    max_pending_events: int = 1_000_000

    def __post_init__(self) -> None:
        _check_positive("config", "max_pending_events", self.max_pending_events)
        for name, cls in (("device", DeviceTierConfig), ("host", HostTierConfig),
                          ("disk", DiskTierConfig), ("s3", S3TierConfig),
                          ("gcs", GCSTierConfig), ("offload", OffloadConfig),
                          ("events", EventsConfig), ("transport", TransportConfig)):
            value = getattr(self, name)
            if not (isinstance(value, cls) or (value is None and name not in
                                               ("offload", "events", "transport"))):
                raise ConfigError(f"config.{name} must be a {cls.__name__}, got {value!r}")
        if self.salt is not None and not isinstance(self.salt, str):
            raise ConfigError(f"config.salt must be a string, got {self.salt!r}")
        if self.salt is not None and not self.salt.isascii():
            try:
                self.salt.encode()  # it seeds block hashes as UTF-8
            except UnicodeEncodeError:
                raise ConfigError(f"config.salt has no UTF-8 form (a lone surrogate): "
                                  f"{self.salt!r}") from None
        if self.disk is not None:
            # DiskTierConfig checks only that these are strings: the names are checked here,
            # where the policy registry is at hand.
            check_policy_name("disk.eviction", self.disk.eviction, "eviction")
            check_policy_name("disk.admission", self.disk.admission, "admission")
        if self.s3 is not None and self.gcs is not None:
            raise ConfigError("configure at most one object tier (s3 or gcs)")
        if self.device is None and self.host is None:
            raise ConfigError("a manager without its own device tier (device = none: the "
                              "engine owns G1) needs a host tier (config.host)")
        if self.host is None and (self.disk or self.s3 or self.gcs):
            raise ConfigError("disk and object tiers need a host tier (config.host): pages "
                              "move between them through host memory")

    @property
    def lower_tiers(self) -> list[DiskTierConfig | S3TierConfig | GCSTierConfig]:
        """The configured tiers below host memory, fastest first."""
        return [c for c in (self.disk, self.s3, self.gcs) if c is not None]

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> ManagerConfig:
        """Build from nested plain data (a parsed TOML file, :meth:`to_dict`'s output)."""
        return _build(cls, data, "config")

    def to_dict(self) -> dict[str, Any]:
        """Plain data (see :func:`config_to_dict`); ``from_mapping`` builds an equal config."""
        return config_to_dict(self)

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str], *, env: Mapping[str, str] | None = None
                  ) -> ManagerConfig:
        """Load a TOML file; ``KVBM_*`` variables in ``env`` (default: os.environ) override it."""
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover - Python 3.10
            import tomli as tomllib
        if not isinstance(path, str | os.PathLike):
            raise ConfigError(f"a config path is a str or a path, got {path!r}")
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        # ValueError: a NUL in the path, or UTF-8 that is not (UnicodeError is one);
        # TypeError: a PathLike that gives bytes
        except (OSError, ValueError, TypeError) as e:
            raise ConfigError(f"cannot read config {path!r}: {e}") from None
        env = os.environ if env is None else env
        with _naming_env_origin(cls, env):
            return cls.from_mapping(_merge(data, env_overrides(cls, env)))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ManagerConfig:
        """Build from ``KVBM_*`` variables alone."""
        env = os.environ if env is None else env
        with _naming_env_origin(cls, env):
            return cls.from_mapping(env_overrides(cls, env))


@contextlib.contextmanager
def _naming_env_origin(cls: type[Any], env: Mapping[str, str]) -> Iterator[None]:
    """A bad value that came from a ``KVBM_*`` variable is reported with the variable's
    name: the user would otherwise look for ``config.device.num_blocks`` in a TOML file."""
    try:
        yield
    except ConfigError as e:
        msg = str(e)
        if isinstance(env, Mapping):
            for var, (path, section, _) in env_variables(cls).items():
                where = "config." + ".".join(path)
                if (not section and var in env
                        and (msg.startswith(where + " ") or msg.startswith(where + ":"))):
                    raise ConfigError(f"{msg} (from environment variable {var}="
                                      f"{env[var]!r})") from None
        raise


T = TypeVar("T")


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A config dataclass as JSON-ready plain data: every init field (new ones included),
    nested dataclasses as dicts, enums as their values, paths as strings."""
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        raise ConfigError(f"not a config dataclass: {cfg!r}")
    return {f.name: _plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.init}


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return config_to_dict(value)
    if isinstance(value, enum.Enum):
        return _plain(value.value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_plain(v) for v in value]
    return value


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _build(cls: type[T], data: Mapping[str, Any], where: str) -> T:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} must be a table, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown key(s) in {where}: {unknown}"
                          f"{_closest(str(unknown[0]), names)} valid keys: {sorted(names)}")
    required = [f.name for f in dataclasses.fields(cls)  # type: ignore[arg-type]
                if f.init and f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING]
    missing = [n for n in required if n not in data]
    if missing:
        raise ConfigError(f"{where}: missing required key(s) {missing}"
                          + (f" (environment: {ENV_PREFIX}{missing[0].upper()}_...)"
                             if where == "config" else ""))
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        tp, optional = _unwrap_optional(hints[name])
        if optional and (value is None or (isinstance(value, str) and value.lower() == "none")):
            # TOML has no null: "none" unsets an optional field, as it does in the environment
            kwargs[name] = None
        elif dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, f"{where}.{name}")  # type: ignore[arg-type]
        else:
            kwargs[name] = _coerce(value, tp, f"{where}.{name}")
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None


def _coerce(value: Any, tp: Any, where: str) -> Any:
    if tp is Any or typing.get_origin(tp) is not None:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false",
                                                        "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""), 0)
            except ValueError:
                pass
    elif tp is float:
        number: float | None = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is not None and math.isnan(number):
            raise ConfigError(f"{where} must be a number, got NaN")
        if number is not None:
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    elif isinstance(tp, type) and issubclass(tp, enum.Enum):
        with contextlib.suppress(ValueError):
            return value if isinstance(value, tp) else tp(value)
        raise ConfigError(f"{where} must be one of {[m.value for m in tp]}, got {value!r}")
    else:
        return value
    raise ConfigError(f"{where} must be {tp.__name__}, got {value!r}")


_EnvNames = dict[str, tuple[tuple[str, ...], bool, bool]]
_env_names: dict[type[Any], _EnvNames] = {}


def env_variables(cls: type[Any]) -> _EnvNames:
    """Every ``KVBM_*`` name of ``cls``: variable -> (field path, names a section, optional).

    Sections nest: ``KVBM_S3_RETRY_MAX_ATTEMPTS`` is ``("s3", "retry", "max_attempts")``.
    """
    cached = _env_names.get(cls)
    if cached is not None:
        return cached
    out: _EnvNames = {}

    def walk(tp: type[Any], path: tuple[str, ...]) -> None:
        hints = typing.get_type_hints(tp)
        for f in dataclasses.fields(tp):
            if not f.init:
                continue
            sub, optional = _unwrap_optional(hints[f.name])
            here = (*path, f.name)
            section = dataclasses.is_dataclass(sub)
            out[ENV_PREFIX + "_".join(here).upper()] = (here, section, optional)
            if section:
                walk(sub, here)

    walk(cls, ())
    _env_names[cls] = out
    return out


def env_overrides(cls: type[Any], env: Mapping[str, str]) -> dict[str, Any]:
    """The ``KVBM_*`` variables of ``env`` as nested data for ``cls``.

    A variable that names no field is an error naming the closest one (a typo must not
    silently leave the default in place), except those in :data:`NON_CONFIG_VARIABLES`.
    ``none``/``null`` mean ``None``; an optional section set to ``none`` is dropped.
    """
    if not isinstance(env, Mapping):
        raise ConfigError(f"the environment must be a mapping of names to strings, got "
                          f"{type(env).__name__}")
    names = env_variables(cls)
    out: dict[str, Any] = {}
    for var in sorted(v for v in env if isinstance(v, str) and v.startswith(ENV_PREFIX)):
        spec = names.get(var)
        if spec is None:
            if var in NON_CONFIG_VARIABLES or any(
                    var.startswith(p) and not any(n.startswith(p) for n in names)
                    for p in OTHER_CONFIG_PREFIXES):
                continue
            fields = [n for n, (_, section, _) in names.items() if not section]
            raise ConfigError(f"environment variable {var} matches no config field"
                              f"{_closest(var, fields)} (kvbm reads every {ENV_PREFIX}* "
                              f"variable; see docs/configuration.md for the names)")
        path, section, optional = spec
        value: str | None = env[var]
        if not isinstance(value, str):  # os.environ holds strings; a mapping passed may not
            raise ConfigError(f"environment variable {var} must be a string, got {value!r}")
        if value.strip().lower() in ("none", "null"):
            value = None
        if section and not (value is None and optional):
            first = next(n for n, (p, s, _) in names.items()
                         if not s and p[:-1] == path)
            raise ConfigError(f"{var} names the [{'.'.join(path)}] section, not a value: "
                              f"set its fields ({first}, ...)"
                              + (f", or {var}=none to drop it" if optional else ""))
        node = out
        for i, key in enumerate(path[:-1]):
            child = node.setdefault(key, {})
            if child is None:
                raise ConfigError(f"{ENV_PREFIX}{'_'.join(path[:i + 1]).upper()}=none drops a "
                                  f"section that {var} sets a field of")
            node = child
        node[path[-1]] = value
    return out

"""Configuration: frozen dataclasses, loadable from a TOML file and from ``KVBM_*`` variables.

A section is a nested dataclass (``device``, ``host`` ...). In TOML it is a table
(``[host] num_blocks = 4096``); in the environment it is ``KVBM_<SECTION>_<FIELD>``
(``KVBM_HOST_NUM_BLOCKS=4096``), top-level fields are ``KVBM_<FIELD>``. Environment values
override the file. See docs/configuration.md.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from kvbm.errors import ConfigError
from kvbm.storage.disk.config import DiskTierConfig
from kvbm.storage.gcs import GCSTierConfig
from kvbm.storage.s3 import S3TierConfig

#: Default eviction policy of every tier, chosen from bench/policy_replay.py (docs/policies.md).
DEFAULT_EVICTION = "predictive"
#: Default admission filter of the host tier (``None`` admits everything).
DEFAULT_HOST_ADMISSION: str | None = None

ENV_PREFIX = "KVBM_"


def _check_positive(owner: str, name: str, value: int, *, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{owner}.{name} must be an int, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{owner}.{name} must be {'>= 0' if allow_zero else '> 0'}, "
                          f"got {value}")


@dataclass(frozen=True)
class DeviceTierConfig:
    """G1: the pool the engine computes into."""

    num_blocks: int
    #: ``"auto"`` (cuda when available, else cpu), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    device: str = "auto"
    eviction: str = DEFAULT_EVICTION

    def __post_init__(self) -> None:
        _check_positive("device", "num_blocks", self.num_blocks)
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"device.device must be auto, cpu, cuda or cuda:N, "
                              f"got {self.device!r}")


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


@dataclass(frozen=True)
class OffloadConfig:
    """The background workers that move pages between G2 and the tiers below."""

    #: Pages in flight to one tier at most; an offload beyond it is skipped and counted
    #: (the engine is never blocked on a slow tier).
    max_inflight_pages: int = 4096
    #: Queued transfers of one tier are coalesced into calls of up to this many bytes.
    batch_bytes: int = 128 << 20
    #: On close: finish queued offloads (True) or drop them (False).
    flush_on_close: bool = True
    #: Longest wait of a synchronous onboard on a lower tier, in seconds.
    load_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        _check_positive("offload", "max_inflight_pages", self.max_inflight_pages)
        _check_positive("offload", "batch_bytes", self.batch_bytes)
        if not self.load_timeout_s > 0:
            raise ConfigError(f"offload.load_timeout_s must be > 0, got {self.load_timeout_s}")


@dataclass(frozen=True)
class ManagerConfig:
    """Everything a :class:`kvbm.BlockManager` needs besides the layout."""

    device: DeviceTierConfig
    host: HostTierConfig | None = None
    #: G3: local disk (needs a host tier: pages move through G2).
    disk: DiskTierConfig | None = None
    #: G4: object storage, S3 or GCS (at most one; needs a host tier).
    s3: S3TierConfig | None = None
    gcs: GCSTierConfig | None = None
    offload: OffloadConfig = OffloadConfig()
    #: Namespace salt for block hashes (model id, tenant): caches with different salts
    #: never match each other.
    salt: str | None = None
    #: Keep at most this many undrained events; older ones are dropped and counted.
    max_pending_events: int = 1_000_000

    def __post_init__(self) -> None:
        _check_positive("manager", "max_pending_events", self.max_pending_events)
        if not isinstance(self.device, DeviceTierConfig):
            raise ConfigError(f"config.device must be a DeviceTierConfig, got {self.device!r}")
        if self.s3 is not None and self.gcs is not None:
            raise ConfigError("configure at most one object tier (s3 or gcs)")
        if self.host is None and (self.disk or self.s3 or self.gcs):
            raise ConfigError("disk and object tiers need a host tier (config.host): pages "
                              "move between them through host memory")

    @property
    def lower_tiers(self) -> list[DiskTierConfig | S3TierConfig | GCSTierConfig]:
        """The configured tiers below host memory, fastest first."""
        return [c for c in (self.disk, self.s3, self.gcs) if c is not None]

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> ManagerConfig:
        return _build(cls, data, "config")

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str], *, env: Mapping[str, str] | None = None
                  ) -> ManagerConfig:
        """Load a TOML file; ``KVBM_*`` variables in ``env`` (default: os.environ) override it."""
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover - Python 3.10
            import tomli as tomllib
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"cannot read config {path}: {e}") from None
        return cls.from_mapping(_merge(data, env_overrides(cls, os.environ if env is None
                                                            else env)))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ManagerConfig:
        """Build from ``KVBM_*`` variables alone."""
        return cls.from_mapping(env_overrides(cls, os.environ if env is None else env))


T = TypeVar("T")


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
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"unknown key(s) in {where}: {sorted(unknown)}; "
                          f"expected some of {sorted(names)}")
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
        if value is None and optional:
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
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        return value
    raise ConfigError(f"{where} must be {tp.__name__}, got {value!r}")


def env_overrides(cls: type[Any], env: Mapping[str, str]) -> dict[str, Any]:
    """The ``KVBM_*`` variables that name fields of ``cls`` (or of its sections), nested."""
    out: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp, _ = _unwrap_optional(hints[f.name])
        key = ENV_PREFIX + f.name.upper()
        if dataclasses.is_dataclass(tp):
            sub: dict[str, str | None] = {}
            for g in dataclasses.fields(tp):
                name = f"{key}_{g.name.upper()}"
                if g.init and name in env:
                    sub[g.name] = None if env[name].lower() in ("none", "null") else env[name]
            if sub:
                out[f.name] = sub
        elif key in env:
            v = env[key]
            out[f.name] = None if v.lower() in ("none", "null") else v
    return out

"""The ``[transport]`` table: how an :class:`~kvbm.transports.Agent` listens, authenticates
and moves bytes.

A field of :class:`kvbm.config.ManagerConfig` (``[transport]`` in TOML, ``KVBM_TRANSPORT_*``
in the environment) and usable on its own (``TransportConfig(secret=...)``,
:meth:`TransportConfig.from_env`). Nothing here opens a socket: the secret is resolved
(``secret``, else ``secret_file``) when an agent starts, so a config without one loads fine
for processes that never start an agent.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvbm.errors import ConfigError

#: Backends an agent can run, most preferred first (the order of path selection).
KNOWN_BACKENDS = ("nvlink", "ucx", "tcp")
#: A shared secret shorter than this is refused: HMAC over a guessable key proves nothing.
MIN_SECRET_BYTES = 16


def _int(name: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"transport.{name} must be an int in [{low}, {high}], got {value!r}")


def _seconds(name: str, value: object) -> None:
    if (isinstance(value, bool) or not isinstance(value, int | float)
            or not math.isfinite(value) or not 0 < value <= 86_400):
        raise ConfigError(f"transport.{name} must be a number of seconds in (0, 86400], "
                          f"got {value!r}")


@dataclass(frozen=True)
class TransportConfig:
    """Settings of one agent. Timeouts bound every wait: nothing blocks forever on a peer."""

    #: Address the control listener binds (and, unless ``advertise_host`` is set, the one
    #: peers are told to connect to).
    host: str = "127.0.0.1"
    #: Listening port; 0 lets the system pick a free one (``Agent.address`` tells it).
    port: int = 0
    #: Host peers should connect to when ``host`` is a wildcard such as ``0.0.0.0``.
    advertise_host: str | None = None
    #: The shared secret both ends prove they hold (HMAC-SHA256 challenge-response), at least
    #: 16 bytes. Prefer ``secret_file`` or ``KVBM_TRANSPORT_SECRET`` to a TOML file.
    secret: str | None = field(default=None, repr=False)
    #: A file whose content (stripped of surrounding whitespace) is the secret.
    secret_file: str | None = None
    #: ``"auto"`` (every backend this machine can run) or a comma-separated list of names
    #: (``"tcp"``, ``"ucx,tcp"``).
    backends: str = "auto"
    #: A backend every transfer must use unless the call says otherwise (``None``: the best
    #: one both agents support: nvlink > ucx > tcp).
    require: str | None = None
    #: One-sided ucx transfers (UCX RMA, NIXL's model): peers get remote keys to the host
    #: regions exposed to them and check ranges themselves; no serving thread per transfer
    #: (small transfers several times faster). On one host UCX does RMA by cross-memory
    #: attach, which the kernel does not confine to those regions: only for trusted peers.
    #: Used between two agents that both turn it on; otherwise the serving side checks
    #: every range (:mod:`kvbm.transports.ucx_rma`).
    ucx_rma: bool = False
    #: Data connections per peer (tcp): a large transfer is split across them.
    parallel_connections: int = 2
    #: A tcp transfer of at least this many bytes is split across the parallel connections.
    split_threshold_bytes: int = 8 << 20
    connect_timeout_s: float = 5.0
    #: A connection that has not authenticated within this time is closed.
    handshake_timeout_s: float = 5.0
    #: No progress on a socket (a control answer, a data chunk) for this long fails the
    #: operation with a timeout.
    io_timeout_s: float = 30.0
    #: Largest control or request frame accepted after authentication (before it: 4 KiB).
    max_frame_bytes: int = 16 << 20
    #: Connections served at once; beyond, new ones are closed on accept.
    max_connections: int = 256
    #: Notifications kept for ``Agent.notifications()``; beyond, the oldest are dropped
    #: (counted, warned).
    max_notifications: int = 65_536

    def __post_init__(self) -> None:
        for name in ("host", "backends"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ConfigError(f"transport.{name} must be a non-empty string, got "
                                  f"{getattr(self, name)!r}")
        for name in ("advertise_host", "secret", "secret_file", "require"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                shown = "<hidden>" if name == "secret" else repr(value)
                raise ConfigError(f"transport.{name} must be a non-empty string or unset, "
                                  f"got {shown}")
        if not isinstance(self.ucx_rma, bool):
            raise ConfigError(f"transport.ucx_rma must be a bool, got {self.ucx_rma!r}")
        _int("port", self.port, 0, 65_535)
        _int("parallel_connections", self.parallel_connections, 1, 64)
        _int("split_threshold_bytes", self.split_threshold_bytes, 1, 1 << 40)
        _int("max_frame_bytes", self.max_frame_bytes, 64 << 10, 1 << 30)
        _int("max_connections", self.max_connections, 1, 1 << 16)
        _int("max_notifications", self.max_notifications, 1, 1 << 24)
        for name in ("connect_timeout_s", "handshake_timeout_s", "io_timeout_s"):
            _seconds(name, getattr(self, name))
        self.backend_names()  # raises on an unknown name
        if self.require is not None and self.require not in KNOWN_BACKENDS:
            raise ConfigError(f"transport.require must be one of {list(KNOWN_BACKENDS)} or "
                              f"unset, got {self.require!r}")
        if self.secret is not None and len(self.secret.encode("utf-8", "surrogatepass")
                                           ) < MIN_SECRET_BYTES:
            raise ConfigError(f"transport.secret must be at least {MIN_SECRET_BYTES} bytes")

    def backend_names(self) -> tuple[str, ...]:
        """The configured backend names, in preference order; ``()`` for ``"auto"``."""
        if self.backends.strip().lower() == "auto":
            return ()
        names = [n.strip().lower() for n in self.backends.split(",") if n.strip()]
        bad = [n for n in names if n not in KNOWN_BACKENDS]
        if bad or not names:
            raise ConfigError(f"transport.backends must be 'auto' or names among "
                              f"{list(KNOWN_BACKENDS)}, got {self.backends!r}")
        return tuple(n for n in KNOWN_BACKENDS if n in names)

    def resolve_secret(self) -> bytes:
        """The shared secret as bytes: ``secret``, else the content of ``secret_file``.
        Raises :class:`ConfigError` when neither gives one of at least 16 bytes."""
        if self.secret is not None:
            return self.secret.encode("utf-8", "surrogatepass")
        if self.secret_file is None:
            raise ConfigError("an agent needs a shared secret: set transport.secret_file or "
                              "KVBM_TRANSPORT_SECRET (at least 16 bytes, the same on every "
                              "agent that should talk to this one)")
        try:
            data = Path(self.secret_file).read_bytes().strip()
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read transport.secret_file {self.secret_file!r}: "
                              f"{e}") from None
        if len(data) < MIN_SECRET_BYTES:
            raise ConfigError(f"transport.secret_file {self.secret_file!r} holds fewer than "
                              f"{MIN_SECRET_BYTES} bytes")
        return data

    @property
    def public_host(self) -> str:
        """The host peers connect to."""
        return self.advertise_host or self.host

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> TransportConfig:
        """Build from plain data (a ``[transport]`` TOML table)."""
        from kvbm.config import _build  # kvbm.config imports this module: import late

        return _build(cls, data, "transport")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> TransportConfig:
        """Build from the ``KVBM_TRANSPORT_*`` variables alone (other ``KVBM_*`` ignored)."""
        env = os.environ if env is None else env
        prefix = "KVBM_TRANSPORT_"
        known = {prefix + f.upper(): f for f in cls.__dataclass_fields__}
        data: dict[str, Any] = {}
        for var, value in env.items():
            if not var.startswith(prefix):
                continue
            if var not in known:
                raise ConfigError(f"unknown transport variable {var}; known: {sorted(known)}")
            data[known[var]] = None if value.lower() in ("none", "null") else value
        return cls.from_mapping(data)

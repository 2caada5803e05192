"""Counters of an agent: transfers per backend (the chosen path, as metrics show it) and
what its serving side saw (requests, refusals, failed handshakes, bad connections)."""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field

from kvbm.transports.handle import TransferStatus


@dataclass(frozen=True)
class BackendStats:
    transfers: int = 0
    bytes: int = 0
    failed: int = 0
    cancelled: int = 0


@dataclass(frozen=True)
class StatsSnapshot:
    #: Per backend name: the transfers this agent requested through it.
    backends: dict[str, BackendStats] = field(default_factory=dict)
    #: Serving side and control plane events: ``served_requests``, ``served_bytes``,
    #: ``refused_requests``, ``auth_failures``, ``bad_connections``,
    #: ``refused_connections``, ``notifications``, ``notifications_dropped``.
    events: dict[str, int] = field(default_factory=dict)


class AgentStats:
    """Thread-safe counters; :meth:`snapshot` copies them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: Counter[str] = Counter()
        self._backends: dict[str, list[int]] = {}

    def count(self, event: str, n: int = 1) -> None:
        with self._lock:
            self._events[event] += n

    def transfer(self, backend: str, status: TransferStatus, nbytes: int) -> None:
        with self._lock:
            row = self._backends.setdefault(backend, [0, 0, 0, 0])
            row[0] += 1
            if status is TransferStatus.DONE:  # identity: Enum.value is a Python descriptor
                row[1] += nbytes
            elif status is TransferStatus.FAILED:
                row[2] += 1
            elif status is TransferStatus.CANCELLED:
                row[3] += 1

    def snapshot(self) -> StatsSnapshot:
        with self._lock:
            return StatsSnapshot({k: BackendStats(*v) for k, v in self._backends.items()},
                                 dict(self._events))

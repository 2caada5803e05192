"""Disaggregated prefill/decode: what the handoff counts, on the side where it happens.

Both halves keep a :class:`PdMeter` that the connector hands vLLM beside kvbm's own stats
(``get_kv_connector_stats``): vLLM adds the workers' and the scheduler side's up and shows
them as ``vllm:kvbm_pd_*`` in its ``/metrics``; kvbm's own endpoint, where configured, shows
them as ``kvbm_connector_pd_*``. Names, labels and meanings are in
:func:`~kvbm.integrations.vllm.stats.metric_specs`; in short:

* prefill, per request (scheduler side): ``pd_handoffs``, ``pd_handoff_failures{reason}``
  (:class:`HandoffFailure`), ``pd_handoffs_released``, the gauge ``pd_held_requests``;
* prefill, per rank (workers): ``pd_leases_released{reason}`` (:class:`LeaseEnd`),
  ``pd_served_blocks{op}`` / ``pd_served_bytes{op}`` (``read`` or ``write``);
* decode, per request: ``pd_loads_started``, ``pd_load_tokens``, ``pd_drops``, and
  ``pd_load_failures{reason}`` for refused params;
* decode, per rank: ``pd_loads_done{backend}``, ``pd_received_blocks{backend}``,
  ``pd_received_bytes{backend}``, ``pd_load_failures{reason}`` (:class:`LoadFailure`) and
  the histogram of handoff seconds (``pd_handoff``);
* either: ``pd_stray_notes``.

Per-rank counts add up over tensor-parallel ranks (each rank moves its own share, from its
own peer): with TP=2 one request that failed on both ranks is two failed transfers.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Sequence

from kvbm.integrations.vllm.stats import KvbmConnectorStats


class HandoffFailure(enum.Enum):
    """Why a prefill instance handed a request off without its KV."""

    NO_SLOT = "no_slot"  # every lease slot holds a request (kvbm_disagg.max_handoffs)
    NO_AGENTS = "no_agents"  # no worker announced its agent (vLLM's handshake)


class LeaseEnd(enum.Enum):
    """How a prefill worker's hold of a request's blocks ended."""

    DONE = "done"  # the decode side read them
    DROP = "drop"  # the decode side will not take them
    WRITTEN = "written"  # this side wrote them into the decode side's staging region
    WRITE_FAILED = "write_failed"
    EXPIRED = "expired"  # nobody came within the lease


class LoadFailure(enum.Enum):
    """Why a decode instance recomputed what a prefill instance had computed."""

    # refused params (scheduler side, per request)
    BAD_PARAMS = "bad_params"
    LAYOUT_MISMATCH = "layout_mismatch"  # also a transfer refused for its regions' layout
    OTHER_PROMPT = "other_prompt"
    # failed transfers (workers, per rank)
    TIMEOUT = "timeout"
    PEER_DEAD = "peer_dead"  # no connection, or it broke
    AUTH = "auth"  # the peer does not hold the shared secret, or is not the agent named
    LEASE_LOST = "lease_lost"  # the prefill side let the blocks go first
    REFUSED = "refused"  # the peer refused the ranges or the write
    NO_PATH = "no_path"  # no transport backend both agents run
    ERROR = "error"


class PdMeter:
    """What one half counted since vLLM last took it. Thread-safe: a worker counts on
    vLLM's thread, its transfer threads and its agent's thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stats = KvbmConnectorStats()
        self._gauges: dict[str, float] = {}

    def add(self, name: str, n: float = 1, labels: Sequence[str | enum.Enum] = ()) -> None:
        keys = [x.value if isinstance(x, enum.Enum) else x for x in labels]
        with self._lock:
            self._stats.add(name, n, keys)

    def observe(self, name: str, seconds: float) -> None:
        with self._lock:
            self._stats.observe_time(name, max(0.0, seconds))

    def gauge(self, name: str, value: float) -> None:
        """Reported at the next :meth:`take` where it changed since the last report."""
        with self._lock:
            if self._gauges.get(name) != value:
                self._gauges[name] = value
                self._stats.set_gauge(name, value)

    def take(self) -> KvbmConnectorStats | None:
        with self._lock:
            out, self._stats = self._stats, KvbmConnectorStats()
        return None if out.is_empty() else out

"""What the vLLM connector measures, and its way into vLLM's own stats.

:class:`ConnectorCounters` are the scheduler side's monotonic counters. Per engine step, the
scheduler side (:class:`SchedulerMeter`) and every worker (:class:`WorkerMeter`) hand vLLM
what changed since their last step as a :class:`KvbmConnectorStats` (vLLM's
``get_kv_connector_stats``); vLLM adds the workers' and the scheduler's up, ships the plain
``data`` dict to its front end, logs :meth:`KvbmConnectorStats.reduce` there and feeds it to
:class:`~kvbm.integrations.vllm.prom.KvbmPromMetrics` (``vllm:kvbm_*`` in vLLM's
``/metrics``).

``data`` is plain JSON-able data (it crosses processes through vLLM's serialisers)::

    {"counters": {name: {labels: increase}},   # labels: label values joined by ","; "" none
     "gauges":   {name: {labels: value}},      # the latest value wins
     "times":    {"load" | "save" | "pd_handoff":
                  {"n": plans, "sum": seconds, "samples": [seconds, ...]}}}

Names and labels are in :func:`metric_specs`. Workers count what each rank copies between
vLLM's KV cache and G2 (bytes, block copies, refused or failed copies, seconds per plan); the
scheduler counts prefix hits and misses, blocks loaded and saved, and the tiers' traffic,
corrupt pages, skipped offloads and queue depths (from the block manager's stats). With
disaggregated prefill/decode, the ``pd_*`` metrics say what was handed off and received
(see :mod:`~kvbm.integrations.vllm.pd_stats`).
"""

from __future__ import annotations

import dataclasses
import enum
import math
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

from kvbm.core.plans import CopyStatus, Direction
from kvbm.medium import Medium
from kvbm.offload import LatencyHistogram

if TYPE_CHECKING:
    from kvbm.reports import ManagerStats


@dataclass
class ConnectorCounters:
    """What the connector did since it started (monotonic counters)."""

    #: prefix queries answered (vLLM's get_num_new_matched_tokens)
    queries: int = 0
    #: tokens vLLM asked kvbm for (beyond its own GPU hit), counted once per scheduled request
    query_tokens: int = 0
    #: of those, tokens no kvbm tier held
    miss_tokens: int = 0
    #: tokens promised to vLLM, by the tier that held them
    hit_tokens: dict[str, int] = field(default_factory=dict)
    #: blocks copied into vLLM's memory (every worker's copy verified)
    loaded_blocks: int = 0
    #: blocks promised but not delivered (a failed or corrupt load, a timeout): recomputed
    load_errors: int = 0
    #: staged loads from disk or object storage that ran past offload.load_timeout_s
    load_timeouts: int = 0
    #: blocks saved into G2 (and then offered to the tiers below)
    saved_blocks: int = 0
    #: blocks not saved: G2 had no room (every page held) or admission refused them
    skipped_saves: int = 0
    #: saves a worker failed or whose page did not carry the block's tag
    failed_saves: int = 0
    #: G2 copies dropped because a worker found their tag wrong
    discarded_pages: int = 0
    #: plans given up on because a worker's report never came (their pages freed)
    lost_reports: int = 0

    def hit_tokens_by_medium_add(self, mediums: Iterable[Medium], block_size: int) -> None:
        for m in mediums:
            self.hit_tokens[m.value] = self.hit_tokens.get(m.value, 0) + block_size

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


class MetricKind(enum.Enum):
    COUNTER = "counter"
    GAUGE = "gauge"


@dataclass(frozen=True)
class MetricSpec:
    kind: MetricKind
    labels: tuple[str, ...]
    doc: str


_C, _G = MetricKind.COUNTER, MetricKind.GAUGE
_TIER, _FLOW = ("medium",), ("medium", "direction")

#: The metrics besides :class:`ConnectorCounters`' fields (see :func:`metric_specs`).
_SPECS: dict[str, MetricSpec] = {
    "copied_blocks": MetricSpec(_C, ("direction",), "block copies between vLLM's KV cache "
                                "and G2, summed over tensor-parallel ranks"),
    "copied_bytes": MetricSpec(_C, ("direction",), "bytes copied between vLLM's KV cache and "
                               "G2, summed over tensor-parallel ranks"),
    "copy_failures": MetricSpec(_C, ("direction", "reason"), "block copies a worker refused "
                                "(mismatch: the page did not carry the block's tag) or failed"),
    "tier_pages": MetricSpec(_C, _FLOW, "pages moved between G2 and a lower tier (store: "
                             "down, load: up)"),
    "tier_bytes": MetricSpec(_C, _FLOW, "bytes moved between G2 and a lower tier"),
    "tier_transfers": MetricSpec(_C, _FLOW, "transfers with a lower tier that ran"),
    "tier_transfer_seconds": MetricSpec(_C, _FLOW, "seconds from submit to finish of those "
                                        "transfers (divide by tier_transfers for the mean)"),
    "corrupt_pages": MetricSpec(_C, _TIER, "pages that failed verification (served as misses, "
                                "recomputed)"),
    "skipped_offloads": MetricSpec(_C, _TIER, "offloads into the tier refused by backpressure "
                                   "(pages in flight at the bound)"),
    "tier_errors": MetricSpec(_C, _TIER, "tier operations that failed"),
    "evictions": MetricSpec(_C, _TIER, "pages evicted from the tier to make room"),
    "staging_misses": MetricSpec(_C, (), "lower-tier hits cut short for want of a G2 page"),
    "tier_used_pages": MetricSpec(_G, _TIER, "pages of G2 holding a block"),
    "tier_capacity_pages": MetricSpec(_G, _TIER, "pages of G2"),
    "inflight_pages": MetricSpec(_G, _TIER, "pages submitted to the tier, unfinished"),
    "queued_transfers": MetricSpec(_G, _TIER, "transfers waiting in the tier's queue"),
    "pending_loads": MetricSpec(_G, (), "requests whose hit is being staged into G2"),
    "inflight_plans": MetricSpec(_G, (), "load and save plans waiting for the workers"),
    # -- disaggregated prefill/decode (disagg.py: per request; pd_worker.py: per rank) --
    "pd_handoffs": MetricSpec(_C, (), "prefill: requests handed off with their KV held for a "
                              "decode instance"),
    "pd_handoff_failures": MetricSpec(_C, ("reason",), "prefill: requests handed off without "
                                      "their KV (no_slot: every lease slot in use; no_agents: "
                                      "no worker agent announced itself)"),
    "pd_handoffs_released": MetricSpec(_C, (), "prefill: handed-off requests every worker let "
                                       "go (vLLM then frees their blocks)"),
    "pd_held_requests": MetricSpec(_G, (), "prefill: requests whose blocks are held for a "
                                   "decode instance now"),
    "pd_leases_released": MetricSpec(_C, ("reason",), "prefill, per rank: holds that ended "
                                     "(done: the decode side read the blocks; written: this "
                                     "side wrote them; drop: the decode side did not take "
                                     "them; write_failed; expired: the lease ran out)"),
    "pd_served_blocks": MetricSpec(_C, ("op", "backend"), "prefill, summed over ranks: "
                                   "blocks decode peers took (op read: they read them; "
                                   "write: this side wrote them), by transport path"),
    "pd_served_bytes": MetricSpec(_C, ("op", "backend"), "prefill, summed over ranks: bytes "
                                  "of those blocks"),
    "pd_loads_started": MetricSpec(_C, (), "decode: remote loads planned (requests whose KV "
                                   "comes from a prefill instance)"),
    "pd_load_tokens": MetricSpec(_C, (), "decode: tokens those loads bring"),
    "pd_drops": MetricSpec(_C, (), "decode: prefill instances told to let a request's blocks "
                           "go without a transfer (aborted, all in vLLM's cache, refused)"),
    "pd_loads_done": MetricSpec(_C, ("backend",), "decode, per rank: transfers whose blocks "
                                "all arrived, by the transport path that carried them"),
    "pd_load_failures": MetricSpec(_C, ("reason",), "decode: remote loads recomputed instead. "
                                   "Per request, refused params: bad_params, layout_mismatch, "
                                   "other_prompt; per rank, failed transfers: timeout, "
                                   "peer_dead, auth, layout_mismatch, lease_lost, refused, "
                                   "no_path, error"),
    "pd_received_blocks": MetricSpec(_C, ("backend",), "decode, summed over ranks: blocks "
                                     "received from prefill instances"),
    "pd_received_bytes": MetricSpec(_C, ("backend",), "decode, summed over ranks: bytes "
                                    "received from prefill instances"),
    "pd_stray_notes": MetricSpec(_C, (), "per rank: prefill/decode notes that were not kvbm's "
                                 "or named no request this worker holds or will hold"),
}

#: Seconds per plan or transfer (histograms in Prometheus): G1<->G2 copies per direction,
#: and the decode side's handoff time.
TIMES = {"load": "seconds a worker spent copying one load plan from G2 into vLLM's KV cache",
         "save": "seconds a worker spent copying one save plan from vLLM's KV cache into G2",
         "pd_handoff": "decode, per rank: seconds from the start of a remote load to all its "
                       "blocks in place (loads that succeeded)"}
#: What :meth:`KvbmConnectorStats.reduce` calls the count of each of TIMES.
_TIME_COUNTS = {"load": "load_plans", "save": "save_plans", "pd_handoff": "pd_handoff_n"}

#: Samples kept per direction when stats add up (count and sum stay exact beyond it).
MAX_SAMPLES = 1024


def metric_specs() -> dict[str, MetricSpec]:
    """Every metric name the stats carry: :class:`ConnectorCounters`' fields (a dict field is
    labelled by medium) and the others above."""
    out: dict[str, MetricSpec] = {}
    for f in dataclasses.fields(ConnectorCounters):
        labelled = f.default_factory is not dataclasses.MISSING
        out[f.name] = MetricSpec(_C, _TIER if labelled else (), f.name.replace("_", " "))
    out.update(_SPECS)
    return out


def _empty() -> dict[str, Any]:
    return {"counters": {}, "gauges": {}, "times": {}}


def _num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class KvbmConnectorStats(KVConnectorStats):
    """kvbm's stats of one interval (see the module docstring for ``data``)."""

    def __post_init__(self) -> None:
        # A deep copy: vLLM hands one payload to several loggers, and aggregate() adds into
        # its own rows. Malformed parts are dropped, never raised into vLLM's loop.
        data = self.data if isinstance(self.data, Mapping) else {}
        clean = _empty()
        for section in ("counters", "gauges"):
            rows = data.get(section)
            for name, row in (rows.items() if isinstance(rows, Mapping) else ()):
                if isinstance(row, Mapping):
                    clean[section][str(name)] = {str(k): v for k, v in row.items() if _num(v)}
        times = data.get("times")
        for d, t in (times.items() if isinstance(times, Mapping) else ()):
            if isinstance(t, Mapping) and _num(t.get("n")) and _num(t.get("sum")):
                samples = t.get("samples")
                kept = [float(s) for s in samples if _num(s)] \
                    if isinstance(samples, list | tuple) else []
                clean["times"][str(d)] = {"n": int(t["n"]), "sum": float(t["sum"]),
                                          "samples": kept}
        self.data = clean

    def reset(self) -> None:
        self.data = _empty()

    def add(self, name: str, value: float, labels: Sequence[str] = ()) -> None:
        if value:
            row = self.data["counters"].setdefault(name, {})
            key = ",".join(labels)
            row[key] = row.get(key, 0) + value

    def set_gauge(self, name: str, value: float, labels: Sequence[str] = ()) -> None:
        self.data["gauges"].setdefault(name, {})[",".join(labels)] = value

    def observe_time(self, direction: str, seconds: float, n: int = 1,
                     samples: Sequence[float] | None = None) -> None:
        t = self.data["times"].setdefault(direction, {"n": 0, "sum": 0.0, "samples": []})
        t["n"] += n
        t["sum"] += seconds
        kept = t["samples"]
        kept.extend([seconds] if samples is None else samples)
        if len(kept) > MAX_SAMPLES:
            del kept[: len(kept) - MAX_SAMPLES]

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        """Add ``other`` in (counters and times add up; a gauge takes other's value)."""
        if not isinstance(other, KvbmConnectorStats) or other is self:
            return self
        for name, row in other.data["counters"].items():
            for key, v in row.items():
                if _num(v):
                    self.add(name, v, key.split(",") if key else ())
        for name, row in other.data["gauges"].items():
            self.data["gauges"].setdefault(name, {}).update(row)
        for direction, t in other.data["times"].items():
            self.observe_time(direction, float(t.get("sum", 0.0)), int(t.get("n", 0)),
                              list(t.get("samples", ())))
        return self

    def reduce(self) -> dict[str, int | float]:
        """One number per series, for vLLM's periodic log line."""
        out: dict[str, int | float] = {}
        for section in ("counters", "gauges"):
            for name, row in sorted(self.data[section].items()):
                for key, v in sorted(row.items()):
                    out[f"{name}[{key}]" if key else name] = v
        for direction, t in sorted(self.data["times"].items()):
            n, samples = int(t["n"]), sorted(t["samples"])
            out[_TIME_COUNTS.get(direction, f"{direction}_n")] = n
            if n:
                out[f"{direction}_ms_avg"] = round(1000 * float(t["sum"]) / n, 3)
            if samples:
                p90 = samples[min(len(samples) - 1, int(0.9 * len(samples)))]
                out[f"{direction}_ms_p90"] = round(1000 * p90, 3)
        return out

    def is_empty(self) -> bool:
        d = self.data
        return (not any(any(_num(v) and v for v in row.values())
                        for row in d["counters"].values())
                and not any(d["gauges"].values())
                and not any(int(t.get("n", 0)) for t in d["times"].values()))


class WorkerMeter:
    """One worker's measurements since vLLM last took them (the worker's thread only)."""

    def __init__(self) -> None:
        self._stats = KvbmConnectorStats()

    def record(self, direction: Direction, statuses: Sequence[CopyStatus], seconds: float,
               copy_bytes: int) -> None:
        """A plan this rank ran: how each copy ended, how long it took, and the bytes one
        copy moves on this rank (0 where another rank writes the page)."""
        st, d = self._stats, direction.value
        # A rank that writes no part of the page (MLA, rank > 0) copied nothing.
        done = sum(1 for s in statuses if s is CopyStatus.DONE) if copy_bytes else 0
        st.add("copied_blocks", done, (d,))
        st.add("copied_bytes", done * copy_bytes, (d,))
        for bad in (CopyStatus.MISMATCH, CopyStatus.FAILED):
            st.add("copy_failures", sum(1 for s in statuses if s is bad), (d, bad.value))
        st.observe_time(d, max(0.0, seconds))

    def take(self) -> KvbmConnectorStats | None:
        out, self._stats = self._stats, KvbmConnectorStats()
        return None if out.is_empty() else out


def merged(a: KvbmConnectorStats | None, b: KvbmConnectorStats | None
           ) -> KvbmConnectorStats | None:
    """``a`` with ``b`` added in (either may be None: nothing to say)."""
    if a is None or b is None:
        return a if b is None else b
    a.aggregate(b)
    return a


def counter_rows(c: ConnectorCounters) -> dict[tuple[str, str], float]:
    rows: dict[tuple[str, str], float] = {}
    for f in dataclasses.fields(c):
        v = getattr(c, f.name)
        if isinstance(v, dict):
            rows.update({(f.name, str(k)): n for k, n in dict(v).items()})
        else:
            rows[(f.name, "")] = v
    return rows


def _manager_rows(st: ManagerStats) -> tuple[dict[tuple[str, str], float],
                                             dict[tuple[str, str], float]]:
    """The block manager's cumulative counters and its gauges, as (name, labels) rows."""
    counters: dict[tuple[str, str], float] = {("staging_misses", ""): st.staging_misses}
    gauges: dict[tuple[str, str], float] = {}
    for m, u in st.tiers.items():
        counters[("evictions", m.value)] = u.evictions
        gauges[("tier_used_pages", m.value)] = u.used_blocks
        gauges[("tier_capacity_pages", m.value)] = u.capacity_blocks
    for m, (s, q) in st.lower_tiers.items():
        t = m.value
        for d, pages, nbytes, h in (("store", q.pages_stored, q.bytes_stored, q.store_latency),
                                    ("load", q.pages_loaded, q.bytes_loaded, q.load_latency)):
            counters[("tier_pages", f"{t},{d}")] = pages
            counters[("tier_bytes", f"{t},{d}")] = nbytes
            counters[("tier_transfers", f"{t},{d}")] = h.count
            counters[("tier_transfer_seconds", f"{t},{d}")] = h.sum_seconds
        counters[("corrupt_pages", t)] = s.corrupt
        counters[("skipped_offloads", t)] = q.skipped
        counters[("tier_errors", t)] = s.errors
        counters[("evictions", t)] = s.evicted
        gauges[("inflight_pages", t)] = q.inflight_pages
        gauges[("queued_transfers", t)] = q.queued_transfers
    return counters, gauges


class SchedulerMeter:
    """The scheduler side's stats per step (increases since the last step, gauges that
    changed) and, for kvbm's own endpoint, the workers' totals (:meth:`absorb`)."""

    def __init__(self) -> None:
        self._prev: dict[tuple[str, str], float] = {}
        self._gauges: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()  # absorb (scheduler thread) vs a scrape (HTTP thread)
        self._worker: dict[tuple[str, str], float] = {}
        self._times = {d: LatencyHistogram() for d in TIMES}

    def take(self, counters: ConnectorCounters, manager: ManagerStats | None = None,
             gauges: Mapping[str, float] | None = None) -> KvbmConnectorStats | None:
        rows = counter_rows(counters)
        now: dict[tuple[str, str], float] = {(k, ""): v for k, v in (gauges or {}).items()}
        if manager is not None:
            mc, mg = _manager_rows(manager)
            rows.update(mc)
            now.update(mg)
        out = KvbmConnectorStats()
        for (name, key), v in rows.items():
            before = self._prev.get((name, key), 0)
            # A counter that went down started over (a tier reopened): all of it is new.
            out.add(name, v - before if v >= before else v, key.split(",") if key else ())
            self._prev[(name, key)] = v
        with self._lock:
            for (name, key), v in now.items():
                if self._gauges.get((name, key)) != v:
                    out.set_gauge(name, v, key.split(",") if key else ())
                    self._gauges[(name, key)] = v
        return None if out.is_empty() else out

    def absorb(self, stats: KvbmConnectorStats) -> None:
        """Add stats the meter did not take itself (the workers', the prefill/decode
        half's) to the totals kvbm's endpoint exports; their gauges replace the last."""
        with self._lock:
            for name, row in stats.data["counters"].items():
                for key, v in row.items():
                    if _num(v) and v > 0:
                        self._worker[(name, key)] = self._worker.get((name, key), 0) + v
            for name, row in stats.data["gauges"].items():
                for key, v in row.items():
                    self._gauges[(name, key)] = v
            for d, t in stats.data["times"].items():
                if d in self._times:
                    for s in t.get("samples", ()):
                        if _num(s):
                            self._times[d].observe(float(s))

    def totals(self) -> tuple[dict[tuple[str, str], float], dict[str, LatencyHistogram],
                              dict[tuple[str, str], float]]:
        """The absorbed counters, the seconds per plan or transfer, the last gauges
        (copies)."""
        with self._lock:
            return (dict(self._worker), {d: h.copy() for d, h in self._times.items()},
                    dict(self._gauges))

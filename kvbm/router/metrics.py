"""The router's counters in the Prometheus text format (``GET /metrics``), written by hand:
the router side needs no client library."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from kvbm.medium import Medium
from kvbm.router.indexer import IndexerStats
from kvbm.router.peer import COUNTERS, WorkerStatus

_PREFIX = "kvbm_router_"

#: Subscriber counters: (metric name, help). ``bad_messages`` is the garbage received.
_SUB_HELP = {
    "batches": "event batches applied",
    "events": "events received in batches",
    "gaps": "sequence gaps seen",
    "replays": "replay requests sent",
    "replayed_batches": "batches received from replay sockets",
    "replay_timeouts": "replays given up (the replay socket went quiet)",
    "resyncs": "times batches were lost for good and the worker was cleared",
    "restarts": "publisher restarts seen",
    "bad_messages": "messages and batches that were not events (garbage), skipped",
    "skipped_events": "events that broke the format, skipped",
    "rejected_events": "events the indexer refused, skipped",
}
assert set(_SUB_HELP) == set(COUNTERS)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _family(name: str, kind: str, doc: str,
            samples: Iterable[tuple[Mapping[str, str], float]]) -> list[str]:
    out = [f"# HELP {_PREFIX}{name} {doc}", f"# TYPE {_PREFIX}{name} {kind}"]
    for labels, value in samples:
        lab = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
        out.append(f"{_PREFIX}{name}{{{lab}}} {value:g}" if lab
                   else f"{_PREFIX}{name} {value:g}")
    return out


def prometheus_text(stats: IndexerStats, blocks: Mapping[str, Mapping[Medium, int]],
                    status: Mapping[str, WorkerStatus], totals: Mapping[str, int],
                    selections: int, http_errors: Mapping[int, int]) -> str:
    lines: list[str] = []

    def total(name: str, doc: str, value: float) -> None:
        lines.extend(_family(name + "_total", "counter", doc, [({}, value)]))

    total("events_applied", "events applied to the index", stats.events_applied)
    total("blocks_stored", "block residencies added", stats.blocks_stored)
    total("blocks_removed", "block residencies removed", stats.blocks_removed)
    total("unknown_parents", "stores dropped: the parent was never announced (a lost event)",
          stats.unknown_parents)
    total("unknown_removals", "removals of blocks not held (a lost event)",
          stats.unknown_removals)
    total("conflicts", "publisher hashes announced again for other tokens", stats.conflicts)
    total("selections", "POST /select answered", selections)
    total("sink_errors", "failures of the event sink", totals.get("sink_errors", 0))
    lines.extend(_family("http_errors_total", "counter", "HTTP requests answered with an "
                         "error, by status", [({"code": str(c)}, n)
                                              for c, n in sorted(http_errors.items())]))
    lines.extend(_family("nodes", "gauge", "prefix nodes in the index", [({}, stats.nodes)]))
    lines.extend(_family("workers", "gauge", "workers known", [({}, stats.workers)]))
    lines.extend(_family("worker_blocks", "gauge", "blocks resident per worker and medium", [
        ({"worker": w, "medium": m.value}, n)
        for w, per in sorted(blocks.items()) for m, n in per.items()]))
    lines.extend(_family("worker_next_seq", "gauge", "next event batch expected per worker",
                         [({"worker": w}, st.next_seq) for w, st in sorted(status.items())
                          if st.next_seq is not None]))
    lines.extend(_family("worker_complete", "gauge", "1 when nothing was lost since the "
                         "worker's start or last resync", [
                             ({"worker": w}, float(st.complete))
                             for w, st in sorted(status.items())]))
    for key, doc in _SUB_HELP.items():
        samples: list[tuple[Mapping[str, str], Any]] = [
            ({"worker": w}, st.counters[key]) for w, st in sorted(status.items())]
        lines.extend(_family(f"{key}_total", "counter", doc, samples))
    return "\n".join(lines) + "\n"


#: JetStream consumer counters (``kvbm router`` with ``[router.nats]``): field, help.
_JS_HELP = {
    "msgs": "JetStream messages handled",
    "events": "events applied from JetStream",
    "duplicates": "JetStream batches seen again (redeliveries, retried publishes), skipped",
    "gaps": "holes in a worker's JetStream sequence (the worker was cleared, a resync asked)",
    "resync_requests": "resync requests sent to workers' publishers",
    "bad_msgs": "JetStream messages that were not events, skipped",
    "skipped_events": "events of JetStream batches that broke the format, skipped",
    "rejected_events": "events from JetStream the indexer refused, skipped",
    "checkpoints": "checkpoints stored (and acknowledged) by the durable consumer",
}


def jetstream_text(stats: Any) -> str:
    """A :class:`~kvbm.events.nats_consumer.ConsumerStats` in the Prometheus text format."""
    lines: list[str] = []
    for key, doc in _JS_HELP.items():
        lines.extend(_family(f"jetstream_{key}_total", "counter", doc,
                             [({}, getattr(stats, key))]))
    lines.extend(_family("jetstream_last_stream_seq", "gauge",
                         "the last JetStream stream sequence handled",
                         [({}, stats.last_stream_seq)]))
    return "\n".join(lines) + "\n"

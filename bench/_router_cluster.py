"""The cluster of bench/router_replay.py: workers (real BlockManagers, CPU tensors, a tiny
layout) serving a trace's requests in simulated time, and the event feed from their managers
to the router's indexers.

A worker serves a request as an engine drives kvbm (``match_prefix`` -> ``onboard`` ->
``allocate`` -> ``commit`` -> ``release``; committed blocks go to G2 at once, and from G2 to
G3 where there is one). Its time is simulated: one prefill at a time, FIFO, at
``prefill_tps`` tokens/s, where a prefix block loaded from a tier costs :data:`LOAD_COST`
of computing it; then ``output_length * tpot`` seconds of decode, overlapping other
requests. Its load at an instant is what a router would be told: running requests (queued
for prefill, prefilling or decoding), their blocks, and the prompt tokens still queued for
prefill (in compute-equivalent tokens).

Events: with ``transport="zmq"`` every manager publishes on its own ZMQ PUB socket on
127.0.0.1 (``[events] enabled``) and a :class:`~kvbm.router.Subscriber` feeds the indexers;
before each routing decision the feed waits until the subscriber has applied every batch
the workers served since the last decision published (a router that is up to date).
``"inproc"``: the managers queue their events, which go through the same codec (msgpack
encode, decode) into the indexers directly.
"""

from __future__ import annotations

import heapq
import math
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kvbm import BlockManager, DeviceTierConfig, HostTierConfig, KVLayout, ManagerConfig
from kvbm.config import EventsConfig
from kvbm.events.records import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from kvbm.events.wire import EventBatch, decode_batch, encode_batch
from kvbm.medium import Medium
from kvbm.router import KvIndexer, Subscriber

#: What loading a prefix block from a tier costs, as a fraction of computing it (the
#: simulated hardware: HBM is free; host memory over PCIe ~10x faster than prefill; NVMe
#: ~2.5x). The router's weights are its own estimate of these (CostConfig).
LOAD_COST = {Medium.GPU: 0.0, Medium.CPU_PINNED: 0.1, Medium.DISK: 0.4, Medium.OBJECT: 0.6}
_SYNC_S = 60.0


@dataclass(frozen=True)
class Request:
    t: float  # arrival, seconds
    tokens: np.ndarray  # u32, block_size tokens per trace block
    blocks: int
    input_length: int  # tokens of the real prompt
    output_length: int


@dataclass(frozen=True)
class ClusterConfig:
    workers: int
    block_size: int
    device_blocks: int  # per worker
    host_blocks: int
    disk_blocks: int  # 0: no G3
    prefill_tps: float
    tpot: float
    trace_block_tokens: int
    transport: str  # "zmq" | "inproc"


@dataclass
class Served:
    """What one request found on its worker and how long it took (simulated)."""

    #: the match (what the router should have predicted), by the medium of each block
    matched: dict[Medium, int]
    #: the blocks of it onboard delivered (a load that failed or found no room in G2 to
    #: stage ends the prefix early), by medium
    by_medium: dict[Medium, int]
    hit_blocks: int
    saved_tokens: int
    saved_by_medium: dict[Medium, int]
    ttft: float


class Worker:
    """One kvbm-managed worker and its simulated clock."""

    def __init__(self, name: str, cfg: ClusterConfig, tmp: Path) -> None:
        self.name = name
        self.cfg = cfg
        layout = KVLayout(num_layers=1, num_kv_heads=1, head_dim=4,
                          block_size=cfg.block_size, dtype="float16")
        disk = None
        if cfg.disk_blocks:
            from kvbm.storage.disk import DiskTierConfig
            from kvbm.storage.disk.config import Durability

            page = 4096  # a tiny page plus its header, rounded up to the I/O alignment
            disk = DiskTierConfig(tmp / name, capacity_bytes=cfg.disk_blocks * page,
                                  slab_bytes=max(1 << 20, min(64 << 20,
                                                              cfg.disk_blocks * page)),
                                  durability=Durability.PROCESS_CRASH)
        events = None
        if cfg.transport == "zmq":
            events = EventsConfig(enabled=True, endpoint="tcp://127.0.0.1:*",
                                  replay_endpoint="tcp://127.0.0.1:*", batch_interval_s=0.0005,
                                  buffer_steps=100_000, max_queue_size=1_000_000)
        kw: dict[str, Any] = {"events": events} if events is not None else {}
        self.mgr = BlockManager(layout, ManagerConfig(
            device=DeviceTierConfig(cfg.device_blocks, device="cpu"),
            host=HostTierConfig(cfg.host_blocks), disk=disk, **kw))
        self.prefill_free_at = 0.0
        self._running: list[tuple[float, int]] = []  # (end, blocks)
        self._prefills: list[tuple[float, float, float]] = []  # (start, end, tokens), FIFO
        self.active_blocks = 0
        self.assigned = 0

    def load(self, t: float) -> tuple[int, int, int]:
        """(running requests, their blocks, prompt tokens still to prefill) at ``t``."""
        run = self._running
        while run and run[0][0] <= t:
            self.active_blocks -= heapq.heappop(run)[1]
        pre = self._prefills
        while pre and pre[0][1] <= t:
            heapq.heappop(pre)
        queued = 0.0
        for start, end, tokens in pre:  # the one prefilling counts what is left of it
            queued += tokens if start >= t else tokens * (end - t) / (end - start)
        return len(run), self.active_blocks, round(queued)

    def serve(self, req: Request) -> Served:
        mgr, cfg = self.mgr, self.cfg
        m = mgr.match_prefix(req.tokens)
        held = mgr.onboard(m)
        new = mgr.allocate(req.blocks - len(held))
        mgr.release(held + mgr.commit(new, req.tokens, start_block=len(held), hashes=m.hashes))
        mgr.poll()
        tb = cfg.trace_block_tokens
        saved = min(len(held) * tb, req.input_length)
        by_medium: dict[Medium, int] = {}
        saved_m: dict[Medium, int] = {}
        left = saved
        for med in m.mediums[:len(held)]:  # each block's tokens, in prefix order
            n = min(tb, left)
            by_medium[med] = by_medium.get(med, 0) + 1
            saved_m[med] = saved_m.get(med, 0) + n
            left -= n
        work = req.input_length - saved + sum(LOAD_COST[k] * v for k, v in saved_m.items())
        start = max(req.t, self.prefill_free_at)
        self.prefill_free_at = start + work / cfg.prefill_tps
        if work > 0:
            heapq.heappush(self._prefills, (start, self.prefill_free_at, work))
        end = self.prefill_free_at + req.output_length * cfg.tpot
        heapq.heappush(self._running, (end, req.blocks))
        self.active_blocks += req.blocks
        self.assigned += 1
        matched = {k: v for k, v in m.by_medium.items() if v}
        return Served(matched, by_medium, len(held), saved, saved_m,
                      self.prefill_free_at - req.t)

    def close(self) -> None:
        self.mgr.close(flush=False)


def gpu_only(events: Sequence[KVEvent]) -> list[KVEvent]:
    """What a router that sees only G1 gets: the GPU events (and clears)."""
    return [e for e in events if isinstance(e, AllBlocksCleared)
            or (isinstance(e, BlockStored | BlockRemoved) and e.medium is Medium.GPU)]


class Cluster:
    """``cfg.workers`` workers, and the event feed into ``full`` (every medium) and ``gpu``
    (GPU events only) indexers."""

    def __init__(self, cfg: ClusterConfig, *, with_events: bool) -> None:
        self.cfg = cfg
        self._tmp = tempfile.TemporaryDirectory(prefix="kvbm-router-replay-")
        self.full = KvIndexer(cfg.block_size)
        self.gpu = KvIndexer(cfg.block_size)
        self.workers: list[Worker] = []
        self.sub: Subscriber | None = None
        self._dirty: set[int] = set()
        self.with_events = with_events
        self.event_counts = {"events": 0, "batches": 0}
        try:
            for i in range(cfg.workers):
                self.workers.append(Worker(f"w{i}", cfg, Path(self._tmp.name)))
            for w in self.workers:
                self.full.add_worker(w.name)
                self.gpu.add_worker(w.name)
            if with_events and cfg.transport == "zmq":
                self.sub = Subscriber(self._sink)
                for w in self.workers:
                    pub = w.mgr.publisher
                    assert pub is not None
                    self.sub.add_worker(w.name, pub.endpoint, pub.replay_endpoint)
                self.sub.start()
        except BaseException:
            self.close()
            raise

    def _sink(self, worker: str, events: list[KVEvent]) -> None:
        self.full.apply(worker, events)
        self.gpu.apply(worker, gpu_only(events))
        self.event_counts["events"] += len(events)
        self.event_counts["batches"] += 1

    def served(self, i: int) -> None:
        self._dirty.add(i)

    def sync(self) -> None:
        """Bring the indexers up to date with what the workers served since the last sync."""
        if not self.with_events:
            self._dirty.clear()
            for w in self.workers:  # events are not wanted: do not let them pile up
                if w.mgr.publisher is None:
                    w.mgr.take_events()
            return
        for i in sorted(self._dirty):
            w = self.workers[i]
            if self.sub is None:
                events = w.mgr.take_events()
                if events:  # through the wire codec, as a subscriber would get them
                    self._sink(w.name, decode_batch(encode_batch(EventBatch(0.0, events))).events)
                continue
            pub = w.mgr.publisher
            assert pub is not None
            if not pub.flush(_SYNC_S) or not self.sub.wait_for(w.name, pub.stats.next_seq,
                                                                 _SYNC_S):
                raise RuntimeError(f"events of {w.name} did not reach the router in "
                                   f"{_SYNC_S:.0f} s: {self.sub.status().get(w.name)}")
        self._dirty.clear()

    def close(self) -> None:
        if self.sub is not None:
            self.sub.close()
        for w in self.workers:
            w.close()
        self._tmp.cleanup()


# ----------------------------------------------------------------------------- routers --
Route = Callable[[Request, list[tuple[int, int]]], int]


def make_trace_requests(records: Sequence[dict[str, Any]], block_size: int,
                        trace_block_tokens: int) -> list[Request]:
    """Trace records (Mooncake's fields) as requests; tokens as kvbm.lab.replay makes them."""
    from kvbm.lab.replay import trace_tokens

    out = []
    t0 = records[0].get("timestamp", 0) if records else 0
    for i, r in enumerate(records):
        ids = r["hash_ids"]
        if not ids:
            continue
        ts = r.get("timestamp")
        t = (ts - t0) / 1000.0 if isinstance(ts, int | float) and math.isfinite(ts) else i * 0.3
        n_in = r.get("input_length")
        if not isinstance(n_in, int) or n_in <= 0:
            n_in = len(ids) * trace_block_tokens
        n_out = r.get("output_length")
        out.append(Request(max(t, 0.0), trace_tokens(ids, block_size), len(ids), n_in,
                           n_out if isinstance(n_out, int) and n_out >= 0 else 0))
    return out

"""Forward a ZMQ event publisher (a vLLM worker) into JetStream, healing gaps on the way.

vLLM only speaks ZMQ (DESIGN.md §5). :class:`EventBridge` subscribes to one worker's PUB
socket and republishes every batch through a
:class:`~kvbm.events.nats.NatsEventPublisher` on ``<subject_prefix>.<worker>``, with the
vLLM sequence number in ``Kvbm-Source-Seq``:

- at start it asks the worker's replay socket for everything from seq 0 (the bridge's epoch
  starts with ``AllBlocksCleared``, so the stream must get the worker's whole history); if the
  worker's buffer no longer holds its beginning, what it does hold is forwarded and the loss
  is logged and counted (``unhealed``): routers under-report that worker until its blocks are
  stored again;
- a hole in the sequence is filled from the replay socket; what the replay no longer holds is
  a loss: ``AllBlocksCleared`` is forwarded (the stream then says less than the worker holds,
  never more) and the bridge goes on;
- a sequence that goes back means the worker restarted: ``AllBlocksCleared``, then its new
  history (from the replay socket when the first batches were missed).

Batches that are not valid events are counted and skipped (a batch lost that way is a hole
like any other). Run it with ``kvbm events bridge ZMQ_ENDPOINT NATS_URL``.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass
from typing import Any

from kvbm.deps import require
from kvbm.errors import EventDecodeError, InvalidArgumentError
from kvbm.events.jetstream import NatsConfig, check_worker
from kvbm.events.nats import NatsEventPublisher
from kvbm.events.records import AllMediaCleared
from kvbm.events.wire import END_SEQ, decode_batch, parse_frames, parse_replay_reply, replay_request

log = logging.getLogger(__name__)
_POLL_MS = 100


@dataclass(frozen=True, slots=True)
class BridgeStats:
    batches: int
    events: int
    #: batches fetched from the replay socket (at start and to fill holes)
    replayed: int
    #: holes in the worker's sequence, worker restarts, and batches the replay no longer had
    gaps: int
    restarts: int
    unhealed: int
    #: messages that were not batches (frames, payload), and events a batch held that broke
    #: the format
    bad_msgs: int
    skipped_events: int


def default_worker_name(endpoint: str) -> str:
    """A worker name made of the endpoint (``tcp://10.0.0.5:5557`` -> ``10_0_0_5_5557``)."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "_", endpoint.split("://", 1)[-1]).strip("_")
    return name[:128] or "worker"


class EventBridge:
    """ZMQ ``endpoint`` (+ ``replay_endpoint``) of one worker -> JetStream as ``worker``."""

    def __init__(self, endpoint: str, config: NatsConfig, *, worker: str | None = None,
                 replay_endpoint: str | None = None, topic: str = "",
                 replay_timeout_s: float = 5.0) -> None:
        for name, value in (("endpoint", endpoint), ("replay_endpoint", replay_endpoint)):
            if value is not None and (not isinstance(value, str) or "://" not in value):
                raise InvalidArgumentError(f"{name} must be a ZMQ endpoint such as "
                                           f"tcp://host:port, got {value!r}")
        if not isinstance(topic, str):
            raise InvalidArgumentError(f"topic must be a str, got {topic!r}")
        if isinstance(replay_timeout_s, bool) or not isinstance(replay_timeout_s, int | float) \
                or not 0 < replay_timeout_s < float("inf"):
            raise InvalidArgumentError(f"replay_timeout_s must be a finite number > 0, "
                                       f"got {replay_timeout_s!r}")
        self.worker = check_worker(worker if worker is not None
                                   else default_worker_name(endpoint))
        self._zmq: Any = require("zmq", "events", "kvbm events bridge")
        self.endpoint = endpoint
        self.replay_endpoint = replay_endpoint
        self.topic = topic.encode()
        self.replay_timeout_s = float(replay_timeout_s)
        self.publisher = NatsEventPublisher(config, self.worker)
        self._next: int | None = None  # the vLLM seq expected next
        self._live_last: int | None = None  # the seq of the last live (not replayed) batch
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._n = dict.fromkeys(("batches", "events", "replayed", "gaps", "restarts",
                                 "unhealed", "bad", "skipped"), 0)

    def stats(self) -> BridgeStats:
        with self._lock:
            n = self._n
            return BridgeStats(n["batches"], n["events"], n["replayed"], n["gaps"],
                               n["restarts"], n["unhealed"], n["bad"], n["skipped"])

    # ------------------------------------------------------------------ lifecycle --
    def start(self) -> None:
        """Run on a thread of its own (``close()`` stops it)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self.run, name=f"kvbm-bridge-{self.worker}",
                                            daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def close(self, timeout: float = 10.0) -> None:
        """Stop forwarding, publish what is queued (at most ``timeout`` s), disconnect."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self.publisher.close(timeout)

    def run(self) -> None:
        """Forward until :meth:`stop` (blocking)."""
        zmq = self._zmq
        ctx = zmq.Context.instance()
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.RCVHWM, 0)  # queue while a replay is read: never drop here
        sub.setsockopt(zmq.SUBSCRIBE, self.topic)
        sub.connect(self.endpoint)
        try:
            # subscribed first, then the replay: nothing published in between is missed
            if self.replay_endpoint is not None:
                self._catch_up(ctx, 0)
            while not self._stop.is_set():
                if not sub.poll(_POLL_MS):
                    continue
                frames = sub.recv_multipart()
                try:
                    _topic, seq, payload = parse_frames(frames)
                except EventDecodeError as e:
                    self._count("bad")
                    log.warning("bridge %s: bad message: %s", self.worker, e)
                    continue
                self._on_live(ctx, seq, payload)
        finally:
            sub.close(linger=0)

    # ------------------------------------------------------------------- sequence --
    def _on_live(self, ctx: Any, seq: int, payload: bytes) -> None:
        last, self._live_last = self._live_last, seq
        if self._next is not None and seq < self._next and (last is None or seq > last):
            return  # a live copy of a batch the replay forwarded already
        if self._next is not None and seq < self._next:
            # vLLM counts from 0 per process: the live sequence going back is a new process
            log.warning("bridge %s: worker restarted (seq %d after %d)", self.worker, seq,
                        self._next - 1)
            self._count("restarts")
            self.publisher.publish([AllMediaCleared()])
            self._next = None
            if seq > 0 and self.replay_endpoint is not None:
                self._catch_up(ctx, 0)
        elif self._next is not None and seq > self._next:
            self._count("gaps")
            log.warning("bridge %s: seq %d after %d: filling the hole from the replay socket",
                        self.worker, seq, self._next - 1)
            if self.replay_endpoint is not None:
                self._catch_up(ctx, self._next)
            if self._next is not None and seq > self._next:
                self._lost(self._next, seq)  # the replay could not fill it
        if self._next is None:
            if seq > 0:
                log.warning("bridge %s: batches before seq %d are not in the stream (no "
                            "replay of them)", self.worker, seq)
                self._count("unhealed")
            self._next = seq
        if seq == self._next:
            self._forward(seq, payload)

    def _catch_up(self, ctx: Any, first: int) -> None:
        """Forward what the replay socket holds from ``first`` on (the batches from
        ``self._next``; those before it were forwarded already)."""
        zmq = self._zmq
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(self.replay_endpoint)
        deadline = time.monotonic() + self.replay_timeout_s
        try:
            dealer.send_multipart(replay_request(first))
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or self._stop.is_set():
                    log.warning("bridge %s: the replay socket %s did not finish answering in "
                                "%.1f s", self.worker, self.replay_endpoint,
                                self.replay_timeout_s)
                    return
                if not dealer.poll(min(_POLL_MS, int(left * 1000) + 1)):
                    continue
                try:
                    seq, payload = parse_replay_reply(dealer.recv_multipart())
                except EventDecodeError as e:
                    self._count("bad")
                    log.warning("bridge %s: bad replay reply: %s", self.worker, e)
                    continue
                if seq == END_SEQ or payload is None:
                    if self._next is None:
                        self._next = first  # nothing buffered from there: nothing happened
                    return
                self._count("replayed")
                if self._next is None:
                    if seq > first:
                        log.warning("bridge %s: the replay buffer starts at seq %d; batches "
                                    "%d..%d are not in the stream", self.worker, seq, first,
                                    seq - 1)
                        self._count("unhealed")
                    self._next = seq
                if seq < self._next:
                    continue
                if seq > self._next:
                    self._lost(self._next, seq)
                self._forward(seq, payload)
        finally:
            dealer.close(linger=0)

    def _lost(self, first: int, upto: int) -> None:
        log.warning("bridge %s: batches %d..%d are lost: forwarding AllBlocksCleared",
                    self.worker, first, upto - 1)
        self._count("unhealed")
        self.publisher.publish([AllMediaCleared()])
        self._next = upto

    def _forward(self, seq: int, payload: bytes) -> None:
        self._next = seq + 1
        try:
            batch = decode_batch(payload)
        except EventDecodeError as e:
            log.warning("bridge %s: batch %d is not events (%s): treated as lost", self.worker,
                        seq, e)
            self._count("bad")
            self._lost(seq, seq + 1)
            return
        with self._lock:
            self._n["batches"] += 1
            self._n["events"] += len(batch.events)
            self._n["skipped"] += batch.skipped
        if batch.events:
            self.publisher.publish(batch.events, source_seq=seq)

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._n[key] += n

"""Publishes cache events on ZMQ in vLLM 0.32's wire format, without ever blocking the engine.

``publish(events)`` checks the events, converts them to their wire maps and appends them to a
bounded queue; a thread batches the queue every ``batch_interval_s`` into numbered batches
(seq from 0), sends each as ``[topic, seq, payload]`` and keeps the last ``buffer_steps`` for
replay (:mod:`kvbm.events.replay`).

Nothing is lost silently:

- **Queue overflow** (the engine publishes faster than the thread sends): the events are
  dropped and counted, and the thread then publishes ``AllMediaCleared`` (on the wire an
  ``AllBlocksCleared`` that says every medium) followed by the
  whole current state from ``snapshot()`` (a *resync*); without a snapshot the clear alone
  (a router then under-claims this worker rather than over-claims it).
- **A subscriber at its high-water mark**: the socket is an XPUB with ``XPUB_NODROP``, so a
  full pipe refuses the send (``EAGAIN``) instead of dropping the message for that
  subscriber alone. The refused batch keeps its seq and its place in the replay buffer, the
  refusal is counted, and a resync follows once sends go through again. The price of
  ``NODROP``: a subscriber that stops reading holds up every subscriber once ``hwm`` messages
  are queued for it; ``hwm`` (100k batches) is meant to be reached only by a dead peer.

A subscriber that fell behind sees a gap in the seqs, asks the replay socket for the missing
batches, and, when the buffer no longer holds them, relies on the resync (or drops what it
knows of this worker).

``snapshot`` is called on the publisher thread, after the queue was emptied: it must be safe
to call while the owner keeps changing its state, and return every block of every medium.
An event published while it runs is also sent after it; stored/removed are idempotent per
(hash, medium), so the subscriber ends in the owner's state.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from kvbm.config import EventsConfig
from kvbm.deps import require
from kvbm.errors import ClosedError, ConfigError, InvalidArgumentError, KvbmError
from kvbm.events.endpoints import is_bind_endpoint, offset_endpoint
from kvbm.events.records import AllMediaCleared, KVEvent
from kvbm.events.replay import ReplayBuffer, ReplayServer
from kvbm.events.wire import event_to_wire, pack_batch

log = logging.getLogger(__name__)

#: How long close() lets the sockets deliver what is queued in them, in milliseconds.
_LINGER_MS = 1000
#: While sends are refused, a resync is tried at most this often, in seconds.
_RESYNC_RETRY_S = 1.0


@dataclass(frozen=True)
class PublisherStats:
    """Counters of a :class:`ZmqEventPublisher` (monotonic except ``queued_events``)."""

    next_seq: int  #: seq of the next batch (every batch so far took one, refused or not)
    batches_sent: int
    events_sent: int
    queued_events: int
    overflows: int  #: publish() calls that found the queue full
    events_dropped: int  #: events dropped by overflows (a resync replaced them)
    hwm_refusals: int  #: batches the PUB socket refused (a subscriber at its high-water mark)
    resyncs: int  #: full re-announcements sent
    snapshot_errors: int  #: snapshot() raised, or returned something that is not an event
    replay_requests: int
    replay_bad_requests: int
    replay_aborted: int


class ZmqEventPublisher:
    """Cache events on a ZMQ PUB (XPUB) socket and a ROUTER replay socket. Thread-safe
    :meth:`publish`; :meth:`close` (or ``with``) stops the thread and releases the ports."""

    def __init__(self, config: EventsConfig, *,
                 snapshot: Callable[[], Sequence[KVEvent]] | None = None) -> None:
        if not isinstance(config, EventsConfig):
            raise InvalidArgumentError(f"config must be an EventsConfig, got "
                                       f"{type(config).__name__}")
        if snapshot is not None and not callable(snapshot):
            raise InvalidArgumentError("snapshot must be a callable returning events")
        zmq = require("zmq", "events", "the ZMQ event publisher")
        self._zmq = zmq
        self._cfg = config
        self._snapshot = snapshot
        self._topic = config.topic.encode()
        self._ctx = zmq.Context()
        self._pub: Any = None
        self._router: Any = None
        try:
            self._endpoint, self._replay_endpoint = self._open_sockets()
        except BaseException:
            self._close_sockets(0)
            raise
        self._buffer = ReplayBuffer(config.buffer_steps)
        self._replay = (ReplayServer(self._router, zmq, self._topic, self._buffer,
                                     self._unreachable_replay if snapshot is not None else None)
                        if self._router is not None else None)
        # Shared with the thread, under _cond's lock:
        self._cond = threading.Condition()
        self._chunks: deque[list[dict[str, object]]] = deque()
        self._queued = 0
        self._busy = False  # the thread holds events taken off the queue
        self._resync_due = False
        self._closed = False
        self._overflows = 0
        self._dropped = 0
        # Touched by the thread only:
        self._seq = 0
        self._batches = self._sent = self._refusals = self._resyncs = self._snap_errors = 0
        self._refused = False  # the last send was refused: sockets are stalled
        self._resync_not_before = 0.0
        self._thread = threading.Thread(target=self._run, name="kvbm-events", daemon=True)
        self._thread.start()

    # --- public ------------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        """The PUB endpoint, with the port the system chose where the config said ``*``."""
        return self._endpoint

    @property
    def replay_endpoint(self) -> str | None:
        return self._replay_endpoint

    def publish(self, events: Sequence[KVEvent]) -> None:
        """Queue ``events`` for publishing; never blocks. Every event is checked first (an
        invalid one raises and nothing is queued); a full queue drops and counts them and
        schedules a resync."""
        if isinstance(events, str | bytes) or not isinstance(events, Sequence):
            raise InvalidArgumentError(f"events must be a sequence of events, got "
                                       f"{type(events).__name__}")
        if self._closed:
            raise ClosedError("the event publisher is closed")
        wire = [event_to_wire(e) for e in events]
        if not wire:
            return
        with self._cond:
            if self._closed:
                raise ClosedError("the event publisher is closed")
            if self._queued + len(wire) > self._cfg.max_queue_size:
                self._overflows += 1
                self._dropped += self._queued + len(wire)
                self._chunks.clear()  # a resync replaces them all
                self._queued = 0
                if not self._resync_due:
                    log.warning("event queue full (%d events): events dropped, a resync "
                                "(AllBlocksCleared + the whole state) follows",
                                self._cfg.max_queue_size)
                self._resync_due = True
                return
            self._chunks.append(wire)
            self._queued += len(wire)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every event published so far was sent (or dropped and resynced);
        ``False`` if ``timeout`` seconds passed first."""
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(
                timeout, int | float) or not 0 <= timeout < float("inf")):
            raise InvalidArgumentError(f"timeout must be None or a finite number >= 0, "
                                       f"got {timeout!r}")
        with self._cond:
            return self._cond.wait_for(
                lambda: self._closed or not (self._queued or self._busy or self._resync_due),
                timeout)

    @property
    def stats(self) -> PublisherStats:
        replay = self._replay
        with self._cond:
            return PublisherStats(
                next_seq=self._seq, batches_sent=self._batches, events_sent=self._sent,
                queued_events=self._queued, overflows=self._overflows,
                events_dropped=self._dropped, hwm_refusals=self._refusals,
                resyncs=self._resyncs, snapshot_errors=self._snap_errors,
                replay_requests=replay.requests if replay else 0,
                replay_bad_requests=replay.bad_requests if replay else 0,
                replay_aborted=replay.aborted if replay else 0)

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued, stop the thread, close the sockets (ports released)."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("event publisher thread still running %.1f s after close", timeout)

    def __enter__(self) -> ZmqEventPublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- sockets -----------------------------------------------------------------------------

    def _open_sockets(self) -> tuple[str, str | None]:
        zmq, cfg = self._zmq, self._cfg
        endpoint = offset_endpoint(cfg.endpoint, cfg.data_parallel_rank)
        self._pub = self._ctx.socket(zmq.XPUB)
        self._pub.setsockopt(zmq.SNDHWM, cfg.hwm)
        self._pub.setsockopt(zmq.XPUB_NODROP, 1)  # a full pipe refuses, never drops
        replay = None
        try:
            if cfg.bind if cfg.bind is not None else is_bind_endpoint(endpoint):
                self._pub.bind(endpoint)
                endpoint = self._pub.getsockopt(zmq.LAST_ENDPOINT).decode()
            else:
                self._pub.connect(endpoint)
            if cfg.replay_endpoint is not None:
                self._router = self._ctx.socket(zmq.ROUTER)
                self._router.setsockopt(zmq.ROUTER_MANDATORY, 1)
                self._router.setsockopt(zmq.SNDHWM, cfg.buffer_steps + 2)  # a whole replay
                self._router.bind(offset_endpoint(cfg.replay_endpoint, cfg.data_parallel_rank))
                replay = self._router.getsockopt(zmq.LAST_ENDPOINT).decode()
        except zmq.ZMQError as e:
            raise ConfigError(f"cannot open the events endpoints ({endpoint!r}, "
                              f"{cfg.replay_endpoint!r}): {e}") from None
        return endpoint, replay

    def _close_sockets(self, linger_ms: int) -> None:
        for sock in (self._pub, self._router):
            if sock is not None:
                sock.close(linger=linger_ms)
        self._ctx.term()

    # --- the thread --------------------------------------------------------------------------

    def _run(self) -> None:
        zmq = self._zmq
        poller = zmq.Poller()
        poller.register(self._pub, zmq.POLLIN)  # subscriptions: read and forget
        if self._router is not None:
            poller.register(self._router, zmq.POLLIN)
        interval_ms = self._cfg.batch_interval_s * 1000
        try:
            while True:
                with self._cond:
                    stopping = self._closed
                try:
                    ready = dict(poller.poll(0 if stopping else interval_ms))
                    if self._pub in ready:
                        self._drain_subscriptions()
                    if self._replay is not None and self._router in ready:
                        self._replay.serve()
                    if not stopping:
                        self._maybe_resync()
                    self._send_queued()
                except Exception:  # a bug must not stop publishing: log it and go on
                    log.exception("event publisher thread error")
                    time.sleep(self._cfg.batch_interval_s)
                if stopping:
                    break
        finally:
            self._close_sockets(_LINGER_MS)

    def _drain_subscriptions(self) -> None:
        zmq = self._zmq
        for _ in range(1024):
            try:
                self._pub.recv(zmq.NOBLOCK)
            except zmq.Again:
                return

    def _send_queued(self) -> None:
        with self._cond:
            if not self._queued:
                self._cond.notify_all()
                return
            chunks, self._chunks = self._chunks, deque()
            self._queued = 0
            self._busy = True
        try:
            events = [e for chunk in chunks for e in chunk]
            step = self._cfg.max_batch_events
            for i in range(0, len(events), step):
                self._send_batch(events[i:i + step])
        finally:
            with self._cond:
                self._busy = False
                self._cond.notify_all()

    def _send_batch(self, wire: list[dict[str, object]]) -> bool:
        """Number, buffer and send one batch; ``False`` when the PUB socket refused it."""
        zmq = self._zmq
        seq = self._seq
        payload = pack_batch(time.time(), wire, self._cfg.data_parallel_rank)
        self._buffer.append(seq, payload)
        with self._cond:
            self._seq = seq + 1
        try:
            self._pub.send_multipart([self._topic, seq.to_bytes(8, "big"), payload],
                                     zmq.NOBLOCK)
        except zmq.Again:
            with self._cond:
                self._refusals += 1
                if not self._refused:
                    log.warning("a subscriber is at its high-water mark (%d): batch %d "
                                "refused (kept for replay); a resync follows",
                                self._cfg.hwm, seq)
                self._refused = True
                self._resync_due = True
            return False
        with self._cond:
            self._refused = False
            self._batches += 1
            self._sent += len(wire)
        return True

    def _unreachable_replay(self) -> None:
        """A subscriber asked for batches no longer held (it joined late, or fell too far
        behind): its gap cannot heal by replay, so the whole state is re-announced."""
        with self._cond:
            if not self._resync_due:
                log.info("a replay request starts before the oldest batch held: resync")
            self._resync_due = True

    def _maybe_resync(self) -> None:
        with self._cond:
            if not self._resync_due or time.monotonic() < self._resync_not_before:
                return
        # AllBlocksCleared goes first and alone: if it is refused the sockets are still
        # stalled, and the snapshot (possibly large) is not taken in vain.
        if not self._send_batch([event_to_wire(AllMediaCleared())]):
            self._resync_not_before = time.monotonic() + _RESYNC_RETRY_S
            return
        with self._cond:
            # Emptied before the snapshot is read: every change queued so far is in it
            self._dropped += self._queued
            self._chunks.clear()
            self._queued = 0
            self._resync_due = False
            self._busy = True
        try:
            wire = self._snapshot_wire()
            if wire is None:
                return  # retried: _resync_due is set again
            step = self._cfg.max_batch_events
            for i in range(0, len(wire), step):
                self._send_batch(wire[i:i + step])
            with self._cond:
                self._resyncs += 1
            log.info("resync sent: AllBlocksCleared + %d events", len(wire))
        finally:
            with self._cond:
                self._busy = False

    def _snapshot_wire(self) -> list[dict[str, object]] | None:
        if self._snapshot is None:
            return []
        try:
            events = list(self._snapshot())
        except Exception:
            log.exception("snapshot() failed: the resync is retried")
            with self._cond:
                self._snap_errors += 1
                self._resync_due = True
            self._resync_not_before = time.monotonic() + _RESYNC_RETRY_S
            return None
        wire = []
        for e in events:
            try:
                wire.append(event_to_wire(e))
            except KvbmError as err:
                with self._cond:
                    self._snap_errors += 1
                log.warning("snapshot() returned an invalid event, left out: %s", err)
        return wire

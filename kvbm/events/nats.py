"""Publish one worker's cache events to a NATS JetStream stream (docs/events-nats.md).

:class:`NatsEventPublisher` never blocks its caller: ``publish()`` checks, converts and queues
(bounded); a thread of its own (nats-py on an asyncio loop) coalesces the queue into batches
(vLLM's msgpack, split to fit the server's message size) and publishes them one at a time on
``<subject_prefix>.<worker>``, waiting for each acknowledgement, so that the stream holds the
worker's batches in order and without holes; a publish whose acknowledgement is lost is sent
again with the same ``Nats-Msg-Id`` (the server stores it once). Every epoch (one per
publisher object) starts with ``AllBlocksCleared``. A full queue is dropped, counted and
followed by ``AllBlocksCleared`` and the worker's whole state (a *resync*), as is a consumer's
request on ``<subject_prefix>.resync.<worker>``. The state comes from ``snapshot()`` where the
owner gives one (the contract of :class:`~kvbm.events.publisher.ZmqEventPublisher`'s), else
from a :class:`~kvbm.events.ledger.Ledger` of the events the publisher was given.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from kvbm.deps import require
from kvbm.errors import ClosedError, InvalidArgumentError, KvbmError
from kvbm.events.jetstream import (
    NatsConfig,
    NatsPublisherStats,
    Wire,
    batch_payloads,
    check_timeout,
    check_worker,
    msg_headers,
    new_epoch,
    parse_resync_request,
)
from kvbm.events.ledger import Ledger
from kvbm.events.nats_client import LoopThread, connect_until, ensure_stream
from kvbm.events.records import (
    AllBlocksCleared,
    AllMediaCleared,
    BlockRemoved,
    BlockStored,
    KVEvent,
)
from kvbm.events.wire import event_to_wire

if TYPE_CHECKING:
    from nats.aio.client import Client as NatsClient
    from nats.aio.msg import Msg

log = logging.getLogger(__name__)

#: Room left in a message for its headers and the protocol line (NATS counts both).
_HEADROOM = 1024
_RETRY_MIN_S, _RETRY_MAX_S = 0.05, 1.0


class NatsEventPublisher:
    """Publishes ``worker``'s events to JetStream. Thread-safe; ``publish`` never blocks.

    ``snapshot``: returns every block of every medium the worker holds (stores), for a
    resync; without it the publisher keeps a ledger of the events it is given instead.
    """

    def __init__(self, config: NatsConfig, worker: str, *,
                 data_parallel_rank: int | None = None,
                 snapshot: Callable[[], Sequence[KVEvent]] | None = None) -> None:
        if not isinstance(config, NatsConfig):
            raise InvalidArgumentError(f"config must be a NatsConfig, got {config!r}")
        check_worker(worker)
        if data_parallel_rank is not None and (type(data_parallel_rank) is not int
                                               or not 0 <= data_parallel_rank < 1 << 31):
            raise InvalidArgumentError(f"data_parallel_rank must be None or an int >= 0, "
                                       f"got {data_parallel_rank!r}")
        if snapshot is not None and not callable(snapshot):
            raise InvalidArgumentError("snapshot must be a callable returning events")
        require("nats", "nats", "NatsEventPublisher")
        self.config = config
        self.worker = worker
        self.subject = config.subject(worker)
        self._rank = data_parallel_rank
        self.epoch = new_epoch()
        self._lock = threading.Condition()
        self._snapshot = snapshot
        self._ledger: Ledger | None = Ledger() if snapshot is None else None
        # A new epoch is a clean slate: consumers drop what an earlier one announced.
        self._pending: list[Wire] = [event_to_wire(AllMediaCleared())]
        self._pending_source: int | None = None
        self._resync = False
        self._busy = True  # the opening clear is queued
        self._poked = True
        self._closing = False
        self._closed = False
        self._seq = 0
        self._last_resync_seq = 0
        self._resync_not_before = 0.0
        self._n = dict.fromkeys(("msgs", "events", "overflows", "dropped", "resyncs", "requests",
                                 "retries", "duplicates", "refused", "snapshot_errors"), 0)
        self._nc: NatsClient | None = None
        self._wake: asyncio.Event | None = None
        self._stop: asyncio.Event | None = None  # set by close(): stop connecting
        self._loop = LoopThread(f"kvbm-nats-pub-{worker}")
        self._task = self._loop.submit(self._run())

    # ------------------------------------------------------------------ caller side --
    def publish(self, events: Sequence[KVEvent], *, source_seq: int | None = None) -> None:
        """Queue ``events`` (checked first; nothing is queued when one is malformed).
        ``source_seq``: the upstream sequence number they came with (the bridge's vLLM seq),
        carried in the ``Kvbm-Source-Seq`` header."""
        if isinstance(events, BlockStored | BlockRemoved | AllBlocksCleared) or not isinstance(
                events, Sequence):
            raise InvalidArgumentError("publish takes a sequence of events")
        wire = [event_to_wire(e) for e in events]  # checked and converted once, here
        if source_seq is not None and (type(source_seq) is not int
                                       or not 0 <= source_seq < 1 << 64):
            raise InvalidArgumentError(f"source_seq must be None or an int in [0, 2**64), "
                                       f"got {source_seq!r}")
        with self._lock:
            if self._closing:
                raise ClosedError("NatsEventPublisher is closed")
            if self._ledger is not None:
                self._ledger.apply(events)
            if source_seq is not None:
                self._pending_source = source_seq
            if self._resync and self._ledger is not None:
                pass  # the resync's snapshot is taken later, under this lock: it has them
            elif len(self._pending) + len(events) > self.config.max_queue_events:
                self._n["overflows"] += 1
                self._n["dropped"] += len(self._pending) + len(events)
                log.warning("nats publisher %s: queue full (%d events): dropped, resyncing",
                            self.worker, len(self._pending) + len(events))
                self._pending = []
                self._resync = True
            else:
                self._pending.extend(wire)
            self._busy = True
            # one wake-up per idle period: a publish while the loop is sending is picked up
            # by its next look at the queue (a wake-up per call costs a syscall)
            poke, self._poked = not self._poked, True
        if poke:
            self._poke()

    def resync(self) -> None:
        """Publish ``AllBlocksCleared`` and the worker's whole state (from the ledger)."""
        with self._lock:
            if self._closing:
                raise ClosedError("NatsEventPublisher is closed")
            self._resync = self._busy = self._poked = True
        self._poke()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything queued so far is acknowledged by the server; False after
        ``timeout`` seconds (the server is away: it stays queued)."""
        check_timeout(timeout)
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._busy and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(left)
            return not self._busy

    def stats(self) -> NatsPublisherStats:
        with self._lock:
            n = self._n
            nc = self._nc
            return NatsPublisherStats(
                self.epoch, self._seq, n["msgs"], n["events"], len(self._pending),
                n["overflows"], n["dropped"], n["resyncs"], n["requests"], n["retries"],
                n["duplicates"], n["refused"], n["snapshot_errors"],
                bool(nc is not None and nc.is_connected))

    def close(self, timeout: float = 10.0) -> None:
        """Publish what is queued (waiting at most ``timeout`` seconds), then disconnect."""
        check_timeout(timeout)
        with self._lock:
            if self._closing:
                return
            self._closing = True
        self._poke()
        try:
            self._task.result(timeout)
        except Exception as e:  # a timeout, or the task's own failure: stop anyway
            log.warning("nats publisher %s: closed with %d events unpublished (%s)",
                        self.worker, len(self._pending), type(e).__name__)
            self._task.cancel()
        finally:
            if self._nc is not None:
                try:
                    self._loop.run(self._nc.close(), 2.0)
                except Exception as e:
                    log.debug("nats publisher %s: close: %s", self.worker, e)
            self._loop.stop()
            with self._lock:
                self._closed = True
                self._lock.notify_all()

    def __enter__(self) -> NatsEventPublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _poke(self) -> None:
        wake = self._wake
        if wake is not None:
            self._loop.loop.call_soon_threadsafe(wake.set)
        if self._closing and self._stop is not None:
            self._loop.loop.call_soon_threadsafe(self._stop.set)

    # -------------------------------------------------------------------- loop side --
    async def _run(self) -> None:
        self._wake = asyncio.Event()
        self._wake.set()  # the epoch's first AllBlocksCleared is queued already
        self._stop = asyncio.Event()
        if self._closing:
            self._stop.set()
        nc = self._nc = await connect_until(self.config, f"kvbm-publisher-{self.worker}",
                                            self._stop)
        if nc is None:
            return
        js = nc.jetstream(timeout=self.config.timeout_s)
        await nc.subscribe(self.config.resync_subject(self.worker), cb=self._on_request)
        await self._ensure_stream(js)
        while True:
            await self._wake.wait()
            self._wake.clear()
            while True:
                with self._lock:
                    events, source, snap = self._take()
                    if not events and not snap:
                        # a resync put off (its snapshot failed) keeps flush() waiting
                        self._busy, self._poked = self._resync, False
                        self._lock.notify_all()
                        if self._closing:
                            return
                        break
                if snap:
                    # off the loop: an owner's snapshot may wait for its thread
                    taken = await asyncio.get_running_loop().run_in_executor(
                        None, self._take_snapshot)
                    if taken is None:  # failed: retried in a while, the queue goes on
                        with self._lock:
                            self._resync = self._busy = True
                            self._resync_not_before = time.monotonic() + _RETRY_MAX_S
                        asyncio.get_running_loop().call_later(_RETRY_MAX_S, self._wake.set)
                        continue
                    events = taken
                for payload, n in batch_payloads(events, self._rank,
                                                 nc.max_payload - _HEADROOM):
                    if payload is None:
                        log.error("nats publisher %s: an event larger than the server's "
                                  "message size was dropped; resyncing", self.worker)
                        with self._lock:
                            self._n["refused"] += 1
                            self._resync = True
                    elif not await self._send(js, payload, n, source):
                        return  # closing with the server away: give up the rest

    def _take(self) -> tuple[list[Wire], int | None, bool]:
        """What to publish next (under the lock): the queue, or ``([], source, True)`` when a
        resync from ``snapshot()`` is due (taken outside the lock)."""
        source, self._pending_source = self._pending_source, None
        if self._resync and time.monotonic() >= self._resync_not_before:
            self._resync = False
            self._n["resyncs"] += 1
            self._last_resync_seq = self._seq
            self._pending = []  # the state announced now includes them
            if self._ledger is not None:
                return [event_to_wire(e) for e in self._ledger.snapshot_events()], source, False
            return [], source, True
        events, self._pending = self._pending, []
        return events, source, False

    def _take_snapshot(self) -> list[Wire] | None:
        """``AllBlocksCleared`` and the owner's snapshot; ``None`` when ``snapshot()`` failed
        (an invalid event in it is left out and counted)."""
        assert self._snapshot is not None
        try:
            events = list(self._snapshot())
        except Exception as err:  # the owner's trouble must not stop the publisher
            log.warning("nats publisher %s: snapshot() failed (%s): the resync is retried",
                        self.worker, err)
            with self._lock:
                self._n["snapshot_errors"] += 1
            return None
        wire = [event_to_wire(AllMediaCleared())]
        for ev in events:
            try:
                wire.append(event_to_wire(ev))
            except KvbmError as err:
                log.warning("nats publisher %s: snapshot() gave an invalid event, left out: "
                            "%s", self.worker, err)
                with self._lock:
                    self._n["snapshot_errors"] += 1
        return wire

    async def _ensure_stream(self, js: Any) -> None:
        """Create the stream (at start, and when a publish finds none: deleted, or a server
        that lost its store); a failure is retried by the sends."""
        try:
            await ensure_stream(js, self.config)
        except Exception as e:
            log.debug("nats publisher %s: stream: %s", self.worker, e)

    async def _send(self, js: Any, payload: bytes, n_events: int, source: int | None) -> bool:
        """Publish one message until the server acknowledges it; False when closing gave
        up on it."""
        errors = require("nats.js.errors", "nats", "NatsEventPublisher")
        headers = msg_headers(self.worker, self.epoch, self._seq, source)
        delay = _RETRY_MIN_S
        deadline: float | None = None
        while True:
            try:
                ack = await js.publish(self.subject, payload, timeout=self.config.timeout_s,
                                       headers=dict(headers))
            except errors.APIError as e:
                if isinstance(e, errors.ServiceUnavailableError) or (e.code or 0) >= 500:
                    pass  # JetStream is restarting or electing a leader: retry
                else:
                    # refused (too large, wrong stream ...): the seq is not used, the
                    # consumers' state is made whole by a resync
                    log.error("nats publisher %s: message refused: %s", self.worker, e)
                    with self._lock:
                        self._n["refused"] += 1
                        self._resync = True
                    return True
            except errors.NoStreamResponseError:
                await self._ensure_stream(js)
            except Exception as e:  # timeout, reconnecting: send again
                log.debug("nats publisher %s: publish: %s", self.worker, e)
            else:
                with self._lock:
                    self._seq += 1
                    self._n["msgs"] += 1
                    self._n["events"] += n_events
                    if ack.duplicate:
                        self._n["duplicates"] += 1
                return True
            with self._lock:
                self._n["retries"] += 1
                closing = self._closing
            if closing:
                deadline = deadline or time.monotonic() + self.config.timeout_s
                if time.monotonic() > deadline:
                    return False
            await asyncio.sleep(delay)
            delay = min(delay * 2, _RETRY_MAX_S)

    async def _on_request(self, msg: Msg) -> None:
        """A consumer found a hole in this worker's sequence: re-announce, unless a resync
        it has not seen yet already covers it."""
        epoch, seq = parse_resync_request(msg.data)
        with self._lock:
            self._n["requests"] += 1
            if epoch is not None and epoch != self.epoch:
                return  # about an older epoch: ours began with AllBlocksCleared
            if seq is not None and seq < self._last_resync_seq and self._n["resyncs"]:
                return  # a later resync is in the stream already
            self._resync = self._busy = self._poked = True
        assert self._wake is not None
        self._wake.set()

"""Consume every worker's cache events from JetStream into a sink (a router's indexer).

:class:`JetStreamConsumer` pulls ``<subject_prefix>.*`` and calls ``sink(worker, events)`` in
each worker's order, judging each message by its ``Kvbm-Epoch`` / ``Kvbm-Seq`` headers
(:func:`~kvbm.events.checkpoint.advance`): applied, skipped as seen before, or — a hole: the
stream's limits dropped events, or this consumer started late — the worker is cleared in the
sink, the message applied, and the worker's publisher asked for a resync on
``<subject_prefix>.resync.<worker>`` (again every few seconds until one arrives).

With a durable name it survives a restart: it keeps a :class:`~kvbm.events.ledger.Ledger` per
worker, checkpoints them (:mod:`kvbm.events.checkpoint`) every ``checkpoint_interval_s`` /
``checkpoint_every`` messages and only then acknowledges what the checkpoint covers; a
restarted consumer replays its checkpoint into the sink and resumes after it, one without a
checkpoint replays the stream. Messages that are not events are counted and skipped.
See docs/events-nats.md.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from kvbm.deps import require
from kvbm.errors import ClosedError, EventDecodeError, InvalidArgumentError, KvbmError
from kvbm.events import checkpoint
from kvbm.events.checkpoint import Checkpoint, Step, WorkerCursor, advance
from kvbm.events.jetstream import (
    ConsumerStats,
    NatsConfig,
    check_timeout,
    check_worker,
    parse_headers,
    resync_request,
)
from kvbm.events.ledger import Ledger
from kvbm.events.nats_client import LoopThread, bind_pull_consumer, connect_until, ensure_stream
from kvbm.events.records import AllMediaCleared, KVEvent
from kvbm.events.wire import decode_batch

if TYPE_CHECKING:
    from nats.aio.msg import Msg

log = logging.getLogger(__name__)

Sink = Callable[[str, list[KVEvent]], None]
_FETCH = 256
_RESYNC_RETRY_S = 3.0


class JetStreamConsumer:
    """Feeds ``sink(worker, events)`` from the stream. ``durable``: the consumer's name, which
    a restart must reuse to resume (default ``config.durable``; ``None``: no durable state,
    read the whole stream). Starts at once; ``close()`` checkpoints and stops."""

    _UNSET: Any = object()

    def __init__(self, config: NatsConfig, sink: Sink, *, durable: str | None = _UNSET) -> None:
        if not isinstance(config, NatsConfig):
            raise InvalidArgumentError(f"config must be a NatsConfig, got {config!r}")
        if not callable(sink):
            raise InvalidArgumentError(f"sink must be callable, got {sink!r}")
        durable = config.durable if durable is JetStreamConsumer._UNSET else durable
        if durable is not None:
            check_worker(durable)  # same alphabet as a subject token
        require("nats", "nats", "JetStreamConsumer")
        self.config = config
        self.durable = durable
        self._name = durable or f"kvbm-reader-{secrets.token_hex(6)}"
        self._sink = sink
        self._lock = threading.Condition()
        self._cursors: dict[str, WorkerCursor] = {}
        self._ledgers: dict[str, Ledger] | None = {} if durable else None
        self._requested: dict[str, float] = {}  # worker -> last resync request (monotonic)
        self._n = dict.fromkeys(("msgs", "events", "duplicates", "gaps", "requests", "bad",
                                 "skipped", "rejected", "checkpoints", "restored"), 0)
        self._last_seq = 0  # the last stream sequence handled (applied or skipped)
        self._unacked: Msg | None = None
        self._since_checkpoint = 0
        self._stream_created: str | None = None  # the stream's incarnation, once known
        self._ready = False
        self._closing = False
        self._nc: Any = None
        self._stop: asyncio.Event | None = None  # set by close(): stop connecting
        self._loop = LoopThread(f"kvbm-nats-consumer-{self._name}")
        self._task = self._loop.submit(self._run())

    # ------------------------------------------------------------------ caller side --
    @property
    def running(self) -> bool:
        """True until :meth:`close` (or a failure of its thread, logged)."""
        return not self._task.done()

    def cursors(self) -> dict[str, WorkerCursor]:
        with self._lock:
            return dict(self._cursors)

    def stats(self) -> ConsumerStats:
        with self._lock:
            n = self._n
            return ConsumerStats(n["msgs"], n["events"], n["duplicates"], n["gaps"],
                                 n["requests"], n["bad"], n["skipped"], n["rejected"],
                                 n["checkpoints"], n["restored"], self._last_seq)

    def wait_caught_up(self, timeout: float = 30.0) -> bool:
        """Wait until every message the stream holds now has been handled (the consumer is
        connected and has read up to the stream's last sequence); False after ``timeout``."""
        check_timeout(timeout)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if self._task.done():
                raise ClosedError("JetStreamConsumer stopped")
            try:
                last: int | None = self._loop.run(self._stream_last_seq(),
                                                  max(0.1, min(5.0, left)))
            except Exception:  # the server is away: ask again
                last = None
            with self._lock:
                if last is not None and self._ready and self._last_seq >= last:
                    return True
                if left <= 0:
                    return False
                self._lock.wait(min(left, 0.2))

    def close(self, timeout: float = 10.0) -> None:
        """Stop pulling, checkpoint (durable) and acknowledge, disconnect."""
        check_timeout(timeout)
        with self._lock:
            if self._closing:
                return
            self._closing = True
            self._lock.notify_all()
        if self._stop is not None:
            self._loop.loop.call_soon_threadsafe(self._stop.set)
        try:
            self._task.result(timeout)
        except Exception as e:
            log.warning("nats consumer %s: stopped uncleanly (%s)", self._name, e)
            self._task.cancel()
        finally:
            if self._nc is not None:
                try:
                    self._loop.run(self._nc.close(), 2.0)
                except Exception as e:
                    log.debug("nats consumer %s: close: %s", self._name, e)
            self._loop.stop()

    def __enter__(self) -> JetStreamConsumer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------------------- loop side --
    async def _stream_last_seq(self) -> int:
        js = self._nc.jetstream(timeout=self.config.timeout_s)
        info = await js.stream_info(self.config.stream)
        return int(info.state.last_seq)

    async def _run(self) -> None:
        self._stop = asyncio.Event()
        if self._closing:
            self._stop.set()
        self._nc = await connect_until(self.config, f"kvbm-consumer-{self._name}", self._stop)
        if self._nc is None:
            return
        js = self._nc.jetstream(timeout=self.config.timeout_s)
        sub = None
        last_checkpoint = time.monotonic()
        while not self._closing:
            try:
                if sub is None:
                    sub = await self._setup(js)
                    with self._lock:
                        self._ready = True
                        self._lock.notify_all()
                msgs = await sub.fetch(_FETCH, timeout=0.5)
            except asyncio.TimeoutError:
                msgs = []
            except Exception as e:  # server restarting, consumer deleted ...: set up again
                log.info("nats consumer %s: %s: %s", self._name, type(e).__name__, e)
                sub = None
                await asyncio.sleep(0.25)
                continue
            with self._lock:
                for m in msgs:
                    self._handle(m)
                self._lock.notify_all()
            await self._ask_resyncs()
            due = (self._since_checkpoint >= self.config.checkpoint_every
                   or time.monotonic() - last_checkpoint >= self.config.checkpoint_interval_s)
            if due and self._unacked is not None and await self._checkpoint(js):
                last_checkpoint = time.monotonic()
        if self._unacked is not None:
            await self._checkpoint(js)

    async def _setup(self, js: Any) -> Any:
        """The stream, the checkpoint (first time only) and the consumer, then a pull
        subscription bound to it."""
        await ensure_stream(js, self.config)
        info = await js.stream_info(self.config.stream)
        created = info.created.isoformat() if info.created is not None else ""
        if self._stream_created is None:
            self._stream_created = created
            if self.durable is not None:
                await self._restore(js, created)
        elif created != self._stream_created:
            log.warning("nats consumer %s: stream %s was recreated: starting over",
                        self._name, self.config.stream)
            with self._lock:
                self._clear_all()
            self._stream_created = created
        return await bind_pull_consumer(js, self.config, self._name,
                                        durable=self.durable is not None,
                                        start_seq=self._last_seq + 1, fetch=_FETCH)

    # ------------------------------------------------------------------ messages --
    def _handle(self, m: Msg) -> None:
        """One message (under the lock)."""
        n = self._n
        try:
            sseq = int(m.metadata.sequence.stream)
        except Exception:
            n["bad"] += 1
            return
        if sseq <= self._last_seq:
            n["duplicates"] += 1  # redelivered: applied before the last checkpoint
            return
        self._last_seq = sseq
        self._unacked = m
        self._since_checkpoint += 1
        n["msgs"] += 1
        worker = self.config.worker_of(m.subject)
        hdr = parse_headers(m.headers)
        if worker is None or hdr is None:
            n["bad"] += 1
            return
        try:
            batch = decode_batch(m.data)
        except EventDecodeError as e:
            log.warning("nats consumer %s: bad payload from %s: %s", self._name, worker, e)
            n["bad"] += 1
            return
        n["skipped"] += batch.skipped
        epoch, seq = hdr
        events = batch.events
        sync_point = bool(events) and isinstance(events[0], AllMediaCleared)
        step, cur = advance(self._cursors.get(worker), epoch, seq, sync_point)
        if step is Step.DUPLICATE:
            n["duplicates"] += 1
            return
        if step is Step.GAP:
            n["gaps"] += 1
            log.warning("nats consumer %s: worker %s: events lost before epoch %d seq %d; "
                        "cleared, asking for a resync", self._name, worker, epoch, seq)
            events = [AllMediaCleared(), *events]  # every medium: the loss is unknown
            self._requested.pop(worker, None)
        self._cursors[worker] = cur
        if cur.synced:
            self._requested.pop(worker, None)
        else:
            self._requested.setdefault(worker, 0.0)
        self._apply(worker, events)

    def _apply(self, worker: str, events: list[KVEvent]) -> None:
        if self._ledgers is not None:
            self._ledgers.setdefault(worker, Ledger()).apply(events)
        self._n["events"] += len(events)
        try:
            self._sink(worker, events)
        except KvbmError:
            # one bad event refuses the call: apply the others one by one
            for e in events:
                try:
                    self._sink(worker, [e])
                except KvbmError as err:
                    self._n["rejected"] += 1
                    log.debug("nats consumer %s: %s refused: %s", self._name, worker, err)
                except Exception:
                    self._n["rejected"] += 1
                    log.exception("nats consumer %s: sink failed", self._name)
        except Exception:
            self._n["rejected"] += len(events)
            log.exception("nats consumer %s: sink failed", self._name)

    def _clear_all(self) -> None:
        for w in self._cursors:
            self._apply(w, [AllMediaCleared()])
        self._cursors.clear()
        if self._ledgers is not None:
            self._ledgers.clear()
        self._last_seq = 0
        self._unacked = None

    async def _ask_resyncs(self) -> None:
        now = time.monotonic()
        with self._lock:
            due = [(w, self._cursors[w]) for w, t in self._requested.items()
                   if now - t >= _RESYNC_RETRY_S]
            for w, _ in due:
                self._requested[w] = now
                self._n["requests"] += 1
        for w, cur in due:
            body = resync_request(cur.epoch, cur.next_seq - 1)
            try:
                # fire and forget: the answer is the resync, in the stream
                await self._nc.publish(self.config.resync_subject(w), body)
            except Exception as e:
                log.debug("nats consumer %s: resync request: %s", self._name, e)

    # --------------------------------------------------------------- checkpoints --
    async def _checkpoint(self, js: Any) -> bool:
        """Store the state up to the last message handled, then acknowledge it (ack-all:
        every earlier message with it). Runs on the loop, the only writer of the state."""
        m = self._unacked
        if m is None:
            return True
        try:
            if self._ledgers is not None:
                cp = Checkpoint(self._stream_created or "", self._last_seq,
                                {w: (c, self._ledgers.setdefault(w, Ledger()))
                                 for w, c in self._cursors.items()})
                await checkpoint.save(js, self.config, self._name, cp.encode())
            await m.ack()
        except Exception as e:
            log.info("nats consumer %s: checkpoint failed (%s); retrying later",
                     self._name, type(e).__name__)
            return False
        with self._lock:
            if self._unacked is m:
                self._unacked = None
                self._since_checkpoint = 0
            self._n["checkpoints"] += 1
        return True

    async def _restore(self, js: Any, created: str) -> None:
        """Load this durable's checkpoint into the ledgers and the sink."""
        cp = await checkpoint.load(js, self.config, self._name, created)
        if cp is None:
            return
        with self._lock:
            assert self._ledgers is not None
            for w, (cur, led) in cp.workers.items():
                self._cursors[w] = cur
                self._ledgers[w] = led
                self._apply(w, led.snapshot_events())
                self._n["restored"] += len(led)
                if not cur.synced:
                    self._requested[w] = 0.0
            self._n["events"] = 0
            self._last_seq = cp.stream_seq
        log.info("nats consumer %s: resumed after stream seq %d (%d workers)", self._name,
                 cp.stream_seq, len(cp.workers))

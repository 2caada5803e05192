"""Subscriber: follows many workers' ZMQ publishers and feeds their events to an indexer.

One SUB socket per worker (topics alone cannot tell workers apart: vLLM's default topic is
empty), a DEALER per replay in progress, and a socket monitor per SUB to see reconnects —
all polled by one thread. What each stream's sequence means (gaps, replays, resyncs,
restarts) is :mod:`kvbm.router.peer`'s job. Events go to a *sink*: a
:class:`~kvbm.router.KvIndexer` or any ``on_events(worker, events)`` callable (the JetStream
consumer feeds the same indexer its own way); a reset reaches it as ``AllMediaCleared``
(every medium).

Nothing a publisher sends stops the thread: bad frames and batches are logged (rate-limited)
and counted; events the sink refuses are applied one by one, the bad ones skipped and counted.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from kvbm.deps import require
from kvbm.errors import ClosedError, ConfigError, EventDecodeError, InvalidArgumentError, KvbmError
from kvbm.events.records import AllMediaCleared, KVEvent
from kvbm.events.wire import parse_frames, replay_request
from kvbm.router.config import SubscriberConfig, check_endpoint
from kvbm.router.indexer import KvIndexer
from kvbm.router.peer import COUNTERS, Peer, PeerState, WorkerStatus
from kvbm.router.ratelog import RateLimitedLog

log = logging.getLogger(__name__)

#: How often the thread looks at its command queue and replay deadlines, in milliseconds.
_TICK_MS = 20

OnEvents = Callable[[str, list[KVEvent]], None]


class _Link:
    """A worker's sockets and its sequence state."""

    def __init__(self, name: str, endpoint: str, replay: str | None, gen: int) -> None:
        self.name, self.endpoint, self.replay_endpoint = name, endpoint, replay
        self.gen = gen  # which add_worker of this name it serves
        self.sub: Any = None
        self.monitor: Any = None
        self.dealer: Any = None
        self.peer: Peer | None = None
        self.counted = dict.fromkeys(COUNTERS, 0)  # already added to the totals


class Subscriber:
    """Subscribes to workers' event publishers; one thread, started by :meth:`start` (or
    ``with``). :meth:`add_worker` / :meth:`remove_worker` work before and while it runs."""

    def __init__(self, sink: KvIndexer | OnEvents, config: SubscriberConfig | None = None, *,
                 topic: str = "") -> None:
        if not (isinstance(sink, KvIndexer) or callable(sink)):
            raise InvalidArgumentError(f"sink must be a KvIndexer or a callable "
                                       f"(worker, events), got {type(sink).__name__}")
        config = SubscriberConfig() if config is None else config
        if not isinstance(config, SubscriberConfig):
            raise InvalidArgumentError(f"config must be a SubscriberConfig, got "
                                       f"{type(config).__name__}")
        if not isinstance(topic, str):
            raise InvalidArgumentError(f"topic must be a str, got {topic!r}")
        self._zmq: Any = require("zmq", "events", "the event subscriber")
        self._sink = sink
        self.config = config
        self._topic = topic.encode()
        self._ctx = self._zmq.Context()
        self._links: dict[str, _Link] = {}  # the thread's own
        #: under _lock: the workers asked for, name -> generation (one per add_worker)
        self._names: dict[str, int] = {}
        self._gen = 0
        #: ("add", name, endpoint, replay, gen) / ("remove", name, "", None, gen), in order
        self._commands: deque[tuple[str, str, str, str | None, int]] = deque()
        self._lock = threading.Condition()
        self._status: dict[str, WorkerStatus] = {}
        self._totals = dict.fromkeys((*COUNTERS, "sink_errors"), 0)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._log = RateLimitedLog(log)

    # ------------------------------------------------------------------------- API --
    def add_worker(self, name: str, endpoint: str, replay_endpoint: str | None = None) -> None:
        """Follow ``name``'s publisher at ``endpoint`` (with its replay socket, if any)."""
        if not isinstance(name, str) or not name:
            raise InvalidArgumentError(f"a worker is named by a non-empty str, got {name!r}")
        try:
            check_endpoint(f"worker {name!r} endpoint", endpoint)
            if replay_endpoint is not None:
                check_endpoint(f"worker {name!r} replay endpoint", replay_endpoint)
        except ConfigError as e:
            raise InvalidArgumentError(str(e)) from None
        with self._lock:
            if self._closed:
                raise ClosedError("the subscriber is closed")
            if name in self._names:
                raise InvalidArgumentError(f"worker {name!r} is already subscribed")
            self._gen += 1
            self._names[name] = self._gen
            self._status.pop(name, None)
            self._commands.append(("add", name, endpoint, replay_endpoint, self._gen))

    def remove_worker(self, name: str) -> None:
        """Stop following ``name`` and drop what the sink knows of it."""
        with self._lock:
            if name not in self._names:
                raise InvalidArgumentError(f"worker {name!r} is not subscribed")
            gen = self._names.pop(name)
            self._status.pop(name, None)
            self._commands.append(("remove", name, "", None, gen))

    def workers(self) -> list[str]:
        with self._lock:
            return sorted(self._names)

    def status(self) -> dict[str, WorkerStatus]:
        """Per worker: state, next seq, completeness, counters (as of the thread's last
        pass)."""
        with self._lock:
            return dict(self._status)

    def totals(self) -> dict[str, int]:
        """Counters summed over every worker ever followed, plus ``sink_errors``."""
        with self._lock:
            return dict(self._totals)

    def wait_for(self, name: str, next_seq: int, timeout: float) -> bool:
        """Wait until ``name``'s batches before ``next_seq`` were applied and no replay is
        running; ``False`` after ``timeout`` seconds."""
        def done() -> bool:
            st = self._status.get(name)
            return st is not None and st.state == PeerState.LIVE.value and \
                st.next_seq is not None and st.next_seq >= next_seq
        with self._lock:
            return self._lock.wait_for(done, timeout)

    @property
    def running(self) -> bool:
        """The thread runs (started, not closed, not dead)."""
        t = self._thread
        return t is not None and t.is_alive() and not self._closed

    def start(self) -> None:
        with self._lock:
            if self._closed:
                raise ClosedError("the subscriber is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="kvbm-subscriber",
                                                 daemon=True)
                self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        else:
            self._ctx.term()

    def __enter__(self) -> Subscriber:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------------- thread --
    def _run(self) -> None:
        zmq = self._zmq
        poller = zmq.Poller()
        try:
            while not self._stop.is_set():
                self._run_commands(poller)
                try:
                    ready = dict(poller.poll(_TICK_MS))
                except zmq.ZMQError as e:  # a socket closed under the poller: next pass
                    log.warning("subscriber poll failed: %s", e)
                    continue
                for link in list(self._links.values()):
                    try:
                        self._service(link, ready, poller)
                    except Exception:  # a bug must not stop the other workers
                        log.exception("subscriber: error on worker %s", link.name)
                self._publish_status()
        finally:
            for link in list(self._links.values()):
                self._close_link(link, poller)
            self._ctx.term()

    def _run_commands(self, poller: Any) -> None:
        while True:
            with self._lock:
                if not self._commands:
                    return
                op, name, endpoint, replay, gen = self._commands.popleft()
            if op == "add" and name not in self._links:
                self._open_link(name, endpoint, replay, gen, poller)
            elif op == "remove" and name in self._links:
                link = self._links.pop(name)
                self._fold(link)
                self._close_link(link, poller)
                self._remove_from_sink(name)

    def _open_link(self, name: str, endpoint: str, replay: str | None, gen: int, poller: Any
                   ) -> None:
        zmq = self._zmq
        link = _Link(name, endpoint, replay, gen)
        link.sub = self._ctx.socket(zmq.SUB)
        link.sub.setsockopt(zmq.LINGER, 0)
        link.sub.setsockopt(zmq.RCVHWM, self.config.rcvhwm)
        link.sub.setsockopt(zmq.SUBSCRIBE, self._topic)
        link.monitor = link.sub.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        link.sub.connect(endpoint)
        link.peer = Peer(
            name, replay, max_held=self.config.max_held_batches,
            replay_timeout_s=self.config.replay_timeout_s,
            deliver=lambda events: self._deliver(name, events),
            replay=lambda start: self._open_replay(link, start, poller),
            end_replay=lambda: self._close_replay(link, poller),
            warn=lambda kind, msg, *args: self._log.warn(name, kind, msg, *args))
        poller.register(link.sub, zmq.POLLIN)
        poller.register(link.monitor, zmq.POLLIN)
        self._links[name] = link

    def _open_replay(self, link: _Link, start: int, poller: Any) -> None:
        # A new DEALER per request: answers still in flight to an abandoned one never mix in
        self._close_replay(link, poller)
        zmq = self._zmq
        link.dealer = self._ctx.socket(zmq.DEALER)
        link.dealer.setsockopt(zmq.LINGER, 0)
        link.dealer.setsockopt(zmq.RCVHWM, 0)
        link.dealer.connect(link.replay_endpoint)
        link.dealer.send_multipart(replay_request(start))
        poller.register(link.dealer, zmq.POLLIN)

    def _close_replay(self, link: _Link, poller: Any) -> None:
        if link.dealer is not None:
            poller.unregister(link.dealer)
            link.dealer.close(linger=0)
            link.dealer = None

    def _close_link(self, link: _Link, poller: Any) -> None:
        self._close_replay(link, poller)
        for sock in (link.monitor, link.sub):
            if sock is not None:
                poller.unregister(sock)
        if link.sub is not None:
            link.sub.disable_monitor()
            link.sub.close(linger=0)
        if link.monitor is not None:
            link.monitor.close(linger=0)

    def _service(self, link: _Link, ready: dict[Any, int], poller: Any) -> None:
        zmq, peer = self._zmq, link.peer
        assert peer is not None
        if link.monitor in ready:
            self._read_monitor(link)
        # Bounded reads per pass: one busy worker must not starve the others
        for _ in range(256):
            if link.dealer is None or link.dealer not in ready:
                break
            try:
                frames = link.dealer.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            peer.replayed(frames)
        for _ in range(256):
            if link.sub not in ready:
                break
            try:
                frames = link.sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                _topic, seq, payload = parse_frames(frames)
            except EventDecodeError as e:
                peer.n["bad_messages"] += 1
                self._log.warn(link.name, "bad message", "worker %s: bad message skipped: %s",
                               link.name, e)
                continue
            peer.live(seq, payload)
        if peer.timed_out(time.monotonic()):
            peer.give_up_replay()

    def _read_monitor(self, link: _Link) -> None:
        from zmq.utils.monitor import recv_monitor_message

        zmq = self._zmq
        assert link.peer is not None
        while True:
            try:
                event = recv_monitor_message(link.monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                link.peer.reconnected()

    # ------------------------------------------------------------------------ sink --
    def _deliver(self, name: str, events: list[KVEvent]) -> None:
        sink = self._sink
        try:
            if isinstance(sink, KvIndexer):
                try:
                    sink.apply(name, events)
                except KvbmError:  # one bad event refuses the call: apply the others alone
                    for e in events:
                        try:
                            sink.apply(name, [e])
                        except KvbmError as err:
                            self._count(name, "rejected_events")
                            self._log.warn(name, "rejected", "worker %s: event refused by "
                                           "the indexer: %s", name, err)
            else:
                sink(name, events)
        except Exception as e:  # a sink's own failure must not stop the subscriber
            with self._lock:
                self._totals["sink_errors"] += 1
            self._log.warn(name, "sink", "worker %s: the sink failed: %r", name, e)

    def _remove_from_sink(self, name: str) -> None:
        if isinstance(self._sink, KvIndexer):
            self._sink.remove_worker(name)
        else:
            self._deliver(name, [AllMediaCleared()])

    def _count(self, name: str, key: str) -> None:
        link = self._links.get(name)
        if link is not None and link.peer is not None:
            link.peer.n[key] += 1

    def _fold(self, link: _Link) -> dict[str, int]:
        """Add what ``link`` counted since the last fold to the totals; its counters."""
        assert link.peer is not None
        counters = dict(link.peer.n)
        with self._lock:
            for k in COUNTERS:
                self._totals[k] += counters[k] - link.counted[k]
        link.counted = counters
        return counters

    def _publish_status(self) -> None:
        with self._lock:
            for name, link in self._links.items():
                assert link.peer is not None
                counters = self._fold(link)
                if self._names.get(name) != link.gen:
                    continue  # removed (or removed and added again) since: not its status
                p = link.peer
                self._status[name] = WorkerStatus(name, link.endpoint, link.replay_endpoint,
                                                  p.state.value, p.next, p.complete, counters)
            self._lock.notify_all()

"""One worker's event stream as the subscriber follows it: sequence, gaps, replays, restarts.

:class:`Peer` is the state machine; the subscriber owns its sockets and calls it from its one
thread. The rules (seq counts from 0 per publisher process, DESIGN.md §5):

- **In order** (``seq == next``): apply.
- **A gap** (``seq > next``): hold live batches, ask the replay socket for ``next`` onwards,
  apply what comes back, then the held batches. Where the replay no longer reaches back
  (its first batch is later than asked, or it times out), the batches are lost: the worker
  is **resynced** — its blocks are cleared in the index (the router under-claims the worker
  rather than over-claims it) and the stream goes on from what is available. The worker is
  *complete* again after the publisher's own resync (an ``AllBlocksCleared``).
- **A restart** (a seq on the PUB socket not above the last one received there, or a
  reconnect after which the replay does not hold the last batch applied, byte for byte):
  the worker's blocks are cleared and its new history is taken from seq 0 (replayed where
  the first batches were missed). A live batch below ``next`` but after the last live one
  is no restart: a replay brought it while it was in flight.
- **First contact**: the history from seq 0 is replayed (where a replay socket exists).
- **A batch that does not decode** is a lost batch (resync); events it holds that break the
  format are skipped by the decoder and counted.
"""

from __future__ import annotations

import enum
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import xxhash

from kvbm.errors import EventDecodeError
from kvbm.events.records import AllBlocksCleared, AllMediaCleared, KVEvent
from kvbm.events.wire import END_SEQ, decode_batch, parse_replay_reply

COUNTERS = ("batches", "events", "gaps", "replays", "replayed_batches", "replay_timeouts",
            "resyncs", "restarts", "bad_messages", "skipped_events", "rejected_events")


@dataclass(frozen=True)
class WorkerStatus:
    """Where the subscriber stands with one worker (counters since it was added)."""

    name: str
    endpoint: str
    replay_endpoint: str | None
    state: str  # connecting, live, replaying
    next_seq: int | None
    complete: bool  # nothing lost since the worker's start or its last resync
    counters: dict[str, int]


class PeerState(enum.Enum):
    CONNECTING = "connecting"  # nothing received yet
    LIVE = "live"
    REPLAYING = "replaying"


class Peer:
    """The sequence state of one worker. ``deliver(events)`` hands events to the sink;
    ``replay(start)`` (re)opens the replay request; ``warn`` logs rate-limited."""

    def __init__(self, name: str, replay_endpoint: str | None, *, max_held: int,
                 replay_timeout_s: float, deliver: Callable[[list[KVEvent]], None],
                 replay: Callable[[int], None], end_replay: Callable[[], None],
                 warn: Callable[..., None]) -> None:
        self.name = name
        self.replay_endpoint = replay_endpoint
        self.max_held = max_held
        self.replay_timeout_s = replay_timeout_s
        self._deliver, self._replay, self._end_replay = deliver, replay, end_replay
        self._warn = warn
        self.next: int | None = None  # the seq expected; None: take the next one as it comes
        self.last_live: int | None = None  # the last seq received on the PUB socket
        self.fresh = True  # nothing applied yet: the history from 0 is wanted
        self.complete = True  # everything the publisher said since its start was applied
        self.state = PeerState.CONNECTING
        self.held: deque[tuple[int, bytes]] = deque()
        self.replay_start = 0
        self.deadline = 0.0
        self._verify: int | None = None  # digest the first replayed batch must have
        self._last_digest: int | None = None
        self._held_dropped = False
        self.n = dict.fromkeys(COUNTERS, 0)

    # ------------------------------------------------------------------------ live --
    def live(self, seq: int, payload: bytes) -> None:
        """A batch from the PUB socket."""
        # One publisher process sends strictly increasing seqs on its PUB socket: a seq
        # that does not exceed the last one received there is a new process.
        prev, self.last_live = self.last_live, seq
        if prev is not None and seq <= prev:
            self._restart(f"seq {seq} after {prev}")
            if self.state is PeerState.REPLAYING:  # replaying the old process: moot
                self.held.clear()
                self._end_replay()
            self.state = PeerState.LIVE
        if self.state is PeerState.REPLAYING:
            if len(self.held) >= self.max_held:  # dropped: the replay after this one gets them
                self.held.clear()
                self._held_dropped = True
            self.held.append((seq, payload))
            return
        self.state = PeerState.LIVE
        self._take(seq, payload)

    def _take(self, seq: int, payload: bytes) -> None:
        """A live batch, in order with what was applied or not."""
        if self.next is None:
            if self.fresh and seq > 0:
                if self.replay_endpoint is not None:
                    self.held.append((seq, payload))
                    self._start_replay(0)
                    return
                self._lost(f"batches 0..{seq - 1} were sent before the subscriber joined")
            self._apply(seq, payload)
        elif seq == self.next:
            self._apply(seq, payload)
        elif seq < self.next:
            return  # a replay brought it while it was on its way here
        else:
            self.n["gaps"] += 1
            if self.replay_endpoint is not None:
                self.held.append((seq, payload))
                self._start_replay(self.next)
                return
            self._lost(f"batches {self.next}..{seq - 1} missed, no replay socket")
            self._apply(seq, payload)

    def reconnected(self) -> None:
        """The PUB connection came (back) up: on first contact get the history; after a
        reconnect, check that the publisher is the same process (its replay still holds the
        last batch applied, byte for byte)."""
        if self.replay_endpoint is None or self.state is PeerState.REPLAYING:
            return
        if self.fresh and self.next is None:
            self._start_replay(0)
        elif self.next is not None and self._last_digest is not None:
            self._start_replay(self.next - 1, verify=self._last_digest)

    # ---------------------------------------------------------------------- replay --
    def _start_replay(self, start: int, verify: int | None = None) -> None:
        self.state = PeerState.REPLAYING
        self.replay_start = start
        self._verify = verify
        self.deadline = time.monotonic() + self.replay_timeout_s
        self.n["replays"] += 1
        self._replay(start)

    def replayed(self, frames: list[bytes]) -> None:
        """A reply on the replay socket."""
        if self.state is not PeerState.REPLAYING:
            return  # a late answer to a replay given up on
        try:
            seq, payload = parse_replay_reply(frames)
        except EventDecodeError as e:
            self.n["bad_messages"] += 1
            self._warn("bad replay reply", "worker %s: bad replay reply: %s", self.name, e)
            return
        self.deadline = time.monotonic() + self.replay_timeout_s
        verify, self._verify = self._verify, None
        if verify is not None:  # the first answer after a reconnect
            if seq == self.replay_start and payload is not None \
                    and xxhash.xxh3_64_intdigest(payload) == verify:
                return  # the same publisher: this batch was applied already
            self._restart("reconnected to a publisher that does not hold the last batch seen")
            self._start_replay(0)
            return
        if seq == END_SEQ or payload is None:
            self._finish_replay()
            return
        self.n["replayed_batches"] += 1
        if self.next is None:
            if self.fresh and seq > self.replay_start:
                self._lost(f"the replay buffer starts at seq {seq}")
        elif seq < self.next:
            return  # applied already
        elif seq > self.next:
            self._lost(f"batches {self.next}..{seq - 1} are no longer in the replay buffer")
        self._apply(seq, payload)

    def timed_out(self, now: float) -> bool:
        return self.state is PeerState.REPLAYING and now > self.deadline

    def give_up_replay(self) -> None:
        """The replay socket went quiet: what it did not send is lost."""
        self.n["replay_timeouts"] += 1
        verifying = self._verify is not None
        self._verify = None
        if verifying:
            self._restart("reconnected, and the replay socket does not answer to check it")
        else:
            self._lost(f"the replay socket did not answer for {self.replay_timeout_s:g} s")
        self.fresh = False  # not again right away: take the live stream as it comes
        self._finish_replay()

    def _finish_replay(self) -> None:
        self._end_replay()
        self.state = PeerState.LIVE
        after_replay, dropped = self.next, self._held_dropped
        self._held_dropped = False
        held, self.held = self.held, deque()
        while held:
            seq, payload = held.popleft()
            if self.state is PeerState.REPLAYING:
                self.held.append((seq, payload))
            elif self.next is not None and seq < self.next:
                continue  # the replay brought it already
            elif (self.next is not None and seq > self.next and self.next == after_replay
                  and not dropped):
                # the replay just ran and did not bring these: another would not either
                self.n["gaps"] += 1
                self._lost(f"batches {self.next}..{seq - 1} could not be replayed")
                self._apply(seq, payload)
            else:
                self._take(seq, payload)

    # ---------------------------------------------------------------------- common --
    def _apply(self, seq: int, payload: bytes) -> None:
        self.fresh = False
        self.next = seq + 1
        self._last_digest = xxhash.xxh3_64_intdigest(payload)
        try:
            batch = decode_batch(payload)
        except EventDecodeError as e:
            self.n["bad_messages"] += 1
            self._warn("bad batch", "worker %s: batch %d is not events (%s): treated as lost",
                       self.name, seq, e)
            self._lost(f"batch {seq} did not decode")
            return
        self.n["batches"] += 1
        self.n["events"] += len(batch.events)
        if batch.skipped:
            self.n["skipped_events"] += batch.skipped
            self._warn("skipped events", "worker %s: batch %d: %d event(s) skipped: %s",
                       self.name, seq, batch.skipped, "; ".join(batch.skip_reasons))
        if any(isinstance(e, AllBlocksCleared) for e in batch.events):
            self.complete = True  # the publisher's own resync: its whole state follows
        if batch.events:
            self._deliver(batch.events)

    def _lost(self, why: str) -> None:
        """Batches are gone for good: clear the worker (under-claim, never over-claim)."""
        self.n["resyncs"] += 1
        self.complete = False
        self._warn("resync", "worker %s: %s; its blocks are cleared until it announces them "
                   "again", self.name, why)
        self._deliver([AllMediaCleared()])  # every medium: what was lost is unknown

    def _restart(self, why: str) -> None:
        self.n["restarts"] += 1
        self._warn("restart", "worker %s restarted (%s): its blocks are cleared", self.name,
                   why)
        self._deliver([AllMediaCleared()])  # every medium: what was lost is unknown
        self.next = None
        self.last_live = None
        self.fresh = True
        self.complete = True
        self._last_digest = None

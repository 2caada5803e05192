"""Where a block manager's residency events go: a bounded queue that ``take_events()``
drains, or (``[events] enabled``) kvbm's ZMQ publisher and, with ``[events.nats]``, JetStream.

The manager builds events on its owner thread and hands them here; publishing never blocks
it (the publishers queue and count an overflow, then resync their subscribers from a
snapshot that the manager builds on its own thread when :meth:`EventSink.serve_snapshot`
finds one wanted).
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from kvbm.events.records import BlockStored, KVEvent
from kvbm.medium import Medium

if TYPE_CHECKING:
    from kvbm.config import EventsConfig
    from kvbm.events.nats import NatsEventPublisher
    from kvbm.events.owner_snapshot import OwnerSnapshot
    from kvbm.events.publisher import ZmqEventPublisher
    from kvbm.index import BlockRecord

log = logging.getLogger(__name__)


class EventSink:
    """The manager's events, queued for :meth:`take` or published. Owner thread only,
    except the publishers' own threads."""

    def __init__(self, block_size: int, max_pending: int) -> None:
        self._block_size = block_size
        self._max_pending = max_pending
        self._queue: collections.deque[KVEvent] = collections.deque()
        self.dropped = 0  #: events the bounded queue dropped (oldest first)
        self.publisher: ZmqEventPublisher | None = None
        self.nats: NatsEventPublisher | None = None
        self._snapshots: OwnerSnapshot | None = None

    # ---------------------------------------------------------------------- publishing --
    def start(self, config: EventsConfig, snapshot: Callable[[], Sequence[KVEvent]]) -> None:
        """Open the publishers of ``config``; ``snapshot`` builds the resident state for a
        resync (called on the owner thread, from :meth:`serve_snapshot`)."""
        from kvbm.events.owner_snapshot import OwnerSnapshot
        from kvbm.events.publisher import ZmqEventPublisher

        self._snapshots = OwnerSnapshot(snapshot)
        self.publisher = ZmqEventPublisher(config, snapshot=self._snapshots)
        if config.nats is not None:
            from kvbm.events.nats import NatsEventPublisher

            try:  # one snapshot serves both: a request they share is built once
                self.nats = NatsEventPublisher(
                    config.nats, config.nats.worker_name(config.data_parallel_rank),
                    data_parallel_rank=config.data_parallel_rank, snapshot=self._snapshots)
            except BaseException:
                self.close()
                raise

    def serve_snapshot(self) -> None:
        """Build the snapshot a publisher waits for, if any (owner thread, on every drain)."""
        snaps = self._snapshots
        if snaps is not None and snaps.wanted:
            snaps.serve()

    def close(self) -> None:
        """After the close's own events: they go out before the sockets close."""
        if self._snapshots is not None:
            self._snapshots.close()
        for pub in (self.publisher, self.nats):
            if pub is not None:
                try:
                    pub.close()
                except Exception as e:  # closing must finish whatever the sockets do
                    log.warning("close: the event publisher: %s", e)

    # -------------------------------------------------------------------------- events --
    def emit(self, event: KVEvent) -> None:
        if self.publisher is not None:
            # Published instead of queued for take(): never blocks (the publisher counts an
            # overflow and resyncs its subscribers from a snapshot).
            self.publisher.publish([event])
            if self.nats is not None:
                self.nats.publish([event])
            return
        if len(self._queue) >= self._max_pending:
            self._queue.popleft()
            self.dropped += 1
        self._queue.append(event)

    def take(self) -> list[KVEvent]:
        out = list(self._queue)
        self._queue.clear()
        return out

    def emit_stored(self, recs: Sequence[BlockRecord], medium: Medium) -> None:
        """One BlockStored per run of consecutive blocks (each block the parent of the next)."""
        for run in runs(recs):
            self.emit(self.stored_event(run, medium))

    def stored_event(self, run: list[BlockRecord], medium: Medium) -> BlockStored:
        tokens = np.frombuffer(b"".join(r.tokens for r in run), dtype="<u4").tolist()
        return BlockStored([r.seq_hash for r in run], run[0].parent_hash, tokens,
                           self._block_size, medium, run[0].lora_name, None,
                           [r.local_hash for r in run])


def runs(recs: Sequence[BlockRecord]) -> list[list[BlockRecord]]:
    """``recs`` cut into runs of consecutive blocks (each the parent of the next)."""
    out: list[list[BlockRecord]] = []
    run: list[BlockRecord] = []
    for r in recs:
        if run and r.parent is not run[-1]:
            out.append(run)
            run = []
        run.append(r)
    if run:
        out.append(run)
    return out

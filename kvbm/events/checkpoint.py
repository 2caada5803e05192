"""A router's checkpoint: what it has applied from the JetStream stream, to resume from.

One object per durable consumer name in the JetStream object store ``<stream>_CHECKPOINTS``
(chunked, sha256-checked by the object store), msgpack:
``{"v": 1, "stream_created": ISO time, "stream_seq": N, "workers": {name: [epoch,
next_seq, synced, ledger]}}``. ``stream_created`` ties it to one incarnation of the stream: a
stream deleted and made again starts its sequence over, and an old checkpoint is ignored.
Anything unreadable is ignored too (the consumer then replays the stream), never trusted.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from typing import Any

import msgpack

from kvbm.deps import require
from kvbm.errors import EventDecodeError, InvalidArgumentError
from kvbm.events.jetstream import NatsConfig, check_worker
from kvbm.events.ledger import Ledger

log = logging.getLogger(__name__)
VERSION = 1


@dataclass(frozen=True, slots=True)
class WorkerCursor:
    """Where a consumer is in one worker's sequence."""

    epoch: int
    next_seq: int
    #: False from a hole in the sequence until the resync that heals it
    synced: bool


class Step(enum.Enum):
    """What a consumer does with a worker's next message."""

    APPLY = "apply"
    DUPLICATE = "duplicate"  # applied before (a redelivery, a retried publish): skip
    GAP = "gap"  # events before it are lost: clear the worker, apply it, ask for a resync


def advance(cur: WorkerCursor | None, epoch: int, seq: int, sync_point: bool,
            ) -> tuple[Step, WorkerCursor]:
    """The step for a worker's message ``(epoch, seq)`` and the cursor after it. A sync
    point (a batch that starts with ``AllMediaCleared``) makes the worker whole whatever
    came before; a worker's first message, seq 0 of its epoch, is a beginning too."""
    if cur is not None and cur.epoch == epoch and seq < cur.next_seq:
        return Step.DUPLICATE, cur
    after = WorkerCursor(epoch, seq + 1, True)
    if sync_point or (cur is None and seq == 0):
        return Step.APPLY, after
    if cur is not None and cur.epoch == epoch and seq == cur.next_seq:
        return Step.APPLY, WorkerCursor(epoch, seq + 1, cur.synced)
    return Step.GAP, WorkerCursor(epoch, seq + 1, False)


@dataclass
class Checkpoint:
    stream_created: str
    #: the last stream sequence the state includes
    stream_seq: int
    workers: dict[str, tuple[WorkerCursor, Ledger]]

    def encode(self) -> bytes:
        out: bytes = msgpack.packb({
            "v": VERSION, "stream_created": self.stream_created, "stream_seq": self.stream_seq,
            "workers": {w: [c.epoch, c.next_seq, c.synced, led.dump()]
                        for w, (c, led) in self.workers.items()}}, use_bin_type=True)
        return out

    @classmethod
    def decode(cls, data: bytes) -> Checkpoint:
        """:class:`EventDecodeError` for anything that is not a checkpoint of this version."""
        try:
            doc = msgpack.unpackb(data, raw=False, strict_map_key=False)
            assert isinstance(doc, dict) and doc.get("v") == VERSION
            created, seq = doc["stream_created"], doc["stream_seq"]
            assert isinstance(created, str) and type(seq) is int and seq >= 0
            workers: dict[str, tuple[WorkerCursor, Ledger]] = {}
            for w, (epoch, nxt, synced, led) in doc["workers"].items():
                check_worker(w)
                assert type(epoch) is int and type(nxt) is int and type(synced) is bool
                workers[w] = (WorkerCursor(epoch, nxt, synced), Ledger.load(led))
        except EventDecodeError:
            raise
        except (AssertionError, KeyError, TypeError, ValueError, InvalidArgumentError,
                msgpack.UnpackException) as e:
            raise EventDecodeError(f"not a checkpoint: {type(e).__name__}") from None
        return cls(created, seq, workers)


async def _bucket(js: Any, config: NatsConfig) -> Any:
    errors = require("nats.js.errors", "nats", "router checkpoints")
    try:
        return await js.object_store(config.checkpoint_bucket)
    except errors.NotFoundError:
        return await js.create_object_store(config.checkpoint_bucket)


async def save(js: Any, config: NatsConfig, name: str, data: bytes) -> None:
    """Store ``data`` as ``name`` (replacing the previous one whole: the object store
    publishes the chunks first and switches the object's meta to them last)."""
    await (await _bucket(js, config)).put(name, data)


async def load(js: Any, config: NatsConfig, name: str, stream_created: str
               ) -> Checkpoint | None:
    """``name``'s checkpoint of this incarnation of the stream, or ``None``."""
    errors = require("nats.js.errors", "nats", "router checkpoints")
    try:
        obj = await (await _bucket(js, config)).get(name)
        cp = Checkpoint.decode(obj.data or b"")
    except errors.NotFoundError:
        return None
    except (EventDecodeError, errors.DigestMismatchError, errors.BadObjectMetaError) as e:
        log.warning("router checkpoint %s unreadable (%s): replaying the stream", name, e)
        return None
    if cp.stream_created != stream_created:
        log.warning("router checkpoint %s is of an older stream %s: replaying the stream",
                    name, config.stream)
        return None
    return cp

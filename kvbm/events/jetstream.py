"""Cache events on NATS JetStream: names, limits, headers and message sizes.

Layout on the server (names from :class:`NatsConfig`):

- one stream (``stream``, default ``KVBM_EVENTS``) over the subjects ``<subject_prefix>.*``;
  each worker publishes on ``<subject_prefix>.<worker>``; a message's payload is the same
  msgpack batch as on ZMQ (DESIGN.md §5), its headers carry who sent it:
  ``Kvbm-Epoch`` (one random number per publishing process), ``Kvbm-Seq`` (the batch's
  sequence number in that epoch, from 0, no holes) and ``Nats-Msg-Id``
  (``<worker>:<epoch>:<seq>``: the server drops a retried publish it already stored);
- resync requests on ``<subject_prefix>.resync.<worker>`` (plain NATS, not in the stream):
  a consumer that found a hole in a worker's sequence asks its publisher to re-announce;
- router checkpoints in the object store bucket ``<stream>_CHECKPOINTS``, one object per
  durable consumer name.

The nats-py side (event loop thread, connections, stream and consumer set-up) is
:mod:`kvbm.events.nats_client`.
"""

from __future__ import annotations

import enum
import json
import math
import re
import secrets
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from kvbm.errors import ConfigError, InvalidArgumentError
from kvbm.events.wire import pack_batch

HDR_EPOCH = "Kvbm-Epoch"
HDR_SEQ = "Kvbm-Seq"
#: The bridge's source: the sequence number vLLM gave the last batch in the message.
HDR_SOURCE_SEQ = "Kvbm-Source-Seq"
HDR_MSG_ID = "Nats-Msg-Id"

# A subject token: no separators, wildcards or white space (NATS splits subjects on "." and
# treats "*" and ">" as wildcards); kept to a conservative alphabet so it is also a valid
# consumer and object name.
_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,128}")
_PREFIX = re.compile(r"[A-Za-z0-9_-]{1,64}(\.[A-Za-z0-9_-]{1,64}){0,7}")


class StreamStorage(enum.Enum):
    """Where the JetStream server keeps the stream."""

    FILE = "file"  # survives a restart of the server (kill -9 included)
    MEMORY = "memory"  # faster; lost with the server


def _number(owner: str, name: str, value: object, *, integer: bool, minimum: float) -> None:
    ok = (not isinstance(value, bool) and isinstance(value, int if integer else (int, float))
          and math.isfinite(value) and value >= minimum)
    if not ok:
        kind = "an int" if integer else "a finite number"
        raise ConfigError(f"{owner}.{name} must be {kind} >= {minimum:g}, got {value!r}")


@dataclass(frozen=True)
class NatsConfig:
    """Events over NATS JetStream (the ``[events.nats]`` section; see docs/events-nats.md)."""

    #: Server URL(s), comma-separated for a cluster (``nats://host:4222``).
    url: str = "nats://127.0.0.1:4222"
    #: JetStream stream holding every worker's events.
    stream: str = "KVBM_EVENTS"
    #: Subject prefix: a worker publishes on ``<subject_prefix>.<worker>``.
    subject_prefix: str = "kvbm.events"
    #: This worker's name in the stream (a publisher's subject token); unset: the host name
    #: (see :meth:`worker_name`).
    worker: str | None = None
    #: Durable consumer name of a router (one per router that must resume after a restart);
    #: ``None``: no durable state, a router reads the whole stream at every start.
    durable: str | None = "kvbm-router"
    storage: StreamStorage = StreamStorage.FILE
    replicas: int = 1
    #: Stream limits (0: unlimited). When one is reached the oldest messages go; a consumer
    #: that had not read them finds a hole in the worker's sequence and asks for a resync.
    max_msgs: int = 0
    max_bytes: int = 1 << 30
    max_age_s: float = 0.0
    #: Window in which the server drops a message whose ``Nats-Msg-Id`` it already stored.
    duplicate_window_s: float = 120.0
    #: Connect, request and publish-acknowledgement timeout, in seconds.
    timeout_s: float = 5.0
    #: Events the publisher queues at most; beyond, it drops the queue, counts it and
    #: publishes ``AllBlocksCleared`` and the worker's full state instead (a resync).
    max_queue_events: int = 100_000
    #: A router checkpoints its state (and acknowledges what it covers) this often, and
    #: after ``checkpoint_every`` messages, whichever comes first.
    checkpoint_interval_s: float = 5.0
    checkpoint_every: int = 10_000

    def __post_init__(self) -> None:
        o = "events.nats"
        if not isinstance(self.url, str) or not self.url.strip():
            raise ConfigError(f"{o}.url must be a non-empty string, got {self.url!r}")
        for u in self.url.split(","):
            if not re.fullmatch(r"(nats|tls|ws|wss)://[^\s/]+/?", u.strip()):
                raise ConfigError(f"{o}.url must be nats://HOST:PORT[,...], got {self.url!r}")
        for name in ("stream", "durable", "worker"):
            value = getattr(self, name)
            if value is None and name != "stream":
                continue
            if not isinstance(value, str) or not _TOKEN.fullmatch(value):
                raise ConfigError(f"{o}.{name} must be 1-128 characters of A-Z a-z 0-9 _ -, "
                                  f"got {value!r}")
        if not isinstance(self.subject_prefix, str) or not _PREFIX.fullmatch(self.subject_prefix):
            raise ConfigError(f"{o}.subject_prefix must be dot-separated tokens of A-Z a-z 0-9 "
                              f"_ - (no wildcards), got {self.subject_prefix!r}")
        if not isinstance(self.storage, StreamStorage):
            raise ConfigError(f"{o}.storage must be one of "
                              f"{[s.value for s in StreamStorage]}, got {self.storage!r}")
        _number(o, "replicas", self.replicas, integer=True, minimum=1)
        for name in ("max_msgs", "max_bytes"):
            _number(o, name, getattr(self, name), integer=True, minimum=0)
        _number(o, "max_age_s", self.max_age_s, integer=False, minimum=0)
        for name in ("duplicate_window_s", "timeout_s", "checkpoint_interval_s"):
            _number(o, name, getattr(self, name), integer=False, minimum=0.001)
        for name in ("max_queue_events", "checkpoint_every"):
            _number(o, name, getattr(self, name), integer=True, minimum=1)

    @property
    def servers(self) -> list[str]:
        return [u.strip() for u in self.url.split(",")]

    @property
    def checkpoint_bucket(self) -> str:
        return f"{self.stream}_CHECKPOINTS"

    def worker_name(self, data_parallel_rank: int = 0) -> str:
        """``worker``, or the host name (made a subject token) with ``-dp<rank>`` for a
        data-parallel rank > 0: what a publisher that embeds kvbm calls itself."""
        name = self.worker or re.sub(r"[^A-Za-z0-9_-]+", "_", socket.gethostname())[:120]
        return check_worker(f"{name}-dp{data_parallel_rank}" if data_parallel_rank else name)

    def subject(self, worker: str) -> str:
        return f"{self.subject_prefix}.{check_worker(worker)}"

    def resync_subject(self, worker: str) -> str:
        # Two tokens past the prefix: outside the stream's ``<prefix>.*``, so requests are
        # never stored, and no worker name can collide with them.
        return f"{self.subject_prefix}.resync.{check_worker(worker)}"

    def worker_of(self, subject: str) -> str | None:
        """The worker a stream subject belongs to, or ``None`` for a foreign subject."""
        head = self.subject_prefix + "."
        if not subject.startswith(head):
            return None
        worker = subject[len(head):]
        return worker if _TOKEN.fullmatch(worker) else None


def check_worker(worker: object) -> str:
    """``worker`` if it can name a subject token, else :class:`InvalidArgumentError`."""
    if not isinstance(worker, str) or not _TOKEN.fullmatch(worker):
        raise InvalidArgumentError(f"worker must be 1-128 characters of A-Z a-z 0-9 _ -, "
                                   f"got {worker!r}")
    return worker


def check_timeout(timeout: object) -> None:
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not (
            0 <= timeout < float("inf")):
        raise InvalidArgumentError(f"timeout must be a finite number of seconds >= 0, "
                                   f"got {timeout!r}")


def new_epoch() -> int:
    """A publisher incarnation: random, so that a restarted process never reuses the
    ``Nats-Msg-Id`` of its previous life (the server would drop those as duplicates)."""
    return secrets.randbits(63)


def msg_headers(worker: str, epoch: int, seq: int, source_seq: int | None = None,
                ) -> dict[str, str]:
    h = {HDR_EPOCH: str(epoch), HDR_SEQ: str(seq), HDR_MSG_ID: f"{worker}:{epoch}:{seq}"}
    if source_seq is not None:
        h[HDR_SOURCE_SEQ] = str(source_seq)
    return h


Wire = dict[str, Any]  # an event as vLLM puts it on the wire (kvbm.events.wire.event_to_wire)


def batch_payloads(events: list[Wire], rank: int | None, limit: int,
                   ) -> Iterator[tuple[bytes | None, int]]:
    """Wire events as packed batches (vLLM's msgpack) of at most ``limit`` bytes each, with
    their event counts; a store or removal too large for one message is split between
    blocks. ``(None, 1)`` stands for one event that cannot fit (one block's worth)."""
    payload = pack_batch(time.time(), events, rank)
    if len(payload) <= limit:
        yield payload, len(events)
        return
    if len(events) > 1:
        half = len(events) // 2
        yield from batch_payloads(events[:half], rank, limit)
        yield from batch_payloads(events[half:], rank, limit)
        return
    parts = split_event(events[0])
    if parts is None:
        yield None, 1
        return
    for part in parts:
        yield from batch_payloads([part], rank, limit)


def split_event(e: Wire) -> list[Wire] | None:
    """One wire event as two, between blocks; ``None`` when it cannot be split."""
    hashes = e.get("block_hashes")
    if not isinstance(hashes, list) or len(hashes) < 2:
        return None
    k = len(hashes) // 2
    if e.get("type") != "BlockStored":
        return [{**e, "block_hashes": hashes[:k]}, {**e, "block_hashes": hashes[k:]}]
    bs, tokens, x = e["block_size"], e["token_ids"], e.get("extra_keys")
    first = {**e, "block_hashes": hashes[:k], "token_ids": tokens[:k * bs]}
    second = {**e, "block_hashes": hashes[k:], "token_ids": tokens[k * bs:],
              "parent_block_hash": hashes[k - 1]}
    if x is not None:
        first["extra_keys"], second["extra_keys"] = x[:k], x[k:]
    return [first, second]


def parse_headers(headers: dict[str, str] | None) -> tuple[int, int] | None:
    """``(epoch, seq)`` of a message, or ``None`` when they are missing or malformed."""
    if not headers:
        return None
    try:
        epoch, seq = int(headers[HDR_EPOCH]), int(headers[HDR_SEQ])
    except (KeyError, ValueError, TypeError):
        return None
    if not (0 <= epoch < 2**63 and 0 <= seq < 2**63):
        return None
    return epoch, seq


def resync_request(epoch: int, seq: int) -> bytes:
    """A consumer's request for a resync: it found a hole before ``(epoch, seq)``."""
    return json.dumps({"epoch": epoch, "seq": seq}).encode()


def parse_resync_request(data: bytes | None) -> tuple[int | None, int | None]:
    """``(epoch, seq)`` of a resync request; ``None`` for what is missing or malformed."""
    try:
        req = json.loads(data or b"{}")
        epoch, seq = req.get("epoch"), req.get("seq")
    except (ValueError, AttributeError):
        return None, None
    return (epoch if type(epoch) is int else None), (seq if type(seq) is int else None)


@dataclass(frozen=True, slots=True)
class NatsPublisherStats:
    """Counters since the publisher was made."""

    epoch: int
    #: the sequence number the next message gets
    next_seq: int
    published_msgs: int
    published_events: int
    queued_events: int
    #: times the queue was full (each followed by a resync) and the events it held then
    overflows: int
    dropped_events: int
    resyncs: int
    resync_requests: int
    #: publishes sent again after a timeout or a lost connection; copies the server dropped
    retries: int
    duplicates: int
    #: messages the server refused outright (each followed by a resync)
    refused: int
    #: snapshot() raised or returned something that is not events
    snapshot_errors: int
    connected: bool


@dataclass(frozen=True, slots=True)
class ConsumerStats:
    """Counters since the consumer was made (``last_stream_seq`` is current)."""

    msgs: int
    events: int
    #: batches seen again (redeliveries, retried publishes), skipped
    duplicates: int
    #: holes found in a worker's sequence (each clears the worker and asks for a resync)
    gaps: int
    resync_requests: int
    #: messages that were not events (headers, subject or payload), skipped
    bad_msgs: int
    #: events a batch held that broke the format, and events the sink refused
    skipped_events: int
    rejected_events: int
    checkpoints: int
    #: blocks replayed into the sink from the checkpoint at start
    restored_blocks: int
    last_stream_seq: int

"""The replay side of the publisher: the last batches, and the ROUTER socket that replays them.

A subscriber that sees a gap in the sequence numbers sends ``[b"", start_seq]`` from a DEALER;
the answer is every buffered batch with ``seq >= start_seq`` as ``[b"", topic, seq, payload]``
and then the end marker ``[b"", b"", seq -1, b""]`` (vLLM 0.32's shapes). When the buffer no
longer reaches back to ``start_seq`` the first batch replayed has a later seq than asked for:
the subscriber sees that the gap cannot be healed this way and waits for a resync, which
such a request triggers (``on_unreachable``: the publisher re-announces its whole state
when it has a snapshot to do it with).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from itertools import islice
from typing import Any

from kvbm.errors import EventDecodeError
from kvbm.events.wire import encode_replay_end, encode_replay_reply, parse_replay_request

log = logging.getLogger(__name__)

#: Requests served per call, so that a flood of them cannot hold up publishing.
_REQUESTS_PER_TURN = 64
#: Bad requests logged at warning level; later ones at debug (they are all counted).
_WARN_BAD = 10


class ReplayBuffer:
    """The last ``steps`` batches as ``(seq, payload)``, seqs contiguous."""

    def __init__(self, steps: int) -> None:
        self._items: deque[tuple[int, bytes]] = deque(maxlen=steps)

    def append(self, seq: int, payload: bytes) -> None:
        if self._items and seq != self._items[-1][0] + 1:
            self._items.clear()  # contiguity is what makes the index arithmetic below valid
        self._items.append((seq, payload))

    def since(self, start: int) -> list[tuple[int, bytes]]:
        """The batches with ``seq >= start``, oldest first."""
        if not self._items:
            return []
        skip = max(0, min(start - self._items[0][0], len(self._items)))
        return list(islice(self._items, skip, None))

    def __len__(self) -> int:
        return len(self._items)

    @property
    def first_seq(self) -> int | None:
        """The oldest seq still held (``None`` when empty)."""
        return self._items[0][0] if self._items else None


class ReplayServer:
    """Answers replay requests on a bound ROUTER socket; used from one thread only."""

    def __init__(self, sock: Any, zmq: Any, topic: bytes, buffer: ReplayBuffer,
                 on_unreachable: Callable[[], None] | None = None) -> None:
        self._sock = sock
        #: called when a request starts before the oldest batch held (its gap cannot heal)
        self._on_unreachable = on_unreachable
        self._zmq = zmq
        self._topic = topic
        self._buffer = buffer
        self.requests = 0
        self.bad_requests = 0
        self.aborted = 0

    def serve(self) -> None:
        """Answer the requests waiting on the socket (at most a few per call)."""
        zmq = self._zmq
        for _ in range(_REQUESTS_PER_TURN):
            try:
                frames = self._sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.requests += 1
            try:
                ident, start = parse_replay_request(frames)
            except EventDecodeError as e:
                self.bad_requests += 1
                level = logging.WARNING if self.bad_requests <= _WARN_BAD else logging.DEBUG
                log.log(level, "ignored a malformed replay request (%d so far): %s",
                        self.bad_requests, e)
                continue
            self._answer(ident, start)

    def _answer(self, ident: bytes, start: int) -> None:
        zmq = self._zmq
        first = self._buffer.first_seq
        if first is not None and start < first and self._on_unreachable is not None:
            self._on_unreachable()
        try:
            # NOBLOCK with ROUTER_MANDATORY: a client that went away or stopped reading is
            # an error here, not a silent drop of part of its replay
            for seq, payload in self._buffer.since(start):
                self._sock.send_multipart([ident, *encode_replay_reply(self._topic, seq,
                                                                       payload)], zmq.NOBLOCK)
            self._sock.send_multipart([ident, *encode_replay_end()], zmq.NOBLOCK)
        except zmq.ZMQError as e:
            # The client gets no end marker: it times out and asks again or resyncs.
            self.aborted += 1
            log.warning("replay to a subscriber aborted (%s); it will not see the end marker",
                        e)

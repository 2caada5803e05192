"""Notifications an agent received: a bounded queue, or a callback.

A notification is the bytes a peer attached to a transfer (``notify=``), delivered after
the transfer's data is in place, or sent alone (``Agent.notify``); either way at most
``Agent.max_notify_bytes``. Without a callback they wait in a queue of at most
``transport.max_notifications``; beyond it the oldest is dropped (counted, warned).
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable
from typing import NamedTuple

from kvbm.transports.server import RateLimitedLog
from kvbm.transports.stats import AgentStats

log = logging.getLogger(__name__)


class Notification(NamedTuple):
    #: The name of the agent that sent it.
    peer: str
    data: bytes


class Inbox:
    def __init__(self, owner: str, limit: int, stats: AgentStats,
                 callback: Callable[[Notification], None] | None) -> None:
        self._owner = owner
        self._limit = limit
        self._stats = stats
        self._callback = callback
        self._notes: collections.deque[Notification] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._rlog = RateLimitedLog()

    def deliver(self, note: Notification) -> None:
        self._stats.count("notifications")
        if self._callback is not None:
            try:
                self._callback(note)
            except Exception:  # the callback's bug must not break the peer's connection
                log.exception("agent %s: notification callback failed", self._owner)
            return
        with self._cond:
            if len(self._notes) >= self._limit:
                self._notes.popleft()
                self._stats.count("notifications_dropped")
                self._rlog.warning("full", "agent %s: %d notifications not taken, dropping "
                                   "the oldest", self._owner, self._limit)
            self._notes.append(note)
            self._cond.notify_all()

    def take_all(self) -> list[Notification]:
        with self._cond:
            out = list(self._notes)
            self._notes.clear()
        return out

    def next(self, timeout: float | None) -> Notification | None:
        with self._cond:
            self._cond.wait_for(lambda: bool(self._notes) or self._closed, timeout)
            return self._notes.popleft() if self._notes else None

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

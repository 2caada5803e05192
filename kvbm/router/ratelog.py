"""Warnings that a misbehaving publisher could repeat thousands of times a second: one per
kind and worker per interval, with the number left out."""

from __future__ import annotations

import logging
import time

#: One warning per kind and worker per this many seconds; the rest are counted.
WARN_EVERY_S = 10.0


class RateLimitedLog:
    def __init__(self, log: logging.Logger, every_s: float = WARN_EVERY_S) -> None:
        self._log = log
        self._every = every_s
        self._last: dict[tuple[str, str], tuple[float, int]] = {}

    def warn(self, worker: str, kind: str, msg: str, *args: object) -> None:
        """``log.warning(msg, *args)`` unless one of ``kind`` for ``worker`` was logged less
        than the interval ago (then it is only counted, and said with the next one)."""
        now = time.monotonic()
        last, suppressed = self._last.get((worker, kind), (-self._every, 0))
        if now - last < self._every:
            self._last[(worker, kind)] = (last, suppressed + 1)
            return
        self._last[(worker, kind)] = (now, 0)
        if suppressed:
            msg += " (%d more like it not logged)"
            args = (*args, suppressed)
        self._log.warning(msg, *args)

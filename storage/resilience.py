"""Fault handling for remote tiers: bounded retries with backoff and jitter, and a breaker.

A dead or sick object store must degrade to *misses*, never to a hung engine.
Three mechanisms do that together:

* every request carries a client-side timeout (set by the backend on its client);
* :func:`call_with_retry` retries transient failures a bounded number of times, sleeping
  with exponential backoff and full jitter so that many workers do not retry in lockstep;
* a :class:`CircuitBreaker` counts consecutive failed attempts; past a threshold it *opens*
  and every call is refused at once (the tier reports misses) until a cool-down has passed.
  Then one probe is let through (*half-open*): its success closes the breaker again, its
  failure re-opens it for a longer cool-down.

A client's timeouts bound each wait for a byte, not a whole answer: a server that trickles
its reply (a byte before each read times out) would hold an attempt forever. So attempts
run on a :class:`DeadlineRunner`, which stops waiting for one once the call's deadline has
passed (the attempt's thread is left to finish on its own).
"""

from __future__ import annotations

import enum
import logging
import math
import queue
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, TypeVar

from kvbm.errors import ConfigError, TierUnavailableError

log = logging.getLogger(__name__)
#: Backoff jitter draws from its own generator: retry threads must not move the
#: application's global ``random`` state (or trip tools that watch it, like Hypothesis).
_JITTER = random.Random()

T = TypeVar("T")


class BreakerState(enum.Enum):
    CLOSED = "closed"  # calls flow
    OPEN = "open"  # calls are refused until the cool-down has passed
    HALF_OPEN = "half_open"  # one probe call is in flight; others are refused


class FaultKind(enum.Enum):
    """How a backend classifies an exception raised by one request."""

    #: the object (or range) does not exist; the service itself is healthy
    MISSING = "missing"
    #: a create-only write found the object already there; the service is healthy
    EXISTS = "exists"
    #: worth another attempt (timeouts, refused connections, 5xx, throttling)
    TRANSIENT = "transient"
    #: will fail again (access denied, no such bucket, bad request); not retried
    PERMANENT = "permanent"


# -- config checks, shared with the object tiers' configs ----------------------------------------
def check_int(owner: str, name: str, value: Any, *, low: int, high: int) -> None:
    """``value`` is an int (not a bool) in ``[low, high]``; else :class:`ConfigError`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{owner}.{name} must be an int, got {value!r}")
    if not low <= value <= high:
        raise ConfigError(f"{owner}.{name} must be in [{low}, {high}], got {value}")


def check_number(owner: str, name: str, value: Any, *, low: float, high: float,
                 low_open: bool = False) -> None:
    """``value`` is a finite real number (int or float, not a bool) in ``[low, high]``
    (``(low, high]`` with ``low_open``); NaN and infinities are refused: a NaN compares
    false with everything, so a NaN timeout or cool-down would silently never fire."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{owner}.{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{owner}.{name} must be finite, got {value!r}")
    if value < low or (low_open and value == low) or value > high:
        bracket = "(" if low_open else "["
        raise ConfigError(f"{owner}.{name} must be in {bracket}{low}, {high}], got {value!r}")


def check_bool(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{owner}.{name} must be true or false, got {value!r}")


#: Longest delay, deadline or cool-down a config may ask for: a day. (Larger values are
#: mistakes, and would overflow socket timeouts.)
MAX_SECONDS = 86_400.0


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries with exponential backoff and full jitter.

    The n-th retry (n = 1, 2, ...) sleeps a uniform random time in
    ``[0, min(max_delay_s, base_delay_s * multiplier ** (n - 1))]`` ("full jitter", which
    spreads retrying clients best). ``deadline_s`` bounds one whole call, sleeps included:
    an attempt still running when it passes is given up (a timeout), so it must leave room
    for the largest transfer (a pack upload) at the slowest rate that is still acceptable.
    """

    max_attempts: int = 3
    base_delay_s: float = 0.05
    max_delay_s: float = 1.0
    multiplier: float = 2.0
    deadline_s: float = 30.0

    def __post_init__(self) -> None:
        check_int("retry", "max_attempts", self.max_attempts, low=1, high=1000)
        check_number("retry", "base_delay_s", self.base_delay_s, low=0.0, high=MAX_SECONDS)
        check_number("retry", "max_delay_s", self.max_delay_s, low=0.0, high=MAX_SECONDS)
        check_number("retry", "multiplier", self.multiplier, low=1.0, high=1000.0)
        check_number("retry", "deadline_s", self.deadline_s, low=0.0, high=MAX_SECONDS,
                     low_open=True)

    def backoff(self, retry: int, rng: random.Random | None = None) -> float:
        """The sleep before retry number ``retry`` (1-based)."""
        try:
            grown = self.base_delay_s * self.multiplier ** (retry - 1)
        except OverflowError:  # many retries with a big multiplier: the cap rules anyway
            grown = self.max_delay_s
        return (rng or _JITTER).uniform(0.0, min(self.max_delay_s, grown))


@dataclass(frozen=True)
class BreakerConfig:
    """When the breaker opens and how long it stays open.

    ``failure_threshold`` consecutive failed attempts open it; it stays open ``cooldown_s``,
    doubled after each failed probe up to ``max_cooldown_s``.
    """

    failure_threshold: int = 5
    cooldown_s: float = 5.0
    max_cooldown_s: float = 60.0

    def __post_init__(self) -> None:
        check_int("breaker", "failure_threshold", self.failure_threshold, low=1,
                  high=1_000_000)
        check_number("breaker", "cooldown_s", self.cooldown_s, low=0.0, high=MAX_SECONDS,
                     low_open=True)
        check_number("breaker", "max_cooldown_s", self.max_cooldown_s, low=0.0,
                     high=MAX_SECONDS, low_open=True)
        if self.max_cooldown_s < self.cooldown_s:
            raise ConfigError(f"breaker.max_cooldown_s ({self.max_cooldown_s}) must be >= "
                              f"cooldown_s ({self.cooldown_s})")


class CircuitBreaker:
    """A thread-safe circuit breaker over consecutive failures.

    ``allow()`` is asked before each attempt; ``record_success()`` / ``record_failure()``
    report its outcome. The clock is injectable so tests need not sleep.
    """

    def __init__(self, config: BreakerConfig | None = None, *,
                 clock: Callable[[], float] = time.monotonic, name: str = "") -> None:
        self.config = config or BreakerConfig()
        self.name = name
        self._clock = clock
        self._lock = threading.Lock()
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._cooldown = self.config.cooldown_s
        self._probe_in_flight = False
        self.opens = 0  # how many times it went CLOSED/HALF_OPEN -> OPEN
        self.rejections = 0  # calls refused while open

    @property
    def state(self) -> BreakerState:
        with self._lock:
            self._maybe_half_open()
            return self._state

    def _maybe_half_open(self) -> None:
        # Called with the lock held: an open breaker whose cool-down has passed becomes
        # half-open lazily, on the next look, so no timer thread is needed.
        if (self._state is BreakerState.OPEN
                and self._clock() - self._opened_at >= self._cooldown):
            self._state = BreakerState.HALF_OPEN
            self._probe_in_flight = False

    def allow(self) -> bool:
        """Whether a call may go out now; in HALF_OPEN only one probe at a time does."""
        with self._lock:
            self._maybe_half_open()
            if self._state is BreakerState.CLOSED:
                return True
            if self._state is BreakerState.HALF_OPEN and not self._probe_in_flight:
                self._probe_in_flight = True
                return True
            self.rejections += 1
            return False

    @property
    def last_opened(self) -> float:
        """The clock's time when the breaker last opened (``-inf`` if it never did)."""
        with self._lock:
            return self._opened_at if self.opens else -math.inf

    def would_allow(self) -> bool:
        """Like :meth:`allow` but takes no probe slot (for cheap fast-path checks)."""
        with self._lock:
            self._maybe_half_open()
            if self._state is BreakerState.HALF_OPEN:
                return not self._probe_in_flight
            return self._state is BreakerState.CLOSED

    def record_success(self) -> None:
        with self._lock:
            if self._state is not BreakerState.CLOSED:
                log.info("circuit breaker %s closed again", self.name)
            self._state = BreakerState.CLOSED
            self._failures = 0
            self._cooldown = self.config.cooldown_s
            self._probe_in_flight = False

    def record_failure(self) -> None:
        with self._lock:
            self._failures += 1
            if self._state is BreakerState.HALF_OPEN:
                # The probe failed: the service is still down; back off harder.
                self._cooldown = min(self._cooldown * 2, self.config.max_cooldown_s)
                self._open()
            elif (self._state is BreakerState.CLOSED
                  and self._failures >= self.config.failure_threshold):
                self._open()

    def _open(self) -> None:
        self._state = BreakerState.OPEN
        self._opened_at = self._clock()
        self._probe_in_flight = False
        self.opens += 1
        log.warning("circuit breaker %s opened after %d consecutive failures; "
                    "refusing calls for %.1f s", self.name, self._failures, self._cooldown)

    def trip(self) -> None:
        """Open the breaker now, whatever its count (the service is known to be unusable,
        e.g. its bucket is missing); it re-arms after the cool-down like any opening."""
        with self._lock:
            if self._state is not BreakerState.OPEN:
                self._open()

    def reset(self) -> None:
        """Close the breaker (for tests and operator commands)."""
        self.record_success()


class DeadlineRunner:
    """Runs calls on a few daemon threads of its own and waits for each at most a given
    time; past it the caller gets a ``TimeoutError`` and the call is left to finish (or
    not) on its thread. The threads are daemons: one stuck on a server that never finishes
    its answer does not hold up the interpreter's exit. While all of them are stuck, calls
    wait in the queue and time out there (and never run)."""

    def __init__(self, threads: int, *, name: str = "kvbm-request") -> None:
        self._queue: queue.SimpleQueue[tuple[Future[Any], Callable[[], Any]] | None] = \
            queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
                         for i in range(threads)]
        for t in self._threads:
            t.start()

    def call(self, fn: Callable[[], T], timeout_s: float) -> T:
        fut: Future[T] = Future()
        self._queue.put((fut, fn))
        try:
            return fut.result(timeout=max(0.0, timeout_s))
        except FutureTimeout:
            fut.cancel()  # still queued: it never runs
            raise TimeoutError(f"no complete answer within {timeout_s:.1f} s") from None

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            fut, fn = item
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as e:  # handed to the waiting caller
                fut.set_exception(e)

    def close(self) -> None:
        """Let the threads end once the calls they run are done (does not wait)."""
        for _ in self._threads:
            self._queue.put(None)


def call_with_retry(fn: Callable[[], T], *, policy: RetryPolicy, breaker: CircuitBreaker,
                    classify: Callable[[BaseException], FaultKind],
                    what: str = "request",
                    sleep: Callable[[float], None] = time.sleep,
                    clock: Callable[[], float] = time.monotonic,
                    rng: random.Random | None = None,
                    on_retry: Callable[[BaseException], None] | None = None,
                    runner: DeadlineRunner | None = None) -> T:
    """Run ``fn`` under the breaker, retrying transient failures.

    Raises :class:`TierUnavailableError` when the breaker refuses the call (also between
    retries, so an opening breaker cuts a retry loop short) or when the retries are spent;
    re-raises the original exception for ``MISSING``, ``EXISTS`` and ``PERMANENT`` faults,
    which the caller handles (the first two also count as a healthy answer). With a
    ``runner``, each attempt runs there and is given up (``TimeoutError``, classified by
    ``classify``) once ``policy.deadline_s`` has passed since the call began.
    """
    start = clock()
    attempt = 0
    while True:
        if not breaker.allow():
            raise TierUnavailableError(f"{what}: circuit breaker {breaker.name} is open")
        attempt += 1
        try:
            if runner is None:
                result = fn()
            else:
                result = runner.call(fn, policy.deadline_s - (clock() - start))
        except Exception as exc:
            kind = classify(exc)
            if kind in (FaultKind.MISSING, FaultKind.EXISTS):
                breaker.record_success()  # the service answered, and meaningfully
                raise
            breaker.record_failure()
            if kind is FaultKind.PERMANENT:
                raise
            delay = policy.backoff(attempt, rng)
            if attempt >= policy.max_attempts or clock() - start + delay > policy.deadline_s:
                raise TierUnavailableError(
                    f"{what} failed after {attempt} attempt(s): {exc!r}") from exc
            log.debug("%s failed (attempt %d/%d, retry in %.3f s): %r", what, attempt,
                      policy.max_attempts, delay, exc)
            if on_retry is not None:
                on_retry(exc)
            sleep(delay)
        else:
            breaker.record_success()
            return result

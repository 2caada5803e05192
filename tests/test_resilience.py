"""Retries, backoff and the circuit breaker (storage/resilience.py), on a fake clock."""

from __future__ import annotations

import random
import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvbm.errors import ConfigError, TierUnavailableError
from kvbm.storage.resilience import (
    BreakerConfig,
    BreakerState,
    CircuitBreaker,
    DeadlineRunner,
    FaultKind,
    RetryPolicy,
    call_with_retry,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.now += s


class Transient(Exception):
    pass


class Missing(Exception):
    pass


class Permanent(Exception):
    pass


def classify(exc: BaseException) -> FaultKind:
    return {Transient: FaultKind.TRANSIENT, Missing: FaultKind.MISSING,
            Permanent: FaultKind.PERMANENT}.get(type(exc), FaultKind.PERMANENT)


def flaky(failures: list[BaseException], result: str = "ok"):  # type: ignore[no-untyped-def]
    calls = []

    def fn() -> str:
        calls.append(1)
        if failures:
            raise failures.pop(0)
        return result

    fn.calls = calls  # type: ignore[attr-defined]
    return fn


def run(fn, clock: FakeClock, breaker: CircuitBreaker | None = None,  # type: ignore[no-untyped-def]
        policy: RetryPolicy | None = None):
    return call_with_retry(fn, policy=policy or RetryPolicy(max_attempts=3),
                           breaker=breaker or CircuitBreaker(clock=clock), classify=classify,
                           sleep=clock.sleep, clock=clock, rng=random.Random(0))


# -- backoff -------------------------------------------------------------------------------------
@given(st.integers(1, 30), st.integers(0, 2**32))
def test_backoff_is_full_jitter_under_an_exponential_cap(retry: int, seed: int) -> None:
    p = RetryPolicy(base_delay_s=0.1, max_delay_s=2.0, multiplier=2.0)
    d = p.backoff(retry, random.Random(seed))
    assert 0.0 <= d <= min(2.0, 0.1 * 2.0 ** (retry - 1))


def test_backoff_is_jittered() -> None:
    p = RetryPolicy(base_delay_s=1.0, max_delay_s=1.0)
    rng = random.Random(1)
    assert len({p.backoff(3, rng) for _ in range(20)}) == 20


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("kw", [
    {"max_attempts": 0}, {"max_attempts": 2.0}, {"max_attempts": True},
    {"max_attempts": 10**6}, {"max_attempts": NAN},
    {"base_delay_s": -1.0}, {"base_delay_s": NAN}, {"base_delay_s": INF},
    {"base_delay_s": "0.1"}, {"max_delay_s": -1.0}, {"max_delay_s": NAN},
    {"max_delay_s": INF}, {"multiplier": 0.5}, {"multiplier": NAN}, {"multiplier": INF},
    {"deadline_s": 0.0}, {"deadline_s": NAN}, {"deadline_s": INF}, {"deadline_s": None},
])
def test_retry_policy_rejects(kw: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        RetryPolicy(**kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("kw", [
    {"failure_threshold": 0}, {"failure_threshold": 2.5}, {"failure_threshold": False},
    {"failure_threshold": 10**9},
    {"cooldown_s": NAN}, {"cooldown_s": INF}, {"cooldown_s": 0.0}, {"cooldown_s": "5"},
    {"max_cooldown_s": NAN}, {"max_cooldown_s": INF},
    {"cooldown_s": 10.0, "max_cooldown_s": 1.0},
])
def test_breaker_config_rejects(kw: dict[str, object]) -> None:
    # A NaN cool-down compares false with every clock reading: the breaker would never
    # re-arm and the tier would stay dead.
    with pytest.raises(ConfigError):
        BreakerConfig(**kw)  # type: ignore[arg-type]


def test_backoff_of_many_retries_stays_capped() -> None:
    p = RetryPolicy(max_attempts=1000, base_delay_s=0.5, max_delay_s=2.0, multiplier=10.0)
    assert 0.0 <= p.backoff(1000, random.Random(0)) <= 2.0


def test_tripped_breaker_rearms_after_its_cooldown() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(BreakerConfig(cooldown_s=2.0, max_cooldown_s=8.0), clock=clock)
    breaker.trip()
    assert breaker.state is BreakerState.OPEN and breaker.opens == 1
    assert not breaker.would_allow()
    breaker.trip()  # already open: no new opening
    assert breaker.opens == 1
    clock.now += 2.0
    assert breaker.allow()  # the probe
    breaker.record_failure()
    clock.now += 2.0
    assert breaker.state is BreakerState.OPEN  # the failed probe doubled the cool-down
    clock.now += 2.0
    assert breaker.allow()
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED


def test_bad_policies() -> None:
    for kw in ({"max_attempts": 0}, {"base_delay_s": -1.0}, {"multiplier": 0.5},
               {"deadline_s": 0.0}):
        with pytest.raises(ConfigError):
            RetryPolicy(**kw)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        BreakerConfig(failure_threshold=0)
    with pytest.raises(ConfigError):
        BreakerConfig(cooldown_s=10.0, max_cooldown_s=1.0)


# -- call_with_retry -----------------------------------------------------------------------------
def test_transient_failures_are_retried_with_backoff() -> None:
    clock = FakeClock()
    fn = flaky([Transient(), Transient()])
    assert run(fn, clock) == "ok"
    assert len(fn.calls) == 3
    assert len(clock.sleeps) == 2
    assert clock.sleeps[1] <= 2 * RetryPolicy().base_delay_s


def test_retries_are_bounded() -> None:
    clock = FakeClock()
    fn = flaky([Transient()] * 10)
    with pytest.raises(TierUnavailableError) as err:
        run(fn, clock)
    assert len(fn.calls) == 3
    assert isinstance(err.value.__cause__, Transient)


def test_deadline_bounds_the_whole_call() -> None:
    clock = FakeClock()
    fn = flaky([Transient()] * 10)
    policy = RetryPolicy(max_attempts=100, base_delay_s=1.0, max_delay_s=1.0, deadline_s=3.0)
    with pytest.raises(TierUnavailableError):
        run(fn, clock, policy=policy)
    assert clock.now <= 3.0


def test_permanent_and_missing_are_not_retried() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(BreakerConfig(failure_threshold=2), clock=clock)
    fn = flaky([Missing()])
    with pytest.raises(Missing):
        run(fn, clock, breaker)
    fn = flaky([Permanent()])
    with pytest.raises(Permanent):
        run(fn, clock, breaker)
    assert clock.sleeps == []
    # A missing object is a healthy answer; a permanent error counts against the service.
    assert breaker.state is BreakerState.CLOSED
    with pytest.raises(Permanent):
        run(flaky([Permanent()]), clock, breaker)
    assert breaker.state is BreakerState.OPEN


# -- the breaker ---------------------------------------------------------------------------------
def test_breaker_opens_refuses_and_rearms() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(BreakerConfig(failure_threshold=3, cooldown_s=5.0,
                                           max_cooldown_s=20.0), clock=clock)
    for _ in range(2):
        breaker.record_failure()
    breaker.record_success()  # consecutive failures only
    for _ in range(2):
        breaker.record_failure()
    assert breaker.state is BreakerState.CLOSED
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN and breaker.opens == 1

    fn = flaky([])
    with pytest.raises(TierUnavailableError):
        run(fn, clock, breaker)
    assert fn.calls == []  # refused without trying
    assert not breaker.would_allow()

    clock.now += 5.0
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.allow()  # the probe
    assert not breaker.allow()  # only one at a time
    breaker.record_failure()  # probe failed: open again, for twice as long
    assert breaker.state is BreakerState.OPEN and breaker.opens == 2
    clock.now += 5.0
    assert breaker.state is BreakerState.OPEN
    clock.now += 5.0
    assert breaker.state is BreakerState.HALF_OPEN
    assert run(flaky([]), clock, breaker) == "ok"  # probe succeeds
    assert breaker.state is BreakerState.CLOSED
    assert breaker.rejections >= 2


def test_an_opening_breaker_cuts_retries_short() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(BreakerConfig(failure_threshold=2), clock=clock)
    fn = flaky([Transient()] * 10)
    with pytest.raises(TierUnavailableError):
        run(fn, clock, breaker, RetryPolicy(max_attempts=10))
    assert len(fn.calls) == 2


def test_breaker_is_thread_safe() -> None:
    breaker = CircuitBreaker(BreakerConfig(failure_threshold=1000))

    def hammer() -> None:
        for _ in range(500):
            breaker.record_failure()

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert breaker.state is BreakerState.OPEN and breaker.opens == 1


def test_backoff_jitter_leaves_the_global_random_state_alone() -> None:
    p = RetryPolicy(base_delay_s=0.1, max_delay_s=1.0)
    state = random.getstate()
    delays = [p.backoff(n) for n in range(1, 20)]
    assert random.getstate() == state
    assert all(0.0 <= d <= 1.0 for d in delays) and len(set(delays)) > 1


def test_an_attempt_that_never_ends_is_given_up_at_the_deadline() -> None:
    # A client's timeouts bound each wait for a byte; a server that trickles its answer
    # never trips them. The runner gives the attempt up once the call's deadline passed.
    runner = DeadlineRunner(1)
    release = threading.Event()
    ran: list[str] = []

    def stuck() -> str:
        release.wait(60)
        ran.append("stuck")
        return "late"

    def queued() -> str:
        ran.append("queued")
        return "never"

    policy = RetryPolicy(max_attempts=3, base_delay_s=0.0, deadline_s=0.2)

    def classify(exc: BaseException) -> FaultKind:
        return FaultKind.TRANSIENT if isinstance(exc, TimeoutError) else FaultKind.PERMANENT

    try:
        for fn in (stuck, queued):  # the second waits behind the stuck one, and times out
            with pytest.raises(TierUnavailableError, match="TimeoutError"):
                call_with_retry(fn, policy=policy, breaker=CircuitBreaker(), classify=classify,
                                runner=runner)
    finally:
        release.set()
        runner.close()
    fresh = DeadlineRunner(1)
    try:
        assert call_with_retry(lambda: "ok", policy=policy, breaker=CircuitBreaker(),
                               classify=classify, runner=fresh) == "ok"
    finally:
        fresh.close()
    for t in runner._threads:
        t.join(10)
    assert ran == ["stuck"]  # a call given up while queued never runs

"""The retry policy and the rate limiter (pure logic; no timing assertions)."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from harvester.api.ratelimit import RateLimiter, most_starts_in_window
from harvester.api.retry import (
    MAX_RETRY_AFTER,
    RetriesExhausted,
    RetryPolicy,
    TransientError,
    parse_retry_after,
    retrying,
)

NOW = datetime(2026, 11, 24, 3, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("5", 5.0),
        (" 0.5 ", 0.5),
        ("0", 0.0),
        (format_datetime(NOW + timedelta(seconds=30), usegmt=True), 30.0),
        (format_datetime(NOW - timedelta(seconds=30), usegmt=True), 0.0),
        (None, None),
        ("", None),
        ("soon", None),
        ("-3", None),
        ("nan", None),
    ],
)
def test_parse_retry_after(value: str | None, seconds: float | None) -> None:
    assert parse_retry_after(value, now=NOW) == seconds


@given(st.integers(min_value=1, max_value=50), st.integers(min_value=0, max_value=2**32))
def test_backoff_grows_and_stays_within_jittered_cap(attempt: int, seed: int) -> None:
    policy = RetryPolicy(base_delay=0.5, max_delay=30.0, jitter=0.5)
    delay = policy.delay(attempt, random.Random(seed))
    raw = min(30.0, 0.5 * 2 ** (attempt - 1))
    assert raw * 0.5 <= delay <= raw * 1.5


def test_retry_after_wins_and_is_capped() -> None:
    policy = RetryPolicy()
    assert policy.delay(1, random.Random(0), retry_after=7.0) == 7.0
    assert policy.delay(1, random.Random(0), retry_after=10_000) == MAX_RETRY_AFTER


@pytest.mark.anyio
async def test_retrying_stops_at_max_attempts() -> None:
    calls: list[int] = []

    async def attempt(n: int) -> str:
        calls.append(n)
        raise TransientError("boom", http_status=503)

    policy = RetryPolicy(max_attempts=3, base_delay=0.001, max_delay=0.001)
    with pytest.raises(RetriesExhausted) as info:
        await retrying(policy, attempt, rng=random.Random(0))
    assert calls == [1, 2, 3]
    assert info.value.attempts == 3
    assert info.value.last.http_status == 503
    assert "gave up after 3 attempts" in str(info.value)


@pytest.mark.anyio
async def test_retrying_respects_the_time_budget() -> None:
    clock = iter(range(0, 1000, 10))

    async def attempt(n: int) -> str:
        raise TransientError("slow")

    policy = RetryPolicy(max_attempts=100, budget=15, base_delay=1, max_delay=1, jitter=0)
    with pytest.raises(RetriesExhausted) as info:
        await retrying(policy, attempt, rng=random.Random(0), clock=lambda: float(next(clock)))
    assert info.value.attempts < 100


@pytest.mark.anyio
async def test_retrying_numbers_the_attempts_and_returns_the_last_value() -> None:
    numbers: list[int] = []

    async def attempt(n: int) -> str:
        numbers.append(n)
        if n < 3:
            raise TransientError("not yet")
        return "done"

    policy = RetryPolicy(base_delay=0.001, max_delay=0.001)
    assert await retrying(policy, attempt, rng=random.Random(0)) == "done"
    assert numbers == [1, 2, 3]


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_limiter_cuts_at_most_by_half_once_a_second_and_recovers() -> None:
    clock = FakeClock()
    limiter = RateLimiter(40, clock=clock)
    for _ in range(20):
        limiter.on_throttled()  # one burst: counted, but the rate halves once
    assert limiter.rate == 20
    assert limiter.throttled == 20
    clock.now = 1.5
    limiter.on_throttled()
    assert limiter.rate == 10
    clock.now = 20.0  # the burst has left the window
    for _ in range(100):
        limiter.on_success()
    assert limiter.rate == 40  # back to the cap, never above


def test_limiter_never_drops_below_its_floor() -> None:
    clock = FakeClock()
    limiter = RateLimiter(4, min_rps=1, clock=clock)
    for step in range(100):
        clock.now = step * 0.5
        limiter.on_throttled()
    assert limiter.rate == 1


@pytest.mark.anyio
async def test_limiter_spaces_slots_by_the_rate() -> None:
    clock = FakeClock()
    limiter = RateLimiter(1000, clock=clock)
    for _ in range(5):
        await limiter.acquire()
    # five slots booked at 1 ms spacing: the next one is 5 ms after the first
    assert limiter._next == pytest.approx(0.005)


@pytest.mark.anyio
async def test_limiter_never_exceeds_the_rate_in_any_second_despite_late_wakeups(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = FakeClock()
    rng = random.Random(1)

    async def late_sleep(seconds: float) -> None:
        # A busy event loop wakes one task in ten late, by up to 40 ms.
        clock.now += seconds + (rng.uniform(0, 0.04) if rng.random() < 0.1 else 0.0)

    monkeypatch.setattr("harvester.api.ratelimit.anyio.sleep", late_sleep)
    limiter = RateLimiter(50, clock=clock)
    starts = []
    for _ in range(1_000):
        await limiter.acquire()
        starts.append(clock.now)
        if rng.random() < 0.01:
            clock.now += 0.05  # and sometimes the loop is busy elsewhere
    # No one-second window holds more than 50 starts, even with 20 ms of slack for the trip
    # to the server; and the rate stays within 5% of 50.
    assert most_starts_in_window(starts, 1.0 + 0.02) <= 50
    rate = (len(starts) - 1) / (starts[-1] - starts[0])
    assert 47.5 <= rate <= 50


def test_expected_waits_add_up_the_schedule_without_jitter_within_the_budget() -> None:
    """What the first "cannot reach the API" line announces."""
    assert RetryPolicy().expected_waits() == 0.5 + 1 + 2 + 4 + 8 + 16 + 30
    assert RetryPolicy(max_attempts=1).expected_waits() == 0
    assert RetryPolicy(budget=10).expected_waits() == 10

"""The cluster limiter's two rules, without Ray: the actor's schedule and the worker's deadline."""

from __future__ import annotations

import math
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from harvester.api.ratelimit import most_starts_in_window
from harvester.run.engine.limiter import LATE, ClusterPermits, RateLimiterActor


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@given(
    rps=st.floats(min_value=1, max_value=200),
    leases=st.lists(
        st.tuples(st.integers(1, 20), st.floats(0, 0.5), st.floats(0, LATE)), max_size=60
    ),
)
def test_starts_inside_their_slots_never_exceed_the_rate(
    rps: float, leases: list[tuple[int, float, float]]
) -> None:
    """Whatever the leases, and however late each start is within its slot's tolerance, no
    one-second window holds more than rps starts."""
    clock = FakeClock()
    actor = RateLimiterActor(rps, clock=clock)
    starts: list[float] = []
    for n, pause, lateness in leases:
        clock.now += pause
        starts.extend(slot + lateness for slot in actor.lease(n))
    assert most_starts_in_window(starts) <= math.floor(rps)


def test_a_throttle_halves_the_rate_and_pauses_the_schedule() -> None:
    clock = FakeClock()
    actor = RateLimiterActor(10, clock=clock)
    actor.on_throttled(retry_after=5)
    assert actor.rate == 5
    assert actor.lease(1)[0] >= clock.now + 5
    actor.lease(1, successes=100)
    assert actor.rate == 10


@pytest.mark.anyio
async def test_a_slot_reached_too_late_is_dropped_not_used() -> None:
    handed: list[int] = []
    now = time.time()
    leases = iter([[now - 1.0], [now + 0.01]])

    async def lease(n: int, *, successes: int, not_before: float) -> list[float]:
        handed.append(n)
        return next(leases)

    throttles: list[float | None] = []
    permits = ClusterPermits(lease, throttles.append)
    await permits.acquire()
    assert (permits.started, permits.dropped) == (1, 1)
    permits.on_throttled(2.0)
    assert throttles == [2.0]

"""The cluster limiter's two rules, without Ray: the actor's schedule and the worker's deadline."""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from harvester.api.ratelimit import most_starts_in_window
from harvester.run.engine.limiter import LATE, SLACK_LATE, ClusterPermits, RateLimiterActor


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@given(
    rps=st.floats(min_value=1, max_value=200),
    leases=st.lists(st.tuples(st.integers(1, 20), st.floats(0, 0.5), st.floats(0, 1)), max_size=60),
)
def test_starts_inside_their_slots_never_exceed_the_rate(
    rps: float, leases: list[tuple[int, float, float]]
) -> None:
    """Whatever the leases, and however late each start is within its slot's tolerance (a
    share of the lateness its lease allows), no one-second window holds more than rps starts."""
    clock = FakeClock()
    actor = RateLimiterActor(rps, clock=clock)
    starts: list[float] = []
    for n, pause, share in leases:
        clock.now += pause
        slots, late = actor.lease(n)
        starts.extend(slot + share * late for slot in slots)
    assert most_starts_in_window(starts) <= math.floor(rps)


def test_slots_may_be_used_later_while_the_schedule_has_room() -> None:
    """A lease that starts now (the cluster wants less than --rps) may be used SLACK_LATE
    late; once the schedule is booked ahead, only LATE (the price of lateness is paid in the
    schedule: every later slot keeps a window after the end of the one rps before it)."""
    clock = FakeClock()
    actor = RateLimiterActor(10, clock=clock)
    slots, late = actor.lease(4)
    assert (slots[0], late) == (clock.now, SLACK_LATE)
    slots, late = actor.lease(8)  # 4 slots 0.1 s apart are still ahead: booked
    assert late == LATE
    clock.now += 2
    assert actor.lease(1)[1] == SLACK_LATE


def test_a_throttle_halves_the_rate_and_pauses_the_schedule() -> None:
    clock = FakeClock()
    actor = RateLimiterActor(10, clock=clock)
    actor.on_throttled(retry_after=5)
    assert actor.rate == 5
    assert actor.lease(1)[0][0] >= clock.now + 5
    actor.lease(1, successes=100)
    assert actor.rate == 10


@pytest.mark.anyio
async def test_a_slot_reached_too_late_is_dropped_not_used() -> None:
    handed: list[int] = []
    now = time.time()
    leases = iter([([now - 1.0], LATE), ([now + 0.01], LATE)])

    async def lease(n: int, *, successes: int, not_before: float) -> tuple[list[float], float]:
        handed.append(n)
        return next(leases)

    throttles: list[float | None] = []
    permits = ClusterPermits(lease, throttles.append)
    await permits.acquire()
    assert (permits.started, permits.dropped) == (1, 1)
    permits.on_throttled(2.0)
    assert throttles == [2.0]


@pytest.mark.anyio
async def test_the_next_lease_is_asked_for_while_half_the_slots_are_left() -> None:
    """A request seldom waits for a round trip to the actor: the next lease is asked for (the
    call sent) while half a lease or more is left, and its answer used when they run out."""
    asked: list[int] = []

    async def answer(slots: list[float]) -> tuple[list[float], float]:
        return slots, LATE

    def lease(n: int, *, successes: int, not_before: float) -> Awaitable[tuple[list[float], float]]:
        asked.append(n)  # when the call is made, not when its answer is awaited
        return answer([time.time() + 0.001 * i for i in range(n)])

    permits = ClusterPermits(lease, lambda retry_after: None)
    seen = []
    for _ in range(7):
        await permits.acquire()
        seen.append(list(asked))

    assert seen == [
        [1, 2],  # the first lease waited for, the next asked at once
        [1, 2, 4],  # the second arrived: the third asked at once (leases grow while used)
        [1, 2, 4],
        [1, 2, 4, 8],
        [1, 2, 4, 8],
        [1, 2, 4, 8],
        [1, 2, 4, 8],
    ]
    assert (permits.started, permits.dropped) == (7, 0)
    permits.on_throttled(None)  # the lease asked ahead is dropped (its slots precede the pause)

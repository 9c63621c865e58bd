"""One ``--rps`` for a whole cluster: a limiter actor hands out start times, and each shard's
process keeps to them.

The promise is the one a single machine keeps (``harvester.api.ratelimit``): no window of one
second holds more than ``rps`` request starts, whichever node starts them, counted on the API
server's clock. A schedule alone does not keep it: a start that wakes late lands close to the
next one, and one window holds ``rps + 1``. So there are two rules, one on each side:

* **The actor** (:class:`RateLimiterActor`, one per run, on the driver's node) hands out start
  times ("slots") ``1 / rate`` apart, each with how late it may still be used, and never a slot
  less than ``window`` after the end (slot + lateness) of the slot ``floor(rps)`` before it.
* **Each worker** (:class:`ClusterPermits`) starts a request between its slot and the slot's
  end, or not at all: a slot it reaches later than that is dropped and it takes another.

Then any ``floor(rps) + 1`` real starts are at least ``window`` (one second plus the margin for
the trip to the server) apart, across the cluster: the promise holds, whatever each slot's
lateness. Lateness is a price paid in the schedule, so the actor sets it by how busy the
schedule is: ``LATE`` (30 ms) when its slots are booked ahead (the cluster wants more than
``rps``; at full speed it starts ``rps / (window + LATE)`` per second, about 93% of ``rps``),
``SLACK_LATE`` (0.25 s) when there is room, so that a worker whose requests come every few
milliseconds can use a whole lease rather than a few slots of each. Slots are wall-clock times
(``time.time``): the nodes' clocks must agree to well within the margin, as NTP keeps them.

A worker takes slots in small leases (one actor call per lease, not per request), growing the
lease while it uses every slot and shrinking it when slots expire unused. It asks for the next
lease while half a lease or more is left (the call is sent at once, its answer awaited when
the slots run out), so that a request seldom waits for a round trip to the actor: the slots
are the actor's schedule either way, so asking early changes nothing in the promise, only how
many leased slots may expire unused. A 429 slows the whole
cluster: the worker tells the actor, which halves the rate (at most once a second) and pauses
every slot after ``Retry-After``; successes, reported with the next lease, bring it back.

The actor is a plain class here, made a Ray actor by ``harvester.run.engine.ray``; nothing in
this module imports Ray.
"""

from __future__ import annotations

import inspect
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Final, Protocol

import anyio

CLUSTER_MARGIN: Final = 0.05
"""Seconds added to the one-second window across a cluster: more than one machine's
``WINDOW_MARGIN``, for the jitter between a start on one node and its arrival at the server,
beside another node's (docs/performance.md has the measurement)."""
LATE: Final = 0.03
"""Seconds after its slot that a worker may still start a request when the schedule is booked;
later, the slot is dropped."""
SLACK_LATE: Final = 0.25
"""The same when the schedule has room (a lease's first slot is the actor's now)."""
MAX_LEASE: Final = 16
"""The most slots one lease hands a worker."""


class RateLimiterActor:
    """The cluster's one schedule of request starts. Ray runs its calls one at a time."""

    def __init__(
        self,
        max_rps: float,
        *,
        min_rps: float = 0.5,
        recovery_successes: int = 100,
        window: float = 1.0 + CLUSTER_MARGIN,
        late: float = LATE,
        slack_late: float = SLACK_LATE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_rps <= 0:
            raise ValueError("max_rps must be positive")
        self.max_rps = max_rps
        self.min_rps = min(min_rps, max_rps)
        self.rate = max_rps
        self.lowest_rate = max_rps
        self._step = max_rps / recovery_successes
        self._window = window
        self._late = late
        self._slack_late = max(late, slack_late)
        self._clock = clock
        self._ends: deque[float] = deque(maxlen=max(1, math.floor(max_rps)))
        """When the last ``floor(max_rps)`` slots end (slot + lateness)."""
        self._next = clock()
        self._last_cut = float("-inf")

    def lease(
        self, n: int, *, successes: int = 0, not_before: float = 0.0
    ) -> tuple[list[float], float]:
        """``n`` start times, in order, none before ``not_before`` or now, and how late each
        may be used. ``successes``: how many requests answered without a 429 since the
        worker's last lease."""
        if successes > 0:
            self.rate = min(self.max_rps, self.rate + self._step * successes)
        ends = self._ends
        earliest = max(self._clock(), not_before)
        booked = self._next > earliest or (
            len(ends) == ends.maxlen and ends[0] + self._window > earliest
        )
        late = self._late if booked else self._slack_late
        out: list[float] = []
        for _ in range(max(1, n)):
            slot = max(self._next, earliest)
            if len(ends) == ends.maxlen:
                slot = max(slot, ends[0] + self._window)
            ends.append(slot + late)
            out.append(slot)
            self._next = slot + 1.0 / self.rate
        return out, late

    def on_throttled(self, retry_after: float | None = None) -> None:
        """A worker got a 429: slow the whole cluster down."""
        now = self._clock()
        if now - self._last_cut >= 1.0:
            self._last_cut = now
            self.rate = max(self.min_rps, self.rate / 2)
            self.lowest_rate = min(self.lowest_rate, self.rate)
        if retry_after is not None and retry_after > 0:
            self._next = max(self._next, now + retry_after)

    def stats(self) -> dict[str, float]:
        return {"rate": self.rate, "lowest_rate": self.lowest_rate}


class LeaseCall(Protocol):
    """How a worker asks the actor for a lease: with Ray, ``actor.lease.remote`` (the call is
    sent at once; its answer is awaitable later), in unit tests a plain coroutine (sent only
    when awaited)."""

    def __call__(
        self, n: int, *, successes: int, not_before: float
    ) -> Awaitable[tuple[list[float], float]]: ...


class ClusterPermits:
    """A shard process's side of the cluster limiter: ``await permits.acquire()`` returns when
    this process may start one request, inside its slot."""

    def __init__(
        self,
        lease: LeaseCall,
        throttled: Callable[[float | None], object],
        *,
        max_lease: int = MAX_LEASE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._lease = lease
        self._throttled = throttled
        self._max_lease = max(1, max_lease)
        self._clock = clock
        self._slots: deque[tuple[float, float]] = deque()
        """Leased slots: (start, end)."""
        self._size = 1
        self._next_lease: Awaitable[tuple[list[float], float]] | None = None
        """A lease asked for before the slots ran out, not yet awaited."""
        self._lock = anyio.Lock(fast_acquire=True)
        """``fast_acquire``: a free lock is taken without yielding to the event loop while
        holding the rate limiter's turn."""
        self._successes = 0
        self._round_trip = 0.0
        self.started = 0
        self.dropped = 0
        """Slots reached too late (or left over when a lease was not used up), never started."""

    async def acquire(self) -> None:
        async with self._lock:
            while True:
                slot, end = await self._take()
                wait = slot - self._clock()
                if wait > 0:
                    await anyio.sleep(wait)
                if self._clock() <= end:
                    self.started += 1
                    return
                self.dropped += 1
                self._size = max(1, self._size // 2)

    async def _take(self) -> tuple[float, float]:
        now = self._clock()
        expired = 0
        while self._slots and self._slots[0][1] < now:
            self._slots.popleft()  # expired while no request wanted it
            expired += 1
        if expired:
            # Once per lease, not per slot: a lease with many unused slots must not shrink to
            # one, or every request waits for a round trip to the actor.
            self.dropped += expired
            self._size = max(1, self._size // 2)
        if not self._slots:
            pending, self._next_lease = self._next_lease, None
            if pending is None:  # nothing asked ahead: wait for a round trip, and time it
                slots, late = await self._ask(now)
                took = self._clock() - now
                # Smoothed: one slow trip (a busy actor) must not set every later lease's first
                # slot that far ahead.
                self._round_trip = took if self.started == 0 else (3 * self._round_trip + took) / 4
            else:
                slots, late = await pending
            self._slots.extend((slot, slot + late) for slot in slots)
            self._size = min(self._max_lease, self._size * 2)
        slot = self._slots.popleft()
        if self._next_lease is None and len(self._slots) <= self._size // 2:
            self._next_lease = self._ask(self._clock())
        return slot

    def _ask(self, now: float) -> Awaitable[tuple[list[float], float]]:
        """The next lease, its first slot no earlier than its answer is expected back."""
        successes, self._successes = self._successes, 0
        return self._lease(self._size, successes=successes, not_before=now + self._round_trip)

    def _forget_next_lease(self) -> None:
        pending, self._next_lease = self._next_lease, None
        if inspect.iscoroutine(pending):
            pending.close()  # never sent (a plain coroutine); Ray's call was sent, and is dropped

    def on_throttled(self, retry_after: float | None) -> None:
        self._slots.clear()  # the actor pauses the schedule: slots already leased would not
        self._forget_next_lease()
        self._throttled(retry_after)

    def on_success(self) -> None:
        self._successes += 1

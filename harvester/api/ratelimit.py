"""A rate limiter shared by every task of a lane, that slows down by the share of 429s.

Two rules fix when requests start, both on the limiter's clock. Requests start ``1 / rate``
seconds apart on a fixed schedule; a task woken late does not push the schedule back (the next
turns catch up, within ``CATCH_UP``), so late wake-ups do not lower the average rate. And no
window of ``window`` seconds (one second plus a small margin) ever holds more than ``max_rps``
starts, counting when each start really happened: when the event loop was busy and two starts
came late and close together, the next one waits. The margin absorbs the moment between a start
here and its arrival at the server, so the server, too, never sees more than ``max_rps``
requests begin within one second.

The rate follows the share of answers that were 429s, not each 429 (client-side adaptive
throttling, Google SRE book, ch. 21). Over the last ``THROTTLE_WINDOW`` seconds, while no more
than ``K`` requests were sent per accepted one (SRE's rejection probability
``(requests - K * accepts) / (requests + 1)`` is 0), nothing slows: a relay that throttles a
steady tenth of the requests keeps the full rate. Above that, the rate comes down to ``K`` times
the accepted rate (at most halving, once a second), so a relay that accepts X a second is sent
about ``K * X`` and every slot it has is used; it climbs back by ``max_rps / RECOVERY`` per
accepted answer once the share is low again. ``Retry-After`` is the throttled request's own
wait (``retry.py``), never a pause of the others.

When several processes (a cluster's shards) share one rate, a ``permits`` source
(:class:`PermitSource`, e.g. a Ray limiter actor's worker side) hands out the start times: the
limiter keeps its own window rule for this process's starts, then waits for a permit, and
starts at once. A 429 is passed on to the source, which slows every process down.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Final, Protocol

import anyio

WINDOW_MARGIN: Final = 0.02
"""Seconds added to the one-second window: the slack for a start to reach the server."""
CATCH_UP: Final = 0.1
"""How far behind its schedule the limiter may fall (late wake-ups) and still catch up."""
K: Final = 1.25
"""Requests sent per accepted one before the rate comes down: a relay may throttle up to
1 - 1 / K (a fifth) of the answers with no slowdown."""
THROTTLE_WINDOW: Final = 10
"""Seconds of answers (in one-second buckets) the throttled share is measured over."""
MIN_ANSWERS: Final = 10
"""Answers in the window before the rate may come down: one early 429 is not a share."""
RECOVERY: Final = 50
"""Accepted answers that take the rate from 0 back to ``max_rps`` once the 429s ease."""


def reject_share(requests: float, accepts: float, *, k: float = K) -> float:
    """SRE's client-side throttling probability: the share of requests to hold back so that
    no more than ``k`` are sent per accepted one; 0 while the server accepts enough."""
    return max(0.0, (requests - k * accepts) / (requests + 1))


def throttled_rate(
    requests: float,
    accepts: float,
    seconds: float,
    *,
    max_rps: float,
    min_rps: float,
    k: float = K,
) -> float:
    """The rate to send at after ``requests`` answers, ``accepts`` of them not 429, over the
    last ``seconds``: ``max_rps`` while ``reject_share`` is 0, else ``k`` times the accepted
    rate, kept within ``[min_rps, max_rps]``."""
    if reject_share(requests, accepts, k=k) == 0.0 or seconds <= 0:
        return max_rps
    return min(max_rps, max(min_rps, k * accepts / seconds))


class ThrottleWindow:
    """Answers (requests, and those accepted) per second over the last ``seconds`` seconds."""

    def __init__(self, *, seconds: int = THROTTLE_WINDOW) -> None:
        self.seconds = seconds
        self._buckets: deque[list[int]] = deque()
        """``[second, requests, accepts]``, oldest first, only seconds that had answers."""

    def add(self, now: float, *, accepted: bool) -> None:
        second = math.floor(now)
        buckets = self._buckets
        if not buckets or buckets[-1][0] != second:
            buckets.append([second, 0, 0])
            while buckets[0][0] <= second - self.seconds:
                buckets.popleft()
        bucket = buckets[-1]
        bucket[1] += 1
        bucket[2] += accepted

    def totals(self, now: float) -> tuple[int, int, float]:
        """Requests, accepts and the seconds they span (up to ``now``, at least one)."""
        oldest = math.floor(now) - self.seconds
        live = [b for b in self._buckets if b[0] > oldest]
        if not live:
            return 0, 0, 0.0
        span = max(1.0, min(float(self.seconds), now - live[0][0]))
        return sum(b[1] for b in live), sum(b[2] for b in live), span


class _Turns:
    """A lock handed over in order of asking, re-polls first: a pending request's re-poll is
    never stuck behind new requests, however slow the rate. No checkpoint when free."""

    def __init__(self) -> None:
        self._held = False
        self._first: deque[anyio.Event] = deque()
        self._rest: deque[anyio.Event] = deque()

    async def acquire(self, *, first: bool) -> None:
        if not self._held and not self._first and not self._rest:
            self._held = True
            return
        event = anyio.Event()
        queue = self._first if first else self._rest
        queue.append(event)
        try:
            await event.wait()
        except BaseException:  # cancelled: leave the queue, or pass on a turn handed over
            if event.is_set():
                self.release()
            else:
                queue.remove(event)
            raise

    def release(self) -> None:
        """Hand the lock to the next waiter (it stays held), or free it."""
        for queue in (self._first, self._rest):
            if queue:
                queue.popleft().set()
                return
        self._held = False


class PermitSource(Protocol):
    """Start times shared with other processes: ``acquire`` returns when this process may
    start one request (and it must start at once)."""

    async def acquire(self) -> None: ...
    def on_throttled(self, retry_after: float | None) -> None: ...
    def on_success(self) -> None: ...


class RateLimiter:
    def __init__(
        self,
        max_rps: float,
        *,
        permits: PermitSource | None = None,
        min_rps: float = 0.5,
        k: float = K,
        window: float = 1.0 + WINDOW_MARGIN,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_rps <= 0:
            raise ValueError("max_rps must be positive")
        self.max_rps = max_rps
        self.min_rps = min(min_rps, max_rps)
        self.rate = max_rps
        self.lowest_rate = max_rps
        """The slowest the run went, for the summary."""
        self._k = k
        self._answers = ThrottleWindow()
        self._clock = clock
        self._window = window
        self._starts: deque[float] = deque(maxlen=max(1, math.floor(max_rps)))
        """When the last ``floor(max_rps)`` starts really happened."""
        self._next = clock()
        self._last_cut = float("-inf")
        self._turns = _Turns()
        self._permits = permits
        """The cluster's start times, if the rate is shared; None: this limiter's own."""
        self.throttled = 0

    async def acquire(self, *, first: bool = False) -> None:
        """Wait for this task's turn. Turns are handed out one at a time, in order of asking;
        ``first`` (re-polls of pending requests) go before the others."""
        await self._turns.acquire(first=first)
        try:
            now = self._clock()
            if self._next < now - CATCH_UP:
                self._next = now  # idle for a while: start afresh, no burst to catch up
            # With permits the shared schedule sets the pace; this process's window stays.
            slot = self._next if self._permits is None else now
            starts = self._starts
            if len(starts) == starts.maxlen:
                slot = max(slot, starts[0] + self._window)
            if slot > now:
                await anyio.sleep(slot - now)
            if self._permits is not None:
                await self._permits.acquire()  # last: the start follows its permit at once
            self._next = slot + 1.0 / self.rate
            starts.append(max(self._clock(), slot))
        finally:
            self._turns.release()

    def on_throttled(self, retry_after: float | None = None) -> None:
        """The API answered 429. Its ``Retry-After`` is that request's own wait (the retry
        loop sleeps it); the others go on at the rate the throttled share allows. With
        ``permits``, the whole cluster slows down too."""
        self.throttled += 1
        if self._permits is not None:
            self._permits.on_throttled(retry_after)
        self._answered(accepted=False)

    def on_success(self) -> None:
        """The API answered something other than 429 (a result, pending, an error)."""
        if self._permits is not None:
            self._permits.on_success()
        if self.rate >= self.max_rps:  # the common case, kept cheap: an accept never slows
            self._answers.add(self._clock(), accepted=True)
            return
        self._answered(accepted=True)

    def _answered(self, *, accepted: bool) -> None:
        now = self._clock()
        self._answers.add(now, accepted=accepted)
        requests, accepts, seconds = self._answers.totals(now)
        if reject_share(requests, accepts, k=self._k) == 0.0:
            if accepted:  # additive increase, back to max_rps within RECOVERY answers
                self._set_rate(min(self.max_rps, self.rate + self.max_rps / RECOVERY))
            return
        if requests < MIN_ANSWERS or now - self._last_cut < 1.0:
            return
        target = throttled_rate(
            requests, accepts, seconds, max_rps=self.max_rps, min_rps=self.min_rps, k=self._k
        )
        if target < self.rate:
            self._last_cut = now
            self._set_rate(max(target, self.rate / 2))

    def _set_rate(self, rate: float) -> None:
        # Already-booked turns keep their time; the next ones follow the new rate.
        self._next += 1.0 / rate - 1.0 / self.rate
        self.rate = rate
        self.lowest_rate = min(self.lowest_rate, rate)


def most_starts_in_window(starts: Iterable[float], width: float = 1.0) -> int:
    """The most of ``starts`` (times, any unit) within any window ``[t, t + width)``: what
    the limiter promises to keep at or under ``max_rps`` for a one-second window. Used by the
    tests and the bench to check it from the server's side."""
    times = sorted(starts)
    best = j = 0
    for i, t in enumerate(times):
        while j < len(times) and times[j] < t + width:
            j += 1
        best = max(best, j - i)
    return best

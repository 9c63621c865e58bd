"""A rate limiter shared by every task of a run, that backs off when the API says 429.

Two rules, both on the limiter's clock. Requests start ``1 / rate`` seconds apart on a fixed
schedule; a task woken late does not push the schedule back (the next turns catch up, within
``CATCH_UP``), so late wake-ups do not lower the average rate. And no window of
``window`` seconds (one second plus a small margin) ever holds more than ``max_rps`` starts,
counting when each start really happened: when the event loop was busy and two starts came
late and close together, the next one waits. The margin absorbs the moment between a start here
and its arrival at the server, so the server, too, never sees more than ``max_rps`` requests
begin within one second.

On a 429 the whole run slows down: the rate halves (at most once per second, so one burst of
429s counts once) and a ``Retry-After`` pauses every task. Each success then adds back a small
step, so the rate climbs again once the 429s stop.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Final

import anyio

WINDOW_MARGIN: Final = 0.02
"""Seconds added to the one-second window: the slack for a start to reach the server."""
CATCH_UP: Final = 0.1
"""How far behind its schedule the limiter may fall (late wake-ups) and still catch up."""


class RateLimiter:
    def __init__(
        self,
        max_rps: float,
        *,
        min_rps: float = 0.5,
        recovery_successes: int = 100,
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
        self._step = max_rps / recovery_successes
        self._clock = clock
        self._window = window
        self._starts: deque[float] = deque(maxlen=max(1, math.floor(max_rps)))
        """When the last ``floor(max_rps)`` starts really happened."""
        self._next = clock()
        self._last_cut = float("-inf")
        self._lock = anyio.Lock(fast_acquire=True)  # FIFO: turns go in the order they were asked
        self.throttled = 0

    async def acquire(self) -> None:
        """Wait for this task's turn. Turns are handed out one at a time, in order."""
        async with self._lock:
            now = self._clock()
            if self._next < now - CATCH_UP:
                self._next = now  # idle for a while: start afresh, no burst to catch up
            slot = self._next
            starts = self._starts
            if len(starts) == starts.maxlen:
                slot = max(slot, starts[0] + self._window)
            if slot > now:
                await anyio.sleep(slot - now)
            self._next = slot + 1.0 / self.rate
            starts.append(max(self._clock(), slot))

    def on_throttled(self, retry_after: float | None = None) -> None:
        """The API answered 429: slow every task down."""
        self.throttled += 1
        now = self._clock()
        if now - self._last_cut >= 1.0:
            self._last_cut = now
            self.rate = max(self.min_rps, self.rate / 2)
            self.lowest_rate = min(self.lowest_rate, self.rate)
        if retry_after is not None and retry_after > 0:
            self._next = max(self._next, now + retry_after)

    def on_success(self) -> None:
        if self.rate < self.max_rps:
            self.rate = min(self.max_rps, self.rate + self._step)


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

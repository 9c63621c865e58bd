"""A rate limiter shared by every task of a run, that backs off when the API says 429.

Requests are spaced at least ``1 / rate`` seconds apart (no bursts), so no one-second window
ever sees more than ``max_rps`` starts. On a 429 the whole run slows down: the rate halves (at
most once per second, so one burst of 429s counts once) and a ``Retry-After`` pauses every task.
Each success then adds back a small step, so the rate climbs again once the 429s stop.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import anyio


class RateLimiter:
    def __init__(
        self,
        max_rps: float,
        *,
        min_rps: float = 0.5,
        recovery_successes: int = 100,
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
        self._next = clock()
        self._last_cut = float("-inf")
        self._lock = anyio.Lock()
        self.throttled = 0
        self.acquired = 0

    async def acquire(self) -> None:
        """Wait for this task's turn."""
        async with self._lock:
            now = self._clock()
            slot = max(now, self._next)
            self._next = slot + 1.0 / self.rate
            self.acquired += 1
        if slot > now:
            await anyio.sleep(slot - now)

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

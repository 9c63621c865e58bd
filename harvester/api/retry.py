"""The retry policy, in one place: what is worth another attempt, and how long to wait.

Transport errors, timeouts, 408, 409, 429, 502, 503 and 504 are transient (as in fal's own
clients); everything else is a final answer. Waits grow exponentially with jitter, honour a
``Retry-After`` header (seconds or an HTTP date) and stay inside a per-request time budget.
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Final, TypeVar

import anyio

RETRYABLE_STATUS: Final = frozenset({408, 409, 429, 502, 503, 504})
RETRY_AFTER_STATUS: Final = frozenset({429, 503})
MAX_RETRY_AFTER: Final = 300.0
"""A Retry-After longer than this is capped: a nightly run waits, but not for hours."""

T = TypeVar("T")


def attempt_seconds(read_timeout: float | None) -> float:
    """The most one attempt (a request, its redirects and its whole body) may take: the read
    timeout bounds each wait, this bounds their sum, so a server that trickles a byte at a
    time or sends ``100 Continue`` without end cannot hold a request for long. Four read
    timeouts, at least 30 s (a 64 MiB image at 2 MB/s)."""
    return max(30.0, 4 * (read_timeout or 60.0))


class TransientError(Exception):
    """One attempt failed in a way another attempt may fix."""

    def __init__(
        self, reason: str, *, http_status: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.http_status = http_status
        self.retry_after = retry_after


class RetriesExhausted(Exception):
    """Every attempt allowed by the policy failed transiently."""

    def __init__(self, last: TransientError, attempts: int) -> None:
        super().__init__(f"{last.reason} (gave up after {attempts} attempts)")
        self.last = last
        self.attempts = attempts


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    max_attempts: int = 8
    """Attempts per request, the first included."""
    budget: float = 300.0
    """Seconds one request may spend across all its attempts and waits."""
    base_delay: float = 0.5
    max_delay: float = 30.0
    jitter: float = 0.5
    """Each wait is multiplied by a random factor in [1 - jitter, 1 + jitter]."""

    def delay(self, attempt: int, rng: random.Random, retry_after: float | None = None) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        if retry_after is not None:
            return min(max(retry_after, 0.0), MAX_RETRY_AFTER)
        return float(self._unjittered(attempt) * rng.uniform(1 - self.jitter, 1 + self.jitter))

    def expected_waits(self) -> float:
        """Seconds the waits between all of a request's attempts add up to, each without its
        jitter (the middle of what they take), at most the budget."""
        return min(self.budget, sum(self._unjittered(n) for n in range(1, self.max_attempts)))

    def _unjittered(self, attempt: int) -> float:
        return min(self.max_delay, self.base_delay * 2.0 ** (attempt - 1))


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP date), or None."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return seconds if seconds >= 0 and seconds == seconds else None
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


async def retrying(
    policy: RetryPolicy,
    attempt: Callable[[int], Awaitable[T]],
    *,
    rng: random.Random,
    on_retry: Callable[[TransientError], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """Run ``attempt(n)`` (``n`` counts from 1) until it returns, retrying ``TransientError``
    under ``policy``; raises ``RetriesExhausted`` when the attempts or the time budget run out.
    """
    deadline = clock() + policy.budget
    n = 0
    while True:
        n += 1
        try:
            return await attempt(n)
        except TransientError as exc:
            if n >= policy.max_attempts:
                raise RetriesExhausted(exc, n) from exc
            wait = policy.delay(n, rng, exc.retry_after)
            if clock() + wait > deadline:
                raise RetriesExhausted(exc, n) from exc
            if on_retry is not None:
                on_retry(exc)
            await anyio.sleep(wait)

"""Engines: what runs a run's shards, one function call per shard.

An engine takes the one function that runs a shard (``fn(spec) -> result``), the shards' specs,
and a callback that the caller's own process gets for each result as it arrives. It knows
nothing of harvesting: specs and results are whatever ``fn`` takes and returns, as long as they
pickle. A shard that cannot be run (the function raised, or its process or node kept dying
beyond ``max_retries``) is returned as a :class:`Failure`, never hidden and never a crash of the
whole run: the caller decides what it means for the exit code.

``InlineEngine`` runs the shards one after another in this process (the reference behaviour,
and the engine for tests). ``harvester.run.engine.ray.RayEngine`` runs them as Ray tasks on a
cluster; it is imported only when asked for, so Ray stays an optional extra.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from harvester.errors import ExitCode, HarvesterError

S = TypeVar("S")
"""A shard's spec: what the shard function takes (a picklable value)."""
R = TypeVar("R")
"""A shard's result: what the shard function returns (a picklable value, its counters)."""

DEFAULT_MAX_RETRIES = 3
"""How many times a shard is run again after its process or node died."""


@dataclass(frozen=True, slots=True)
class Failure(Generic[S]):
    """A shard that produced no result."""

    spec: S
    error: str
    """What went wrong, in one line: the exception the shard raised, or how its worker died."""
    exit_code: ExitCode
    """The exit code this failure stands for: the shard's own error's (a HarvesterError, e.g.
    AUTH), WORKER when its process or node died more often than the retries allow, BUG for any
    other exception."""


class Engine(Protocol):
    def run(
        self,
        fn: Callable[[S], R],
        specs: Iterable[S],
        *,
        on_result: Callable[[S, R], None],
        max_retries: int = DEFAULT_MAX_RETRIES,
    ) -> list[Failure[S]]:
        """Run ``fn`` once for each spec (consuming ``specs`` lazily, a bounded number in flight),
        call ``on_result(spec, result)`` in this process for each as it finishes (exactly once per
        spec), and return the specs that never finished. A spec whose worker process or node dies
        runs again, at most ``max_retries`` times; one whose ``fn`` raises is not run again (the
        same input would raise again) and is a failure at once."""
        ...


def failure_of(spec: S, exc: BaseException) -> Failure[S]:
    """The failure for a shard whose function raised ``exc``."""
    code = exc.exit_code if isinstance(exc, HarvesterError) else ExitCode.BUG
    return Failure(spec=spec, error=f"{type(exc).__name__}: {exc}", exit_code=code)


class InlineEngine:
    """Every shard in this process, one after another."""

    def run(
        self,
        fn: Callable[[S], R],
        specs: Iterable[S],
        *,
        on_result: Callable[[S, R], None],
        max_retries: int = DEFAULT_MAX_RETRIES,
    ) -> list[Failure[S]]:
        del max_retries  # a process that dies here is the caller's own: nothing to retry
        failures: list[Failure[S]] = []
        for spec in specs:
            try:
                result = fn(spec)
            except Exception as exc:  # noqa: BLE001 - a shard's failure is reported, not raised
                failures.append(failure_of(spec, exc))
                continue
            on_result(spec, result)
        return failures

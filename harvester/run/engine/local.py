"""The local engine: shards in a pool of this machine's processes (``--workers N``).

The same contract as every engine (``harvester.run.engine.Engine``): a bounded number of specs
in flight, each result handed to ``on_result`` in this process as it arrives, a spec that
raised returned as a failure. A worker process that dies (killed, out of memory) breaks the
whole pool in ``concurrent.futures``: the pool is made anew and the specs that were in it run
again, each at most ``max_retries`` times, after which they are failures with exit code WORKER.
(``concurrent.futures`` does not say whose process died: a broken pool charges a run to every
spec that was in it.)
Processes start with ``spawn``: the parent runs threads, and a forked copy of them is unsafe.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

from harvester.errors import ExitCode
from harvester.run.engine import DEFAULT_MAX_RETRIES, Failure, R, S, failure_of


class LocalEngine:
    def __init__(self, *, workers: int = 2, max_in_flight: int | None = None) -> None:
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self.workers = workers
        self.max_in_flight = max_in_flight or 2 * workers

    def _pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))

    def run(
        self,
        fn: Callable[[S], R],
        specs: Iterable[S],
        *,
        on_result: Callable[[S, R], None],
        max_retries: int = DEFAULT_MAX_RETRIES,
    ) -> list[Failure[S]]:
        todo: Iterator[S] = iter(specs)
        exhausted = False
        again: list[tuple[S, int]] = []
        """Specs whose process died, with how many times they have run."""
        in_flight: dict[Future[R], tuple[S, int]] = {}
        failures: list[Failure[S]] = []

        def settle(future: Future[R], spec: S, runs: int) -> bool:
            """Hand on one finished spec; False when its pool broke under it."""
            try:
                result = future.result()
            except BrokenProcessPool:
                if runs > max_retries:
                    failures.append(Failure(spec, "its worker process died", ExitCode.WORKER))
                else:
                    again.append((spec, runs))
                return False
            except Exception as exc:  # noqa: BLE001 - a shard's failure is reported, not raised
                failures.append(failure_of(spec, exc))
                return True
            on_result(spec, result)
            return True

        pool = self._pool()
        try:
            while True:
                while len(in_flight) < self.max_in_flight and (again or not exhausted):
                    if again:
                        spec, runs = again.pop()
                    else:
                        try:
                            spec, runs = next(todo), 0
                        except StopIteration:
                            exhausted = True
                            break
                    in_flight[pool.submit(fn, spec)] = (spec, runs + 1)
                if not in_flight:
                    return failures
                done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                intact = [settle(future, *in_flight.pop(future)) for future in done]
                if not all(intact):
                    # The pool is broken: everything still in it ends the same way. Settle it
                    # all, then start a fresh pool for the specs to run again.
                    wait(in_flight)
                    for future, (spec, runs) in in_flight.items():
                        settle(future, spec, runs)
                    in_flight.clear()
                    pool.shutdown(wait=True, cancel_futures=True)
                    pool = self._pool()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

"""The local engine: shards in a pool of this machine's processes (``--workers N``).

The same contract as every engine (``harvester.run.engine.Engine``): a bounded number of specs
in flight, each result handed to ``on_result`` in this process as it arrives, a spec that
raised returned as a failure. A worker process that dies (killed, out of memory) breaks the
whole pool in ``concurrent.futures``, which does not say whose process it was: the pool is made
anew and the specs that were in it run again one at a time, so that a death is then the dead
spec's own. A spec whose process dies alone more than ``max_retries`` times is a failure with
exit code WORKER; the others finish as usual.
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
        suspects: list[tuple[S, int]] = []
        """Specs that were in a pool when it broke, with how often their process died alone."""
        in_flight: dict[Future[R], tuple[S, int]] = {}
        failures: list[Failure[S]] = []

        def settle(future: Future[R], spec: S, deaths: int, *, alone: bool) -> bool:
            """Hand on one finished spec; False when its pool broke under it."""
            try:
                result = future.result()
            except BrokenProcessPool:
                if alone:  # in a shared pool, whose process died is unknown
                    deaths += 1
                if deaths > max_retries:
                    failures.append(Failure(spec, "its worker process died", ExitCode.WORKER))
                else:
                    suspects.append((spec, deaths))
                return False
            except Exception as exc:  # noqa: BLE001 - a shard's failure is reported, not raised
                failures.append(failure_of(spec, exc))
                return True
            on_result(spec, result)
            return True

        pool = self._pool()
        try:
            while True:
                # Suspects run one at a time, so that a death is the dead spec's own.
                limit = 1 if suspects else self.max_in_flight
                while len(in_flight) < limit and (suspects or not exhausted):
                    if suspects:
                        spec, deaths = suspects.pop()
                    else:
                        try:
                            spec, deaths = next(todo), 0
                        except StopIteration:
                            exhausted = True
                            break
                    in_flight[pool.submit(fn, spec)] = (spec, deaths)
                if not in_flight:
                    return failures
                alone = len(in_flight) == 1
                done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                intact = [settle(f, *in_flight.pop(f), alone=alone) for f in done]
                if not all(intact):
                    # The pool is broken: everything still in it ends the same way. Settle it
                    # all, then start a fresh pool for the suspects.
                    wait(in_flight)
                    for future, (spec, deaths) in in_flight.items():
                        settle(future, spec, deaths, alone=False)
                    in_flight.clear()
                    pool.shutdown(wait=True, cancel_futures=True)
                    pool = self._pool()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

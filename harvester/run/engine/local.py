"""The local engine: shards in a pool of this machine's processes (``--workers N``), and with
``here`` the first one in this process, on a thread of its own (``--workers N`` is N processes
in all, the harvest's own included).

The same contract as every engine (``harvester.run.engine.Engine``): a bounded number of specs
in flight, each result handed to ``on_result`` in this process as it arrives, a spec that
raised returned as a failure. A worker process that dies (killed, out of memory) breaks the
whole pool in ``concurrent.futures``, which does not say whose process it was: the pool is made
anew and the specs that were in it run again one at a time, so that a death is then the dead
spec's own. A spec whose process dies alone more than ``max_retries`` times is a failure with
exit code WORKER; the others finish as usual. The shard run here is apart from all this: a
pool that breaks waits only for its own shards, and a death of the harvest's own process is
the end of the run.
Processes start with ``spawn``: the parent runs threads, and a forked copy of them is unsafe.

A pool process ignores SIGINT and SIGTERM (the harvest stops shards through their stop flag,
so they keep what they finished), dies with the harvest (PR_SET_PDEATHSIG on Linux, kill -9
included), and logs to stderr with the key masked (``ChildLogging``). Nothing per row crosses
processes: a shard's spec goes in, its counters come back.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import (
    FIRST_COMPLETED,
    Future,
    ProcessPoolExecutor,
    ThreadPoolExecutor,
    wait,
)
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from datetime import UTC, datetime

from harvester.errors import ExitCode
from harvester.redact import printable, redact, secret_parts
from harvester.run.engine import DEFAULT_MAX_RETRIES, Failure, R, S, failure_of
from harvester.terminal import log_line


@dataclass(frozen=True, slots=True, kw_only=True)
class ChildLogging:
    """How a pool process logs: the harvest's levels, format and the secrets to mask."""

    levels: dict[str, int] = field(default_factory=dict)
    json_run_id: str | None = None
    """The run id for JSON lines (``--log-format json``); None: text lines."""
    secrets: tuple[str, ...] = field(default=(), repr=False)
    node: str = ""
    """The Ray node of the process, in its JSON lines ("" : none, a local process)."""


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]  # StreamHandler[TextIO]
    def __init__(self, setup: ChildLogging) -> None:
        super().__init__(sys.stderr)
        self.setup = setup
        self.secrets = [p for s in setup.secrets for p in secret_parts(s)]
        self.terminal = sys.stderr.isatty()

    def format(self, record: logging.LogRecord) -> str:
        run_id = self.setup.json_run_id
        if run_id is None and self.terminal:  # as the harvest's own lines on a terminal
            # masked and escaped before the line is wrapped (a wrapped key would not match)
            message = redact(printable(record.getMessage()), self.secrets)
            text = log_line(logging.makeLogRecord({**vars(record), "msg": message, "args": None}))
            text = "\r\x1b[K" + text  # over the harvest's progress bar, cleared first
        elif run_id is None:
            when = datetime.fromtimestamp(record.created).strftime("%Y-%m-%d %H:%M:%S")
            text = f"{when} {record.levelname} {record.name}: {printable(record.getMessage())}"
        else:
            line = {
                "ts": datetime.fromtimestamp(record.created, UTC).isoformat(
                    timespec="milliseconds"
                ),
                "level": record.levelname.lower(),
                "run_id": run_id,
                "logger": record.name,
                "message": record.getMessage(),
                "pid": os.getpid(),
            }
            if self.setup.node:
                line["node"] = self.setup.node
            text = json.dumps(line)
        return redact(text, self.secrets)


def _die_with_parent() -> None:
    """Ask Linux to kill this process when the harvest's process dies (kill -9 included)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return


def _init_child(parent: int, setup: ChildLogging) -> None:
    _die_with_parent()
    if os.getppid() != parent:  # the harvest died before the request to die with it
        os._exit(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    install_logging(setup)


def install_logging(setup: ChildLogging) -> None:
    """Log as the harvest does, in a process it did not start itself (a pool's, a Ray
    worker's): replaces the handler an earlier shard in the same process installed."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
    root.addHandler(_Handler(setup))
    for name, level in setup.levels.items():
        logging.getLogger(name).setLevel(level)


class LocalEngine:
    def __init__(
        self,
        *,
        workers: int = 2,
        max_in_flight: int | None = None,
        logging_setup: ChildLogging | None = None,
        here: bool = False,
    ) -> None:
        """``here``: the first spec runs in this process (on a thread of its own) and the
        rest in ``workers - 1`` pool processes: ``workers`` processes in all, this one
        included, so one copy of the libraries fewer in memory."""
        if workers < 1 or (here and workers < 2):
            raise ValueError("workers must be at least 1, and 2 with one here")
        self.workers = workers
        self.here = here
        self.max_in_flight = max_in_flight or 2 * workers
        self.logging_setup = logging_setup or ChildLogging()

    def _pool(self) -> ProcessPoolExecutor:
        """A fresh pool; made and used from one thread (a pool process dies with the thread
        that started it)."""
        return ProcessPoolExecutor(
            self.workers - self.here,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_child,
            initargs=(os.getpid(), self.logging_setup),
        )

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

        # The spec run here is kept apart from the pool's: a broken pool waits only for its own
        # specs, and its suspects start again while this one goes on.
        here = ThreadPoolExecutor(1, thread_name_prefix="shard") if self.here else None
        local: dict[Future[R], S] = {}
        if here is not None:
            first = next(todo, None)
            if first is not None:
                local[here.submit(fn, first)] = first
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
                if not in_flight and not local:
                    return failures
                alone = len(in_flight) == 1
                done, _ = wait([*in_flight, *local], return_when=FIRST_COMPLETED)
                for future in [f for f in done if f in local]:
                    settle(future, local.pop(future), 0, alone=False)
                intact = [settle(f, *in_flight.pop(f), alone=alone) for f in done if f in in_flight]
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
            if here is not None:
                here.shutdown(wait=True)

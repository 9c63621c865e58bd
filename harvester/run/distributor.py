"""Runs a run's shards on this machine: one in the harvest's own process, several in a process
pool (``spawn``: a fresh interpreter per process, nothing inherited but the shard's spec).

A pool process ignores SIGINT and SIGTERM (the harvest stops shards through their stop flag,
so they keep what they finished), dies with the harvest (PR_SET_PDEATHSIG on Linux, kill -9
included), and logs to stderr with the key masked. Nothing per row crosses processes: a
shard's spec goes in, its counters come back.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import multiprocessing
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime

from harvester.redact import redact, secret_parts


@dataclass(frozen=True, slots=True, kw_only=True)
class ChildLogging:
    """How a pool process logs: the harvest's levels, format and the secrets to mask."""

    levels: dict[str, int] = field(default_factory=dict)
    json_run_id: str | None = None
    """The run id for JSON lines (``--log-format json``); None: text lines."""
    secrets: tuple[str, ...] = field(default=(), repr=False)


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]  # StreamHandler[TextIO]
    def __init__(self, setup: ChildLogging) -> None:
        super().__init__(sys.stderr)
        self.setup = setup
        self.secrets = [p for s in setup.secrets for p in secret_parts(s)]

    def format(self, record: logging.LogRecord) -> str:
        run_id = self.setup.json_run_id
        if run_id is None:
            when = datetime.fromtimestamp(record.created).strftime("%Y-%m-%d %H:%M:%S")
            text = f"{when} {record.levelname} {record.name}: {record.getMessage()}"
        else:
            text = json.dumps(
                {
                    "ts": datetime.fromtimestamp(record.created, UTC).isoformat(
                        timespec="milliseconds"
                    ),
                    "level": record.levelname.lower(),
                    "run_id": run_id,
                    "logger": record.name,
                    "message": record.getMessage(),
                    "pid": os.getpid(),
                }
            )
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
    handler = _Handler(setup)
    root = logging.getLogger()
    root.addHandler(handler)
    for name, level in setup.levels.items():
        logging.getLogger(name).setLevel(level)


@contextmanager
def local_pool(processes: int, setup: ChildLogging) -> Iterator[concurrent.futures.Executor]:
    """A pool of ``processes`` processes for shards; submit from the thread that opened it
    (a pool process dies with the thread that started it)."""
    pool = concurrent.futures.ProcessPoolExecutor(
        max_workers=processes,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_child,
        initargs=(os.getpid(), setup),
    )
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)

"""A run's counters and how it ended: the summary, the exit code and the run record.

The driver (``harvester.run.driver``) keeps the sum of the shards' counters here. Exit 13
(nothing ok) is judged here too, from this run's counts and the last runs' records.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Final

from harvester.counters import Counters
from harvester.errors import ExitCode, HarvesterError
from harvester.run import reader
from harvester.statuses import INVALID, OK, STATUSES
from harvester.storage import runs
from harvester.storage.runs import InputRecord, RunRecord
from harvester.units import plural, size

NOTHING_OK_MIN_TRIED: Final = 10
"""A run is judged "(almost) nothing ok" (exit 13) only when it tried at least this many."""
NOTHING_OK_SHARE: Final = 0.05
"""... and under this share of them ended ok;"""
JUMP_FACTOR: Final = 3.0
JUMP_POINTS: Final = 0.5
JUMP_HISTORY: Final = 7
"""... or its share not ok is more than ``JUMP_FACTOR`` times the median of the last
``JUMP_HISTORY`` finished runs' and more than ``JUMP_POINTS`` above it."""


@dataclass(slots=True)
class RunStats:
    """Live counters of a run; the CLI draws progress and the summary from them."""

    run_id: str
    started_at: datetime
    out_dir: Path | str
    """The output folder, or ``s3://bucket/prefix``."""
    inputs: list[reader.InputFile] = field(default_factory=list)
    rows_in_input: int = 0
    counters: Counters = field(default_factory=Counters)
    processes: int = 1
    """Processes that fetched and downloaded (``--workers``, as the run resolved it)."""
    shards: int = 1
    temp_files_cleaned: int = 0
    rps: float = 0.0
    """``--rps``: the rate the limiters start at and return to."""
    interrupted: bool = False
    error: str | None = None
    """The run-level error that ended the run (a rejected key, an unwritable folder), if any."""
    error_code: ExitCode | None = None
    baseline_not_ok: float | None = None
    """The median share not ok of the last finished runs on the folder (None: no history)."""
    finished_at: datetime | None = None

    @property
    def elapsed(self) -> float:
        end = self.finished_at.timestamp() if self.finished_at else time.time()
        return max(end - self.started_at.timestamp(), 1e-9)

    def fail(self, exc: HarvesterError) -> None:
        """Record the run-level error that ends the run, so the run record has its exit code
        (the first one wins)."""
        if self.error_code is None:
            self.error, self.error_code = str(exc), exc.exit_code

    def crash(self, exc: BaseException) -> None:
        """Record an unexpected error (a bug), so the run record does not say the run was ok;
        from a task group's exceptions, the first one raised."""
        while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
            exc = exc.exceptions[0]
        self.error = f"unexpected error (a bug): {type(exc).__name__}: {exc}"
        self.error_code = ExitCode.BUG

    @property
    def nothing_ok(self) -> str | None:
        """Why the run counts as "(almost) nothing ok" (exit 13), or None if it does not."""
        requests = self.counters.requests
        tried = sum(n for status, n in requests.items() if status != INVALID)
        if tried < NOTHING_OK_MIN_TRIED:
            return None
        ok = requests[OK]
        if ok < NOTHING_OK_SHARE * tried:
            return (
                f"(almost) nothing ok: {ok:,} of {tried:,} requests tried are ok (under "
                f"{NOTHING_OK_SHARE:.0%}); check --base-url, the key's account and the inputs"
            )
        base = self.baseline_not_ok
        not_ok = 1 - ok / tried
        if base is not None and not_ok > JUMP_FACTOR * base and not_ok - base > JUMP_POINTS:
            return (
                f"{not_ok:.0%} of {tried:,} requests tried are not ok, against a median of "
                f"{base:.0%} over the last runs; check --base-url, the key and the inputs"
            )
        return None

    @property
    def exit_code(self) -> ExitCode:
        if self.error_code is not None:
            return self.error_code
        if self.interrupted:
            return ExitCode.INTERRUPTED
        if self.nothing_ok is not None:
            return ExitCode.NOTHING_OK
        if any(status != OK and n for status, n in self.counters.requests.items()):
            return ExitCode.INCOMPLETE
        return ExitCode.OK

    @property
    def reason(self) -> str | None:
        """Why the run did not end ok, for the record: its error, or "nothing ok"."""
        if self.error is not None:
            return self.error
        if self.interrupted:
            return "interrupted (SIGINT/SIGTERM)"
        return self.nothing_ok

    def summary(self) -> str:
        """The one-screen end-of-run summary."""
        c = self.counters
        done = c.done
        rate = done / self.elapsed
        by_status = ", ".join(f"{s} {c.requests[s]:,}" for s in STATUSES if c.requests[s])
        lines = [
            f"run {self.run_id}: {plural(done, 'request')} in {self.elapsed:.1f} s "
            f"({rate:,.1f} req/s"
            + (f", {self.processes} processes)" if self.processes > 1 else ")"),
            f"  by status:  {by_status or 'none'}",
            f"  skipped:    {c.skipped:,} already ok in earlier runs (or expired), "
            f"{plural(c.duplicates, 'duplicate row')}",
            f"  images:     {c.images_new:,} new, {c.images_existing:,} already stored, "
            f"{c.images_failed:,} failed; {size(c.bytes_new)} new on disk",
            f"  api:        {plural(c.result_requests, 'result request')} "
            f"({c.result_requests / self.elapsed:,.1f}/s), "
            f"{plural(c.retries, 'retry', 'retries')}, "
            f"{c.throttled:,} rate-limited (429)"
            + (
                f", rate cut to {c.lowest_rps:,.1f}/s at the lowest"
                if c.lowest_rps < self.rps * 0.999  # shards split --rps in float shares
                else ""
            ),
            f"  manifest:   {plural(c.manifest_rows, 'row')} in "
            f"{plural(c.manifest_parts, 'new part')} "
            f"under {self.out_dir}/manifest/{self.run_id}",
        ]
        code = self.exit_code
        if self.interrupted:
            lines.append("  INTERRUPTED: finished rows are kept; run again to pick up the rest")
        elif code == ExitCode.NOTHING_OK:
            lines.append(f"  NOTHING OK: exit {int(code)}: {self.nothing_ok}")
        elif code == ExitCode.INCOMPLETE:
            lines.append(
                f"  not all ok: exit {int(ExitCode.INCOMPLETE)}; the next run retries every "
                "request that is not ok"
            )
        return "\n".join(lines)

    def record(self, *, running: bool = False) -> RunRecord:
        """The run record (``DIR/runs/<run_id>.json``): while running, or at the end."""
        return RunRecord(
            run_id=self.run_id,
            state=runs.RUNNING if running else runs.FINISHED,
            pid=os.getpid(),
            host=runs.this_host(),
            started_at=self.started_at,
            finished_at=None if running else self.finished_at,
            elapsed_seconds=self.elapsed,
            exit_code=None if running else int(self.exit_code),
            interrupted=self.interrupted,
            error=None if running else self.reason,
            inputs=tuple(
                InputRecord(path=str(f.path), sha256=f.sha256, bytes=f.size, rows=f.rows)
                for f in self.inputs
            ),
            rows_in_input=self.rows_in_input,
            counters=self.counters,
            temp_files_cleaned=self.temp_files_cleaned,
            processes=self.processes,
            shards=self.shards,
        )


def baseline_not_ok(records: list[RunRecord]) -> float | None:
    """The median share not ok of the last ``JUMP_HISTORY`` finished harvests that tried at
    least ``NOTHING_OK_MIN_TRIED`` requests; None if there are none."""
    shares = [
        share
        for r in records
        if not r.running
        and not r.serves  # a server's intake is judged by no nightly baseline
        and r.attempted >= NOTHING_OK_MIN_TRIED
        and (share := r.not_ok_share) is not None
    ]
    return statistics.median(shares[-JUMP_HISTORY:]) if shares else None

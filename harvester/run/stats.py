"""A run's counters and how it ended: the summary, the exit code and the run record.

The driver (``harvester.run.pipeline``) adds up the shards' counters here. Exit 13 (nothing
ok) is judged here too, from this run's counts and the last runs' records.
"""

from __future__ import annotations

import os
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Final

from harvester.errors import ExitCode, HarvesterError
from harvester.run import reader
from harvester.run.shard import ShardResult
from harvester.storage import manifest, runs
from harvester.storage.manifest import INVALID, OK
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
    skipped_done: int = 0
    duplicates: int = 0
    requests: Counter[str] = field(default_factory=Counter)
    images_new: int = 0
    images_existing: int = 0
    images_failed: int = 0
    bytes_new: int = 0
    bytes_downloaded: int = 0
    throttled: int = 0
    retries: int = 0
    result_requests: int = 0
    manifest_rows: int = 0
    manifest_parts: int = 0
    processes: int = 1
    """Processes that fetched and downloaded (``--workers``, as the run resolved it)."""
    shards: int = 1
    nodes: set[str] = field(default_factory=set)
    """The Ray nodes the shards ran on (none on one machine)."""
    temp_files_cleaned: int = 0
    rps: float = 0.0
    """``--rps``: the rate the limiters start at and return to."""
    lowest_rps: float = 0.0
    """The rate limiters' lowest rate in the run, summed over shards (they slow down when many
    answers are 429s)."""
    waiting_pending: int = 0
    """Requests waiting for a pending result now (``--pending-wait``)."""
    waiting_until: float | None = None
    """Unix time the last of them stops waiting."""
    interrupted: bool = False
    error: str | None = None
    """The run-level error that ended the run (a rejected key, an unwritable folder), if any."""
    error_code: ExitCode | None = None
    baseline_not_ok: float | None = None
    """The median share not ok of the last finished runs on the folder (None: no history)."""
    finished_at: datetime | None = None
    _t0: float = field(default_factory=time.monotonic)

    @property
    def done(self) -> int:
        return sum(self.requests.values())

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
        tried = sum(n for status, n in self.requests.items() if status != INVALID)
        if tried < NOTHING_OK_MIN_TRIED:
            return None
        ok = self.requests[OK]
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
        if any(status != OK and n for status, n in self.requests.items()):
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

    def add(self, result: ShardResult) -> None:
        """Add a shard's counters (its result, or its last progress)."""
        self.requests.update(result.requests)
        self.images_new += result.images_new
        self.images_existing += result.images_existing
        self.images_failed += result.images_failed
        self.bytes_new += result.bytes_new
        self.bytes_downloaded += result.bytes_downloaded
        self.result_requests += result.result_requests
        self.retries += result.retries
        self.throttled += result.throttled
        self.lowest_rps += result.lowest_rps
        self.waiting_pending += result.waiting
        if result.waiting:
            self.waiting_until = max(self.waiting_until or 0.0, result.waiting_until)
        self.manifest_rows += result.manifest_rows
        self.manifest_parts += result.manifest_parts
        if result.node:
            self.nodes.add(result.node)

    def summary(self) -> str:
        """The one-screen end-of-run summary."""
        done = self.done
        rate = done / self.elapsed
        by_status = (
            ", ".join(
                f"{status} {self.requests[status]:,}"
                for status in manifest.STATUSES
                if self.requests[status]
            )
            or "none"
        )
        lines = [
            f"run {self.run_id}: {plural(done, 'request')} in {self.elapsed:.1f} s "
            f"({rate:,.1f} req/s"
            + (f", {self.processes} processes)" if self.processes > 1 else ")"),
            f"  by status:  {by_status}",
            f"  skipped:    {self.skipped_done:,} already ok in earlier runs (or expired), "
            f"{plural(self.duplicates, 'duplicate row')}",
            f"  images:     {self.images_new:,} new, {self.images_existing:,} already stored, "
            f"{self.images_failed:,} failed; {size(self.bytes_new)} new on disk",
            f"  api:        {plural(self.result_requests, 'result request')} "
            f"({self.result_requests / self.elapsed:,.1f}/s), "
            f"{plural(self.retries, 'retry', 'retries')}, "
            f"{self.throttled:,} rate-limited (429)"
            + (
                f", rate cut to {self.lowest_rps:,.1f}/s at the lowest"
                if self.lowest_rps < self.rps * 0.999  # shards split --rps in float shares
                else ""
            ),
            f"  manifest:   {plural(self.manifest_rows, 'row')} in "
            f"{plural(self.manifest_parts, 'new part')} "
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
            skipped_already_ok=self.skipped_done,
            duplicate_rows=self.duplicates,
            requests=dict(self.requests),
            images_new=self.images_new,
            images_already_stored=self.images_existing,
            images_failed=self.images_failed,
            bytes_new=self.bytes_new,
            bytes_downloaded=self.bytes_downloaded,
            temp_files_cleaned=self.temp_files_cleaned,
            result_requests=self.result_requests,
            retries=self.retries,
            rate_limited=self.throttled,
            manifest_rows=self.manifest_rows,
            manifest_parts=self.manifest_parts,
            processes=self.processes,
            shards=self.shards,
            nodes=tuple(sorted(self.nodes)),
        )


def baseline_not_ok(records: list[RunRecord]) -> float | None:
    """The median share not ok of the last ``JUMP_HISTORY`` finished runs that tried at
    least ``NOTHING_OK_MIN_TRIED`` requests; None if there are none."""
    shares = [
        share
        for r in records
        if not r.running
        and r.attempted >= NOTHING_OK_MIN_TRIED
        and (share := r.not_ok_share) is not None
    ]
    return statistics.median(shares[-JUMP_HISTORY:]) if shares else None

"""``harvester status DIR``: did the last run work? Read from the run records in ``DIR/runs``.

Each harvest writes ``DIR/runs/<run_id>.json`` when it ends (``RunStats.record``). The status
is the latest record, whether a harvest is running now (the lock's pid), and, with
``max_age``, whether the last run is recent enough: a run that never started (cron off, timer
disabled) or was killed outright (SIGKILL, out of memory) leaves no new record, and only its
age gives it away.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

from harvester.errors import MEANINGS, ExitCode
from harvester.storage import lock, manifest
from harvester.storage.layout import Layout
from harvester.units import duration, size

RECENT: Final = 5
"""Earlier runs listed after the last one."""


@dataclass(frozen=True, slots=True)
class RunRecord:
    """The fields of a run record that status shows; ``data`` is the whole record."""

    run_id: str
    started_at: datetime
    finished_at: datetime | None
    exit_code: int
    data: dict[str, Any] = field(repr=False)

    @classmethod
    def parse(cls, data: dict[str, Any]) -> RunRecord:
        """Raises KeyError, TypeError or ValueError for a record that is not one."""
        finished = data.get("finished_at")
        return cls(
            run_id=str(data["run_id"]),
            started_at=datetime.fromisoformat(data["started_at"]),
            finished_at=datetime.fromisoformat(finished) if finished else None,
            exit_code=int(data["exit_code"]),
            data=data,
        )

    @property
    def meaning(self) -> str:
        return MEANINGS.get(self.exit_code, "unknown exit code")


def read_runs(out_dir: Path) -> tuple[list[RunRecord], list[str]]:
    """Every run record under ``out_dir``, oldest first, and the names of unreadable ones."""
    records: list[RunRecord] = []
    unreadable: list[str] = []
    runs = Layout(out_dir).runs
    for path in sorted(runs.glob("*.json")) if runs.is_dir() else []:
        try:
            records.append(RunRecord.parse(json.loads(path.read_text(encoding="utf-8"))))
        except (OSError, ValueError, KeyError, TypeError):
            unreadable.append(path.name)
    records.sort(key=lambda r: r.run_id)
    return records, unreadable


@dataclass(frozen=True, slots=True)
class Status:
    out_dir: Path
    runs: list[RunRecord]
    unreadable: list[str]
    running_pid: int | None
    running_since: datetime | None
    checked_at: datetime
    max_age: timedelta | None = None
    incomplete_ok: bool = False
    """Count a last run that exited 3 (finished, some requests not ok) as ok: exit 0."""

    @property
    def last(self) -> RunRecord | None:
        return self.runs[-1] if self.runs else None

    @property
    def stale(self) -> bool:
        """No run record, or (with ``max_age``) the last run started too long ago."""
        if self.last is None:
            return True
        return self.max_age is not None and self.checked_at - self.last.started_at > self.max_age

    @property
    def exit_code(self) -> int:
        """0: the last run was all ok; its own exit code if not; 10 if there is no recent run."""
        if self.last is None or self.stale:
            return int(ExitCode.NO_RECENT_RUN)
        if self.incomplete_ok and self.last.exit_code == ExitCode.INCOMPLETE:
            return int(ExitCode.OK)
        return self.last.exit_code

    @property
    def verdict(self) -> str:
        if self.last is None:
            return "no run"
        if self.stale:
            return "stale"
        return {0: "ok", int(ExitCode.INCOMPLETE): "incomplete"}.get(self.last.exit_code, "failed")

    def text(self) -> str:
        """What ``harvester status`` prints: the verdict first, then the last run's details."""
        lines = [f"{self.verdict.upper()}: {self._headline()}"]
        last = self.last
        if last is not None:
            lines += [f"  {label:<10}{value}" for label, value in self._details(last)]
        if self.running_pid is not None:
            since = (
                f" since {_when(self.running_since, self.checked_at)}" if self.running_since else ""
            )
            lines.append(f"  {'now:':<10}a harvest is running (pid {self.running_pid}){since}")
        else:
            lines.append(f"  {'now:':<10}no harvest running")
        earlier = self.runs[-RECENT - 1 : -1][::-1]
        if earlier:
            lines.append(
                f"  {'earlier:':<10}" + ", ".join(f"{r.run_id} exit {r.exit_code}" for r in earlier)
            )
        if self.unreadable:
            lines.append(f"  {'unreadable:':<10} {', '.join(self.unreadable)}")
        return "\n".join(lines)

    def _headline(self) -> str:
        last = self.last
        if last is None:
            return (
                f"no run record in {Layout(self.out_dir).runs}; has a harvest ever finished here?"
            )
        age = duration((self.checked_at - last.started_at).total_seconds())
        if self.stale:
            assert self.max_age is not None
            return (
                f"the last run ({last.run_id}) started {age} ago, longer than --max-age "
                f"{duration(self.max_age.total_seconds())}: did cron or the timer run?"
            )
        return f"last run {last.run_id} exited {last.exit_code}: {last.meaning}"

    def _details(self, last: RunRecord) -> list[tuple[str, str]]:
        data = last.data
        requests = data.get("requests") or {}
        by_status = ", ".join(f"{s} {requests[s]:,}" for s in manifest.STATUSES if requests.get(s))
        images = data.get("images") or {}
        inputs = data.get("inputs") or []
        details = [
            ("started:", _when(last.started_at, self.checked_at)),
            (
                "finished:",
                f"{_when(last.finished_at, self.checked_at)}, took "
                f"{duration(float(data.get('elapsed_seconds') or 0))}"
                if last.finished_at
                else "no (the record has no end time)",
            ),
            ("inputs:", _inputs(inputs)),
            (
                "requests:",
                f"{by_status or 'none'}; {data.get('skipped_already_ok', 0):,} already ok "
                f"before, {data.get('duplicate_rows', 0):,} duplicate rows",
            ),
            (
                "images:",
                f"{images.get('new', 0):,} new, {images.get('already_stored', 0):,} already "
                f"stored, {images.get('failed', 0):,} failed; "
                f"{size(int(data.get('bytes_new') or 0))} new",
            ),
            (
                "api:",
                f"{data.get('result_requests', 0):,} result requests, "
                f"{data.get('retries', 0):,} retries, "
                f"{data.get('rate_limited', 0):,} rate-limited (429)",
            ),
        ]
        if data.get("error"):
            details.append(("error:", str(data["error"])))
        return details

    def to_json(self) -> dict[str, Any]:
        last = self.last
        return {
            "out_dir": str(self.out_dir),
            "checked_at": self.checked_at.isoformat(),
            "verdict": self.verdict,
            "exit_code": self.exit_code,
            "meaning": MEANINGS.get(last.exit_code) if last else None,
            "running": None
            if self.running_pid is None
            else {
                "pid": self.running_pid,
                "since": self.running_since.isoformat() if self.running_since else None,
            },
            "last_run": last.data if last else None,
            "earlier_runs": [
                {
                    "run_id": r.run_id,
                    "started_at": r.started_at.isoformat(),
                    "exit_code": r.exit_code,
                }
                for r in self.runs[-RECENT - 1 : -1][::-1]
            ],
            "unreadable_records": self.unreadable,
        }


def status(
    out_dir: Path,
    *,
    max_age: timedelta | None = None,
    incomplete_ok: bool = False,
    now: datetime | None = None,
) -> Status:
    """The status of the output folder ``out_dir``."""
    layout = Layout(out_dir)
    runs, unreadable = read_runs(out_dir)
    pid = lock.holder(layout)
    since = None
    if pid is not None:
        try:
            since = datetime.fromtimestamp(layout.lock.stat().st_mtime, UTC)
        except OSError:
            since = None
    return Status(
        out_dir=out_dir,
        runs=runs,
        unreadable=unreadable,
        running_pid=pid,
        running_since=since,
        checked_at=now or datetime.now(UTC),
        max_age=max_age,
        incomplete_ok=incomplete_ok,
    )


def _inputs(inputs: list[dict[str, Any]], shown: int = 4) -> str:
    names = [f"{Path(i['path']).name} (sha256 {str(i['sha256'])[:12]})" for i in inputs[:shown]]
    more = f", and {len(inputs) - shown} more" if len(inputs) > shown else ""
    return f"{len(inputs)} file{'' if len(inputs) == 1 else 's'}: {', '.join(names)}{more}"


def _when(moment: datetime | None, now: datetime) -> str:
    if moment is None:
        return "?"
    ago = (now - moment).total_seconds()
    relative = f"{duration(ago)} ago" if ago >= 0 else "in the future (clock skew?)"
    return f"{moment.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC ({relative})"

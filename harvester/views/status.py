"""``harvester status DIR``: did the last run work? Read from the run records in ``DIR/runs``.

Each harvest writes ``DIR/runs/<run_id>.json`` when it starts (state ``running``) and again
when it ends (``harvester.storage.runs``). The status is the latest record: finished (its
exit code), still running (its process holds the folder's lock), or crashed (the record says
running, but its process on this host is gone and the lock is free: killed outright, out of
memory). With ``max_age``, the last run must also be recent enough: a run that never started
(cron off, timer disabled) leaves no new record, and only its age gives it away.

A server's records (``harvester serve``, ``kind`` ``serve``) are shown apart: serving (its
record refreshed within ``runs.STALE_SECONDS``, and its process alive if on this host), stopped
(a clean stop), or gone (killed or hung: its record says serving, but aged). The harvests'
verdict ignores them; an output with servers only is judged by its latest server.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

from harvester.errors import MEANINGS, ExitCode
from harvester.statuses import OK, STATUSES
from harvester.storage import runs
from harvester.storage.objects import Location, Store, as_store
from harvester.storage.runs import IntakeRecord, RunRecord
from harvester.units import duration, size

RECENT: Final = 5
"""Earlier runs listed after the last one."""
SERVING: Final = "serving"
STOPPED: Final = "stopped"
GONE: Final = "gone"
"""What a server's record says of it (``Status.server_state``)."""


def meaning(record: RunRecord) -> str:
    if record.exit_code is None:
        return "still running, or crashed"
    return MEANINGS.get(record.exit_code, "unknown exit code")


@dataclass(frozen=True, slots=True)
class Status:
    out_dir: str
    runs: list[RunRecord]
    unreadable: list[str]
    running_pid: int | None
    """The pid holding the folder's lock (a harvest running now), if any."""
    running_since: datetime | None
    checked_at: datetime
    max_age: timedelta | None = None
    incomplete_ok: bool = False
    """Count a last run that exited 3 (finished, some requests not ok) as ok: exit 0."""
    host: str = ""
    """This host's name (a record's pid is checked only on the host that wrote it); with a
    lock every host sees (a lease), the host of its holder."""
    any_host: bool = False
    """The lock is seen from every host (a lease): a run is running only while it is held."""
    local_host: str = ""
    """This host's name (a server's pid is checked only on the host that wrote its record)."""

    @property
    def harvests(self) -> list[RunRecord]:
        """The harvests' records, oldest first (a server's are not)."""
        return [r for r in self.runs if not r.serves]

    @property
    def servers(self) -> list[RunRecord]:
        """The servers' records, oldest first."""
        return [r for r in self.runs if r.serves]

    def server_state(self, record: RunRecord) -> str:
        """``serving``, ``stopped`` (it ended and said so) or ``gone`` (killed, or hung)."""
        if record.state != runs.SERVING:
            return STOPPED
        return SERVING if record.is_live(self.checked_at, host=self.local_host) else GONE

    @property
    def shown_servers(self) -> list[RunRecord]:
        """Every server serving, and the latest that is not if none is."""
        servers = self.servers
        live = [r for r in servers if self.server_state(r) == SERVING]
        return live or servers[-1:]

    def is_running(self, record: RunRecord) -> bool:
        """The record's run is still going: its process holds the lock, or it ran on another
        host (whose processes cannot be checked from here)."""
        if not record.running:
            return False
        if self.any_host:
            return self.running_pid == record.pid and record.host == self.host
        if record.host and record.host != self.host:
            return True
        return self.running_pid is not None and self.running_pid == record.pid

    def crashed(self, record: RunRecord) -> bool:
        """The record says running, but its process on this host is gone (or holds no lock)."""
        return record.running and not self.is_running(record)

    @property
    def latest(self) -> RunRecord | None:
        harvests = self.harvests
        return harvests[-1] if harvests else None

    @property
    def last(self) -> RunRecord | None:
        """The run judged: the latest harvest that is not still running (finished or
        crashed)."""
        ended = [r for r in self.harvests if not self.is_running(r)]
        return ended[-1] if ended else None

    @property
    def current(self) -> RunRecord | None:
        """The run going on now, if its record is the latest."""
        latest = self.latest
        return latest if latest is not None and self.is_running(latest) else None

    @property
    def server(self) -> RunRecord | None:
        """The server judged when no harvest ran here: the latest."""
        servers = self.servers
        return servers[-1] if servers and self.last is None and self.current is None else None

    @property
    def stale(self) -> bool:
        """No run record, or (with ``max_age``) the last run started too long ago (a server
        stopped: its last heartbeat)."""
        server = self.server
        if server is not None:
            if self.server_state(server) == SERVING or self.max_age is None:
                return False
            beat = server.intake.heartbeat_at if server.intake is not None else None
            return self.checked_at - (beat or server.started_at) > self.max_age
        if self.last is None:
            return self.current is None
        return self.max_age is not None and self.checked_at - self.last.started_at > self.max_age

    @property
    def exit_code(self) -> int:
        """0: the last run was all ok; its own exit code if not; 10 if there is no recent run
        or the last one crashed (its record never got an exit code)."""
        last = self.last
        server = self.server
        if server is not None:
            if self.stale or self.server_state(server) == GONE:
                return int(ExitCode.NO_RECENT_RUN)
            return int(ExitCode.OK) if server.exit_code in (None, 0) else server.exit_code
        if last is None:
            return int(ExitCode.OK if self.current is not None else ExitCode.NO_RECENT_RUN)
        if self.stale or self.crashed(last) or last.exit_code is None:
            return int(ExitCode.NO_RECENT_RUN)
        if self.incomplete_ok and last.exit_code == ExitCode.INCOMPLETE:
            return int(ExitCode.OK)
        return last.exit_code

    @property
    def verdict(self) -> str:
        last = self.last
        server = self.server
        if server is not None:
            return "stale" if self.stale else self.server_state(server)
        if last is None:
            return "running" if self.current is not None else "no run"
        if self.stale:
            return "stale"
        if self.crashed(last):
            return "crashed"
        return {
            0: "ok",
            int(ExitCode.INCOMPLETE): "incomplete",
            int(ExitCode.NOTHING_OK): "nothing ok",
        }.get(last.exit_code or 0, "failed")

    def text(self) -> str:
        """What ``harvester status`` prints: the verdict first, then the last run's details."""
        lines = [f"{self.verdict.upper()}: {self._headline()}"]
        last = self.last
        if last is not None:
            lines += [f"  {label:<10}{value}" for label, value in self._details(last)]
        current = self.current
        if current is not None:
            lines.append(
                f"  {'now:':<10}run {current.run_id} is running (pid {current.pid}"
                + (f" on {current.host}" if current.host else "")
                + f") since {_when(current.started_at, self.checked_at)}"
            )
        elif self.running_pid is not None:
            since = (
                f" since {_when(self.running_since, self.checked_at)}" if self.running_since else ""
            )
            lines.append(f"  {'now:':<10}a harvest is running (pid {self.running_pid}){since}")
        else:
            lines.append(f"  {'now:':<10}no harvest running")
        for server in self.shown_servers:
            label = "serving:" if self.server_state(server) == SERVING else "intake:"
            first, *rest = self._server_lines(server)
            lines.append(f"  {label:<10}{first}")
            lines += [f"  {'':<10}{line}" for line in rest]
        earlier = [r for r in self.harvests if r is not last and r is not current][-RECENT:][::-1]
        if earlier:
            lines.append(
                f"  {'earlier:':<10}" + ", ".join(f"{r.run_id} {self._ended(r)}" for r in earlier)
            )
        if self.unreadable:
            lines.append(f"  {'unreadable:':<10} {', '.join(self.unreadable)}")
        return "\n".join(lines)

    def _server_lines(self, server: RunRecord) -> list[str]:
        """One server: who and since when (or how it ended), its last delivery and backlog,
        its deliveries, what it harvested."""
        now = self.checked_at
        intake = server.intake or IntakeRecord()
        where = f" on {server.host}" if server.host else ""
        who = f"serve {server.run_id} (pid {server.pid}{where})"
        state = self.server_state(server)
        beat = intake.heartbeat_at or server.started_at
        if state == SERVING:
            head = [f"{who} since {_when(server.started_at, now)}"]
        elif state == STOPPED:
            ended = server.finished_at or beat
            how = "stopped" if not server.error else f"stopped on an error ({server.error})"
            head = [f"{who} {how} {_when(ended, now)}, after {duration(server.elapsed_seconds)}"]
        else:
            head = [
                f"{who} gone: killed or hung; its record says serving, last refreshed "
                f"{_when(beat, now)}",
                f"(refreshed every {runs.HEARTBEAT_SECONDS:g} s; gone after "
                f"{runs.STALE_SECONDS:g} s, or once its process on this host is gone); the "
                "next serve harvests what it stored",
            ]
        last = intake.last_delivery_at
        c = server.counters
        return [
            *head,
            "last delivery "
            + (_when(last, now) if last is not None else "none yet")
            + f"; backlog {intake.backlog:,}",
            f"deliveries: {intake.stored:,} stored, {intake.repeated:,} repeated, "
            f"{intake.refused_total:,} refused, {intake.unavailable:,} answered 503",
            f"harvested: {c.done:,} requests (ok {c.requests.get(OK, 0):,}), "
            f"{c.images_new + c.images_existing:,} images, {size(c.bytes_new)} new",
        ]

    def _ended(self, record: RunRecord) -> str:
        if self.crashed(record):
            return "crashed"
        if record.exit_code is None:
            return "running"
        return f"exit {record.exit_code}"

    def _headline(self) -> str:
        last = self.last
        server = self.server
        if server is not None:
            state = self.server_state(server)
            if self.stale:
                assert self.max_age is not None
                return (
                    f"no harvest here, and the last server ({server.run_id}) stopped longer "
                    f"ago than --max-age {duration(self.max_age.total_seconds())}"
                )
            if state == SERVING:
                return f"no harvest here; serve {server.run_id} is serving"
            if state == STOPPED:
                return f"no harvest here; serve {server.run_id} stopped (exit {server.exit_code})"
            return (
                f"no harvest here; serve {server.run_id} is gone: killed or hung (exit "
                f"{int(ExitCode.NO_RECENT_RUN)})"
            )
        if last is None:
            if self.current is not None:
                return f"the first run here ({self.current.run_id}) is still running"
            return f"no run record in {self.out_dir}/runs; has a harvest ever finished here?"
        age = duration((self.checked_at - last.started_at).total_seconds())
        if self.stale:
            assert self.max_age is not None
            return (
                f"the last run ({last.run_id}) started {age} ago, longer than --max-age "
                f"{duration(self.max_age.total_seconds())}: did cron or the timer run?"
            )
        if self.crashed(last):
            where = f"pid {last.pid}" + (f" on {last.host}" if last.host else "")
            return (
                f"the last run {last.run_id} ({where}) crashed: its record says running, but "
                "its process is gone and the folder is unlocked (killed outright, out of "
                "memory, power cut); rows it finished are in the manifest, the next run "
                f"retries the rest (exit {int(ExitCode.NO_RECENT_RUN)})"
            )
        return f"last run {last.run_id} exited {last.exit_code}: {meaning(last)}"

    def _details(self, last: RunRecord) -> list[tuple[str, str]]:
        c = last.counters
        requests = c.requests
        by_status = ", ".join(f"{s} {requests[s]:,}" for s in STATUSES if requests.get(s))
        details = [
            ("started:", _when(last.started_at, self.checked_at)),
            (
                "finished:",
                f"{_when(last.finished_at, self.checked_at)}, took {duration(last.elapsed_seconds)}"
                if last.finished_at
                else "no (the record has no end time)",
            ),
            ("inputs:", _inputs(last)),
            (
                "requests:",
                f"{by_status or 'none'}; {c.skipped:,} already ok "
                f"before, {c.duplicates:,} duplicate rows",
            ),
            (
                "images:",
                f"{c.images_new:,} new, {c.images_existing:,} already "
                f"stored, {c.images_failed:,} failed; {size(c.bytes_new)} new",
            ),
            (
                "api:",
                f"{c.result_requests:,} result requests, {c.retries:,} retries, "
                f"{c.throttled:,} rate-limited (429)",
            ),
        ]
        if c.nodes:
            nodes = len(c.nodes)
            details.append(
                ("ran on:", f"{last.shards} shards on {nodes} Ray node{'s' * (nodes > 1)}")
            )
        elif last.shards > 1:
            details.append(("ran on:", f"{last.shards} processes (--workers)"))
        if last.error:
            details.append(("error:", last.error))
        return details

    def to_json(self) -> dict[str, Any]:
        last = self.last
        current = self.current
        return {
            "out_dir": str(self.out_dir),
            "checked_at": self.checked_at.isoformat(),
            "verdict": self.verdict,
            "exit_code": self.exit_code,
            "meaning": meaning(last) if last and not self.crashed(last) else None,
            "running": None
            if self.running_pid is None and current is None
            else {
                "pid": current.pid if current else self.running_pid,
                "run_id": current.run_id if current else None,
                "since": (
                    current.started_at.isoformat()
                    if current
                    else self.running_since.isoformat()
                    if self.running_since
                    else None
                ),
            },
            "last_run": last.to_json() if last else None,
            "servers": [{"state": self.server_state(r), **r.to_json()} for r in self.shown_servers],
            "earlier_runs": [
                {
                    "run_id": r.run_id,
                    "started_at": r.started_at.isoformat(),
                    "exit_code": r.exit_code,
                    "crashed": self.crashed(r),
                }
                for r in [r for r in self.harvests if r is not last and r is not current][-RECENT:][
                    ::-1
                ]
            ],
            "unreadable_records": self.unreadable,
        }


def status(
    where: Store | Location,
    *,
    max_age: timedelta | None = None,
    incomplete_ok: bool = False,
    now: datetime | None = None,
) -> Status:
    """The status of a harvest (a store, or its location): its run records, and who holds
    its lock."""
    store = as_store(where)
    records, unreadable = runs.read_all(store)
    holder = store.holder()
    pid = since = None
    host = runs.this_host()
    if holder is not None:  # on this host, or (a lease) on any
        running = [r for r in records if r.running]
        pid, host = holder.pid, holder.host
        since = holder.since or (running[-1].started_at if running else None)
    return Status(
        out_dir=store.location,
        runs=records,
        unreadable=unreadable,
        running_pid=pid,
        running_since=since,
        checked_at=now or datetime.now(UTC),
        max_age=max_age,
        incomplete_ok=incomplete_ok,
        host=host,
        any_host=store.everywhere,
        local_host=runs.this_host(),
    )


def _inputs(record: RunRecord, shown: int = 4) -> str:
    inputs = record.inputs
    names = [f"{Path(i.path).name} (sha256 {i.sha256[:12]})" for i in inputs[:shown]]
    more = f", and {len(inputs) - shown} more" if len(inputs) > shown else ""
    return f"{len(inputs)} file{'' if len(inputs) == 1 else 's'}: {', '.join(names)}{more}"


def _when(moment: datetime | None, now: datetime) -> str:
    if moment is None:
        return "?"
    ago = (now - moment).total_seconds()
    relative = f"{duration(ago)} ago" if ago >= 0 else "in the future (clock skew?)"
    return f"{moment.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC ({relative})"

"""Run records: ``DIR/runs/<run_id>.json``, one typed ``RunRecord`` written and read here only.

A harvest writes its record when it starts (state ``running``, with its pid and host) and
again when it ends (state ``finished``, with the exit code and the reason). A record still
saying ``running`` whose process is gone tells ``harvester status`` that the run crashed
(killed outright, out of memory, power cut). Each write is atomic (a temp file renamed into
place, or one whole object: ``Store.put``), so a reader never sees half a record.

A server (``harvester serve``) writes a record of its own kind (``kind`` ``serve``, state
``serving``) when it starts, and refreshes it every ``HEARTBEAT_SECONDS`` with its intake so
far (``IntakeRecord``: deliveries, backlog, the last delivery); a clean stop makes it
``finished``. A ``serving`` record not refreshed for ``STALE_SECONDS`` (or whose process on
this host is gone) is a server that was killed or hangs: ``is_live`` tells.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Final

from harvester.counters import Counters
from harvester.errors import OutputError
from harvester.statuses import INVALID, OK
from harvester.storage.objects import Location, Store, as_store

RUNNING: Final = "running"
FINISHED: Final = "finished"
SERVING: Final = "serving"
"""A server's state while it runs (``kind`` ``serve``)."""
HARVEST: Final = "harvest"
SERVE: Final = "serve"
"""The kinds of record: a harvest's (``harvest`` / ``run``), a server's (``serve``)."""
HEARTBEAT_SECONDS: Final = 5.0
"""How often a server refreshes its record."""
STALE_SECONDS: Final = 60.0
"""A server whose record is older than this is taken for gone (killed, or hung)."""


def this_host() -> str:
    return socket.gethostname()


@dataclass(frozen=True, slots=True, kw_only=True)
class InputRecord:
    path: str
    sha256: str
    bytes: int
    rows: int


@dataclass(frozen=True, slots=True, kw_only=True)
class IntakeRecord:
    """What a server received so far; its harvest (requests, images, bytes, rows) is in the
    record's ``counters`` as a harvest's is."""

    stored: int = 0
    """Deliveries stored in the inbox (acknowledged)."""
    repeated: int = 0
    """Deliveries of a request stored already (acknowledged, not stored again)."""
    refused: Mapping[str, int] = field(default_factory=dict)
    """Deliveries refused, by reason (``bad-signature``, ``too-large``, ...)."""
    unavailable: int = 0
    """Deliveries answered 503 (not stored now; fal delivers them again)."""
    backlog: int = 0
    """Deliveries stored and not yet harvested, when the record was written."""
    failed: int = 0
    """Deliveries whose harvest failed (left in the inbox)."""
    last_delivery_at: datetime | None = None
    """When the last delivery was stored (None: none yet)."""
    heartbeat_at: datetime | None = None
    """When the record was written last."""

    @property
    def refused_total(self) -> int:
        return sum(self.refused.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "stored": self.stored,
            "repeated": self.repeated,
            "refused": dict(self.refused),
            "unavailable": self.unavailable,
            "backlog": self.backlog,
            "failed": self.failed,
            "last_delivery_at": _iso(self.last_delivery_at),
            "heartbeat_at": _iso(self.heartbeat_at),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> IntakeRecord:
        return cls(
            stored=int(data.get("stored") or 0),
            repeated=int(data.get("repeated") or 0),
            refused={str(k): int(v) for k, v in (data.get("refused") or {}).items()},
            unavailable=int(data.get("unavailable") or 0),
            backlog=int(data.get("backlog") or 0),
            failed=int(data.get("failed") or 0),
            last_delivery_at=_moment(data.get("last_delivery_at")),
            heartbeat_at=_moment(data.get("heartbeat_at")),
        )


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def _moment(text: object) -> datetime | None:
    return datetime.fromisoformat(str(text)) if text else None


@dataclass(frozen=True, slots=True, kw_only=True)
class RunRecord:
    """What one run did, and how it ended (``exit_code`` is None while it runs)."""

    run_id: str
    state: str = RUNNING
    pid: int = 0
    host: str = ""
    started_at: datetime
    finished_at: datetime | None = None
    elapsed_seconds: float = 0.0
    exit_code: int | None = None
    interrupted: bool = False
    error: str | None = None
    """Why the run ended early or not ok (a run-level error, a bug, a dead shard, nothing ok)."""
    inputs: tuple[InputRecord, ...] = ()
    rows_in_input: int = 0
    counters: Counters = field(default_factory=Counters)
    temp_files_cleaned: int = 0
    processes: int = 1
    shards: int = 1
    kind: str = HARVEST
    intake: IntakeRecord | None = None
    """A server's deliveries (``kind`` ``serve``); None for a harvest."""

    @property
    def running(self) -> bool:
        """A harvest's record says it is running (a server's never does: ``serving``)."""
        return self.state == RUNNING

    @property
    def serves(self) -> bool:
        """The record is a server's (``harvester serve``)."""
        return self.kind == SERVE

    def is_live(self, now: datetime, *, host: str) -> bool:
        """A server still serving: its record says so, was refreshed within
        ``STALE_SECONDS`` of ``now``, and (on this ``host``) its process exists."""
        if not self.serves or self.state != SERVING:
            return False
        beat = self.intake.heartbeat_at if self.intake is not None else None
        beat = beat or self.started_at
        if now - beat > timedelta(seconds=STALE_SECONDS):
            return False
        return self.host != host or pid_alive(self.pid)

    @property
    def attempted(self) -> int:
        """Requests the run tried (invalid CSV rows are not tried)."""
        return sum(n for status, n in self.counters.requests.items() if status != INVALID)

    @property
    def not_ok_share(self) -> float | None:
        """The share of tried requests that did not end ok; None if none was tried."""
        attempted = self.attempted
        if not attempted:
            return None
        return 1 - self.counters.requests[OK] / attempted

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "state": self.state,
            "pid": self.pid,
            "host": self.host,
            "started_at": self.started_at.isoformat(),
            "finished_at": self.finished_at.isoformat() if self.finished_at else None,
            "elapsed_seconds": round(self.elapsed_seconds, 3),
            "exit_code": self.exit_code,
            "interrupted": self.interrupted,
            "error": self.error,
            "inputs": [
                {"path": i.path, "sha256": i.sha256, "bytes": i.bytes, "rows": i.rows}
                for i in self.inputs
            ],
            "rows_in_input": self.rows_in_input,
            **self.counters.to_json(),
            "temp_files_cleaned": self.temp_files_cleaned,
            "processes": self.processes,
            "shards": self.shards,
            "kind": self.kind,
            **({"intake": self.intake.to_json()} if self.intake is not None else {}),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunRecord:
        """Raises KeyError, TypeError or ValueError for a record that is not one. Records of
        older versions (no ``state``: written only at the end) read as finished."""
        finished = data.get("finished_at")
        code = data.get("exit_code")
        return cls(
            run_id=str(data["run_id"]),
            state=str(data.get("state", FINISHED)),
            pid=int(data.get("pid") or 0),
            host=str(data.get("host") or ""),
            started_at=datetime.fromisoformat(data["started_at"]),
            finished_at=datetime.fromisoformat(finished) if finished else None,
            elapsed_seconds=float(data.get("elapsed_seconds") or 0),
            exit_code=None if code is None else int(code),
            interrupted=bool(data.get("interrupted")),
            error=None if data.get("error") is None else str(data["error"]),
            inputs=tuple(
                InputRecord(
                    path=str(i["path"]),
                    sha256=str(i["sha256"]),
                    bytes=int(i.get("bytes") or 0),
                    rows=int(i.get("rows") or 0),
                )
                for i in data.get("inputs") or ()
            ),
            rows_in_input=int(data.get("rows_in_input") or 0),
            counters=Counters.from_json(data),
            temp_files_cleaned=int(data.get("temp_files_cleaned") or 0),
            processes=int(data.get("processes") or 1),
            shards=int(data.get("shards") or 1),
            kind=str(data.get("kind") or HARVEST),
            intake=IntakeRecord.from_json(data["intake"]) if data.get("intake") else None,
        )


def write(store: Store, record: RunRecord) -> None:
    """Write (or replace) ``record`` atomically, as ``runs/<run_id>.json``."""
    body = json.dumps(record.to_json(), indent=2) + "\n"
    store.put(f"runs/{record.run_id}.json", body.encode())


def read_all(where: Store | Location) -> tuple[list[RunRecord], list[str]]:
    """Every run record in ``where``, oldest first, and the names of unreadable ones."""
    store = as_store(where)
    records: list[RunRecord] = []
    unreadable: list[str] = []
    for info in store.list("runs/"):
        name = info.key.rsplit("/", 1)[-1]
        if not name.endswith(".json") or info.key.count("/") != 1:
            continue
        try:
            records.append(RunRecord.from_json(json.loads(store.get(info.key))))
        except (OutputError, ValueError, KeyError, TypeError, AttributeError):
            unreadable.append(name)
    records.sort(key=lambda r: r.run_id)
    return records, unreadable


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, run by another user
    return True

"""Run records: ``DIR/runs/<run_id>.json``, one typed ``RunRecord`` written and read here only.

A harvest writes its record when it starts (state ``running``, with its pid and host) and
again when it ends (state ``finished``, with the exit code and the reason). A record still
saying ``running`` whose process is gone tells ``harvester status`` that the run crashed
(killed outright, out of memory, power cut). Each write is atomic (a temp file renamed into
place, or one whole object: ``Store.put``), so a reader never sees half a record.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

from harvester.errors import OutputError
from harvester.storage.objects import Location, Store, as_store

RUNNING: Final = "running"
FINISHED: Final = "finished"


def this_host() -> str:
    return socket.gethostname()


@dataclass(frozen=True, slots=True, kw_only=True)
class InputRecord:
    path: str
    sha256: str
    bytes: int
    rows: int


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
    skipped_already_ok: int = 0
    duplicate_rows: int = 0
    requests: Mapping[str, int] = field(default_factory=dict)
    """Finished requests by status."""
    images_new: int = 0
    images_already_stored: int = 0
    images_failed: int = 0
    bytes_new: int = 0
    bytes_downloaded: int = 0
    temp_files_cleaned: int = 0
    result_requests: int = 0
    retries: int = 0
    rate_limited: int = 0
    manifest_rows: int = 0
    manifest_parts: int = 0
    processes: int = 1
    shards: int = 1
    nodes: tuple[str, ...] = ()
    """The cluster nodes (Ray node ids) the shards ran on; empty for a run on one machine."""

    @property
    def running(self) -> bool:
        return self.state == RUNNING

    @property
    def attempted(self) -> int:
        """Requests the run tried (invalid CSV rows are not tried)."""
        return sum(n for status, n in self.requests.items() if status != "invalid")

    @property
    def not_ok_share(self) -> float | None:
        """The share of tried requests that did not end ok; None if none was tried."""
        attempted = self.attempted
        if not attempted:
            return None
        return 1 - self.requests.get("ok", 0) / attempted

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
            "skipped_already_ok": self.skipped_already_ok,
            "duplicate_rows": self.duplicate_rows,
            "requests": dict(self.requests),
            "images": {
                "new": self.images_new,
                "already_stored": self.images_already_stored,
                "failed": self.images_failed,
            },
            "bytes_new": self.bytes_new,
            "bytes_downloaded": self.bytes_downloaded,
            "temp_files_cleaned": self.temp_files_cleaned,
            "result_requests": self.result_requests,
            "retries": self.retries,
            "rate_limited": self.rate_limited,
            "manifest_rows": self.manifest_rows,
            "manifest_parts": self.manifest_parts,
            "processes": self.processes,
            "shards": self.shards,
            **({"nodes": list(self.nodes)} if self.nodes else {}),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunRecord:
        """Raises KeyError, TypeError or ValueError for a record that is not one. Records of
        older versions (no ``state``: written only at the end) read as finished."""
        finished = data.get("finished_at")
        images = data.get("images") or {}
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
            skipped_already_ok=int(data.get("skipped_already_ok") or 0),
            duplicate_rows=int(data.get("duplicate_rows") or 0),
            requests={str(k): int(v) for k, v in (data.get("requests") or {}).items()},
            images_new=int(images.get("new") or 0),
            images_already_stored=int(images.get("already_stored") or 0),
            images_failed=int(images.get("failed") or 0),
            bytes_new=int(data.get("bytes_new") or 0),
            bytes_downloaded=int(data.get("bytes_downloaded") or 0),
            temp_files_cleaned=int(data.get("temp_files_cleaned") or 0),
            result_requests=int(data.get("result_requests") or 0),
            retries=int(data.get("retries") or 0),
            rate_limited=int(data.get("rate_limited") or 0),
            manifest_rows=int(data.get("manifest_rows") or 0),
            manifest_parts=int(data.get("manifest_parts") or 0),
            processes=int(data.get("processes") or 1),
            shards=int(data.get("shards") or 1),
            nodes=tuple(str(n) for n in data.get("nodes") or ()),
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

"""The server's run record (``runs/<run_id>.json``, ``kind`` ``serve``): written when it
starts, refreshed every ``runs.HEARTBEAT_SECONDS`` with its intake so far, and completed when it
stops, so that ``harvester status`` tells a server that serves from one that stopped or was
killed (its record ages past ``runs.STALE_SECONDS``), and ``report`` counts its intake.

Compaction reads these records to tell a server's manifest folder, which may still grow, from
a finished run's: the record is written before the server writes its first part.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import anyio

from harvester.counters import Counters
from harvester.errors import OutputError
from harvester.storage import runs
from harvester.storage.objects import Store
from harvester.storage.runs import IntakeRecord, RunRecord

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class Snapshot:
    """What the server has to say at one moment."""

    intake: IntakeRecord
    harvested: Counters


class ServerRecord:
    """Writes one server's record through its store."""

    def __init__(self, store: Store, run_id: str, snapshot: Callable[[], Snapshot]) -> None:
        self.store = store
        self.run_id = run_id
        self.started_at = datetime.now(UTC)
        self._snapshot = snapshot

    def record(
        self, *, state: str = runs.SERVING, exit_code: int | None = None, error: str | None = None
    ) -> RunRecord:
        now = datetime.now(UTC)
        snap = self._snapshot()
        ended = state != runs.SERVING
        intake = dataclasses.replace(snap.intake, heartbeat_at=now)
        return RunRecord(
            run_id=self.run_id,
            kind=runs.SERVE,
            state=state,
            pid=os.getpid(),
            host=runs.this_host(),
            started_at=self.started_at,
            finished_at=now if ended else None,
            elapsed_seconds=(now - self.started_at).total_seconds(),
            exit_code=exit_code,
            error=error,
            counters=snap.harvested,
            intake=intake,
        )

    def write(self, record: RunRecord) -> None:
        """``OutputError`` if it cannot be written."""
        runs.write(self.store, record)

    async def keep(self) -> None:
        """Refresh the record every ``HEARTBEAT_SECONDS`` until cancelled; a failed write is
        logged and tried again at the next beat (past ``STALE_SECONDS`` of failures, ``status``
        takes the server for gone)."""
        while True:
            await anyio.sleep(runs.HEARTBEAT_SECONDS)
            record = self.record()
            try:
                await anyio.to_thread.run_sync(self.write, record)
            except OutputError as exc:
                logger.error("cannot refresh the server's run record: %s", exc)

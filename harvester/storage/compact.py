"""``harvester compact``: merge the manifest's parts into a few large ones, and write the
current-state table, without losing a row or history, on a folder or a bucket alike
(docs/manifest.md "Compaction"; the commit protocol: docs/architecture.md).

Everything goes through the location's ``Store``, with its lock held. Generation N+1 is built
in local temp space (``Store.temp_dir``): the parts of generation N that are not full and every
run folder it does not replace, merged into parts of ``rows_per_part`` rows, checked run by run
against the rows read; then the current-state table (the rows of each request's latest run),
from N's table and the new runs. Then, in the store: the table, each merged part created once
under ``manifest/_compacted-N+1/``, and last the record ``generation.json`` naming every part of
the generation (N's full parts by their keys, not copied) and the run folders it replaces.
Creating the record is the commit; ``generations.settle`` then deletes what it makes stale.
Readers honour the newest record (``generations.read``), so they see each row once at every
step; the next compaction (or harvest) settles whatever a killed one left.

A server (``harvester serve``) writes parts beside a compaction, without the lock: its folder
(known by its run record, which it writes before its first part) is not replaced whole but its
parts as listed are taken one by one (``taken``, key and size); the parts it writes meanwhile
stay live for the next compaction, and the folder is its to write into.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import pyarrow as pa
import pyarrow.parquet as pq

from harvester.errors import LockedError, ManifestError, OutputError
from harvester.storage import generations, manifest, runs
from harvester.storage.generations import Listing, Part
from harvester.storage.objects import Held, Location, Store, as_store

ROWS_PER_PART: Final = 1_000_000
"""Rows in a merged part: a year of nightly runs of 20,000 requests makes 8 parts."""
ROW_GROUP: Final = 100_000
"""Rows in a row group of a merged part."""
PAUSE_ENV: Final = "HARVESTER_COMPACT_PAUSE_AT"
"""Tests only: the step (``merging``, ``publishing``, ``committed``, ``deleting``) at which a
compaction stops and waits to be killed, to check what a reader and the next compaction see
then."""
STEPS: Final = ("merging", "publishing", "committed", "deleting")


@dataclass(frozen=True, slots=True, kw_only=True)
class CompactStats:
    generation: int | None
    """The committed generation (None: the manifest is empty)."""
    runs_merged: int
    """Run folders merged into this generation (0: nothing to do)."""
    parts_before: int
    parts_after: int
    rows: int
    current_rows: int
    folders_removed: int
    seconds: float
    served: int = 0
    """Of the runs merged, folders not known to be finished: a server's, or one without a
    readable run record (their parts taken one by one; the folders stay)."""

    def summary(self) -> str:
        if self.generation is None:
            return "nothing to compact: the manifest is empty"
        if not self.runs_merged:
            return (
                f"nothing to compact: generation {self.generation} holds every run "
                f"({self.parts_after:,} parts); {self.folders_removed} leftover folder(s) removed"
            )
        served = (
            f" ({self.served} of them a server's or without a run record: the parts written "
            "so far are taken, the folders stay, and a server running goes on writing there)"
            if self.served
            else ""
        )
        return (
            f"compacted {self.runs_merged:,} run(s){served} into generation {self.generation}: "
            f"{self.parts_before:,} parts -> {self.parts_after:,}, {self.rows:,} rows kept, "
            f"current state {self.current_rows:,} rows, in {self.seconds:.1f} s"
        )


def compact(where: Store | Location, *, rows_per_part: int = ROWS_PER_PART) -> CompactStats:
    """Merge every run folder of a harvest (a store, or its location) into a new generation
    and rewrite the current-state table.

    Holds the location's lock (a harvest cannot run meanwhile; ``LockedError`` if one does);
    a server (``harvester serve``) can: the parts of its folder are taken as listed, and those
    it writes meanwhile stay for the next compaction.
    Raises ``ManifestError`` if a part cannot be read, ``OutputError`` if the store cannot be
    written; readers see the manifest as it was then, and the next compaction settles it.
    """
    started = time.monotonic()
    store = as_store(where)
    with store.lock(owner="harvester compact") as held:
        store.clean_temp()  # what a killed compaction (or run) left
        work = store.temp_dir / "compact"
        try:
            work.mkdir(parents=True)
        except OSError as exc:
            raise OutputError(f"cannot make the temp folder {work}: {exc}") from exc
        try:
            return _compact(store, held, work, rows_per_part=rows_per_part, started=started)
        finally:
            shutil.rmtree(work, ignore_errors=True)


def _compact(
    store: Store, held: Held, work: Path, *, rows_per_part: int, started: float
) -> CompactStats:
    listing = generations.read(store)
    removed = generations.settle(store, listing)
    previous = listing.generation
    old_parts = list(previous.parts) if previous is not None else []
    new_parts = listing.run_parts
    if not new_parts:
        return CompactStats(
            generation=previous.number if previous is not None else None,
            runs_merged=0,
            parts_before=len(old_parts),
            parts_after=len(old_parts),
            rows=0,
            current_rows=0,
            folders_removed=removed,
            seconds=time.monotonic() - started,
        )
    # Read after the listing: a server writes its record before its first part, so every
    # server's folder listed is known here. Only a harvest's folder is replaced whole (one
    # without a readable record, too, may be a server's).
    harvests = {r.run_id for r in runs.read_all(store)[0] if not r.serves}
    growing = {name for name in listing.runs if name not in harvests}
    number = previous.number + 1 if previous is not None else 1
    kept = [p for p in old_parts if p.rows >= rows_per_part]  # named again, not rewritten
    rewritten = [p.key for p in old_parts if p.rows < rows_per_part]
    merged, rows = _merge(store, [*rewritten, *new_parts], work, rows_per_part=rows_per_part)
    rows += sum(p.rows for p in kept)
    table = work / "current.parquet"
    current_rows = _write_current(store, listing, table)

    held.check()
    _create(store, generations.current_key(number), table)
    parts = list(kept)
    for index, (path, count) in enumerate(merged):
        key = f"{generations.folder(number)}/part-{index:05d}.parquet"
        _create(store, key, path)
        parts.append(Part(key, count))
        _pause("publishing")
    record = {
        "generation": number,
        "created_at": datetime.now(UTC).isoformat(),
        "rows": rows,
        "parts": [{"key": p.key, "rows": p.rows} for p in parts],
        "replaces": sorted(name for name in listing.runs if name not in growing),
        "taken": [
            {"key": key, "size": listing.sizes[key]}
            for name in sorted(listing.runs)
            if name in growing
            for key in listing.runs[name]
        ],
        "current": generations.current_key(number),
    }
    held.check()
    _create(store, generations.record_key(number), _synced(work, json.dumps(record, indent=2)))
    _pause("committed")
    removed += generations.settle(store, generations.read(store), each=lambda: _pause("deleting"))
    return CompactStats(
        generation=number,
        runs_merged=len(listing.runs),
        parts_before=len(old_parts) + len(new_parts),
        parts_after=len(parts),
        rows=rows,
        current_rows=current_rows,
        folders_removed=removed,
        seconds=time.monotonic() - started,
        served=len(growing),
    )


def _create(store: Store, key: str, path: Path) -> None:
    """Create ``key`` from the local file ``path`` (consumed), once: an object already there
    means another compaction is writing this generation (a lease taken over)."""
    if not store.put_new(key, path):
        raise LockedError(
            f"{store.location}/{key} exists already: another compaction is writing this "
            "generation; this one stops, nothing it wrote is read. Run 'harvester compact' "
            "again once the other is done"
        )


def _synced(work: Path, text: str) -> Path:
    """``text`` in a new file in ``work``, fsynced (so a put that renames it is durable)."""
    path = work / f"{uuid.uuid4().hex}.json"
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    return path


def _merge(
    store: Store, keys: Sequence[str], work: Path, *, rows_per_part: int
) -> tuple[list[tuple[Path, int]], int]:
    """Merge the parts ``keys`` into local files in ``work``; returns each file with its rows,
    and the rows in all. The files are fsynced and checked run by run against the rows read."""
    expected: Counter[str] = Counter()
    out = _Parts(work, rows_per_part=rows_per_part)
    try:
        for key in keys:
            for batch in _read(store, key):
                expected.update(_counts(batch))
                out.add(batch)
        out.close()
    except OSError as exc:
        raise OutputError(f"cannot write a compacted part in {work}: {exc}") from exc
    written: Counter[str] = Counter()
    merged = []
    for path in out.paths:
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())
        parquet = pq.ParquetFile(path)
        merged.append((path, parquet.metadata.num_rows))
        for batch in parquet.iter_batches(columns=["run_id"]):
            written.update(_counts(batch))
    if written != expected:
        raise ManifestError(
            f"the compacted parts built in {work} do not hold the rows read, run by run; "
            "nothing was changed. Run 'harvester verify' and report this"
        )
    return merged, sum(expected.values())


class _Parts:
    """Writes batches as parts of ``rows_per_part`` rows, in row groups of ``ROW_GROUP`` rows
    (a run's parts hold 5,000 rows each: written as they come, they compress worse and take
    longer to write and to read)."""

    def __init__(self, work: Path, *, rows_per_part: int) -> None:
        self._work = work
        self.paths: list[Path] = []
        self._rows_per_part = rows_per_part
        self._writer: pq.ParquetWriter | None = None
        self._in_part = 0
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0

    def add(self, batch: pa.RecordBatch) -> None:
        while batch.num_rows:
            take = batch.slice(0, self._rows_per_part - self._in_part)
            self._pending.append(take)
            self._pending_rows += take.num_rows
            self._in_part += take.num_rows
            batch = batch.slice(take.num_rows)
            if self._in_part >= self._rows_per_part:
                self._end_part()
            elif self._pending_rows >= ROW_GROUP:
                self._write_pending()

    def close(self) -> None:
        if self._in_part:
            self._end_part()

    def _write_pending(self) -> None:
        if not self._pending:
            return
        if self._writer is None:
            path = self._work / f"part-{len(self.paths):05d}.parquet"
            self.paths.append(path)
            self._writer = pq.ParquetWriter(path, manifest.SCHEMA, compression="zstd")
        self._writer.write_table(pa.Table.from_batches(self._pending, schema=manifest.SCHEMA))
        self._pending = []
        self._pending_rows = 0

    def _end_part(self) -> None:
        self._write_pending()
        assert self._writer is not None
        self._writer.close()
        self._writer = None
        self._in_part = 0
        _pause("merging")


def _read(store: Store, key: str) -> Iterator[pa.RecordBatch]:
    """One part's rows with ``SCHEMA`` (columns added since it was written read as null), a
    batch at a time (the part's bytes in memory: a few MB, or a partly filled merged part)."""
    try:
        data = store.get(key)
        parquet = pq.ParquetFile(pa.BufferReader(data))
        if parquet.schema_arrow.equals(manifest.SCHEMA):
            yield from parquet.iter_batches(batch_size=65_536)
        else:
            table = manifest.read_part(data, schema=manifest.SCHEMA)
            yield from table.to_batches(max_chunksize=65_536)
    except (OSError, OutputError, ValueError) as exc:  # pyarrow's ArrowInvalid: a ValueError
        raise ManifestError(
            f"cannot read manifest part {store.location}/{key}: {exc}; nothing was compacted. "
            "Run 'harvester verify', move the unreadable part out of the manifest, compact again"
        ) from exc


def _counts(batch: pa.RecordBatch) -> Counter[str]:
    runs = batch.column(batch.schema.get_field_index("run_id")).value_counts()
    return Counter({str(v["values"]): int(v["counts"]) for v in runs.to_pylist()})


def _write_current(store: Store, listing: Listing, path: Path) -> int:
    """The current-state table as of the new generation, into ``path``: the latest rows of
    each request (``manifest.latest_of``), from the previous table (or generation) and the
    new runs. Returns its rows."""
    previous = listing.generation
    if previous is None:
        base: list[str] = []
    elif previous.current is not None:
        base = [previous.current]
    else:
        base = [p.key for p in previous.parts]
    rows = manifest.scan_keys(store, [*base, *listing.run_parts])
    state = manifest.latest_of(rows)
    try:
        state.sink_parquet(path, compression="zstd", sync_on_close="all", engine="streaming")
    except OSError as exc:
        raise OutputError(f"cannot write the current-state table {path}: {exc}") from exc
    return int(pq.read_metadata(path).num_rows)


def _pause(step: str) -> None:
    """Stop here for good if the tests' ``PAUSE_ENV`` names this step."""
    if os.environ.get(PAUSE_ENV) == step:
        print(f"compact: paused at {step}", file=sys.stderr, flush=True)
        while True:
            time.sleep(60)


__all__ = ["PAUSE_ENV", "ROWS_PER_PART", "STEPS", "CompactStats", "compact"]

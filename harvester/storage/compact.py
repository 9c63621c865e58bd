"""``harvester compact``: merge the manifest's parts into a few large ones, and write the
current-state table, without losing a row or history and atomically (docs/manifest.md
"Compaction").

A compaction builds generation N+1 in ``DIR/.tmp``: generation N's full parts hard-linked
as they are, its other parts and every run folder it does not replace merged into parts of
``rows_per_part`` rows, and ``generation.json`` naming every folder the new generation
replaces. The current-state table (``DIR/current/current-N+1.parquet``: the rows of each
request's latest run) is written next, from generation N's table and the new runs. Then one
rename moves the whole folder into ``DIR/manifest/``: that is the commit. Only then are the
replaced folders deleted; whatever a kill left (a staged folder, replaced folders, stale
tables) is removed by the next compaction. Readers (``manifest.parts``) use the newest
generation and skip the folders it replaces, so they see each row once at every step.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from harvester.errors import ManifestError, OutputError
from harvester.storage import manifest
from harvester.storage.layout import Layout
from harvester.storage.lock import exclusive
from harvester.storage.objects import LocalStore

ROWS_PER_PART: Final = 1_000_000
"""Rows in a merged part: a year of nightly runs of 20,000 requests makes 8 parts."""
ROW_GROUP: Final = 100_000
"""Rows in a row group of a merged part."""
PAUSE_ENV: Final = "HARVESTER_COMPACT_PAUSE_AT"
"""Tests only: the step (``merging``, ``committed``, ``deleting``) at which a compaction
stops and waits to be killed, to check what a reader and the next compaction see then."""


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

    def summary(self) -> str:
        if self.generation is None:
            return "nothing to compact: the manifest is empty"
        if not self.runs_merged:
            return (
                f"nothing to compact: generation {self.generation} holds every run "
                f"({self.parts_after:,} parts); {self.folders_removed} leftover folder(s) removed"
            )
        return (
            f"compacted {self.runs_merged:,} run(s) into generation {self.generation}: "
            f"{self.parts_before:,} parts -> {self.parts_after:,}, {self.rows:,} rows kept, "
            f"current state {self.current_rows:,} rows, in {self.seconds:.1f} s"
        )


def compact(out_dir: Path, *, rows_per_part: int = ROWS_PER_PART) -> CompactStats:
    """Merge every run folder into a new generation and rewrite the current-state table.

    Holds the output folder's lock (a harvest cannot run meanwhile; ``LockedError`` if one
    does). Raises ``ManifestError`` if a part cannot be read, ``OutputError`` if the folder
    cannot be written; the manifest is unchanged then.
    """
    started = time.monotonic()
    layout = Layout(out_dir)
    if not layout.manifest.is_dir():
        raise ManifestError(f"{out_dir} has no manifest/ folder: is it the --out of a harvest?")
    with exclusive(layout):
        layout.clean_temp()  # a staged generation a killed compaction left
        layout.tmp.mkdir(exist_ok=True)
        store = LocalStore(out_dir)
        previous = manifest.generation(store)
        removed = _remove_replaced(out_dir, previous)
        runs = [out_dir / key for key in manifest.run_folders(store, previous)]
        new_parts = [p for folder in runs for p in sorted(folder.glob("*.parquet"))]
        old_parts = [out_dir / key for key in previous.parts] if previous is not None else []
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
        number = previous.number + 1 if previous is not None else 1
        name = f"{manifest.GENERATION_PREFIX}{number:06d}"
        stage = layout.tmp / name
        stage.mkdir()
        rows = _build(stage, old_parts, new_parts, rows_per_part=rows_per_part)
        current = out_dir / manifest.CURRENT_FOLDER / f"current-{number:06d}.parquet"
        current_rows = _write_current(layout, previous, old_parts, new_parts, current)
        replaces = sorted({f.name for f in runs} | (previous.replaces if previous else set()))
        if previous is not None:
            replaces.append(previous.name)
        written = sorted(p.name for p in stage.glob("*.parquet"))
        record = {
            "generation": number,
            "created_at": datetime.now(UTC).isoformat(),
            "replaces": replaces,
            "rows": rows,
            "parts": written,
            "current": str(current.relative_to(out_dir)),
        }
        _write_synced(stage / manifest.GENERATION_FILE, json.dumps(record, indent=2) + "\n")
        _fsync_dir(stage)
        try:
            os.rename(stage, layout.manifest / name)  # the commit
            _fsync_dir(layout.manifest)
        except OSError as exc:
            raise OutputError(
                f"cannot move the compacted generation into {layout.manifest}: "
                f"{exc.strerror or exc}; nothing was changed, run 'harvester compact' again"
            ) from exc
        _pause("committed")
        committed = manifest.generation(store)
        removed += _remove_replaced(out_dir, committed)
        return CompactStats(
            generation=number,
            runs_merged=len(runs),
            parts_before=len(old_parts) + len(new_parts),
            parts_after=len(written),
            rows=rows,
            current_rows=current_rows,
            folders_removed=removed,
            seconds=time.monotonic() - started,
        )


def _build(
    stage: Path, old_parts: Sequence[Path], new_parts: Sequence[Path], *, rows_per_part: int
) -> int:
    """Fill ``stage`` with the new generation's parts; returns its rows, checked per run
    against the rows read."""
    expected: Counter[str] = Counter()
    index = 0
    merge: list[Path] = []
    for part in old_parts:
        rows = pq.read_metadata(part).num_rows
        if rows >= rows_per_part:  # already full: carried over as it is
            _link(part, stage / f"part-{index:05d}.parquet")
            expected.update(_run_counts([part]))
            index += 1
        else:
            merge.append(part)
    merge.extend(new_parts)
    out = _Parts(stage, first=index, rows_per_part=rows_per_part)
    try:
        for part in merge:
            for batch in _read(part):
                expected.update(_counts(batch))
                out.add(batch)
        out.close()
    except OSError as exc:
        raise OutputError(f"cannot write a compacted part in {stage}: {exc}") from exc
    written = sorted(stage.glob("*.parquet"))
    for path in written:
        _fsync_file(path)
    if _run_counts(written) != expected:
        raise ManifestError(
            f"the compacted parts in {stage} do not hold the rows read, run by run; nothing "
            "was changed. Run 'harvester verify' and report this"
        )
    return sum(expected.values())


class _Parts:
    """Writes batches as parts of ``rows_per_part`` rows, in row groups of ``ROW_GROUP`` rows
    (a run's parts hold 5,000 rows each: written as they come, they compress worse and take
    longer to write and to read)."""

    def __init__(self, stage: Path, *, first: int, rows_per_part: int) -> None:
        self._stage = stage
        self._index = first
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
            path = self._stage / f"part-{self._index:05d}.parquet"
            self._writer = pq.ParquetWriter(path, manifest.SCHEMA, compression="zstd")
        self._writer.write_table(pa.Table.from_batches(self._pending, schema=manifest.SCHEMA))
        self._pending = []
        self._pending_rows = 0

    def _end_part(self) -> None:
        self._write_pending()
        assert self._writer is not None
        self._writer.close()
        self._writer = None
        self._index += 1
        self._in_part = 0
        _pause("merging")


def _read(part: Path) -> Iterator[pa.RecordBatch]:
    """One part's rows with ``SCHEMA`` (columns added since it was written read as null)."""
    try:
        parquet = pq.ParquetFile(part)
        if parquet.schema_arrow.equals(manifest.SCHEMA):
            yield from parquet.iter_batches(batch_size=65_536)
        else:
            dataset = ds.dataset([str(part)], schema=manifest.SCHEMA, format="parquet")
            yield from dataset.to_batches()
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise ManifestError(
            f"cannot read manifest part {part}: {exc}; nothing was compacted. Run 'harvester "
            f"verify', move the unreadable part out of the manifest folder, compact again"
        ) from exc


def _counts(batch: pa.RecordBatch) -> Counter[str]:
    runs = batch.column(batch.schema.get_field_index("run_id")).value_counts()
    return Counter({str(v["values"]): int(v["counts"]) for v in runs.to_pylist()})


def _run_counts(paths: Sequence[Path]) -> Counter[str]:
    counts: Counter[str] = Counter()
    for path in paths:
        for batch in pq.ParquetFile(path).iter_batches(columns=["run_id"]):
            counts.update(_counts(batch))
    return counts


def _write_current(
    layout: Layout,
    previous: manifest.Generation | None,
    old_parts: Sequence[Path],
    new_parts: Sequence[Path],
    path: Path,
) -> int:
    """The current-state table as of the new generation: the latest rows of each request,
    from the previous table (or generation) and the new runs. Returns its rows."""
    import polars as pl

    base = list(old_parts)
    if previous is not None and previous.current is not None:
        base = [layout.root / previous.current]
    rows = pl.scan_parquet(
        [str(p) for p in [*base, *new_parts]],
        schema=manifest.polars_schema(),
        missing_columns="insert",
    )
    keys = ["model", "request_id"]
    # Two streaming passes, so memory follows the number of requests, not of rows: each
    # request's newest run, then the rows of those runs. (One join of all rows with all
    # columns took 4 GB for a year of 20,000 requests a night.)
    newest = (
        rows.select(*keys, "run_id")
        .group_by(keys)
        .agg(pl.col("run_id").max())
        .collect(engine="streaming")
    )
    state = rows.join(newest.lazy(), on=[*keys, "run_id"], how="semi", nulls_equal=True)
    tmp = layout.temp_path(".parquet")
    try:
        path.parent.mkdir(exist_ok=True)
        state.sink_parquet(tmp, compression="zstd", sync_on_close="all", engine="streaming")
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        raise OutputError(f"cannot write the current-state table {path}: {exc}") from exc
    return int(pq.read_metadata(path).num_rows)


def _remove_replaced(out_dir: Path, gen: manifest.Generation | None) -> int:
    """Delete what the committed generation ``gen`` replaces: run folders, older
    generations, other current-state tables. Returns how many were removed."""
    if gen is None:
        return 0
    removed = 0
    for name in sorted(gen.replaces):
        folder = out_dir / "manifest" / name
        if folder.is_dir():
            shutil.rmtree(folder)
            removed += 1
            _pause("deleting")
    tables = out_dir / manifest.CURRENT_FOLDER
    keep = f"current-{gen.number:06d}.parquet"
    for table in sorted(tables.glob("current-*.parquet")) if tables.is_dir() else []:
        if table.name != keep:
            table.unlink(missing_ok=True)
    return removed


def _link(source: Path, target: Path) -> None:
    """A hard link (no copy) where the file system has them, else a copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pause(step: str) -> None:
    """Stop here for good if the tests' ``PAUSE_ENV`` names this step."""
    if os.environ.get(PAUSE_ENV) == step:
        print(f"compact: paused at {step}", file=sys.stderr, flush=True)
        while True:
            time.sleep(60)


__all__ = ["PAUSE_ENV", "ROWS_PER_PART", "CompactStats", "compact"]

"""Write stage: the Parquet manifest, its one declared schema, and reading state back.

The manifest is a dataset of immutable part files, ``DIR/manifest/<run_id>/*.parquet``: each
shard of a run writes ``shard-SSSS-part-NNNNN.parquet``, the run itself (invalid input rows)
``part-NNNNN.parquet``.
Once ``harvester compact`` has run, a generation of merged parts replaces the run folders its
record ``manifest/_compacted-NNNNNN/generation.json`` lists (``harvester.storage.compact``;
docs/manifest.md "Compaction"). Readers here read the live parts (``generations.read``), which
skip what the newest generation replaces and what a killed compaction left.

Each part is built in the store's ``temp_dir`` and put whole (``Store.put``: fsynced and
renamed into place in a folder, one object in a bucket), so a reader (or a crash) never sees
a half-written one; a run flushes a part every
``rows_per_part`` rows, ``bytes_per_part`` bytes of text or ``seconds_per_part`` seconds, so
a crash loses a bounded amount of finished work and memory stays bounded whatever the rows hold.
"""

from __future__ import annotations

import dataclasses
import re
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final

import anyio
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from harvester.errors import ManifestError, OutputError
from harvester.storage import generations
from harvester.storage.objects import Location, Store, as_store

if TYPE_CHECKING:
    import polars as pl

from harvester.statuses import EXPIRED, OK
from harvester.storage.rows import ManifestRow

SCHEMA: Final = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("harvested_at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("source_file", pa.string()),
        pa.field("source_line", pa.int64()),
        pa.field("model", pa.string()),
        pa.field("request_id", pa.string()),
        pa.field("request_status", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
        pa.field("http_status", pa.int32()),
        pa.field("attempts", pa.int32()),
        pa.field("seed", pa.int64()),
        pa.field("prompt", pa.string()),
        pa.field("image_count", pa.int32()),
        pa.field("image_index", pa.int32()),
        pa.field("image_url", pa.string()),
        pa.field("content_type", pa.string()),
        pa.field("sha256", pa.string()),
        pa.field("path", pa.string()),
        pa.field("bytes", pa.int64()),
        pa.field("stored_new", pa.bool_()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("image_format", pa.string()),
        pa.field("image_width", pa.int32()),
        pa.field("image_height", pa.int32()),
        pa.field("has_nsfw_concept", pa.bool_()),
        pa.field("timings", pa.string()),
        pa.field("inference_seconds", pa.float64()),
        pa.field("seed_text", pa.string()),
        pa.field("altered", pa.bool_()),
    ]
)
"""One row per image; a request without images (or that failed) has exactly one row.

``status`` is the row's own outcome; ``request_status`` is the request's overall outcome
(ok only when every row of the request is ok), repeated on each of its rows. ``timings`` is the
result's ``timings`` object as JSON text (non-finite numbers as null); ``image_url`` holds only
the media type for a ``data:`` URI, never its payload. ``seed`` is the result's seed when it
fits in int64, else null; ``seed_text`` always holds its exact decimal digits (relays send
seeds of 2^64 and more). ``altered`` is true when a stored text is not what the relay sent
(text that is not valid Unicode stored with U+FFFD, the key masked, ...); ``error`` then says
what was altered. Both are null in parts written before they existed.
``content_type``, ``width`` and ``height`` are what the API declared; ``image_format``,
``image_width`` and ``image_height`` what the stored file's header says (empty in parts written
before they were recorded).
"""


def polars_schema() -> pl.Schema:
    """``SCHEMA`` as polars sees it, for scans that must agree with the writer. (polars is
    imported only by what reads the manifest with it: a harvest never loads it.)"""
    import polars as pl

    return pl.Schema(pl.from_arrow(SCHEMA.empty_table()).schema)  # type: ignore[union-attr]


_FIELDS: Final = tuple(f.name for f in dataclasses.fields(ManifestRow))
assert tuple(SCHEMA.names) == _FIELDS, "ManifestRow and SCHEMA must list the same columns"


_TEXT_FIELDS: Final = tuple(f.name for f in SCHEMA if f.type == pa.string())
_SURROGATE: Final = re.compile("[\ud800-\udfff]")
REPAIRED_NOTE: Final = "text that is not valid Unicode was repaired (U+FFFD) in"


def rows_to_table(rows: Sequence[ManifestRow]) -> pa.Table:
    """Build an Arrow table with ``SCHEMA`` from rows.

    Text that cannot be encoded as UTF-8 (a lone surrogate a relay sent JSON-escaped) is
    stored repaired, and the row says so: one bad string must not lose the whole part.
    """
    try:
        return _table(rows)
    except UnicodeEncodeError:
        return _table([repaired(row) for row in rows])


def _table(rows: Sequence[ManifestRow]) -> pa.Table:
    columns = {name: [getattr(row, name) for row in rows] for name in _FIELDS}
    return pa.Table.from_pydict(columns, schema=SCHEMA)


def repaired(row: ManifestRow) -> ManifestRow:
    """``row`` with every lone surrogate in its text replaced by U+FFFD, ``altered`` set and
    a note in ``error`` naming the fields (the row itself if nothing needed it)."""
    changes: dict[str, object] = {}
    for name in _TEXT_FIELDS:
        value = getattr(row, name)
        if isinstance(value, str) and _SURROGATE.search(value):
            changes[name] = _SURROGATE.sub("\ufffd", value)
    if not changes:
        return row
    note = f"{REPAIRED_NOTE} {', '.join(changes)}"
    error = changes.get("error", row.error)
    changes["error"] = f"{error}; {note}" if error else note
    changes["altered"] = True
    return dataclasses.replace(row, **changes)  # type: ignore[arg-type]


class ManifestWriter:
    """Buffers rows and writes them as immutable, atomically renamed part files.

    With ``autoflush`` (the default) ``add`` writes a part as soon as one is due. An event loop
    passes ``autoflush=False`` and awaits ``flush_in_thread`` when ``due``: building, compressing
    and fsyncing a part takes long enough (seconds, while images are being written) to stall
    every request in flight if it ran on the loop.
    """

    def __init__(
        self,
        store: Store,
        run_id: str,
        *,
        rows_per_part: int = 5_000,
        seconds_per_part: float = 30.0,
        bytes_per_part: int = 64_000_000,
        autoflush: bool = True,
        prefix: str = "part",
    ) -> None:
        self._store = store
        self._run_id = run_id
        self._prefix = prefix
        self._rows_per_part = rows_per_part
        self._seconds_per_part = seconds_per_part
        self._bytes_per_part = bytes_per_part
        self._bytes = 0
        self._autoflush = autoflush
        self._buffer: list[ManifestRow] = []
        self._parts = 0
        self._last_flush = time.monotonic()
        self._writing = False
        self.rows_written = 0

    @property
    def parts_written(self) -> int:
        return self._parts

    @property
    def due(self) -> bool:
        """A part should be written: enough rows, or rows waiting for ``seconds_per_part``."""
        if not self._buffer or self._writing:
            return False
        late = time.monotonic() - self._last_flush >= self._seconds_per_part
        full = self._bytes >= self._bytes_per_part
        return late or full or len(self._buffer) >= self._rows_per_part

    def add(self, rows: Iterable[ManifestRow]) -> None:
        start = len(self._buffer)
        self._buffer.extend(rows)
        for row in self._buffer[start:]:
            self._bytes += _text_size(row)
        if self._autoflush and self.due:
            self.flush()

    def flush(self) -> None:
        """Write buffered rows as the next part file (nothing if the buffer is empty)."""
        rows = self._take()
        try:
            self._write_part(rows)
        finally:
            self._writing = False

    async def flush_in_thread(self) -> None:
        """``flush`` on a worker thread; rows added meanwhile go into the next part."""
        if self._writing:
            return
        rows = self._take()
        try:
            await anyio.to_thread.run_sync(self._write_part, rows)
        finally:
            self._writing = False

    def _take(self) -> list[ManifestRow]:
        rows, self._buffer = self._buffer, []
        self._bytes = 0
        self._last_flush = time.monotonic()
        self._writing = True
        return rows

    def _write_part(self, rows: list[ManifestRow]) -> None:
        if not rows:
            return
        key = f"manifest/{self._run_id}/{self._prefix}-{self._parts:05d}.parquet"
        tmp = self._store.temp_dir / f"{uuid.uuid4().hex}.parquet"
        try:
            try:
                pq.write_table(rows_to_table(rows), tmp, compression="zstd")
            except OSError as exc:
                raise OutputError(
                    f"cannot write manifest part {self._store.url(key)}: {exc.strerror or exc}"
                ) from exc
            self._store.put(key, tmp)  # whole, durably; the temp file is consumed
        except OutputError:
            tmp.unlink(missing_ok=True)
            self._buffer[:0] = rows  # kept for the final flush to try again
            self._bytes += sum(_text_size(row) for row in rows)
            raise
        self._parts += 1
        self.rows_written += len(rows)


def _text_size(row: ManifestRow) -> int:
    """About what a row's long texts take in a part being built (a few fixed-size columns
    aside): rows with huge prompts must not wait for ``rows_per_part`` to be written."""
    return (
        len(row.prompt or "")
        + len(row.timings or "")
        + len(row.error or "")
        + len(row.image_url or "")
        + len(row.content_type or "")
    )


def manifest_glob(where: Store | Location) -> str:
    """The glob that reads the whole manifest: ``pl.scan_parquet(manifest_glob(store),
    storage_options=store.storage_options)``. Exact whenever no compaction is under way
    (``parts`` is exact always)."""
    return as_store(where).url("manifest/**/*.parquet")


def has_manifest(where: Store | Location) -> bool:
    return bool(parts(where))


def parts(where: Store | Location) -> list[str]:
    """Every live part's key: the newest generation's, then those of the run folders it
    does not replace. Each manifest row is in exactly one of them, during a compaction too."""
    return generations.read(as_store(where)).parts


def scan_keys(store: Store, keys: Sequence[str]) -> pl.LazyFrame:
    """Lazily read the parts ``keys`` of ``store``."""
    import polars as pl

    if not keys:
        return pl.LazyFrame(schema=polars_schema())
    # Parts written before a column was added lack it: read it as null there.
    return pl.scan_parquet(
        [store.url(key) for key in keys],
        schema=polars_schema(),
        missing_columns="insert",
        storage_options=store.storage_options,
    )


def scan(where: Store | Location) -> pl.LazyFrame:
    """Lazily read every manifest row of a harvest (a store, or its location), each once."""
    store = as_store(where)
    return scan_keys(store, parts(store))


LATEST_KEYS: Final = ("model", "request_id")


def latest_of(rows: pl.LazyFrame) -> pl.LazyFrame:
    """The rows of each request's newest run: the run that wrote its newest row by
    ``harvested_at`` (the greater ``run_id`` if two runs wrote it at the same instant),
    whichever process wrote it, so a long-lived server's rows are not outranked by a run
    started later whose own row is older. Every reader of the latest state (``latest``,
    compaction's current-state table) decides it here; it streams (a group-by, then a semi
    join), so memory follows the number of requests, not of rows."""
    import polars as pl

    keys = list(LATEST_KEYS)
    newest = rows.group_by(keys).agg(pl.col("run_id").sort_by("harvested_at", "run_id").last())
    return rows.join(newest, on=[*keys, "run_id"], how="semi", nulls_equal=True)


def latest(where: Store | Location) -> pl.LazyFrame:
    """The rows of each request's newest run by time (``latest_of``): the current state of
    every request.

    After a compaction this reads the current-state table (already one request's latest rows
    each) plus the parts of the runs since, not the whole history.
    """
    import polars as pl

    store = as_store(where)
    listing = generations.read(store)
    gen = listing.generation
    if gen is None or gen.current is None:
        return latest_of(scan_keys(store, listing.parts))
    state = scan_keys(store, [gen.current])
    if not listing.runs:
        return state
    return latest_of(pl.concat([state, scan_keys(store, listing.run_parts)]))


def read_part(data: bytes, **options: Any) -> pa.Table:
    """A part's table from its bytes (``options``: ``pq.read_table``'s). The bytes are in
    memory already, so nothing is read ahead on Arrow's I/O threads (``pre_buffer``)."""
    return pq.read_table(pa.BufferReader(data), pre_buffer=False, **options)


def _batches(store: Store, columns: list[str], where: ds.Expression) -> Iterator[pa.RecordBatch]:
    """``columns`` of the live rows matching ``where``, one part at a time (memory stays flat
    however long the history); an unreadable part is a ``ManifestError`` saying what to do."""
    for key in parts(store):
        try:
            table = read_part(store.get(key), columns=columns, filters=where)
        except (OutputError, OSError, ValueError) as exc:  # ArrowInvalid is a ValueError
            raise ManifestError(
                f"cannot read the existing manifest ({store.url(key)}): {exc}; run 'harvester "
                f"verify {store.location}', then move the unreadable part file(s) out of the "
                "manifest folder (their requests are harvested again)"
            ) from exc
        yield from table.to_batches()


def ok_pairs(where: Store | Location) -> Iterator[tuple[str, str]]:
    """``(model, request_id)`` of every ok row in any earlier run (a pair can repeat), read
    in batches: memory stays flat however long the history."""
    store = as_store(where)
    for batch in _batches(store, ["model", "request_id"], ds.field("request_status") == OK):
        yield from zip(batch.column(0).to_pylist(), batch.column(1).to_pylist(), strict=True)


@dataclasses.dataclass(frozen=True, slots=True)
class AgedPair:
    """A pair first seen before the give-up cutoff (``expired``: it already has an
    ``expired`` row), from ``aged_pairs``."""

    model: str
    request_id: str
    expired: bool


def aged_pairs(where: Store | Location, *, first_seen_before: datetime) -> Iterator[AgedPair]:
    """Pairs with a row not ok harvested before ``first_seen_before``, or an ``expired`` row
    (a pair can repeat), read in batches like ``ok_pairs``. A harvest gives up on those of them
    that were never ok (``--give-up-after``)."""
    store = as_store(where)
    cutoff = pa.scalar(first_seen_before, type=SCHEMA.field("harvested_at").type)
    # Ok rows are left out: a pair ever ok is skipped anyway, and it keeps this pass short.
    aged = (ds.field("harvested_at") < cutoff) & (ds.field("request_status") != OK)
    where = aged | (ds.field("request_status") == EXPIRED)
    for batch in _batches(store, ["model", "request_id", "request_status"], where):
        for model, request_id, status in zip(
            batch.column(0).to_pylist(),
            batch.column(1).to_pylist(),
            batch.column(2).to_pylist(),
            strict=True,
        ):
            if model is not None and request_id is not None:
                yield AgedPair(model, request_id, status == EXPIRED)


def unreadable_parts(where: Store | Location) -> list[str]:
    """The keys of live manifest parts whose Parquet footer cannot be read."""
    store = as_store(where)
    bad = []
    for key in parts(store):
        try:
            pq.read_metadata(pa.BufferReader(store.get(key)))
        except (OutputError, OSError, ValueError):  # pyarrow's ArrowInvalid is a ValueError
            bad.append(key)
    return bad


__all__ = [
    "SCHEMA",
    "AgedPair",
    "ManifestRow",
    "ManifestWriter",
    "aged_pairs",
    "has_manifest",
    "latest",
    "latest_of",
    "manifest_glob",
    "ok_pairs",
    "parts",
    "polars_schema",
    "rows_to_table",
    "scan",
    "scan_keys",
    "unreadable_parts",
]

"""The manifest: one declared schema, immutable parts written atomically, state read back."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from harvester.errors import ManifestError
from harvester.storage import manifest
from harvester.storage.compact import compact
from harvester.storage.layout import Layout
from harvester.storage.manifest import SCHEMA, ManifestRow, ManifestWriter
from harvester.storage.objects import LocalStore, Store

NOW = datetime(2026, 11, 24, 3, 0, tzinfo=UTC)


def row(run_id: str, request_id: str, status: str = "ok", **kw: object) -> ManifestRow:
    return ManifestRow(
        run_id=run_id,
        harvested_at=NOW,
        source_file="e.csv",
        source_line=2,
        model="fal-ai/flux/dev",
        request_id=request_id,
        request_status=status,
        status=status,
        **kw,
    )  # type: ignore[arg-type]


def test_writer_flushes_parts_by_rows_and_keeps_schema(store: Store) -> None:
    writer = ManifestWriter(store, "r1", rows_per_part=3, seconds_per_part=3600)
    for i in range(7):
        writer.add([row("r1", f"id-{i}", seed=2**62 + i)])
    assert writer.parts_written == 2  # a part each time the buffer reached 3 rows
    writer.flush()
    writer.flush()  # nothing buffered: no empty part
    parts = [info.key for info in store.list("manifest/r1/")]
    assert parts == [f"manifest/r1/part-{n:05d}.parquet" for n in range(3)]
    for part in parts:
        assert pq.read_schema(pa.BufferReader(store.get(part))).equals(SCHEMA)
    df = manifest.scan(store).collect()
    assert df.height == 7
    assert df["seed"].max() == 2**62 + 6
    assert list(store.temp_dir.iterdir()) == []


def test_writer_flushes_parts_by_bytes_too(tmp_path: Path) -> None:
    """Forty results with 60 MB prompts reached 8.1 GB before a part was due by rows."""
    layout = Layout(tmp_path)
    layout.prepare()
    writer = ManifestWriter(
        LocalStore(layout.root),
        "r1",
        rows_per_part=1000,
        seconds_per_part=3600,
        bytes_per_part=100_000,
    )
    for i in range(6):
        writer.add([row("r1", f"id-{i}", prompt="p" * 40_000)])
    assert writer.parts_written == 2  # at 3 rows (120 KB), then again with the next 3
    writer.flush()
    assert pl.read_parquet(manifest.manifest_glob(tmp_path)).height == 6


def test_ok_pairs_and_latest_state(store: Store) -> None:
    first = ManifestWriter(store, "20261101T000000Z-aaaaaa")
    first.add(
        [row("20261101T000000Z-aaaaaa", "a", "pending"), row("20261101T000000Z-aaaaaa", "b", "ok")]
    )
    first.flush()
    second = ManifestWriter(store, "20261102T000000Z-bbbbbb")
    second.add([row("20261102T000000Z-bbbbbb", "a", "ok")])
    second.flush()
    assert sorted(r for _, r in manifest.ok_pairs(store)) == ["a", "b"]
    latest = manifest.latest(store).collect()
    assert dict(latest.select("request_id", "request_status").iter_rows()) == {"a": "ok", "b": "ok"}


def test_the_latest_state_is_the_newest_row_by_time_whichever_run_wrote_it(
    store: Store,
) -> None:
    """A server's run started first (its run id sorts first) and keeps writing: its row of a
    request, newer than the one a nightly run started later wrote, is the latest state, in
    ``latest`` and in the current-state table a compaction writes."""
    serving, nightly = "20261101T000000Z-serve0", "20261102T000000Z-night0"
    later = NOW + timedelta(seconds=30)
    night = ManifestWriter(store, nightly)
    night.add([row(nightly, "a", "pending"), row(nightly, "b", "ok"), row(nightly, "c", "ok")])
    night.flush()
    serve = ManifestWriter(store, serving)
    images = [
        dataclasses.replace(row(serving, "a"), image_index=i, harvested_at=later) for i in (0, 1)
    ]
    serve.add(
        [
            *images,
            dataclasses.replace(row(serving, "b", "failed"), harvested_at=NOW - timedelta(hours=1)),
        ]
    )
    serve.flush()

    def state() -> dict[str, list[tuple[str, str]]]:
        found: dict[str, list[tuple[str, str]]] = {}
        for rid, run, status in (
            manifest.latest(store)
            .select("request_id", "run_id", "request_status")
            .collect()
            .sort("request_id")
            .iter_rows()
        ):
            found.setdefault(rid, []).append((run, status))
        return found

    expected = {
        "a": [(serving, "ok"), (serving, "ok")],  # newer than the nightly's pending
        "b": [(nightly, "ok")],  # the server's row of b is older
        "c": [(nightly, "ok")],
    }
    assert state() == expected
    assert compact(store).current_rows == 4
    assert state() == expected


def test_ok_pairs_of_an_empty_location(store: Store) -> None:
    assert list(manifest.ok_pairs(store)) == []
    assert not manifest.has_manifest(store)


def test_row_fields_match_schema() -> None:
    assert [f.name for f in SCHEMA] == list(ManifestRow.__dataclass_fields__)


def test_an_unreadable_part_is_named_with_what_to_do(store: Store) -> None:
    writer = ManifestWriter(store, "r1")
    writer.add([row("r1", "a")])
    writer.flush()
    store.put("manifest/r2/part-00000.parquet", b"junk!")
    assert manifest.unreadable_parts(store) == ["manifest/r2/part-00000.parquet"]
    with pytest.raises(ManifestError, match=r"r2/part-00000\.parquet.*move the unreadable part"):
        list(manifest.ok_pairs(store))


@pytest.mark.anyio
async def test_writer_flushes_in_a_thread_when_due_and_only_then(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "out")
    layout.prepare()
    writer = ManifestWriter(
        LocalStore(layout.root), "r1", rows_per_part=2, seconds_per_part=3600, autoflush=False
    )
    writer.add([row("r1", "id-0")])
    assert not writer.due
    writer.add([row("r1", "id-1"), row("r1", "id-2")])  # no autoflush: the caller decides
    assert writer.due and writer.parts_written == 0
    await writer.flush_in_thread()
    assert not writer.due
    assert (writer.parts_written, writer.rows_written) == (1, 3)
    written = pl.read_parquet(layout.manifest / "r1" / "part-00000.parquet")
    assert written["request_id"].to_list() == ["id-0", "id-1", "id-2"]

"""Compaction: every row and its history kept, the latest state unchanged, each row read once
at every step, and a kill -9 at any step loses nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest

from harvester.storage import manifest
from harvester.storage.compact import PAUSE_ENV, compact
from harvester.storage.layout import Layout
from harvester.storage.manifest import ManifestRow, ManifestWriter
from harvester.storage.objects import LocalStore

START = datetime(2026, 1, 1, 3, 0, tzinfo=UTC)


def night(layout: Layout, n: int, *, requests: int = 40, parts: int = 3) -> str:
    """Run ``n``'s rows: every request retried each night, ok from night ``request % 7``;
    two images for ok ones, one invalid row without ids."""
    run_id = (START + timedelta(days=n)).strftime("%Y%m%dT%H%M%S.000Z-") + f"{n:06x}"
    writer = ManifestWriter(
        LocalStore(layout.root), run_id, rows_per_part=max(1, requests // parts)
    )
    at = START + timedelta(days=n, minutes=5)
    for i in range(requests):
        status = "ok" if n >= i % 7 else "not_found"
        images = 2 if status == "ok" else 1
        writer.add(
            ManifestRow(
                run_id=run_id,
                harvested_at=at,
                source_file="e.csv",
                source_line=i + 2,
                model="fal-ai/flux" if i % 2 else "fal-ai/flux/dev",
                request_id=f"req-{i}",
                request_status=status,
                status=status,
                image_index=k if status == "ok" else None,
                prompt=f"night {n}",
            )
            for k in range(images)
        )
    writer.add(
        [
            ManifestRow(
                run_id=run_id,
                harvested_at=at,
                source_file="e.csv",
                source_line=999,
                model=None,
                request_id=None,
                request_status="invalid",
                status="invalid",
            )
        ]
    )
    writer.flush()
    return run_id


def history(out: Path, nights: range) -> None:
    layout = Layout(out)
    layout.prepare()
    for n in nights:
        night(layout, n)


def rows_per_run(out: Path) -> Counter[str]:
    return Counter(manifest.scan(out).select("run_id").collect()["run_id"].to_list())


def state(out: Path) -> pl.DataFrame:
    columns = ["run_id", "model", "request_id", "status", "image_index", "prompt"]
    return manifest.latest(out).select(columns).collect().sort(columns, nulls_last=True)


def test_compaction_keeps_every_row_per_run_and_the_latest_state(tmp_path: Path) -> None:
    out = tmp_path / "out"
    history(out, range(10))
    before_rows, before_state = rows_per_run(out), state(out)
    parts_before = len(manifest.parts(out))

    stats = compact(out, rows_per_part=150)

    assert stats.generation == 1
    assert stats.runs_merged == 10
    assert stats.rows == sum(before_rows.values())
    assert rows_per_run(out) == before_rows
    assert state(out).equals(before_state)
    assert len(manifest.parts(out)) < parts_before
    assert stats.current_rows == before_state.height
    # Only the generation is left in manifest/: a plain glob reads each row once too.
    assert [p.name for p in (out / "manifest").iterdir()] == ["_compacted-000001"]
    assert pl.read_parquet(manifest.manifest_glob(out)).height == stats.rows


def test_later_runs_and_compactions_keep_it_exact(tmp_path: Path) -> None:
    out = tmp_path / "out"
    history(out, range(5))
    compact(out, rows_per_part=150)
    history(out, range(5, 9))
    # State read from the current-state table plus the runs since: same as from everything.
    mixed = state(out)
    everything = (
        manifest._latest_of(manifest.scan(out))
        .select(mixed.columns)
        .collect()
        .sort(mixed.columns, nulls_last=True)
    )
    assert mixed.equals(everything)
    before_rows = rows_per_run(out)

    stats = compact(out, rows_per_part=150)

    assert stats.generation == 2
    assert stats.runs_merged == 4
    assert rows_per_run(out) == before_rows
    assert state(out).equals(mixed)
    assert sorted(p.name for p in (out / "current").iterdir()) == ["current-000002.parquet"]
    record = json.loads((out / "manifest" / "_compacted-000002" / "generation.json").read_text())
    assert "_compacted-000001" in record["replaces"]
    assert len(record["replaces"]) == 10  # 9 run folders and the previous generation
    # Nothing new: a no-op that says so.
    again = compact(out, rows_per_part=150)
    assert again.runs_merged == 0
    assert "nothing to compact" in again.summary()


def test_full_parts_are_carried_over_not_rewritten(tmp_path: Path) -> None:
    out = tmp_path / "out"
    history(out, range(6))
    compact(out, rows_per_part=100)
    first = {
        p.name: p.stat().st_ino for p in (out / "manifest" / "_compacted-000001").glob("*.parquet")
    }
    full = [
        n
        for n in first
        if pq.read_metadata(out / "manifest" / "_compacted-000001" / n).num_rows == 100
    ]
    assert full
    history(out, range(6, 7))
    compact(out, rows_per_part=100)
    second = {p.stat().st_ino for p in (out / "manifest" / "_compacted-000002").glob("*.parquet")}
    assert {first[n] for n in full} <= second  # the same files, hard-linked


def test_ok_pairs_and_aged_pairs_read_the_generation(tmp_path: Path) -> None:
    out = tmp_path / "out"
    history(out, range(3))
    ok_before = sorted(manifest.ok_pairs(out))
    cutoff = START + timedelta(days=1)
    aged_before = sorted(
        (a.model, a.request_id) for a in manifest.aged_pairs(out, first_seen_before=cutoff)
    )
    compact(out)
    assert sorted(manifest.ok_pairs(out)) == ok_before
    assert (
        sorted((a.model, a.request_id) for a in manifest.aged_pairs(out, first_seen_before=cutoff))
        == aged_before
    )
    assert len(set(aged_before)) == 34  # night 0 only: the 40 requests but the 6 ok then


def _compact_process(out: Path, pause: str) -> subprocess.Popen[str]:
    env = {**os.environ, PAUSE_ENV: pause}
    return subprocess.Popen(
        [sys.executable, "-m", "harvester", "compact", str(out)],
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )


@pytest.mark.parametrize("pause", ["merging", "committed", "deleting"])
def test_a_reader_mid_compaction_and_a_kill_9_lose_nothing(tmp_path: Path, pause: str) -> None:
    out = tmp_path / "out"
    history(out, range(8))
    # One compaction already done, so the kill also meets a previous generation.
    compact(out, rows_per_part=150)
    history(out, range(8, 12))
    before_rows, before_state = rows_per_run(out), state(out)

    process = _compact_process(out, pause)
    assert process.stderr is not None
    line = process.stderr.readline()
    assert line == f"compact: paused at {pause}\n", line + process.stderr.read()
    # A reader now, mid-compaction: each row exactly once.
    assert rows_per_run(out) == before_rows
    assert state(out).equals(before_state)
    os.kill(process.pid, signal.SIGKILL)
    process.communicate(timeout=30)
    assert process.returncode == -signal.SIGKILL
    # After the kill: still each row once, and the next compaction finishes the job.
    assert rows_per_run(out) == before_rows
    assert state(out).equals(before_state)
    stats = compact(out)
    assert rows_per_run(out) == before_rows
    assert state(out).equals(before_state)
    assert stats.generation == 2  # killed before the commit: built again; after: kept
    assert [p.name for p in (out / "manifest").iterdir()] == [f"_compacted-{stats.generation:06d}"]
    assert list((out / ".tmp").iterdir()) == []
    assert pl.read_parquet(manifest.manifest_glob(out)).height == sum(before_rows.values())

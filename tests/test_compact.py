"""Compaction, on a folder and on Ceph's S3 gateway alike: every row and its history kept, the
latest state unchanged, each row read once at every step (by the harvester's readers and by
polars), and a kill -9 at any step of the commit protocol loses nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest

from harvester.errors import ExitCode
from harvester.sandbox import Sandbox
from harvester.storage import generations, manifest
from harvester.storage.compact import PAUSE_ENV, STEPS, compact
from harvester.storage.manifest import ManifestRow
from harvester.storage.objects import LocalStore, Store
from tests.conftest import Output, harvest_args, run_cli, write_csv
from tests.parts import put_run

START = datetime(2026, 1, 1, 3, 0, tzinfo=UTC)


def night(store: Store, n: int, *, requests: int = 40, parts: int = 3) -> str:
    """Run ``n``'s rows, in ``parts`` parts: every request retried each night, ok from night
    ``request % 7``; two images for ok ones, one invalid row without ids."""
    run_id = (START + timedelta(days=n)).strftime("%Y%m%dT%H%M%S.000Z-") + f"{n:06x}"
    at = START + timedelta(days=n, minutes=5)
    rows = [
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
        for i in range(requests)
        for status in ["ok" if n >= i % 7 else "not_found"]
        for k in range(2 if status == "ok" else 1)
    ]
    rows.append(
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
    )
    put_run(store, run_id, rows, parts=parts)
    return run_id


def history(output: Output, nights: range) -> None:
    for n in nights:
        night(output.store, n)


def rows_per_run(output: Output) -> Counter[str]:
    return Counter(manifest.scan(output.store).select("run_id").collect()["run_id"].to_list())


def polars_rows(output: Output, *, glob: bool = False) -> Counter[str]:
    """The manifest read by polars itself, as docs/manifest.md shows: the live parts the
    harvester lists, or (``glob``) every part under ``manifest/``."""
    store = output.store
    keys = generations.read(store).parts
    source = manifest.manifest_glob(store) if glob else [store.url(k) for k in keys]
    frame = pl.scan_parquet(source, storage_options=store.storage_options).select("run_id")
    return Counter(frame.collect()["run_id"].to_list())


def state(output: Output) -> pl.DataFrame:
    columns = ["run_id", "model", "request_id", "status", "image_index", "prompt"]
    return manifest.latest(output.store).select(columns).collect().sort(columns, nulls_last=True)


def keys(store: Store, prefix: str) -> list[str]:
    return sorted(i.key for i in store.list(prefix))


def manifest_keys(output: Output) -> list[str]:
    return keys(output.store, "manifest/") + keys(output.store, "current/")


def settled(output: Output) -> None:
    """Only the newest generation's parts and record under manifest/, one current table."""
    listing = generations.read(output.store)
    assert listing.generation is not None
    assert listing.stale == ()
    live = {*listing.parts, generations.record_key(listing.generation.number)}
    assert set(keys(output.store, "manifest/")) == live
    assert keys(output.store, "current/") == [generations.current_key(listing.generation.number)]


def test_compaction_keeps_every_row_per_run_and_the_latest_state(output: Output) -> None:
    history(output, range(10))
    before_rows, before_state = rows_per_run(output), state(output)
    parts_before = len(generations.read(output.store).parts)

    stats = compact(output.store, rows_per_part=150)

    assert stats.generation == 1
    assert stats.runs_merged == 10
    assert stats.rows == sum(before_rows.values())
    assert rows_per_run(output) == before_rows
    assert polars_rows(output) == before_rows
    assert state(output).equals(before_state)
    assert len(generations.read(output.store).parts) < parts_before
    assert stats.current_rows == before_state.height
    # Only the generation is left in manifest/: a plain glob reads each row once too.
    settled(output)
    assert {k.split("/")[1] for k in keys(output.store, "manifest/")} == {"_compacted-000001"}
    assert polars_rows(output, glob=True) == before_rows
    if isinstance(output.store, LocalStore):  # no empty run folders left behind
        folder = output.store.layout.manifest
        assert [p.name for p in folder.iterdir()] == ["_compacted-000001"]


def test_later_runs_and_compactions_keep_it_exact(output: Output) -> None:
    history(output, range(5))
    compact(output.store, rows_per_part=150)
    history(output, range(5, 9))
    # State read from the current-state table plus the runs since: same as from everything.
    mixed = state(output)
    everything = (
        manifest.latest_of(manifest.scan(output.store))
        .select(mixed.columns)
        .collect()
        .sort(mixed.columns, nulls_last=True)
    )
    assert mixed.equals(everything)
    before_rows = rows_per_run(output)

    stats = compact(output.store, rows_per_part=150)

    assert stats.generation == 2
    assert stats.runs_merged == 4
    assert rows_per_run(output) == before_rows
    assert polars_rows(output, glob=True) == before_rows
    assert state(output).equals(mixed)
    settled(output)
    record = json.loads(output.store.get(generations.record_key(2)))
    # The run folders merged into it: whole (a harvest's, by its record), or part by part
    # (these have no record: maybe a server's, which may still write there).
    taken = {entry["key"].rsplit("/", 1)[0] for entry in record["taken"]}
    assert len(record["replaces"]) + len(taken) == 4
    assert record["rows"] == sum(before_rows.values())
    # Nothing new: a no-op that says so.
    again = compact(output.store, rows_per_part=150)
    assert again.runs_merged == 0
    assert "nothing to compact" in again.summary()


def test_full_parts_are_carried_over_not_rewritten(output: Output) -> None:
    history(output, range(6))
    compact(output.store, rows_per_part=100)
    first = generations.read(output.store).generation
    assert first is not None
    full = {p.key for p in first.parts if p.rows == 100}
    assert full
    written = {i.key: i.modified for i in output.store.list("manifest/") if i.key in full}
    history(output, range(6, 7))

    compact(output.store, rows_per_part=100)

    second = generations.read(output.store).generation
    assert second is not None and second.number == 2
    assert full <= {p.key for p in second.parts}  # named again, from generation 1's folder
    assert {i.key: i.modified for i in output.store.list("manifest/") if i.key in full} == written
    settled(output)


def test_ok_pairs_and_aged_pairs_read_the_generation(output: Output) -> None:
    history(output, range(3))
    ok_before = sorted(manifest.ok_pairs(output.store))
    cutoff = START + timedelta(days=1)
    aged_before = sorted(
        (a.model, a.request_id) for a in manifest.aged_pairs(output.store, first_seen_before=cutoff)
    )
    compact(output.store)
    assert sorted(manifest.ok_pairs(output.store)) == ok_before
    aged_after = manifest.aged_pairs(output.store, first_seen_before=cutoff)
    assert sorted((a.model, a.request_id) for a in aged_after) == aged_before
    assert len(set(aged_before)) == 34  # night 0 only: the 40 requests but the 6 ok then


def _compact_process(output: Output, pause: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "harvester", "compact", output.location],
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **output.env, PAUSE_ENV: pause},
    )


@pytest.fixture
def killed(output: Output) -> Iterator[list[subprocess.Popen[str]]]:
    """Processes a test starts, killed at its end whatever happened."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=30)


@pytest.mark.parametrize("pause", STEPS)
def test_a_reader_mid_compaction_and_a_kill_9_lose_nothing(
    output: Output, pause: str, killed: list[subprocess.Popen[str]]
) -> None:
    history(output, range(8))
    # One compaction already done, so the kill also meets a previous generation.
    compact(output.store, rows_per_part=150)
    history(output, range(8, 12))
    before_rows, before_state = rows_per_run(output), state(output)
    untouched = manifest_keys(output)

    process = _compact_process(output, pause)
    killed.append(process)
    assert process.stderr is not None
    line = process.stderr.readline()
    assert line == f"compact: paused at {pause}\n", line + process.stderr.read()
    # A reader now, mid-compaction: each row exactly once.
    assert rows_per_run(output) == before_rows
    assert polars_rows(output) == before_rows
    assert state(output).equals(before_state)
    os.kill(process.pid, signal.SIGKILL)
    process.communicate(timeout=30)
    assert process.returncode == -signal.SIGKILL

    # After the kill: still each row once, through the harvester and through polars.
    assert rows_per_run(output) == before_rows
    assert polars_rows(output) == before_rows
    assert state(output).equals(before_state)
    if pause == "merging":  # nothing was written to the store yet: even a glob is exact
        assert manifest_keys(output) == untouched
        assert polars_rows(output, glob=True) == before_rows
    for info in list(output.store.list(".lock/")):  # stands in for the dead lease's expiry
        output.store.delete(info.key)

    # The next compaction finishes the job (or rolls it back and does it again).
    stats = compact(output.store)

    assert stats.generation == 2  # killed before the commit: built again; after: kept
    assert rows_per_run(output) == before_rows
    assert polars_rows(output, glob=True) == before_rows
    assert state(output).equals(before_state)
    settled(output)
    assert not (output.store.temp_dir / "compact").exists()
    if isinstance(output.store, LocalStore):
        assert list(output.store.temp_dir.iterdir()) == []


def test_a_generation_whose_record_lists_file_names_is_read_and_merged_again(
    output: Output,
) -> None:
    """Records written before parts were listed by key name the files of their own folder."""
    history(output, range(4))
    compact(output.store, rows_per_part=150)
    listing = generations.read(output.store)
    assert listing.generation is not None
    record = json.loads(output.store.get(generations.record_key(1)))
    record["parts"] = [p["key"].rsplit("/", 1)[-1] for p in record["parts"]]
    record["replaces"] = [*record["replaces"], "_compacted-000000"]
    output.store.delete(generations.record_key(1))
    output.store.put(generations.record_key(1), json.dumps(record).encode())
    assert generations.read(output.store).parts == listing.parts
    history(output, range(4, 6))
    before_rows, before_state = rows_per_run(output), state(output)

    stats = compact(output.store, rows_per_part=150)

    assert stats.generation == 2
    assert rows_per_run(output) == before_rows
    assert polars_rows(output, glob=True) == before_rows
    assert state(output).equals(before_state)
    settled(output)


@pytest.mark.parametrize("pause", ["publishing", "committed"])
def test_the_next_harvest_settles_a_killed_compaction(
    output: Output,
    pause: str,
    killed: list[subprocess.Popen[str]],
    sandbox: Sandbox,
    tmp_path: Path,
) -> None:
    history(output, range(4))
    before_rows = rows_per_run(output)
    process = _compact_process(output, pause)
    killed.append(process)
    assert process.stderr is not None
    assert process.stderr.readline() == f"compact: paused at {pause}\n"
    os.kill(process.pid, signal.SIGKILL)
    process.communicate(timeout=30)
    assert generations.read(output.store).stale  # what the kill left: a glob reads rows twice
    for info in list(output.store.list(".lock/")):  # stands in for the dead lease's expiry
        output.store.delete(info.key)

    csv = write_csv(tmp_path / "in.csv", [("fal-ai/flux/dev", "settle-1")])
    harvest = run_cli(harvest_args(sandbox, output.location, csv), env=output.env)

    assert harvest.exit_code == ExitCode.OK, harvest.output
    assert generations.read(output.store).stale == ()
    after = rows_per_run(output)
    assert polars_rows(output, glob=True) == after
    assert len(after - before_rows) == 1  # the new run's rows, and nothing twice
    assert after & before_rows == before_rows

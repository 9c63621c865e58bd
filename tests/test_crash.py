"""Crash safety (issue item 5) with real processes: SIGKILL a harvest at varied moments,
rerun it, and check every invariant.

- nothing partial or corrupt under images/: every file's name is its content's sha256
- every Parquet file under manifest/ reads back
- rows finished before the crash are kept: earlier parts are untouched, and the rerun skips
  exactly the requests they hold as ok
- every input pair ends up in the manifest, with the status the sandbox says it must have
- temp files of the dead run are gone after the rerun; ``harvester verify`` passes

The sandbox is one process for the module; each round harvests its own request ids into its
own folder. Every third round also kills the first rerun. Kill points are chosen by progress
(after the harvest holds its lock) plus a delay that differs per round; nothing is timed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest

from harvester.errors import ExitCode
from harvester.sandbox import FaultRates, SandboxConfig, expected_status
from harvester.statuses import OK
from harvester.storage.manifest import SCHEMA, manifest_glob
from harvester.views.verify import verify
from tests.conftest import write_csv
from tests.processes import (
    SandboxProcess,
    kill_after,
    run_harvest,
    run_records,
    sandbox_process,
    start_harvest,
)

ROUNDS = 10
REQUESTS = 200
# What matters here: bodies cut short mid-stream, resets, and ids that never become ok.
FAULTS = "reset=0.02,truncate=0.05,expired=0.02,notfound=0.02,failed=0.02"
HARVEST_FLAGS = ("--rps", "100", "--flush-every", "0.3", "--retry-budget", "30", "-q")
SPECIAL = (
    "pending-",
    "missing-",
    "inline-",
    "dup-",
    "redirect-",
    "expiredimg-",
    "notimage-",
    "big-",
)


@pytest.fixture(scope="module")
def sandbox() -> Iterator[SandboxProcess]:
    with sandbox_process(
        "--faults", FAULTS, "--image-bytes", "8000", "--slow", "0.1", "--retry-after", "0.1"
    ) as running:
        yield running


def pairs_for(round_no: int) -> list[tuple[str, str]]:
    models = ("fal-ai/flux/dev", "fal-ai/flux", "workflows/acme/upscale")
    pairs = [(models[n % 3], f"crash{round_no}-{n:04d}") for n in range(REQUESTS)]
    pairs += [("fal-ai/flux", f"{prefix}crash{round_no}") for prefix in SPECIAL]
    return pairs


def check_store_and_parts(out: Path) -> dict[Path, bytes]:
    """The invariants that hold at every moment; returns the manifest parts' bytes."""
    for path in (out / "images").rglob("*"):
        if path.is_file():
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            assert path.name.split(".")[0] == digest, f"{path} is not named by its content"
            assert path.parent.name == digest[:2]
    parts = {p: p.read_bytes() for p in sorted((out / "manifest").rglob("*")) if p.is_file()}
    for part in parts:
        assert part.suffix == ".parquet", f"unexpected file {part}"
        assert pq.read_table(part).schema.equals(SCHEMA), part
    return parts


def ok_pairs(out: Path) -> set[tuple[str, str]]:
    if not any((out / "manifest").rglob("*.parquet")):
        return set()
    df = pl.read_parquet(manifest_glob(out)).filter(pl.col("request_status") == OK)
    return set(df.select("model", "request_id").iter_rows())


@pytest.mark.slow
def test_kill_9_then_rerun_keeps_every_invariant(tmp_path: Path, sandbox: SandboxProcess) -> None:
    world = SandboxConfig(faults=FaultRates.parse(FAULTS))
    killed = kept_rows = leftovers = 0
    for round_no in range(ROUNDS):
        pairs = pairs_for(round_no)
        csv = write_csv(tmp_path / f"round{round_no}.csv", pairs)
        out = tmp_path / f"out{round_no}"

        harvest = start_harvest(sandbox.base_url, out, csv, extra=HARVEST_FLAGS)
        killed += kill_after(harvest, out, delay=0.15 * round_no)
        if round_no % 3 == 2:  # and kill the first rerun too, early in its run
            rerun = start_harvest(sandbox.base_url, out, csv, extra=HARVEST_FLAGS)
            killed += kill_after(rerun, out, delay=0.3)

        before = check_store_and_parts(out)
        done_before = ok_pairs(out)
        kept_rows += len(done_before)
        leftovers += sum(1 for _ in (out / ".tmp").iterdir())

        final = run_harvest(sandbox.base_url, out, csv, extra=HARVEST_FLAGS)

        assert final.returncode == ExitCode.INCOMPLETE, final.stderr
        assert "Traceback" not in final.stderr + final.stdout
        after = check_store_and_parts(out)
        assert all(after[part] == data for part, data in before.items()), "a part changed"
        record = run_records(out)[-1]
        requests = record["requests"]
        assert isinstance(requests, dict)
        assert record["skipped_already_ok"] == len(done_before)
        assert sum(requests.values()) == len(pairs) - len(done_before)
        df = pl.read_parquet(manifest_glob(out))
        state = dict(
            df.sort("run_id")
            .group_by("request_id")
            .agg(pl.col("request_status").last())
            .iter_rows()
        )
        assert set(df.select("model", "request_id").iter_rows()) == set(pairs)
        for _, request_id in pairs:
            assert state[request_id] == expected_status(request_id, world, repolls=False), (
                request_id
            )
        assert list((out / ".tmp").iterdir()) == []
        report = verify(out)
        assert report.ok, report.summary()
    print(
        f"\n{ROUNDS} rounds: {killed} kills, {kept_rows} ok requests kept across kills, "
        f"{leftovers} temp files left by dead runs (all cleaned)"
    )
    assert killed >= ROUNDS  # every first harvest was still running when killed


def test_temp_files_of_a_dead_run_are_removed_at_start(
    tmp_path: Path, sandbox: SandboxProcess
) -> None:
    """What a run killed mid-write leaves in DIR/.tmp (a partial image, a partial part, a
    folder) is removed by the next run, under its lock, before it starts."""
    out = tmp_path / "out"
    tmp = out / ".tmp"
    tmp.mkdir(parents=True)
    (tmp / "3f2a.part").write_bytes(b"\x89PNG\r\n\x1a\n half an image")
    (tmp / "9c1d.parquet").write_bytes(b"PAR1 half a part")
    (tmp / "stray").mkdir()
    csv = write_csv(tmp_path / "e.csv", [("fal-ai/flux", "tempclean-1")])

    done = run_harvest(sandbox.base_url, out, csv, extra=("-q",))

    assert done.returncode == ExitCode.OK, done.stderr
    assert list(tmp.iterdir()) == []
    assert verify(out).ok

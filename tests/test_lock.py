"""Overlapping runs (issue item 6) with real processes, as cron would start them."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import polars as pl

from harvester.errors import ExitCode
from harvester.storage.manifest import manifest_glob
from harvester.views.verify import verify
from tests.conftest import write_csv
from tests.processes import run_harvest, run_records, sandbox_process, start_harvest, wait_for_lock

# 100 requests at 20/s: the first harvest runs for about five seconds.
SLOW = ("--rps", "20", "-q")


def test_a_second_harvest_exits_at_once_and_the_first_is_unharmed(tmp_path: Path) -> None:
    pairs = [("fal-ai/flux/dev", f"overlap-{n:03d}") for n in range(100)]
    csv = write_csv(tmp_path / "e.csv", pairs)
    out = tmp_path / "out"
    with sandbox_process("--image-bytes", "2000") as sandbox:
        first = start_harvest(sandbox.base_url, out, csv, extra=SLOW)
        wait_for_lock(out, first)

        second = run_harvest(sandbox.base_url, out, csv, extra=SLOW)

        assert first.poll() is None, "the second run must not wait for the first"
        assert second.returncode == ExitCode.LOCKED
        assert second.stderr == (
            f"harvester: error: another harvest (pid {first.pid}) is already running on "
            f"{out}; this run did nothing. Wait for it to finish, or stagger the cron "
            "schedules\n"
        )
        assert second.stdout == ""
        stdout, stderr = first.communicate(timeout=60)

    assert first.returncode == ExitCode.OK, stderr
    assert "100 requests in" in stdout
    assert len(run_records(out)) == 1  # the second run left no trace
    df = pl.read_parquet(manifest_glob(out))
    assert set(df.select("model", "request_id").iter_rows()) == set(pairs)
    assert df["run_id"].n_unique() == 1
    assert verify(out).ok


def test_the_lock_dies_with_its_process(tmp_path: Path) -> None:
    csv = write_csv(tmp_path / "e.csv", [("fal-ai/flux", f"lockdie-{n:03d}") for n in range(60)])
    out = tmp_path / "out"
    with sandbox_process("--image-bytes", "2000") as sandbox:
        doomed = start_harvest(sandbox.base_url, out, csv, extra=SLOW)
        wait_for_lock(out, doomed)
        os.kill(doomed.pid, signal.SIGKILL)
        doomed.communicate(timeout=30)

        after = run_harvest(sandbox.base_url, out, csv, extra=("--rps", "500", "-q"))

    assert doomed.returncode == -signal.SIGKILL
    assert after.returncode == ExitCode.OK, after.stderr
    assert verify(out).ok

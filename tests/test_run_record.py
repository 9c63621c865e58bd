"""The run record (``DIR/runs/<run_id>.json``) tells the truth about how a run ended."""

from __future__ import annotations

import json
import time
from pathlib import Path

import polars as pl
import pytest

from harvester.api.download import ImageDownloader, ImageFailure
from harvester.errors import ExitCode
from harvester.sandbox import Sandbox
from harvester.storage.manifest import manifest_glob
from harvester.storage.store import StoredImage
from tests.conftest import harvest_args, run_cli, write_csv
from tests.processes import (
    kill_after,
    run_harvest,
    sandbox_process,
    start_harvest,
    wait_for_lock,
)


def read_records(out: Path) -> list[dict[str, object]]:
    return [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]


def test_record_of_a_rejected_key_has_exit_code_4_and_the_error(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    csv = write_csv(tmp_path / "e.csv", [("fal-ai/flux", f"rec-{i}") for i in range(20)])
    out = tmp_path / "out"

    result = run_cli(harvest_args(sandbox, out, csv), key="wrong-key-0000")

    assert result.exit_code == ExitCode.AUTH
    [record] = read_records(out)
    assert record["exit_code"] == ExitCode.AUTH
    assert "refused the key" in str(record["error"])
    assert "wrong-key-0000" not in json.dumps(record)


def test_record_of_a_finished_run_has_no_error(tmp_path: Path, sandbox: Sandbox) -> None:
    csv = write_csv(tmp_path / "e.csv", [("fal-ai/flux", "rec-ok-1"), ("fal-ai/flux", "missing-9")])
    out = tmp_path / "out"

    result = run_cli(harvest_args(sandbox, out, csv))

    assert result.exit_code == ExitCode.INCOMPLETE
    [record] = read_records(out)
    assert record["exit_code"] == ExitCode.INCOMPLETE
    assert record["error"] is None
    assert record["requests"] == {"ok": 1, "not_found": 1}


def test_record_of_a_bug_has_exit_code_1_and_says_so(
    tmp_path: Path, sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception that is not ours (a bug) still shows as one, but the record and
    ``status`` must not call the run ok."""
    real_store = ImageDownloader.store
    calls: list[str] = []

    async def store(self: ImageDownloader[StoredImage], url: str) -> StoredImage | ImageFailure:
        calls.append(url)
        if len(calls) == 4:
            raise RuntimeError("boom in the store")
        return await real_store(self, url)

    monkeypatch.setattr(ImageDownloader, "store", store)
    csv = write_csv(tmp_path / "e.csv", [("fal-ai/flux", f"bug-{i}") for i in range(10)])
    out = tmp_path / "out"

    with pytest.raises(BaseExceptionGroup) as raised:  # a process would exit 1 with it
        run_cli(harvest_args(sandbox, out, csv, extra=["--workers", "1"]))

    assert raised.group_contains(RuntimeError, match="boom in the store", depth=None)
    [record] = read_records(out)
    assert record["exit_code"] == ExitCode.BUG
    assert record["error"] == "unexpected error (a bug): RuntimeError: boom in the store"
    status = run_cli(["status", str(out)])
    assert status.exit_code == ExitCode.BUG, status.output


def test_a_sigkilled_harvest_leaves_a_record_status_calls_crashed(tmp_path: Path) -> None:
    """The record is written when the run starts: while the harvest runs, ``status`` says so;
    after kill -9 the record still says running, its pid is gone and the lock is free, and
    ``status`` says crashed with a non-zero exit. A rerun then finishes and ``status`` says
    how that one ended."""
    pairs = [("fal-ai/flux/dev", f"kill9-{n:03d}") for n in range(200)]
    csv = write_csv(tmp_path / "e.csv", pairs)
    out = tmp_path / "out"
    flags = ("--rps", "1000", "--concurrency", "4", "--workers", "1", "--flush-every", "0.2")
    with sandbox_process("--latency-ms", "100", "--image-bytes", "4000") as sandbox:
        harvest = start_harvest(sandbox.base_url, out, csv, extra=flags)
        wait_for_lock(out, harvest)
        for _ in range(3000):
            if list((out / "runs").glob("*.json")):
                break
            time.sleep(0.01)
        running = run_cli(["status", str(out), "--json"])
        # Kill once a manifest part is written (however busy the machine), with 200 requests
        # at 100 ms each and 4 in flight still to go.
        for _ in range(3000):
            if list((out / "manifest").glob("*/*.parquet")):
                break
            time.sleep(0.01)
        assert kill_after(harvest, out, 0.0), "the harvest ended before it could be killed"

        [record] = read_records(out)
        assert record["state"] == "running"
        assert record["pid"] == harvest.pid
        assert record["exit_code"] is None
        assert json.loads(running.output)["verdict"] == "running"
        assert json.loads(running.output)["running"]["run_id"] == record["run_id"]

        result = run_cli(["status", str(out)])
        assert result.exit_code == ExitCode.NO_RECENT_RUN != 0
        assert result.output.startswith(
            f"CRASHED: the last run {record['run_id']} (pid {harvest.pid} on "
        )
        assert "its process is gone and the folder is unlocked" in result.output
        quiet = run_cli(["status", str(out), "--incomplete-ok", "--quiet"])
        assert quiet.exit_code == ExitCode.NO_RECENT_RUN
        assert quiet.output.startswith("CRASHED:")
        assert json.loads(run_cli(["status", str(out), "--json"]).output)["verdict"] == "crashed"
        assert pl.read_parquet(manifest_glob(out)).height > 0  # finished rows were kept

        rerun = run_harvest(sandbox.base_url, out, csv, extra=(*flags, "-q"))
        assert rerun.returncode == ExitCode.OK, rerun.stderr

    after = run_cli(["status", str(out)])
    assert after.exit_code == ExitCode.OK, after.output
    assert f"{record['run_id']} crashed" in after.output  # listed among the earlier runs

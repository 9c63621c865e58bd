"""``harvester compact`` and ``--give-up-after`` through the CLI, against a real sandbox, on a
folder and on Ceph's S3 gateway alike."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl

from harvester.errors import ExitCode
from harvester.sandbox import Sandbox
from harvester.storage import manifest
from harvester.storage.manifest import ManifestRow
from tests.conftest import Output, harvest_args, run_cli, write_csv
from tests.parts import put_run

MODEL = "fal-ai/flux/dev"


def state(output: Output) -> dict[str, str]:
    latest = manifest.latest(output.store).group_by("request_id")
    return dict(latest.agg(pl.col("request_status").first()).collect().iter_rows())  # type: ignore[arg-type]


def folders(output: Output, prefix: str) -> set[str]:
    return {i.key.removeprefix(prefix).split("/")[0] for i in output.store.list(prefix)}


def test_compact_keeps_the_report_and_the_next_run_skips_ok_pairs(
    sandbox: Sandbox, tmp_path: Path, output: Output
) -> None:
    first = write_csv(tmp_path / "a.csv", [(MODEL, f"cmp-{i}") for i in range(6)])
    second = write_csv(
        tmp_path / "b.csv", [(MODEL, f"cmp-{i}") for i in range(4, 9)] + [(MODEL, "missing-c")]
    )
    assert (
        run_cli(harvest_args(sandbox, output.location, first), env=output.env).exit_code
        == ExitCode.OK
    )
    second_run = run_cli(harvest_args(sandbox, output.location, second), env=output.env)
    assert second_run.exit_code == ExitCode.INCOMPLETE
    report_before = run_cli(["report", output.location], env=output.env).output
    state_before = state(output)

    result = run_cli(["compact", output.location], env=output.env)

    assert result.exit_code == ExitCode.OK, result.output
    assert result.output.startswith("compacted 2 run(s) into generation 1: ")
    assert run_cli(["report", output.location], env=output.env).output == report_before
    assert state(output) == state_before
    assert folders(output, "manifest/") == {"_compacted-000001"}
    assert len(list(output.store.list("current/"))) == 1

    again = run_cli(harvest_args(sandbox, output.location, first, second), env=output.env)
    assert again.exit_code == ExitCode.INCOMPLETE
    assert "9 already ok in earlier runs" in again.output  # read from the generation
    compacted = run_cli(["compact", output.location], env=output.env).output
    assert compacted.startswith("compacted 1 run(s) into generation 2")
    nothing = run_cli(["compact", output.location], env=output.env).output
    assert nothing.startswith("nothing to compact: generation 2")


def test_compact_refuses_a_folder_without_manifest(tmp_path: Path) -> None:
    empty = run_cli(["compact", str(tmp_path)])
    assert empty.exit_code == ExitCode.USAGE
    assert "has no manifest/ folder" in empty.output


def test_compact_refuses_a_location_in_use(output: Output) -> None:
    put_run(output.store, "20260101T000000.000Z-000000", [_row("r-1", "ok", datetime.now(UTC))])
    with output.store.lock(owner="harvester run elsewhere"):
        locked = run_cli(["compact", output.location], env=output.env)
    assert locked.exit_code == ExitCode.LOCKED, locked.output
    assert "already running" in locked.output
    assert run_cli(["compact", output.location], env=output.env).exit_code == ExitCode.OK


def test_a_job_with_compact_true_compacts_after_the_harvest(
    sandbox: Sandbox, tmp_path: Path, output: Output
) -> None:
    csv = write_csv(tmp_path / "a.csv", [(MODEL, f"job-{i}") for i in range(3)])
    job = tmp_path / "job.toml"
    job.write_text(
        f'inputs = ["a.csv"]\nout = "{output.location}"\n'
        f'base-url = "{sandbox.base_url}"\ncompact = true\n'
    )
    result = run_cli(["run", str(job)], env=output.env)
    assert result.exit_code == ExitCode.OK, result.output
    assert "compacted 1 run(s) into generation 1" in result.output
    assert csv.exists()
    assert state(output) == {f"job-{i}": "ok" for i in range(3)}
    assert folders(output, "manifest/") == {"_compacted-000001"}


def _row(request_id: str, status: str, when: datetime) -> ManifestRow:
    run_id = when.strftime("%Y%m%dT%H%M%S.000Z-") + "0ld0ld"
    return ManifestRow(
        run_id=run_id,
        harvested_at=when,
        source_file="old.csv",
        source_line=2,
        model=MODEL,
        request_id=request_id,
        request_status=status,
        status=status,
    )


def _seed(output: Output, rows: list[tuple[str, str]], days_ago: float) -> None:
    """An earlier run's rows, ``days_ago`` old: ``(request_id, status)``."""
    when = datetime.now(UTC) - timedelta(days=days_ago)
    found = [_row(request_id, status, when) for request_id, status in rows]
    put_run(output.store, found[0].run_id, found)


def test_give_up_after_expires_old_ids_without_a_request(
    sandbox: Sandbox, tmp_path: Path, output: Output
) -> None:
    _seed(output, [("missing-gone", "not_found"), ("pending-gone", "pending")], days_ago=10)
    _seed(output, [("missing-young", "not_found")], days_ago=3)
    old = write_csv(
        tmp_path / "old.csv",
        [(MODEL, "missing-gone"), (MODEL, "pending-gone"), (MODEL, "missing-young")],
    )

    before = sandbox.stats()["result_requests"]
    first = run_cli(harvest_args(sandbox, output.location, old), env=output.env)
    assert first.exit_code == ExitCode.INCOMPLETE, first.output
    assert "expired 2" in first.output
    assert sandbox.stats()["result_requests"] - before == 1  # missing-young only
    assert state(output) == {
        "missing-gone": "expired",
        "pending-gone": "expired",
        "missing-young": "not_found",
    }
    [error] = (
        manifest.latest(output.store)
        .filter(pl.col("request_id") == "missing-gone")
        .select("error")
        .collect()["error"]
    )
    assert "--retry-expired" in error
    report = run_cli(["report", output.location], env=output.env)
    assert "expired" in report.output

    # Given up for good: the next run neither fetches nor writes them.
    before = sandbox.stats()["result_requests"]
    second = run_cli(harvest_args(sandbox, output.location, old), env=output.env)
    assert "2 already ok in earlier runs (or expired)" in second.output
    assert sandbox.stats()["result_requests"] - before == 1

    # A longer --give-up-after keeps missing-young fetched; --retry-expired fetches all again.
    before = sandbox.stats()["result_requests"]
    third = run_cli(
        harvest_args(sandbox, output.location, old, extra=["--retry-expired"]), env=output.env
    )
    assert third.exit_code == ExitCode.INCOMPLETE
    assert sandbox.stats()["result_requests"] - before >= 3
    assert state(output)["missing-gone"] == "not_found"
    assert state(output)["pending-gone"] == "pending"

    # A shorter --give-up-after gives up on the young one too.
    fourth = run_cli(
        harvest_args(sandbox, output.location, old, extra=["--give-up-after", "2"]), env=output.env
    )
    assert "expired 1" in fourth.output  # the other two already expired before
    assert state(output)["missing-young"] == "expired"

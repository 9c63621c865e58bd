"""``harvester compact`` and ``--give-up-after`` through the CLI, against a real sandbox."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl

from harvester.errors import ExitCode
from harvester.sandbox import Sandbox
from harvester.storage import manifest
from harvester.storage.layout import Layout
from harvester.storage.lock import exclusive
from harvester.storage.manifest import ManifestRow, ManifestWriter
from harvester.storage.objects import LocalStore
from tests.conftest import harvest_args, run_cli, write_csv

MODEL = "fal-ai/flux/dev"


def state(out: Path) -> dict[str, str]:
    latest = manifest.latest(out).group_by("request_id").agg(pl.col("request_status").first())
    return dict(latest.collect().iter_rows())  # type: ignore[arg-type]


def test_compact_keeps_the_report_and_the_next_run_skips_ok_pairs(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    first = write_csv(tmp_path / "a.csv", [(MODEL, f"cmp-{i}") for i in range(6)])
    second = write_csv(
        tmp_path / "b.csv", [(MODEL, f"cmp-{i}") for i in range(4, 9)] + [(MODEL, "missing-c")]
    )
    assert run_cli(harvest_args(sandbox, out, first)).exit_code == ExitCode.OK
    assert run_cli(harvest_args(sandbox, out, second)).exit_code == ExitCode.INCOMPLETE
    report_before = run_cli(["report", str(out)]).output
    state_before = state(out)

    result = run_cli(["compact", str(out)])

    assert result.exit_code == ExitCode.OK, result.output
    assert result.output.startswith("compacted 2 run(s) into generation 1: ")
    assert run_cli(["report", str(out)]).output == report_before
    assert state(out) == state_before
    assert [p.name for p in (out / "manifest").iterdir()] == ["_compacted-000001"]
    assert len(list((out / "current").iterdir())) == 1

    again = run_cli(harvest_args(sandbox, out, first, second))
    assert again.exit_code == ExitCode.INCOMPLETE
    assert "9 already ok in earlier runs" in again.output  # read from the generation
    assert run_cli(["compact", str(out)]).output.startswith("compacted 1 run(s) into generation 2")
    assert run_cli(["compact", str(out)]).output.startswith("nothing to compact: generation 2")


def test_compact_refuses_a_folder_without_manifest_and_a_locked_one(tmp_path: Path) -> None:
    empty = run_cli(["compact", str(tmp_path)])
    assert empty.exit_code == ExitCode.USAGE
    assert "has no manifest/ folder" in empty.output
    (tmp_path / "manifest").mkdir()
    with exclusive(Layout(tmp_path)):
        locked = run_cli(["compact", str(tmp_path)])
    assert locked.exit_code == ExitCode.LOCKED, locked.output


def test_a_job_with_compact_true_compacts_after_the_harvest(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    csv = write_csv(tmp_path / "a.csv", [(MODEL, f"job-{i}") for i in range(3)])
    job = tmp_path / "job.toml"
    job.write_text(
        f'inputs = ["a.csv"]\nout = "out"\nbase-url = "{sandbox.base_url}"\ncompact = true\n'
    )
    result = run_cli(["run", str(job)])
    assert result.exit_code == ExitCode.OK, result.output
    assert "compacted 1 run(s) into generation 1" in result.output
    assert csv.exists()
    assert state(tmp_path / "out") == {f"job-{i}": "ok" for i in range(3)}


def _seed(out: Path, rows: list[tuple[str, str]], days_ago: float) -> None:
    """An earlier run's rows, ``days_ago`` old: ``(request_id, status)``."""
    layout = Layout(out)
    layout.prepare()
    when = datetime.now(UTC) - timedelta(days=days_ago)
    run_id = when.strftime("%Y%m%dT%H%M%S.000Z-") + "0ld0ld"
    writer = ManifestWriter(LocalStore(layout.root), run_id)
    writer.add(
        ManifestRow(
            run_id=run_id,
            harvested_at=when,
            source_file="old.csv",
            source_line=2,
            model=MODEL,
            request_id=request_id,
            request_status=status,
            status=status,
        )
        for request_id, status in rows
    )
    writer.flush()


def test_give_up_after_expires_old_ids_without_a_request(sandbox: Sandbox, tmp_path: Path) -> None:
    out = tmp_path / "out"
    _seed(out, [("missing-gone", "not_found"), ("pending-gone", "pending")], days_ago=10)
    _seed(out, [("missing-young", "not_found")], days_ago=3)
    old = write_csv(
        tmp_path / "old.csv",
        [(MODEL, "missing-gone"), (MODEL, "pending-gone"), (MODEL, "missing-young")],
    )

    before = sandbox.stats()["result_requests"]
    first = run_cli(harvest_args(sandbox, out, old))
    assert first.exit_code == ExitCode.INCOMPLETE, first.output
    assert "expired 2" in first.output
    assert sandbox.stats()["result_requests"] - before == 1  # missing-young only
    assert state(out) == {
        "missing-gone": "expired",
        "pending-gone": "expired",
        "missing-young": "not_found",
    }
    [error] = (
        manifest.latest(out)
        .filter(pl.col("request_id") == "missing-gone")
        .select("error")
        .collect()["error"]
    )
    assert "--retry-expired" in error
    report = run_cli(["report", str(out)])
    assert "expired" in report.output

    # Given up for good: the next run neither fetches nor writes them.
    before = sandbox.stats()["result_requests"]
    second = run_cli(harvest_args(sandbox, out, old))
    assert "2 already ok in earlier runs (or expired)" in second.output
    assert sandbox.stats()["result_requests"] - before == 1

    # A longer --give-up-after keeps missing-young fetched; --retry-expired fetches all again.
    before = sandbox.stats()["result_requests"]
    third = run_cli(harvest_args(sandbox, out, old, extra=["--retry-expired"]))
    assert third.exit_code == ExitCode.INCOMPLETE
    assert sandbox.stats()["result_requests"] - before >= 3
    assert state(out)["missing-gone"] == "not_found"
    assert state(out)["pending-gone"] == "pending"

    # A shorter --give-up-after gives up on the young one too.
    fourth = run_cli(harvest_args(sandbox, out, old, extra=["--give-up-after", "2"]))
    assert "expired 1" in fourth.output  # the other two already expired before
    assert state(out)["missing-young"] == "expired"

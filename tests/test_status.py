"""``harvester status``: did the last run work?"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

from harvester.errors import ExitCode
from harvester.sandbox import Sandbox
from harvester.storage.layout import Layout
from harvester.storage.lock import exclusive, holder
from harvester.views.status import status
from tests.conftest import harvest_args, run_cli, write_csv

T0 = datetime(2026, 11, 24, 3, 15, tzinfo=UTC)


def write_record(out: Path, started: datetime, exit_code: int, **extra: object) -> str:
    run_id = f"{started:%Y%m%dT%H%M%SZ}-abc123"
    record = {
        "run_id": run_id,
        "started_at": started.isoformat(),
        "finished_at": (started + timedelta(minutes=4)).isoformat(),
        "elapsed_seconds": 240.0,
        "exit_code": exit_code,
        "error": None,
        "inputs": [{"path": "/exports/2026-11-23.csv", "sha256": "ab" * 32, "rows": 10}],
        "requests": {"ok": 1204, "not_found": 2},
        "images": {"new": 3210, "already_stored": 12, "failed": 0},
        "bytes_new": 412_300_000,
        "result_requests": 1300,
        "retries": 14,
        "rate_limited": 3,
        **extra,
    }
    (out / "runs").mkdir(parents=True, exist_ok=True)
    (out / "runs" / f"{run_id}.json").write_text(json.dumps(record))
    return run_id


def test_status_after_a_real_run(tmp_path: Path, sandbox: Sandbox) -> None:
    csv = write_csv(tmp_path / "e.csv", [("fal-ai/flux", "st-1"), ("fal-ai/flux", "missing-st")])
    out = tmp_path / "out"
    assert run_cli(harvest_args(sandbox, out, csv)).exit_code == ExitCode.INCOMPLETE

    result = run_cli(["status", str(out)])

    assert result.exit_code == ExitCode.INCOMPLETE
    lines = result.output.splitlines()
    assert lines[0].startswith("INCOMPLETE: last run 2")
    assert "exited 3: finished, but some requests are not ok" in lines[0]
    assert "requests: ok 1, not_found 1;" in result.output
    assert "inputs:   1 file: e.csv (sha256 " in result.output
    assert "rate-limited (429)" in result.output
    assert "now:      no harvest running" in result.output

    as_json = json.loads(run_cli(["status", str(out), "--json"]).output)
    assert as_json["verdict"] == "incomplete" and as_json["exit_code"] == 3
    assert as_json["last_run"]["requests"] == {"ok": 1, "not_found": 1}
    assert as_json["running"] is None


def test_ok_run_exits_0_and_quiet_prints_nothing(tmp_path: Path) -> None:
    write_record(tmp_path, T0 - timedelta(days=1), 3)
    run_id = write_record(tmp_path, T0, 0)
    result = run_cli(["status", str(tmp_path)])
    assert result.exit_code == ExitCode.OK
    assert result.output.startswith(f"OK: last run {run_id} exited 0: every request ok")
    assert "earlier:  20261123T031500Z-abc123 exit 3" in result.output
    assert "412.3 MB new" in result.output
    quiet = run_cli(["status", str(tmp_path), "-q"])
    assert quiet.exit_code == ExitCode.OK and quiet.output == ""


def test_incomplete_ok_turns_exit_3_into_0_but_not_a_failure(tmp_path: Path) -> None:
    write_record(tmp_path / "a", T0, 3)
    result = run_cli(["status", str(tmp_path / "a"), "--incomplete-ok", "-q"])
    assert result.exit_code == ExitCode.OK and result.output == ""
    write_record(tmp_path / "b", T0, 7)
    assert run_cli(["status", str(tmp_path / "b"), "--incomplete-ok"]).exit_code == 7


def test_failed_run_shows_its_code_meaning_and_error(tmp_path: Path) -> None:
    write_record(tmp_path, T0, 4, error="the API refused the key (HTTP 401)")
    result = run_cli(["status", str(tmp_path), "--quiet"])
    assert result.exit_code == ExitCode.AUTH
    assert result.output.startswith("FAILED: last run")
    assert "exited 4: the API refused the key" in result.output
    assert "error:    the API refused the key (HTTP 401)" in result.output


def test_a_run_s_shards_and_the_nodes_they_ran_on_are_shown(tmp_path: Path) -> None:
    write_record(tmp_path / "ray", T0, 0, shards=4, nodes=["node-a", "node-b"])
    assert "ran on:   4 shards on 2 Ray nodes" in run_cli(["status", str(tmp_path / "ray")]).output
    write_record(tmp_path / "pool", T0, 0, shards=2)
    assert "ran on:   2 processes (--workers)" in run_cli(["status", str(tmp_path / "pool")]).output
    write_record(tmp_path / "one", T0, 0)
    assert "ran on:" not in run_cli(["status", str(tmp_path / "one")]).output


def test_no_record_exits_10(tmp_path: Path) -> None:
    result = run_cli(["status", str(tmp_path)])
    assert result.exit_code == ExitCode.NO_RECENT_RUN
    assert result.output.startswith("NO RUN: no run record in")


def test_max_age_catches_a_run_that_never_started(tmp_path: Path) -> None:
    write_record(tmp_path, T0, 0)
    fresh = status(tmp_path, max_age=timedelta(hours=26), now=T0 + timedelta(hours=5))
    assert fresh.exit_code == ExitCode.OK
    late = status(tmp_path, max_age=timedelta(hours=26), now=T0 + timedelta(hours=30))
    assert late.exit_code == ExitCode.NO_RECENT_RUN
    assert late.text().startswith("STALE: the last run (20261124T031500Z-abc123) started 30h00m")
    assert late.to_json()["verdict"] == "stale"
    other = tmp_path / "other"
    write_record(other, datetime.now(UTC) - timedelta(hours=30), 0)
    assert run_cli(["status", str(other), "--max-age", "31"]).exit_code == ExitCode.OK
    result = run_cli(["status", str(other), "--max-age", "26"])
    assert result.exit_code == ExitCode.NO_RECENT_RUN
    assert "longer than --max-age 26h00m: did cron or the timer run?" in result.output


def test_a_running_harvest_is_shown_and_the_lock_is_emptied_after(tmp_path: Path) -> None:
    write_record(tmp_path, T0, 0)
    layout = Layout(tmp_path)
    with exclusive(layout):
        now = status(tmp_path)
        assert now.running_pid == os.getpid()
        assert f"a harvest is running (pid {os.getpid()}) since" in now.text()
        assert now.exit_code == ExitCode.OK  # the last *finished* run decides
    assert holder(layout) is None
    assert layout.lock.read_text() == ""
    assert "no harvest running" in status(tmp_path).text()


def test_a_dead_pid_in_the_lock_file_is_not_a_running_harvest(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    layout.lock.write_text("999999999\n")  # a pid no process has
    assert holder(layout) is None


def test_unreadable_records_are_named_not_fatal(tmp_path: Path) -> None:
    write_record(tmp_path, T0, 0)
    (tmp_path / "runs" / "20261125T000000Z-broken.json").write_text("{not json")
    result = run_cli(["status", str(tmp_path)])
    assert result.exit_code == ExitCode.OK
    assert "unreadable: 20261125T000000Z-broken.json" in result.output


def test_status_of_a_missing_folder_is_a_usage_error(tmp_path: Path) -> None:
    result = run_cli(["status", str(tmp_path / "nope")])
    assert result.exit_code == ExitCode.USAGE
    assert "is not a folder" in result.output


def test_a_servers_record_is_judged_apart_from_the_harvests(tmp_path: Path) -> None:
    """A server's record never counts as a harvest (neither the last run nor a crash); an
    output with servers only is judged by the latest: stopped ages like a run with
    --max-age, a record not refreshed for 60 s is a server gone."""
    from harvester.storage import runs
    from harvester.storage.objects import open_store

    store = open_store(tmp_path)
    beat = T0 + timedelta(hours=1)
    serving = runs.RunRecord(
        run_id=f"{T0:%Y%m%dT%H%M%SZ}-5e7e00",
        kind=runs.SERVE,
        state=runs.SERVING,
        pid=1,
        host="elsewhere",
        started_at=T0,
        intake=runs.IntakeRecord(stored=3, heartbeat_at=beat),
    )
    runs.write(store, serving)
    now = status(tmp_path, now=beat + timedelta(seconds=5))
    assert (now.verdict, now.exit_code, now.last) == ("serving", 0, None)
    late = status(tmp_path, now=beat + timedelta(minutes=2))
    assert (late.verdict, late.exit_code) == ("gone", ExitCode.NO_RECENT_RUN)
    stopped = runs.RunRecord(
        **{
            **{name: getattr(serving, name) for name in runs.RunRecord.__dataclass_fields__},
            "state": runs.FINISHED,
            "exit_code": 0,
            "finished_at": beat,
        }
    )
    runs.write(store, stopped)
    day = timedelta(hours=24)
    assert status(tmp_path, now=beat + timedelta(hours=2), max_age=day).verdict == "stopped"
    old = status(tmp_path, now=beat + timedelta(days=2), max_age=day)
    assert (old.verdict, old.exit_code) == ("stale", ExitCode.NO_RECENT_RUN)
    # A harvest after it: the harvest is judged, the server shown beside it.
    run_id = write_record(tmp_path, T0 + timedelta(hours=2), 3)
    both = status(tmp_path, now=beat + timedelta(hours=2))
    assert both.last is not None and both.last.run_id == run_id
    assert both.exit_code == ExitCode.INCOMPLETE
    assert "\n  intake:   serve " in both.text()

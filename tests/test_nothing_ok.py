"""A run where (almost) nothing was ok exits 13, loudly, and ``status`` does not swallow it:
not with ``--incomplete-ok``, not with ``--quiet``, and the systemd unit counts it as failed."""

from __future__ import annotations

import json
from pathlib import Path

from harvester.errors import MEANINGS, ExitCode
from harvester.sandbox import Sandbox
from tests.conftest import harvest_args, run_cli, write_csv
from tests.processes import run_records

CRON_CHECK = ["--max-age", "26", "--incomplete-ok", "--quiet"]


def test_a_wrong_base_url_that_404s_everything_exits_13(tmp_path: Path, sandbox: Sandbox) -> None:
    csv = write_csv(tmp_path / "e.csv", [("fal-ai/flux", f"wrong-{n}") for n in range(40)])
    out = tmp_path / "out"
    args = harvest_args(sandbox, out, csv)
    args[args.index("--base-url") + 1] = f"{sandbox.base_url}/not/the/api"

    result = run_cli(args)

    assert result.exit_code == ExitCode.NOTHING_OK == 13
    assert "by status:  not_found 40" in result.output
    assert (
        "NOTHING OK: exit 13: (almost) nothing ok: 0 of 40 requests tried are ok (under 5%); "
        "check --base-url, the key's account and the inputs" in result.output
    )
    [record] = run_records(out)
    assert record["exit_code"] == 13
    assert record["state"] == "finished"
    assert "0 of 40 requests tried are ok" in str(record["error"])

    status = run_cli(["status", str(out), *CRON_CHECK])
    assert status.exit_code == ExitCode.NOTHING_OK
    assert status.output.startswith(
        f"NOTHING OK: last run {record['run_id']} exited 13: {MEANINGS[ExitCode.NOTHING_OK]}"
    )
    assert "error:    (almost) nothing ok: 0 of 40 requests tried are ok" in status.output
    as_json = json.loads(run_cli(["status", str(out), "--json"]).output)
    assert as_json["verdict"] == "nothing ok" and as_json["exit_code"] == 13


def test_a_few_not_ok_requests_stay_exit_3(tmp_path: Path, sandbox: Sandbox) -> None:
    """Under 10 requests tried, or 5% or more ok: an ordinary incomplete run."""
    few = write_csv(tmp_path / "few.csv", [("fal-ai/flux", f"missing-few-{n}") for n in range(9)])
    assert run_cli(harvest_args(sandbox, tmp_path / "a", few)).exit_code == ExitCode.INCOMPLETE
    some = write_csv(
        tmp_path / "some.csv",
        [("fal-ai/flux", "some-ok-1")] + [("fal-ai/flux", f"missing-s-{n}") for n in range(19)],
    )
    result = run_cli(harvest_args(sandbox, tmp_path / "b", some))  # 1 of 20 ok: 5%
    assert result.exit_code == ExitCode.INCOMPLETE, result.output
    status = run_cli(["status", str(tmp_path / "b"), *CRON_CHECK])
    assert (status.exit_code, status.output) == (0, "")


def test_a_jump_in_the_share_not_ok_exits_13(tmp_path: Path, sandbox: Sandbox) -> None:
    """Runs that were all ok, then one with 60% not ok (though 40% are ok): more than 3x the
    median share not ok of the last runs and more than 50 points above it."""
    out = tmp_path / "out"
    for night in range(2):
        csv = write_csv(
            tmp_path / f"n{night}.csv", [("fal-ai/flux", f"jump-{night}-{n}") for n in range(12)]
        )
        assert run_cli(harvest_args(sandbox, out, csv)).exit_code == ExitCode.OK
    pairs = [("fal-ai/flux", f"jump-ok-{n}") for n in range(8)]
    pairs += [("fal-ai/flux", f"missing-jump-{n}") for n in range(12)]
    csv = write_csv(tmp_path / "bad.csv", pairs)

    result = run_cli(harvest_args(sandbox, out, csv))

    assert result.exit_code == ExitCode.NOTHING_OK, result.output
    assert (
        "60% of 20 requests tried are not ok, against a median of 0% over the last runs"
        in result.output
    )
    status = run_cli(["status", str(out), *CRON_CHECK])
    assert status.exit_code == ExitCode.NOTHING_OK
    assert status.output.startswith("NOTHING OK:")


def test_the_systemd_unit_does_not_count_13_as_success() -> None:
    unit = (Path(__file__).parent.parent / "jobs" / "harvester.service").read_text()
    [line] = [x for x in unit.splitlines() if x.startswith("SuccessExitStatus=")]
    assert str(int(ExitCode.NOTHING_OK)) not in line.split("=", 1)[1].split()

"""The pipeline's run-level behaviour: pending requests re-polled within a run (item 3), and a
key rejected mid-run stopping the run while keeping what was finished (item 1)."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from harvester.api.fetcher import FetchOutcome, ResultFetcher
from harvester.errors import AuthError, ExitCode
from harvester.run import driver
from harvester.run.config import HarvestConfig
from harvester.run.pipeline import harvest
from harvester.run.reader import Pair
from harvester.sandbox import FaultRates, Sandbox, SandboxConfig, running_sandbox
from harvester.storage.manifest import manifest_glob
from harvester.storage.objects import open_store
from tests.conftest import KEY, harvest_args, run_cli, write_csv
from tests.processes import run_records


def test_pending_requests_are_re_polled_then_left_pending_for_the_next_run(
    tmp_path: Path,
) -> None:
    # Every plain id answers "still in progress" twice, then its result; pending- ids never end.
    config = SandboxConfig(key=KEY, faults=FaultRates(pending_then_done=1.0), image_bytes=2_000)
    csv = write_csv(
        tmp_path / "e.csv",
        [("fal-ai/flux", "later-1"), ("fal-ai/flux", "later-2"), ("fal-ai/flux", "pending-1")],
    )
    out = tmp_path / "out"
    with running_sandbox(config) as sandbox:
        first = run_cli(harvest_args(sandbox, out, csv, extra=["--pending-wait", "6"]))
        polls = sandbox.stats()["pending_served"]
        second = run_cli(harvest_args(sandbox, out, csv, extra=["--pending-wait", "0"]))
        stats = sandbox.stats()

    assert first.exit_code == ExitCode.INCOMPLETE, first.output
    assert "by status:  ok 2, pending 1" in first.output
    df = pl.read_parquet(manifest_glob(out))
    runs = sorted(df["run_id"].unique())
    state = dict(
        df.filter(pl.col("run_id") == runs[0])
        .group_by("request_id")
        .agg(pl.col("request_status").first())
        .iter_rows()
    )
    assert state == {"later-1": "ok", "later-2": "ok", "pending-1": "pending"}
    # later-* were polled twice each before their result; pending-1 was re-polled too.
    assert polls >= 2 * 2 + 2
    # The next run asks again for what is still pending, and only for that.
    assert stats["result_requests"] - stats["result_ok"] - polls == 1
    assert second.exit_code == ExitCode.INCOMPLETE
    assert "2 already ok in earlier runs" in second.output


def test_a_key_rejected_mid_run_stops_it_and_keeps_finished_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The key is revoked while the run goes on: the fetch of 'revoked-1' meets a 401."""
    real_fetch = ResultFetcher.fetch

    async def fetch(self: ResultFetcher, path: str, *, repoll: bool = False) -> FetchOutcome:
        if path.endswith("/revoked-1"):
            raise AuthError("the API at http://relay.test refused the key (HTTP 401: Unauthorized)")
        return await real_fetch(self, path, repoll=repoll)

    monkeypatch.setattr(ResultFetcher, "fetch", fetch)
    pairs = [("fal-ai/flux", f"before-{n:02d}") for n in range(20)]
    csv = write_csv(tmp_path / "e.csv", [*pairs, ("fal-ai/flux", "revoked-1")])
    out = tmp_path / "out"
    with running_sandbox(SandboxConfig(key=KEY, image_bytes=2_000)) as sandbox:
        result = run_cli(harvest_args(sandbox, out, csv, extra=["--concurrency", "1"]))

    assert result.exit_code == ExitCode.AUTH
    assert result.output.endswith(
        "harvester: error: the API at http://relay.test refused the key (HTTP 401: Unauthorized)\n"
    )
    df = pl.read_parquet(manifest_glob(out))
    assert df.height > 0, "rows finished before the 401 are flushed"
    assert set(df["request_status"]) == {"ok"}
    for _, rows in df.group_by("request_id"):
        assert rows.height == rows["image_count"][0]  # whole requests, never half of one
    assert [r["exit_code"] for r in run_records(out)] == [ExitCode.AUTH]


def test_one_shard_in_this_process_takes_its_pairs_from_the_reader(
    tmp_path: Path, sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No file of pairs for the default shard: written pairs would show up here."""
    written: list[Pair] = []
    monkeypatch.setattr(driver, "write_pairs", lambda out, pair: written.append(pair))
    pairs = [("fal-ai/flux", f"inline-{i}") for i in range(40)]
    csv = write_csv(tmp_path / "e.csv", [*pairs, pairs[0], ("bad model", "x")])
    out = tmp_path / "out"
    config = HarvestConfig(
        inputs=(csv,),
        out=open_store(out),
        api_key=KEY,
        base_url=sandbox.base_url,
        rps=500,
        workers=1,
    )
    stats = harvest(config)
    assert written == []
    assert dict(stats.counters.requests) == {"ok": 40, "invalid": 1}
    assert stats.counters.duplicates == 1
    assert stats.counters.manifest_rows == pl.read_parquet(manifest_glob(out)).height
    summary = stats.summary()
    assert "0 already ok in earlier runs (or expired), 1 duplicate row" in summary

"""``harvester harvest --engine ray`` on a real two-node Ray cluster on 127.0.0.1 (the session's
``cluster``), against the sandbox: the same manifest as a local run, ``--rps`` held for the
whole cluster at the server, and a worker node killed mid-run losing nothing.

The output folder is local: on one machine every node shares the disk (``--shared-fs``).
The test that kills the second node comes last and starts a new one at its end.
"""

from __future__ import annotations

import json
import re
import threading
import time
from contextlib import suppress
from pathlib import Path

import polars as pl
import pytest
from click.testing import Result

from harvester.api.ratelimit import most_starts_in_window
from harvester.errors import ExitCode
from harvester.sandbox import Sandbox, SandboxConfig, running_sandbox
from harvester.storage.manifest import manifest_glob
from harvester.views.verify import verify
from tests.conftest import KEY, harvest_args, run_cli, write_csv
from tests.processes import run_harvest, run_records
from tests.raycluster import RayCluster, children

pytestmark = pytest.mark.ray

PAIRS = [("fal-ai/flux/dev", f"ray-{n:03d}") for n in range(60)] + [
    ("fal-ai/flux", "missing-1"),
    ("fal-ai/flux", "inline-1"),
]


def _state(out: Path) -> pl.DataFrame:
    return (
        pl.read_parquet(manifest_glob(out))
        .select("model", "request_id", "image_index", "status", "sha256", "path")
        .sort("request_id", "image_index")
    )


def _ray(cluster: RayCluster, *extra: str) -> list[str]:
    """Four shards: two per node."""
    return ["--engine", "ray", "--ray-address", cluster.address, "--workers", "4", *extra]


def test_a_local_out_on_a_multi_node_cluster_is_refused_unless_shared(
    cluster: RayCluster, tmp_path: Path, sandbox: Sandbox
) -> None:
    csv = write_csv(tmp_path / "e.csv", PAIRS[:3])
    result = run_cli(harvest_args(sandbox, tmp_path / "out", csv, extra=_ray(cluster)))
    assert result.exit_code == ExitCode.USAGE
    assert "has 2 nodes" in result.output
    assert "--shared-fs" in result.output
    assert not (tmp_path / "out" / "manifest").exists() or not any(
        (tmp_path / "out" / "manifest").rglob("*.parquet")
    )


def test_ray_harvests_the_same_manifest_as_a_local_run(
    cluster: RayCluster, tmp_path: Path, sandbox: Sandbox
) -> None:
    csv = write_csv(tmp_path / "e.csv", PAIRS)
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    first = run_cli(harvest_args(sandbox, local, csv))
    second = run_cli(harvest_args(sandbox, on_ray, csv, extra=_ray(cluster, "--shared-fs")))

    assert first.exit_code == second.exit_code == ExitCode.INCOMPLETE, second.output  # missing-1
    assert _state(local).equals(_state(on_ray))
    assert verify(on_ray).ok
    [record] = run_records(on_ray)
    assert record["shards"] == 4
    assert record["requests"] == run_records(local)[0]["requests"]
    assert list((on_ray / ".tmp").iterdir()) == []


def test_the_rate_limit_holds_for_the_whole_cluster_at_the_server(
    cluster: RayCluster, tmp_path: Path
) -> None:
    """Four shards on two nodes, each allowed the whole --rps on its own: only the cluster's
    limiter keeps them together under it. Counted on the server's clock, no window of one
    second holds more than --rps starts."""
    rps = 20
    pairs = [("fal-ai/flux", f"rate-{n:03d}") for n in range(rps * 5)]
    csv = write_csv(tmp_path / "e.csv", pairs)
    with running_sandbox(SandboxConfig(key=KEY, image_bytes=2_000)) as sandbox:
        args = harvest_args(sandbox, tmp_path / "out", csv, extra=_ray(cluster, "--shared-fs"))
        result = run_cli([*args, "--rps", str(rps), "--concurrency", "8"])
        starts = sandbox.result_starts()

    assert result.exit_code == ExitCode.OK, result.output
    assert len(starts) == len(pairs)
    assert most_starts_in_window(starts) <= rps


def test_the_summary_shows_the_cluster_s_rate_cut(cluster: RayCluster, tmp_path: Path) -> None:
    """Every shard may use the whole --rps (the limiter shares it): the summary's "rate cut to"
    is the limiter's lowest rate, not the shards' rates added up (four times --rps)."""
    rps = 20
    pairs = [("fal-ai/flux", f"cut-{n:03d}") for n in range(40)]
    csv = write_csv(tmp_path / "e.csv", pairs)
    with running_sandbox(
        SandboxConfig(
            key=KEY, image_bytes=2_000, throttle_share=0.1, throttle_times=1, retry_after_seconds=0
        )
    ) as sandbox:
        args = harvest_args(sandbox, tmp_path / "out", csv, extra=_ray(cluster, "--shared-fs"))
        result = run_cli([*args, "--rps", str(rps)])
        throttled = sandbox.stats()["rate_limited"]

    assert result.exit_code == ExitCode.OK, result.output
    assert throttled > 0
    cut = re.search(r"rate cut to ([\d.]+)/s at the lowest", result.output)
    assert cut is not None, result.output
    assert float(cut[1]) <= rps / 2  # the first 429 halves the cluster's rate


def test_json_logs_reach_the_driver_s_stderr_as_json_lines_from_every_node(
    cluster: RayCluster, tmp_path: Path, sandbox: Sandbox
) -> None:
    """``--log-format json`` on Ray, as a nightly job runs it (its own process, stderr to a log
    collector): every line of the driver's stderr is one JSON object with the run's id, the
    shards' lines included (Ray forwards them; by default with a "(run_shard pid=...)" prefix
    of its own, and folded when alike), and they name the nodes they ran on."""
    csv = write_csv(tmp_path / "e.csv", PAIRS)
    done = run_harvest(
        sandbox.base_url,
        tmp_path / "out",
        csv,
        extra=[*_ray(cluster, "--shared-fs"), "--log-format", "json", "-v"],
        timeout=180,
    )

    assert done.returncode == ExitCode.INCOMPLETE, done.stderr  # missing-1
    lines = [json.loads(line) for line in done.stderr.splitlines()]  # each one JSON
    [record] = run_records(tmp_path / "out")
    assert {line["run_id"] for line in lines} == {record["run_id"]}
    shards = [line for line in lines if "started" in line["message"] and "shard" in line["message"]]
    assert {line["node"] for line in shards} == {cluster.head_id, cluster.worker_id}, shards


def _shard_pids(out: Path) -> set[int]:
    pids = set()
    for progress in (out / ".tmp").glob("*/shard-*.progress.json"):
        with suppress(OSError, ValueError):
            pids.add(int(pl.read_json(progress)["pid"][0]))
    return pids


def test_a_killed_node_s_shards_run_again_and_nothing_is_lost(
    cluster: RayCluster, tmp_path: Path
) -> None:
    pairs = [("fal-ai/flux/dev", f"kill-{n:03d}") for n in range(240)]
    csv = write_csv(tmp_path / "e.csv", pairs)
    out = tmp_path / "out"
    raylet = cluster.worker_raylet_pid()
    try:
        with running_sandbox(SandboxConfig(key=KEY, image_bytes=2_000, latency=0.15)) as sandbox:
            args = harvest_args(sandbox, out, csv, extra=_ray(cluster, "--shared-fs"))
            args += ["--concurrency", "8", "--flush-every", "0.2"]
            outcome: list[Result] = []
            harvest = threading.Thread(target=lambda: outcome.append(run_cli(args)))
            harvest.start()
            # Wait until a shard runs on the second node and has written rows, then kill it.
            deadline = time.monotonic() + 120
            while not (
                _shard_pids(out) & children(raylet) and any((out / "manifest").rglob("*.parquet"))
            ):
                assert harvest.is_alive(), outcome[0].output if outcome else "harvest ended"
                assert time.monotonic() < deadline, "no shard ever ran on the second node"
                time.sleep(0.05)
            cluster.kill_worker()
            harvest.join(timeout=300)
            assert not harvest.is_alive(), "the harvest never ended"
    finally:
        cluster.replace_worker()

    [result] = outcome
    assert result.exit_code == ExitCode.OK, result.output
    rows = pl.read_parquet(manifest_glob(out))
    ok = rows.filter(pl.col("request_status") == "ok")
    assert set(ok["request_id"]) == {r for _, r in pairs}
    # No pair twice: a shard's rerun removed its earlier attempt's parts.
    assert rows.select("request_id", "image_index").is_duplicated().sum() == 0
    assert verify(out).ok

"""``harvester harvest --engine ray --out s3://bucket/night`` on the two-node Ray cluster on
127.0.0.1 (the session's ``cluster``), with the sandbox as the API and Ceph's gateway as the
store: no disk is shared with the driver's in any way the run relies on. The shards' pairs
reach them as objects in the bucket, their counters and the stop flag through the run's
board actor.

The same manifest as a run on one machine, read back with polars from the bucket; shards ran
on the second node (the run record's nodes, and the shards' JSON log lines there); the second
node killed mid-run loses nothing and records no pair twice. The kill test comes last and
starts a new second node at its end.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from click.testing import Result

from harvester.errors import ExitCode
from harvester.sandbox import Sandbox, SandboxConfig, running_sandbox
from harvester.storage.objects import S3Store
from tests.conftest import KEY, harvest_args, run_cli, write_csv
from tests.processes import harvester_env
from tests.raycluster import RayCluster, import_ray
from tests.s3gateway import Gateway

pytestmark = [pytest.mark.ray, pytest.mark.s3]

PAIRS = [("fal-ai/flux/dev", f"rs3-{n:03d}") for n in range(60)] + [
    ("fal-ai/flux", "missing-1"),
    ("fal-ai/flux", "inline-1"),
]


def _ray(cluster: RayCluster, *extra: str) -> list[str]:
    """Four shards on two nodes of two CPUs each."""
    return ["--engine", "ray", "--ray-address", cluster.address, "--workers", "4", *extra]


def _manifest(gateway: Gateway, location: str) -> pl.DataFrame:
    return (
        pl.scan_parquet(
            f"{location}/manifest/**/*.parquet", storage_options=gateway.storage_options()
        )
        .select("model", "request_id", "image_index", "request_status", "status", "sha256")
        .sort("request_id", "image_index")
        .collect()
    )


def _record(gateway: Gateway, location: str) -> dict[str, Any]:
    store = S3Store(location, env=gateway.env())
    [record] = [json.loads(store.get(i.key)) for i in store.list("runs/")]
    return dict(record)


def _temp_objects(gateway: Gateway, location: str) -> list[str]:
    return [i.key for i in S3Store(location, env=gateway.env()).list(".tmp/")]


def _files(root: Path) -> list[Path]:
    """The regular files under ``root`` (not sockets), as they are now."""
    return [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]


def _worker_lines(cluster: RayCluster, run_id: str) -> list[str]:
    """The log lines about this run that Ray's worker processes wrote to their log files."""
    found = []
    for path in Path(cluster.node_args["temp_dir"]).glob("session_*/logs/worker-*.err"):
        found += [x for x in path.read_text(errors="replace").splitlines() if run_id in x]
    return found


def test_ray_into_s3_harvests_the_same_manifest_as_one_machine(
    cluster: RayCluster, tmp_path: Path, sandbox: Sandbox, s3_gateway: Gateway, s3_bucket: str
) -> None:
    csv = write_csv(tmp_path / "e.csv", PAIRS)
    env = {**s3_gateway.env(), "TMPDIR": str(tmp_path)}
    here, there = f"s3://{s3_bucket}/local", f"s3://{s3_bucket}/night"
    first = run_cli(harvest_args(sandbox, here, csv), env=env)
    second = run_cli(
        harvest_args(sandbox, there, csv, extra=_ray(cluster, "--log-format", "json", "-v")),
        env=env,
    )

    assert first.exit_code == second.exit_code == ExitCode.INCOMPLETE, second.output
    local, on_ray = _manifest(s3_gateway, here), _manifest(s3_gateway, there)
    assert local.height > len(PAIRS)  # every image of every pair, missing-1 as a row
    assert local.equals(on_ray)
    verified = run_cli(["verify", there], env=env)
    assert verified.exit_code == ExitCode.OK, verified.output
    assert "0 missing, 0 corrupt, 0 orphans" in verified.output

    record = _record(s3_gateway, there)
    assert record["shards"] == 4
    assert record["requests"] == _record(s3_gateway, here)["requests"]
    # Shards ran on the second node: the record says so, and so do their own log lines there.
    assert cluster.worker_id in record["nodes"], record["nodes"]
    lines = [json.loads(x) for x in _worker_lines(cluster, record["run_id"])]
    assert any(
        line["node"] == cluster.worker_id and "started" in line["message"] for line in lines
    ), lines
    assert all(line["run_id"] == record["run_id"] for line in lines)
    # The pairs' objects are gone, and no shard left a scratch folder behind.
    assert _temp_objects(s3_gateway, there) == []
    for result in (first, second, verified):
        for secret in (s3_gateway.secret_key, KEY):
            assert secret not in result.output
    for line in lines:
        assert KEY not in json.dumps(line)
    # Nor anywhere in Ray's own files on the nodes (its logs: a task's runtime_env, for one,
    # is written there in plain text).
    for path in _files(Path(cluster.node_args["temp_dir"])):
        data = path.read_bytes()
        for secret in (s3_gateway.secret_key, KEY):
            assert secret.encode() not in data, f"{secret[:4]}... in {path}"


def test_sigterm_stops_the_shards_on_every_node_through_the_board(
    cluster: RayCluster, tmp_path: Path, s3_gateway: Gateway, s3_bucket: str
) -> None:
    """The driver in its own process, stopped by systemd or cron (SIGTERM) while its shards
    write on both nodes: they learn it from the board, keep what they finished, and the run
    ends 130 with its temp objects gone; the next run does the rest."""
    pairs = [("fal-ai/flux/dev", f"st3-{n:03d}") for n in range(400)]
    csv = write_csv(tmp_path / "e.csv", pairs)
    location = f"s3://{s3_bucket}/night"
    env = {**harvester_env(), **s3_gateway.env(), "TMPDIR": str(tmp_path)}
    store = S3Store(location, env=s3_gateway.env())
    with running_sandbox(SandboxConfig(key=KEY, image_bytes=2_000, latency=0.15)) as sandbox:
        args = harvest_args(sandbox, location, csv, extra=[*_ray(cluster), "--concurrency", "8"])
        harvest = subprocess.Popen(
            [sys.executable, "-m", "harvester", *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + 120
            while not any(store.list("manifest/")):
                assert harvest.poll() is None, harvest.communicate()
                assert time.monotonic() < deadline, "the shards never wrote a manifest part"
                time.sleep(0.05)
            harvest.send_signal(signal.SIGTERM)
            stdout, stderr = harvest.communicate(timeout=120)
        finally:
            if harvest.poll() is None:
                harvest.kill()
        rerun = run_cli(harvest_args(sandbox, location, csv, extra=_ray(cluster)), env=env)

    assert harvest.returncode == ExitCode.INTERRUPTED, stderr
    assert "INTERRUPTED: finished rows are kept" in stdout + stderr
    assert "Traceback" not in stdout + stderr
    first = min(
        (json.loads(store.get(i.key)) for i in store.list("runs/")), key=lambda r: r["run_id"]
    )
    assert first["interrupted"] is True
    # The shards stopped when told, long before their pairs ran out, and kept their rows.
    assert 0 < sum(first["requests"].values()) < len(pairs)
    assert _temp_objects(s3_gateway, location) == []
    assert rerun.exit_code == ExitCode.OK, rerun.output
    rows = _manifest(s3_gateway, location)
    assert set(rows["request_id"]) == {r for _, r in pairs}
    assert rows.select("request_id", "image_index").is_duplicated().sum() == 0


def _boards(ray: Any) -> set[str]:
    """The names of the harvests' progress boards (named actors in this driver's namespace)."""
    return {n for n in ray.util.list_named_actors() if n.startswith("harvester-board-")}


def _rows_written_on(ray: Any, board: Any, node: str) -> bool:
    progress = ray.get(board.snapshot.remote(), timeout=30)
    return any(node in p.counters.nodes and p.counters.manifest_parts for p in progress.values())


def test_a_killed_node_loses_nothing_with_an_s3_out(
    cluster: RayCluster, tmp_path: Path, s3_gateway: Gateway, s3_bucket: str
) -> None:
    ray = import_ray()
    pairs = [("fal-ai/flux/dev", f"ks3-{n:03d}") for n in range(240)]
    csv = write_csv(tmp_path / "e.csv", pairs)
    location = f"s3://{s3_bucket}/night"
    env = {**s3_gateway.env(), "TMPDIR": str(tmp_path)}
    earlier = _boards(ray)
    try:
        with running_sandbox(SandboxConfig(key=KEY, image_bytes=2_000, latency=0.15)) as sandbox:
            args = harvest_args(sandbox, location, csv, extra=_ray(cluster))
            args += ["--concurrency", "8", "--flush-every", "0.2"]
            outcome: list[Result] = []
            harvest = threading.Thread(target=lambda: outcome.append(run_cli(args, env=env)))
            harvest.start()
            # Wait until a shard on the second node has put manifest parts in the bucket.
            deadline = time.monotonic() + 120
            board = None
            while board is None or not _rows_written_on(ray, board, cluster.worker_id):
                assert harvest.is_alive(), outcome[0].output if outcome else "harvest ended"
                assert time.monotonic() < deadline, "no shard ever wrote on the second node"
                time.sleep(0.05)
                new = sorted(_boards(ray) - earlier)
                board = board or (ray.get_actor(new[0]) if new else None)
            cluster.kill_worker()
            harvest.join(timeout=300)
            assert not harvest.is_alive(), "the harvest never ended"
    finally:
        cluster.replace_worker()

    [result] = outcome
    assert result.exit_code == ExitCode.OK, result.output
    rows = _manifest(s3_gateway, location)
    ok = rows.filter(pl.col("request_status") == "ok")
    assert set(ok["request_id"]) == {r for _, r in pairs}
    # No pair twice as ok: the killed shards' reruns removed their earlier attempts' parts.
    assert rows.select("request_id", "image_index").is_duplicated().sum() == 0
    verified = run_cli(["verify", location], env=env)
    assert verified.exit_code == ExitCode.OK, verified.output
    assert _temp_objects(s3_gateway, location) == []
    # The kill did hit a running shard: it ran again, and said so in its own log.
    run_id = _record(s3_gateway, location)["run_id"]
    assert any("runs again" in line for line in _worker_lines(cluster, run_id))

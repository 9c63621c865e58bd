"""Shards in worker processes (``--workers``): the same harvest as one process, the limits split
so the shards together keep them, and real processes killed: a shard's process (its shard runs
again, nothing lost) and the harvest itself (its pool's processes die with it)."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import math
import multiprocessing
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pytest

from harvester.api.ratelimit import most_starts_in_window
from harvester.errors import ExitCode
from harvester.run.config import usable_cores
from harvester.run.engine.local import LocalEngine
from harvester.run.pipeline import HarvestConfig
from harvester.run.reader import Pair, pair_key
from harvester.run.shard import shard_of
from harvester.sandbox import Sandbox, SandboxConfig, running_sandbox
from harvester.storage.manifest import manifest_glob
from harvester.storage.objects import open_store
from harvester.views.verify import verify
from tests.conftest import KEY, harvest_args, run_cli, write_csv
from tests.processes import (
    SandboxProcess,
    harvest_command,
    harvester_env,
    run_harvest,
    run_records,
    sandbox_process,
    wait_for_lock,
)

PAIRS = [("fal-ai/flux/dev", f"lane-{n:03d}") for n in range(120)] + [
    ("fal-ai/flux", "missing-1"),
    ("fal-ai/flux", "inline-1"),
    ("fal-ai/flux", "dup-1"),
    ("fal-ai/flux", "dup-2"),
]


def _state(out: Path) -> pl.DataFrame:
    return (
        pl.read_parquet(manifest_glob(out))
        .select("model", "request_id", "image_index", "status", "sha256", "path", "seed")
        .sort("request_id", "image_index")
    )


def test_workers_harvest_exactly_what_one_process_does(tmp_path: Path, sandbox: Sandbox) -> None:
    csv = write_csv(tmp_path / "e.csv", PAIRS)
    one, three = tmp_path / "one", tmp_path / "three"
    first = run_cli(harvest_args(sandbox, one, csv, extra=["--workers", "1"]))
    second = run_cli(harvest_args(sandbox, three, csv, extra=["--workers", "3"]))

    assert first.exit_code == second.exit_code == ExitCode.INCOMPLETE  # missing-1
    assert _state(one).equals(_state(three))
    stored = {p.relative_to(one) for p in (one / "images").rglob("*.*")}
    assert stored == {p.relative_to(three) for p in (three / "images").rglob("*.*")}
    assert len(stored) > len(PAIRS)
    for out in (one, three):
        assert verify(out).ok
    counts = [
        {k: r[k] for k in ("requests", "images", "result_requests", "manifest_rows")}
        for r in (*run_records(one), *run_records(three))
    ]
    assert counts[0] == counts[1]


def test_shard_processes_that_cannot_start_are_a_clear_error(
    tmp_path: Path, sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_pool(self: LocalEngine) -> concurrent.futures.ProcessPoolExecutor:
        return concurrent.futures.ProcessPoolExecutor(
            max_workers=self.workers - self.here,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=os._exit,  # each process exits 3 before it runs a shard
            initargs=(3,),
        )

    monkeypatch.setattr(LocalEngine, "_pool", failing_pool)
    csv = write_csv(tmp_path / "e.csv", PAIRS)
    args = harvest_args(sandbox, tmp_path / "out", csv, extra=["--workers", "2"])
    result = run_cli(args)

    assert result.exit_code == ExitCode.WORKER
    assert "Traceback" not in result.output
    assert re.search(
        # Shard 0 runs in the harvest's own process: only the pool's shard cannot start.
        r"harvester: error: the process of shard 1 of 2 \(pid unknown\) died \(killed, or out of "
        r"memory; 4 times\); the rows finished so far are "
        r"kept, requests still in flight are not recorded and the next run retries them\n\Z",
        result.output,
    )
    [record] = run_records(tmp_path / "out")
    assert record["exit_code"] == ExitCode.WORKER
    assert record["state"] == "finished"


def test_pairs_go_to_shards_by_a_stable_hash() -> None:
    pairs = [
        Pair("fal-ai/flux", f"id-{n}", "e.csv", n, pair_key("fal-ai/flux", f"id-{n}"), "")
        for n in range(1_000)
    ]
    shards = [shard_of(p, 4) for p in pairs]
    assert set(shards) == {0, 1, 2, 3}
    assert min(shards.count(i) for i in range(4)) > 150  # roughly even
    # Not Python's hash (salted per process): the same pair, the same shard, everywhere.
    assert pair_key("fal-ai/flux", "id-0") == 301111420384382592006241074517117693577
    assert [shard_of(p, 1) for p in pairs[:5]] == [0] * 5


def test_lanes_split_the_limits_so_together_they_keep_them() -> None:
    config = HarvestConfig(
        inputs=(Path("x.csv"),),
        out=open_store(Path("out")),
        api_key=KEY,
        concurrency=7,
        image_concurrency=5,
        rps=50.0,
        workers=3,
    )
    lanes = [config.lane_settings("r", i) for i in range(config.lanes)]  # one per shard
    assert config.lanes == 3
    assert sum(s.concurrency for s in lanes) == 7
    assert sum(s.image_concurrency for s in lanes) == 5
    assert sum(s.rps for s in lanes) == pytest.approx(50.0)
    assert min(s.concurrency for s in lanes) >= 1
    # Each lane's limiter allows floor(its rate) starts in a one-second window: together,
    # never more than floor(rps).
    for rps, workers in [(10.0, 4), (10.5, 4), (7.0, 3), (1.0, 2), (0.5, 3), (100_000.0, 2)]:
        split = HarvestConfig(**{**_kw(config), "rps": rps, "workers": workers})
        shares = [split.lane_rps(i) for i in range(split.lanes)]
        assert sum(shares) == pytest.approx(rps)
        assert sum(math.floor(x) for x in shares) <= max(1, math.floor(rps))
        assert all(x >= 1 for x in shares) or split.lanes == 1
    # No more lanes than slots; by default (auto) one lane below --rps 500, else one per
    # core this process may use, at most 4 (and never more than the slots).
    assert HarvestConfig(**{**_kw(config), "concurrency": 2}).lanes == 2
    assert HarvestConfig(**{**_kw(config), "workers": None}).lanes == 1
    assert HarvestConfig(**{**_kw(config), "workers": None, "rps": 499.0}).lanes == 1
    cores = usable_cores()
    fast = HarvestConfig(**{**_kw(config), "workers": None, "rps": 100_000.0})
    assert fast.lanes == min(cores, 4, fast.image_slots)


@pytest.mark.parametrize(("rps", "workers"), [(6.0, 2), (5.0, 3), (2.5, 2)])
def test_split_rate_limits_hold_at_the_server(tmp_path: Path, rps: float, workers: int) -> None:
    """Seen from the server, the shards together keep ``--rps``: never more than floor(rps)
    requests arrive within a one-second window.

    Each shard's limiter keeps floor(its share) starts in any 1.02 s on its own clock, and the
    shares add up to floor(rps). The server sees arrival times, which a busy machine delays
    unevenly, so the check counts starts in windows of 0.75 s: only a start delayed 0.27 s more
    than its neighbours could break it, while shards that together overshot (each at the full
    rate, say) break it at once."""
    pairs = [("fal-ai/flux", f"rate-{n:03d}") for n in range(int(rps * 4) + 1)]
    csv = write_csv(tmp_path / "e.csv", pairs)
    args = harvest_args_for(tmp_path / "out", csv)
    with running_sandbox(SandboxConfig(key=KEY, image_bytes=2_000)) as sandbox:
        extra = ["--rps", str(rps), "--workers", str(workers), "--concurrency", "8"]
        result = run_cli([*args, "--base-url", sandbox.base_url, *extra])
        starts = sandbox.result_starts()

    assert result.exit_code == ExitCode.OK, result.output
    assert len(starts) == len(pairs)
    assert most_starts_in_window(starts, 0.75) <= int(rps)
    [record] = run_records(tmp_path / "out")
    assert record["processes"] == record["shards"] == workers


def harvest_args_for(out: Path, csv: Path) -> list[str]:
    return ["harvest", str(csv), "--out", str(out), "--retry-budget", "20", "-q"]


def _kw(config: HarvestConfig) -> dict[str, object]:
    return {f: getattr(config, f) for f in config.__dataclass_fields__}


@pytest.fixture(scope="module")
def slow_sandbox() -> Iterator[SandboxProcess]:
    with sandbox_process("--latency-ms", "150", "--image-bytes", "4000") as running:
        yield running


def _wait_for_shards(process: subprocess.Popen[str], out: Path, count: int) -> list[int]:
    """The pids of the shards' processes, from their progress files (``.tmp/<run_id>/``)."""
    for _ in range(3000):
        pids = []
        for path in sorted((out / ".tmp").glob("*/shard-*.progress.json")):
            with contextlib.suppress(OSError, ValueError):
                pids.append(int(json.loads(path.read_text())["pid"]))
        if len(pids) >= count:
            return pids
        assert process.poll() is None, process.communicate()
        time.sleep(0.01)
    raise AssertionError("the harvest never started its shards")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


FLAGS = ("--workers", "2", "--rps", "1000", "--concurrency", "8", "--flush-every", "0.2")
LINUX = pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="reads /proc (Linux)")


@dataclass(frozen=True, slots=True)
class Running:
    """A harvest of 300 ids against the slow sandbox, a second into its run."""

    pairs: list[tuple[str, str]]
    csv: Path
    out: Path
    harvest: subprocess.Popen[str]
    worker: int
    """The pid of shard 1's process."""


def _start(tmp_path: Path, sandbox: SandboxProcess, name: str) -> Running:
    pairs = [("fal-ai/flux/dev", f"{name}-{n:03d}") for n in range(300)]
    csv = write_csv(tmp_path / "e.csv", pairs)
    out = tmp_path / "out"
    harvest = subprocess.Popen(
        harvest_command(sandbox.base_url, out, csv, extra=FLAGS),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=harvester_env(),
        start_new_session=True,  # its own process group, as a terminal or a unit gives it
    )
    wait_for_lock(out, harvest)
    _, worker = _wait_for_shards(harvest, out, 2)
    time.sleep(1.0)  # some requests finished, most not
    return Running(pairs, csv, out, harvest, worker)


def _rerun_completes(sandbox: SandboxProcess, run: Running) -> None:
    rerun = run_harvest(sandbox.base_url, run.out, run.csv, extra=(*FLAGS, "-q"))
    assert rerun.returncode == ExitCode.OK, rerun.stderr
    ok = pl.read_parquet(manifest_glob(run.out)).filter(pl.col("request_status") == "ok")
    assert set(ok["request_id"]) == {r for _, r in run.pairs}
    assert verify(run.out).ok
    assert list((run.out / ".tmp").iterdir()) == []


@LINUX
def test_a_killed_worker_s_shard_runs_again_and_nothing_is_lost(
    tmp_path: Path, slow_sandbox: SandboxProcess
) -> None:
    """The shards that were in the broken pool run again (the killed one's earlier manifest
    parts removed first): the run completes, every pair once."""
    run = _start(tmp_path, slow_sandbox, "killw")
    os.kill(run.worker, signal.SIGKILL)
    stdout, stderr = run.harvest.communicate(timeout=120)

    assert run.harvest.returncode == ExitCode.OK, stderr
    assert "Traceback" not in stdout + stderr
    assert [r["exit_code"] for r in run_records(run.out)] == [ExitCode.OK]
    rows = pl.read_parquet(manifest_glob(run.out))
    ok = rows.filter(pl.col("request_status") == "ok")
    assert set(ok["request_id"]) == {r for _, r in run.pairs}
    assert rows.select("request_id", "image_index").is_duplicated().sum() == 0
    assert verify(run.out).ok
    assert list((run.out / ".tmp").iterdir()) == []


@LINUX
def test_workers_die_with_a_killed_harvest_and_a_rerun_completes(
    tmp_path: Path, slow_sandbox: SandboxProcess
) -> None:
    run = _start(tmp_path, slow_sandbox, "killh")
    os.kill(run.harvest.pid, signal.SIGKILL)
    run.harvest.communicate(timeout=30)

    for _ in range(1000):  # PR_SET_PDEATHSIG: the kernel kills it with its parent
        if not _alive(run.worker):
            break
        time.sleep(0.01)
    assert not _alive(run.worker), "the worker outlived the harvest"
    _rerun_completes(slow_sandbox, run)


@LINUX
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_the_whole_group_stops_the_harvest_and_its_workers(
    tmp_path: Path, slow_sandbox: SandboxProcess, stop: signal.Signals
) -> None:
    """Ctrl-C reaches every process of the terminal's group, systemd's stop every process of
    the unit: the harvest stops with 130 and keeps finished rows; its shards' processes
    ignore the signal themselves and stop when the harvest tells them (their stop flag),
    keeping what they finished."""
    run = _start(tmp_path, slow_sandbox, f"sig{stop.value}")
    os.killpg(run.harvest.pid, stop)
    stdout, stderr = run.harvest.communicate(timeout=60)

    assert run.harvest.returncode == ExitCode.INTERRUPTED, stderr
    assert "Traceback" not in stdout + stderr
    assert "INTERRUPTED: finished rows are kept" in stdout + stderr
    assert not _alive(run.worker)
    [record] = run_records(run.out)
    assert record["interrupted"] is True
    assert pl.read_parquet(manifest_glob(run.out)).height > 0
    _rerun_completes(slow_sandbox, run)


def test_usable_cores_keep_to_a_cgroup_quota(tmp_path: Path) -> None:
    cpu_max = tmp_path / "cpu.max"
    cores = usable_cores(tmp_path / "absent")
    assert cores == len(os.sched_getaffinity(0))
    cpu_max.write_text("max 100000\n")
    assert usable_cores(cpu_max) == cores
    cpu_max.write_text("150000 100000\n")
    assert usable_cores(cpu_max) == min(cores, 2)
    cpu_max.write_text("50000 100000\n")
    assert usable_cores(cpu_max) == 1
    cpu_max.write_text("nonsense\n")
    assert usable_cores(cpu_max) == cores

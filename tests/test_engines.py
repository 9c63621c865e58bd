"""The local engine: shards in a process pool, results once each, dead processes run again."""

from __future__ import annotations

import os
import pickle
import signal
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from harvester.errors import AuthError, ExitCode
from harvester.run.engine import Failure
from harvester.run.engine.local import ChildLogging, LocalEngine
from harvester.run.pipeline import AUTHORIZATION_ENV, Cluster, HarvestConfig, _Run, _task_env
from harvester.run.stats import RunStats
from harvester.storage.layout import Layout
from tests.conftest import KEY


@dataclass(frozen=True, slots=True)
class Spec:
    n: int
    folder: str = ""
    dies: int = 0
    """How many of its first runs end with the process killed (SIGKILL)."""


def work(spec: Spec) -> int:
    if spec.dies:
        runs = Path(spec.folder) / f"{spec.n}.runs"
        count = int(runs.read_text()) if runs.exists() else 0
        runs.write_text(str(count + 1))
        if count < spec.dies:
            os.kill(os.getpid(), signal.SIGKILL)
    if spec.n == 1:
        raise AuthError("the API refused the key")
    if spec.n == 3:
        raise ValueError("bad spec 3")
    return spec.n * 10


def test_results_arrive_once_and_failures_carry_their_exit_code() -> None:
    got: list[tuple[int, int]] = []
    failures = LocalEngine(workers=2).run(
        work, map(Spec, range(8)), on_result=lambda spec, r: got.append((spec.n, r))
    )
    assert sorted(got) == [(n, n * 10) for n in (0, 2, 4, 5, 6, 7)]
    assert sorted((f.spec.n, f.exit_code) for f in failures) == [
        (1, ExitCode.AUTH),
        (3, ExitCode.BUG),
    ]


def test_a_killed_process_s_spec_runs_again_and_one_that_keeps_dying_is_reported(
    tmp_path: Path,
) -> None:
    specs = [Spec(n, str(tmp_path), dies=1 if n == 4 else 0) for n in (0, 2, 4, 5, 6)]
    specs.append(Spec(8, str(tmp_path), dies=99))
    got: list[int] = []
    failures = LocalEngine(workers=2).run(
        work, specs, on_result=lambda spec, r: got.append(spec.n), max_retries=2
    )
    assert sorted(got) == [0, 2, 4, 5, 6]  # each exactly once
    assert failures == [Failure(specs[-1], "its worker process died", ExitCode.WORKER)]
    # Three deaths alone (the first run and two retries), after perhaps one in a shared pool.
    assert 3 <= int((tmp_path / "8.runs").read_text()) <= 4


def test_a_ray_shard_s_spec_carries_no_key(tmp_path: Path) -> None:
    """On Ray the key reaches the shards in their task's environment (``runtime_env``), not
    in the pickled spec that Ray keeps in its object store."""
    config = HarvestConfig(
        inputs=(tmp_path / "e.csv",), out_dir=tmp_path, api_key=KEY, engine="ray", workers=2
    )
    stats = RunStats(run_id="r1", started_at=datetime.now(UTC), out_dir=tmp_path)
    stand_in: Any = None  # the spec only hands the actors on
    cluster = Cluster(
        engine=stand_in, limiter=stand_in, board=None, logging=ChildLogging(json_run_id="r1")
    )
    run = _Run(config, stats, Layout(tmp_path), None, shards=2, cluster=cluster)

    spec = run.spec(1, tmp_path / "shard-0001.pairs.jsonl")

    assert KEY.encode() not in pickle.dumps(spec)
    assert spec.lane.authorization == ""
    assert spec.lane.authorization_env == AUTHORIZATION_ENV
    assert _task_env(config) == {AUTHORIZATION_ENV: f"Key {KEY}"}  # fal.ai's own host
    # A local run's spec is as it was: the pool's processes are this machine's own.
    local = _Run(config, stats, Layout(tmp_path), None, shards=2).spec(1, tmp_path / "p")
    assert local.lane.authorization == f"Key {KEY}"
    assert local.lane.authorization_env is None

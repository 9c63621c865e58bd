"""The local engine: shards in a process pool, results once each, dead processes run again."""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path

from harvester.errors import AuthError, ExitCode
from harvester.run.engine import Failure
from harvester.run.engine.local import LocalEngine


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

"""The local engine: shards in a process pool, results once each, dead processes run again."""

from __future__ import annotations

import os
import signal
import time
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


def here_waits_for_one(spec: tuple[int, str]) -> int:
    """Spec 0 (run in the harvest's process) waits until spec 1's result has arrived; spec 1
    kills its pool process the first time it runs."""
    index, folder = spec
    if index == 0:
        deadline = time.monotonic() + 30
        while not os.path.exists(f"{folder}/1-done") and time.monotonic() < deadline:
            time.sleep(0.05)
        return 0 if os.path.exists(f"{folder}/1-done") else -1
    marker = f"{folder}/1-died"
    if not os.path.exists(marker):
        Path(marker).touch()
        os._exit(1)
    return 1


def test_a_broken_pool_runs_its_shard_again_while_the_one_here_goes_on(tmp_path: Path) -> None:
    """With one shard in this process: a pool process's death does not wait for that shard
    to end; the dead one's spec runs again at once (here, while the shard here waits for it)."""
    results: dict[int, int] = {}

    def on_result(spec: tuple[int, str], result: int) -> None:
        results[spec[0]] = result
        if spec[0] == 1:
            (tmp_path / "1-done").touch()

    started = time.monotonic()
    failures = LocalEngine(workers=2, here=True).run(
        here_waits_for_one, [(0, str(tmp_path)), (1, str(tmp_path))], on_result=on_result
    )
    assert failures == []
    assert results == {0: 0, 1: 1}
    assert time.monotonic() - started < 25

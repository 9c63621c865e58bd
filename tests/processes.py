"""Real processes for the tests that need them: a sandbox server and harvests, as a user
(or cron) starts them, so that SIGKILL, locks and exit codes are the real thing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.conftest import KEY


@dataclass(frozen=True, slots=True)
class SandboxProcess:
    base_url: str
    process: subprocess.Popen[str]
    stderr: list[str]
    """What the sandbox printed after its first line (a reader thread drains the pipe)."""

    def stats(self) -> dict[str, int]:
        stats: dict[str, int] = httpx.get(f"{self.base_url}/__sandbox/stats", timeout=10).json()
        return stats


def harvester_env(key: str | None = KEY) -> dict[str, str]:
    """This environment without HARVESTER_* / FAL_* variables, plus the test key."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HARVESTER_", "FAL_"))}
    if key is not None:
        env["HARVESTER_API_KEY"] = key
    return env


@contextmanager
def sandbox_process(*args: str) -> Iterator[SandboxProcess]:
    """``harvester sandbox --port 0 ARGS`` in its own process; stopped (SIGTERM) on exit."""
    command = [sys.executable, "-m", "harvester", "sandbox", "--port", "0", "--key", KEY, *args]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=harvester_env(None))
    assert process.stderr is not None
    stderr = process.stderr
    rest: list[str] = []
    drain = threading.Thread(target=lambda: rest.extend(stderr), daemon=True)
    try:
        first = stderr.readline()
        assert first.startswith("sandbox listening on "), first
        drain.start()
        yield SandboxProcess(first.split()[3], process, rest)
    finally:
        process.terminate()
        process.wait(timeout=10)
        if drain.is_alive():
            drain.join(timeout=10)
        stderr.close()


def harvester_command(*args: str) -> list[str]:
    """``harvester ARGS...`` as this interpreter runs it."""
    return [sys.executable, "-m", "harvester", *args]


def run_harvester(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run ``harvester ARGS...`` to its end (the key in its environment unless ``env``)."""
    return subprocess.run(
        harvester_command(*args),
        capture_output=True,
        text=True,
        env=harvester_env() if env is None else env,
        timeout=timeout,
        check=False,
    )


def _harvest(
    base_url: str, out: Path | str, inputs: Sequence[Path], extra: Sequence[str]
) -> list[str]:
    return ["harvest", *(str(p) for p in inputs), "--out", str(out), "--base-url", base_url, *extra]


def harvest_command(
    base_url: str, out: Path | str, *inputs: Path, extra: Sequence[str] = ()
) -> list[str]:
    return harvester_command(*_harvest(base_url, out, inputs, extra))


def start_harvest(
    base_url: str,
    out: Path | str,
    *inputs: Path,
    extra: Sequence[str] = (),
    env: dict[str, str] | None = None,
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        harvest_command(base_url, out, *inputs, extra=extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=harvester_env() if env is None else env,
    )


def run_harvest(
    base_url: str,
    out: Path | str,
    *inputs: Path,
    extra: Sequence[str] = (),
    timeout: float = 120,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    return run_harvester(*_harvest(base_url, out, inputs, extra), env=env, timeout=timeout)


def run_records(out: Path) -> list[dict[str, object]]:
    """Every run record under ``out/runs``, oldest first."""
    return [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]


def wait_for_lock(out: Path, process: subprocess.Popen[str]) -> None:
    """Until ``process`` holds the output folder's lock (it then writes its pid there)."""
    lock = out / ".lock"
    for _ in range(3000):
        if lock.exists() and lock.read_text().strip() == str(process.pid):
            return
        assert process.poll() is None, process.communicate()
        time.sleep(0.01)
    raise AssertionError("the harvest never took its lock")


def kill_after(process: subprocess.Popen[str], out: Path, delay: float) -> bool:
    """SIGKILL ``process`` ``delay`` seconds after it took the lock; False if it ended first."""
    wait_for_lock(out, process)
    time.sleep(delay)
    alive = process.poll() is None
    if alive:
        os.kill(process.pid, signal.SIGKILL)
    process.communicate(timeout=30)
    return alive

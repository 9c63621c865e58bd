"""The storage behaviours that matter whatever the output is, each run on a folder and on a
prefix in Ceph's S3 gateway (the ``output`` fixture): a rerun fetches nothing, a harvest
killed with SIGKILL and run again loses nothing, and ``verify`` finds a tampered image."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import polars as pl
import pytest

from harvester.errors import ExitCode
from harvester.sandbox import Sandbox
from harvester.storage import manifest
from harvester.storage.objects import Store, open_store
from tests.conftest import Output, harvest_args, run_cli, write_csv
from tests.processes import (
    SandboxProcess,
    harvester_env,
    run_harvest,
    run_harvester,
    sandbox_process,
    start_harvest,
)

MODELS: Final = ("fal-ai/flux/dev", "fal-ai/flux", "workflows/acme/upscale")
RUN: Final = ("--rps", "100", "--flush-every", "0.3", "--retry-budget", "30", "-q")


def pairs(tag: str, n: int) -> list[tuple[str, str]]:
    found = [(MODELS[i % 3], f"{tag}-{i:04d}") for i in range(n)]
    # a 3 MB image (spilled to temp space, then stored whole) and a data: URI image
    return [*found, ("fal-ai/flux", f"big-{tag}"), ("fal-ai/flux", f"inline-{tag}")]


def every_row_checked(store: Store) -> pl.DataFrame:
    """The manifest; every row's image exists and hashes to its name and the row's sha256,
    and nothing under images/ is not named by its hash."""
    rows = manifest.scan(store).collect()
    for path, sha in rows.select("path", "sha256").drop_nulls().unique().iter_rows():
        assert hashlib.sha256(store.get(path)).hexdigest() == sha
        assert path.rsplit("/", 1)[-1].split(".")[0] == sha
    for info in store.list("images/"):
        digest = hashlib.sha256(store.get(info.key)).hexdigest()
        assert info.key.rsplit("/", 1)[-1].split(".")[0] == digest, info.key
    return rows


def records(store: Store) -> list[dict[str, object]]:
    found = [json.loads(store.get(i.key)) for i in store.list("runs/")]
    return sorted(found, key=lambda r: str(r["run_id"]))


def test_a_rerun_fetches_nothing(tmp_path: Path, sandbox: Sandbox, output: Output) -> None:
    wanted = pairs("again", 20)
    csv = write_csv(tmp_path / "in.csv", wanted)
    first = run_cli(harvest_args(sandbox, output.location, csv), env=output.env)
    assert first.exit_code == ExitCode.OK, first.output
    before = sandbox.stats()

    rerun = run_cli(harvest_args(sandbox, output.location, csv), env=output.env)

    after = sandbox.stats()
    assert rerun.exit_code == ExitCode.OK, rerun.output
    assert after["result_requests"] == before["result_requests"], "the rerun fetched results"
    assert after["media_requests"] == before["media_requests"], "the rerun fetched images"
    assert records(output.store)[-1]["skipped_already_ok"] == len(wanted)
    assert set(every_row_checked(output.store).select("model", "request_id").iter_rows()) == set(
        wanted
    )


def test_verify_finds_a_tampered_image(tmp_path: Path, sandbox: Sandbox, output: Output) -> None:
    csv = write_csv(tmp_path / "in.csv", pairs("tamper", 6))
    assert run_cli(harvest_args(sandbox, output.location, csv), env=output.env).exit_code == 0
    healthy = run_cli(["verify", output.location], env=output.env)
    assert healthy.exit_code == ExitCode.OK, healthy.output
    victim = next(i.key for i in output.store.list("images/"))
    output.store.put(victim, b"not the bytes its name says")
    framed = b"\xff\xd8\xff\xfe\x00\x10" + b"a comment, no " * 100  # a JPEG magic, no frame
    sha = hashlib.sha256(framed).hexdigest()
    output.store.put(f"images/{sha[:2]}/{sha}.jpg", framed)

    result = run_cli(["verify", output.location], env=output.env)

    assert result.exit_code == ExitCode.VERIFY, result.output
    assert f"corrupt: {victim}" in result.output
    assert f"not an image: images/{sha[:2]}/{sha}.jpg (starts like a jpeg;" in result.output


@pytest.fixture(scope="module")
def slow_sandbox() -> Iterator[SandboxProcess]:
    with sandbox_process("--image-bytes", "8000", "--slow", "0.05") as running:
        yield running


def kill_when_writing(process: subprocess.Popen[str], store: Store, parts: int) -> bool:
    """SIGKILL ``process`` once its run has written ``parts`` manifest parts (progress, not
    time); False if it ended first."""
    for _ in range(6000):
        if process.poll() is not None:
            break
        if len(manifest.parts(store)) >= parts:
            os.kill(process.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    process.communicate(timeout=60)
    return process.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_kill_9_then_rerun_loses_nothing(
    tmp_path: Path, slow_sandbox: SandboxProcess, output: Output
) -> None:
    store = output.store
    wanted = pairs("kill", 150)
    csv = write_csv(tmp_path / "in.csv", wanted)
    env = {**harvester_env(), **output.env, "TMPDIR": str(tmp_path)}
    harvest = start_harvest(slow_sandbox.base_url, output.location, csv, extra=RUN, env=env)

    assert kill_when_writing(harvest, store, 2), "the harvest ended before it could be killed"

    every_row_checked(store)
    done = manifest.latest(store).filter(pl.col("request_status") == "ok").collect()
    kept = set(done.select("model", "request_id").iter_rows())
    assert kept, "nothing was kept from before the kill"
    if store.everywhere:
        # A lease outlives its killed run until it expires (60 s): a run now is refused.
        refused = run_harvest(slow_sandbox.base_url, output.location, csv, extra=RUN, env=env)
        assert refused.returncode == ExitCode.LOCKED, refused.stderr
        assert "lease until" in refused.stderr
        status = run_harvester("status", output.location, env=env)
        assert "running" in status.stdout.lower(), status.stdout
        for info in list(store.list(".lock/")):  # stands in for waiting out the expiry
            store.delete(info.key)

    final = run_harvest(
        slow_sandbox.base_url, output.location, csv, extra=RUN, env=env, timeout=300
    )

    assert final.returncode == ExitCode.OK, final.stderr
    assert "Traceback" not in final.stderr + final.stdout
    rows = every_row_checked(store)
    assert set(rows.select("model", "request_id").iter_rows()) == set(wanted)
    record = records(store)[-1]
    assert record["skipped_already_ok"] == len(kept)
    requests = record["requests"]
    assert isinstance(requests, dict)
    assert sum(requests.values()) == len(wanted) - len(kept)
    status = run_harvester("status", output.location, env=env)
    assert status.returncode == ExitCode.OK, status.stdout
    verify = run_harvester("verify", output.location, env=env, timeout=300)
    assert verify.returncode == ExitCode.OK, verify.stdout + verify.stderr
    scratch = open_store(output.location, env=env).temp_dir  # where the runs kept temp files
    assert list(scratch.iterdir()) == []  # the dead run's: gone

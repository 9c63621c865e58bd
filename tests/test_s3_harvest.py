"""``--out s3://bucket/prefix`` end to end, on Ceph's S3 gateway (a real server on 127.0.0.1).

A harvest into the bucket yields a manifest whose every row's object exists and hashes to its
name, read back with polars straight from the bucket (the docs' recipe); a second run on the
prefix is refused (exit 5, the lease); ``status``, ``report`` and ``verify`` read the bucket;
credentials appear in no output. What holds on a folder too (a rerun fetches nothing, SIGKILL
then rerun loses nothing, verify finds a tampered image) is in test_backends.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import polars as pl
import pytest

from harvester.errors import ExitCode
from harvester.sandbox import Sandbox
from harvester.storage.objects import S3Store
from tests.conftest import KEY, harvest_args, run_cli, write_csv
from tests.processes import (
    SandboxProcess,
    harvester_env,
    sandbox_process,
    start_harvest,
)
from tests.s3gateway import Gateway

pytestmark = pytest.mark.s3

MODELS = ("fal-ai/flux/dev", "fal-ai/flux", "workflows/acme/upscale")


def pairs(tag: str, n: int) -> list[tuple[str, str]]:
    found = [(MODELS[i % 3], f"{tag}-{i:04d}") for i in range(n)]
    # a 3 MB image (spilled to local temp space, then put whole) and a data: URI image
    return [*found, ("fal-ai/flux", f"big-{tag}"), ("fal-ai/flux", f"inline-{tag}")]


def s3_store(gateway: Gateway, location: str) -> S3Store:
    return S3Store(location, env=gateway.env())


def check_every_row(gateway: Gateway, location: str) -> pl.DataFrame:
    """The docs' recipe: the manifest read straight from the bucket; every row's object
    exists and its bytes hash to its name and to the row's sha256."""
    manifest = pl.scan_parquet(
        f"{location}/manifest/**/*.parquet", storage_options=gateway.storage_options()
    ).collect()
    store = s3_store(gateway, location)
    stored = manifest.filter(pl.col("path").is_not_null())
    assert stored.height > 0
    for path, sha in stored.select("path", "sha256").unique().iter_rows():
        digest = hashlib.sha256()
        for chunk in store.iter_bytes(path):
            digest.update(chunk)
        assert digest.hexdigest() == sha
        assert path.rsplit("/", 1)[-1].split(".")[0] == sha
    for info in store.list("images/"):  # and nothing under images/ that is not its hash
        digest = hashlib.sha256(store.get(info.key)).hexdigest()
        assert info.key.rsplit("/", 1)[-1].split(".")[0] == digest, info.key
    return manifest


def latest_state(gateway: Gateway, location: str) -> pl.DataFrame:
    """docs/manifest.md's latest-state query, on s3://."""
    rows = pl.scan_parquet(
        f"{location}/manifest/**/*.parquet", storage_options=gateway.storage_options()
    )
    newest = pl.col("run_id").sort_by("harvested_at", "run_id").last()
    return rows.filter(pl.col("run_id") == newest.over("model", "request_id")).collect()


def test_harvest_into_s3_rerun_status_report_verify(
    tmp_path: Path,
    sandbox: Sandbox,
    s3_gateway: Gateway,
    s3_bucket: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    location = f"s3://{s3_bucket}/night"
    wanted = pairs("s3a", 40)
    csv = write_csv(tmp_path / "in.csv", wanted)
    env = s3_gateway.env()

    # Two shard processes: each gets the store the driver opened (and a client of its own).
    first = run_cli(harvest_args(sandbox, location, csv, extra=["--workers", "2"]), env=env)

    assert first.exit_code == ExitCode.OK, first.output
    manifest = check_every_row(s3_gateway, location)
    assert set(manifest.select("model", "request_id").iter_rows()) == set(wanted)
    assert (manifest["request_status"] == "ok").all()
    store = s3_store(s3_gateway, location)
    records = [json.loads(store.get(i.key)) for i in store.list("runs/")]
    assert [r["state"] for r in records] == ["finished"]
    assert records[0]["exit_code"] == 0
    assert all(k.key.startswith(("images/", "manifest/", "runs/", ".lock/")) for k in store.list())
    latest = latest_state(s3_gateway, location)
    assert latest.height == manifest.height

    status = run_cli(["status", location], env=env)
    assert status.exit_code == ExitCode.OK, status.output
    assert status.output.startswith("OK:")
    assert "no harvest running" in status.output
    report = run_cli(["report", location], env=env)
    assert report.exit_code == 0, report.output
    assert "fal-ai/flux/dev" in report.output
    page = tmp_path / "report.html"
    html = run_cli(["report", location, "--html", str(page)], env=env)
    assert html.exit_code == 0, html.output
    embedded = re.search(r"(\d+) images embedded", html.output)
    assert embedded is not None and int(embedded[1]) > 0, html.output  # read from the bucket
    assert page.read_text().count('src="data:image/') == int(embedded[1])
    verify = run_cli(["verify", location], env=env)
    assert verify.exit_code == 0, verify.output
    assert "0 missing, 0 corrupt, 0 orphans" in verify.output

    for result in (first, status, report, html, verify):
        for secret in (s3_gateway.secret_key, s3_gateway.access_key, KEY):
            assert secret not in result.output

    recipe = docs_s3_recipe().replace("s3://harvest/night", location)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(recipe, "docs/manifest.md", "exec"), {})  # noqa: S102 - the docs' block
    assert re.search(rf"│ ok\s+┆ {manifest.height}\s+│", printed.getvalue()), printed.getvalue()


def docs_s3_recipe() -> str:
    """The runnable python block of docs/manifest.md that reads ``s3://``."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "manifest.md").read_text()
    blocks = re.findall(r"^<!-- runnable -->\n```python\n(.*?)^```", text, flags=re.S | re.M)
    (recipe,) = [b for b in blocks if "s3://harvest/night" in b]
    return str(recipe)


def test_a_second_run_on_the_prefix_is_refused(
    tmp_path: Path, sandbox: Sandbox, s3_gateway: Gateway, s3_bucket: str
) -> None:
    location = f"s3://{s3_bucket}/night"
    csv = write_csv(tmp_path / "in.csv", pairs("s3l", 4))
    env = s3_gateway.env()
    other = s3_store(s3_gateway, location)
    before = sandbox.stats()["result_requests"]

    with other.lock(owner="harvester run elsewhere"):  # another run, as its lease shows it
        refused = run_cli(harvest_args(sandbox, location, csv), env=env)
        status = run_cli(["status", location], env=env)

    assert refused.exit_code == ExitCode.LOCKED, refused.output
    assert "already running on " + location in refused.output
    assert sandbox.stats()["result_requests"] == before
    assert not list(other.list("runs/")), "a refused run wrote a run record"
    assert "running" in status.output.lower()
    assert run_cli(harvest_args(sandbox, location, csv), env=env).exit_code == 0


def test_bad_s3_locations_are_clear_errors(tmp_path: Path, s3_gateway: Gateway) -> None:
    csv = write_csv(tmp_path / "in.csv", pairs("s3x", 1))
    result = run_cli(
        [
            "harvest",
            str(csv),
            "--out",
            "s3://no-such-bucket-here/x",
            "--base-url",
            "http://127.0.0.1:9",
        ],
        env=s3_gateway.env(),
    )
    assert result.exit_code == ExitCode.OUTPUT, result.output
    assert "no-such-bucket-here" in result.output
    assert "Traceback" not in result.output
    assert s3_gateway.secret_key not in result.output


# --------------------------------------------------------------------------- kill -9


@pytest.fixture(scope="module")
def slow_sandbox() -> Iterator[SandboxProcess]:
    with sandbox_process("--image-bytes", "8000", "--slow", "0.05") as running:
        yield running


S3_RUN: Final = ("--rps", "100", "--flush-every", "0.3", "--retry-budget", "30", "-q")
"""The options of the slow sandbox's runs into S3."""


def test_a_job_file_names_an_s3_location(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from harvester.jobs import load_job

    job_file = tmp_path / "nightly.toml"
    job_file.write_text('inputs = ["exports/*.csv"]\nout = "s3://harvest/night"\n')
    (tmp_path / "exports").mkdir()
    write_csv(tmp_path / "exports" / "a.csv", [("fal-ai/flux", "r1")])
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))

    config = load_job(job_file).harvest_config("key")

    assert config.out.location == "s3://harvest/night"
    assert config.out.temp_dir.parent.parent == tmp_path / "tmp"  # the scratch, under TMPDIR
    assert config.out.temp_dir.parent.name.startswith("harvester-")
    overridden = load_job(job_file, {"out": Path("local-out")}).harvest_config("key")
    assert overridden.out.location == "local-out"
    assert overridden.out.temp_dir == Path("local-out/.tmp")


@pytest.mark.slow
def test_a_run_whose_lease_is_taken_over_stops_with_exit_5(
    tmp_path: Path, slow_sandbox: SandboxProcess, s3_gateway: Gateway, s3_bucket: str
) -> None:
    """What a hung machine finds when it wakes: another run took the prefix over; at its
    next renewal (every 20 s) the run stops writing and exits 5."""
    location = f"s3://{s3_bucket}/night"
    csv = write_csv(tmp_path / "in.csv", pairs("s3t", 3000))
    env = {**harvester_env(), **s3_gateway.env(), "TMPDIR": str(tmp_path)}
    store = s3_store(s3_gateway, location)
    extra = (*S3_RUN, "--rps", "20")
    harvest = start_harvest(slow_sandbox.base_url, location, csv, extra=extra, env=env)
    try:
        for _ in range(6000):  # until the run holds the lease
            holder = store.holder()
            if holder is not None and holder.pid == harvest.pid:
                break
            assert harvest.poll() is None, harvest.communicate()
            time.sleep(0.05)
        while True:  # another run takes the prefix over: the next generation of the lease
            newest = max(int(i.key.rsplit("/", 1)[-1].split(".")[0]) for i in store.list(".lock/"))
            record = {"owner": "elsewhere", "host": "other", "pid": 1, "expires": 4e9}
            if store.put_new(f".lock/{newest + 1:012d}.json", json.dumps(record).encode()):
                break
        _, stderr = harvest.communicate(timeout=180)
    finally:
        if harvest.poll() is None:
            harvest.kill()
            harvest.communicate()

    assert harvest.returncode == ExitCode.LOCKED, stderr
    assert "was taken over while this run was stalled" in stderr

"""Secrets (issue item 9): the API key appears in no log line, manifest cell, error message
or exception text, at any verbosity, faults included."""

from __future__ import annotations

import io
import logging
import traceback
from pathlib import Path

import pytest

from harvester.errors import AuthError, ExitCode
from harvester.run.pipeline import HarvestConfig, harvest
from harvester.sandbox import FaultRates, SandboxConfig, running_sandbox
from harvester.storage.objects import open_store
from harvester.views.console import setup_logging
from tests.conftest import KEY, write_csv
from tests.processes import run_harvest, run_records

SPECIAL = ["pending-s", "missing-s", "fail-s", "invalid-s", "inline-s", "redirect-s", "badjson-s"]


def test_key_is_nowhere_at_debug_verbosity_under_faults(tmp_path: Path) -> None:
    faults = FaultRates.parse("mixed=0.3")
    config = SandboxConfig(key=KEY, faults=faults, image_bytes=2_000, retry_after_seconds=0)
    pairs = [("fal-ai/flux", f"secret-{n:03d}") for n in range(40)]
    csv = write_csv(tmp_path / "e.csv", pairs + [("fal-ai/flux", rid) for rid in SPECIAL])
    out = tmp_path / "out"
    with running_sandbox(config) as sandbox:
        # A real process: logging is set up once, as in production.
        result = run_harvest(sandbox.base_url, out, csv, extra=("-vv", "--max-attempts", "3"))
        stats = sandbox.stats()

    output = result.stdout + result.stderr
    assert result.returncode == ExitCode.INCOMPLETE, output
    assert "HTTP Request: GET" in output  # really -vv: every request line
    assert stats["faults_injected"] > 0 and stats["auth_leaks"] == 0
    assert KEY not in output
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.suffix == ".parquet" for p in files)
    for path in files:  # manifest parts, run records, the lock file, images
        assert KEY.encode() not in path.read_bytes(), path


def test_a_rejected_key_is_in_no_exception_text_or_record(tmp_path: Path) -> None:
    wrong = "sk-wrong-77f1c0de9b"
    csv = write_csv(tmp_path / "e.csv", [("fal-ai/flux", f"authfail-{n}") for n in range(50)])
    with running_sandbox(SandboxConfig(key=KEY)) as sandbox:
        config = HarvestConfig(
            inputs=(csv,),
            out=open_store(tmp_path / "out"),
            api_key=wrong,
            base_url=sandbox.base_url,
            concurrency=4,
            rps=1000,
        )
        with pytest.raises(AuthError) as info:
            harvest(config)

    text = "".join(traceback.format_exception(info.value))
    assert "refused the key (HTTP 401: Unauthorized)" in text
    assert wrong not in text and wrong not in repr(info.value) and wrong not in repr(config)
    records = run_records(tmp_path / "out")
    assert [r["exit_code"] for r in records] == [ExitCode.AUTH]
    assert wrong not in str(records)


def test_the_log_filter_redacts_the_key_wherever_it_comes_from() -> None:
    stream = io.StringIO()
    setup_logging(2, secrets=[KEY], stream=stream)
    try:
        logging.getLogger("somelib").debug("header Authorization: Bearer %s", KEY)
        logging.getLogger("harvester").warning(f"odd body: {KEY}")
    finally:
        setup_logging(0, secrets=[], stream=io.StringIO())
    text = stream.getvalue()
    assert KEY not in text
    assert "Authorization: Bearer ***" in text and "odd body: ***" in text

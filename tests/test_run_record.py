"""The run record (``DIR/runs/<run_id>.json``) tells the truth about how a run ended."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harvester.errors import ExitCode
from harvester.run.download import ImageDownloader
from harvester.sandbox import Sandbox
from harvester.storage.store import ImageFailure, StoredImage
from tests.conftest import harvest_args, run_cli, write_csv


def read_records(out: Path) -> list[dict[str, object]]:
    return [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]


def test_record_of_a_rejected_key_has_exit_code_4_and_the_error(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    csv = write_csv(tmp_path / "e.csv", [("fal-ai/flux", f"rec-{i}") for i in range(20)])
    out = tmp_path / "out"

    result = run_cli(harvest_args(sandbox, out, csv), key="wrong-key-0000")

    assert result.exit_code == ExitCode.AUTH
    [record] = read_records(out)
    assert record["exit_code"] == ExitCode.AUTH
    assert "refused the key" in str(record["error"])
    assert "wrong-key-0000" not in json.dumps(record)


def test_record_of_a_finished_run_has_no_error(tmp_path: Path, sandbox: Sandbox) -> None:
    csv = write_csv(tmp_path / "e.csv", [("fal-ai/flux", "rec-ok-1"), ("fal-ai/flux", "missing-9")])
    out = tmp_path / "out"

    result = run_cli(harvest_args(sandbox, out, csv))

    assert result.exit_code == ExitCode.INCOMPLETE
    [record] = read_records(out)
    assert record["exit_code"] == ExitCode.INCOMPLETE
    assert record["error"] is None
    assert record["requests"] == {"ok": 1, "not_found": 1}


def test_record_of_a_bug_has_exit_code_1_and_says_so(
    tmp_path: Path, sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception that is not ours (a bug) still shows as one, but the record and
    ``status`` must not call the run ok."""
    real_store = ImageDownloader.store
    calls: list[str] = []

    async def store(self: ImageDownloader, url: str) -> StoredImage | ImageFailure:
        calls.append(url)
        if len(calls) == 4:
            raise RuntimeError("boom in the store")
        return await real_store(self, url)

    monkeypatch.setattr(ImageDownloader, "store", store)
    csv = write_csv(tmp_path / "e.csv", [("fal-ai/flux", f"bug-{i}") for i in range(10)])
    out = tmp_path / "out"

    with pytest.raises(BaseExceptionGroup) as raised:  # a process would exit 1 with it
        run_cli(harvest_args(sandbox, out, csv))

    assert raised.group_contains(RuntimeError, match="boom in the store", depth=None)
    [record] = read_records(out)
    assert record["exit_code"] == ExitCode.BUG
    assert record["error"] == "unexpected error (a bug): RuntimeError: boom in the store"
    status = run_cli(["status", str(out)])
    assert status.exit_code == ExitCode.BUG, status.output

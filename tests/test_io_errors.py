"""I/O errors (issue item 7): an unwritable or full output folder gives a clear error and
leaves nothing half-written that looks complete.

Tests run as root, so permissions do not stop writes: an --out below a regular file stands
for an unwritable folder, and a full disk is simulated honestly, either with RLIMIT_FSIZE in
a real harvest process (writes past the limit fail with EFBIG, SIGXFSZ ignored) or with
ENOSPC injected at the one write boundary in a narrow unit test.
"""

from __future__ import annotations

import errno
import hashlib
import os
import resource
import signal
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from harvester.errors import ExitCode, OutputError
from harvester.sandbox import Sandbox
from harvester.storage.layout import Layout
from harvester.storage.manifest import ManifestRow, ManifestWriter
from harvester.storage.objects import LocalStore
from harvester.views.verify import verify
from tests.conftest import harvest_args, run_cli, write_csv
from tests.processes import harvest_command, harvester_env, run_harvest, run_records

FILE_LIMIT = 1_000_000
"""Bytes any one file of the harvest process may reach: images are 4 kB, big- is 3 MB."""


def test_out_below_a_regular_file_is_a_clear_output_error(tmp_path: Path, sandbox: Sandbox) -> None:
    (tmp_path / "file").write_text("not a folder")
    out = tmp_path / "file" / "out"
    csv = write_csv(tmp_path / "e.csv", [("fal-ai/flux", "io-1")])
    before = sandbox.stats()["result_requests"]

    result = run_cli(harvest_args(sandbox, out, csv))

    assert result.exit_code == ExitCode.OUTPUT
    assert result.output == (
        f"harvester: error: cannot write to output folder {out}: Not a directory; check it "
        "exists, is writable by this user and has free space\n"
    )
    assert sandbox.stats()["result_requests"] == before  # nothing fetched


def _limit_file_size() -> None:
    """In the child, before exec: ignore SIGXFSZ so a write past the limit fails (EFBIG)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_LIMIT, FILE_LIMIT))


def test_a_full_disk_mid_run_stops_cleanly_and_a_rerun_completes(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    pairs = [("fal-ai/flux", f"io-full-{n:03d}") for n in range(40)]
    pairs.insert(20, ("fal-ai/flux", "big-io-full"))
    csv = write_csv(tmp_path / "e.csv", pairs)
    out = tmp_path / "out"
    command = harvest_command(
        sandbox.base_url, out, csv, extra=("--rps", "1000", "--concurrency", "4")
    )

    full = subprocess.run(  # preexec_fn: the only way to limit the child alone
        command,
        capture_output=True,
        text=True,
        env=harvester_env(),
        preexec_fn=_limit_file_size,
        timeout=60,
        check=False,
    )

    assert full.returncode == ExitCode.OUTPUT, full.stderr
    assert full.stderr.endswith("harvester: error: cannot write image data: File too large\n")
    assert "Traceback" not in full.stderr
    # Nothing that looks complete is half-written: every stored file is named by its bytes,
    # every part reads back, no temp file is left, and the run record says what happened.
    for path in (out / "images").rglob("*.*"):
        assert path.name.startswith(hashlib.sha256(path.read_bytes()).hexdigest())
    for part in (out / "manifest").rglob("*.parquet"):
        pq.read_table(part)
    assert list((out / ".tmp").iterdir()) == []
    assert [r["exit_code"] for r in run_records(out)] == [ExitCode.OUTPUT]

    rerun = run_harvest(sandbox.base_url, out, csv, extra=("--rps", "1000", "-q"))

    assert rerun.returncode == ExitCode.OK, rerun.stderr
    assert verify(out).ok


def _row(n: int) -> ManifestRow:
    return ManifestRow(
        run_id="r1",
        harvested_at=datetime.now(UTC),
        source_file="e.csv",
        source_line=n,
        model="fal-ai/flux",
        request_id=f"id-{n}",
        request_status="ok",
        status="ok",
    )


def test_no_space_while_writing_a_part_leaves_no_part_and_loses_no_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    layout = Layout(tmp_path / "out")
    layout.prepare()
    writer = ManifestWriter(LocalStore(layout.root), "r1", rows_per_part=1_000)
    writer.add([_row(n) for n in range(10)])
    real_write_table = pq.write_table

    def write_half_then_fail(table: Any, where: Path, **kwargs: Any) -> None:
        Path(where).write_bytes(b"PAR1" + b"\x00" * 100)  # a partial file, as a full disk leaves
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pq, "write_table", write_half_then_fail)
    with pytest.raises(OutputError) as info:
        writer.flush()

    part = layout.manifest / "r1" / "part-00000.parquet"
    assert str(info.value) == f"cannot write manifest part {part}: No space left on device"
    assert not part.exists()
    assert list(layout.tmp.iterdir()) == []
    assert writer.rows_written == 0

    monkeypatch.setattr(pq, "write_table", real_write_table)
    writer.flush()  # space again: the same rows, nothing lost, nothing twice
    assert pq.read_table(part).num_rows == 10
    assert writer.rows_written == 10

"""The layers hold: ``harvester status`` reads JSON records and loads neither an HTTP library
nor the run or API layers at run time (``python -X importtime`` lists every import), and no
module of views imports the run or API layers at all, not even for types."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pytest

from harvester.counters import Counters
from harvester.errors import ExitCode
from harvester.storage import runs
from harvester.storage.layout import Layout
from harvester.storage.objects import LocalStore
from harvester.storage.runs import RunRecord
from tests.processes import harvester_env

FORBIDDEN = ("httpx", "aiohttp", "anyio", "harvester.run", "harvester.api")
PACKAGE = Path(__file__).parent.parent / "harvester"
SHARED = {
    "harvester.counters",
    "harvester.errors",
    "harvester.redact",
    "harvester.statuses",
    "harvester.units",
}
"""What every layer may import besides its own modules (docs/architecture.md)."""


def harvester_imports(folder: Path) -> set[tuple[str, str]]:
    """(module file, imported harvester module) for every import under ``folder``, those
    inside functions and ``TYPE_CHECKING`` blocks included."""
    found = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] if node.level == 0 else []
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            found |= {(path.name, n) for n in names if n.split(".")[0] == "harvester"}
    return found


@pytest.mark.parametrize("layer", ["api", "storage"])
def test_the_api_and_storage_layers_import_only_themselves_and_the_shared_modules(
    layer: str,
) -> None:
    imports = harvester_imports(PACKAGE / layer)
    assert any(name.startswith(f"harvester.{layer}.") for _, name in imports)  # it sees them
    stray = {
        (file, name)
        for file, name in imports
        if not name.startswith(f"harvester.{layer}") and name not in SHARED
    }
    assert stray == set()


def imported_by(*args: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "harvester", *args],
        capture_output=True,
        text=True,
        env=harvester_env(),
        timeout=120,
        check=False,
    )
    modules = {
        line.rsplit("|", 1)[-1].strip()
        for line in result.stderr.splitlines()
        if line.startswith("import time:")
    }
    return result, modules


def test_status_imports_neither_http_nor_the_run_layer(tmp_path: Path) -> None:
    started = datetime(2026, 11, 24, 3, 15, tzinfo=UTC)
    record = RunRecord(
        run_id="20261124T031500.000Z-abc123",
        state=runs.FINISHED,
        started_at=started,
        finished_at=started,
        exit_code=0,
        counters=Counters(requests=Counter({"ok": 3})),
    )
    runs.write(LocalStore(tmp_path), record)

    result, modules = imported_by("status", str(tmp_path))

    assert result.returncode == ExitCode.OK, result.stderr
    assert result.stdout.startswith("OK: last run 20261124T031500.000Z-abc123 exited 0")
    assert "harvester.views.status" in modules  # the check sees what it should
    assert "harvester.storage.runs" in modules
    loaded = sorted(m for m in modules if m.startswith(FORBIDDEN))
    assert loaded == []


def test_harvest_does_import_the_run_layer() -> None:
    """The other side of the check above: the same listing does show the run layer when a
    command needs it (here ``harvest`` fails on a missing file after loading it)."""
    result, modules = imported_by("harvest", "no-such-file.csv", "--out", "x")

    assert result.returncode == ExitCode.INPUT, result.stderr
    assert "harvester.run.pipeline" in modules
    assert "httpx" in modules


def test_a_run_record_reads_back_as_written(tmp_path: Path) -> None:
    started = datetime(2026, 11, 24, 3, 15, tzinfo=UTC)
    record = RunRecord(
        run_id="r1",
        pid=42,
        host="h",
        started_at=started,
        counters=Counters(requests=Counter({"ok": 3, "not_found": 1}), images_new=2),
        inputs=(runs.InputRecord(path="a.csv", sha256="ab" * 32, bytes=10, rows=4),),
    )
    layout = Layout(tmp_path)
    runs.write(LocalStore(layout.root), record)
    [back], unreadable = runs.read_all(tmp_path)
    assert unreadable == []
    assert back == record
    assert back.running and back.exit_code is None
    assert back.not_ok_share == 0.25
    assert list((tmp_path / ".tmp").iterdir()) == []  # written through a temp file, renamed


def test_views_never_import_the_run_or_api_layers() -> None:
    imports = harvester_imports(PACKAGE / "views")
    assert ("console.py", "harvester.storage.runs") in imports  # it sees them
    assert {(f, n) for f, n in imports if n.startswith(("harvester.run", "harvester.api"))} == set()

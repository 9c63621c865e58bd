"""The README's polars recipes run, as printed, on a real manifest from a sandbox harvest."""

from __future__ import annotations

import contextlib
import io
import re
import shutil
from pathlib import Path

import pytest

from harvester.sandbox import Sandbox
from tests.conftest import run_cli

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text(encoding="utf-8")
PYTHON_BLOCKS = re.findall(r"^```python\n(.*?)^```", README, flags=re.S | re.M)


def test_readme_has_the_recipes() -> None:
    assert len(PYTHON_BLOCKS) >= 5
    for what in ("per_night", "nsfw_by_day", "export.join(", "retry.csv"):
        assert any(what in block for block in PYTHON_BLOCKS), what


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory, sandbox: Sandbox) -> Path:
    """A folder laid out like the checkout after ``make run``: sample_inputs/, harvest-out/."""
    root = tmp_path_factory.mktemp("checkout")
    shutil.copytree(REPO / "sample_inputs", root / "sample_inputs")
    inputs = sorted(str(p) for p in (root / "sample_inputs").glob("*.csv"))
    out = root / "harvest-out"
    result = run_cli(["harvest", *inputs, "--out", str(out), "--base-url", sandbox.base_url])
    assert result.exit_code == 3, result.output
    return root


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=lambda b: b.splitlines()[-1][:40])
def test_readme_python_block_runs(
    block: str, checkout: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(checkout)
    namespace: dict[str, object] = {}
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    if "per_night" in namespace:
        assert namespace["per_night"].height > 0  # type: ignore[attr-defined]
    if "joined" in namespace:
        joined = namespace["joined"]
        assert joined["status"].null_count() == 0  # type: ignore[index]
    if "retry" in block:
        lines = (checkout / "retry.csv").read_text().splitlines()
        assert lines[0] == "model,request_id" and len(lines) == 3  # the pending and missing ids

"""The README and docs/ hold true: every block marked runnable runs, as printed, in a copy of
the checkout after a real sandbox harvest (what ``make run`` leaves), and writes nothing into it.

A block is marked runnable by the line ``<!-- runnable -->`` right above its fence. A
```python block is executed; a ```console block runs each ``$ `` line in a shell, with the
sandbox's address in place of ``127.0.0.1:8787``, and the lines shown under it must appear in
what it printed, in order, with numbers, sizes and run ids free to differ.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from harvester.sandbox import Sandbox, SandboxConfig, running_sandbox
from tests.conftest import run_cli
from tests.processes import harvester_env

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
MARK = "<!-- runnable -->"
SANDBOX_KEY = "sandbox-key"
"""The key the docs show; this module's sandbox accepts it."""
DOCS_SANDBOX = "127.0.0.1:8787"

_FENCE = re.compile(r"^(<!-- runnable -->\n)?```([a-z]*)\n(.*?)^```", flags=re.S | re.M)
_RUN_ID = re.compile(r"\d{8}T\d{6}\.\d{3}Z-[0-9a-f]{6}")
_NUMBER = re.compile(r"\d[\w.,:]*")


def fenced_blocks(page: Path) -> list[tuple[str, str, bool]]:
    """``(language, body, runnable)`` of every fenced block of a page."""
    text = page.read_text(encoding="utf-8")
    return [(lang, body, bool(mark)) for mark, lang, body in _FENCE.findall(text)]


RUNNABLE = [
    pytest.param(page, lang, body, id=f"{page.name}:{n}")
    for page in PAGES
    for n, (lang, body, runnable) in enumerate(fenced_blocks(page))
    if runnable and "s3://" not in body  # tests/test_s3_harvest.py runs those on the gateway
]


def test_readme_is_a_front_page() -> None:
    assert len((REPO / "README.md").read_text(encoding="utf-8").encode()) <= 12_000
    for name in ("operations", "manifest", "performance", "architecture"):
        assert (REPO / "docs" / f"{name}.md").is_file(), name
    assert len((REPO / "docs" / "architecture.md").read_text().splitlines()) <= 61


def test_every_python_block_is_run_and_the_recipes_are_there() -> None:
    blocks = [(page, *block) for page in PAGES for block in fenced_blocks(page)]
    python = [(page, body, runnable) for page, lang, body, runnable in blocks if lang == "python"]
    assert [page.name for page, _, runnable in python if not runnable] == []
    recipes = [body for page, body, _ in python if page.name == "manifest.md"]
    for what in ("per_night", "nsfw_by_day", "export.join(", "retry.csv"):
        assert any(what in block for block in recipes), what
    console = [body for _, lang, body, runnable in blocks if lang == "console" and runnable]
    assert len(console) >= 3


def test_the_marker_is_seen() -> None:
    page = "text\n<!-- runnable -->\n```console\n$ harvester verify x\n```\n```python\nx = 1\n```\n"
    assert _FENCE.findall(page) == [
        (MARK + "\n", "console", "$ harvester verify x\n"),
        ("", "python", "x = 1\n"),
    ]


@pytest.fixture(scope="module")
def docs_sandbox() -> Iterator[Sandbox]:
    """A sandbox as ``make run`` starts it: the docs' key, the default image size."""
    with running_sandbox(SandboxConfig(key=SANDBOX_KEY)) as sandbox:
        yield sandbox


@pytest.fixture(scope="module")
def made_run(tmp_path_factory: pytest.TempPathFactory, docs_sandbox: Sandbox) -> Path:
    """A folder laid out like the checkout after ``make run``: sample_inputs/, harvest-out/."""
    root = tmp_path_factory.mktemp("made-run")
    shutil.copytree(REPO / "sample_inputs", root / "sample_inputs")
    inputs = sorted(f"sample_inputs/{p.name}" for p in (root / "sample_inputs").glob("*.csv"))
    with contextlib.chdir(root):
        args = ["harvest", *inputs, "--out", "harvest-out", "--base-url", docs_sandbox.base_url]
        result = run_cli(args, key=SANDBOX_KEY)
    assert result.exit_code == 3, result.output
    return root


@pytest.fixture
def checkout(made_run: Path, tmp_path: Path) -> Path:
    """A fresh copy for each block, so that no block depends on another's run."""
    root = tmp_path / "checkout"
    shutil.copytree(made_run, root)
    return root


def files_outside_the_output(root: Path) -> set[str]:
    return {
        str(path.relative_to(root))
        for path in root.rglob("*")
        if path.relative_to(root).parts[0] != "harvest-out"
    }


def shown_line_pattern(line: str) -> re.Pattern[str]:
    """A line as the docs show it, with run ids and numbers free to differ."""
    parts = []
    for n, piece in enumerate(_RUN_ID.split(line)):
        if n:
            parts.append(_RUN_ID.pattern)
        for m, chunk in enumerate(_NUMBER.split(piece)):
            if m:
                parts.append(_NUMBER.pattern)
            parts.append(re.escape(chunk))
    return re.compile("".join(parts))


def console_commands(body: str) -> list[tuple[str, list[str]]]:
    """Each ``$ `` command of a console block with the output lines shown under it."""
    commands: list[tuple[str, list[str]]] = []
    for line in body.splitlines():
        if line.startswith("$ "):
            commands.append((line[2:], []))
        elif commands and line.strip() and line.strip() != "...":
            commands[-1][1].append(line.rstrip())
    return commands


def run_console_block(body: str, root: Path, sandbox: Sandbox) -> None:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    address = sandbox.base_url.removeprefix("http://")
    for command, shown in console_commands(body):
        done = subprocess.run(
            ["bash", "-c", command.replace(DOCS_SANDBOX, address)],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        printed = (done.stdout + done.stderr).splitlines()
        assert done.returncode in (0, 3), f"{command}: exit {done.returncode}\n{printed}"
        at = 0
        for want in shown:
            pattern = shown_line_pattern(want)
            while at < len(printed) and not pattern.fullmatch(printed[at].rstrip()):
                at += 1
            assert at < len(printed), f"{command}: not printed: {want!r}\nprinted: {printed}"
            at += 1


def test_the_line_pattern_lets_numbers_differ_and_nothing_else() -> None:
    shown = "run 20261201T103459.798Z-68e058: 9 requests in 0.3 s (33.5 req/s), 1m29s ago"
    pattern = shown_line_pattern(shown)
    assert pattern.fullmatch(
        "run 20261124T061743.502Z-3ddd01: 12 requests in 1.7 s (7 req/s), 2s ago"
    )
    assert not pattern.fullmatch(
        "run 20261124T061743.502Z-3ddd01: 12 rows in 1.7 s (7 req/s), 2s ago"
    )


@pytest.mark.parametrize(("page", "lang", "body"), RUNNABLE)
def test_runnable_block(
    page: Path,
    lang: str,
    body: str,
    checkout: Path,
    docs_sandbox: Sandbox,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    before = files_outside_the_output(checkout)
    if lang == "console":
        run_console_block(body, checkout, docs_sandbox)
    else:
        assert lang == "python", f"{page.name}: only python and console blocks can be runnable"
        monkeypatch.chdir(checkout)
        namespace: dict[str, object] = {}
        with contextlib.redirect_stdout(io.StringIO()):
            exec(compile(body, str(page.name), "exec"), namespace)  # noqa: S102 - our own docs
        check_recipe(namespace)
    assert files_outside_the_output(checkout) == before, f"{page.name}: wrote into the checkout"


MANIFEST_RECIPES = [
    pytest.param(body, id=f"manifest.md:{n}")
    for n, (lang, body, runnable) in enumerate(fenced_blocks(REPO / "docs" / "manifest.md"))
    if runnable and lang == "python" and "s3://" not in body  # s3: tests/test_s3_harvest.py
]


@pytest.fixture(scope="module")
def compacted_run(made_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``made_run`` after ``harvester compact harvest-out``, and one more run since."""
    root = tmp_path_factory.mktemp("compacted") / "checkout"
    shutil.copytree(made_run, root)
    with contextlib.chdir(root):
        result = run_cli(["compact", "harvest-out"])
        assert result.exit_code == 0, result.output
    assert [p.name for p in (root / "harvest-out" / "manifest").iterdir()] == ["_compacted-000001"]
    return root


@pytest.mark.parametrize("body", MANIFEST_RECIPES)
def test_manifest_recipes_read_a_compacted_manifest(
    body: str, compacted_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(compacted_run)
    namespace: dict[str, object] = {}
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compile(body, "manifest.md", "exec"), namespace)  # noqa: S102 - our own docs
    check_recipe(namespace)


def check_recipe(namespace: dict[str, object]) -> None:
    if "per_night" in namespace:
        assert namespace["per_night"].height > 0  # type: ignore[attr-defined]
    if "joined" in namespace:
        joined = namespace["joined"]
        assert joined["status"].null_count() == 0  # type: ignore[index]
    if "state" in namespace:
        assert namespace["state"].height == 88  # type: ignore[attr-defined]
    if "retry_csv" in namespace:
        retry_csv = Path(str(namespace["retry_csv"]))
        lines = retry_csv.read_text().splitlines()
        shutil.rmtree(retry_csv.parent)
        assert lines[0] == "model,request_id"
        ids = sorted(line.split(",")[1].split("-")[0] for line in lines[1:])
        assert ids == ["fail", "missing", "pending"]  # every status the next run retries


def test_make_run_exits_as_the_readme_says(tmp_path: Path) -> None:
    """``make run``'s demo: the harvest exits 3 (the sample exports are meant to be not all
    ok) and the demo itself 0, as the README says."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    said = " ".join(readme.split())
    assert "Exit 3 is what this demo's harvest should give" in said
    assert "`make run` then exits 0 (with the harvest's code if that is neither 0 nor 3)" in said
    inputs = sorted(str(p) for p in (REPO / "sample_inputs").glob("*.csv"))
    done = subprocess.run(
        [sys.executable, "-m", "harvester.demo", "--out", str(tmp_path / "out"), *inputs],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=harvester_env(None),
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "(exit code 3: 0 = all ok, 3 = some requests not ok, see README)" in done.stdout


def test_the_readme_warns_about_fals_retention() -> None:
    """A team calling fal itself must learn from the front page that a nightly GET is too
    late without payload storage, and where the webhook receiver is."""
    said = " ".join((REPO / "README.md").read_text(encoding="utf-8").split())
    for fact in (
        "fal keeps a queue result 1 hour after it completes, 6 minutes if it is 10 KB or larger",
        "unless payload storage is on",
        "a nightly GET against fal finds most of a day's results gone",
        "Submit with payload storage on",
    ):
        assert fact in said, fact
    assert "`harvester serve` receive fal's signed webhooks" in said
    assert "(docs/webhooks.md)" in said

"""Everything the CLI prints for people fits the terminal: 80 columns when the width is unknown
(a pipe, cron mail). Tables cut their cells with an ellipsis and stay aligned whatever the
input holds; help wraps; log lines on a terminal are short and wrap, never cut."""

from __future__ import annotations

import fcntl
import os
import re
import socket
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harvester.cli import main
from harvester.errors import ExitCode
from harvester.sandbox import Sandbox
from harvester.terminal import display_width, wrap
from harvester.views.table import fit_table
from tests.conftest import harvest_args, run_cli, write_csv
from tests.processes import harvester_env

REPO = Path(__file__).resolve().parent.parent
COMMANDS = ["", *sorted(main.commands)]  # type: ignore[attr-defined]
HARVESTER = str(Path(sys.executable).parent / "harvester")
"""The installed command, so help's usage line says ``harvester``."""
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def no_columns_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in harvester_env().items() if k not in ("COLUMNS", "LINES")}
    return {**env, **extra}


def too_wide(text: str, width: int = 80) -> list[str]:
    return [line for line in text.splitlines() if display_width(line) > width]


def column_starts(line: str, names: list[str]) -> list[int]:
    return [line.index(name) for name in names]


# --- the one table helper -------------------------------------------------------------------


def test_a_control_character_in_an_id_does_not_break_alignment() -> None:
    frame = pl.DataFrame(
        {
            "request_id": ["plain-id", "bell\x07id", "esc\x1b[2Jid", "tab\tid"],
            "status": ["ok", "invalid", "invalid", "failed"],
            "n": [1, 22, 333, 4444],
        }
    )
    for width in (80, 30):
        lines = fit_table(frame, width=width).splitlines()
        assert not any(re.search(r"[\x00-\x1f\x7f]", line) for line in lines)
        assert "bell\\x07id" in lines[3] or width < 40
        # every row's status starts under the header's, and the numbers end together
        start = lines[0].index("status")
        assert {line[start - 2 : start] for line in lines[2:]} == {"  "}
        assert len({len(line) for line in [lines[0], *lines[2:]]}) == 1  # n right-aligned


def test_a_wide_table_is_cut_with_an_ellipsis_and_fits() -> None:
    frame = pl.DataFrame(
        {
            "request_id": ["x" * 60, "short"],
            "new_images": [1, 2],
            "error": ["why " * 30, None],
            "prompt": ["一只猫在屋顶上" * 5, "é"],  # wide characters count twice
        }
    )
    text = fit_table(frame, width=80)
    assert too_wide(text) == []
    assert "…" in text and "xxxxxxxx" in text
    roomy = fit_table(frame, width=400)
    assert "…" not in roomy and "x" * 60 in roomy  # nothing cut when there is room


@settings(deadline=None, max_examples=60)  # a loaded machine must not fail a property
@given(
    st.lists(st.text(max_size=40), min_size=1, max_size=6),
    st.integers(min_value=20, max_value=120),
)
def test_any_table_fits_any_width(cells: list[str], width: int) -> None:
    frame = pl.DataFrame({f"col_{i}_name": [c, c[::-1]] for i, c in enumerate(cells)})
    text = fit_table(frame, width=width)
    assert too_wide(text, width) == []
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]", text)


def test_wrap_never_cuts() -> None:
    message = "harvester: error: " + " ".join(f"word{i}" for i in range(60))
    wrapped = wrap(message, width=80)
    assert too_wide(wrapped) == []
    assert wrapped.split() == message.split()


# --- the outputs ----------------------------------------------------------------------------


@pytest.mark.parametrize("columns", [None, "80"])
def test_help_fits_80_columns(columns: str | None) -> None:
    env = no_columns_env(**({"COLUMNS": columns} if columns else {}))
    for command in COMMANDS:
        args = [HARVESTER, *([command] if command else []), "--help"]
        done = subprocess.run(args, capture_output=True, text=True, env=env, check=True)
        assert done.stdout.startswith("Usage: harvester")
        assert too_wide(done.stdout) == [], command


def test_help_uses_a_wider_terminal_up_to_100_columns() -> None:
    env = no_columns_env(COLUMNS="200")
    done = subprocess.run(
        [HARVESTER, "harvest", "--help"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    widest = max(len(line) for line in done.stdout.splitlines())
    assert 80 < widest <= 100


@pytest.fixture(scope="module")
def messy_harvest(tmp_path_factory: pytest.TempPathFactory, sandbox: Sandbox) -> Path:
    tmp = tmp_path_factory.mktemp("widths")
    pairs = [
        *[("fal-ai/flux-pro/v1.1-ultra/with-a-very-long-model-name", f"w-{i}") for i in range(6)],
        ("fal-ai/flux/dev", "fail-width"),
        ("fal-ai/flux/dev", "pending-width"),
    ]
    out = tmp / "out"
    csv = write_csv(tmp / "export.csv", pairs)
    assert run_cli(harvest_args(sandbox, out, csv)).exit_code == ExitCode.INCOMPLETE
    return out


def test_report_tables_fit_80_columns_in_a_pipe(messy_harvest: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "harvester", "report", str(messy_harvest)],
        capture_output=True,
        text=True,
        env=no_columns_env(),
        check=True,
    )
    assert "Requests by status and model" in done.stdout
    assert "with-a-very-long" in done.stdout and "…" in done.stdout  # cut, not dropped
    assert too_wide(done.stdout) == []


def test_make_run_tables_fit_80_columns_and_stay_aligned(tmp_path: Path) -> None:
    inputs = sorted(f"sample_inputs/{p.name}" for p in (REPO / "sample_inputs").glob("*.csv"))
    done = subprocess.run(
        [sys.executable, "-m", "harvester.demo", "--out", str(tmp_path / "out"), *inputs],
        capture_output=True,
        text=True,
        env=no_columns_env(),
        cwd=REPO,
        check=True,
        timeout=300,
    )
    # the command it runs, continued with backslashes; the tables; what to try next
    lines = done.stdout.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("$ HARVESTER_API_KEY="))
    last = next(i for i in range(first, len(lines)) if not lines[i].endswith(" \\"))
    assert last > first and "--base-url" in "".join(lines[first : last + 1])
    shown = done.stdout[done.stdout.index("The current state") :]
    assert too_wide("\n".join([*lines[first : last + 1], shown])) == []
    assert "\x07" not in shown
    table = shown[shown.index("Rows that are not ok") :].split("\n\n")[0].splitlines()[1:]
    rule = next(i for i, line in enumerate(table) if set(line) == {"-", " "})
    start = table[0].index("status")
    rows = table[rule + 1 :]
    assert len(rows) >= 8 and any(row.startswith("f3b7a50d") for row in rows)  # has a bell
    for row in rows:  # every status under the header's, whatever the id held
        assert row[start - 2 : start] == "  " and row[start] != " ", row


# --- log lines on a terminal ----------------------------------------------------------------


def run_in_a_terminal(args: list[str], *, columns: int = 80) -> str:
    """What ``harvester ARGS`` shows on a terminal of ``columns`` (a pseudo-terminal with that
    size, COLUMNS unset), progress bar redraws turned into lines."""
    leader, follower = os.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    process = subprocess.Popen(
        [sys.executable, "-m", "harvester", *args],
        stdin=follower,
        stdout=follower,
        stderr=follower,
        env=no_columns_env(),
    )
    os.close(follower)
    chunks = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            data = os.read(leader, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(leader)
    process.wait(timeout=30)
    text = b"".join(chunks).decode("utf-8", "replace").replace("\r\n", "\n")
    return _ANSI.sub("", text).replace("\r", "\n")


def test_log_lines_on_a_terminal_are_short_and_wrap(tmp_path: Path, sandbox: Sandbox) -> None:
    csv = REPO / "sample_inputs" / "messy.csv"
    args = harvest_args(sandbox, tmp_path / "out", csv)
    shown = run_in_a_terminal(args)

    assert "invalid row" in shown
    logged = re.split(r"\n(?=run \S+: \d)", shown)[0]  # what comes before the summary
    assert shown != logged
    assert too_wide(logged) == []
    log_lines = [line for line in shown.splitlines() if re.match(r"\d\d:\d\d:\d\d [A-Z]+ ", line)]
    assert len(log_lines) >= 6
    assert all(re.match(r"\d\d:\d\d:\d\d (WARNING|INFO|ERROR) \S", line) for line in log_lines)
    assert "harvester:" not in " ".join(log_lines)  # no logger name
    assert not re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}", shown)  # no date, no ms
    # a long warning wraps onto indented lines; nothing of it is cut
    joined = re.sub(r"\n    ", " ", shown)
    assert "messy.csv:11: invalid row: request_id '../../etc/passwd'" in joined


def test_shard_processes_log_short_lines_on_a_terminal_too(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    csv = write_csv(tmp_path / "export.csv", [("fal-ai/flux", f"dead-{i}") for i in range(4)])
    args = ["harvest", str(csv), "--out", str(tmp_path / "out")]
    args += ["--base-url", f"http://127.0.0.1:{port}", "--workers", "2"]
    args += ["--retry-budget", "1", "--max-attempts", "2"]

    shown = run_in_a_terminal(args)

    assert too_wide(shown) == []
    assert re.search(rf"\d\d:\d\d:\d\d WARNING .*127\.0\.0\.1:{port}", shown), shown
    assert not re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", shown)

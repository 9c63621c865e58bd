"""Help is complete, and every command line and option the docs show exists."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from harvester.cli import main

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
DOCS = "\n".join(page.read_text(encoding="utf-8") for page in PAGES)
"""The README and every page of docs/."""
SHIPPED = [
    "jobs/harvester.cron",
    "jobs/harvester.service",
    "jobs/sandbox.toml",
    "jobs/harvester-serve.service",
    "jobs/webhooks.toml",
]
COMMANDS: dict[str, click.Command] = dict(main.commands)  # type: ignore[attr-defined]
_SHELL_STOPS = {"&&", "||", "|", ";", "&", ">", ">>", "2>&1"}


def option_names(command: click.Command) -> set[str]:
    return {name for param in command.params for name in getattr(param, "opts", [])} | {
        "-h",
        "--help",
    }


def test_every_command_has_help_and_every_option_a_description() -> None:
    assert main.help and "Exit codes" in main.help
    for name, command in COMMANDS.items():
        assert command.help and len(command.help) > 40, name
        assert command.short_help is None or command.short_help, name
        for param in command.params:
            if isinstance(param, click.Option):
                assert param.help, f"harvester {name} {param.opts[0]} has no help text"


@pytest.mark.parametrize(
    "args",
    [
        [],
        *([name] for name in ["harvest", "run", "status", "report", "verify", "sandbox", "serve"]),
    ],
)
def test_help_runs(args: list[str]) -> None:
    result = CliRunner().invoke(main, [*args, "--help"], prog_name="harvester")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("Usage: harvester")
    if not args:
        for name in COMMANDS:
            assert f"  {name} " in result.output  # every command listed with its summary


def test_the_commands_the_issue_asks_for_exist() -> None:
    assert {"harvest", "run", "status", "report", "verify", "sandbox"} <= set(COMMANDS)


def command_lines(text: str) -> list[str]:
    """Every ``harvester ...`` invocation in fenced code blocks and inline code spans."""
    lines: list[str] = []
    for block in re.findall(r"^```[a-z]*\n(.*?)^```", text, flags=re.S | re.M):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():  # join continued lines
            found = re.search(r"(?:^\$ |bin/|^)(?:[A-Z_]+=\S+ )*(harvester [a-z].*)$", line)
            if found and not line.lstrip().startswith("#"):
                lines.append(found.group(1))
    for span in re.findall(r"`([^`\n]+)`", text):
        found = re.search(r"(?:^|bin/)(harvester [a-z].*)$", span)
        if found:
            lines.append(found.group(1))
    return lines


def check_command_line(line: str) -> None:
    words = shlex.split(line, comments=True)
    if words[1] not in COMMANDS:
        raise AssertionError(f"{line!r}: no command {words[1]!r}")
    command = COMMANDS[words[1]]
    known = option_names(command)
    for word in words[2:]:
        if word in _SHELL_STOPS:
            break
        if re.fullmatch(r"-v+", word):
            word = "-v"
        if word.startswith("-") and word.split("=")[0] not in known:
            raise AssertionError(f"{line!r}: harvester {words[1]} has no option {word!r}")


def test_every_command_line_in_the_docs_exists() -> None:
    lines = command_lines(DOCS)
    assert len(lines) > 15
    for line in lines:
        check_command_line(line)
    shown = {line.split()[1] for line in lines}
    assert {"run", "status", "report", "harvest", "verify", "sandbox"} <= shown


@pytest.mark.parametrize("path", SHIPPED)
def test_every_command_line_in_the_shipped_job_files_exists(path: str) -> None:
    text = (REPO / path).read_text(encoding="utf-8")
    lines = [
        re.search(r"(harvester [a-z].*)$", line).group(1)  # type: ignore[union-attr]
        for line in text.splitlines()
        if re.search(r"(?:bin/|#   |^)harvester [a-z]", line)
    ]
    assert lines, path
    for line in lines:
        check_command_line(line.split("  #")[0])


def test_every_option_the_docs_name_exists() -> None:
    every = set().union(*(option_names(c) for c in COMMANDS.values()))
    named = re.findall(r"`(--?[a-z][a-z-]*)[ =`]", DOCS)
    assert len(set(named)) > 15
    missing = sorted({n for n in named if n not in every and not re.fullmatch(r"-v+", n)})
    assert not missing, f"the docs name options no command has: {missing}"


def test_the_checker_catches_a_wrong_line() -> None:
    with pytest.raises(AssertionError, match="no option '--rate'"):
        check_command_line("harvester run jobs/nightly.toml --rate 5")
    with pytest.raises(AssertionError, match="no command 'stats'"):
        check_command_line("harvester stats DIR")

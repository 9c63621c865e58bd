"""``make run``: start the sandbox, harvest CSV exports with the real CLI, look at the manifest.

python -m harvester.demo --out harvest-out sample_inputs/*.csv
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

import polars as pl

from harvester.sandbox import SandboxConfig, running_sandbox
from harvester.sandbox.images import missing_encoder_note
from harvester.storage import manifest
from harvester.terminal import terminal_width, wrap
from harvester.views.table import fit_table

DEMO_KEY = "sandbox-key"


def _table(frame: pl.DataFrame) -> None:
    """Print a table that fits the terminal; ids from the exports may hold control characters
    (messy.csv:14 rings the bell): they are escaped, as in every message that carries input
    data."""
    print(fit_table(frame))


def _show(out: Path) -> None:
    latest = manifest.latest(out)
    state = (
        latest.group_by("model", "request_id")
        .agg(pl.col("request_status").first(), pl.col("sha256").drop_nulls().len().alias("images"))
        .collect()
    )
    print("\nThe current state of every request (README: 'Reading the manifest'):")
    _table(
        state.group_by("request_status")
        .agg(pl.len().alias("requests"), pl.col("images").sum())
        .sort("request_status")
    )
    print("\nA few image rows:")
    _table(
        latest.filter(pl.col("path").is_not_null())
        .select("model", "seed", "has_nsfw_concept", "inference_seconds", "path")
        .head(5)
        .collect()
    )
    print("\nRows that are not ok, and why:")
    not_ok = latest.filter(pl.col("status") != "ok")
    _table(not_ok.select("request_id", "status", "error").collect())


def _shell_line(words: list[str]) -> str:
    """A command as it would be typed, continued with backslashes to fit the terminal."""
    room = terminal_width() - 2  # for " \\"
    lines = [words[0]]
    for word in (shlex.quote(w) for w in words[1:]):
        if len(lines[-1]) + 1 + len(word) > room:
            lines.append("    " + word)
        else:
            lines[-1] += " " + word
    return " \\\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("harvest-out"))
    parser.add_argument("inputs", nargs="+")
    args = parser.parse_args(argv)
    with running_sandbox(SandboxConfig(key=DEMO_KEY)) as sandbox:
        print(f"sandbox listening on {sandbox.base_url} (a fal-compatible API on 127.0.0.1)")
        if (note := missing_encoder_note()) is not None:
            print(note)
        command = [
            "harvester",
            "harvest",
            *args.inputs,
            "--out",
            str(args.out),
            "--base-url",
            sandbox.base_url,
        ]
        print(_shell_line([f"$ HARVESTER_API_KEY={DEMO_KEY}", *command]), flush=True)
        env = dict(os.environ, HARVESTER_API_KEY=DEMO_KEY)
        done = subprocess.run(  # noqa: S603 - this interpreter, fixed arguments
            [sys.executable, "-m", *command], env=env, check=False
        )
    print(f"(exit code {done.returncode}: 0 = all ok, 3 = some requests not ok, see README)")
    if done.returncode not in (0, 3):
        return done.returncode
    _show(args.out)
    print(
        "\n"
        + wrap(
            f"Try next: harvester status {args.out}; harvester report {args.out} "
            f"(or make report, for {args.out}/report.html); harvester verify {args.out}"
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

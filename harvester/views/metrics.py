"""A run's figures in the Prometheus text format, for node_exporter's textfile collector; and
that format's one writer (``exposition``), which ``harvester serve``'s ``/metrics`` uses too.

``harvester harvest --metrics-file /var/lib/node_exporter/textfile/harvester.prom`` rewrites the
file at the end of every run, atomically (a temp file in the same folder, then a rename), so
the collector never reads half a file. Every sample carries ``out`` (the output folder), so
several jobs can write files side by side. docs/metrics.md lists the names and an alert rule.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

from harvester.counters import Counters
from harvester.errors import OutputError
from harvester.statuses import STATUSES

LAST_SUCCESS: Final = "harvester_last_success_timestamp_seconds"
_PREVIOUS: Final = re.compile(rf"^{LAST_SUCCESS}(?:{{[^}}]*}})? ([0-9.eE+]+)$", re.M)


@dataclass(frozen=True, slots=True, kw_only=True)
class RunFigures:
    """What one run did, as the metrics report it."""

    out_dir: str
    exit_code: int
    started_at: float
    """Unix time."""
    finished_at: float
    counters: Counters = field(default_factory=Counters)


Labels = Mapping[str, str]
Sample = tuple[str, Labels, float]
"""A sample: the suffix of its family's name (``""``; ``_bucket``, ``_sum``, ``_count`` for
a histogram), its labels and its value."""


@dataclass(frozen=True, slots=True)
class Family:
    """One metric: its name, type, help line and samples."""

    name: str
    kind: Literal["counter", "gauge", "histogram"]
    help: str
    samples: Sequence[Sample]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


def exposition(families: Iterable[Family], *, labels: Labels | None = None) -> str:
    """Prometheus' text format of ``families``; ``labels`` are put first on every sample."""
    common = dict(labels or {})
    lines: list[str] = []
    for family in families:
        lines.append(f"# HELP {family.name} {family.help}")
        lines.append(f"# TYPE {family.name} {family.kind}")
        lines.extend(
            f"{family.name}{suffix}{_labels(common | dict(own))} {value}"
            for suffix, own, value in family.samples
        )
    return "\n".join(lines) + "\n"


def render(figures: RunFigures, *, last_success: float | None) -> str:
    """The exposition text; ``last_success`` is the Unix time of the last run that exited 0."""
    c = figures.counters
    families: list[Family] = []

    def metric(name: str, help_text: str, samples: list[tuple[Labels, float]]) -> None:
        families.append(Family(name, "gauge", help_text, [("", k, v) for k, v in samples]))

    metric(
        "harvester_run_requests",
        "Requests the last run finished, by final status.",
        [({"status": s}, c.requests[s]) for s in STATUSES],  # zeros too
    )
    metric(
        "harvester_run_skipped_requests",
        "Requests the last run skipped because an earlier run had them ok.",
        [({}, c.skipped)],
    )
    metric(
        "harvester_run_images",
        "Images of the last run: new in the store, already stored, or failed.",
        [
            ({"outcome": "new"}, c.images_new),
            ({"outcome": "existing"}, c.images_existing),
            ({"outcome": "failed"}, c.images_failed),
        ],
    )
    metric(
        "harvester_run_downloaded_bytes",
        "Image bytes the last run downloaded.",
        [({}, c.bytes_downloaded)],
    )
    metric(
        "harvester_run_stored_bytes",
        "Image bytes the last run added to the store (new files only).",
        [({}, c.bytes_new)],
    )
    metric(
        "harvester_run_rate_limited_responses",
        "429 answers the last run received.",
        [({}, c.throttled)],
    )
    metric("harvester_run_retries", "Retries in the last run.", [({}, c.retries)])
    metric(
        "harvester_run_duration_seconds",
        "How long the last run took.",
        [({}, round(figures.finished_at - figures.started_at, 3))],
    )
    metric(
        "harvester_run_exit_code",
        "The last run's exit code (0 all ok, 3 some requests not ok; see harvester --help).",
        [({}, figures.exit_code)],
    )
    metric(
        "harvester_run_end_timestamp_seconds",
        "When the last run ended, in Unix time.",
        [({}, round(figures.finished_at, 3))],
    )
    if last_success is not None:
        metric(
            LAST_SUCCESS,
            "When a run last exited 0 (every request ok), in Unix time.",
            [({}, round(last_success, 3))],
        )
    return exposition(families, labels={"out": figures.out_dir})


def previous_success(path: Path) -> float | None:
    """The last-success time the file at ``path`` holds (from an earlier run), if any."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    match = _PREVIOUS.search(text)
    return float(match.group(1)) if match else None


def write_metrics(path: Path, figures: RunFigures) -> None:
    """Replace ``path`` with the run's metrics, atomically; ``OutputError`` if it cannot."""
    last = figures.finished_at if figures.exit_code == 0 else previous_success(path)
    text = render(figures, last_success=last)
    folder = path.parent
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise OutputError(f"cannot write metrics file {path}: {exc.strerror or exc}") from exc
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)  # the collector runs as another user
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise OutputError(f"cannot write metrics file {path}: {exc.strerror or exc}") from exc


def check_writable(path: Path) -> None:
    """Before a run: ``OutputError`` if the metrics file's folder is missing or not writable."""
    folder = path.parent
    if path.is_dir():
        raise OutputError(f"--metrics-file {path} is a folder; name a file in it")
    if not folder.is_dir():
        raise OutputError(f"--metrics-file: folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK):
        raise OutputError(f"--metrics-file: folder {folder} is not writable by this user")

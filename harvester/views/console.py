"""How a run shows itself: on a terminal, in cron mail, and to a log aggregator.

    terminal (text)  a start line, then a live progress bar on stderr with warnings printed
                     above it, the summary on stdout
    not a terminal   a start line, a progress line every few minutes, the summary: cron mail
                     stays a handful of lines; a flood of one warning is cut after 20
    --log-format json  every line on stderr is one JSON object with ts, level, run_id,
                     logger, message and the event's fields; nothing goes to stdout

The API key is masked in every line the handler writes, whatever the message or its fields.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, Protocol, TextIO

from harvester.defaults import LOG_FORMATS
from harvester.errors import HarvesterError
from harvester.redact import printable, redact, secret_parts
from harvester.statuses import EXPIRED, INVALID
from harvester.storage.runs import RunRecord
from harvester.terminal import log_line, wrap
from harvester.units import duration, plural, size

PROGRESS_EVERY: Final = 300.0
"""Seconds between progress lines when not on a terminal."""
FLOOD_LIMIT: Final = 20
"""Lines of one kind of warning shown before the rest are cut (text output, below -v)."""

progress_log = logging.getLogger("harvester.progress")
"""The start and progress lines: shown by default, hidden by -q."""
summary_log = logging.getLogger("harvester.summary")
"""The end-of-run summary in JSON output: always shown."""

_RECORD_ATTRS: Final = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class Run(Protocol):
    """What the console reads of a harvest (``harvester.run.stats.RunStats`` is one)."""

    @property
    def out_dir(self) -> Path | str: ...

    def record(self, *, running: bool = False) -> RunRecord:
        """The run record: while it runs (``running``), or at the end."""
        ...

    def summary(self) -> str:
        """The end-of-run summary."""
        ...


@dataclass(frozen=True, slots=True, kw_only=True)
class Snapshot:
    """Where a run stands, for progress lines."""

    done: int
    total: int
    images: int
    bytes: int
    rate: float
    """Requests fetched per second (rows recorded without a request are not counted)."""
    eta: float | None
    throttled: int = 0
    retries: int = 0
    waiting: int = 0
    """Requests waiting for a pending result; when they are all that is left, the line says
    so instead of a falling rate and an ETA of 0s."""
    waiting_until: float | None = None

    @classmethod
    def of(cls, record: RunRecord) -> Snapshot:
        c = record.counters
        done = c.done
        total = max(record.rows_in_input - c.skipped - c.duplicates, done)
        # Rows recorded without a request (invalid, expired) are done at once: not a rate.
        fetched = done - c.requests[INVALID] - c.requests[EXPIRED]
        rate = fetched / max(record.elapsed_seconds, 1e-9)
        eta = (total - done) / rate if rate > 0 else None
        return cls(
            done=done,
            total=total,
            images=c.images_new + c.images_existing,
            bytes=c.bytes_downloaded,
            rate=rate,
            eta=eta,
            throttled=c.throttled,
            retries=c.retries,
            waiting=c.waiting,
            waiting_until=c.waiting_until or None,
        )

    @property
    def only_waiting(self) -> bool:
        return 0 < self.total - self.done <= self.waiting

    def fields(self) -> dict[str, object]:
        return {
            "done": self.done,
            "total": self.total,
            "images": self.images,
            "bytes": self.bytes,
            "rate": round(self.rate, 2),
            "eta_seconds": None if self.eta is None or self.only_waiting else round(self.eta),
            "rate_limited": self.throttled,
            "retries": self.retries,
            "waiting_pending": self.waiting,
        }

    def tail(self) -> str:
        """The part that is never cut: the rate and ETA, or what the run is waiting for."""
        if self.only_waiting:
            until = ""
            if self.waiting_until is not None:
                until = " until " + datetime.fromtimestamp(self.waiting_until).strftime("%H:%M")
            return f"waiting on {self.waiting:,} pending{until}"
        eta = "--" if self.eta is None else duration(self.eta)
        return f"{self.rate:,.1f}/s  ETA {eta}"

    def parts(self) -> tuple[str, list[str], list[str]]:
        """``(counts, trouble, extras)``: what the line shows besides ``tail``, most needed
        first (trouble is the 429s and retries so far, shown as they happen)."""
        counts = f"{self.done:,}/{plural(self.total, 'request')}"
        trouble = []
        if self.throttled:
            trouble.append(f"{self.throttled:,} x 429")
        if self.retries:
            trouble.append(plural(self.retries, "retry", "retries"))
        extras = [plural(self.images, "image"), size(self.bytes)]
        return counts, trouble, extras

    def text(self) -> str:
        counts, trouble, extras = self.parts()
        return "  ".join([counts, *extras, *trouble, self.tail()])

    def line(self, columns: int, *, bar_width: int = 24) -> str:
        """The progress bar's line in at most ``columns - 1`` characters: the bar narrows and
        the extras go before the tail (rate and ETA, or the wait) is ever cut."""
        counts, trouble, extras = self.parts()
        tail = self.tail()
        room = max(columns - 1, 1)

        def bar(width: int) -> str:
            filled = min(width, width * self.done // max(self.total, 1))
            return "[" + "#" * filled + "-" * (width - filled) + "] "

        for head, pieces in (
            (bar(bar_width), [counts, *extras, *trouble, tail]),
            (bar(10), [counts, *extras, *trouble, tail]),
            (bar(10), [counts, *trouble, tail]),
            ("", [counts, *trouble, tail]),
            ("", [counts, tail]),
            ("", [tail]),
        ):
            candidate = head + "  ".join(pieces)
            if len(candidate) <= room:
                return candidate
        return tail[:room]


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, run_id, logger, message, then any fields given
    with ``extra=``."""

    def __init__(self, run_id: str | None) -> None:
        super().__init__()
        self.run_id = run_id

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "run_id": self.run_id,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name, value in vars(record).items():
            if name not in _RECORD_ATTRS and not name.startswith("_"):
                line[name] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


class _FloodGate(logging.Filter):
    """Lets the first ``limit`` warnings of each kind (same format string) through, then one
    notice; errors always pass."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.seen: Counter[object] = Counter()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        self.seen[record.msg] += 1
        count = self.seen[record.msg]
        if count == self.limit + 1:
            record.msg = "(further warnings like the one above are not shown; -v shows them all)"
            record.args = None
        return count <= self.limit + 1


class TerminalFormatter(logging.Formatter):
    """A log line for people at a terminal: ``HH:MM:SS LEVEL message``, wrapped to the
    terminal's width (never cut), continuations indented; a traceback follows as it is."""

    def format(self, record: logging.LogRecord) -> str:
        return log_line(record)


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]  # generic only in typeshed
    """Masks secrets in the finished line and clears the progress bar before writing."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self.secrets: list[str] = []
        self.bar: Progress | None = None

    def format(self, record: logging.LogRecord) -> str:
        # The message may carry input data (file names, ids, an API's words): its control
        # characters are escaped here, for every line; a traceback keeps its line breaks.
        # Secrets are masked before a terminal's line is wrapped, and again after.
        message = record.getMessage()
        safe = redact(printable(message), self.secrets)
        if safe != message:
            record = logging.makeLogRecord({**vars(record), "msg": safe, "args": None})
        return redact(super().format(record), self.secrets)

    def emit(self, record: logging.LogRecord) -> None:
        if self.bar is not None:
            self.bar.clear()
        super().emit(record)


def setup_logging(
    verbosity: int,
    *,
    secrets: list[str],
    log_format: str = "text",
    run_id: str | None = None,
    stream: TextIO | None = None,
    terminal: bool = False,
) -> _Handler:
    """Route every log line through one handler on ``stream`` (default stderr).

    ``log_format`` is one of ``LOG_FORMATS``; text lines on a ``terminal`` are short
    (``TerminalFormatter``), elsewhere they carry the date and the logger's name. Verbosity
    -1 (-q): errors only; 0: warnings, start and progress lines; 1 (-v): info; 2 (-vv): debug,
    httpx's request lines included. Returns the handler it installed."""
    level = {-1: logging.ERROR, 0: logging.WARNING, 1: logging.INFO}.get(verbosity, logging.DEBUG)
    handler = _Handler(stream or sys.stderr)
    handler.secrets = [s for s in secrets if s]
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log_format must be one of {LOG_FORMATS}, not {log_format!r}")
    if log_format == "json":
        handler.setFormatter(JsonFormatter(run_id))
    elif terminal:
        handler.setFormatter(TerminalFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        if verbosity <= 0:
            handler.addFilter(_FloodGate(FLOOD_LIMIT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    progress_log.setLevel(logging.WARNING if verbosity < 0 else logging.INFO)
    summary_log.setLevel(logging.INFO)
    # httpx logs each request line at INFO: shown from -vv on. httpcore's DEBUG lines carry
    # headers, and asyncio's are noise: never shown.
    logging.getLogger("httpx").setLevel(logging.INFO if verbosity >= 2 else logging.WARNING)
    for name in ("httpcore", "asyncio"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return handler


class Progress:
    """A one-line live progress bar for terminals."""

    WIDTH: Final = 24

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._drawn = False

    def tick(self, snapshot: Snapshot) -> None:
        columns = shutil.get_terminal_size((100, 24)).columns
        line = snapshot.line(columns, bar_width=self.WIDTH)
        self._stream.write("\r\x1b[K" + line)
        self._stream.flush()
        self._drawn = True

    def clear(self) -> None:
        if self._drawn:
            self._stream.write("\r\x1b[K")
            self._stream.flush()
            self._drawn = False


class Console:
    """Everything the CLI shows about one run, chosen by where it runs.

    Pass ``started`` and ``tick`` to ``harvest(on_start=, on_tick=)``, then call ``finished``
    with the stats, or ``failed`` with a run-level error.
    """

    def __init__(
        self,
        *,
        log_format: str,
        verbosity: int,
        run_id: str | None = None,
        stream: TextIO | None = None,
        out: TextIO | None = None,
        interactive: bool | None = None,
        every: float = PROGRESS_EVERY,
    ) -> None:
        self.json = log_format == "json"
        self.stream = stream or sys.stderr
        self.out = out or sys.stdout
        if interactive is None:
            interactive = self.stream.isatty()
        self.handler = setup_logging(
            verbosity,
            secrets=[],
            log_format=log_format,
            run_id=run_id,
            stream=self.stream,
            terminal=interactive,
        )
        self.interactive = interactive
        self.bar: Progress | None = None
        if interactive and not self.json and verbosity >= 0:
            self.bar = self.handler.bar = Progress(self.stream)
        self.every = every
        self._next_line = 0.0

    def redact(self, secret: str) -> None:
        """Mask ``secret`` in every line from now on."""
        self.handler.secrets.extend(secret_parts(secret))

    def started(self, run: Run) -> None:
        record = run.record(running=True)
        progress_log.info(
            "run %s started: %s in %s, into %s",
            record.run_id,
            plural(record.rows_in_input, "row"),
            plural(len(record.inputs), "input file"),
            run.out_dir,
            extra={
                "event": "started",
                "out_dir": str(run.out_dir),
                "rows_in_input": record.rows_in_input,
                "inputs": [{"path": f.path, "sha256": f.sha256} for f in record.inputs],
            },
        )
        self._next_line = time.monotonic() + self.every

    def tick(self, run: Run) -> None:
        if self.bar is not None:
            self.bar.tick(Snapshot.of(run.record(running=True)))
            return
        if time.monotonic() < self._next_line:
            return
        self._next_line = time.monotonic() + self.every
        snap = Snapshot.of(run.record(running=True))
        progress_log.info("progress: %s", snap.text(), extra={"event": "progress", **snap.fields()})

    def finished(self, run: Run) -> None:
        self._clear()
        if self.json:
            record = run.record()
            level = logging.INFO if record.exit_code == 0 else logging.WARNING
            summary_log.log(
                level,
                "run %s finished: exit %d",
                record.run_id,
                record.exit_code,
                extra={"event": "finished", **record.to_json()},
            )
        else:
            summary = redact(printable(run.summary(), newlines=True), self.handler.secrets)
            print(summary, file=self.out, flush=True)

    def failed(self, exc: HarvesterError) -> None:
        self._clear()
        if self.json:
            logging.getLogger("harvester").error(
                "%s", exc, extra={"event": "error", "exit_code": int(exc.exit_code)}
            )
        else:
            message = redact(printable(f"harvester: error: {exc}"), self.handler.secrets)
            if self.interactive:  # wrapped to the terminal, never cut
                message = wrap(message)
            print(message, file=self.stream, flush=True)

    def _clear(self) -> None:
        if self.bar is not None:
            self.bar.clear()

"""How a run shows itself on a terminal, in cron mail and in logs (CLI side only)."""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

from harvester.pipeline import RunStats


class RedactingFilter(logging.Filter):
    """Replaces the API key with ``***`` in every record: a second line of defence, since
    no code path formats the key into a message in the first place."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self._secrets = [s for s in secrets if s]

    def filter(self, record: logging.LogRecord) -> bool:
        if self._secrets:
            message = record.getMessage()
            redacted = message
            for secret in self._secrets:
                redacted = redacted.replace(secret, "***")
            if redacted != message:
                record.msg, record.args = redacted, None
        return True


def setup_logging(verbosity: int, *, secrets: list[str], stream: TextIO | None = None) -> None:
    """-q: errors only; default: warnings; -v: info; -vv: debug (httpx's own lines included)."""
    level = {-1: logging.ERROR, 0: logging.WARNING, 1: logging.INFO}.get(verbosity, logging.DEBUG)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter(secrets))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    if verbosity < 2:
        # httpx logs every request at INFO; that is noise below -vv.
        logging.getLogger("httpx").setLevel(logging.WARNING)
        logging.getLogger("httpcore").setLevel(logging.WARNING)


class Progress:
    """A one-line live progress display for terminals; silent elsewhere (cron mail stays short)."""

    def __init__(self, stream: TextIO, *, enabled: bool) -> None:
        self._stream = stream
        self._enabled = enabled
        self._drawn = False
        self._t0 = time.monotonic()

    def tick(self, stats: RunStats) -> None:
        if not self._enabled:
            return
        total = max(stats.rows_in_input, 1)
        done = stats.done
        elapsed = max(time.monotonic() - self._t0, 1e-9)
        rate = done / elapsed
        remaining = max(total - done - stats.skipped_done, 0)
        eta = f"{remaining / rate:,.0f}s" if rate > 0 and remaining else "--"
        width = 24
        filled = min(width, int(width * done / total))
        bar = "#" * filled + "-" * (width - filled)
        line = (
            f"\r[{bar}] {done:,}/{stats.rows_in_input:,} requests  "
            f"{stats.images_new + stats.images_existing:,} images  {rate:,.1f}/s  ETA {eta}  "
        )
        self._stream.write(line)
        self._stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self._enabled and self._drawn:
            self._stream.write("\n")
            self._stream.flush()

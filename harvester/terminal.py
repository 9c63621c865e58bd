"""What fits a terminal: its width (80 columns when unknown, as in a pipe or cron mail), the
columns a text takes, cutting with an ellipsis, wrapping that never cuts, and the short log
line people see at a terminal. Both the views and the shards' processes use it.

Widths count what a terminal shows: East Asian wide characters take two columns, combining
marks none.
"""

from __future__ import annotations

import logging
import shutil
import textwrap
import time
import unicodedata
from typing import Final

DEFAULT_COLUMNS: Final = 80
"""The width assumed when the output is not a terminal (a pipe, a file, cron mail)."""
ELLIPSIS: Final = "…"
CONTINUATION: Final = "    "
"""How a wrapped log line's continuations are indented."""


def terminal_width() -> int:
    """The terminal's columns: ``COLUMNS`` if set, else the terminal's own, else 80."""
    return shutil.get_terminal_size((DEFAULT_COLUMNS, 24)).columns


def display_width(text: str) -> int:
    """Columns ``text`` takes on a terminal."""
    return sum(_char_width(c) for c in text)


def _char_width(char: str) -> int:
    if unicodedata.combining(char) or unicodedata.category(char) == "Cf":
        return 0
    return 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1


def cut(text: str, width: int) -> str:
    """``text`` in at most ``width`` columns; ``…`` ends it if anything was cut."""
    if display_width(text) <= width:
        return text
    kept, used = [], 0
    for char in text:
        w = _char_width(char)
        if used + w > width - 1:
            break
        kept.append(char)
        used += w
    return "".join(kept) + ELLIPSIS if width > 0 else ""


def wrap(text: str, *, width: int | None = None, indent: str = "  ") -> str:
    """``text`` wrapped to ``width`` columns (default: the terminal's), never cut: each of its
    lines wraps on its own, continuations indented by ``indent``; a word longer than a line
    is broken."""
    width = terminal_width() if width is None else width
    wrapped = []
    for line in text.split("\n"):
        lead = line[: len(line) - len(line.lstrip(" "))]
        wrapped.append(
            textwrap.fill(
                line,
                width=max(width, len(lead + indent) + 10),
                subsequent_indent=lead + indent,
                break_on_hyphens=False,
            )
            or line
        )
    return "\n".join(wrapped)


def log_line(record: logging.LogRecord, *, width: int | None = None) -> str:
    """A log record for people at a terminal: ``HH:MM:SS LEVEL message``, wrapped to ``width``
    (default: the terminal's), never cut; a traceback follows as it is."""
    stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
    text = wrap(
        f"{stamp} {record.levelname} {record.getMessage()}", width=width, indent=CONTINUATION
    )
    if record.exc_info:
        text += "\n" + logging.Formatter().formatException(record.exc_info)
    return text

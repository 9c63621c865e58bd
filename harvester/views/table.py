"""Tables that fit the terminal: every table the CLI prints goes through ``fit_table``, so
none is wider than the terminal (80 columns when it is unknown, as in a pipe or cron mail).

Cells are cut with ``…`` (the widest columns first) rather than wrapped, so a row stays one
line; control characters in a cell are escaped *before* widths are measured, so an id that
rings the bell cannot push its row out of line.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

from harvester.redact import printable
from harvester.terminal import cut, display_width, terminal_width

if TYPE_CHECKING:
    import polars as pl

GAP: Final = "  "
"""Between two columns."""


def _safe(text: str) -> str:
    """``text`` on one line of a table: control characters, tab and line feed included,
    escaped (``\\x07``)."""
    return printable(text).replace("\t", "\\x09")


def _cell(value: object, *, floats: int) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{floats}f}"
    return _safe(str(value))


def _column_widths(natural: Sequence[int], room: int) -> list[int]:
    """Each column's width: its natural width, the widest ones cut to one cap so that all fit
    in ``room`` (what the cap leaves over goes to the first cut columns)."""
    if sum(natural) <= room:
        return list(natural)
    cap = max(room // max(len(natural), 1), 1)
    while cap < max(natural) and sum(min(w, cap + 1) for w in natural) <= room:
        cap += 1
    widths = [min(w, cap) for w in natural]
    spare = room - sum(widths)
    for i, w in enumerate(natural):
        if spare <= 0:
            break
        if w > widths[i]:
            extra = min(spare, w - widths[i])
            widths[i] += extra
            spare -= extra
    return widths


def fit_table(frame: pl.DataFrame, *, width: int | None = None, floats: int = 3) -> str:
    """``frame`` as a plain text table no wider than ``width`` columns (default: the
    terminal's): a header, a rule, one line per row; numbers right-aligned, ``floats``
    decimals, nulls blank. When the table is too wide, headers first wrap at their ``_``
    (``new_images`` over two lines), then the widest cells are cut."""
    width = terminal_width() if width is None else width
    numeric = [dtype.is_numeric() for dtype in frame.schema.values()]
    header = [_safe(name) for name in frame.columns]
    rows = [[_cell(v, floats=floats) for v in row] for row in frame.iter_rows()]
    cells = [max((display_width(r[i]) for r in rows), default=0) for i in range(len(header))]
    room = width - len(GAP) * (len(header) - 1)
    natural = [max(display_width(h), c) for h, c in zip(header, cells, strict=True)]
    heads = [[h] for h in header]
    if sum(natural) > room:  # wrap the headers at their underscores
        heads = [_header_lines(h) for h in header]
        natural = [
            max([c, *(display_width(part) for part in head)])
            for head, c in zip(heads, cells, strict=True)
        ]
    widths = _column_widths(natural, room)

    def line(texts: Sequence[str]) -> str:
        out = []
        for text, w, right in zip(texts, widths, numeric, strict=True):
            text = cut(text, w)
            pad = " " * (w - display_width(text))
            out.append(pad + text if right else text + pad)
        return GAP.join(out).rstrip()

    depth = max((len(head) for head in heads), default=1)
    lines = [line([head[k] if k < len(head) else "" for head in heads]) for k in range(depth)]
    lines.append(GAP.join("-" * w for w in widths))
    lines += [line(r) for r in rows]
    return "\n".join(lines)


def _header_lines(name: str) -> list[str]:
    """A column name as lines of at most two parts split at ``_``: ``new_images`` ->
    ``new_``, ``images``."""
    parts = name.split("_")
    if len(parts) == 1:
        return [name]
    best = min(
        range(1, len(parts)), key=lambda k: max(len("_".join(parts[:k])), len("_".join(parts[k:])))
    )
    return ["_".join(parts[:best]) + "_", "_".join(parts[best:])]

"""A ``Report`` as one self-contained HTML page: opens from disk, fetches nothing.

Inline CSS, SVG charts drawn here (no script at all), and a gallery of the latest run's images
embedded as ``data:`` URIs, with NSFW-flagged ones blurred (focus or click one to reveal it).
With Pillow (the ``thumbnails`` extra) each image is a thumbnail of a few hundred pixels, so
a gallery of real 1-4 MB results stays a page of a few MB; without it the stored files are
embedded as they are, capped (``GalleryLimits``), and the page says how to get thumbnails.
An image over a cap, or that cannot be decoded, gets a labelled placeholder instead. Every
string from the manifest is HTML-escaped: model names and prompts come from outside.

The page reads on a phone (tests/test_report_browser.py checks it at 390 and 1280 px): tables
and charts wider than the screen scroll in their own box, never the page, so chart text keeps
its size; the legend wraps; the gallery shows three images a row.
"""

from __future__ import annotations

import base64
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from html import escape
from pathlib import Path, PurePosixPath
from typing import Any, Final

import polars as pl

from harvester import statuses
from harvester.errors import MEANINGS, OutputError
from harvester.storage.objects import Store
from harvester.units import size
from harvester.views import thumbnails
from harvester.views.report import RUNS_SHOWN, Report, display_runs

MEDIA_TYPES: Final = {
    "png": "image/png",
    "jpg": "image/jpeg",
    "gif": "image/gif",
    "webp": "image/webp",
    "avif": "image/avif",
    "bmp": "image/bmp",
}
"""Stored extensions a browser shows; others (tiff, heic) get a placeholder."""
STATUS_COLOURS: Final = {
    statuses.OK: "#2e9d5b",
    statuses.PENDING: "#e0a82e",
    statuses.NOT_FOUND: "#9aa3ad",
    statuses.FAILED: "#d64545",
    statuses.ERROR: "#8c1c13",
    statuses.INVALID: "#7d5ba6",
    statuses.EXPIRED: "#5b6470",
}
PROMPT_CHARS: Final = 1_000
"""A tile's caption shows this much of the prompt (20 MB prompts made a 210 MB page)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class GalleryLimits:
    images: int = 48
    """Images embedded at most."""
    image_bytes: int = 2_000_000
    """Without thumbnails: a larger image gets a placeholder (files are embedded unscaled)."""
    total_bytes: int = 40_000_000
    """Embedding stops once this many image bytes are in the page."""
    use_thumbnails: bool | None = None
    """Embed thumbnails (needs Pillow); None: when Pillow is installed."""
    thumbnail_pixels: int = thumbnails.THUMBNAIL_PIXELS


@dataclass(frozen=True, slots=True)
class HtmlWritten:
    path: Path
    bytes: int
    images_embedded: int
    images_placeholder: int
    thumbnails: bool
    """True if the gallery holds thumbnails, False if the stored files themselves."""


def write_html(report: Report, path: Path, *, limits: GalleryLimits | None = None) -> HtmlWritten:
    """Render ``report`` into ``path`` (written atomically). Raises ``OutputError``."""
    limits = limits or GalleryLimits()
    page, embedded, placeholders = render(report, limits=limits)
    data = page.encode("utf-8")
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from exc
    return HtmlWritten(path, len(data), embedded, placeholders, _use_thumbnails(limits))


def _use_thumbnails(limits: GalleryLimits) -> bool:
    wanted = limits.use_thumbnails
    return thumbnails.available() if wanted is None else wanted


def render(report: Report, *, limits: GalleryLimits) -> tuple[str, int, int]:
    """The page, and how many gallery images were embedded / replaced by placeholders."""
    gallery, embedded, placeholders = _gallery(report, limits)
    body = "\n".join(
        [
            _header(report),
            _status_section(report.by_status),
            _nsfw_section(report.nsfw),
            _inference_section(report.inference),
            _runs_section(report.runs),
            gallery,
            "<footer>Made by <code>harvester report</code>. Tables describe the latest state "
            "of each request (its rows from its most recent run); the per-run table counts "
            "every run's own rows.</footer>",
        ]
    )
    title = f"harvester report: {report.out_dir}"
    page = (
        f'<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f"{body}\n</body>\n</html>\n"
    )
    return page, embedded, placeholders


def _header(report: Report) -> str:
    by_status = report.by_status
    requests = report.requests
    ok = int(by_status[statuses.OK].sum()) if by_status.height else 0
    images = int(report.nsfw["images"].sum()) if report.nsfw.height else 0
    flagged = int(report.nsfw["flagged"].sum()) if report.nsfw.height else 0
    stored = report.runs["new_bytes"].sum() if report.runs.height else 0
    cards = [
        (f"{requests:,}", "requests"),
        (f"{ok / requests:.1%}" if requests else "-", "ok"),
        (f"{images:,}", "images stored"),
        (size(int(stored or 0)), "on disk"),
        (f"{flagged / images:.1%}" if images else "-", "NSFW-flagged"),
        (f"{report.runs.height:,}", "runs"),
    ]
    last = report.runs.row(-1, named=True) if report.runs.height else None
    last_line = ""
    if last is not None:
        code = last["exit_code"]
        meaning = (
            MEANINGS.get(code, "unknown exit code")
            if code is not None
            else "no exit code: running or serving, or no run record"
        )
        last_line = (
            f"<p class=meta>Latest run <code>{escape(last['run_id'])}</code>: "
            f"exit {'?' if code is None else code} ({escape(meaning)})</p>"
        )
    return (
        f"<header><h1>harvester report</h1>"
        f"<p class=meta><code>{escape(str(report.out_dir))}</code> · generated "
        f"{report.generated_at:%Y-%m-%d %H:%M} UTC</p>{last_line}"
        f'<div class="cards">'
        + "".join(f"<div class=card><b>{v}</b><span>{escape(k)}</span></div>" for v, k in cards)
        + "</div></header>"
    )


def _status_section(by_status: pl.DataFrame) -> str:
    rows = [
        (
            str(r["model"]),
            [(s, float(r[s]), STATUS_COLOURS[s]) for s in statuses.STATUSES],
            f"{r['total']:,}",
        )
        for r in by_status.iter_rows(named=True)
    ]
    chart = _bars(rows)
    legend = "".join(
        f'<span><i style="background:{STATUS_COLOURS[s]}"></i>{s}</span>' for s in statuses.STATUSES
    )
    return _section(
        "status",
        "Requests by status and model",
        "Latest state of every request; <code>ok</code> means every image is stored.",
        f'<div class="legend">{legend}</div>{chart}',
        _table(by_status),
    )


def _nsfw_section(nsfw: pl.DataFrame) -> str:
    rows = [
        (
            str(r["model"]),
            [("NSFW-flagged", float(r["rate"] or 0), "#c2410c")],
            f"{r['rate'] or 0:.1%} of {r['images']:,}",
        )
        for r in nsfw.iter_rows(named=True)
    ]
    chart = _bars(rows)
    shown = nsfw.with_columns(pl.format("{}%", (pl.col("rate") * 100).round(1)).alias("rate"))
    return _section(
        "nsfw",
        "NSFW rate per model",
        "Share of stored images the API flagged (<code>has_nsfw_concepts</code>); images "
        "without a flag are counted as <i>unknown</i> and left out of the rate.",
        chart,
        _table(shown),
    )


def _inference_section(inference: pl.DataFrame) -> str:
    rows = []
    for r in inference.iter_rows(named=True):
        p50, p90, p99 = (float(r[k] or 0) for k in ("p50", "p90", "p99"))
        segments = [
            ("p50", p50, "#1d4ed8"),
            ("p50 to p90", max(p90 - p50, 0), "#60a5fa"),
            ("p90 to p99", max(p99 - p90, 0), "#bfdbfe"),
        ]
        rows.append((str(r["model"]), segments, f"{p50:.2f} / {p90:.2f} / {p99:.2f} s"))
    chart = _bars(rows, value_width=150)
    return _section(
        "inference",
        "Inference time per model",
        "Seconds the model ran (<code>timings.inference</code>), one value per request. "
        "Dark: up to the median (p50); lighter: to p90; lightest: to p99.",
        chart,
        _table(inference, floats=3),
    )


def _runs_section(runs: pl.DataFrame) -> str:
    recent = runs.tail(RUNS_SHOWN)
    rows = list(recent.iter_rows(named=True))
    images = [(str(r["run_id"]), float(r["new_images"] or 0)) for r in rows]
    stored = [(str(r["run_id"]), float(r["new_bytes"] or 0)) for r in rows]
    shown = (
        f"The {RUNS_SHOWN} most recent of {runs.height:,} runs"
        if runs.height > RUNS_SHOWN
        else ("1 run" if runs.height == 1 else f"All {runs.height:,} runs")
    )
    charts = (
        '<div class="charts">'
        f"<div><h3>New images</h3>{_columns(images, unit=lambda v: f'{v:,.0f}')}</div>"
        f"<div><h3>New bytes on disk</h3>{_columns(stored, unit=lambda v: size(int(v)))}</div>"
        "</div>"
    )
    return _section(
        "runs",
        "Images and bytes per run",
        f"{shown}; the table lists the newest first. Charts: images a run stored that were not "
        "on disk before, and their bytes, under the run's start (UTC), oldest on the left; "
        "hover for the run's id. <code>images</code> in the table also counts identical "
        "bytes already stored.",
        charts,
        _table(display_runs(runs)),
    )


def _gallery(report: Report, limits: GalleryLimits) -> tuple[str, int, int]:
    if report.gallery_run is None:
        return _section("gallery", "Gallery", "No run has stored an image yet.", "", ""), 0, 0
    tiles: list[str] = []
    embedded = placeholders = total = 0
    read = _image_reader(report.store)
    thumbs = _use_thumbnails(limits)
    for row in report.gallery.head(limits.images).iter_rows(named=True):
        ext = PurePosixPath(row["path"]).suffix.lstrip(".").lower()
        reason = None
        data = None
        if thumbs:
            if (row["bytes"] or 0) > MAX_THUMBNAIL_SOURCE:
                reason = f"{size(row['bytes'])}: too large to read for a thumbnail"
            else:
                try:
                    data = thumbnails.thumbnail(read(row["path"]), pixels=limits.thumbnail_pixels)
                except (thumbnails.ThumbnailError, _Unreadable) as exc:
                    reason = str(exc)
            if data is not None and total + len(data) > limits.total_bytes:
                data, reason = None, "page size limit reached"
            ext = "jpg"
        else:
            if ext not in MEDIA_TYPES:
                reason = f".{ext} files are not shown by browsers"
            elif (row["bytes"] or 0) > limits.image_bytes:
                reason = f"{size(row['bytes'])}: too large to embed without thumbnails"
            elif total + (row["bytes"] or 0) > limits.total_bytes:
                reason = "page size limit reached"
            if reason is None:
                try:
                    data = read(row["path"])
                except _Unreadable as exc:
                    reason = str(exc)
        tiles.append(_tile(row, ext, data, reason))
        if data is None:
            placeholders += 1
        else:
            embedded += 1
            total += len(data)
    shown = len(tiles)
    how = (
        f"Thumbnails of at most {limits.thumbnail_pixels} pixels a side. "
        if thumbs
        else "The stored files themselves, each up to "
        f"{size(limits.image_bytes)}: for thumbnails, which keep the page small whatever the "
        f"images weigh, <code>{escape(thumbnails.INSTALL_HINT)}</code>. "
    )
    intro = (
        f"Run <code>{escape(report.gallery_run)}</code>, the latest that stored images: "
        f"{shown:,} of its {report.gallery_total:,} images. {how}NSFW-flagged images are "
        "blurred; click one (or focus it with Tab) to reveal it."
    )
    return (
        _section("gallery", "Gallery", intro, f'<div class="grid">{"".join(tiles)}</div>', ""),
        embedded,
        placeholders,
    )


MAX_THUMBNAIL_SOURCE: Final = 64 * 1024 * 1024
"""Bytes of a stored image read to make its thumbnail, at most (``--max-image-bytes``'s
default)."""


class _Unreadable(Exception):
    """Why an image's bytes are not in the page (its tile says so)."""


def _image_reader(store: Store) -> Callable[[str], bytes]:
    """How the gallery reads a stored image by its manifest path: from the store, which
    never reads outside its location (a link under images/, or a path in the manifest, must
    not put another file's bytes in the page)."""

    def read(rel: str) -> bytes:
        try:
            return store.get(rel)
        except OutputError as exc:
            raise _Unreadable(f"cannot read: {exc}") from exc

    return read


def _caption(prompt: str | None) -> str:
    text = prompt or ""
    if len(text) > PROMPT_CHARS:
        text = text[:PROMPT_CHARS] + f"… ({len(text):,} characters)"
    return escape(text)


def _tile(row: dict[str, Any], ext: str, data: bytes | None, reason: str | None) -> str:
    nsfw = row["has_nsfw_concept"] is True
    label = f"{row['model']} · {row['request_id']} #{row['image_index']}"
    if data is not None:
        uri = f"data:{MEDIA_TYPES[ext]};base64,{base64.b64encode(data).decode('ascii')}"
        picture = f'<div class="pic"><img src="{uri}" alt="{escape(label)}"></div>'
    else:
        picture = (
            f'<div class="pic placeholder">{escape(reason or "")}'
            f"<code>{escape(str(row['path']))}</code></div>"
        )
    badge = '<span class="badge">NSFW</span>' if nsfw else ""
    size_text = f"{row['width']}×{row['height']} · " if row["width"] and row["height"] else ""
    return (
        f'<figure class="tile{" nsfw" if nsfw else ""}" tabindex="0">{badge}{picture}'
        f"<figcaption><b>{escape(str(row['model']))}</b>"
        f"<span>{escape(size_text)}{escape(size(int(row['bytes'] or 0)))}</span>"
        f"<q>{_caption(row['prompt'])}</q></figcaption></figure>"
    )


def _section(anchor: str, title: str, intro: str, chart: str, table: str) -> str:
    return (
        f'<section id="{anchor}"><h2>{escape(title)}</h2><p class="intro">{intro}</p>'
        f"{chart}{table}</section>"
    )


def _table(df: pl.DataFrame, *, floats: int = 2) -> str:
    if df.height == 0:
        return '<p class="empty">No data yet.</p>'
    head = "".join(f"<th>{escape(c)}</th>" for c in df.columns)
    numeric = {c for c, t in df.schema.items() if t.is_numeric()}
    body = []
    for row in df.iter_rows():
        cells = []
        for column, value in zip(df.columns, row, strict=True):
            if value is None:
                text = ""
            elif isinstance(value, float):
                text = f"{value:,.{floats}f}"
            elif isinstance(value, int) and not isinstance(value, bool):
                text = f"{value:,}"
            else:
                text = str(value)
            cls = ' class="num"' if column in numeric else ""
            cells.append(f"<td{cls}>{escape(text)}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    table = f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
    return f'<div class="scroll">{table}</div>'


_Segment = tuple[str, float, str]
"""(name, value, colour) of one piece of a bar."""
_Bar = tuple[str, Sequence[_Segment], str]
"""(label, segments, the text at the bar's end) of one bar."""


NARROW_WIDTH: Final = 340
"""Pixels of a bar chart's phone layout (each label above its bar), shown under 600 px."""


def _bars(rows: Sequence[_Bar], *, value_width: int = 90) -> str:
    """Horizontal (stacked) bars, one per row, as inline SVG, twice: labels beside the bars,
    and for a phone labels above them, at a width that needs no scaling (CSS shows one); the
    largest bar is full width."""
    if not rows:
        return ""
    full = max(sum(v for _, v, _ in segs) for _, segs, _ in rows) or 1.0
    wide = _bar_svg(rows, full=full, label_width=230, bar_width=420, value_width=value_width)
    narrow = _bar_svg(
        rows,
        full=full,
        label_width=0,
        bar_width=NARROW_WIDTH - value_width,
        value_width=value_width,
    )
    return f'<div class="scroll wide">{wide}</div><div class="scroll narrow">{narrow}</div>'


def _bar_svg(
    rows: Sequence[_Bar], *, full: float, label_width: int, bar_width: int, value_width: int
) -> str:
    """One layout of ``_bars``: ``label_width`` 0 puts each label above its bar."""
    above = label_width == 0
    bar_h = 18 if not above else 16
    row_h = 26 if not above else 40
    width = label_width + bar_width + value_width
    height = row_h * len(rows) + 4
    chars = 32 if not above else NARROW_WIDTH // 7
    parts = [
        f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" '
        f'height="{height}" role="img">'
    ]
    for i, (label, segments, end) in enumerate(rows):
        y = i * row_h + 4
        short = label if len(label) <= chars else label[: chars - 1] + "…"
        if above:
            position = f'x="0" y="{y + 12}"'
            y += 18
        else:
            position = f'x="{label_width - 8}" y="{y + bar_h - 5}" text-anchor="end"'
        parts.append(f"<text {position}><title>{escape(label)}</title>{escape(short)}</text>")
        x = float(label_width)
        for name, value, colour in segments:
            w = bar_width * value / full
            if w > 0:
                parts.append(
                    f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{bar_h}" '
                    f'fill="{colour}"><title>{escape(label)}: {escape(name)} '
                    f"{value:,.4g}</title></rect>"
                )
            x += w
        parts.append(
            f'<text x="{x + 6:.1f}" y="{y + bar_h - 5}" class="value">{escape(end)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def nice_ticks(largest: float, *, count: int = 4) -> list[float]:
    """Round axis values from 0 to at least ``largest``: 0, 250, 500, ... or 0, 2, 4, ..."""
    if largest <= 0:
        return [0.0, 1.0]
    raw = largest / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    return [step * i for i in range(math.ceil(largest / step - 1e-9) + 1)]


UPRIGHT_COLUMN: Final = 76
"""Pixels a column needs for its ``MM-DD HH:MM`` label written level beneath it."""


def _columns(columns: Sequence[tuple[str, float]], *, unit: Callable[[float], str]) -> str:
    """Vertical columns, one per run (run id, value), as inline SVG with a value axis on the
    left (``unit`` formats its ticks); each is labelled with its run's start, ``MM-DD HH:MM``
    (UTC, from the id)."""
    if not columns:
        return ""
    ticks = nice_ticks(max(v for _, v in columns))
    left = 14 + 7 * max(len(unit(t)) for t in ticks)
    col_w = max(14, min(UPRIGHT_COLUMN, 460 // len(columns)))
    upright = col_w >= UPRIGHT_COLUMN  # room for the label under its column
    plot_h, top = 160, 22
    bottom = 24 if upright else 70
    width = left + col_w * len(columns) + (20 if upright else 80)  # room for a slanted label
    height = top + plot_h + bottom
    scale = ticks[-1] or 1.0
    parts = [
        f'<div class="scroll"><svg class="chart" viewBox="0 0 {width} {height}" width="{width}" '
        f'height="{height}" role="img">',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="#888"/>',
        f'<line x1="{left}" y1="{top + plot_h}" x2="{left + col_w * len(columns)}" '
        f'y2="{top + plot_h}" stroke="#888"/>',
    ]
    for tick in ticks:
        y = top + plot_h - plot_h * tick / scale
        parts.append(
            f'<line x1="{left - 4}" y1="{y:.1f}" x2="{left + col_w * len(columns)}" '
            f'y2="{y:.1f}" stroke="#e4e7eb"/>'
            f'<text x="{left - 7}" y="{y + 4:.1f}" text-anchor="end" class="tick">'
            f"{escape(unit(tick))}</text>"
        )
    for i, (run_id, value) in enumerate(columns):
        label = f"{run_id[4:6]}-{run_id[6:8]} {run_id[9:11]}:{run_id[11:13]}"
        x = left + i * col_w
        h = plot_h * value / scale
        cx = x + col_w / 2
        parts.append(
            f'<rect x="{x + 2}" y="{top + plot_h - h:.1f}" width="{col_w - 4}" height="{h:.1f}" '
            f'fill="#0f766e"><title>{escape(run_id)}: {escape(unit(value))}</title></rect>'
        )
        if upright:
            parts.append(
                f'<text x="{cx:.1f}" y="{top + plot_h + 16}" text-anchor="middle" '
                f'class="tick">{escape(label)}</text>'
            )
        else:
            parts.append(
                f'<text transform="translate({cx - 3:.1f},{top + plot_h + 8}) rotate(60)" '
                f'class="tick">{escape(label)}</text>'
            )
    parts.append("</svg></div>")
    return "".join(parts)


_CSS: Final = """
:root { --fg: #1f2933; --muted: #616e7c; --line: #e4e7eb; --bg: #fff; --panel: #f5f7fa; }
* { box-sizing: border-box; }
body { margin: 0 auto; max-width: 1180px; padding: 24px; color: var(--fg); background: var(--bg);
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
h1 { margin: 0 0 4px; font-size: 26px; } h2 { margin: 0 0 4px; font-size: 19px; }
code { font: 12px ui-monospace, Menlo, Consolas, monospace; }
.meta, .intro, footer { color: var(--muted); margin: 2px 0 10px; overflow-wrap: anywhere; }
section { margin: 28px 0; padding-top: 16px; border-top: 1px solid var(--line); }
.cards { display: flex; flex-wrap: wrap; gap: 12px; margin-top: 16px; }
.card { background: var(--panel); border-radius: 8px; padding: 10px 16px; min-width: 130px; }
.card b { display: block; font-size: 22px; } .card span { color: var(--muted); }
table { border-collapse: collapse; margin-top: 12px; font-size: 13px; }
th, td { padding: 4px 10px; border-bottom: 1px solid var(--line); text-align: left;
  white-space: nowrap; }
th { background: var(--panel); font-weight: 600; } td.num { text-align: right;
  font-variant-numeric: tabular-nums; }
.scroll { max-width: 100%; overflow-x: auto; }
svg.chart { display: block; margin-top: 8px; }
svg.chart text { font: 12px system-ui, sans-serif; fill: var(--fg); }
svg.chart text.value, svg.chart text.tick { fill: var(--muted); font-size: 11px; }
.legend { display: flex; flex-wrap: wrap; gap: 4px 14px; font-size: 12px; color: var(--muted); }
.legend i { display: inline-block; width: 10px; height: 10px; margin-right: 4px;
  border-radius: 2px; }
.charts { display: flex; flex-wrap: wrap; gap: 24px; }
.charts > div { min-width: 0; max-width: 100%; }
.charts h3 { margin: 8px 0 0; font-size: 14px; font-weight: 600; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(170px, 1fr)); gap: 12px; }
.tile { position: relative; margin: 0; background: var(--panel); border-radius: 8px;
  overflow: hidden; outline: none; }
.pic { aspect-ratio: 1; overflow: hidden; background: #d9dee4; }
.pic img { display: block; width: 100%; height: 100%; object-fit: cover; font-size: 11px;
  color: var(--muted); }
.placeholder { display: flex; flex-direction: column; justify-content: center; gap: 6px;
  padding: 10px; font-size: 12px; color: var(--muted); word-break: break-all; }
.tile.nsfw img { filter: blur(18px) saturate(0.6); transform: scale(1.1); cursor: pointer; }
.tile.nsfw:focus img { filter: none; transform: none; }
.tile:focus { box-shadow: 0 0 0 2px #1d4ed8; }
.badge { position: absolute; z-index: 1; top: 8px; left: 8px; background: #c2410c; color: #fff;
  font-size: 11px; font-weight: 700; padding: 2px 6px; border-radius: 4px; }
figcaption { padding: 6px 8px 8px; font-size: 12px; display: grid; gap: 2px; }
figcaption b { overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
figcaption span { color: var(--muted); }
figcaption q { color: var(--muted); display: -webkit-box; -webkit-line-clamp: 2;
  -webkit-box-orient: vertical; overflow: hidden; }
footer { margin-top: 32px; font-size: 12px; }
.narrow { display: none; }
@media (max-width: 600px) {
  .wide { display: none; } .narrow { display: block; }
  body { padding: 12px; }
  .card { min-width: 0; flex: 1 1 40%; padding: 8px 12px; }
  .grid { grid-template-columns: repeat(3, minmax(0, 1fr)); gap: 6px; }
  figcaption { padding: 3px 5px 5px; font-size: 11px; }
  figcaption span, figcaption q { display: none; }
  .badge { top: 4px; left: 4px; font-size: 10px; padding: 1px 4px; }
}
"""

"""``harvester report``: the tables over the latest state, and the self-contained HTML page."""

from __future__ import annotations

import base64
import io
import re
from datetime import UTC, datetime
from html.parser import HTMLParser
from pathlib import Path

import polars as pl
import pytest
from PIL import Image

from harvester import statuses
from harvester.errors import ExitCode, UsageError
from harvester.sandbox import Sandbox
from harvester.storage import manifest
from harvester.storage.objects import LocalStore
from harvester.views.report import Report, build
from harvester.views.report_html import GalleryLimits, render, write_html
from tests.conftest import harvest_args, run_cli, write_csv

EVIL = "<script>alert(1)</script>"

PAIRS = [
    *[("fal-ai/flux/dev", f"rep-{i:03d}") for i in range(24)],
    *[("fal-ai/flux", f"rep-{i:03d}") for i in range(24, 40)],
    ("fal-ai/flux", "pending-rep"),
    ("fal-ai/flux", "missing-rep"),
    ("fal-ai/flux/dev", "fail-rep"),
    ("fal-ai/flux/dev", "shortnsfw-rep"),
    ("fal-ai/flux/dev", "inline-rep"),
    (EVIL, "evil-rep"),
]


@pytest.fixture(scope="module")
def harvested(tmp_path_factory: pytest.TempPathFactory, sandbox: Sandbox) -> Path:
    """Two runs into one folder: the first, then a rerun that retries what is not ok."""
    tmp = tmp_path_factory.mktemp("report")
    csv = write_csv(tmp / "export.csv", PAIRS)
    out = tmp / "out"
    for _ in range(2):
        assert run_cli(harvest_args(sandbox, out, csv)).exit_code == ExitCode.INCOMPLETE
    return out


def test_tables_describe_the_latest_state(harvested: Path) -> None:
    report = build(harvested)

    assert report.requests == len(PAIRS)
    by_model = {r["model"]: r for r in report.by_status.iter_rows(named=True)}
    assert by_model["fal-ai/flux"]["ok"] == 16
    assert by_model["fal-ai/flux"]["pending"] == 1 and by_model["fal-ai/flux"]["not_found"] == 1
    assert by_model["fal-ai/flux/dev"]["failed"] == 1
    assert by_model["fal-ai/flux/dev"]["total"] == 24 + 3
    assert sum(by_model[EVIL][s] for s in statuses.STATUSES) == by_model[EVIL]["total"] == 1

    latest = manifest.latest(harvested).filter(pl.col("path").is_not_null()).collect()
    for row in report.nsfw.iter_rows(named=True):
        images = latest.filter(pl.col("model") == row["model"])
        assert row["images"] == images.height
        assert row["flagged"] == images["has_nsfw_concept"].sum()
        assert row["unknown"] == images["has_nsfw_concept"].null_count()
    dev = report.nsfw.filter(pl.col("model") == "fal-ai/flux/dev").row(0, named=True)
    assert dev["unknown"] == 2  # shortnsfw- gives one flag for three images

    for row in report.inference.iter_rows(named=True):
        assert 0 < row["p50"] <= row["p90"] <= row["p99"] <= row["max"] <= 6.0


def test_runs_table_counts_each_run_and_joins_its_record(harvested: Path) -> None:
    runs = build(harvested).runs
    assert runs.height == 2
    first, second = runs.iter_rows(named=True)
    assert first["run_id"] < second["run_id"]
    assert first["exit_code"] == second["exit_code"] == ExitCode.INCOMPLETE
    assert first["requests"] == len(PAIRS)
    assert second["requests"] == 4  # the rerun retried only what was not ok
    assert second["images"] == second["new_images"] == 0
    assert first["new_bytes"] == sum(
        f.stat().st_size for f in (harvested / "images").rglob("*") if f.is_file()
    )


def test_text_report_from_the_cli(harvested: Path) -> None:
    result = run_cli(["report", str(harvested)])
    assert result.exit_code == 0, result.output
    for title in (
        f"Requests by status and model (latest state of {len(PAIRS)} requests)",
        "NSFW rate per model",
        "Inference seconds per model",
        "Images and bytes per run",
    ):
        assert title in result.output


class Page(HTMLParser):
    """Collects what the tests look at: tags, attributes, style text."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.style = ""
        self._in_style = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, {k: v or "" for k, v in attrs}))
        self._in_style = tag == "style"

    def handle_endtag(self, tag: str) -> None:
        self._in_style = False

    def handle_data(self, data: str) -> None:
        if self._in_style:
            self.style += data

    def find(self, tag: str) -> list[dict[str, str]]:
        return [attrs for t, attrs in self.tags if t == tag]


def test_html_page_is_self_contained_with_tables_charts_and_gallery(
    harvested: Path, tmp_path: Path
) -> None:
    html_file = tmp_path / "report.html"

    result = run_cli(["report", str(harvested), "--html", str(html_file)])

    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"wrote {html_file} (")
    assert "images embedded as thumbnails" in result.output
    text = html_file.read_text(encoding="utf-8")
    page = Page()
    page.feed(text)
    assert len(page.find("table")) == 4
    # status, nsfw, inference (each twice: beside and, for phones, above), runs' images, bytes
    assert len(page.find("svg")) == 8
    assert len(page.find("rect")) > 10
    sections = {attrs.get("id") for attrs in page.find("section")}
    assert {"status", "nsfw", "inference", "runs", "gallery"} <= sections
    # the gallery: images embedded as data: URIs, NSFW ones marked and blurred by CSS
    figures = page.find("figure")
    images = page.find("img")
    assert images and all(img["src"].startswith("data:image/") for img in images)
    assert len(figures) == len(images)  # every sandbox image is small enough to embed
    assert any("nsfw" in fig["class"].split() for fig in figures)
    assert re.search(r"\.tile\.nsfw img\s*\{[^}]*filter:\s*blur\(", page.style)
    # nothing to fetch: no script, no stylesheet link, no http(s) asset, no CSS url()
    assert not page.find("script") and not page.find("link")
    for _, attrs in page.tags:
        for name in ("src", "href", "xlink:href", "srcset", "poster", "data"):
            assert not attrs.get(name, "").startswith(("http:", "https:", "//")), attrs
    assert "url(" not in page.style and "@import" not in page.style
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text)
    # strings from the manifest are escaped
    assert EVIL not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text


def test_gallery_limits_give_placeholders(harvested: Path) -> None:
    report = build(harvested, gallery_limit=10)
    files = GalleryLimits(images=10, image_bytes=4_000, use_thumbnails=False)
    page, embedded, placeholders = render(report, limits=files)
    assert embedded + placeholders == 10
    assert placeholders > 0 and "too large to embed" in page
    assert "pip install &#x27;harvester[thumbnails]&#x27;" in page  # how to get thumbnails
    _, embedded, placeholders = render(report, limits=GalleryLimits(images=5, total_bytes=1))
    assert (embedded, placeholders) == (0, 5)
    assert "page size limit reached" in render(report, limits=GalleryLimits(total_bytes=1))[0]


def test_gallery_is_the_latest_run_that_stored_images(harvested: Path) -> None:
    report = build(harvested)
    first_run = report.runs["run_id"][0]
    assert report.gallery_run == first_run  # the rerun stored nothing new
    assert report.gallery_total == report.runs["images"][0]


def test_report_of_an_empty_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="nothing has been harvested"):
        build(tmp_path)
    result = run_cli(["report", str(tmp_path)])
    assert result.exit_code == ExitCode.USAGE
    assert "no manifest under" in result.output


def test_html_write_failure_is_an_output_error(harvested: Path, tmp_path: Path) -> None:
    result = run_cli(["report", str(harvested), "--html", str(tmp_path / "no" / "r.html")])
    assert result.exit_code == ExitCode.OUTPUT
    assert "cannot write" in result.output


def test_write_html_reports_what_it_wrote(harvested: Path, tmp_path: Path) -> None:
    written = write_html(build(harvested), tmp_path / "r.html", limits=GalleryLimits(images=3))
    assert written.images_embedded == 3 and written.images_placeholder == 0
    assert written.bytes == (tmp_path / "r.html").stat().st_size
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically, no temp file left


def test_gallery_holds_thumbnails_of_real_images(harvested: Path) -> None:
    """Each tile is a JPEG of at most 320 pixels a side, decoded from the stored image."""
    report = build(harvested)
    page, embedded, placeholders = render(report, limits=GalleryLimits())
    assert embedded == report.gallery.height and placeholders == 0
    uris = re.findall(r'src="data:image/jpeg;base64,([^"]+)"', page)
    assert len(uris) == embedded
    for uri in uris:
        with Image.open(io.BytesIO(base64.b64decode(uri))) as thumb:
            thumb.load()
            assert max(thumb.size) <= 320 and thumb.format == "JPEG"
    assert "Thumbnails of at most 320 pixels" in page


def test_large_real_images_keep_the_page_small(tmp_path: Path) -> None:
    """Twelve 2048x1536 photos-like files of over a MB each: thumbnails, a page well under."""
    out = tmp_path / "out"
    rows = []
    for n in range(12):
        noise = Image.effect_noise((2048, 1536), 64 + n).convert("RGB")
        data = io.BytesIO()
        noise.save(data, "PNG", compress_level=1)
        stored = out / "images" / f"{n:02d}.png"
        stored.parent.mkdir(parents=True, exist_ok=True)
        stored.write_bytes(data.getvalue())
        rows.append((f"images/{n:02d}.png", len(data.getvalue())))
    assert all(size > 1_000_000 for _, size in rows)
    from harvester.views.report_html import _gallery

    html, embedded, _ = _gallery(build_fake(out, rows), GalleryLimits())
    assert embedded == 12
    assert len(html) < 1_000_000  # the files alone weigh over 12 MB


def build_fake(out: Path, rows: list[tuple[str, int]]) -> Report:
    gallery = pl.DataFrame(
        {
            "path": [p for p, _ in rows],
            "model": ["m"] * len(rows),
            "request_id": [f"r{n}" for n in range(len(rows))],
            "image_index": [0] * len(rows),
            "prompt": ["p"] * len(rows),
            "has_nsfw_concept": [False] * len(rows),
            "bytes": [b for _, b in rows],
            "width": [2048] * len(rows),
            "height": [1536] * len(rows),
        }
    )
    empty = pl.DataFrame()
    return Report(
        store=LocalStore(out),
        generated_at=datetime.now(UTC),
        by_status=empty,
        nsfw=empty,
        inference=empty,
        runs=pl.DataFrame(
            schema={
                "run_id": pl.String,
                "started_at": pl.Datetime("us", "UTC"),
                "exit_code": pl.Int64,
                "requests": pl.UInt32,
                "ok": pl.UInt32,
                "images": pl.UInt32,
                "new_images": pl.UInt32,
                "new_bytes": pl.Int64,
            }
        ),
        gallery_run="20261201T000000.000Z-abcdef",
        gallery=gallery,
        gallery_total=len(rows),
    )


def test_runs_newest_first_the_last_thirty_with_the_total_and_an_axis() -> None:
    from harvester.views.report import display_runs
    from harvester.views.report_html import _runs_section, nice_ticks

    runs = pl.DataFrame(
        {
            "run_id": [
                f"2026{11 + n // 30:02d}{n % 30 + 1:02d}T060000.000Z-{n:06x}" for n in range(45)
            ],
            "started_at": [datetime(2026, 11, 1, 6, tzinfo=UTC)] * 45,
            "exit_code": [0] * 45,
            "requests": [100] * 45,
            "ok": [100] * 45,
            "images": [170] * 45,
            "new_images": list(range(45)),
            "new_bytes": [n * 1_000_000 for n in range(45)],
        }
    )
    shown = display_runs(runs)
    assert shown.height == 30 and shown["new_images"].to_list() == list(range(44, 14, -1))
    html = _runs_section(runs)
    assert "The 30 most recent of 45 runs" in html and "newest first" in html
    assert ">40.0 MB</text>" in html and ">60.0 MB</text>" in html  # the bytes axis
    assert "New bytes on disk" in html and "New images" in html
    assert nice_ticks(44) == [0, 20, 40, 60]
    assert nice_ticks(0) == [0.0, 1.0] and nice_ticks(7)[-1] >= 7

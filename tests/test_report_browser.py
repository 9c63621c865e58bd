"""The HTML report in a real browser (Debian's Chromium through Playwright), at a phone's and a
desktop's width: images decode, the page never scrolls sideways, chart text is readable, the
legend is whole, the gallery stays compact, and the console stays clean.

``make test`` installs Chromium (``.ci/system-packages``); Playwright's own browser downloads
are not used.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, sync_playwright

from harvester import statuses
from harvester.errors import ExitCode
from harvester.sandbox import Sandbox
from tests.conftest import harvest_args, run_cli, write_csv

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
WIDTHS = (390, 1280)
"""A phone's CSS width (iPhone 12 to 15) and a laptop's."""
MIN_TEXT_PX = 10

PAIRS = [
    *[("fal-ai/flux/dev", f"web-{i:03d}") for i in range(30)],
    *[("fal-ai/flux-pro/v1.1-ultra/with-a-long-model-name", f"web-{i:03d}") for i in range(30, 50)],
    ("fal-ai/flux", "pending-web"),
    ("fal-ai/flux", "missing-web"),
    ("fal-ai/flux/dev", "fail-web"),
    ("fal-ai/flux/dev", "shortnsfw-web"),
]


@pytest.fixture(scope="module")
def report_page(tmp_path_factory: pytest.TempPathFactory, sandbox: Sandbox) -> Path:
    """A report of two real harvests from the sandbox (a first run and its rerun), with a full
    gallery of 48 images of every format the sandbox serves."""
    tmp = tmp_path_factory.mktemp("browser")
    csv = write_csv(tmp / "export.csv", PAIRS)
    out = tmp / "out"
    for _ in range(2):
        assert run_cli(harvest_args(sandbox, out, csv)).exit_code == ExitCode.INCOMPLETE
    page = tmp / "report.html"
    result = run_cli(["report", str(out), "--html", str(page)])
    assert result.exit_code == 0, result.output
    return page


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert Path(CHROMIUM).exists(), (
        "the browser test needs Debian's Chromium: make test installs it as root "
        "(apt-get install -y --no-install-recommends chromium)"
    )
    with sync_playwright() as p:
        # --no-sandbox: the tests run as root, where Chromium's sandbox refuses to start.
        launched = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield launched
        launched.close()


MEASURE = """() => {
  const doc = document.documentElement;
  const shown = [...document.querySelectorAll('svg text')].filter(t => t.checkVisibility());
  const texts = shown.map(t => {
    const r = t.getBoundingClientRect();
    return {text: t.textContent, height: r.height};
  });
  const images = [...document.querySelectorAll('#gallery img')].map(i => ({
    alt: i.alt, ok: i.complete && i.naturalWidth > 0}));
  const legend = [...document.querySelectorAll('.legend span')].map(s => {
    const r = s.getBoundingClientRect();
    return {text: s.textContent, left: r.left, right: r.right, width: r.width};
  });
  const tiles = [...document.querySelectorAll('#gallery figure')].map(
    f => Math.round(f.getBoundingClientRect().left));
  const grid = document.querySelector('#gallery .grid').getBoundingClientRect();
  const tables = [...document.querySelectorAll('table')].map(t => {
    const box = t.parentElement.getBoundingClientRect();
    return {boxRight: box.right, scrolls: getComputedStyle(t.parentElement).overflowX};
  });
  const bars = [...document.querySelectorAll('section:not(#runs) .scroll')].filter(
    b => b.querySelector('svg') && b.checkVisibility()).map(b => b.scrollWidth - b.clientWidth);
  return {scrollWidth: doc.scrollWidth, clientWidth: doc.clientWidth, texts, images, legend,
          columns: new Set(tiles).size, galleryHeight: grid.height, tables, bars};
}"""


@pytest.mark.parametrize("width", WIDTHS)
def test_report_reads_in_a_browser(
    report_page: Path, browser: Browser, width: int, tmp_path: Path
) -> None:
    page = browser.new_page(viewport={"width": width, "height": 900})
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(report_page.as_uri(), wait_until="load")
    seen: dict[str, Any] = page.evaluate(MEASURE)
    page.screenshot(path=str(tmp_path / f"report-{width}.png"), full_page=True)
    page.close()

    assert errors == []
    # every gallery image decodes
    assert len(seen["images"]) == 48
    assert [i["alt"] for i in seen["images"] if not i["ok"]] == []
    # the page never scrolls sideways: wide tables and charts scroll in their own box
    assert seen["scrollWidth"] <= seen["clientWidth"] == width
    for table in seen["tables"]:
        assert table["boxRight"] <= width and table["scrolls"] == "auto"
    # the bar charts fit without scrolling, one layout at a time; their text is readable
    assert seen["bars"] == [0, 0, 0]
    assert len(seen["texts"]) > 20
    small = [t for t in seen["texts"] if t["height"] < MIN_TEXT_PX]
    assert small == []
    # the legend names every status, each inside the page
    assert [s["text"] for s in seen["legend"]] == list(statuses.STATUSES)
    assert all(s["left"] >= 0 and s["right"] <= width and s["width"] > 0 for s in seen["legend"])
    # the gallery: a phone shows three images a row, 48 of them in a few screens
    if width < 600:
        assert seen["columns"] == 3
        assert seen["galleryHeight"] < 3_000
    else:
        assert seen["columns"] >= 5


def test_the_checks_catch_a_page_that_scrolls_sideways(browser: Browser) -> None:
    page = browser.new_page(viewport={"width": 390, "height": 900})
    page.set_content('<table><tr><td style="white-space:nowrap">' + "x" * 400 + "</td></tr>")
    seen = page.evaluate("() => [document.documentElement.scrollWidth, innerWidth]")
    page.close()
    assert seen[0] > seen[1] == 390

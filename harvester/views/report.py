"""``harvester report DIR``: what the harvest holds, as tables (polars over the manifest).

Every table but the per-run one describes the *latest state* of each request
(``manifest.latest``: the rows of its most recent run), so a request retried five times counts
once, as it stands now. The per-run table reads every row, and joins the run records for each
run's start and exit code. ``harvester.views.report_html`` renders a ``Report`` as one HTML page.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

import polars as pl

from harvester import statuses
from harvester.errors import UsageError
from harvester.storage import manifest
from harvester.storage.objects import Location, Store, as_store
from harvester.storage.runs import read_all
from harvester.terminal import wrap
from harvester.units import size
from harvester.views.table import fit_table

NO_MODEL: Final = "(no model)"
"""How a row without a model (an ``invalid`` CSV row) is labelled."""
RUNS_SHOWN: Final = 30
"""The per-run tables and chart show the most recent runs only (and how many there are)."""
GALLERY_LIMIT: Final = 48
"""Images of the latest run listed for the gallery."""


@dataclass(frozen=True, slots=True)
class Report:
    store: Store
    """Where the harvest is (the gallery reads its images from there)."""
    generated_at: datetime
    by_status: pl.DataFrame
    """One row per model: requests per status (``statuses.STATUSES`` columns) and ``total``."""
    nsfw: pl.DataFrame
    """One row per model: stored ``images``, ``flagged``, ``unknown`` (no flag), ``rate``."""
    inference: pl.DataFrame
    """One row per model: ``requests`` with a time, ``p50``, ``p90``, ``p99``, ``max`` seconds."""
    runs: pl.DataFrame
    """One row per run, oldest first: ``run_id``, ``started_at``, ``exit_code``, ``requests``,
    ``ok``, ``images`` (stored by the run), ``new_images``, ``new_bytes``, and ``refused``
    (a server's refused deliveries; null for a harvest). A server (``harvester serve``) is a
    run: its intake so far while it serves (no exit code yet), listed even before its first
    row."""
    gallery_run: str | None
    """The latest run that stored images (the gallery's run)."""
    gallery: pl.DataFrame
    """Up to ``GALLERY_LIMIT`` images of ``gallery_run``: ``path``, ``model``, ``request_id``,
    ``image_index``, ``prompt``, ``has_nsfw_concept``, ``bytes``, ``width``, ``height``."""
    gallery_total: int
    """How many images ``gallery_run`` stored (the gallery may show fewer)."""

    @property
    def out_dir(self) -> str:
        return self.store.location

    @property
    def requests(self) -> int:
        return int(self.by_status["total"].sum()) if self.by_status.height else 0

    def text(self, *, width: int | None = None) -> str:
        """The tables as text, as ``harvester report DIR`` prints them, each no wider than
        ``width`` columns (default: the terminal's)."""
        sections = [
            (
                f"Requests by status and model (latest state of {self.requests:,} requests)",
                self.by_status,
            ),
            (
                "NSFW rate per model (stored images, latest state)",
                self.nsfw.with_columns(_percent("rate")),
            ),
            ("Inference seconds per model (latest state)", self.inference),
            (
                f"Images and bytes per run ({_shown(self.runs.height)}, newest first)",
                display_runs(self.runs).drop("started_at"),
            ),
        ]
        parts = [wrap(f"harvester report for {self.out_dir}", width=width)]
        for title, table in sections:
            body = fit_table(table, width=width) if table.height else "(no rows yet)"
            parts.append(f"\n{wrap(title, width=width)}\n{body}")
        return "\n".join(parts)


def _shown(runs: int) -> str:
    if runs > RUNS_SHOWN:
        return f"the {RUNS_SHOWN} most recent of {runs:,}"
    return "the only one" if runs == 1 else f"all {runs:,}"


def display_runs(runs: pl.DataFrame) -> pl.DataFrame:
    """``runs`` for people: the ``RUNS_SHOWN`` most recent, newest first, start time to the
    minute, bytes in MB."""
    return (
        runs.tail(RUNS_SHOWN)
        .reverse()
        .with_columns(
            pl.col("started_at").dt.strftime("%Y-%m-%d %H:%M UTC"),
            pl.col("new_bytes").map_elements(size, return_dtype=pl.String),
        )
    )


def _percent(column: str) -> pl.Expr:
    return pl.format("{}%", (pl.col(column) * 100).round(1)).alias(column)


def build(where: Store | Location, *, gallery_limit: int = GALLERY_LIMIT) -> Report:
    """Compute every table of the report for a harvest (a store, or its location)."""
    store = as_store(where)
    if not manifest.has_manifest(store):
        where = store.location
        raise UsageError(
            f"no manifest under {where}/manifest: nothing has been harvested into "
            f"{where} yet (check the folder, or run a harvest first)"
        )
    latest = manifest.latest(store).with_columns(pl.col("model").fill_null(NO_MODEL)).collect()
    requests = latest.group_by("model", "request_id").agg(
        pl.col("request_status").first(),
        pl.col("inference_seconds").drop_nulls().first(),
    )
    gallery_run, gallery, gallery_total = _gallery(store, gallery_limit)
    return Report(
        store=store,
        generated_at=datetime.now(UTC),
        by_status=_by_status(requests),
        nsfw=_nsfw(latest),
        inference=_inference(requests),
        runs=_runs(store),
        gallery_run=gallery_run,
        gallery=gallery,
        gallery_total=gallery_total,
    )


def _by_status(requests: pl.DataFrame) -> pl.DataFrame:
    return (
        requests.group_by("model")
        .agg(
            *[(pl.col("request_status") == s).sum().alias(s) for s in statuses.STATUSES],
            pl.len().alias("total"),
        )
        .sort("total", "model", descending=[True, False])
    )


def _nsfw(latest: pl.DataFrame) -> pl.DataFrame:
    flag = pl.col("has_nsfw_concept")
    return (
        latest.filter(pl.col("path").is_not_null())
        .group_by("model")
        .agg(
            pl.len().alias("images"),
            flag.fill_null(False).sum().alias("flagged"),
            flag.is_null().sum().alias("unknown"),
        )
        .with_columns((pl.col("flagged") / (pl.col("images") - pl.col("unknown"))).alias("rate"))
        .sort("model")
    )


def _inference(requests: pl.DataFrame) -> pl.DataFrame:
    seconds = pl.col("inference_seconds")
    return (
        requests.filter(seconds.is_not_null())
        .group_by("model")
        .agg(
            pl.len().alias("requests"),
            *[
                seconds.quantile(q, interpolation="linear").alias(f"p{round(q * 100)}")
                for q in (0.5, 0.9, 0.99)
            ],
            seconds.max().alias("max"),
        )
        .sort("model")
    )


def _runs(store: Store) -> pl.DataFrame:
    rows = manifest.scan(store)
    stored = pl.col("path").is_not_null()
    new = stored & pl.col("stored_new").fill_null(False)
    per_run = (
        rows.group_by("run_id")
        .agg(
            pl.struct("model", "request_id").n_unique().alias("requests"),
            pl.struct("model", "request_id")
            .filter(pl.col("request_status") == statuses.OK)
            .n_unique()
            .alias("ok"),
            stored.sum().alias("images"),
            new.sum().alias("new_images"),
            pl.col("bytes").filter(new).sum().alias("new_bytes"),
        )
        .collect()
    )
    records, _ = read_all(store)
    known = pl.DataFrame(
        {
            "run_id": [r.run_id for r in records],
            "started_at": [r.started_at for r in records],
            "exit_code": [r.exit_code for r in records],
            "refused": [r.intake.refused_total if r.intake else None for r in records],
            "serves": [r.serves for r in records],
        },
        schema={
            "run_id": pl.String,
            "started_at": pl.Datetime("us", "UTC"),
            "exit_code": pl.Int64,
            "refused": pl.Int64,
            "serves": pl.Boolean,
        },
    )
    counted = ("requests", "ok", "images", "new_images", "new_bytes")
    return (
        per_run.join(known, on="run_id", how="full", coalesce=True)
        .filter(pl.col("requests").is_not_null() | pl.col("serves").fill_null(False))
        .with_columns(pl.col(name).fill_null(0) for name in counted)
        .select(
            "run_id",
            "started_at",
            "exit_code",
            "requests",
            "ok",
            "images",
            "new_images",
            "new_bytes",
            "refused",
        )
        .sort("run_id")
    )


def _gallery(store: Store, limit: int) -> tuple[str | None, pl.DataFrame, int]:
    images = manifest.scan(store).filter(
        pl.col("path").is_not_null() & (pl.col("status") == statuses.OK)
    )
    run = images.select(pl.col("run_id").max()).collect().item()
    columns = (
        "path",
        "model",
        "request_id",
        "image_index",
        "prompt",
        "has_nsfw_concept",
        "bytes",
        "width",
        "height",
    )
    if run is None:  # no stored image yet (every request expired or failed, say)
        return None, images.select(columns).head(0).collect(), 0
    chosen = images.filter(pl.col("run_id") == run).sort(
        "harvested_at", "request_id", "image_index"
    )
    total = chosen.select(pl.len()).collect().item()
    return run, chosen.select(columns).head(limit).collect(), int(total)

"""``make bench``'s compact section: the latest-state query over a year of nightly runs, before
and after ``harvester compact``, against the same query over one night.

The manifest is generated directly with the manifest's schema (no HTTP): ``nights`` runs of
the same ``n`` requests (ids that are retried every night, the worst case before
``--give-up-after``), each run written as parts of 5,000 rows as a harvest writes them, with
the columns a harvest fills (prompt, URL, sha256, path, timings...). The query is the
report's: the latest state of every request, counted by model and status.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from harvester.storage import manifest
from harvester.storage.compact import compact

ROWS_PER_PART: Final = 5_000
"""As a harvest writes them (``HarvestConfig.rows_per_part``)."""
MAX_RATIO: Final = 2.0
"""Issue 15: the year's latest-state query after compaction / one night's."""
START: Final = datetime(2026, 1, 1, 3, 0, tzinfo=UTC)
STATUSES: Final = ("ok", "ok", "ok", "not_found", "pending", "failed")


def night_table(n: int, night: int) -> pa.Table:
    """Night ``night``'s rows for requests 0..n-1 (statuses shift from night to night)."""
    run_id = (START + timedelta(days=night)).strftime("%Y%m%dT%H%M%S.000Z-") + f"{night:06x}"
    at = START + timedelta(days=night, minutes=10)
    models = ["fal-ai/flux/dev", "fal-ai/flux", "fal-ai/flux-pro/v1.1-ultra"]
    status = [STATUSES[(i + night) % len(STATUSES)] for i in range(n)]
    ok = [s == "ok" for s in status]
    sha = [f"{(i * 2654435761 + night) % (1 << 64):016x}" * 4 for i in range(n)]
    columns: dict[str, object] = {
        "run_id": [run_id] * n,
        "harvested_at": [at] * n,
        "source_file": ["exports/nightly.csv"] * n,
        "source_line": list(range(2, n + 2)),
        "model": [models[i % 3] for i in range(n)],
        "request_id": [f"{i:08d}-7c1e-4b7a-9d1e-5f0c2a9b3e41" for i in range(n)],
        "request_status": status,
        "status": status,
        "error": [None if k else "404: request not found" for k in ok],
        "http_status": [200 if k else 404 for k in ok],
        "attempts": [1] * n,
        "seed": [i * 7919 for i in range(n)],
        "prompt": [f"a watercolour of lighthouse number {i} at dusk, soft light" for i in range(n)],
        "image_count": [1] * n,
        "image_index": [0 if k else None for k in ok],
        "image_url": [
            f"https://v3.fal.media/files/x/{s[:20]}.png" if k else None
            for s, k in zip(sha, ok, strict=True)
        ],
        "content_type": ["image/png" if k else None for k in ok],
        "sha256": [s if k else None for s, k in zip(sha, ok, strict=True)],
        "path": [f"images/{s[:2]}/{s}.png" if k else None for s, k in zip(sha, ok, strict=True)],
        "bytes": [1_500_000 if k else None for k in ok],
        "stored_new": [True if k else None for k in ok],
        "width": [1024 if k else None for k in ok],
        "height": [768 if k else None for k in ok],
        "image_format": ["png" if k else None for k in ok],
        "image_width": [1024 if k else None for k in ok],
        "image_height": [768 if k else None for k in ok],
        "has_nsfw_concept": [False if k else None for k in ok],
        "timings": ['{"inference": 1.25}' if k else None for k in ok],
        "inference_seconds": [1.25 if k else None for k in ok],
        "seed_text": [str(i * 7919) for i in range(n)],
        "altered": [False] * n,
    }
    return pa.Table.from_pydict(columns, schema=manifest.SCHEMA)


def write_nights(out: Path, n: int, nights: range) -> None:
    """Each night as part files of ``ROWS_PER_PART`` rows under ``out/manifest/<run_id>/``:
    night ``k % 6``'s rows (built once) with night ``k``'s run id and time."""
    built: dict[int, pa.Table] = {}
    for night in nights:
        key = night % len(STATUSES)
        if key not in built:
            built[key] = night_table(n, key)
        run_id = (START + timedelta(days=night)).strftime("%Y%m%dT%H%M%S.000Z-") + f"{night:06x}"
        at = START + timedelta(days=night, minutes=10)
        table = built[key].set_column(0, "run_id", pa.array([run_id] * n, pa.string()))
        table = table.set_column(
            1, "harvested_at", pa.array([at] * n, manifest.SCHEMA.field("harvested_at").type)
        )
        folder = out / "manifest" / run_id
        folder.mkdir(parents=True)
        for index, start in enumerate(range(0, n, ROWS_PER_PART)):
            part = table.slice(start, ROWS_PER_PART)
            pq.write_table(part, folder / f"part-{index:05d}.parquet", compression="zstd")


def query(out: Path) -> pl.DataFrame:
    """The report's latest-state query: requests by model and status."""
    return (
        manifest.latest(out)
        .group_by("model", "request_status")
        .agg(pl.struct("request_id").n_unique().alias("requests"))
        .sort("model", "request_status")
        .collect()
    )


def best_of(runs: int, fn: Callable[[], object]) -> tuple[float, object]:
    """Median wall time of ``runs`` calls (after one warm-up), and the last result."""
    result = fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def run(scratch: Path, *, n: int, nights: int, runs: int) -> tuple[list[str], bool]:
    """Returns the report lines and whether the target is met."""
    one = scratch / "compact-one-night"
    year = scratch / "compact-year"
    print(
        f"compact: {nights} nightly runs of {n:,} requests, parts of {ROWS_PER_PART:,}", flush=True
    )
    write_nights(one, n, range(1))
    t0 = time.perf_counter()
    write_nights(year, n, range(nights))
    parts = len(manifest.parts(year))
    print(f"  wrote {parts:,} parts in {time.perf_counter() - t0:.0f} s", flush=True)
    night_s, _ = best_of(runs, lambda: query(one))
    before_s, before_result = best_of(max(1, runs // 2), lambda: query(year))
    print(
        f"  one night {night_s * 1000:.0f} ms; the year before compaction {before_s:.2f} s",
        flush=True,
    )
    t0 = time.perf_counter()
    stats = compact(year)
    compact_s = time.perf_counter() - t0
    print(f"  {stats.summary()}", flush=True)
    after_s, after_result = best_of(runs, lambda: query(year))
    t0 = time.perf_counter()
    ok = sum(1 for _ in manifest.ok_pairs(year))
    ok_s = time.perf_counter() - t0
    write_nights(year, n, range(nights, nights + 1))
    t0 = time.perf_counter()
    nightly = compact(year)
    nightly_s = time.perf_counter() - t0
    print(f"  the next night: {nightly.summary()}", flush=True)
    same = (
        isinstance(before_result, pl.DataFrame)
        and isinstance(after_result, pl.DataFrame)
        and before_result.equals(after_result)
    )
    ratio = after_s / night_s
    lines = [
        f"compact: latest-state query (report's: requests by model and status), {nights} "
        f"nightly runs of {n:,} requests ({stats.rows:,} rows)",
        f"  one night: {night_s * 1000:.0f} ms; the year, {parts:,} parts: {before_s:.2f} s; "
        f"compacted ({stats.parts_after} parts + current-state table of {stats.current_rows:,} "
        f"rows): {after_s * 1000:.0f} ms = {ratio:.2f}x one night",
        f"  compaction {compact_s:.1f} s, the next night's {nightly_s:.1f} s; ok pairs at the "
        f"start of a run: {ok:,} in {ok_s:.1f} s"
        f"; same result before and after: {same}",
    ]
    return lines, same and ratio <= MAX_RATIO

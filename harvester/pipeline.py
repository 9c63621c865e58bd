"""The harvest: read -> fetch -> store -> write, wired with bounded concurrency.

    producer (reader)  --backlog slots-->  one task per request:
        fetch (``fetch_slots``, shared rate limiter)  ->  images (``download_slots``)  ->  manifest

A request holds a backlog slot from the moment it is read until its rows are written, so the
number of requests in memory is bounded whatever the input size. Fetch and download slots are
separate, so a result fetch never queues behind an image download.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import random
import secrets
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import anyio
import httpx

from harvester import manifest, reader
from harvester.errors import ExitCode, HarvesterError, OutputError, UsageError
from harvester.fetcher import FetchOutcome, ResultFetcher
from harvester.layout import Layout
from harvester.lock import exclusive
from harvester.manifest import ERROR, FAILED, INVALID, OK, PENDING, ManifestRow, ManifestWriter
from harvester.ratelimit import RateLimiter
from harvester.reader import BadRow, Pair
from harvester.results import ImageRef
from harvester.retry import RetryPolicy
from harvester.store import ImageFailure, ImageStore, StoredImage
from harvester.transport import open_client
from harvester.units import size
from harvester.urls import describe_url

log = logging.getLogger("harvester")

DEFAULT_BASE_URL: Final = "https://queue.fal.run"
FAL_QUEUE_HOST: Final = "queue.fal.run"
AUTH_SCHEMES: Final = ("auto", "bearer", "key")
KEY_ENV_VARS: Final = ("HARVESTER_API_KEY", "FAL_KEY")
MAX_PENDING_WAITERS: Final = 10_000
EVENT_LOOP_OPTIONS = {"use_uvloop": True}
"""anyio's asyncio backend options: uvloop takes about a fifth less CPU per request
(bench/transports.py measures it)."""


def api_key_from_env(environ: dict[str, str] | os._Environ[str], name: str | None = None) -> str:
    """The API key: from ``name`` if given, else HARVESTER_API_KEY, FAL_KEY, or
    FAL_KEY_ID + FAL_KEY_SECRET (as fal's clients read it). Raises ``UsageError`` if none."""
    names = (name,) if name else KEY_ENV_VARS
    for var in names:
        value = environ.get(var, "").strip()
        if value:
            return value
    if not name:
        key_id = environ.get("FAL_KEY_ID", "").strip()
        key_secret = environ.get("FAL_KEY_SECRET", "").strip()
        if key_id and key_secret:
            return f"{key_id}:{key_secret}"
    where = name or "HARVESTER_API_KEY (or FAL_KEY, or FAL_KEY_ID + FAL_KEY_SECRET)"
    raise UsageError(f"no API key: set {where} in the environment; nothing was fetched")


@dataclass(frozen=True, slots=True, kw_only=True)
class HarvestConfig:
    inputs: tuple[Path, ...]
    out_dir: Path
    api_key: str = field(repr=False)
    base_url: str = DEFAULT_BASE_URL
    auth_scheme: str = "auto"
    """``bearer`` (relays), ``key`` (fal.ai), or ``auto``: key for fal.ai's own queue host."""
    concurrency: int = 32
    """Result fetches in flight."""
    image_concurrency: int = 32
    """Image downloads in flight."""
    rps: float = 50.0
    """Result requests per second, retries included, across the whole run."""
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    pending_wait: float = 0.0
    """Seconds to keep re-polling requests that are still in progress, within this run."""
    max_image_bytes: int = 64 * 1024 * 1024
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    rows_per_part: int = 5_000
    seconds_per_part: float = 30.0
    seed: int | None = None
    """Seed for retry jitter (tests); None draws one."""

    def validate(self) -> None:
        """Check option values and combinations before any file or network is touched."""
        try:
            url = httpx.URL(self.base_url)
            host = url.host  # decoding an IDNA host can fail too
        except (httpx.InvalidURL, ValueError) as exc:
            raise UsageError(f"--base-url {self.base_url!r} is not a valid URL ({exc})") from None
        if url.scheme not in ("http", "https") or not host:
            raise UsageError(f"--base-url {self.base_url!r} must be an http:// or https:// URL")
        if url.query or url.fragment:
            raise UsageError(f"--base-url {self.base_url!r} must not have a query or fragment")
        if self.auth_scheme not in AUTH_SCHEMES:
            raise UsageError(f"--auth-scheme must be one of {', '.join(AUTH_SCHEMES)}")
        if not self.api_key or any(c in self.api_key for c in "\r\n"):
            raise UsageError("the API key is empty or contains a line break")
        checks = (
            (self.concurrency >= 1, "--concurrency must be at least 1"),
            (self.image_concurrency >= 1, "--image-concurrency must be at least 1"),
            (self.rps > 0, "--rps must be greater than 0"),
            (self.retry.max_attempts >= 1, "--max-attempts must be at least 1"),
            (self.retry.budget > 0, "--retry-budget must be greater than 0"),
            (self.pending_wait >= 0, "--pending-wait must not be negative"),
            (self.max_image_bytes >= 1, "--max-image-bytes must be at least 1"),
        )
        for ok, message in checks:
            if not ok:
                raise UsageError(message)
        if not self.inputs:
            raise UsageError("give at least one CSV export to harvest")

    @property
    def authorization(self) -> str:
        scheme = self.auth_scheme
        if scheme == "auto":
            scheme = "key" if httpx.URL(self.base_url).host == FAL_QUEUE_HOST else "bearer"
        return f"{'Key' if scheme == 'key' else 'Bearer'} {self.api_key}"


@dataclass(slots=True)
class RunStats:
    """Live counters of a run; the CLI draws progress and the summary from them."""

    run_id: str
    started_at: datetime
    out_dir: Path
    inputs: list[reader.InputFile] = field(default_factory=list)
    rows_in_input: int = 0
    skipped_done: int = 0
    duplicates: int = 0
    requests: Counter[str] = field(default_factory=Counter)
    images_new: int = 0
    images_existing: int = 0
    images_failed: int = 0
    bytes_new: int = 0
    bytes_downloaded: int = 0
    throttled: int = 0
    retries: int = 0
    result_requests: int = 0
    manifest_rows: int = 0
    manifest_parts: int = 0
    temp_files_cleaned: int = 0
    lowest_rps: float = 0.0
    """The rate limiter's lowest rate in the run (it halves on 429s)."""
    interrupted: bool = False
    error: str | None = None
    """The run-level error that ended the run (a rejected key, an unwritable folder), if any."""
    error_code: ExitCode | None = None
    finished_at: datetime | None = None
    _t0: float = field(default_factory=time.monotonic)

    @property
    def done(self) -> int:
        return sum(self.requests.values())

    @property
    def elapsed(self) -> float:
        end = self.finished_at.timestamp() if self.finished_at else time.time()
        return max(end - self.started_at.timestamp(), 1e-9)

    def fail(self, exc: HarvesterError) -> None:
        """Record the run-level error that ends the run, so the run record has its exit code."""
        self.error, self.error_code = str(exc), exc.exit_code

    @property
    def exit_code(self) -> ExitCode:
        if self.error_code is not None:
            return self.error_code
        if self.interrupted:
            return ExitCode.INTERRUPTED
        if any(status != OK and n for status, n in self.requests.items()):
            return ExitCode.INCOMPLETE
        return ExitCode.OK

    def summary(self) -> str:
        """The one-screen end-of-run summary."""
        done = self.done
        rate = done / self.elapsed
        by_status = (
            ", ".join(
                f"{status} {self.requests[status]:,}"
                for status in manifest.STATUSES
                if self.requests[status]
            )
            or "none"
        )
        lines = [
            f"run {self.run_id}: {done:,} requests in {self.elapsed:.1f} s ({rate:,.1f} req/s)",
            f"  by status:  {by_status}",
            f"  skipped:    {self.skipped_done:,} already ok in earlier runs, "
            f"{self.duplicates:,} duplicate rows",
            f"  images:     {self.images_new:,} new, {self.images_existing:,} already stored, "
            f"{self.images_failed:,} failed; {size(self.bytes_new)} new on disk",
            f"  api:        {self.result_requests:,} result requests "
            f"({self.result_requests / self.elapsed:,.1f}/s), {self.retries:,} retries, "
            f"{self.throttled:,} rate-limited (429)"
            + (f", rate cut to {self.lowest_rps:,.1f}/s at the lowest" if self.throttled else ""),
            f"  manifest:   {self.manifest_rows:,} rows in {self.manifest_parts} new part(s) "
            f"under {self.out_dir / 'manifest' / self.run_id}",
        ]
        if self.interrupted:
            lines.append("  INTERRUPTED: finished rows are kept; run again to pick up the rest")
        elif self.exit_code == ExitCode.INCOMPLETE:
            lines.append(
                f"  not all ok: exit {int(ExitCode.INCOMPLETE)}; the next run retries every "
                "request that is not ok"
            )
        return "\n".join(lines)

    def record(self) -> dict[str, object]:
        """The machine-readable run record (``DIR/runs/<run_id>.json``)."""
        return {
            "run_id": self.run_id,
            "started_at": self.started_at.isoformat(),
            "finished_at": self.finished_at.isoformat() if self.finished_at else None,
            "elapsed_seconds": round(self.elapsed, 3),
            "exit_code": int(self.exit_code),
            "interrupted": self.interrupted,
            "error": self.error,
            "inputs": [
                {"path": str(f.path), "sha256": f.sha256, "bytes": f.size, "rows": f.rows}
                for f in self.inputs
            ],
            "rows_in_input": self.rows_in_input,
            "skipped_already_ok": self.skipped_done,
            "duplicate_rows": self.duplicates,
            "requests": dict(self.requests),
            "images": {
                "new": self.images_new,
                "already_stored": self.images_existing,
                "failed": self.images_failed,
            },
            "bytes_new": self.bytes_new,
            "bytes_downloaded": self.bytes_downloaded,
            "temp_files_cleaned": self.temp_files_cleaned,
            "result_requests": self.result_requests,
            "retries": self.retries,
            "rate_limited": self.throttled,
            "manifest_rows": self.manifest_rows,
            "manifest_parts": self.manifest_parts,
        }


def new_run_id(now: datetime) -> str:
    """Sortable and unique: ``20261124T031500.123Z-3f9a1c``. Runs on one folder are serialised
    by its lock, so the milliseconds keep a later run's id above an earlier one's."""
    return f"{now:%Y%m%dT%H%M%S}.{now.microsecond // 1000:03d}Z-{secrets.token_hex(3)}"


class _Run:
    """One harvest's moving parts; ``harvest`` below is the public entry point."""

    def __init__(self, config: HarvestConfig, stats: RunStats, layout: Layout) -> None:
        self.config = config
        self.stats = stats
        self.layout = layout
        self.rng = random.Random(config.seed)
        self.writer = ManifestWriter(
            layout,
            stats.run_id,
            rows_per_part=config.rows_per_part,
            seconds_per_part=config.seconds_per_part,
            autoflush=False,
        )
        # fast_acquire: a free slot is taken without a trip through the event loop; these are
        # acquired once or more per request.
        self.fetch_slots = anyio.Semaphore(config.concurrency, fast_acquire=True)
        self.download_slots = anyio.Semaphore(config.image_concurrency, fast_acquire=True)
        self.backlog = anyio.Semaphore(
            config.concurrency + 2 * config.image_concurrency, fast_acquire=True
        )
        self.pending_waiters = anyio.Semaphore(MAX_PENDING_WAITERS)
        self.limiter = RateLimiter(config.rps)

    async def write(self, rows: list[ManifestRow]) -> None:
        self.writer.add(rows)
        if self.writer.due:
            await self.writer.flush_in_thread()
        self.stats.manifest_rows = self.writer.rows_written
        self.stats.manifest_parts = self.writer.parts_written

    def bad_row(self, bad: BadRow) -> ManifestRow:
        log.warning("%s:%d: invalid row: %s", bad.source, bad.line, bad.reason)
        self.stats.requests[INVALID] += 1
        return ManifestRow(
            run_id=self.stats.run_id,
            harvested_at=datetime.now(UTC),
            source_file=bad.source,
            source_line=bad.line,
            model=bad.model,
            request_id=bad.request_id,
            request_status=INVALID,
            status=INVALID,
            error=f"{bad.source}:{bad.line}: {bad.reason}",
        )

    async def produce(
        self, files: list[reader.InputFile], done: reader.PairSet, tg: anyio.abc.TaskGroup
    ) -> None:
        counts = reader.ReadCounts()
        batches = reader.iter_items(files, done=done, counts=counts)
        while True:
            batch = await anyio.to_thread.run_sync(next, batches, None)
            self.stats.skipped_done = counts.already_done
            self.stats.duplicates = counts.duplicates
            if batch is None:
                return
            bad = [self.bad_row(item) for item in batch if isinstance(item, BadRow)]
            if bad:
                await self.write(bad)
            for item in batch:
                if isinstance(item, Pair):
                    await self.backlog.acquire()
                    tg.start_soon(self.process, item)

    async def fetch(self, pair: Pair) -> FetchOutcome:
        async with self.fetch_slots:
            return await self.fetcher.fetch(pair.model, pair.request_id)

    async def process(self, pair: Pair) -> None:
        try:
            outcome = await self.fetch(pair)
            if outcome.status == PENDING and self.config.pending_wait > 0:
                outcome = await self.wait_pending(pair, outcome)
            rows = await self.rows_for(pair, outcome)
            self.stats.requests[rows[0].request_status] += 1
            await self.write(rows)
        finally:
            self.backlog.release()

    async def wait_pending(self, pair: Pair, outcome: FetchOutcome) -> FetchOutcome:
        """Re-poll a pending request with backoff until it settles or ``pending_wait`` ends.
        Waiting requests give their backlog slot back, so they cannot stall the run."""
        try:
            self.pending_waiters.acquire_nowait()
        except anyio.WouldBlock:
            return outcome
        self.backlog.release()
        try:
            deadline = time.monotonic() + self.config.pending_wait
            delay = 1.0
            while outcome.status == PENDING:
                wait = min(delay * self.rng.uniform(0.75, 1.25), deadline - time.monotonic())
                if wait <= 0:
                    break
                await anyio.sleep(wait)
                delay = min(delay * 2, 30.0)
                outcome = await self.fetch(pair)
        finally:
            self.pending_waiters.release()
            await self.backlog.acquire()
        return outcome

    async def rows_for(self, pair: Pair, outcome: FetchOutcome) -> list[ManifestRow]:
        # Every row is built once, with all its fields (no chains of dataclasses.replace):
        # this runs for every image of the run.
        result = outcome.result
        head: dict[str, Any] = {
            "run_id": self.stats.run_id,
            "harvested_at": datetime.now(UTC),
            "source_file": pair.source,
            "source_line": pair.line,
            "model": pair.model,
            "request_id": pair.request_id,
            "error": outcome.error,
            "http_status": outcome.http_status,
            "attempts": outcome.attempts,
        }
        if result is None:
            return [ManifestRow(request_status=outcome.status, status=outcome.status, **head)]
        head.update(
            seed=result.seed,
            prompt=result.prompt,
            timings=result.timings,
            inference_seconds=result.inference_seconds,
            image_count=len(result.images),
        )
        if not result.images:
            return [ManifestRow(request_status=outcome.status, status=outcome.status, **head)]

        stored: list[StoredImage | ImageFailure | None] = [None] * len(result.images)

        async def download(ref: ImageRef) -> None:
            async with self.download_slots:
                stored[ref.index] = await self.store.store(ref.url)

        if len(result.images) == 1:
            await download(result.images[0])
        else:
            async with anyio.create_task_group() as tg:
                for ref in result.images:
                    tg.start_soon(download, ref)

        fields = [
            self.image_fields(head, ref, got)
            for ref, got in zip(result.images, stored, strict=True)
        ]
        statuses = {f["status"] for f in fields}
        status = OK if statuses == {OK} else ERROR if ERROR in statuses else FAILED
        return [ManifestRow(request_status=status, **f) for f in fields]

    def image_fields(
        self, head: dict[str, Any], ref: ImageRef, got: StoredImage | ImageFailure | None
    ) -> dict[str, Any]:
        """The fields of an image's row, but for ``request_status``."""
        row = {
            **head,
            "status": OK,
            "image_index": ref.index,
            "image_url": describe_url(ref.url),
            "content_type": ref.content_type,
            "width": ref.width,
            "height": ref.height,
            "has_nsfw_concept": ref.has_nsfw_concept,
        }
        if isinstance(got, StoredImage):
            if got.new:
                self.stats.images_new += 1
                self.stats.bytes_new += got.bytes
            else:
                self.stats.images_existing += 1
            self.stats.bytes_downloaded += got.bytes
            row.update(sha256=got.sha256, path=got.path, bytes=got.bytes, stored_new=got.new)
            return row
        assert got is not None, "every download task fills its slot"
        self.stats.images_failed += 1
        row.update(status=got.status, error=got.error)
        if got.http_status:
            row["http_status"] = got.http_status
        return row

    async def run(
        self,
        files: list[reader.InputFile],
        done: reader.PairSet,
        on_tick: Callable[[RunStats], None] | None,
        tick: float,
    ) -> None:
        config = self.config
        async with open_client(
            max_connections=config.concurrency + config.image_concurrency,
            connect_timeout=config.connect_timeout,
            read_timeout=config.read_timeout,
        ) as client:
            self.fetcher = ResultFetcher(
                client,
                base_url=config.base_url,
                authorization=config.authorization,
                policy=config.retry,
                limiter=self.limiter,
                rng=self.rng,
            )
            self.store = ImageStore(
                client,
                self.layout,
                policy=config.retry,
                rng=self.rng,
                max_bytes=config.max_image_bytes,
            )
            async with anyio.create_task_group() as tg:
                if threading.current_thread() is threading.main_thread():
                    tg.start_soon(self.watch_signals, tg.cancel_scope)
                if on_tick is not None:
                    tg.start_soon(self.ticker, on_tick, tick)
                async with anyio.create_task_group() as work:
                    await self.produce(files, done, work)
                tg.cancel_scope.cancel()

    async def watch_signals(self, scope: anyio.CancelScope) -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                log.warning(
                    "received %s: stopping; finished rows are kept", signal.Signals(signum).name
                )
                self.stats.interrupted = True
                scope.cancel()
                return

    async def ticker(self, on_tick: Callable[[RunStats], None], tick: float) -> None:
        while True:
            self.refresh()
            on_tick(self.stats)
            await anyio.sleep(tick)

    def refresh(self) -> None:
        self.stats.throttled = self.limiter.throttled
        self.stats.lowest_rps = self.limiter.lowest_rate
        fetcher = getattr(self, "fetcher", None)
        store = getattr(self, "store", None)
        self.stats.result_requests = fetcher.sent if fetcher else 0
        self.stats.retries = (fetcher.retries if fetcher else 0) + (store.retries if store else 0)


def harvest(
    config: HarvestConfig,
    *,
    on_start: Callable[[RunStats], None] | None = None,
    on_tick: Callable[[RunStats], None] | None = None,
    tick: float = 0.5,
    run_id: str | None = None,
) -> RunStats:
    """Run one harvest to the end and return its stats (``stats.exit_code`` says how it went).

    Raises ``HarvesterError`` subclasses for run-level problems: bad options, unusable input,
    a rejected key, a locked or unwritable output folder. ``run_id`` names the run (default:
    a fresh ``new_run_id``), so a caller can tag its log lines before the run starts.
    """
    config.validate()
    files = reader.inspect(config.inputs)
    layout = Layout(config.out_dir)
    layout.prepare()
    started = datetime.now(UTC)
    stats = RunStats(
        run_id=run_id or new_run_id(started),
        started_at=started,
        out_dir=config.out_dir,
        inputs=files,
        rows_in_input=sum(f.rows for f in files),
    )
    with exclusive(layout):
        stats.temp_files_cleaned = layout.clean_temp()
        done = reader.PairSet(
            reader.pair_key(m, r) for m, r in manifest.ok_pairs(config.out_dir).iter_rows()
        )
        run = _Run(config, stats, layout)
        if on_start is not None:
            on_start(stats)
        # Everything allocated so far (modules, the done set) lives for the whole run: keep it
        # out of the cyclic collector's scans, which otherwise revisit it again and again.
        gc.freeze()
        try:
            anyio.run(run.run, files, done, on_tick, tick, backend_options=EVENT_LOOP_OPTIONS)
        except KeyboardInterrupt:
            stats.interrupted = True
        except HarvesterError as exc:
            stats.fail(exc)
            raise
        except BaseExceptionGroup as group:
            # Task groups wrap what their tasks raise; report our own error plainly.
            first = _first_harvester_error(group)
            if first is None:
                raise
            stats.fail(first)
            raise first from None
        finally:
            gc.unfreeze()
            run.refresh()
            stats.finished_at = datetime.now(UTC)
            try:
                run.writer.flush()
            except OutputError as exc:
                stats.fail(exc)
                raise
            finally:
                stats.manifest_rows = run.writer.rows_written
                stats.manifest_parts = run.writer.parts_written
                _write_record(layout, stats)
    return stats


def _first_harvester_error(group: BaseExceptionGroup[BaseException]) -> HarvesterError | None:
    for exc in group.exceptions:
        if isinstance(exc, HarvesterError):
            return exc
        if isinstance(exc, BaseExceptionGroup):
            found = _first_harvester_error(exc)
            if found is not None:
                return found
    return None


def _write_record(layout: Layout, stats: RunStats) -> None:
    path = layout.runs / f"{stats.run_id}.json"
    tmp = layout.temp_path(".json")
    try:
        layout.runs.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(stats.record(), indent=2) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write run record {path}: {exc.strerror or exc}") from exc


__all__ = ["HarvestConfig", "HarvesterError", "RunStats", "api_key_from_env", "harvest"]

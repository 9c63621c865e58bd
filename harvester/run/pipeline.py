"""The harvest: read -> fetch -> store -> write, wired with bounded concurrency.

    producer (reader)  --backlog slots-->  one task per request:
        fetch (``fetch_slots``, shared rate limiter)  ->  images (``download_slots``)  ->  manifest

A request holds a backlog slot from the moment it is read until its rows are written, so the
number of requests in memory is bounded whatever the input size. Fetch and download slots are
separate, so a result fetch never queues behind an image download.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

import anyio
import anyio.abc
import httpx

from harvester.api.retry import RetryPolicy
from harvester.errors import (
    ExitCode,
    HarvesterError,
    OutputError,
    UsageError,
    first_harvester_error,
)
from harvester.run import reader
from harvester.run.reader import BadRow, Pair
from harvester.run.worker import (
    EVENT_LOOP_OPTIONS,
    Lane,
    LaneSettings,
    WorkerProcess,
    quiet_gc,
    run_local,
)
from harvester.storage import manifest
from harvester.storage.layout import Layout
from harvester.storage.lock import exclusive
from harvester.storage.manifest import EXPIRED, INVALID, OK, ManifestRow, ManifestWriter
from harvester.units import size

log = logging.getLogger("harvester")

DEFAULT_BASE_URL: Final = "https://queue.fal.run"
FAL_QUEUE_HOST: Final = "queue.fal.run"
AUTH_SCHEMES: Final = ("auto", "bearer", "key")
KEY_ENV_VARS: Final = ("HARVESTER_API_KEY", "FAL_KEY")
IMAGE_SLOTS_PER_FETCH: Final = 2
"""A result has 1.75 images on average, and an image takes about as long as a result: two
download slots per fetch slot keep every fetch slot busy, on a slow link too (README
"Performance" has the measurements)."""
PAIR_BUFFER: Final = 256
"""Pairs read ahead of the lanes."""
AUTO_WORKERS_MIN_RPS: Final = 500.0
"""With ``workers`` unset, a run allowed at least this many requests per second gets one
process per core (up to ``AUTO_WORKERS_MAX``). One process does 600-800 requests a second on
one core of the bench machine (README "Performance"), and two cost more CPU in all than one:
below this, one process keeps up."""
AUTO_WORKERS_MAX: Final = 4


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
    image_concurrency: int | None = None
    """Image downloads in flight; None: ``IMAGE_SLOTS_PER_FETCH`` per result fetch."""
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
    workers: int | None = None
    """Processes that fetch and download (this one included); None: one per core, up to
    ``AUTO_WORKERS_MAX``, when ``rps`` is at least ``AUTO_WORKERS_MIN_RPS``, else one."""
    give_up_after: float = 7.0
    """Days: a request never ok this long after its first row gets a final ``expired`` row
    and is no longer fetched."""
    retry_expired: bool = False
    """Fetch given-up (``expired``) requests again, and give up on none in this run."""

    @property
    def lanes(self) -> int:
        """How many lanes the work is split into (each needs at least one fetch slot)."""
        wanted = self.workers
        if wanted is None:
            cores = os.cpu_count() or 1
            wanted = min(cores, AUTO_WORKERS_MAX) if self.rps >= AUTO_WORKERS_MIN_RPS else 1
        # Each lane needs a fetch slot, a download slot and a whole request per second of its
        # own (see ``lane_rps``).
        return max(1, min(wanted, self.concurrency, self.image_slots, math.floor(self.rps)))

    def lane_rps(self, index: int) -> float:
        """Lane ``index``'s share of ``rps``. A lane's limiter lets at most ``floor(its rate)``
        requests start in any one-second window, so the shares are whole numbers that add up
        to ``floor(rps)`` (then scaled by ``rps / floor(rps)``): the lanes' windows together
        never hold more than ``rps`` starts, and their rates add up to ``rps``."""
        n = self.lanes
        if n == 1:
            return self.rps
        whole = math.floor(self.rps)
        return (whole // n + (1 if index < whole % n else 0)) * self.rps / whole

    @property
    def image_slots(self) -> int:
        """Image downloads in flight: as set, or ``IMAGE_SLOTS_PER_FETCH`` per fetch slot."""
        if self.image_concurrency is not None:
            return self.image_concurrency
        return IMAGE_SLOTS_PER_FETCH * self.concurrency

    def lane_settings(self, run_id: str, index: int) -> LaneSettings:
        """Lane ``index``'s share: the concurrencies and ``rps`` split so that all lanes
        together never exceed them."""
        n = self.lanes

        def share(total: int) -> int:
            return total // n + (1 if index < total % n else 0)

        return LaneSettings(
            run_id=run_id,
            out_dir=self.out_dir,
            base_url=self.base_url,
            authorization=self.authorization,
            concurrency=share(self.concurrency),
            image_concurrency=share(self.image_slots),
            rps=self.lane_rps(index),
            retry=self.retry,
            pending_wait=self.pending_wait,
            max_image_bytes=self.max_image_bytes,
            connect_timeout=self.connect_timeout,
            read_timeout=self.read_timeout,
            seed=None if self.seed is None else self.seed + index,
            log_levels={
                name: logging.getLogger(name).getEffectiveLevel() for name in ("harvester", "httpx")
            },
        )

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
            (self.image_slots >= 1, "--image-concurrency must be at least 1"),
            (self.workers is None or self.workers >= 1, "--workers must be at least 1"),
            (self.rps > 0, "--rps must be greater than 0"),
            (self.retry.max_attempts >= 1, "--max-attempts must be at least 1"),
            (self.retry.budget > 0, "--retry-budget must be greater than 0"),
            (self.pending_wait >= 0, "--pending-wait must not be negative"),
            (self.max_image_bytes >= 1, "--max-image-bytes must be at least 1"),
            (self.give_up_after > 0, "--give-up-after must be greater than 0 days"),
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
    processes: int = 1
    """Processes that fetched and downloaded (``--workers``, as the run resolved it)."""
    temp_files_cleaned: int = 0
    rps: float = 0.0
    """``--rps``: the rate the limiters start at and return to."""
    lowest_rps: float = 0.0
    """The rate limiters' lowest rate in the run (they slow down when many answers are 429s)."""
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

    def crash(self, exc: BaseException) -> None:
        """Record an unexpected error (a bug), so the run record does not say the run was ok;
        from a task group's exceptions, the first one raised."""
        while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
            exc = exc.exceptions[0]
        self.error = f"unexpected error (a bug): {type(exc).__name__}: {exc}"
        self.error_code = ExitCode.BUG

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
            f"run {self.run_id}: {done:,} requests in {self.elapsed:.1f} s ({rate:,.1f} req/s"
            + (f", {self.processes} processes)" if self.processes > 1 else ")"),
            f"  by status:  {by_status}",
            f"  skipped:    {self.skipped_done:,} already ok in earlier runs (or expired), "
            f"{self.duplicates:,} duplicate rows",
            f"  images:     {self.images_new:,} new, {self.images_existing:,} already stored, "
            f"{self.images_failed:,} failed; {size(self.bytes_new)} new on disk",
            f"  api:        {self.result_requests:,} result requests "
            f"({self.result_requests / self.elapsed:,.1f}/s), {self.retries:,} retries, "
            f"{self.throttled:,} rate-limited (429)"
            + (
                f", rate cut to {self.lowest_rps:,.1f}/s at the lowest"
                if self.lowest_rps < self.rps * 0.999  # lanes split --rps in float shares
                else ""
            ),
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
            "processes": self.processes,
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
        self.writer = ManifestWriter(
            layout,
            stats.run_id,
            rows_per_part=config.rows_per_part,
            seconds_per_part=config.seconds_per_part,
            autoflush=False,
        )
        self.expire = reader.PairSet()
        """Pairs given up on in this run: written as ``expired`` rows, never fetched."""
        self.local = Lane(config.lane_settings(stats.run_id, 0))
        self.remotes = [
            WorkerProcess(i, config.lane_settings(stats.run_id, i)) for i in range(1, config.lanes)
        ]

    async def write(self, rows: list[ManifestRow]) -> None:
        self.writer.add(rows)
        if self.writer.due:
            await self.writer.flush_in_thread()
        self.stats.manifest_rows = self.writer.rows_written
        self.stats.manifest_parts = self.writer.parts_written

    async def deliver(self, rows: list[ManifestRow]) -> None:
        """The rows of one finished request, from any lane."""
        stats = self.stats
        stats.requests[rows[0].request_status] += 1
        for row in rows:
            if row.image_index is None:
                continue
            if row.sha256 is None:
                stats.images_failed += 1
                continue
            size = row.bytes or 0
            stats.bytes_downloaded += size
            if row.stored_new:
                stats.images_new += 1
                stats.bytes_new += size
            else:
                stats.images_existing += 1
        await self.write(rows)

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

    def expired_row(self, pair: Pair) -> ManifestRow:
        self.stats.requests[EXPIRED] += 1
        days = self.config.give_up_after
        return ManifestRow(
            run_id=self.stats.run_id,
            harvested_at=datetime.now(UTC),
            source_file=pair.source,
            source_line=pair.line,
            model=pair.model,
            request_id=pair.request_id,
            request_status=EXPIRED,
            status=EXPIRED,
            error=f"given up: not ok in the {days:g} days since first seen (--give-up-after); "
            "not fetched again unless a run is given --retry-expired",
        )

    async def produce(
        self,
        files: list[reader.InputFile],
        done: reader.PairSet,
        pairs: anyio.abc.ObjectSendStream[Pair],
    ) -> None:
        """Read the inputs in batches; every pair to be harvested goes to whichever lane
        takes it first (a lane takes one when it has room)."""
        counts = reader.ReadCounts()
        batches = reader.iter_items(files, done=done, counts=counts)
        async with pairs:
            while True:
                batch = await anyio.to_thread.run_sync(next, batches, None)
                self.stats.skipped_done = counts.already_done
                self.stats.duplicates = counts.duplicates
                if batch is None:
                    return
                bad = [self.bad_row(item) for item in batch if isinstance(item, BadRow)]
                expired = [
                    self.expired_row(item)
                    for item in batch
                    if self.expire
                    and isinstance(item, Pair)
                    and reader.pair_key(item.model, item.request_id) in self.expire
                ]
                if bad or expired:
                    await self.write(bad + expired)
                try:
                    for item in batch:
                        if isinstance(item, Pair) and not (
                            expired and reader.pair_key(item.model, item.request_id) in self.expire
                        ):
                            await pairs.send(item)
                except anyio.BrokenResourceError:
                    # Every lane has stopped taking pairs: one of them failed (a rejected key,
                    # a dead worker) and its error ends the run. Raising here instead would
                    # cancel the lanes' clean-up and could hide that error.
                    return

    async def run(
        self,
        files: list[reader.InputFile],
        done: reader.PairSet,
        on_tick: Callable[[RunStats], None] | None,
        tick: float,
    ) -> None:
        async with anyio.create_task_group() as tg:
            if threading.current_thread() is threading.main_thread():
                tg.start_soon(self.watch_signals, tg.cancel_scope)
            if on_tick is not None:
                tg.start_soon(self.ticker, on_tick, tick)
            send, receive = anyio.create_memory_object_stream[Pair](PAIR_BUFFER)
            async with anyio.create_task_group() as work:
                with receive:
                    work.start_soon(run_local, self.local, receive.clone(), self.deliver)
                    for remote in self.remotes:
                        work.start_soon(remote.run, receive.clone(), self.deliver)
                await self.produce(files, done, send)
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
        counters = [self.local.counters(), *(r.counters for r in self.remotes)]
        self.stats.result_requests = sum(c.sent for c in counters)
        self.stats.retries = sum(c.retries for c in counters)
        self.stats.throttled = sum(c.throttled for c in counters)
        self.stats.lowest_rps = sum(c.lowest_rate for c in counters)


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
        processes=config.lanes,
        rps=config.rps,
        lowest_rps=config.rps,
    )
    if config.workers is not None and config.lanes < config.workers:
        log.info(
            "using %d processes, not %d: each needs a fetch slot, a download slot and a whole "
            "request per second of its own",
            config.lanes,
            config.workers,
        )
    with exclusive(layout):
        stats.temp_files_cleaned = layout.clean_temp()
        done = reader.PairSet(reader.pair_key(m, r) for m, r in manifest.ok_pairs(config.out_dir))
        run = _Run(config, stats, layout)
        if not config.retry_expired:
            _give_up(config, started, done, run.expire)
        if on_start is not None:
            on_start(stats)
        try:
            with quiet_gc():
                anyio.run(run.run, files, done, on_tick, tick, backend_options=EVENT_LOOP_OPTIONS)
        except KeyboardInterrupt:
            stats.interrupted = True
        except HarvesterError as exc:
            stats.fail(exc)
            raise
        except BaseExceptionGroup as group:
            # Task groups wrap what their tasks raise; report our own error plainly.
            first = first_harvester_error(group)
            if first is None:
                stats.crash(group)
                raise
            stats.fail(first)
            raise first from None
        except Exception as exc:
            stats.crash(exc)
            raise
        finally:
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


def _give_up(
    config: HarvestConfig, now: datetime, done: reader.PairSet, expire: reader.PairSet
) -> None:
    """Add to ``done`` the pairs given up on in earlier runs (skipped like ok ones) and to
    ``expire`` those never ok ``give_up_after`` days after their first row."""
    cutoff = now - timedelta(days=config.give_up_after)
    for aged in manifest.aged_pairs(config.out_dir, first_seen_before=cutoff):
        key = reader.pair_key(aged.model, aged.request_id)
        if aged.expired:
            done.add(key)
        elif key not in done:
            expire.add(key)


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

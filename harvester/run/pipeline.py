"""The harvest, as its driver runs it: read the inputs, split them into shards, run the
shards, add up their counters, write the run record.

    driver: CSV exports -> unique pairs not yet ok -> one file of pairs per shard
            (``shard_of``: a stable hash of the pair)
    shards: run_shard(spec) each, by an engine (``harvester.run.engine``): in this process
            (one shard), a local process pool (several), or Ray tasks on a cluster
            (``engine="ray"``): fetch -> images -> manifest parts of their own -> counters
    driver: RunStats from the counters -> summary, run record (exit code and reason)

The run record is written when the run starts (state ``running``) and completed when it
ends, whatever ends it; a record left ``running`` tells ``status`` the run crashed.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import threading
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Final, NamedTuple, TextIO

import anyio

from harvester import errors
from harvester.errors import (
    ExitCode,
    HarvesterError,
    LockedError,
    OutputError,
    UsageError,
    WorkerError,
    first_harvester_error,
)
from harvester.run import reader
from harvester.run.config import HarvestConfig
from harvester.run.engine import Engine, Failure
from harvester.run.engine.local import ChildLogging, LocalEngine
from harvester.run.reader import BadRow, Pair
from harvester.run.shard import (
    ShardResult,
    ShardSpec,
    read_progress,
    run_shard,
    shard_of,
    stop_path,
    work_dir,
    write_pairs,
)
from harvester.run.stats import RunStats, baseline_not_ok
from harvester.storage import generations, manifest, runs
from harvester.storage.manifest import EXPIRED, INVALID, ManifestRow, ManifestWriter
from harvester.storage.objects import REMOTE_TEMP, Held, Store

if TYPE_CHECKING:
    from ray.actor import ActorHandle

    from harvester.run.engine.limiter import RateLimiterActor
    from harvester.run.engine.ray import RayBoard, RayEngine

log = logging.getLogger("harvester")

KEY_ENV_VARS: Final = ("HARVESTER_API_KEY", "FAL_KEY")


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


def new_run_id(now: datetime) -> str:
    """Sortable and unique: ``20261124T031500.123Z-3f9a1c``. Runs on one folder are serialised
    by its lock, so the milliseconds keep a later run's id above an earlier one's."""
    return f"{now:%Y%m%dT%H%M%S}.{now.microsecond // 1000:03d}Z-{secrets.token_hex(3)}"


class Observed(NamedTuple):
    """What a tick reads from the running shards (``_Run.observe``)."""

    progress: dict[int, ShardResult]
    lowest_rate: float | None
    """The cluster limiter's lowest rate; None without a cluster (or if it cannot be read)."""


class _Run:
    """One harvest's driver; ``harvest`` below is the public entry point."""

    def __init__(
        self,
        config: HarvestConfig,
        stats: RunStats,
        *,
        shards: int,
        cluster: Cluster | None = None,
    ) -> None:
        self.config = config
        self.count = shards
        self.cluster = cluster
        self.limiter = None if cluster is None else cluster.limiter
        """The cluster's rate limiter actor (Ray), handed to every shard; None: local."""
        self.board = None if cluster is None else cluster.board
        """The run's progress board (Ray, with an S3 output); None: the work folder's files."""
        self.store = config.out
        self.stats = stats
        self.writer = ManifestWriter(
            config.out,
            stats.run_id,
            rows_per_part=config.rows_per_part,
            seconds_per_part=config.seconds_per_part,
        )
        """The driver's own part: invalid input rows."""
        self.invalid = 0
        self.expired = 0
        self.expire: set[int] = set()
        """Pairs given up on in this run: written as ``expired`` rows, never fetched."""
        self.specs: list[ShardSpec] = []
        self.results: dict[int, ShardResult] = {}
        self.dead: list[str] = []
        self.lease: Held | None = None
        """An S3 prefix's lease: lost (taken over after a stall), the shards are stopped."""
        self.lease_lost: LockedError | None = None

    def bad_row(self, bad: BadRow) -> ManifestRow:
        log.warning("%s:%d: invalid row: %s", bad.source, bad.line, bad.reason)
        self.invalid += 1
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
        self.expired += 1
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

    def split(self, files: list[reader.InputFile], done: set[int]) -> None:
        """Read the inputs once: invalid rows into the manifest, every pair to harvest into
        its shard's file (memory stays flat: only the duplicates' digests are kept)."""
        config, run_id = self.config, self.stats.run_id
        folder = work_dir(config.out, run_id)
        count = self.count
        counts = reader.ReadCounts()
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with ExitStack() as stack:
                outs: list[TextIO] = []
                for index in range(count):
                    path = folder / f"shard-{index:04d}.pairs.jsonl"
                    outs.append(stack.enter_context(path.open("w", encoding="utf-8")))
                    self.specs.append(self.spec(index, path))
                for batch in reader.iter_items(files, done=done, counts=counts):
                    bad = [self.bad_row(item) for item in batch if isinstance(item, BadRow)]
                    if bad:
                        self.writer.add(bad)
                    for item in batch:
                        if not isinstance(item, Pair):
                            continue
                        if (
                            self.expire
                            and reader.pair_key(item.model, item.request_id) in self.expire
                        ):
                            self.writer.add([self.expired_row(item)])
                        else:
                            write_pairs(outs[shard_of(item.model, item.request_id, count)], item)
        except OSError as exc:
            raise OutputError(
                f"cannot write the run's shard files under {folder}: {exc.strerror or exc}"
            ) from exc
        finally:
            self.stats.skipped_done = counts.already_done
            self.stats.duplicates = counts.duplicates
            self.refresh()

    def spec(self, index: int, pairs: Path) -> ShardSpec:
        config, run_id, cluster = self.config, self.stats.run_id, self.cluster
        lane = config.lane_settings(
            run_id, index, count=self.count, shared_rate=cluster is not None
        )
        return ShardSpec(
            run_id=run_id,
            index=index,
            count=self.count,
            pairs_path=pairs,
            lane=lane,
            rows_per_part=config.rows_per_part,
            seconds_per_part=config.seconds_per_part,
            limiter=self.limiter,
            pairs_key=None if self.board is None else f"{REMOTE_TEMP}{run_id}/{pairs.name}",
            board=self.board,
            logging=None if cluster is None else cluster.logging,
        )

    def upload_pairs(self) -> None:
        """The shards' pairs files into the store, for nodes that cannot read this disk
        (streamed in parts: memory stays flat; each local file is gone once uploaded)."""
        for spec in self.specs:
            if spec.pairs_key is not None:
                self.store.put(spec.pairs_key, spec.pairs_path)

    def stop(self) -> None:
        """Ask every shard to stop (they keep what they finished)."""
        if self.board is not None:
            if not self.board.stop():
                log.warning("cannot ask the shards to stop: the run's board actor is gone")
            return
        try:
            stop_path(self.store, self.stats.run_id).touch()
        except OSError as exc:
            log.warning("cannot ask the shards to stop: %s", exc)

    def progress(self) -> dict[int, ShardResult]:
        """Every shard's last posted counters: the board's, or the progress files."""
        if self.board is None:
            return {s.index: p for s in self.specs if (p := read_progress(s)) is not None}
        found = {}
        for index, data in self.board.snapshot().items():
            try:
                found[index] = ShardResult.from_json(data)
            except TypeError:
                continue
        return found

    def observe(self) -> Observed:
        """What the running shards posted, and the cluster limiter's lowest rate: calls to
        Ray's actors on a cluster (a ticker runs this on a thread: each may take seconds)."""
        progress = self.progress() if len(self.results) < len(self.specs) else {}
        lowest = None
        if self.cluster is not None:
            lowest = self.cluster.engine.lowest_rate(self.cluster.limiter)
        return Observed(progress, lowest)

    def refresh(self, observed: Observed | None = None) -> list[ShardResult]:
        """The counters of every shard (its result, else its last progress) into the stats."""
        stats = self.stats
        progress, lowest = observed if observed is not None else self.observe()
        seen = [self.results.get(s.index) or progress.get(s.index) for s in self.specs]
        shards = [r for r in seen if r is not None]
        stats.requests = Counter(
            {status: n for status, n in ((INVALID, self.invalid), (EXPIRED, self.expired)) if n}
        )
        stats.images_new = stats.images_existing = stats.images_failed = 0
        stats.bytes_new = stats.bytes_downloaded = 0
        stats.result_requests = stats.retries = stats.throttled = 0
        stats.lowest_rps = 0.0
        stats.nodes = set()
        stats.waiting_pending, stats.waiting_until = 0, None
        stats.manifest_rows, stats.manifest_parts = (
            self.writer.rows_written,
            self.writer.parts_written,
        )
        for result in shards:
            stats.add(result)
        if self.cluster is not None:
            # Each shard may use the whole --rps; the cluster's one rate is the limiter's.
            stats.lowest_rps = self.config.rps if lowest is None else lowest
        return shards

    def run_inline(self, on_tick: Callable[[RunStats], None] | None, tick: float) -> None:
        """One shard, in this process (on a thread: this one watches signals and ticks)."""
        (spec,) = self.specs

        def wait() -> None:
            self.results[spec.index] = run_shard(spec)

        anyio.run(self.drive, wait, on_tick, tick)

    def run_engine(
        self, engine: Engine, on_tick: Callable[[RunStats], None] | None, tick: float
    ) -> None:
        """Several shards, run by ``engine`` (a local pool, or Ray on a cluster); a shard whose
        process or node died runs again (``max_retries``); one that keeps dying is reported."""
        failures: list[Failure[ShardSpec]] = []

        def on_result(spec: ShardSpec, result: ShardResult) -> None:
            self.results[spec.index] = result

        def wait() -> None:
            failures.extend(
                engine.run(
                    run_shard,
                    iter(self.specs),
                    on_result=on_result,
                    max_retries=self.config.max_retries,
                )
            )

        anyio.run(self.drive, wait, on_tick, tick)
        bug: Failure[ShardSpec] | None = None
        for failure in sorted(failures, key=lambda f: f.spec.index):
            spec = failure.spec
            if failure.exit_code != ExitCode.WORKER:
                bug = bug or failure
                continue
            progress = self.progress().get(spec.index)
            if progress is not None:
                self.results[spec.index] = progress
            pid = f"pid {progress.pid}" if progress else "pid unknown"
            self.dead.append(f"shard {spec.index} of {spec.count} ({pid})")
        if bug is not None:
            exc = HarvesterError(f"shard {bug.spec.index} of {bug.spec.count} failed: {bug.error}")
            exc.exit_code = bug.exit_code
            raise exc
        if self.dead:
            retries = self.config.max_retries
            raise WorkerError(
                f"the process of {', '.join(self.dead)} died (killed, or out of memory"
                + (f"; {retries + 1} times" if retries else "")
                + "); the rows finished so far are kept, requests still in flight are not "
                "recorded and the next run retries them"
            )

    async def drive(
        self,
        wait: Callable[[], None],
        on_tick: Callable[[RunStats], None] | None,
        tick: float,
    ) -> None:
        async with anyio.create_task_group() as tg:
            if threading.current_thread() is threading.main_thread():
                tg.start_soon(self.watch_signals)
            tg.start_soon(self.ticker, on_tick, tick)
            await anyio.to_thread.run_sync(wait)
            tg.cancel_scope.cancel()

    async def watch_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                log.warning(
                    "received %s: stopping; finished rows are kept", signal.Signals(signum).name
                )
                self.stats.interrupted = True
                await anyio.to_thread.run_sync(self.stop)

    async def ticker(self, on_tick: Callable[[RunStats], None] | None, tick: float) -> None:
        stopped = False
        while True:
            # Off the event loop: a busy actor would hold up the ticks and the signals.
            observed = await anyio.to_thread.run_sync(self.observe)
            shards = self.refresh(observed)
            if not stopped and any(r.error_code is not None for r in shards):
                stopped = True
                # A run-level error in one shard (a rejected key) ends them all.
                await anyio.to_thread.run_sync(self.stop)
            if not stopped and self.lease is not None and self.lease.lost:
                stopped = True
                try:
                    self.lease.check()
                except LockedError as exc:
                    self.lease_lost = exc
                await anyio.to_thread.run_sync(self.stop)  # another run owns the prefix now
            if on_tick is not None:
                on_tick(self.stats)
            await anyio.sleep(tick)

    def finish(self) -> None:
        """Raise the first shard's run-level error (a rejected key, an unreachable API), as
        the CLI reports it, or the loss of the lease."""
        if self.lease_lost is not None:
            raise self.lease_lost
        for index in sorted(self.results):
            result = self.results[index]
            if result.error is not None and result.error_code is not None:
                cls = getattr(errors, result.error_type or "", None)
                if not (isinstance(cls, type) and issubclass(cls, HarvesterError)):
                    cls = HarvesterError
                exc = cls(result.error)
                exc.exit_code = ExitCode(result.error_code)
                raise exc

    def flush(self) -> None:
        try:
            self.writer.flush()
        finally:
            self.refresh()


def harvest(
    config: HarvestConfig,
    *,
    on_start: Callable[[RunStats], None] | None = None,
    on_tick: Callable[[RunStats], None] | None = None,
    tick: float = 0.5,
    run_id: str | None = None,
    log_format: str = "text",
) -> RunStats:
    """Run one harvest to the end and return its stats (``stats.exit_code`` says how it went).

    Raises ``HarvesterError`` subclasses for run-level problems: bad options, unusable input,
    a rejected key, a locked or unwritable output folder. ``run_id`` names the run (default:
    a fresh ``new_run_id``), so a caller can tag its log lines before the run starts;
    ``log_format`` (text or json) is how shards in other processes write their log lines.
    """
    config.validate()
    files = reader.inspect(config.inputs, columns=config.columns)
    config.out.prepare()
    started = datetime.now(UTC)
    stats = RunStats(
        run_id=run_id or new_run_id(started),
        started_at=started,
        out_dir=config.out.location,
        inputs=files,
        rows_in_input=sum(f.rows for f in files),
        processes=config.lanes,
        rps=config.rps,
        lowest_rps=config.rps,
        shards=config.lanes,
    )
    with ExitStack() as cleanup:
        engine, shards, cluster = _engine(config, stats, log_format, cleanup)
        stats.processes = stats.shards = shards
        _harvest(config, stats, files, on_start, on_tick, tick, engine, shards, cluster)
    return stats


@dataclass(frozen=True, slots=True, kw_only=True)
class Cluster:
    """A Ray run's engine and the run's actors on the driver's node."""

    engine: RayEngine
    limiter: ActorHandle[RateLimiterActor]
    """The cluster's rate limiter actor."""
    board: RayBoard | None
    """The progress board (with an S3 output: the nodes share no disk with the driver)."""
    logging: ChildLogging
    """How the shards log on the workers (the key masked: it travels in the spec too)."""


def _engine(
    config: HarvestConfig, stats: RunStats, log_format: str, cleanup: ExitStack
) -> tuple[Engine | None, int, Cluster | None]:
    """The engine that runs the shards, how many shards, and the Ray cluster's actors.
    None: one shard, in this process."""
    setup = ChildLogging(
        levels={n: logging.getLogger(n).getEffectiveLevel() for n in ("harvester", "httpx")},
        json_run_id=stats.run_id if log_format == "json" else None,
        secrets=(config.api_key,),
    )
    if config.engine == "ray":
        from harvester.run.engine.ray import RayEngine  # the optional extra

        ray_engine = RayEngine(address=config.ray_address, json_lines=log_format == "json")
        cleanup.enter_context(ray_engine)
        nodes = ray_engine.node_count()
        if nodes > 1 and not config.out.everywhere and not config.shared_fs:
            raise UsageError(
                f"--out {config.out.location} is a folder on this machine, and the Ray cluster at "
                f"{ray_engine.address} has {nodes} nodes: each would write images and manifest "
                "parts to its own disk, and could not read the run's shard files. Use a folder "
                "that every node mounts at the same path (NFS, a shared volume) and say so "
                "with --shared-fs (job key shared-fs = true)"
            )
        shards = config.workers or ray_engine.cpus()
        shards = max(1, min(shards, config.concurrency, config.image_slots))
        limiter = ray_engine.start_limiter(config.rps)
        cleanup.callback(ray_engine.stop_actor, limiter)
        board = None
        if config.out.everywhere:  # the nodes share no disk with the driver
            board = ray_engine.start_board(stats.run_id)
            cleanup.callback(ray_engine.stop_actor, board.handle)
        cluster = Cluster(engine=ray_engine, limiter=limiter, board=board, logging=setup)
        return ray_engine, shards, cluster
    if config.lanes == 1:
        return None, 1, None
    return LocalEngine(workers=config.lanes, logging_setup=setup), config.lanes, None


def _harvest(
    config: HarvestConfig,
    stats: RunStats,
    files: list[reader.InputFile],
    on_start: Callable[[RunStats], None] | None,
    on_tick: Callable[[RunStats], None] | None,
    tick: float,
    engine: Engine | None,
    shards: int,
    cluster: Cluster | None,
) -> None:
    if config.workers is not None and config.lanes < config.workers:
        log.info(
            "using %d processes, not %d: each needs a fetch slot, a download slot and a whole "
            "request per second of its own",
            config.lanes,
            config.workers,
        )
    with ExitStack() as held:
        store = config.out
        lease = held.enter_context(store.lock(owner=f"harvester run {stats.run_id}"))
        stats.temp_files_cleaned = store.clean_temp()
        generations.settle(store, generations.read(store))  # what a killed compaction left
        stats.baseline_not_ok = baseline_not_ok(runs.read_all(store)[0])
        runs.write(store, stats.record(running=True))
        run = _Run(config, stats, shards=shards, cluster=cluster)
        run.lease = lease
        try:
            done = {reader.pair_key(m, r) for m, r in manifest.ok_pairs(store)}
            if not config.retry_expired:
                _give_up(config, stats.started_at, done, run.expire)
            if on_start is not None:
                on_start(stats)
            run.split(files, done)
            if run.board is not None:
                run.upload_pairs()
            if engine is None:
                run.run_inline(on_tick, tick)
            else:
                run.run_engine(engine, on_tick, tick)
            run.finish()
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
        except BaseException as exc:
            stats.crash(exc)
            raise
        finally:
            stats.finished_at = datetime.now(UTC)
            try:
                run.flush()
            except OutputError as exc:
                stats.fail(exc)
                raise
            finally:
                runs.write(store, stats.record())
                _remove(work_dir(store, stats.run_id))
                _clean_temp(store)


def _clean_temp(store: Store) -> None:
    """Empty the temp folder at the end of the run, the lock still held and every shard's
    process ended: a shard's process killed while it wrote a manifest part or an image left
    its temp file there (the next run would remove it; until then it is clutter)."""
    try:
        store.clean_temp()
    except (OSError, OutputError) as exc:
        log.warning("cannot empty the temp folder %s: %s", store.temp_dir, exc)


def _remove(folder: Path) -> None:
    import shutil

    shutil.rmtree(folder, ignore_errors=True)


def _give_up(config: HarvestConfig, now: datetime, done: set[int], expire: set[int]) -> None:
    """Add to ``done`` the pairs given up on in earlier runs (skipped like ok ones) and to
    ``expire`` those never ok ``give_up_after`` days after their first row."""
    cutoff = now - timedelta(days=config.give_up_after)
    for aged in manifest.aged_pairs(config.out, first_seen_before=cutoff):
        key = reader.pair_key(aged.model, aged.request_id)
        if aged.expired:
            done.add(key)
        elif key not in done:
            expire.add(key)


__all__ = [
    "HarvestConfig",
    "HarvesterError",
    "RunStats",
    "api_key_from_env",
    "harvest",
]

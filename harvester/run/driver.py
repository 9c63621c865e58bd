"""A harvest's driver: read the inputs into the shards, run them, keep the run's counters, stop
the shards when the run must stop, and write the run record.

    driver: CSV exports -> unique pairs not yet ok -> the shards (``shard_of``: a stable hash
            of the pair): straight from the reader to one shard in this process, or one file
            of pairs per shard for an engine (a local process pool, Ray tasks on a cluster)
    shards: run_shard(spec) each: fetch -> images -> manifest parts of their own -> counters
    driver: the sum of the counters -> summary, run record (exit code and reason)

The run record is written when the run starts (state ``running``) and completed when it
ends, whatever ends it; a record left ``running`` tells ``status`` the run crashed. Progress
goes through the run's one ``Board`` (``harvester.run.engine.setup`` chooses it).
"""

from __future__ import annotations

import logging
import shutil
import signal
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, TextIO

import anyio

from harvester import errors
from harvester.counters import Counters
from harvester.errors import (
    ExitCode,
    HarvesterError,
    LockedError,
    OutputError,
    WorkerError,
    first_harvester_error,
)
from harvester.run import reader
from harvester.run.engine import Failure
from harvester.run.reader import BadRow, Pair
from harvester.run.shard import (
    ShardResult,
    ShardSpec,
    run_shard,
    shard_of,
    work_dir,
    write_pairs,
)
from harvester.run.stats import RunStats, baseline_not_ok
from harvester.statuses import EXPIRED, INVALID
from harvester.storage import generations, manifest, runs
from harvester.storage.manifest import ManifestRow, ManifestWriter
from harvester.storage.objects import REMOTE_TEMP, Held, Store

if TYPE_CHECKING:
    from harvester.run.config import HarvestConfig
    from harvester.run.engine.setup import Setup

log = logging.getLogger("harvester")

OnStats = Callable[[RunStats], None]


class Observed(NamedTuple):
    """What a tick reads from the running shards (``Driver.observe``)."""

    progress: dict[int, ShardResult]
    lowest_rate: float | None
    """The cluster limiter's lowest rate; None without one."""


class Driver:
    """One harvest's driver (``harvester.run.pipeline.harvest`` makes it): ``run`` it once."""

    def __init__(
        self,
        config: HarvestConfig,
        stats: RunStats,
        *,
        setup: Setup,
    ) -> None:
        self.config = config
        self.stats = stats
        self.store: Store = config.out
        self.setup = setup
        self.writer = ManifestWriter(
            config.out,
            stats.run_id,
            rows_per_part=config.rows_per_part,
            seconds_per_part=config.seconds_per_part,
        )
        """The driver's own part: invalid input rows, given-up pairs."""
        self.counts = Counters(requests=Counter({INVALID: 0, EXPIRED: 0}))
        """The driver's own rows and what the reader skipped. Its keys are set up front: a
        tick adds it up on another thread while the reader counts."""
        self.expire: set[int] = set()
        """Pairs given up on in this run: written as ``expired`` rows, never fetched."""
        self.specs: list[ShardSpec] = []
        self.results: dict[int, ShardResult] = {}
        self.lease: Held | None = None
        """The output's lock; a bucket's lease lost (taken over after a stall) stops the
        shards."""
        self.lease_lost: LockedError | None = None

    @property
    def work_dir(self) -> Path:
        """The run's temp folder: the shards' pairs files, their progress (a ``FileBoard``)."""
        return work_dir(self.store, self.stats.run_id)

    def run(
        self,
        files: list[reader.InputFile],
        *,
        on_start: OnStats | None = None,
        on_tick: OnStats | None = None,
        tick: float = 0.5,
    ) -> None:
        """The whole run, under the output's lock; ``stats`` says how it went. Raises what
        ends the run early (``HarvesterError``), after writing the run record."""
        config, stats, store = self.config, self.stats, self.store
        if config.workers is not None and config.lanes < config.workers:
            log.info(
                "using %d processes, not %d: each needs a fetch slot, a download slot and a "
                "whole request per second of its own",
                config.lanes,
                config.workers,
            )
        with ExitStack() as held:
            self.lease = held.enter_context(store.lock(owner=f"harvester run {stats.run_id}"))
            stats.temp_files_cleaned = store.clean_temp()
            generations.settle(store, generations.read(store))  # what a killed compaction left
            stats.baseline_not_ok = baseline_not_ok(runs.read_all(store)[0])
            runs.write(store, stats.record(running=True))
            try:
                done = {
                    k
                    for m, r in manifest.ok_pairs(store)
                    if (k := reader.request_key(m, r)) is not None
                }
                if not config.retry_expired:
                    _give_up(config, stats.started_at, done, self.expire)
                if on_start is not None:
                    on_start(stats)
                self.run_shards(self.read(files, done), on_tick, tick)
                self.finish()
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
                    self.flush()
                except OutputError as exc:
                    stats.fail(exc)
                    raise
                finally:
                    runs.write(store, stats.record())
                    shutil.rmtree(self.work_dir, ignore_errors=True)
                    _clean_temp(store)

    def own_row(self, item: Pair | BadRow, status: str, error: str) -> ManifestRow:
        """A row of the driver's own part (an invalid row, a pair given up on), counted."""
        self.counts.requests[status] += 1
        return ManifestRow(
            run_id=self.stats.run_id,
            harvested_at=datetime.now(UTC),
            source_file=item.source,
            source_line=item.line,
            model=item.model,
            request_id=item.request_id,
            request_status=status,
            status=status,
            error=error,
        )

    def read(self, files: list[reader.InputFile], done: set[int]) -> Iterator[list[Pair]]:
        """The pairs to harvest, in batches, read once as they are asked for: invalid rows
        and given-up pairs go to the driver's own part (memory stays flat: only the
        duplicates' digests are kept)."""
        given_up = (
            f"given up: not ok in the {self.config.give_up_after:g} days since first seen "
            "(--give-up-after); not fetched again unless a run is given --retry-expired"
        )
        for batch in reader.iter_items(files, done=done, counts=self.counts):
            rows: list[ManifestRow] = []
            pairs: list[Pair] = []
            for item in batch:
                if isinstance(item, BadRow):
                    log.warning("%s:%d: invalid row: %s", item.source, item.line, item.reason)
                    error = f"{item.source}:{item.line}: {item.reason}"
                    rows.append(self.own_row(item, INVALID, error))
                elif item.key in self.expire:
                    rows.append(self.own_row(item, EXPIRED, given_up))
                else:
                    pairs.append(item)
            if rows:
                self.writer.add(rows)
            if pairs:
                yield pairs

    def spec(self, index: int, pairs: Path | None = None) -> ShardSpec:
        config, run_id, setup = self.config, self.stats.run_id, self.setup
        key = None
        if setup.pairs_in_store and pairs is not None:
            key = f"{REMOTE_TEMP}{run_id}/{pairs.name}"
        return ShardSpec(
            run_id=run_id,
            index=index,
            count=setup.count,
            board=setup.board,
            pairs_path=pairs,
            lane=config.lane_settings(
                run_id, index, count=setup.count, shared_rate=setup.limiter is not None
            ),
            rows_per_part=config.rows_per_part,
            seconds_per_part=config.seconds_per_part,
            limiter=setup.limiter,
            pairs_key=key,
            logging=setup.logging,
        )

    def run_shards(self, pairs: Iterator[list[Pair]], on_tick: OnStats | None, tick: float) -> None:
        """One shard in this process, its pairs straight from the reader; or every pair into
        its shard's file, and the shards run by the engine."""
        try:
            self.work_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create {self.work_dir}: {exc.strerror or exc}") from exc
        engine = self.setup.engine
        if engine is None:
            spec = self.spec(0)
            self.specs.append(spec)

            def wait() -> None:
                self.results[spec.index] = run_shard(spec, pairs)

            anyio.run(self.drive, wait, on_tick, tick)
            return
        self.write_pairs(pairs)
        failures: list[Failure[ShardSpec]] = []

        def on_result(spec: ShardSpec, result: ShardResult) -> None:
            self.results[spec.index] = result

        def run_all() -> None:
            failures.extend(
                engine.run(
                    run_shard,
                    iter(self.specs),
                    on_result=on_result,
                    max_retries=self.config.max_retries,
                )
            )

        anyio.run(self.drive, run_all, on_tick, tick)
        self.settle(failures)

    def write_pairs(self, pairs: Iterator[list[Pair]]) -> None:
        """Every pair into its shard's file (and those into the bucket, for nodes that cannot
        read this disk: streamed in parts, memory stays flat)."""
        folder = self.work_dir
        try:
            with ExitStack() as stack:
                outs: list[TextIO] = []
                for index in range(self.setup.count):
                    path = folder / f"shard-{index:04d}.pairs.jsonl"
                    outs.append(stack.enter_context(path.open("w", encoding="utf-8")))
                    self.specs.append(self.spec(index, path))
                for batch in pairs:
                    for pair in batch:
                        write_pairs(outs[shard_of(pair, len(outs))], pair)
        except OSError as exc:
            raise OutputError(
                f"cannot write the run's shard files under {folder}: {exc.strerror or exc}"
            ) from exc
        for spec in self.specs:
            if spec.pairs_key is not None and spec.pairs_path is not None:
                self.store.put(spec.pairs_key, spec.pairs_path)

    def settle(self, failures: list[Failure[ShardSpec]]) -> None:
        """Raise what the shards that never finished mean: a bug's error, or the dead
        shards (their last progress counts)."""
        bug: Failure[ShardSpec] | None = None
        dead: list[str] = []
        for failure in sorted(failures, key=lambda f: f.spec.index):
            spec = failure.spec
            if failure.exit_code != ExitCode.WORKER:
                bug = bug or failure
                continue
            progress = self.setup.board.snapshot().get(spec.index)
            if progress is not None:
                self.results[spec.index] = progress
            pid = f"pid {progress.pid}" if progress else "pid unknown"
            dead.append(f"shard {spec.index} of {spec.count} ({pid})")
        if bug is not None:
            exc = HarvesterError(f"shard {bug.spec.index} of {bug.spec.count} failed: {bug.error}")
            exc.exit_code = bug.exit_code
            raise exc
        if dead:
            retries = self.config.max_retries
            raise WorkerError(
                f"the process of {', '.join(dead)} died (killed, or out of memory"
                + (f"; {retries + 1} times" if retries else "")
                + "); the rows finished so far are kept, requests still in flight are not "
                "recorded and the next run retries them"
            )

    def observe(self) -> Observed:
        """What the running shards posted, and the cluster limiter's lowest rate: calls to
        Ray's actors on a cluster (a ticker runs this on a thread: each may take seconds)."""
        progress = self.setup.board.snapshot() if len(self.results) < len(self.specs) else {}
        rate = self.setup.lowest_rate
        return Observed(progress, None if rate is None else rate())

    def refresh(self, observed: Observed | None = None) -> list[ShardResult]:
        """The counters of every shard (its result, else its last progress) into the stats."""
        progress, lowest = observed if observed is not None else self.observe()
        seen = [self.results.get(s.index) or progress.get(s.index) for s in self.specs]
        shards = [r for r in seen if r is not None]
        own = self.counts + Counters(
            manifest_rows=self.writer.rows_written, manifest_parts=self.writer.parts_written
        )
        total = sum((r.counters for r in shards), own)
        if lowest is not None:  # each shard may use the whole --rps: the limiter has the rate
            total.lowest_rps = lowest
        self.stats.counters = total
        return shards

    async def drive(self, wait: Callable[[], None], on_tick: OnStats | None, tick: float) -> None:
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
                await anyio.to_thread.run_sync(self.setup.board.stop)

    async def ticker(self, on_tick: OnStats | None, tick: float) -> None:
        stopped = False
        while True:
            # Off the event loop: a busy actor would hold up the ticks and the signals.
            observed = await anyio.to_thread.run_sync(self.observe)
            shards = self.refresh(observed)
            if not stopped and any(r.error_code is not None for r in shards):
                stopped = True
                # A run-level error in one shard (a rejected key) ends them all.
                await anyio.to_thread.run_sync(self.setup.board.stop)
            if not stopped and self.lease is not None and self.lease.lost:
                stopped = True
                try:
                    self.lease.check()
                except LockedError as exc:
                    self.lease_lost = exc
                await anyio.to_thread.run_sync(self.setup.board.stop)  # another run owns it
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


def _clean_temp(store: Store) -> None:
    """Empty the temp folder at the end of the run, the lock still held and every shard's
    process ended: a shard's process killed while it wrote a manifest part or an image left
    its temp file there (the next run would remove it; until then it is clutter)."""
    try:
        store.clean_temp()
    except (OSError, OutputError) as exc:
        log.warning("cannot empty the temp folder %s: %s", store.temp_dir, exc)


def _give_up(config: HarvestConfig, now: datetime, done: set[int], expire: set[int]) -> None:
    """Add to ``done`` the pairs given up on in earlier runs (skipped like ok ones) and to
    ``expire`` those never ok ``give_up_after`` days after their first row."""
    cutoff = now - timedelta(days=config.give_up_after)
    for aged in manifest.aged_pairs(config.out, first_seen_before=cutoff):
        key = reader.pair_key(aged.model, aged.request_id)
        if aged.expired:
            done.add(key)
        elif key not in done and reader.request_key(aged.model, aged.request_id) not in done:
            expire.add(key)

"""A shard: a self-contained, picklable unit of a run that one function runs to the end.

A run's pairs are split by a stable hash of the pair (``shard_of``) into shards. A shard has
its pairs (handed in when it is the run's only shard, in the driver's process; else a file
under the output folder), its share of ``--rps`` and of both concurrencies, and the output location;
``run_shard`` does its requests with one lane on its own event loop, writes its own manifest
parts (``manifest/<run_id>/shard-SSSS-part-NNNNN.parquet``) and returns its counters. Nothing
per row leaves the shard, so any process (the harvest's own, a local pool's, a cluster
engine's) can run it given the output folder.

While it runs, a shard posts its counters to the run's ``Board`` every ``PROGRESS_SECONDS``
(the harvest shows them, and keeps them if the shard's process dies), and stops, keeping what
it finished, when the board's answer says so.

On a cluster whose nodes share no disk with the driver (an ``s3://`` output on Ray), the
shard's pairs are an object in the bucket (``pairs_key``, under the run's ``.tmp/<run_id>/``):
the shard downloads it into a scratch folder of its own (removed when it ends) and reads it
``BATCH`` pairs at a time; its board is a Ray actor.

A shard may run more than once in a run (an engine runs it again when its process or node
died). Each attempt starts by deleting the manifest parts an earlier attempt of the same shard
wrote, then does all the shard's pairs again (images already stored are found by their
sha256, not downloaded twice): so a pair is never recorded twice in a run, and the
latest-state query needs no dedupe. An earlier attempt must be dead when the next starts, as
Ray and the local pool make sure (a process that outlived its node's loss could still add a
part; ``verify`` and the latest-state query would still hold: the rows say the same).

With ``limiter`` set (a cluster's rate limiter actor, handed in by the Ray engine), the shard's
requests start at the cluster's start times (``--rps`` for the whole cluster).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final, Protocol, TextIO

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectSendStream

from harvester.api.ratelimit import PermitSource
from harvester.counters import Counters
from harvester.errors import HarvesterError, OutputError, first_harvester_error
from harvester.run.engine.local import ChildLogging, install_logging
from harvester.run.reader import Pair
from harvester.run.request import EVENT_LOOP_OPTIONS, Lane, LaneSettings, serve_pairs
from harvester.storage.manifest import ManifestWriter
from harvester.storage.objects import Store
from harvester.storage.rows import ManifestRow

log = logging.getLogger("harvester")

PROGRESS_SECONDS: Final = 0.5
PAIR_BUFFER: Final = 256
"""Pairs read ahead of the lane."""
BATCH: Final = 1_000
"""Pairs read from the shard's file at a time."""


def shard_of(pair: Pair, count: int) -> int:
    """The shard of a pair: from its blake2b digest (``Pair.key``), stable across processes,
    machines and Python versions (unlike ``hash``)."""
    return pair.key % count


def work_dir(store: Store, run_id: str) -> Path:
    """Where a run's shards keep their pairs, progress and the stop flag."""
    return store.temp_dir / run_id


class Board(Protocol):
    """The run's one progress channel: shards post their counters and learn that the run asks
    them to stop; the driver reads their last counters and asks them to stop. ``FileBoard``:
    files in the run's work folder; ``harvester.run.engine.ray.RayBoard``: an actor on the
    driver's node, for nodes that share no disk with it. Pickles into the shards' specs."""

    async def post(self, result: ShardResult) -> bool:
        """Keep a shard's counters; True when the run asks its shards to stop."""
        ...

    def snapshot(self) -> dict[int, ShardResult]:
        """Every shard's last posted counters (none that cannot be read)."""
        ...

    def stop(self) -> None:
        """Ask every shard to stop at its next post (they keep what they finished); a failure
        is logged."""
        ...


@dataclass(frozen=True, slots=True)
class FileBoard:
    """The board as files in the run's work folder: ``shard-SSSS.progress.json`` (written
    atomically) and the ``stop`` flag."""

    folder: Path

    def progress_path(self, index: int) -> Path:
        return self.folder / f"shard-{index:04d}.progress.json"

    async def post(self, result: ShardResult) -> bool:
        if (self.folder / "stop").exists():
            return True
        path = self.progress_path(result.index)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            tmp.write_text(json.dumps(result.to_json()), encoding="utf-8")
            os.replace(tmp, path)
        except OSError as exc:  # the shard goes on: its counters are only shown late
            log.debug("cannot write progress %s: %s", path, exc)
        return False

    def snapshot(self) -> dict[int, ShardResult]:
        found = {}
        for path in self.folder.glob("shard-*.progress.json"):
            try:
                result = ShardResult.from_json(json.loads(path.read_text(encoding="utf-8")))
            except (OSError, ValueError, TypeError, KeyError, AttributeError):
                continue
            found[result.index] = result
        return found

    def stop(self) -> None:
        try:
            (self.folder / "stop").touch()
        except OSError as exc:
            log.warning("cannot ask the shards to stop: %s", exc)


@dataclass(frozen=True, slots=True, kw_only=True)
class ShardSpec:
    """Everything a shard needs; picklable."""

    run_id: str
    index: int
    count: int
    board: Board
    """The run's progress channel."""
    pairs_path: Path | None = None
    """One JSON array of a ``Pair``'s fields per line; None: the pairs are handed to
    ``run_shard`` (a shard in the driver's process)."""
    lane: LaneSettings
    """Its share of ``--rps`` and the concurrencies, the API settings and the store."""
    rows_per_part: int = 5_000
    seconds_per_part: float = 30.0
    limiter: Any = None
    """The cluster's rate limiter (a Ray actor handle), or None: the lane's own rate."""
    pairs_key: str | None = None
    """The pairs as an object in the output store, when the shard's node cannot read
    ``pairs_path`` (an S3 output on a cluster); the shard works in a scratch folder of its
    own then (``Store.on_node``)."""
    logging: ChildLogging | None = None
    """How the shard logs when its process is not one the harvest set up (a Ray worker)."""

    @property
    def on_cluster(self) -> bool:
        return self.limiter is not None

    @property
    def store(self) -> Store:
        return self.lane.store


@dataclass(frozen=True, slots=True, kw_only=True)
class ShardResult:
    """A shard's counters: at the end (what ``run_shard`` returns), or so far (posted to the
    run's board)."""

    index: int
    pid: int = 0
    counters: Counters = field(default_factory=Counters)
    interrupted: bool = False
    error: str | None = None
    error_code: int | None = None
    error_type: str | None = None
    """The name of the ``harvester.errors`` class of ``error``."""

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "pid": self.pid,
            "counters": self.counters.to_json(gauges=True),
            "interrupted": self.interrupted,
            "error": self.error,
            "error_code": self.error_code,
            "error_type": self.error_type,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ShardResult:
        return cls(**{**data, "counters": Counters.from_json(data["counters"])})


def write_pairs(out: TextIO, pair: Pair) -> None:
    out.write(
        json.dumps([pair.model, pair.request_id, pair.source, pair.line, pair.key, pair.path])
    )
    out.write("\n")


def read_pairs(path: Path) -> Iterator[list[Pair]]:
    """A shard's pairs, ``BATCH`` at a time."""
    with path.open(encoding="utf-8") as fh:
        batch: list[Pair] = []
        for line in fh:
            batch.append(Pair(*json.loads(line)))
            if len(batch) >= BATCH:
                yield batch
                batch = []
        if batch:
            yield batch


def part_prefix(index: int) -> str:
    return f"shard-{index:04d}-part"


def forget_earlier_attempts(spec: ShardSpec, store: Store) -> int:
    """Delete the manifest parts an earlier attempt of this shard wrote in this run, so a
    shard that runs again after its process or node died records each pair once; returns
    how many. A first attempt finds none."""
    # Listing goes by whole path segments (object_store): the run's folder, filtered.
    folder = f"manifest/{spec.run_id}/"
    prefix = f"{folder}{part_prefix(spec.index)}-"
    keys = [i.key for i in store.list(folder) if i.key.startswith(prefix)]
    for key in keys:
        store.delete(key)
    if keys:
        log.warning(
            "shard %d of run %s runs again: its earlier attempt's %d manifest parts removed",
            spec.index,
            spec.run_id,
            len(keys),
        )
    return len(keys)


def _permits(spec: ShardSpec) -> PermitSource | None:
    if spec.limiter is None:
        return None
    from harvester.run.engine.ray import cluster_permits  # only on a Ray worker

    return cluster_permits(spec.limiter)


def _lane_settings(spec: ShardSpec, scratch: Path | None) -> LaneSettings:
    """The lane's settings in this process: the scratch folder for temp files, if any."""
    if scratch is None:
        return spec.lane
    return replace(spec.lane, store=spec.store.on_node(scratch))


def _node(spec: ShardSpec) -> str:
    if not spec.on_cluster:
        return ""
    from harvester.run.engine.ray import current_node  # only on a Ray worker

    return current_node()


class _Shard:
    def __init__(self, spec: ShardSpec, scratch: Path | None = None) -> None:
        self.spec = spec
        self.node = _node(spec)
        settings = _lane_settings(spec, scratch)
        if spec.logging is not None:
            install_logging(replace(spec.logging, node=self.node))
        self.store = settings.store
        self.pairs_path = spec.pairs_path
        if spec.pairs_key is not None:
            self.pairs_path = self.download_pairs(spec.pairs_key)
        self.lane = Lane(settings, permits=_permits(spec))
        self.writer = ManifestWriter(
            self.store,
            spec.run_id,
            rows_per_part=spec.rows_per_part,
            seconds_per_part=spec.seconds_per_part,
            autoflush=False,
            prefix=part_prefix(spec.index),
        )
        self.interrupted = False
        self.error: HarvesterError | None = None

    def download_pairs(self, key: str) -> Path:
        """The shard's pairs object, into the scratch folder (streamed: memory stays flat)."""
        path = self.store.temp_dir / "pairs.jsonl"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("wb") as fh:
                for chunk in self.store.iter_bytes(key):
                    fh.write(chunk)
        except OSError as exc:
            raise OutputError(
                f"cannot download shard {self.spec.index}'s pairs into {path}: "
                f"{exc.strerror or exc}"
            ) from exc
        return path

    def result(self) -> ShardResult:
        counters = self.lane.counters() + Counters(
            manifest_rows=self.writer.rows_written,
            manifest_parts=self.writer.parts_written,
            nodes=(self.node,) if self.node else (),
        )
        error = self.error
        return ShardResult(
            index=self.spec.index,
            pid=os.getpid(),
            counters=counters,
            interrupted=self.interrupted,
            error=None if error is None else str(error),
            error_code=None if error is None else int(error.exit_code),
            error_type=None if error is None else type(error).__name__,
        )

    def fail(self, exc: HarvesterError) -> None:
        self.error = self.error or exc

    async def done(self, rows: list[ManifestRow]) -> None:
        self.writer.add(rows)
        if self.writer.due:
            await self.writer.flush_in_thread()

    async def feed(self, batches: Iterator[list[Pair]], send: MemoryObjectSendStream[Pair]) -> None:
        async with send:
            while True:
                batch = await anyio.to_thread.run_sync(next, batches, None)
                if batch is None:
                    return
                try:
                    for pair in batch:
                        try:
                            send.send_nowait(pair)  # no trip through the event loop
                        except anyio.WouldBlock:
                            await send.send(pair)
                except anyio.BrokenResourceError:
                    return  # the lane stopped (a run-level error ends it)

    async def watch(self, scope: anyio.CancelScope) -> None:
        while True:
            await anyio.sleep(PROGRESS_SECONDS)
            if await self.spec.board.post(self.result()):
                self.interrupted = True
                scope.cancel()
                return

    async def run(self, batches: Iterator[list[Pair]]) -> None:
        if await self.spec.board.post(self.result()):
            # The run is stopping: an earlier attempt's rows stay as they are (its pairs not
            # done are retried by the next run), rather than being deleted for nothing.
            self.interrupted = True
            return
        await anyio.to_thread.run_sync(forget_earlier_attempts, self.spec, self.store)
        async with anyio.create_task_group() as tg:
            tg.start_soon(self.watch, tg.cancel_scope)
            send, receive = anyio.create_memory_object_stream[Pair](PAIR_BUFFER)
            async with self.lane.opened(), anyio.create_task_group() as work:
                work.start_soon(self.feed, batches, send)
                await serve_pairs(self.lane, receive, self.done)
            tg.cancel_scope.cancel()


def run_shard(spec: ShardSpec, pairs: Iterator[list[Pair]] | None = None) -> ShardResult:
    """Run one shard to the end (or until the run's board asks it to stop) and return its
    counters. ``pairs``: its pairs in batches, when it runs in the driver's process (else
    ``spec`` says where they are).

    A run-level error (a rejected key, an unreachable API) ends the shard and is in the
    result; a bug is raised, after the rows finished so far are written."""
    scratch = None if spec.pairs_key is None else Path(tempfile.mkdtemp(prefix="harvester-shard-"))
    try:
        return _run_shard(spec, scratch, pairs)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def _run_shard(
    spec: ShardSpec, scratch: Path | None, pairs: Iterator[list[Pair]] | None
) -> ShardResult:
    shard = _Shard(spec, scratch)
    log.info(
        "shard %d of %d of run %s started (pid %d%s)",
        spec.index,
        spec.count,
        spec.run_id,
        os.getpid(),
        f", node {shard.node}" if shard.node else "",
    )
    if pairs is None:
        assert shard.pairs_path is not None, "a shard's pairs are handed in or in a file"
        pairs = read_pairs(shard.pairs_path)
    try:
        anyio.run(shard.run, pairs, backend_options=EVENT_LOOP_OPTIONS)
    except HarvesterError as exc:
        shard.fail(exc)
    except BaseExceptionGroup as group:
        first = first_harvester_error(group)
        if first is None:
            raise
        shard.fail(first)
    finally:
        try:
            shard.writer.flush()
        except OutputError as exc:
            shard.fail(exc)
    return shard.result()

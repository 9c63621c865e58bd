"""A shard: a self-contained, picklable unit of a run that one function runs to the end.

A run's pairs are split by a stable hash of the pair (``shard_of``) into shards. A shard has
its pairs (a file under the output folder), its share of ``--rps`` and of both concurrencies,
and the output location; ``run_shard`` does its requests with one lane on its own event loop,
writes its own manifest parts (``manifest/<run_id>/shard-SSSS-part-NNNNN.parquet``) and
returns its counters. Nothing per row leaves the shard, so any process (the harvest's own, a
local pool's, a cluster engine's) can run it given the output folder.

While it runs, a shard writes its counters to ``.tmp/<run_id>/shard-SSSS.progress.json`` every
``PROGRESS_SECONDS`` (the harvest shows them, and keeps them if the shard's process dies), and
stops, keeping what it finished, when ``.tmp/<run_id>/stop`` appears.

On a cluster whose nodes share no disk with the driver (an ``s3://`` output on Ray), the
shard's pairs are an object in the bucket (``pairs_key``, under the run's ``.tmp/<run_id>/``):
the shard downloads it into a scratch folder of its own (removed when it ends) and reads it
``BATCH`` pairs at a time; its counters go to the run's board (``board``, a Ray actor) and the
board's answer says when to stop.

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
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Final, TextIO

import anyio
import anyio.abc

from harvester.api.ratelimit import PermitSource
from harvester.errors import HarvesterError, OutputError, first_harvester_error
from harvester.run.engine.local import ChildLogging, install_logging
from harvester.run.reader import Pair, pair_key
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


def shard_of(model: str, request_id: str, count: int) -> int:
    """The shard of a pair: blake2b of the pair (``pair_key``), stable across processes,
    machines and Python versions (unlike ``hash``)."""
    return pair_key(model, request_id) % count


def work_dir(store: Store, run_id: str) -> Path:
    """Where a run's shards keep their pairs, progress and the stop flag."""
    return store.temp_dir / run_id


def stop_path(store: Store, run_id: str) -> Path:
    return work_dir(store, run_id) / "stop"


@dataclass(frozen=True, slots=True, kw_only=True)
class ShardSpec:
    """Everything a shard needs; picklable."""

    run_id: str
    index: int
    count: int
    pairs_path: Path
    """One JSON array ``[model, request_id, source, line]`` per line."""
    lane: LaneSettings
    """Its share of ``--rps`` and the concurrencies, the API settings and ``out_dir``."""
    rows_per_part: int = 5_000
    seconds_per_part: float = 30.0
    limiter: Any = None
    """The cluster's rate limiter (a Ray actor handle), or None: the lane's own rate."""
    pairs_key: str | None = None
    """The pairs as an object in the output store, when the shard's node cannot read
    ``pairs_path`` (an S3 output on a cluster); the shard works in a scratch folder of its
    own then (``Store.on_node``)."""
    board: Any = None
    """The run's progress board (``harvester.run.engine.ray.RayBoard``) where counters go
    and the stop flag comes from; None: the files under ``work_dir``."""
    logging: ChildLogging | None = None
    """How the shard logs when its process is not one the harvest set up (a Ray worker)."""

    @property
    def on_cluster(self) -> bool:
        return self.limiter is not None or self.board is not None

    @property
    def store(self) -> Store:
        return self.lane.store

    @property
    def progress_path(self) -> Path:
        return work_dir(self.store, self.run_id) / f"shard-{self.index:04d}.progress.json"


@dataclass(frozen=True, slots=True, kw_only=True)
class ShardResult:
    """A shard's counters: at the end (what ``run_shard`` returns), or so far (its progress
    file). ``finished`` is false until the shard has written everything it will write."""

    index: int
    pid: int = 0
    requests: Mapping[str, int] = field(default_factory=dict)
    images_new: int = 0
    images_existing: int = 0
    images_failed: int = 0
    bytes_new: int = 0
    bytes_downloaded: int = 0
    result_requests: int = 0
    retries: int = 0
    throttled: int = 0
    lowest_rps: float = 0.0
    waiting: int = 0
    """Requests waiting for a pending result now."""
    waiting_until: float = 0.0
    manifest_rows: int = 0
    manifest_parts: int = 0
    interrupted: bool = False
    error: str | None = None
    error_code: int | None = None
    error_type: str | None = None
    """The name of the ``harvester.errors`` class of ``error``."""
    finished: bool = False
    node: str = ""
    """The Ray node the shard ran on ("" outside Ray)."""

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["requests"] = dict(self.requests)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ShardResult:
        return cls(**{**data, "requests": dict(data.get("requests") or {})})


def write_pairs(out: TextIO, pair: Pair) -> None:
    out.write(json.dumps([pair.model, pair.request_id, pair.source, pair.line]) + "\n")


def read_pairs(path: Path) -> Iterator[list[Pair]]:
    """A shard's pairs, ``BATCH`` at a time."""
    with path.open(encoding="utf-8") as fh:
        batch: list[Pair] = []
        for line in fh:
            model, request_id, source, number = json.loads(line)
            batch.append(Pair(model=model, request_id=request_id, source=source, line=number))
            if len(batch) >= BATCH:
                yield batch
                batch = []
        if batch:
            yield batch


def read_progress(spec: ShardSpec) -> ShardResult | None:
    try:
        return ShardResult.from_json(json.loads(spec.progress_path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None


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
        forget_earlier_attempts(spec, self.store)
        self.lane = Lane(settings, permits=_permits(spec))
        self.writer = ManifestWriter(
            self.store,
            spec.run_id,
            rows_per_part=spec.rows_per_part,
            seconds_per_part=spec.seconds_per_part,
            autoflush=False,
            prefix=part_prefix(spec.index),
        )
        self.requests: Counter[str] = Counter()
        self.images = Counter[str]()
        self.interrupted = False
        self.error: str | None = None
        self.error_code: int | None = None
        self.error_type: str | None = None
        self.stop = stop_path(spec.store, spec.run_id)

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

    def result(self, *, finished: bool = False) -> ShardResult:
        c = self.lane.counters()
        return ShardResult(
            index=self.spec.index,
            pid=os.getpid(),
            requests=dict(self.requests),
            images_new=self.images["new"],
            images_existing=self.images["existing"],
            images_failed=self.images["failed"],
            bytes_new=self.images["bytes_new"],
            bytes_downloaded=self.images["bytes"],
            result_requests=c.sent,
            retries=c.retries,
            throttled=c.throttled,
            lowest_rps=c.lowest_rate,
            waiting=c.waiting,
            waiting_until=c.waiting_until,
            manifest_rows=self.writer.rows_written,
            manifest_parts=self.writer.parts_written,
            interrupted=self.interrupted,
            error=self.error,
            error_code=self.error_code,
            error_type=self.error_type,
            finished=finished,
            node=self.node,
        )

    def report(self, *, finished: bool = False) -> ShardResult:
        """Write the counters to the progress file (atomically); never fails the shard. With a
        board, nothing: the board has the last counters and the engine hands in the result."""
        result = self.result(finished=finished)
        if self.spec.board is not None:
            return result
        path = self.spec.progress_path
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            tmp.write_text(json.dumps(result.to_json()), encoding="utf-8")
            os.replace(tmp, path)
        except OSError as exc:
            log.debug("cannot write progress %s: %s", path, exc)
        return result

    def fail(self, exc: HarvesterError) -> None:
        if self.error is None:
            self.error, self.error_code = str(exc), int(exc.exit_code)
            self.error_type = type(exc).__name__

    async def done(self, rows: list[ManifestRow]) -> None:
        self.requests[rows[0].request_status] += 1
        for row in rows:
            if row.image_index is None:
                continue
            if row.sha256 is None:
                self.images["failed"] += 1
                continue
            size = row.bytes or 0
            self.images["bytes"] += size
            if row.stored_new:
                self.images["new"] += 1
                self.images["bytes_new"] += size
            else:
                self.images["existing"] += 1
        self.writer.add(rows)
        if self.writer.due:
            await self.writer.flush_in_thread()

    async def feed(self, send: anyio.abc.ObjectSendStream[Pair]) -> None:
        batches = read_pairs(self.pairs_path)
        async with send:
            while True:
                batch = await anyio.to_thread.run_sync(next, batches, None)
                if batch is None:
                    return
                try:
                    for pair in batch:
                        await send.send(pair)
                except anyio.BrokenResourceError:
                    return  # the lane stopped (a run-level error ends it)

    async def post(self) -> bool:
        """Post the counters (the progress file, or the board); True when the run asks this
        shard to stop."""
        board = self.spec.board
        if board is None:
            if self.stop.exists():
                return True
            self.report()
            return False
        return bool(await board.post(self.spec.index, self.result().to_json()))

    async def watch(self, scope: anyio.CancelScope) -> None:
        while True:
            await anyio.sleep(PROGRESS_SECONDS)
            if await self.post():
                self.interrupted = True
                scope.cancel()
                return

    async def run(self) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self.watch, tg.cancel_scope)
            send, receive = anyio.create_memory_object_stream[Pair](PAIR_BUFFER)
            async with self.lane.opened(), anyio.create_task_group() as work:
                work.start_soon(self.feed, send)
                await serve_pairs(self.lane, receive, self.done)
            tg.cancel_scope.cancel()


def run_shard(spec: ShardSpec) -> ShardResult:
    """Run one shard to the end (or until its stop flag appears) and return its counters.

    A run-level error (a rejected key, an unreachable API) ends the shard and is in the
    result; a bug is raised, after the rows finished so far are written."""
    scratch = None if spec.pairs_key is None else Path(tempfile.mkdtemp(prefix="harvester-shard-"))
    try:
        return _run_shard(spec, scratch)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def _run_shard(spec: ShardSpec, scratch: Path | None) -> ShardResult:
    shard = _Shard(spec, scratch)
    log.info(
        "shard %d of %d of run %s started (pid %d%s)",
        spec.index,
        spec.count,
        spec.run_id,
        os.getpid(),
        f", node {shard.node}" if shard.node else "",
    )
    try:
        anyio.run(shard.run, backend_options=EVENT_LOOP_OPTIONS)
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
        shard.report(finished=True)
    return shard.result(finished=True)

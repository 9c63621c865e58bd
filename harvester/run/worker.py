"""The work of one request, and the lanes that do it: fetch the result, store its images, build
its manifest rows.

A harvest splits its work into lanes. Each lane has its own HTTP client, its own share of the
concurrency and of ``--rps`` (so the lanes together never exceed either), and takes requests
from the run's one queue as it has room. Lane 0 runs inside the harvest's own process; with
``--workers N`` the other N-1 run in worker processes (``harvester.run.worker.main``), which
import neither polars nor pyarrow and talk to the harvest over a socket pair:

    harvest -> worker   settings, then batches of pairs, never more than the lane has room
                        for; end of stream when the input is done
    worker -> harvest   batches of finished requests' rows (with the worker's counters),
                        how many requests had their first fetch answered ("fetched": room
                        for more), "released" for a request that left the backlog to wait
                        while pending, log lines, and a run-level error if one ends the worker

Only the harvest's process writes the manifest, the run record and the progress; a worker
writes images and nothing else. A worker ignores SIGINT and SIGTERM (the harvest decides when
to stop, and kills it) and dies with the harvest (PR_SET_PDEATHSIG on Linux).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
import pickle
import random
import signal
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import anyio
import anyio.abc
from anyio.streams.buffered import BufferedByteReceiveStream
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from harvester import errors
from harvester.api.fetcher import FetchOutcome, ResultFetcher
from harvester.api.ratelimit import RateLimiter
from harvester.api.results import ImageRef
from harvester.api.retry import RetryPolicy
from harvester.api.urls import describe_url
from harvester.run.download import ImageDownloader
from harvester.run.reader import Pair
from harvester.storage.layout import Layout
from harvester.storage.rows import ERROR, FAILED, OK, PENDING, ManifestRow
from harvester.storage.store import ImageFailure, StoredImage

log = logging.getLogger("harvester")

MAX_PENDING_WAITERS: Final = 10_000
"""Requests of one lane that may wait for a pending result at once (each holds only a pair)."""
EVENT_LOOP_OPTIONS: Final = {"use_uvloop": True}
"""anyio's asyncio backend options: uvloop takes about a fifth less CPU per request
(bench/transports.py measures it)."""
BATCH_SECONDS: Final = 0.005
"""A worker gathers finished requests this long before sending them, one message per batch."""
_HEADER: Final = struct.Struct("!I")
GC_YOUNG_THRESHOLD: Final = 20_000


@dataclass(frozen=True, slots=True, kw_only=True)
class LaneSettings:
    """What a lane needs to know; pickled to worker processes."""

    run_id: str
    out_dir: Path
    base_url: str
    authorization: str = field(repr=False)
    concurrency: int
    image_concurrency: int
    rps: float
    retry: RetryPolicy
    pending_wait: float
    max_image_bytes: int
    allow_private_images: bool
    connect_timeout: float
    read_timeout: float
    seed: int | None
    log_levels: dict[str, int] = field(default_factory=dict)
    """Logger name -> the level the harvest shows; a worker forwards those records."""

    @property
    def ahead(self) -> int:
        """Requests the lane holds before their first fetch is answered: its fetch slots,
        and as many again ready to start the moment one frees up. More would leave pairs
        waiting behind this lane's share of ``--rps`` while other lanes idle; none ready
        would cost a hand-over per fetch (on a slow link, a fifth of the rate)."""
        return 2 * self.concurrency

    @property
    def backlog(self) -> int:
        """Requests the lane holds at once, from taking the pair to handing back its rows."""
        return self.concurrency + 2 * self.image_concurrency


@dataclass(slots=True)
class Counters:
    """A lane's running totals; the harvest adds up every lane's."""

    sent: int = 0
    """Result requests that reached the wire."""
    answered: int = 0
    retries: int = 0
    throttled: int = 0
    lowest_rate: float = 0.0


class Lane:
    """Does requests: one instance per lane, used inside ``opened()``."""

    def __init__(self, settings: LaneSettings) -> None:
        self.settings = settings
        self.rng = random.Random(settings.seed)
        self.layout = Layout(settings.out_dir)
        # fast_acquire: a free slot is taken without a trip through the event loop; these are
        # acquired once or more per request.
        self.fetch_slots = anyio.Semaphore(settings.concurrency, fast_acquire=True)
        self.download_slots = anyio.Semaphore(settings.image_concurrency, fast_acquire=True)
        self.pending_waiters = anyio.Semaphore(MAX_PENDING_WAITERS)
        self.limiter = RateLimiter(settings.rps)
        self._fetcher: ResultFetcher | None = None
        self._store: ImageDownloader | None = None

    @asynccontextmanager
    async def opened(self) -> AsyncIterator[Lane]:
        from harvester.api.transport import open_client  # imported only where requests are made

        s = self.settings
        client = open_client(
            max_connections=s.concurrency + s.image_concurrency,
            connect_timeout=s.connect_timeout,
            read_timeout=s.read_timeout,
        )
        try:
            self._fetcher = ResultFetcher(
                client,
                base_url=s.base_url,
                authorization=s.authorization,
                policy=s.retry,
                limiter=self.limiter,
                rng=self.rng,
            )
            self._store = ImageDownloader(
                client,
                self.layout,
                policy=s.retry,
                rng=self.rng,
                max_bytes=s.max_image_bytes,
                refuse_private=not s.allow_private_images,
                api_url=s.base_url,
            )
            yield self
        finally:
            # Shielded: a cancellation arriving while the connections close must not replace
            # the error that is ending the lane (a rejected key would become a silent stop).
            with anyio.CancelScope(shield=True):
                await client.aclose()

    def counters(self) -> Counters:
        fetcher, store = self._fetcher, self._store
        return Counters(
            sent=fetcher.sent if fetcher else 0,
            answered=fetcher.answered if fetcher else 0,
            retries=(fetcher.retries if fetcher else 0) + (store.retries if store else 0),
            throttled=self.limiter.throttled,
            lowest_rate=self.limiter.lowest_rate,
        )

    async def fetch(self, pair: Pair) -> FetchOutcome:
        assert self._fetcher is not None, "use the lane inside opened()"
        async with self.fetch_slots:
            return await self._fetcher.fetch(pair.model, pair.request_id)

    async def process(
        self,
        pair: Pair,
        release: Callable[[], object],
        fetched: Callable[[], object] = lambda: None,
    ) -> list[ManifestRow]:
        """The rows of one request. ``fetched`` is called once its first result fetch has
        an answer; ``release`` if it stops counting against the backlog (it waits for a
        pending result), at most once."""
        outcome = await self.fetch(pair)
        fetched()
        if outcome.status == PENDING and self.settings.pending_wait > 0:
            outcome = await self.wait_pending(pair, outcome, release)
        return await self.rows_for(pair, outcome)

    async def wait_pending(
        self, pair: Pair, outcome: FetchOutcome, release: Callable[[], object]
    ) -> FetchOutcome:
        """Re-poll a pending request with backoff until it settles or ``pending_wait`` ends.
        Waiting requests give their backlog slot back, so they cannot stall the run."""
        try:
            self.pending_waiters.acquire_nowait()
        except anyio.WouldBlock:
            return outcome
        release()
        try:
            deadline = time.monotonic() + self.settings.pending_wait
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
        return outcome

    async def rows_for(self, pair: Pair, outcome: FetchOutcome) -> list[ManifestRow]:
        # Every row is built once, with all its fields (no chains of dataclasses.replace):
        # this runs for every image of the run.
        result = outcome.result
        head: dict[str, Any] = {
            "run_id": self.settings.run_id,
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
        store = self._store
        assert store is not None, "use the lane inside opened()"

        async def download(ref: ImageRef) -> None:
            async with self.download_slots:
                stored[ref.index] = await store.store(ref.url)

        if len(result.images) == 1:
            await download(result.images[0])
        else:
            async with anyio.create_task_group() as tg:
                for ref in result.images[1:]:
                    tg.start_soon(download, ref)
                await download(result.images[0])  # this task does one of them

        fields = [
            image_fields(head, ref, got) for ref, got in zip(result.images, stored, strict=True)
        ]
        statuses = {f["status"] for f in fields}
        status = OK if statuses == {OK} else ERROR if ERROR in statuses else FAILED
        return [ManifestRow(request_status=status, **f) for f in fields]


def image_fields(
    head: dict[str, Any], ref: ImageRef, got: StoredImage | ImageFailure | None
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
        row.update(sha256=got.sha256, path=got.path, bytes=got.bytes, stored_new=got.new)
        return row
    assert got is not None, "every download task fills its slot"
    row.update(status=got.status, error=got.error)
    if got.http_status:
        row["http_status"] = got.http_status
    return row


@contextmanager
def quiet_gc() -> Iterator[None]:
    """For the length of a run: everything allocated before it (modules, the done set) is
    kept out of the cyclic collector's scans (``gc.freeze``), and the young generation is
    collected less often. A request allocates thousands of short-lived objects that reference
    counting frees; at the default threshold (700) the collector ran several times per request
    and took about 6% of the run's CPU (perf, bench world)."""
    old = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *old[1:])
    try:
        yield
    finally:
        gc.set_threshold(*old)
        gc.unfreeze()


# --- The lanes, as the harvest drives them -------------------------------------------------

Deliver = Callable[[list[ManifestRow]], Awaitable[None]]
"""Where a lane hands the rows of each finished request (the harvest's manifest writer)."""


Done = Callable[[list[ManifestRow], bool], Awaitable[None]]
"""Called with each finished request's rows, and whether it left the backlog while waiting."""


async def serve_pairs(
    lane: Lane,
    pairs: MemoryObjectReceiveStream[Pair],
    done: Done,
    *,
    release: Callable[[], None],
    fetched: Callable[[], None],
) -> None:
    """Do every pair ``pairs`` yields, ``lane.settings.backlog`` at a time, then return.

    A fixed pool of consumer tasks, not a task per request: spawning and scoping a task per
    request took about 4% of a run's CPU (py-spy, bench world). A request that waits for a
    pending result leaves the pool (``release`` is called, and a new consumer takes its
    place), so waiting requests never hold up the rest.
    """

    with pairs:
        async with anyio.create_task_group() as tg:
            for _ in range(lane.settings.backlog):
                tg.start_soon(_consume, lane, pairs, done, release, fetched, tg)


async def _consume(
    lane: Lane,
    pairs: MemoryObjectReceiveStream[Pair],
    done: Done,
    release: Callable[[], None],
    fetched: Callable[[], None],
    tg: anyio.abc.TaskGroup,
) -> None:
    async for pair in pairs:
        left = False

        def leave() -> None:
            nonlocal left
            left = True
            release()
            tg.start_soon(_consume, lane, pairs, done, release, fetched, tg)

        rows = await lane.process(pair, leave, fetched)
        await done(rows, left)
        if left:
            return  # a new consumer took this one's place


async def run_local(lane: Lane, pairs: MemoryObjectReceiveStream[Pair], deliver: Deliver) -> None:
    """Lane 0: requests on the harvest's own event loop.

    One intake task takes a pair from the run's queue only when the lane has room, like a
    worker process's feeder does: the queue hands pairs to its waiting receivers in turn, so
    each lane must wait there once, not once per idle consumer, or lane 0 would take nearly
    every pair."""
    room = anyio.Semaphore(lane.settings.backlog, fast_acquire=True)
    ahead = anyio.Semaphore(lane.settings.ahead, fast_acquire=True)

    async def done(rows: list[ManifestRow], left: bool) -> None:
        await deliver(rows)
        if not left:
            room.release()

    async def intake(queue: MemoryObjectSendStream[Pair]) -> None:
        with queue, pairs:
            while True:
                await room.acquire()
                await ahead.acquire()
                try:
                    pair = await pairs.receive()
                except anyio.EndOfStream:
                    return
                queue.send_nowait(pair)

    async with lane.opened(), anyio.create_task_group() as tg:
        queue, mine = anyio.create_memory_object_stream[Pair](math.inf)
        tg.start_soon(intake, queue)
        await serve_pairs(lane, mine, done, release=room.release, fetched=ahead.release)


_WORKER_MAIN: Final = (
    "import signal; signal.signal(signal.SIGINT, signal.SIG_IGN); "
    "signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "from harvester.run.worker import main; main()"
)
"""A worker ignores SIGINT and SIGTERM from its first line on: a Ctrl-C that reaches it while
it is still importing (aiohttp, httpx: a second on a busy machine) must not print a traceback."""


def worker_command(fd: int) -> list[str]:
    """How a worker process is started: this Python, the socket's descriptor as argument."""
    return [sys.executable, "-c", _WORKER_MAIN, str(fd)]


class WorkerProcess:
    """The harvest's end of one worker process."""

    def __init__(self, index: int, settings: LaneSettings) -> None:
        self.index = index
        self.settings = settings
        self.counters = Counters(lowest_rate=settings.rps)

    async def run(self, pairs: MemoryObjectReceiveStream[Pair], deliver: Deliver) -> None:
        import socket

        ours, theirs = socket.socketpair()
        try:
            process = await anyio.open_process(
                worker_command(theirs.fileno()),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=None,  # a crash's traceback goes where the harvest's errors go
                pass_fds=(theirs.fileno(),),
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        try:
            stream = await anyio.abc.SocketStream.from_socket(ours)
        except BaseException:
            ours.close()
            process.kill()
            raise
        credit = anyio.Semaphore(self.settings.backlog, fast_acquire=True)
        try:
            with contextlib.suppress(anyio.BrokenResourceError, OSError):
                await _send(stream, self.settings)  # if it died already: its exit code, below
            ahead = anyio.Semaphore(self.settings.ahead, fast_acquire=True)
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._feed, stream, pairs, credit, ahead)
                await self._collect(BufferedByteReceiveStream(stream), deliver, credit, ahead)
                tg.cancel_scope.cancel()  # the worker is gone: stop feeding it
            code = await process.wait()
            unanswered = self.settings.backlog - credit.value
            if code == 0 and unanswered:
                raise errors.WorkerError(
                    f"worker process {self.index} ended with {unanswered} requests unanswered; "
                    "they are not recorded and the next run retries them"
                )
            if code != 0:
                how = (
                    f"was killed by signal {-code} ({signal.Signals(-code).name})"
                    if code < 0 and -code in signal.valid_signals()
                    else f"stopped with exit code {code}"
                )
                raise errors.WorkerError(
                    f"worker process {self.index} (pid {process.pid}) {how}; the rows "
                    "finished so far are kept, requests still in flight are not recorded and "
                    "the next run retries them"
                )
        finally:
            with anyio.CancelScope(shield=True):
                await stream.aclose()
                if process.returncode is None:
                    process.kill()
                    await process.wait()
                await process.aclose()

    async def _feed(
        self,
        stream: anyio.abc.SocketStream,
        pairs: MemoryObjectReceiveStream[Pair],
        credit: anyio.Semaphore,
        ahead: anyio.Semaphore,
    ) -> None:
        """Pairs to the worker, as many as it has room for (a pair is taken from the queue
        only then), in batches of what is ready. Room is a backlog slot (``credit``) and a
        place ahead (``ahead``, see ``LaneSettings.ahead``).
        Returns quietly if the worker is gone: ``run`` reports how it ended."""
        try:
            async with pairs:
                while True:
                    await credit.acquire()
                    await ahead.acquire()
                    try:
                        batch = [await pairs.receive()]
                    except anyio.EndOfStream:
                        credit.release()
                        ahead.release()
                        break
                    while True:
                        try:
                            credit.acquire_nowait()
                        except anyio.WouldBlock:
                            break
                        try:
                            ahead.acquire_nowait()
                        except anyio.WouldBlock:
                            credit.release()
                            break
                        try:
                            batch.append(pairs.receive_nowait())
                        except (anyio.WouldBlock, anyio.EndOfStream):
                            credit.release()
                            ahead.release()
                            break
                    await _send(stream, batch)
            await stream.send_eof()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            return

    async def _collect(
        self,
        reader: BufferedByteReceiveStream,
        deliver: Deliver,
        credit: anyio.Semaphore,
        ahead: anyio.Semaphore,
    ) -> None:
        while True:
            try:
                message = await _receive(reader)
            except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError):
                return  # the worker is gone: ``run`` reads its exit code
            kind = message[0]
            if kind == "rows":
                _, finished, self.counters = message
                for rows, was_released in finished:
                    await deliver(rows)
                    if not was_released:
                        credit.release()
            elif kind == "released":
                credit.release()
            elif kind == "fetched":
                for _ in range(message[1]):
                    ahead.release()
            elif kind == "log":
                _, name, level, text = message
                logging.getLogger(name).log(level, "%s", text)
            elif kind == "error":
                _, name, text = message
                cls = getattr(errors, name, None)
                if not (isinstance(cls, type) and issubclass(cls, errors.HarvesterError)):
                    cls = errors.WorkerError
                raise cls(text)


# --- Inside a worker process ---------------------------------------------------------------


async def _send(stream: anyio.abc.SocketStream, message: object) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    await stream.send(_HEADER.pack(len(data)) + data)


async def _receive(reader: BufferedByteReceiveStream) -> Any:
    (size,) = _HEADER.unpack(await reader.receive_exactly(_HEADER.size))
    return pickle.loads(await reader.receive_exactly(size))  # noqa: S301 (our own process)


class _Forwarder(logging.Handler):
    """Log records of a worker, sent to the harvest to be logged there."""

    def __init__(self, send: Callable[[str, int, str], None]) -> None:
        super().__init__()
        self._send = send

    def emit(self, record: logging.LogRecord) -> None:
        self._send(record.name, record.levelno, record.getMessage())


async def _serve(fd: int) -> None:
    stream = await anyio.abc.SocketStream.from_socket(fd)
    reader = BufferedByteReceiveStream(stream)
    settings: LaneSettings = await _receive(reader)
    lane = Lane(settings)
    finished: list[tuple[list[ManifestRow], bool]] = []
    outbox: list[tuple[Any, ...]] = []
    wake = anyio.Event()
    closing = False
    answered = 0
    """Requests whose first fetch was answered since the last message: the harvest sends
    no more pairs than the lane has fetch slots for, and counts these back."""

    def post(message: tuple[Any, ...]) -> None:
        outbox.append(message)
        wake.set()

    forwarder = _Forwarder(lambda name, level, text: post(("log", name, level, text)))
    for name, level in settings.log_levels.items():
        logger = logging.getLogger(name)
        logger.addHandler(forwarder)
        logger.setLevel(level)
        logger.propagate = False

    async def sender() -> None:
        """Sends what piled up every ``BATCH_SECONDS``; returns once closing and empty."""
        nonlocal wake, answered
        while True:
            await wake.wait()
            if not closing:
                await anyio.sleep(BATCH_SECONDS)
            wake = anyio.Event()
            messages = outbox[:]
            outbox.clear()
            if answered:
                messages.append(("fetched", answered))
                answered = 0
            if finished:
                messages.append(("rows", finished[:], lane.counters()))
                finished.clear()
            for message in messages:
                await _send(stream, message)
            if closing and not outbox and not finished:
                return

    async def done(rows: list[ManifestRow], left: bool) -> None:
        finished.append((rows, left))
        wake.set()

    def released() -> None:
        post(("released",))

    def fetched() -> None:
        nonlocal answered
        answered += 1
        wake.set()

    async def receive(queue: MemoryObjectSendStream[Pair]) -> None:
        """Pairs from the harvest into the lane's queue (the harvest sends no more than the
        lane's backlog ahead, so the queue never blocks)."""
        with queue:
            while True:
                try:
                    batch: list[Pair] = await _receive(reader)
                except (anyio.EndOfStream, anyio.IncompleteRead):
                    return
                for pair in batch:
                    queue.send_nowait(pair)

    try:
        async with lane.opened(), anyio.create_task_group() as outer:
            outer.start_soon(sender)
            queue, pairs = anyio.create_memory_object_stream[Pair](math.inf)
            async with anyio.create_task_group() as tg:
                tg.start_soon(receive, queue)
                await serve_pairs(lane, pairs, done, release=released, fetched=fetched)
            closing = True  # every request is done: the sender sends the rest and returns
            wake.set()
    except errors.HarvesterError as exc:
        await _send(stream, ("error", type(exc).__name__, str(exc)))
    except BaseExceptionGroup as group:
        first = errors.first_harvester_error(group)
        if first is None:
            raise
        await _send(stream, ("error", type(first).__name__, str(first)))
    finally:
        with anyio.CancelScope(shield=True):
            await stream.aclose()


def _die_with_parent() -> None:
    """Ask Linux to kill this process when the harvest's process dies (kill -9 included)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return


def main() -> None:
    parent = os.getppid()
    _die_with_parent()
    if os.getppid() != parent:  # the harvest died before the request to die with it
        sys.exit(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with quiet_gc():
        anyio.run(_serve, int(sys.argv[1]), backend_options=EVENT_LOOP_OPTIONS)


if __name__ == "__main__":
    # Run the imported module's main, not this copy's: what it pickles must name classes
    # harvester.run.worker.*, which the harvest can load, not __main__.*.
    from harvester.run.worker import main as worker_main

    worker_main()

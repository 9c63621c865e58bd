"""The work of one request: fetch its result, store its images, build its manifest rows.

A ``Lane`` does requests with its own HTTP client and its own share of the concurrency and
of ``--rps``; ``serve_pairs`` runs a fixed pool of tasks that feed it. A shard
(``harvester.run.shard``) runs one lane over its pairs.
"""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectReceiveStream

from harvester.api.download import ImageDownloader, ImageFailure
from harvester.api.fetcher import FetchOutcome, ResultFetcher
from harvester.api.ratelimit import PermitSource, RateLimiter
from harvester.api.results import ImageRef
from harvester.api.retry import RetryPolicy
from harvester.api.urls import describe_url
from harvester.counters import Counters
from harvester.run.reader import Pair
from harvester.statuses import ERROR, FAILED, OK, PENDING
from harvester.storage.objects import Store
from harvester.storage.rows import ManifestRow
from harvester.storage.store import ContentStore, StoredImage

MAX_PENDING_WAITERS: Final = 10_000
"""Requests of one lane that may wait for a pending result at once (each holds only a pair)."""
EVENT_LOOP_OPTIONS: Final = {"use_uvloop": True}
"""anyio's asyncio backend options: uvloop takes about a fifth less CPU per request
(bench/transports.py measures it)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class LaneSettings:
    """What a lane needs to know (part of a shard's spec, so picklable)."""

    run_id: str
    store: Store
    """Where images go (and the lane's temp files, in its ``temp_dir``)."""
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

    @property
    def backlog(self) -> int:
        """Requests the lane holds at once, from taking the pair to handing back its rows."""
        return self.concurrency + 2 * self.image_concurrency


class Lane:
    """Does requests: one instance per lane, used inside ``opened()``."""

    def __init__(
        self,
        settings: LaneSettings,
        *,
        permits: PermitSource | None = None,
    ) -> None:
        """``permits``: the cluster's rate limiter (Ray), if any."""
        self.settings = settings
        self.rng = random.Random(settings.seed)
        # fast_acquire: a free slot is taken without a trip through the event loop; these are
        # acquired once or more per request.
        self.fetch_slots = anyio.Semaphore(settings.concurrency, fast_acquire=True)
        self.download_slots = anyio.Semaphore(settings.image_concurrency, fast_acquire=True)
        self.repoll_slots = anyio.Semaphore(settings.concurrency, fast_acquire=True)
        """Re-polls of pending requests have slots of their own, so new requests (however
        slow the rate) cannot keep them past ``--pending-wait``."""
        self.pending_waiters = anyio.Semaphore(MAX_PENDING_WAITERS)
        self.waiting = 0
        self.waiting_until = 0.0
        self.counts = Counters()
        """Finished requests and their images (the rest is read from the fetcher and the
        limiter when asked: ``counters``)."""
        self.limiter = RateLimiter(settings.rps, permits=permits)
        self._fetcher: ResultFetcher | None = None
        self._store: ImageDownloader[StoredImage] | None = None

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
                ContentStore(s.store).sink,
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
        """The lane's counts so far (a copy)."""
        fetcher, store = self._fetcher, self._store
        return self.counts + Counters(
            result_requests=fetcher.sent if fetcher else 0,
            retries=(fetcher.retries if fetcher else 0) + (store.retries if store else 0),
            throttled=self.limiter.throttled,
            lowest_rps=self.limiter.lowest_rate,
            waiting=self.waiting,
            waiting_until=self.waiting_until,
        )

    async def fetch(self, pair: Pair, *, repoll: bool = False) -> FetchOutcome:
        assert self._fetcher is not None, "use the lane inside opened()"
        async with self.repoll_slots if repoll else self.fetch_slots:
            return await self._fetcher.fetch(pair.path, repoll=repoll)

    async def process(self, pair: Pair, release: Callable[[], object]) -> list[ManifestRow]:
        """The rows of one request. ``release`` is called if it stops counting against the
        backlog (it waits for a pending result), at most once."""
        outcome = await self.fetch(pair)
        if outcome.status == PENDING and self.settings.pending_wait > 0:
            outcome = await self.wait_pending(pair, outcome, release)
        rows = await self.rows_for(pair, outcome)
        self.counts.requests[rows[0].request_status] += 1
        return rows

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
        self.waiting += 1
        self.waiting_until = max(self.waiting_until, time.time() + self.settings.pending_wait)
        try:
            deadline = time.monotonic() + self.settings.pending_wait
            delay = 1.0
            while outcome.status == PENDING:
                wait = min(delay * self.rng.uniform(0.75, 1.25), deadline - time.monotonic())
                if wait <= 0:
                    break
                await anyio.sleep(wait)
                delay = min(delay * 2, 30.0)
                outcome = await self.fetch(pair, repoll=True)
        finally:
            self.pending_waiters.release()
            self.waiting -= 1
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
            seed_text=result.seed_text,
            prompt=result.prompt,
            timings=result.timings,
            inference_seconds=result.inference_seconds,
            image_count=len(result.images),
            altered=result.altered,
        )
        if not result.images:
            return [ManifestRow(request_status=outcome.status, status=outcome.status, **head)]

        stored: list[StoredImage | ImageFailure | None] = [None] * len(result.images)
        store = self._store
        assert store is not None, "use the lane inside opened()"

        # One after the other: the lane's many requests in flight keep every download slot
        # busy, and a task per image would cost more than it saves.
        slots = self.download_slots
        for ref in result.images:
            if ref.refused is not None:
                stored[ref.index] = ImageFailure(FAILED, ref.refused, None, 0)
                continue
            async with slots:
                stored[ref.index] = await store.store(ref.url)

        c = self.counts
        for got in stored:
            if got is None or isinstance(got, ImageFailure):
                c.images_failed += 1
                continue
            c.bytes_downloaded += got.bytes
            if got.new:
                c.images_new += 1
                c.bytes_new += got.bytes
            else:
                c.images_existing += 1
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
    assert got is not None, "every image of the request has its outcome"
    if isinstance(got, ImageFailure):
        row.update(status=got.status, error=got.error)
        if got.http_status:
            row["http_status"] = got.http_status
        return row
    row.update(sha256=got.sha256, path=got.path, bytes=got.bytes, stored_new=got.new)
    if got.info is not None:
        info = got.info
        row.update(image_format=info.format, image_width=info.width, image_height=info.height)
    return row


Done = Callable[[list[ManifestRow]], Awaitable[None]]
"""Called with each finished request's rows."""


async def serve_pairs(lane: Lane, pairs: MemoryObjectReceiveStream[Pair], done: Done) -> None:
    """Do every pair ``pairs`` yields, ``lane.settings.backlog`` at a time, then return.

    A fixed pool of consumer tasks, not a task per request: spawning and scoping a task per
    request took about 4% of a run's CPU (py-spy, bench world). A request that waits for a
    pending result leaves the pool (a new consumer takes its place), so waiting requests
    never hold up the rest.
    """
    with pairs:
        async with anyio.create_task_group() as tg:
            for _ in range(lane.settings.backlog):
                tg.start_soon(_consume, lane, pairs, done, tg)


async def _consume(
    lane: Lane,
    pairs: MemoryObjectReceiveStream[Pair],
    done: Done,
    tg: anyio.abc.TaskGroup,
) -> None:
    while True:
        try:
            # Without a trip through the event loop while pairs are waiting (so a consumer
            # that is being cancelled may start one more request: its first wait ends it).
            pair = pairs.receive_nowait()
        except anyio.WouldBlock:
            try:
                pair = await pairs.receive()
            except anyio.EndOfStream:
                return
        except anyio.EndOfStream:
            return
        left = False

        def leave() -> None:
            nonlocal left
            left = True
            tg.start_soon(_consume, lane, pairs, done, tg)

        rows = await lane.process(pair, leave)
        await done(rows)
        if left:
            return  # a new consumer took this one's place

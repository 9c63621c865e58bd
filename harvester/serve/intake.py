"""The intake: deliveries taken from the inbox and harvested like fetched results.

Each delivery's body becomes a fetch outcome (``api.delivery``), and a lane of the run layer
(``run.request.Lane``) downloads its images into the content-addressed store and builds its
rows, exactly as for a fetched result; the rows go to the manifest writer, whose parts are
written every ``--flush-every`` seconds and at the end. A delivered row's ``source_file`` is
its delivery's key in the inbox (``inbox/deliveries/...``) and its ``source_line`` is null:
that tells it from a fetched row, and points at the body kept for ``--keep-deliveries`` days.

A delivery is marked done in the inbox only once its rows are in a written part; on start,
every delivery not marked done is harvested, but for those whose rows a part already holds
(the process died between the part and the marks): they are marked, not harvested twice.

Several processes may harvest one inbox (``storage.inbox``: claims): each delivery is claimed
before it is harvested, and one claimed by another process is left to it while that process
beats. A dead process's claims are taken over by the next look for stored deliveries (at once
on the same host, ``CLAIM_STALE`` seconds after its last beat elsewhere), after the manifest
is checked for the rows it wrote before its marks. A process stalled past ``CLAIM_STALE``
checks that it still holds a delivery before its rows go to a part.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from collections import Counter
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Final

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from harvester.api.delivery import delivery_outcome
from harvester.api.retry import RetryPolicy
from harvester.counters import Counters
from harvester.defaults import DEFAULT_BASE_URL
from harvester.errors import ManifestError, OutputError
from harvester.run.reader import Pair, pair_key
from harvester.run.request import Lane, LaneSettings
from harvester.serve.config import CONNECT_TIMEOUT, ServeConfig
from harvester.storage import manifest
from harvester.storage.inbox import BEAT_EVERY, CLAIM_STALE, DELIVERIES, Inbox, Owner
from harvester.storage.objects import Store
from harvester.storage.rows import ManifestRow

logger = logging.getLogger(__name__)

TICK: Final = 1.0
"""Seconds between two checks of whether a part is due."""
EXPIRE_EVERY: Final = 3600.0
RESCAN_EVERY: Final = 60.0
"""Seconds between two looks for stored deliveries this process does not hold (a put that
answered 503 after storing, a harvest that failed); sooner when a request hints at one."""
RESCAN_SOONEST: Final = 2.0
"""Seconds from a hint to the look, and so at least between two looks."""
BUSY_RATE: Final = 100.0
"""Deliveries offered per second from which acknowledging comes first: the intake then
harvests ``busy_harvests`` deliveries at once, not ``--image-concurrency``, so that the
event loop answers deliveries first; the rest wait in the inbox (their keys in memory) and
are harvested at full concurrency once fewer arrive."""
PRIORITY_TICK: Final = 0.25
"""Seconds over which the rate of deliveries is measured."""
MAX_QUEUED: Final = 10_000
"""Keys held in memory at most: a delivery offered beyond them stays in the inbox, counted in
the backlog, and is taken from a look at the inbox once the queue is down to half of it."""


def busy_harvests(image_concurrency: int) -> int:
    """Deliveries harvested at once while deliveries arrive faster than ``BUSY_RATE``."""
    return max(1, image_concurrency // 8)


class Intake:
    """Harvests the deliveries ``offer`` hands it and those the inbox held at the start."""

    def __init__(self, config: ServeConfig, store: Store, inbox: Inbox, *, run_id: str) -> None:
        self.config = config
        self.store = store
        self.inbox = inbox
        self.run_id = run_id
        self.owner = Owner.here(run_id)
        """Whose claims this intake takes."""
        self._beat_at = time.monotonic()
        """When the last beat was stored."""
        self._lane: Lane | None = None
        self._counts = Counters()
        """Requests harvested by status and manifest rows; the lane counts the images."""
        self.failed: Counter[str] = Counter()
        """Deliveries not harvested (left in the inbox), by the class of the error."""
        self._keys: MemoryObjectSendStream[str]
        self._receive: MemoryObjectReceiveStream[str]
        # Keys only (a few dozen bytes each): the bodies stay in the inbox until a worker
        # reads one.
        self._keys, self._receive = anyio.create_memory_object_stream[str](math.inf)
        self._queued: set[str] = set()
        self._unmarked: list[str] = []
        self._flushing: set[str] = set()
        """Keys whose rows are in a part (or being written to one), not yet marked done."""
        self._unreadable: set[str] = set()
        """Keys that failed with an error other than ``OutputError``: tried again at a start."""
        self._offered: set[str] | None = None
        """Keys offered since the current rescan began listing the inbox (None between
        two listings: nothing kept)."""
        self._taken: set[str] = set()
        """Keys taken over from dead processes, their manifest checked, not yet harvested."""
        self._rescan_soon = anyio.Event()
        self._harvests = anyio.CapacityLimiter(config.image_concurrency)
        """Deliveries being harvested at once: fewer while deliveries arrive fast."""
        self._arrivals = 0
        """Keys offered since the last ``PRIORITY_TICK``."""
        self._busy = False
        """Deliveries arrive faster than ``BUSY_RATE``: fewer harvests, no look at the inbox."""
        self._waiting = 0
        """Deliveries offered (or found) and left in the inbox, the queue being full."""
        self._dropped = 0
        """How many offers were left in the inbox so far."""
        self._writer = manifest.ManifestWriter(
            store, run_id, seconds_per_part=config.seconds_per_part, autoflush=False
        )

    def counters(self) -> Counters:
        """What the intake harvested so far (a copy): requests by status, images, bytes,
        manifest rows and parts."""
        lane = self._lane.counters() if self._lane is not None else Counters()
        written = Counters(manifest_parts=self._writer.parts_written)
        return self._counts + lane + written

    @property
    def backlog(self) -> int:
        """Deliveries stored and not yet harvested by this process."""
        return len(self._queued) + self._waiting

    def offer(self, key: str) -> None:
        """Harvest the delivery stored at ``key`` (once, however often it is offered), just
        received."""
        self._arrivals += 1
        self._enqueue(key)

    def _enqueue(self, key: str) -> None:
        """Queue ``key`` unless it is queued; leave it in the inbox if the queue is full."""
        if key in self._queued:
            return
        if len(self._queued) >= MAX_QUEUED:
            self._waiting += 1
            self._dropped += 1
            return
        try:
            self._keys.send_nowait(key)
        except anyio.ClosedResourceError:
            return  # stopped: the next start (or another process) harvests it
        self._queued.add(key)
        if self._offered is not None:
            self._offered.add(key)

    @property
    def harvests_at_once(self) -> int:
        """How many deliveries may be harvested at once now (fewer while many arrive)."""
        return int(self._harvests.total_tokens)

    def holds(self, key: str) -> bool:
        """True if ``key`` is queued or in flight here, or its rows are being written (a hint
        for ``rescan_soon``, whose look tells exactly)."""
        return key in self._queued or key in self._flushing

    def rescan_soon(self) -> None:
        """Look for stored deliveries this process does not hold within ``RESCAN_SOONEST``
        seconds (a put answered 503, or a repeated delivery that no harvest here holds)."""
        self._rescan_soon.set()

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Harvest until cancelled; then write what was harvested and let others take over
        what is left (shielded). Raises ``OutputError`` if the inbox cannot be written at
        the start."""
        await anyio.to_thread.run_sync(self.inbox.beat, self.owner)  # before any claim
        self._beat_at = time.monotonic()
        for key in await anyio.to_thread.run_sync(self._left_over):
            self._enqueue(key)
        settings = LaneSettings(
            run_id=self.run_id,
            store=self.store,
            base_url=DEFAULT_BASE_URL,  # deliveries come from fal: its images are public
            authorization="",
            concurrency=1,
            image_concurrency=self.config.image_concurrency,
            rps=1.0,
            retry=RetryPolicy(),
            pending_wait=0.0,
            max_image_bytes=self.config.max_image_bytes,
            allow_private_images=self.config.allow_private_images,
            connect_timeout=CONNECT_TIMEOUT,
            read_timeout=self.config.read_timeout,
            seed=None,
        )
        lane = self._lane = Lane(settings)
        try:
            async with lane.opened(), anyio.create_task_group() as tg:
                for _ in range(self.config.image_concurrency):
                    tg.start_soon(self._work, lane)
                tg.start_soon(self._flusher)
                tg.start_soon(self._expirer)
                tg.start_soon(self._rescanner)
                tg.start_soon(self._prioritizer)
                tg.start_soon(self._beater)
                task_status.started()
        finally:
            with anyio.CancelScope(shield=True):
                try:
                    await self._flush()
                finally:
                    self._keys.close()
                    self._receive.close()
                    await self._retire()

    async def _retire(self) -> None:
        try:
            await anyio.to_thread.run_sync(self.inbox.retire, self.owner)
        except OutputError as exc:
            logger.error("%s; this process's claims are taken over when its beat ages", exc)

    def _left_over(self) -> list[str]:
        """The inbox's deliveries not marked done to harvest: less those another process
        holds, and those a part already holds (marked now)."""
        pending = self.inbox.pending()
        if not pending:
            return []
        left, taken = self._take(pending, check_all=True)
        self._taken |= taken
        if left:
            logger.info("%d deliveries from before the start to harvest", len(left))
        return left

    def _take(self, keys: list[str], *, check_all: bool) -> tuple[list[str], set[str]]:
        """Of ``keys`` (stored, not marked done, not held here), those to harvest, in their
        order, and those of them taken over. A key another live process claimed is left to
        it. A dead process's claim is taken over, unless a part holds its rows (written
        before its marks): then it is marked done; with ``check_all``, so is every other key
        a part holds."""
        claims = self.inbox.claims(keys, self.owner)
        dead = {key for key in keys if claims[key].dead}
        free = {key for key in keys if claims[key].number == 0 or claims[key].mine}
        checked = (free | dead) if check_all else dead
        written = self._written_deliveries(checked) if checked else set()
        for key in written:
            self.inbox.mark_done(key)
        taken = {
            key for key in dead - written if self.inbox.take_over(key, claims[key], self.owner)
        }
        if dead:
            logger.info(
                "%d deliveries of stopped processes taken over (%d found written)",
                len(taken),
                len(dead & written),
            )
        harvest = [key for key in keys if key in taken or (key in free and key not in written)]
        return harvest, taken

    def _written_deliveries(self, keys: set[str]) -> set[str]:
        import polars as pl

        try:
            rows = manifest.scan(self.store)
            found = (
                rows.filter(pl.col("source_file").str.starts_with(DELIVERIES))
                .select("source_file")
                .unique()
                .collect()
            )
        except (OSError, pl.exceptions.PolarsError) as exc:
            raise ManifestError(f"cannot read the manifest of {self.config.out}: {exc}") from exc
        return {key for key in found.get_column("source_file").to_list() if key in keys}

    async def _prioritizer(self) -> None:
        """Fewer harvests at once while deliveries arrive faster than ``BUSY_RATE``."""
        busy, full = busy_harvests(self.config.image_concurrency), self.config.image_concurrency
        while True:
            self._arrivals = 0
            await anyio.sleep(PRIORITY_TICK)
            self._busy = self._arrivals >= BUSY_RATE * PRIORITY_TICK
            self._harvests.total_tokens = busy if self._busy else full

    async def _work(self, lane: Lane) -> None:
        async for key in self._receive:
            try:
                async with self._harvests:
                    rows = await self._claim_and_harvest(lane, key)
            except OutputError as exc:
                self.failed[type(exc).__name__] += 1
                logger.error(
                    "delivery %s not harvested, left in the inbox (tried again within %g s): %s",
                    key,
                    RESCAN_EVERY,
                    exc,
                )
                continue
            except Exception as exc:  # noqa: BLE001 - one delivery never stops the others
                # Whatever one delivery's bytes make decoding or harvesting raise (a file
                # without a field, a body no parser expected): logged, counted, left in the
                # inbox; the server and the other deliveries go on.
                self.failed[type(exc).__name__] += 1
                self._unreadable.add(key)
                logger.error(
                    "delivery %s is unreadable, left in the inbox: %s: %s",
                    key,
                    type(exc).__name__,
                    exc,
                )
                continue
            finally:
                self._queued.discard(key)
                if self._waiting and len(self._queued) == MAX_QUEUED // 2:
                    self.rescan_soon()
            if rows is None:
                continue
            self._writer.add(rows)
            self._unmarked.append(key)
            self._counts.requests[rows[0].request_status] += 1
            self._counts.manifest_rows += len(rows)

    async def _claim_and_harvest(self, lane: Lane, key: str) -> list[ManifestRow] | None:
        """The rows of ``key``'s delivery, None if it is not this process's to harvest (held
        by another, or a dead process's claim: the next look takes that over)."""
        claim = await anyio.to_thread.run_sync(self.inbox.claim, key, self.owner)
        if not claim.mine:
            if claim.dead:
                self.rescan_soon()
            return None
        taken_over = key in self._taken
        self._taken.discard(key)
        if (
            not claim.fresh
            and not taken_over
            and (
                key in self._flushing
                or key in self._unmarked
                or await anyio.to_thread.run_sync(self.inbox.is_done, key)
            )
        ):
            return None  # harvested here already: offered again
        rows = await self._harvest(lane, key)
        if time.monotonic() - self._beat_at > CLAIM_STALE:
            # Stalled past the claims' age: another process may have taken this one over.
            still = await anyio.to_thread.run_sync(self.inbox.claims, [key], self.owner)
            if not still[key].mine:
                logger.warning("delivery %s was taken over while this process stalled", key)
                return None
        return rows

    async def _harvest(self, lane: Lane, key: str) -> list[ManifestRow]:
        delivery = await anyio.to_thread.run_sync(self.inbox.read, key)
        outcome = delivery_outcome(delivery.body)
        model = delivery.model or ""
        # Never fetched (the delivery is the result): no result path.
        pair = Pair(model, delivery.request_id, key, 0, pair_key(model, delivery.request_id), "")
        rows = await lane.rows_for(pair, outcome)
        return [dataclasses.replace(row, model=delivery.model, source_line=None) for row in rows]

    async def _flusher(self) -> None:
        while True:
            await anyio.sleep(TICK)
            if self._writer.due:
                try:
                    await self._flush()
                except OutputError as exc:
                    logger.error("%s; tried again at the next part", exc)

    async def _flush(self) -> None:
        """Write the buffered rows as a part, then mark their deliveries done (those a mark
        failed for are marked at the next flush)."""
        keys, self._unmarked = self._unmarked, []
        self._flushing.update(keys)
        try:
            await self._writer.flush_in_thread()
        except OutputError:
            self._flushing.difference_update(keys)
            self._unmarked[:0] = keys
            raise
        marked = await anyio.to_thread.run_sync(self._mark, sorted(self._flushing))
        self._flushing.difference_update(marked)

    def _mark(self, keys: Iterable[str]) -> list[str]:
        marked = []
        for key in keys:
            try:
                self.inbox.mark_done(key)
            except OutputError as exc:
                logger.error("%s; marked at the next part", exc)
                break
            marked.append(key)
        return marked

    async def _rescanner(self) -> None:
        """Offer the stored deliveries not marked done that this process does not hold:
        every ``RESCAN_EVERY`` seconds, or ``RESCAN_SOONEST`` after ``rescan_soon``; not
        while deliveries arrive faster than ``BUSY_RATE`` (a look lists the whole inbox)."""
        while True:
            with anyio.move_on_after(RESCAN_EVERY):
                await self._rescan_soon.wait()
                await anyio.sleep(RESCAN_SOONEST)
            while self._busy:
                await anyio.sleep(PRIORITY_TICK)
            self._rescan_soon = anyio.Event()
            before = self._held()
            offered: set[str] = set()
            self._offered = offered
            dropped = self._dropped
            try:
                pending, count = await anyio.to_thread.run_sync(
                    functools.partial(self.inbox.oldest_pending, MAX_QUEUED, besides=before)
                )
            except OutputError as exc:
                logger.error("cannot list the inbox: %s", exc)
                continue
            finally:
                self._offered = None
            # A key marked done while the inbox was listed was held before, or offered since.
            held = before | self._held() | offered
            found = [key for key in pending if key not in held]
            # Beyond the listing's oldest: left in the inbox, counted. Offers left in the inbox
            # while it was listed may not be in the listing: counted too (a backlog that is too
            # large for a while is safe; one too small would say "idle" early).
            beyond = count - len(pending)
            during = self._dropped - dropped
            if found:
                try:
                    take = functools.partial(self._take, found, check_all=False)
                    found, taken = await anyio.to_thread.run_sync(take)
                except (OutputError, ManifestError) as exc:
                    logger.error("cannot look at the claims of stored deliveries: %s", exc)
                    continue
                self._taken |= taken
                found = [key for key in found if key not in self._held()]
            if found:
                logger.info("%d stored deliveries not harvested yet, harvested now", len(found))
            self._waiting = 0
            for key in found:
                self._enqueue(key)
            self._waiting += beyond + during

    async def _beater(self) -> None:
        """Store this process's beat every ``BEAT_EVERY`` seconds: its claims hold while it
        does."""
        while True:
            await anyio.sleep(BEAT_EVERY)
            try:
                await anyio.to_thread.run_sync(self.inbox.beat, self.owner)
            except OutputError as exc:
                logger.error("cannot store this process's beat: %s", exc)
            else:
                self._beat_at = time.monotonic()

    def _held(self) -> set[str]:
        return self._queued | self._flushing | set(self._unmarked) | self._unreadable

    async def _expirer(self) -> None:
        keep = timedelta(days=self.config.keep_days)
        while True:
            before = datetime.now(UTC) - keep
            try:
                removed = await anyio.to_thread.run_sync(self.inbox.expire, before)
            except OutputError as exc:
                logger.error("cannot remove old deliveries: %s", exc)
            else:
                if removed:
                    logger.info("removed %d deliveries older than %s", removed, keep)
            await anyio.sleep(EXPIRE_EVERY)

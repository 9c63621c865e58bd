"""The webhook receiver: ``POST /fal/webhook?model=owner/app[/path]`` and ``GET /healthz``.

A delivery is answered 2xx only once it is durable in the inbox: its size is checked from
its Content-Length before anything is read (413, unread), its body read within
``read_timeout`` (408 for slow senders), its signature checked on the raw bytes (401, and
nothing stored, for anything not signed by fal for an allowed account), and it is stored
create-once (503 if it cannot be, so fal retries it). A repeated delivery of a stored request
is answered 200 and not stored again. ``/healthz`` answers 200 while a delivery can be stored
and 503, with the reason, while it cannot; ``/metrics`` serves the counts (``serve.metrics``).

``serve`` runs beside the harvests, compactions and checks of the same output without taking
its lock: its temp files are in a folder of its own (``Store.own_temp``), never ``.tmp``, which
a harvest empties; its run record (``serve.record``, ``kind`` ``serve``) says it is serving,
refreshed every few seconds, and tells a compaction to take its manifest folder's parts one by
one and leave the folder to it (docs/architecture.md). It stops accepting on SIGTERM or SIGINT,
lets the requests in flight finish, writes the harvested rows and its record, and returns.
"""

from __future__ import annotations

import contextlib
import logging
import re
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final

import anyio
from aiohttp import web

from harvester.api.webhooks import KeysUnavailable, Refused, WebhookVerifier
from harvester.counters import Counters
from harvester.errors import OutputError
from harvester.serve import metrics
from harvester.serve.config import CONNECT_TIMEOUT, SHUTDOWN_GRACE, ServeConfig
from harvester.serve.intake import Intake
from harvester.serve.record import ServerRecord, Snapshot
from harvester.storage import runs
from harvester.storage.inbox import Delivery, Inbox, delivery_key
from harvester.storage.objects import Store, open_store
from harvester.storage.runs import IntakeRecord

logger = logging.getLogger(__name__)

WEBHOOK_PATH: Final = "/fal/webhook"
BODIES_IN_FLIGHT: Final = 4
"""Bodies of the largest size allowed that may be read at once (a byte budget): a delivery
that would take more is answered 503 unread, and fal retries it."""
MODEL: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9._-]+)+")
"""``?model=``: a model id as the queue URLs take it, ``owner/app`` or ``owner/app/path``."""


@dataclass(slots=True)
class ServeCounters:
    accepted: int = 0
    """Deliveries stored now."""
    repeated: int = 0
    """Deliveries of a request already stored (answered 200, not stored again)."""
    refused: Counter[str] = field(default_factory=Counter)
    """By reason: ``bad-signature``, ``stale-timestamp``, ``too-large``, ..."""
    unavailable: int = 0
    """Answered 503: the delivery could not be stored or checked now (fal retries)."""
    latency: metrics.Latency = field(default_factory=metrics.Latency)
    """From arrival to the 200 of each delivery answered 200."""
    last_stored_at: datetime | None = None
    """When the last delivery was stored."""


@dataclass(frozen=True, slots=True)
class ServeSummary:
    run_id: str
    served: ServeCounters
    harvested: Counters


class WebhookServer:
    """The HTTP side: handlers over a verifier, an inbox and an intake."""

    def __init__(
        self, config: ServeConfig, verifier: WebhookVerifier, inbox: Inbox, intake: Intake
    ) -> None:
        self.config = config
        self.verifier = verifier
        self.inbox = inbox
        self.intake = intake
        self.counters = ServeCounters()
        self._reading = 0
        """Bytes reserved by the bodies being read or held until their answer."""

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.config.max_body_bytes)
        app.router.add_post(WEBHOOK_PATH, self.webhook)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/metrics", self.prometheus)
        return app

    def _refuse(self, reason: str, status: int, message: str, request: web.Request) -> web.Response:
        self.counters.refused[reason] += 1
        logger.warning("delivery refused (%s) from %s: %s", reason, request.remote, message)
        response = web.json_response({"detail": message}, status=status)
        if status in (408, 413):
            response.force_close()  # the rest of the body is not read
        return response

    async def webhook(self, request: web.Request) -> web.Response:
        started = time.monotonic()
        limit = self.config.max_body_bytes
        too_large = f"the body is larger than {limit:,} bytes (--max-body-bytes)"
        length = request.content_length
        if length is not None and length > limit:
            return self._refuse("too-large", 413, too_large, request)
        model = request.query.get("model")
        if model is not None and not MODEL.fullmatch(model):
            return self._refuse(
                "bad-model", 400, "?model= must be a model id: owner/app[/path]", request
            )
        # Each body in flight reserves its announced length (the limit if it announces none)
        # until it is answered: the memory bodies hold stays under a budget.
        reserve = limit if length is None else length
        if self._reading + reserve > limit * BODIES_IN_FLIGHT:
            self.counters.unavailable += 1
            logger.error("delivery not read, answered 503: too many bodies in flight")
            return web.json_response({"detail": "too many deliveries in flight"}, status=503)
        self._reading += reserve
        try:
            return await self._take(request, model, limit, started)
        finally:
            self._reading -= reserve

    async def _take(
        self, request: web.Request, model: str | None, limit: int, started: float
    ) -> web.Response:
        too_large = f"the body is larger than {limit:,} bytes (--max-body-bytes)"
        try:
            with anyio.fail_after(self.config.read_timeout):
                body = await _read_body(request, limit)
        except TimeoutError:
            message = f"the body did not arrive within {self.config.read_timeout:g} s"
            return self._refuse("slow", 408, message, request)
        if body is None:
            return self._refuse("too-large", 413, too_large, request)
        try:
            verified = await self.verifier.verify(request.headers, body)
        except Refused as exc:
            return self._refuse(exc.reason, 401, str(exc), request)
        except KeysUnavailable as exc:
            self.counters.unavailable += 1
            logger.error("delivery not checked, answered 503: %s", exc)
            return web.json_response({"detail": "cannot check signatures now"}, status=503)
        delivery = Delivery(
            request_id=verified.request_id,
            model=model,
            user_id=verified.user_id,
            received_at=datetime.now(UTC),
            body=body,
        )
        try:
            stored = await self.inbox.put(delivery)
        except OutputError as exc:
            self.counters.unavailable += 1
            self.intake.rescan_soon()  # the put may have stored it all the same
            logger.error("delivery not stored, answered 503: %s", exc)
            return web.json_response({"detail": "cannot store deliveries now"}, status=503)
        key = delivery_key(delivery.request_id)
        if stored:
            self.counters.accepted += 1
            self.counters.last_stored_at = delivery.received_at
            self.intake.offer(key)
        else:
            self.counters.repeated += 1
            if not self.intake.holds(key):  # maybe done; maybe stored by a put answered 503
                self.intake.rescan_soon()
        self.counters.latency.observe(time.monotonic() - started)
        return web.json_response({"stored": stored})

    def snapshot(self) -> Snapshot:
        """The intake so far, for the run record."""
        served = self.counters
        intake = IntakeRecord(
            stored=served.accepted,
            repeated=served.repeated,
            refused=dict(served.refused),
            unavailable=served.unavailable,
            backlog=self.intake.backlog,
            failed=sum(self.intake.failed.values()),
            last_delivery_at=served.last_stored_at,
        )
        return Snapshot(intake=intake, harvested=self.intake.counters())

    async def healthz(self, request: web.Request) -> web.Response:
        problem = await anyio.to_thread.run_sync(self.inbox.problem)
        if problem is not None:
            return web.json_response({"status": "unavailable", "problem": problem}, status=503)
        return web.json_response({"status": "ok", "backlog": self.intake.backlog})

    async def prometheus(self, request: web.Request) -> web.Response:
        served, harvested = self.counters, self.intake.counters()
        text = metrics.render(
            stored=served.accepted,
            repeated=served.repeated,
            unavailable=served.unavailable,
            refused=served.refused,
            backlog=self.intake.backlog,
            failed=self.intake.failed,
            harvested=harvested,
            latency=served.latency,
        )
        return web.Response(text=text, content_type="text/plain", charset="utf-8")


async def _read_body(request: web.Request, limit: int) -> bytes | None:
    """The whole body, or None as soon as it is over ``limit`` bytes."""
    data = bytearray()
    async for chunk in request.content.iter_any():
        data += chunk
        if len(data) > limit:
            return None
    return bytes(data)


def _bind(host: str, port: int) -> socket.socket:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(1024)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


Ready = Callable[[str], None]
"""Called with the webhook's URL once the server listens."""


async def serve(
    config: ServeConfig,
    *,
    run_id: str,
    on_ready: Ready | None = None,
    stop: anyio.Event | None = None,
) -> ServeSummary:
    """Receive and harvest deliveries until ``stop`` is set (or, in the main thread, SIGTERM
    or SIGINT arrives); returns the counts. Raises ``OutputError`` if the output cannot take
    deliveries (or the run record) at the start, ``OSError`` if the address cannot be
    listened on. Takes no lock: harvests, compactions and checks of the output run beside it."""
    base = open_store(config.out)
    base.prepare()
    with base.own_temp(run_id) as store:
        return await _serve(config, store, run_id, on_ready, stop)


async def _serve(
    config: ServeConfig,
    store: Store,
    run_id: str,
    on_ready: Ready | None,
    stop: anyio.Event | None,
) -> ServeSummary:
    from harvester.api.transport import open_client

    inbox = Inbox(store)
    problem = await anyio.to_thread.run_sync(inbox.problem)
    if problem is not None:
        raise OutputError(f"cannot take deliveries: {problem}")
    client = open_client(max_connections=4, connect_timeout=CONNECT_TIMEOUT, read_timeout=10.0)
    intake = Intake(config, store, inbox, run_id=run_id)
    server = WebhookServer(
        config,
        WebhookVerifier(client, config.jwks_url, user_ids=frozenset(config.user_ids)),
        inbox,
        intake,
    )
    record = ServerRecord(store, run_id, server.snapshot)
    runner = web.AppRunner(server.app(), access_log=None, handle_signals=False)
    sock = _bind(config.host, config.port)
    running = False
    ended: BaseException | None = None
    # Caught from here on: a SIGTERM that comes while the server starts stops it cleanly once
    # it has started, as one that comes later does.
    signals = contextlib.ExitStack()
    received = None
    if threading.current_thread() is threading.main_thread():
        received = signals.enter_context(anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM))
    try:
        # Before the first part: a compaction must know this folder may still grow.
        await anyio.to_thread.run_sync(record.write, record.record())
        await runner.setup()
        running = True
        async with anyio.create_task_group() as tg:
            await tg.start(intake.run)
            tg.start_soon(record.keep)
            await web.SockSite(runner, sock, shutdown_timeout=SHUTDOWN_GRACE).start()
            if on_ready is not None:
                host, port = sock.getsockname()[:2]
                shown = f"[{host}]" if ":" in host else host
                on_ready(f"http://{shown}:{port}{WEBHOOK_PATH}")
            await _until_stopped(stop, received)
            logger.info("stopping: no new deliveries; writing what was harvested")
            running = False
            await runner.cleanup()  # stops accepting; lets the requests in flight finish
            tg.cancel_scope.cancel()  # the intake writes its rows as it stops
    except BaseException as exc:
        ended = exc
        raise
    finally:
        with anyio.CancelScope(shield=True):
            if running:
                await runner.cleanup()
            await client.aclose()
            sock.close()
            try:
                await _finish(record, ended)
            finally:
                signals.close()
    return ServeSummary(run_id, server.counters, intake.counters())


async def _finish(record: ServerRecord, ended: BaseException | None) -> None:
    """The record's last write, after the last part: ``finished``, exit 0 for a clean stop,
    the error otherwise."""
    if ended is None:
        final = record.record(state=runs.FINISHED, exit_code=0)
    else:
        code = getattr(ended, "exit_code", 1)
        error = f"{type(ended).__name__}: {ended}"
        final = record.record(state=runs.FINISHED, exit_code=int(code), error=error)
    try:
        await anyio.to_thread.run_sync(record.write, final)
    except OutputError as exc:
        logger.error("cannot write the server's run record: %s", exc)


async def _until_stopped(
    stop: anyio.Event | None, received: AsyncIterator[signal.Signals] | None
) -> None:
    """Until ``stop`` is set or one of ``signals`` arrives (or arrived already)."""
    async with anyio.create_task_group() as tg:
        if stop is not None:

            async def wait_stop() -> None:
                await stop.wait()
                tg.cancel_scope.cancel()

            tg.start_soon(wait_stop)
        if received is not None:
            signals = received

            async def wait_signal() -> None:
                async for _ in signals:
                    tg.cancel_scope.cancel()
                    return

            tg.start_soon(wait_signal)
        await anyio.sleep_forever()


def serve_forever(
    config: ServeConfig, *, run_id: str, on_ready: Ready | None = None
) -> ServeSummary:
    """``serve`` on its own event loop, until SIGTERM or SIGINT."""
    from harvester.run.request import EVENT_LOOP_OPTIONS

    async def main() -> ServeSummary:
        return await serve(config, run_id=run_id, on_ready=on_ready)

    return anyio.run(main, backend_options=EVENT_LOOP_OPTIONS)

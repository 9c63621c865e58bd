"""The sandbox HTTP server: routing, auth, transient faults and counters over ``world``.

One anyio task per connection, HTTP/1.1 keep-alive, 127.0.0.1 only. ``running_sandbox`` runs
it on a background thread (tests, benchmarks); ``serve_forever`` blocks (the CLI).
"""

from __future__ import annotations

import json
import logging
import math
import random
import signal
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from email.utils import formatdate
from typing import Final

import anyio
import anyio.from_thread
from anyio.abc import Listener, SocketAttribute, SocketStream, TaskStatus
from anyio.streams.buffered import BufferedByteReceiveStream

from harvester.sandbox import world
from harvester.sandbox.config import MEDIA_FAULTS, RESULT_FAULTS, SandboxConfig
from harvester.sandbox.wire import (
    MAX_BODY_BYTES,
    MAX_HEAD_BYTES,
    BadRequest,
    Request,
    parse_head,
    response_head,
)
from harvester.sandbox.world import Behaviour, Reply, json_reply

logger = logging.getLogger(__name__)

HOST: Final = "127.0.0.1"
IDLE_TIMEOUT: Final = 60.0
"""Seconds a keep-alive connection may sit idle before the server closes it."""
LINGER_SECONDS: Final = 1.0
"""After an error answer, how long to drain the client's unread input before closing."""
NAMESPACES: Final = frozenset({"workflows", "comfy"})

STAT_KEYS: Final = (
    "connections",
    "result_requests",
    "result_ok",
    "status_requests",
    "media_requests",
    "media_ok",
    "media_bytes",
    "auth_leaks",
    "unauthorized",
    "rate_limited",
    "throttled_per_id",
    "over_max_rps",
    "faults_injected",
    "pending_served",
    "not_found_served",
    "failed_served",
    "bad_requests",
    "internal_errors",
    *(f"fault_{name}" for name in dict.fromkeys(RESULT_FAULTS + MEDIA_FAULTS)),
)

RATE_LIMIT_BODY: Final = (
    b'{"detail": "Too many concurrent requests", "error_type": "concurrent_requests_limit"}'
)
UNAVAILABLE_BODY: Final = b'{"detail": "Service temporarily unavailable"}'
UNAUTHORIZED_BODY: Final = b'{"detail": "Unauthorized"}'
GATEWAY_HTML: Final = (
    b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    b"<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n"
    b"</body>\r\n</html>\r\n"
)


class _Reset(Exception):
    """Raised inside the request handler to drop the connection with a TCP reset."""


class _CutShort(Exception):
    """Send ``reply``'s head with its whole length, then half its body, then close."""

    def __init__(self, reply: Reply) -> None:
        super().__init__("cut short")
        self.reply = reply


class Sandbox:
    """Handle of a running sandbox."""

    def __init__(self, config: SandboxConfig, base_url: str, counters: _Counters) -> None:
        self.config = config
        self.base_url = base_url
        """``http://127.0.0.1:PORT``"""
        self._counters = counters

    def stats(self) -> dict[str, int]:
        """A consistent snapshot of the counters (safe from any thread)."""
        return self._counters.snapshot()

    def result_starts(self) -> list[float]:
        """When the last result requests arrived (``time.monotonic()``), oldest first: what
        a rate limit looks like from the server."""
        return list(self._counters.result_starts)

    def accepted_starts(self) -> list[float]:
        """When the last result requests that were not answered 429 arrived, oldest first."""
        return list(self._counters.accepted_starts)

    def result_url(self, model: str, request_id: str) -> str:
        """The result URL of ``request_id`` for an ``owner/app`` (or ``workflows/...``) id."""
        return f"{self.base_url}/{model}/requests/{request_id}"

    def __repr__(self) -> str:
        return f"Sandbox({self.base_url!r})"


RESULT_STARTS_KEPT: Final = 10_000


class _Counters:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(STAT_KEYS, 0)
        self.result_starts: deque[float] = deque(maxlen=RESULT_STARTS_KEPT)
        """``time.monotonic()`` when each recent result request arrived."""
        self.accepted_starts: deque[float] = deque(maxlen=RESULT_STARTS_KEPT)
        """The same, for those not answered 429."""

    def add(self, key: str, amount: int = 1) -> None:
        with self._lock:
            self._counts[key] += amount

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


class _Server:
    def __init__(self, config: SandboxConfig) -> None:
        self.config = config
        self.counters = _Counters()
        self.base_url = ""
        self._lock = threading.Lock()
        self._random = random.Random(config.seed)
        self._fetches: dict[str, int] = {}
        self._retry_after_count = 0
        self._throttled: dict[str, int] = {}
        """Per id: the 429s served so far by ``throttle_share``."""
        self._accepted_window: deque[float] = deque()
        """Arrival times of the result requests accepted within the last second (``max_rps``)."""
        accepted = {"any": ("bearer", "key"), "bearer": ("bearer",), "key": ("key",)}
        self._auth_ok = frozenset(
            f"{scheme} {config.key}" for scheme in accepted[config.auth_scheme]
        )

    async def listen(self) -> Listener[SocketStream]:
        """Bind 127.0.0.1 (raises ``OSError`` if the port is taken) and learn the port."""
        listener = await anyio.create_tcp_listener(
            local_host=HOST, local_port=self.config.port, backlog=1024
        )
        port = listener.extra(SocketAttribute.local_port)  # noqa: S610 (anyio, not Django)
        self.base_url = f"http://{HOST}:{port}"
        return listener

    @property
    def sandbox(self) -> Sandbox:
        return Sandbox(self.config, self.base_url, self.counters)

    async def run(self, *, task_status: TaskStatus[Sandbox] = anyio.TASK_STATUS_IGNORED) -> None:
        async with await self.listen() as listener:
            task_status.started(self.sandbox)
            await listener.serve(self.connection)

    # -- connections -------------------------------------------------------------------

    async def connection(self, stream: SocketStream) -> None:
        """Serve one client connection until it closes."""
        self.counters.add("connections")
        try:
            async with stream:
                try:
                    await self._requests(stream)
                except _Reset:
                    _linger_zero(stream)  # so that closing the stream sends a reset
                except anyio.DelimiterNotFound:
                    self.counters.add("bad_requests")
                    await self._send_error(stream, 431, "request head too large")
        except (
            anyio.EndOfStream,
            anyio.IncompleteRead,
            anyio.BrokenResourceError,
            anyio.ClosedResourceError,
            OSError,
        ):
            return  # the client went away
        except Exception:  # a bug on one connection must not end the whole sandbox
            logger.exception("sandbox bug on a connection; closed it")
            self.counters.add("internal_errors")

    async def _requests(self, stream: SocketStream) -> None:
        """Answer requests on one connection until either side closes it."""
        receive = BufferedByteReceiveStream(stream)
        while True:
            with anyio.move_on_after(IDLE_TIMEOUT) as idle:
                head = await receive.receive_until(b"\r\n\r\n", MAX_HEAD_BYTES)
            if idle.cancelled_caught:
                return
            if len(head) > MAX_HEAD_BYTES:  # the delimiter came in the same read as the excess
                raise anyio.DelimiterNotFound(MAX_HEAD_BYTES)
            if not await self._exchange(stream, receive, head):
                return

    async def _send_error(self, stream: SocketStream, status: int, reason: str) -> None:
        """Answer ``status`` and close gracefully, so the client can read the answer."""
        body = json.dumps({"detail": reason}).encode()
        head = response_head(status, (("Content-Type", world.JSON),), len(body), keep_alive=False)
        await stream.send(head + body)
        # Closing with unread input would send a reset that can destroy the answer in flight:
        # half-close, then drain what the client still sends, for a moment (nginx's
        # "lingering close").
        await stream.send_eof()
        with anyio.move_on_after(LINGER_SECONDS):
            while True:
                await stream.receive()

    async def _exchange(
        self, stream: SocketStream, receive: BufferedByteReceiveStream, head: bytes
    ) -> bool:
        """Answer one request; True if the connection stays open for the next one."""
        try:
            request = parse_head(head)
            keep_alive = request.keep_alive
            if request.method == "GET" and (length := request.content_length):
                if length >= MAX_BODY_BYTES:
                    raise BadRequest(413, "request body too large")
                await receive.receive_exactly(length)
        except BadRequest as exc:
            self.counters.add("bad_requests")
            await self._send_error(stream, exc.status, exc.reason)
            return False
        if self.config.latency:
            await anyio.sleep(self.config.latency)
        if request.method != "GET":
            # The body, if any, is not read: close rather than parse it as the next request.
            has_body = "content-length" in request.headers or "transfer-encoding" in request.headers
            keep_alive = keep_alive and not has_body
            reply = json_reply(405, b'{"detail": "Method Not Allowed"}')
            reply = reply._replace(headers=(*reply.headers, ("Allow", "GET")))
            await self._send(stream, reply, keep_alive=keep_alive, http_10=request.http_10)
            return keep_alive

        try:
            reply, truncate = await self._route(request)
        except _Reset:
            raise
        except _CutShort as cut:
            reply = cut.reply
            head = response_head(reply.status, reply.headers, len(reply.body), keep_alive=False)
            await stream.send(head + reply.body[: len(reply.body) // 2])
            return False
        except Exception:
            logger.exception("sandbox bug while answering %s", request.path)
            self.counters.add("internal_errors")
            reply, truncate = json_reply(500, b'{"detail": "sandbox internal error"}'), False
        if truncate:
            head = response_head(reply.status, reply.headers, len(reply.body), keep_alive=False)
            part = reply.body[: len(reply.body) // 2]
            await stream.send(head + part)
            self.counters.add("media_bytes", len(part))
            return False
        await self._send(stream, reply, keep_alive=keep_alive, http_10=request.http_10)
        return keep_alive

    async def _send(
        self, stream: SocketStream, reply: Reply, *, keep_alive: bool, http_10: bool
    ) -> None:
        head = response_head(
            reply.status, reply.headers, len(reply.body), keep_alive=keep_alive, http_10=http_10
        )
        await stream.send(head + reply.body)

    # -- routing -----------------------------------------------------------------------

    async def _route(self, request: Request) -> tuple[Reply, bool]:
        """The reply, and whether to truncate it (media fault)."""
        segments = request.segments
        if len(segments) == 2 and segments[0] == "media":
            return await self._media(request, segments[1])
        if segments == ["__sandbox", "stats"]:
            body = json.dumps(self.counters.snapshot()).encode()
            return json_reply(200, body), False
        if segments and segments[0] in NAMESPACES:
            segments = segments[1:]
        if len(segments) in (3, 4) and segments[1] == "requests":
            # A relay placeholder model with one segment, such as ``auto/requests/{id}``.
            segments = [segments[0], segments[0], *segments[1:]]
        if (
            len(segments) in (4, 5)
            and segments[2] == "requests"
            and all(segments)
            and segments[4:] in ([], ["status"])
        ):
            _, app, _, request_id = segments[:4]
            if len(segments) == 5:
                return self._status(request, request_id), False
            return await self._result(request, app, request_id), False
        body = json.dumps({"detail": f"Not Found: {request.path}"}).encode()
        return json_reply(404, body), False

    def _authorized(self, request: Request) -> bool:
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        return f"{scheme.lower()} {key.strip()}" in self._auth_ok

    def _unauthorized(self) -> Reply:
        self.counters.add("unauthorized")
        reply = json_reply(401, UNAUTHORIZED_BODY)
        return reply._replace(headers=(*reply.headers, ("WWW-Authenticate", "Bearer")))

    def _status(self, request: Request, request_id: str) -> Reply:
        self.counters.add("status_requests")
        if not self._authorized(request):
            return self._unauthorized()
        with self._lock:
            fetches = self._fetches.get(request_id, 0)
        path = request.path.removesuffix("/status")
        return world.status_for(request_id, self.base_url, path, self.config, fetches=fetches)

    async def _result(self, request: Request, app: str, request_id: str) -> Reply:
        arrived = time.monotonic()
        self.counters.result_starts.append(arrived)
        try:
            reply = await self._answer_result(request, app, request_id, arrived)
        except _CutShort:
            self.counters.accepted_starts.append(arrived)
            raise
        if reply.status != 429:
            self.counters.accepted_starts.append(arrived)
        return reply

    async def _answer_result(
        self, request: Request, app: str, request_id: str, arrived: float
    ) -> Reply:
        self.counters.add("result_requests")
        if not self._authorized(request):
            return self._unauthorized()
        overload = self._overload(request_id, arrived)
        if overload is not None:
            return overload
        fault = self._draw(RESULT_FAULTS)
        if fault is not None:
            self.counters.add("faults_injected")
            self.counters.add(f"fault_{fault}")
            if fault == "slow":
                await anyio.sleep(self.config.slow_seconds)
            else:
                return self._transient(fault)

        fetch = 1
        kind = world.behaviour(request_id, self.config)
        if kind is Behaviour.FAULT_PENDING_THEN_DONE:
            with self._lock:
                fetch = self._fetches[request_id] = self._fetches.get(request_id, 0) + 1
        reply = world.result_for(app, request_id, self.base_url, self.config, fetch=fetch)
        if reply.body == world.PENDING_BODY:
            self.counters.add("pending_served")
        elif reply.status == 404:
            self.counters.add("not_found_served")
        elif reply.status != 200:
            self.counters.add("failed_served")
        elif kind not in (Behaviour.BAD_JSON, Behaviour.BAD_SHAPE):
            self.counters.add("result_ok")
        return reply

    def _overload(self, request_id: str, now: float) -> Reply | None:
        """A 429 from the overload modes (``throttle_share``, ``max_rps``), or None."""
        config = self.config
        if config.throttle_share and world.unit(config.seed, "throttle", request_id) < (
            config.throttle_share
        ):
            with self._lock:
                served = self._throttled.get(request_id, 0)
                if served < config.throttle_times:
                    self._throttled[request_id] = served + 1
            if served < config.throttle_times:
                self.counters.add("rate_limited")
                self.counters.add("throttled_per_id")
                reply = json_reply(429, RATE_LIMIT_BODY)
                if world.unit(config.seed, "throttle-retry-after", request_id) < 0.5:
                    seconds = f"{config.retry_after_seconds:g}"
                    return reply._replace(headers=(*reply.headers, ("Retry-After", seconds)))
                return reply
        if config.max_rps is not None:
            with self._lock:
                window = self._accepted_window
                while window and window[0] <= now - 1.0:
                    window.popleft()
                over = len(window) >= config.max_rps
                if not over:
                    window.append(now)
            if over:
                self.counters.add("rate_limited")
                self.counters.add("over_max_rps")
                return json_reply(429, RATE_LIMIT_BODY)
        return None

    def _transient(self, fault: str) -> Reply:
        if fault == "reset":
            raise _Reset
        if fault == "malformed_json":
            raise _CutShort(json_reply(200, world.CUT_RESULT_BODY))
        if fault == "server_error":
            return json_reply(503, UNAVAILABLE_BODY)
        if fault == "gateway_html":
            return Reply(502, (("Content-Type", "text/html"),), GATEWAY_HTML)
        self.counters.add("rate_limited")
        reply = json_reply(429, RATE_LIMIT_BODY)
        if fault == "rate_limit":
            return reply._replace(headers=(*reply.headers, ("X-Fal-Needs-Retry", "1")))
        return reply._replace(headers=(*reply.headers, ("Retry-After", self._retry_after())))

    def _retry_after(self) -> str:
        """Alternately delay-seconds and an HTTP date at least that far ahead."""
        seconds = self.config.retry_after_seconds
        with self._lock:
            self._retry_after_count += 1
            as_date = self._retry_after_count % 2 == 0
        if as_date:
            return formatdate(math.ceil(time.time() + seconds), usegmt=True)
        return f"{seconds:g}"

    async def _media(self, request: Request, name: str) -> tuple[Reply, bool]:
        self.counters.add("media_requests")
        if "authorization" in request.headers:
            self.counters.add("auth_leaks")
        token, _, ext = name.rpartition(".")
        fault = self._draw(MEDIA_FAULTS)
        if fault == "slow":
            await anyio.sleep(self.config.slow_seconds)
        elif fault == "reset":
            self.counters.add("faults_injected")
            self.counters.add("fault_reset")
            raise _Reset
        reply = world.media_for(token, ext, self.base_url)
        is_image = reply.status == 200 and reply.body != world.NOT_IMAGE_BODY
        truncate = fault == "truncate" and is_image
        if fault == "slow" or truncate:
            self.counters.add("faults_injected")
            self.counters.add(f"fault_{fault}")
        if is_image and not truncate:
            self.counters.add("media_ok")
            self.counters.add("media_bytes", len(reply.body))
        return reply, truncate

    def _draw(self, kinds: tuple[str, ...]) -> str | None:
        """At most one transient fault among ``kinds``, drawn with their rates."""
        faults = self.config.faults
        if not faults.enabled:
            return None
        with self._lock:
            draw = self._random.random()
        for kind in kinds:
            draw -= getattr(faults, kind)
            if draw < 0:
                return kind
        return None


def _linger_zero(stream: SocketStream) -> None:
    """Make the coming close a TCP reset (SO_LINGER 0) instead of an orderly shutdown."""
    sock: socket.socket = stream.extra(SocketAttribute.raw_socket)  # noqa: S610 (anyio, not Django)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:  # the peer closed first; nothing to reset
        return


@contextmanager
def running_sandbox(config: SandboxConfig | None = None) -> Iterator[Sandbox]:
    """Run a sandbox on a background thread; yields once it is listening, stops on exit."""
    server = _Server(config or SandboxConfig())
    with anyio.from_thread.start_blocking_portal(name="harvester-sandbox") as portal:
        future, sandbox = portal.start_task(server.run)
        try:
            yield sandbox
        finally:
            future.cancel()


def serve_forever(
    config: SandboxConfig, *, on_ready: Callable[[Sandbox], None] | None = None
) -> None:
    """Serve until SIGINT (Ctrl-C) or SIGTERM, then return.

    ``on_ready`` is called once the server listens (the CLI prints ``base_url``). Signals are
    handled only when called from the main thread.
    """

    async def main() -> None:
        server = _Server(config)
        async with await server.listen() as listener, anyio.create_task_group() as group:
            if threading.current_thread() is threading.main_thread():
                group.start_soon(_cancel_on_signal, group.cancel_scope)
            if on_ready is not None:
                on_ready(server.sandbox)
            await listener.serve(server.connection)

    try:
        anyio.run(main)
    except KeyboardInterrupt:
        return


async def _cancel_on_signal(scope: anyio.CancelScope) -> None:
    try:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                scope.cancel()
                return
    except NotImplementedError:  # pragma: no cover - Windows: Ctrl-C raises KeyboardInterrupt
        return

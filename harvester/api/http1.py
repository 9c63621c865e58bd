"""The run's connections: a small HTTP/1.1 client on asyncio protocols, as an httpx transport.

The harvester only ever sends GETs without a body and reads the answer, so this is all the
HTTP/1.1 it needs (RFC 9112), and nothing more: keep-alive connections pooled per origin,
TLS through the ``ssl`` module, bodies framed by Content-Length, by chunked transfer coding or
by the server closing the connection, informational (1xx) answers skipped. Everything else
about HTTP is httpx's: callers build ``httpx.Request`` objects and get ``httpx.Response``
objects, and every failure is raised as the ``httpx.TransportError`` it stands for.

Why not httpx's own transport or aiohttp's: per exchange, httpcore rescans its whole pool
(encode/httpx#3215) and aiohttp's ``ClientSession`` builds a request and a response object of
its own, with timers, trace hooks and cookie filtering, that the harvester then copies into
httpx's. Measured on the bench world (README, Performance), this client takes a fraction of
their CPU per exchange; ``bench/transports.py`` reproduces the comparison.

What a caller can rely on:

* A response head is at most ``MAX_HEAD_BYTES``; header lines folded over several lines
  (obsolete since RFC 7230) and malformed status lines are ``RemoteProtocolError``.
* A body cut short (fewer bytes than Content-Length, or a chunked body without its last
  chunk) is ``ReadError``; a connection closed before any answer is ``RemoteProtocolError``.
* A request that fails on a kept-alive connection before a single byte of the answer arrives
  is sent once more on a new connection: a server may close an idle connection just as a
  request goes out, and a GET is safe to repeat.
* The read timeout bounds every wait for bytes; the connect timeout bounds the TCP and TLS
  set-up. While a body is not read, the connection stops reading from the socket once
  ``HIGH_WATER`` bytes are buffered (the server then waits), so memory stays bounded.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator
from typing import Final, TypeAlias, cast

import httpx

MAX_HEAD_BYTES: Final = 64 * 1024
HIGH_WATER: Final = 256 * 1024
DEFAULT_PORTS: Final = {"http": 80, "https": 443}
_NO_BODY_STATUS: Final = frozenset({204, 304})

_Origin: TypeAlias = tuple[str, str, int]


class _Closed(Exception):
    """The connection ended; ``received`` says whether any of the answer had arrived."""

    def __init__(self, received: bool, cause: BaseException | None) -> None:
        super().__init__("server closed the connection")
        self.received = received
        self.cause = cause


def _timed_out(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection, one exchange at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False
        self._cause: BaseException | None = None
        self._paused = False
        self.reused = False
        self.idle_since = 0.0
        self.received = False
        """Whether any byte of the current exchange's answer has arrived."""

    # --- asyncio's side -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if len(self._buf) > HIGH_WATER and not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self._closed = True
        self._wake()
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._cause = exc
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    # --- the exchange's side --------------------------------------------------------------

    @property
    def usable(self) -> bool:
        """Idle, open, and nothing unasked-for arrived on it."""
        return not self._closed and not self._buf

    def send(self, data: bytes) -> None:
        self.received = False
        if self._closed or self._transport is None:
            raise _Closed(False, self._cause)
        self._transport.write(data)

    def close(self) -> None:
        self._closed = True
        self._buf.clear()
        if self._transport is not None:
            self._transport.close()

    async def _fill(self, timeout: float | None) -> None:
        """Wait until more bytes arrived; ``_Closed`` if none ever will."""
        if self._closed:
            raise _Closed(self.received or bool(self._buf), self._cause)
        if self._paused and self._transport is not None:
            self._paused = False
            self._transport.resume_reading()
        waiter = self._loop.create_future()
        self._waiter = waiter
        timer = self._loop.call_later(timeout, _timed_out, waiter) if timeout else None
        try:
            await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()
        if self._buf:
            self.received = True

    async def read_head(self, timeout: float | None) -> tuple[bytes, int, bytes, list[bytes]]:
        """The next answer's version, status, reason and header lines (1xx answers skipped)."""
        while True:
            buf = self._buf
            end = buf.find(b"\r\n\r\n")
            if end >= 0:
                head, sep = bytes(buf[:end]), b"\r\n"
                del buf[: end + 4]
            elif (end := buf.find(b"\n\n")) >= 0:  # bare LF line ends: tolerated
                head, sep = bytes(buf[:end]).replace(b"\r\n", b"\n"), b"\n"
                del buf[: end + 2]
            else:
                if len(buf) > MAX_HEAD_BYTES:
                    raise httpx.RemoteProtocolError(
                        f"response head is larger than {MAX_HEAD_BYTES} bytes"
                    )
                await self._fill(timeout)
                continue
            self.received = True
            lines = head.split(sep)
            version, status, reason = _status_line(lines[0])
            if 100 <= status < 200:
                if status == 101:
                    raise httpx.RemoteProtocolError("server switched protocols; not asked to")
                continue
            return version, status, reason, lines

    async def read_exactly(self, size: int, timeout: float | None) -> AsyncIterator[bytes]:
        left = size
        while left:
            buf = self._buf
            if not buf:
                try:
                    await self._fill(timeout)
                except _Closed:
                    raise httpx.ReadError(
                        f"server closed the connection {left:,} bytes before the end of the "
                        f"body ({size:,} bytes declared)"
                    ) from None
                continue
            if len(buf) <= left:
                chunk = bytes(buf)
                buf.clear()
            else:
                chunk = bytes(buf[:left])
                del buf[:left]
            left -= len(chunk)
            yield chunk

    async def read_line(self, timeout: float | None) -> bytes:
        while True:
            end = self._buf.find(b"\n")
            if end >= 0:
                line = bytes(self._buf[: end + 1])
                del self._buf[: end + 1]
                return line.rstrip(b"\r\n")
            if len(self._buf) > MAX_HEAD_BYTES:
                raise httpx.RemoteProtocolError("chunked body has a line that never ends")
            try:
                await self._fill(timeout)
            except _Closed:
                raise httpx.ReadError(
                    "server closed the connection inside a chunked body"
                ) from None

    async def read_chunked(self, timeout: float | None) -> AsyncIterator[bytes]:
        while True:
            line = await self.read_line(timeout)
            size_text = line.split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise httpx.RemoteProtocolError(f"malformed chunk size {line[:40]!r}") from None
            if size < 0 or not size_text.isalnum():
                raise httpx.RemoteProtocolError(f"malformed chunk size {line[:40]!r}")
            if size == 0:
                while await self.read_line(timeout):  # trailer fields, then an empty line
                    pass
                return
            async for chunk in self.read_exactly(size, timeout):
                yield chunk
            if await self.read_line(timeout):
                raise httpx.RemoteProtocolError("chunk not followed by CRLF")

    async def read_to_close(self, timeout: float | None) -> AsyncIterator[bytes]:
        while True:
            if self._buf:
                chunk = bytes(self._buf)
                self._buf.clear()
                yield chunk
            try:
                await self._fill(timeout)
            except _Closed:
                if self._buf:
                    yield bytes(self._buf)
                    self._buf.clear()
                return


def _status_line(line: bytes) -> tuple[bytes, int, bytes]:
    version, _, rest = line.partition(b" ")
    code, _, reason = rest.partition(b" ")
    if not version.startswith(b"HTTP/1.") or len(code) != 3 or not code.isdigit():
        raise httpx.RemoteProtocolError(f"malformed status line {line[:80]!r}")
    return version, int(code), reason.strip()


def _headers(lines: list[bytes]) -> list[tuple[bytes, bytes]]:
    headers = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or name[-1:] in b" \t" or line[:1] in b" \t":
            raise httpx.RemoteProtocolError(f"malformed header line {line[:80]!r}")
        headers.append((name, value.strip(b" \t")))
    return headers


def _framing(
    method: str, status: int, version: bytes, headers: list[tuple[bytes, bytes]]
) -> tuple[str, int, bool]:
    """How the body ends (``none``, ``length``, ``chunked`` or ``close``), its length, and
    whether the connection can carry another exchange afterwards (RFC 9112, 6.3 and 9.3)."""
    lengths: set[bytes] = set()
    codings = b""
    tokens = b""
    for name, value in headers:
        key = name.lower()
        if key == b"content-length":
            lengths.update(v.strip() for v in value.split(b","))
        elif key == b"transfer-encoding":
            codings += b"," + value.lower()
        elif key == b"connection":
            tokens += b"," + value.lower()
    connection = {t.strip() for t in tokens.split(b",")}
    keep = b"close" not in connection and (version == b"HTTP/1.1" or b"keep-alive" in connection)
    if method == "HEAD" or status in _NO_BODY_STATUS:
        return "none", 0, keep
    if codings:
        last = [c.strip() for c in codings.split(b",") if c.strip()][-1:]
        if last == [b"chunked"]:
            return "chunked", 0, keep and not lengths
        return "close", 0, False
    if lengths:
        if len(lengths) != 1 or not (text := next(iter(lengths))).isdigit():
            raise httpx.RemoteProtocolError(f"malformed Content-Length {sorted(lengths)!r}")
        size = int(text)
        return ("length" if size else "none"), size, keep
    return "close", 0, False


class _Body(httpx.AsyncByteStream):
    """A response body read off its connection; closing it returns the connection to the
    pool when the body was read to its end and the connection can carry another exchange."""

    def __init__(
        self,
        pool: Http1Transport,
        origin: _Origin,
        conn: _Connection,
        chunks: AsyncIterator[bytes] | None,
        keep: bool,
        request: httpx.Request,
    ) -> None:
        self._pool = pool
        self._request = request
        self._origin = origin
        self._conn: _Connection | None = conn
        self._chunks = chunks
        self._keep = keep
        self._done = chunks is None

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self._chunks is None:
            return
        try:
            async for chunk in self._chunks:
                yield chunk
        except TimeoutError:
            raise httpx.ReadTimeout(
                "no body bytes within the read timeout", request=self._request
            ) from None
        except httpx.TransportError as exc:
            exc.request = self._request
            raise
        self._done = True

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._pool._finished(self._origin, conn, self._done and self._keep)


class Http1Transport(httpx.AsyncBaseTransport):
    """httpx transport: HTTP/1.1 keep-alive connections, at most ``max_connections`` busy
    at once, idle ones kept ``keepalive_seconds``."""

    def __init__(
        self,
        *,
        max_connections: int,
        keepalive_seconds: float = 30.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._max = max_connections
        self._keepalive = keepalive_seconds
        self._ssl = ssl_context
        self._idle: dict[_Origin, list[_Connection]] = {}
        self._idle_count = 0
        self._slots: asyncio.Semaphore | None = None
        self._busy = 0

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = httpx.create_ssl_context()  # certifi's roots, as httpx uses
        return self._ssl

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        scheme = url.scheme
        port = DEFAULT_PORTS.get(scheme)
        if port is None:
            raise httpx.UnsupportedProtocol(f"unsupported URL scheme {scheme!r}", request=request)
        origin = (scheme, url.host, url.port or port)
        timeouts = request.extensions.get("timeout", {})
        read_timeout = timeouts.get("read")
        try:
            body = request.content
        except httpx.RequestNotRead:
            body = await request.aread()
        head = _request_head(request, body)
        slots = self._slots
        if slots is None:
            slots = self._slots = asyncio.Semaphore(self._max)
        await slots.acquire()
        self._busy += 1
        conn = self._take(origin)
        try:
            while True:
                if conn is None:
                    conn = await self._connect(origin, timeouts.get("connect"), request)
                try:
                    conn.send(head)
                    version, status, reason, lines = await conn.read_head(read_timeout)
                    break
                except _Closed as closed:
                    conn.close()
                    if conn.reused and not closed.received:
                        conn = None  # an idle connection closed under us: once more, anew
                        continue
                    raise httpx.RemoteProtocolError(
                        "server closed the connection without sending a complete response"
                        + (f" ({closed.cause})" if closed.cause else ""),
                        request=request,
                    ) from None
            headers = _headers(lines)
            kind, size, keep = _framing(request.method, status, version, headers)
        except TimeoutError:
            self._release(conn)
            raise httpx.ReadTimeout(
                "no response within the read timeout", request=request
            ) from None
        except httpx.TransportError as exc:
            self._release(conn)
            exc.request = request
            raise
        except BaseException:  # cancelled: the connection's state is unknown
            self._release(conn)
            raise
        if kind == "length":
            chunks: AsyncIterator[bytes] | None = conn.read_exactly(size, read_timeout)
        elif kind == "chunked":
            chunks = conn.read_chunked(read_timeout)
        elif kind == "close":
            chunks = conn.read_to_close(read_timeout)
        else:
            chunks = None
        return httpx.Response(
            status_code=status,
            headers=headers,
            stream=_Body(self, origin, conn, chunks, keep, request),
            request=request,
            extensions={"http_version": version, "reason_phrase": reason},
        )

    def _take(self, origin: _Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            self._idle_count -= 1
            if conn.usable and now - conn.idle_since < self._keepalive:
                conn.reused = True
                return conn
            conn.close()
        return None

    async def _connect(
        self, origin: _Origin, timeout: float | None, request: httpx.Request
    ) -> _Connection:
        scheme, host, port = origin
        loop = asyncio.get_running_loop()
        tls = self._ssl_context() if scheme == "https" else None
        try:
            async with asyncio.timeout(timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(loop),
                    host,
                    port,
                    ssl=tls,
                    server_hostname=host if tls else None,
                )
        except TimeoutError:
            raise httpx.ConnectTimeout(
                f"no connection to {host}:{port} within {timeout} s", request=request
            ) from None
        except (OSError, ssl.SSLError) as exc:
            raise httpx.ConnectError(
                f"cannot connect to {host}:{port}: {exc.strerror or exc}"
                if isinstance(exc, OSError) and exc.strerror
                else f"cannot connect to {host}:{port}: {exc}",
                request=request,
            ) from exc
        return conn

    def _release(self, conn: _Connection | None) -> None:
        if conn is not None:
            conn.close()
        self._busy -= 1
        assert self._slots is not None
        self._slots.release()

    def _finished(self, origin: _Origin, conn: _Connection, reusable: bool) -> None:
        self._busy -= 1
        assert self._slots is not None
        self._slots.release()
        if reusable and conn.usable and self._idle_count + self._busy < self._max:
            conn.idle_since = time.monotonic()
            self._idle.setdefault(origin, []).append(conn)
            self._idle_count += 1
        else:
            conn.close()

    async def aclose(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()
        self._idle_count = 0
        await asyncio.sleep(0)  # the sockets close on the loop's next turn: let it come


def _request_head(request: httpx.Request, body: bytes) -> bytes:
    if body:
        raise httpx.UnsupportedProtocol("this client sends no request bodies", request=request)
    lines = [f"{request.method} ".encode() + request.url.raw_path + b" HTTP/1.1"]
    for name, value in request.headers.raw:
        if b"\n" in value or b"\r" in value or b"\n" in name or b"\r" in name:
            raise httpx.LocalProtocolError(
                f"header {name.decode(errors='replace')!r} contains a line break",
                request=request,
            )
        lines.append(name + b": " + value)
    lines.append(b"\r\n")
    return b"\r\n".join(lines)

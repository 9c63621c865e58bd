"""harvester/http1.py against real sockets on 127.0.0.1: keep-alive, every way a body can be
framed, answers that are malformed or cut short, stale connections, flow control, cancel,
timeouts and TLS.

Each test's server is a script: for every request on every connection it sends raw bytes
(exactly what a test needs, including what no well-behaved server would send) and then keeps
the connection open or closes it.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import anyio
import httpx
import pytest

from harvester.api.http1 import HIGH_WATER, Http1Transport, _framing
from harvester.api.transport import Client

TLS = Path(__file__).parent / "fixtures" / "tls"


def response(body: bytes = b"hello", *, status: str = "200 OK", headers: str = "") -> bytes:
    return f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n{headers}\r\n".encode() + body


Reply = tuple[bytes, bool]
"""What to send, and whether to close the connection after it."""
Script = Callable[[int, int, bytes], Reply]
"""(connection number, request number on it, the request's bytes) -> the reply."""


class ScriptServer:
    def __init__(self, script: Script, *, tls: ssl.SSLContext | None = None) -> None:
        self.script = script
        self.tls = tls
        self.requests: list[bytes] = []
        self.connections = 0
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.05)
        self.port = self._sock.getsockname()[1]
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        accept = threading.Thread(target=self._accept, daemon=True)
        accept.start()
        self._threads.append(accept)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            number = self.connections
            self.connections += 1
            worker = threading.Thread(target=self._serve, args=(conn, number), daemon=True)
            worker.start()
            self._threads.append(worker)

    def _serve(self, conn: socket.socket, number: int) -> None:
        try:
            if self.tls is not None:
                conn = self.tls.wrap_socket(conn, server_side=True)
            conn.settimeout(5)
            pending = b""
            index = 0
            while not self._stop.is_set():
                while b"\r\n\r\n" not in pending:
                    data = conn.recv(65536)
                    if not data:
                        return
                    pending += data
                request, _, pending = pending.partition(b"\r\n\r\n")
                self.requests.append(request)
                reply, close = self.script(number, index, request)
                index += 1
                conn.sendall(reply)
                if close:
                    return
        except (OSError, ssl.SSLError):
            return
        finally:
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._sock.close()
        for thread in self._threads:
            thread.join(timeout=5)


@contextmanager
def serving(script: Script, *, tls: ssl.SSLContext | None = None) -> Iterator[ScriptServer]:
    server = ScriptServer(script, tls=tls)
    try:
        yield server
    finally:
        server.close()


@asynccontextmanager
async def client(
    *, max_connections: int = 4, read_timeout: float = 5, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[httpx.AsyncClient]:
    transport = Http1Transport(max_connections=max_connections, ssl_context=ssl_context)
    async with Client(
        transport=transport,
        timeout=httpx.Timeout(read_timeout, connect=5, pool=None),
        headers={"User-Agent": "harvester"},
    ) as c:
        yield c


def always(reply: bytes, *, close: bool = False) -> Script:
    return lambda _conn, _index, _request: (reply, close)


@pytest.mark.anyio
async def test_keep_alive_carries_every_request_on_one_connection() -> None:
    with serving(lambda _c, i, _r: (response(f"answer {i}".encode()), False)) as server:
        async with client() as c:
            # Built as the harvester builds its requests: exactly these headers go out.
            requests = [
                httpx.Request("GET", f"{server.url}/r/{n}?x=1", headers={"User-Agent": "h"})
                for n in range(5)
            ]
            bodies = [(await c.send(request)).content for request in requests]
    assert bodies == [f"answer {i}".encode() for i in range(5)]
    assert server.connections == 1
    assert server.requests[0] == (
        f"GET /r/0?x=1 HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nUser-Agent: h".encode()
    )


@pytest.mark.anyio
async def test_connection_close_and_http_1_0_are_not_reused() -> None:
    def script(_conn: int, _index: int, _request: bytes) -> Reply:
        return response(headers="Connection: close\r\n"), False  # the client must close it

    with serving(script) as server:
        async with client() as c:
            for _ in range(3):
                assert (await c.get(server.url)).content == b"hello"
    assert server.connections == 3

    old = b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok"
    with serving(always(old)) as server:
        async with client() as c:
            for _ in range(2):
                response_ = await c.get(server.url)
                assert response_.content == b"ok" and response_.http_version == "HTTP/1.0"
    assert server.connections == 2


@pytest.mark.anyio
async def test_chunked_body_with_extensions_and_trailers() -> None:
    body = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;name=value\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\nExpires: never\r\n\r\n"
    )
    with serving(always(body)) as server:
        async with client() as c:
            first = await c.get(server.url)
            second = await c.get(server.url)
    assert first.content == second.content == b"hello world"
    assert server.connections == 1  # the whole chunked body was read: reusable


@pytest.mark.anyio
@pytest.mark.parametrize(
    "reply",
    [
        pytest.param(response(b"x" * 10)[:-4], id="content-length cut short"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
            id="chunked without its last chunk",
        ),
    ],
)
async def test_a_body_cut_short_is_a_read_error(reply: bytes) -> None:
    with serving(always(reply, close=True)) as server:
        async with client() as c:
            with pytest.raises(httpx.ReadError, match="server closed the connection"):
                await c.get(server.url)


@pytest.mark.anyio
async def test_a_body_without_length_runs_to_the_close() -> None:
    reply = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n" + b"all of it" * 1000
    with serving(always(reply, close=True)) as server:
        async with client() as c:
            assert (await c.get(server.url)).content == b"all of it" * 1000
            assert (await c.get(server.url)).content == b"all of it" * 1000
    assert server.connections == 2


@pytest.mark.anyio
async def test_informational_answers_are_skipped() -> None:
    reply = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n" + response(b"final")
    with serving(always(reply)) as server:
        async with client() as c:
            got = await c.get(server.url)
    assert (got.status_code, got.content) == (200, b"final")
    assert "link" not in got.headers


@pytest.mark.anyio
async def test_no_content_and_bare_lf_answers() -> None:
    replies = [
        b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n",
        b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok",
    ]
    with serving(lambda _c, i, _r: (replies[i % 2], False)) as server:
        async with client() as c:
            empty = await c.get(server.url)
            lf = await c.get(server.url)
    assert (empty.status_code, empty.content, empty.headers["x-a"]) == (204, b"", "1")
    assert (lf.status_code, lf.content) == (200, b"ok")


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (b"HTTP/2 200 OK\r\n\r\n", "malformed status line"),
        (b"SSH-2.0-OpenSSH_9.2\r\n\r\n", "malformed status line"),
        (b"HTTP/1.1 2000 OK\r\n\r\n", "malformed status line"),
        (b"HTTP/1.1 200 OK\r\nX-Folded: a\r\n b\r\n\r\n", "malformed header line"),
        (b"HTTP/1.1 200 OK\r\nNo colon here\r\n\r\n", "malformed header line"),
        (b"HTTP/1.1 200 OK\r\nContent-Length : 2\r\n\r\nok", "malformed header line"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok", "Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -2\r\n\r\nok", "Content-Length"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "chunk size"),
        (b"HTTP/1.1 101 Switching Protocols\r\n\r\n", "switched protocols"),
        (b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 70_000, "larger than"),
        (b"", "without sending a complete response"),
        (b"HTTP/1.1 200 OK\r\nContent-", "without sending a complete response"),
    ],
)
async def test_malformed_answers_are_protocol_errors(reply: bytes, message: str) -> None:
    with serving(always(reply, close=True)) as server:
        async with client() as c:
            with pytest.raises(httpx.RemoteProtocolError, match=message) as caught:
                await c.get(server.url)
    assert caught.value.request.url == server.url


@pytest.mark.anyio
async def test_a_kept_connection_closed_by_the_server_is_replaced_once() -> None:
    # The server answers one request per connection but does not say so, and closes the
    # connection when the next request arrives on it (as a server whose idle timeout ran
    # out just then does): that request is sent once more, on a new connection.
    def script(_conn: int, index: int, _request: bytes) -> Reply:
        return (response(), False) if index == 0 else (b"", True)

    with serving(script) as server:
        async with client() as c:
            for _ in range(3):
                assert (await c.get(server.url)).content == b"hello"
    assert server.connections == 3
    assert len(server.requests) == 5  # two went out on a connection that then closed


@pytest.mark.anyio
async def test_a_reset_after_an_answer_began_is_not_resent() -> None:
    with serving(
        lambda c, i, _r: (response() if c == 0 and i == 0 else response()[:20], True)
    ) as s:
        async with client() as c:
            assert (await c.get(s.url)).content == b"hello"
            with pytest.raises(httpx.RemoteProtocolError):
                await c.get(s.url)


@pytest.mark.anyio
async def test_reading_stops_while_a_large_body_is_not_consumed() -> None:
    body = bytes(range(256)) * (32 * 1024)  # 8 MiB
    with serving(always(response(body))) as server:
        async with client() as c, c.stream("GET", server.url) as got:
            chunks = []
            async for chunk in got.aiter_raw():
                chunks.append(chunk)
                await anyio.sleep(0.01)  # a slow disk: the socket must wait, not the memory
    assert b"".join(chunks) == body
    assert max(len(chunk) for chunk in chunks) <= 2 * HIGH_WATER


@pytest.mark.anyio
async def test_a_cancelled_exchange_frees_its_slot_and_closes_its_connection() -> None:
    def script(conn: int, _index: int, _request: bytes) -> Reply:
        if conn == 0:
            return response(b"x" * 100)[:-50], False  # half a body, then silence
        return response(), False

    with serving(script) as server:
        async with client(max_connections=1) as c:
            with anyio.move_on_after(0.2) as scope:
                await c.get(server.url)
            assert scope.cancelled_caught
            with anyio.fail_after(5):  # the one slot is free again
                assert (await c.get(server.url)).content == b"hello"
    assert server.connections == 2  # the half-read connection was not reused


@pytest.mark.anyio
async def test_read_timeouts_before_and_inside_a_body() -> None:
    def script(conn: int, _index: int, _request: bytes) -> Reply:
        time.sleep(1.0 if conn == 0 else 0)  # the first connection answers late
        return response(b"0123456789")[: -5 if conn else None], False  # the next, half

    with serving(script) as server:
        async with client(read_timeout=0.2) as c:
            with pytest.raises(httpx.ReadTimeout, match="no response"):
                await c.get(server.url)
            with pytest.raises(httpx.ReadTimeout, match="no body bytes"):
                await c.get(server.url)


@pytest.mark.anyio
async def test_header_values_with_line_breaks_are_never_sent() -> None:
    with serving(always(response())) as server:
        async with client() as c:
            with pytest.raises(httpx.LocalProtocolError, match="line break"):
                await c.get(server.url, headers={"Authorization": "Bearer a\r\nX-Evil: 1"})
            assert (await c.get(server.url)).content == b"hello"
    assert len(server.requests) == 1 and b"X-Evil" not in server.requests[0]


@pytest.mark.anyio
async def test_refused_connection_is_a_connect_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        async with client() as c:
            with pytest.raises(httpx.ConnectError, match=r"cannot connect to 127\.0\.0\.1"):
                await c.get(f"http://127.0.0.1:{s.getsockname()[1]}/")


@pytest.mark.anyio
async def test_unsupported_scheme_and_request_bodies() -> None:
    async with client() as c:
        with pytest.raises(httpx.UnsupportedProtocol):
            await c.send(httpx.Request("GET", "ftp://127.0.0.1/a"))
        with pytest.raises(httpx.UnsupportedProtocol, match="no request bodies"):
            await c.send(httpx.Request("POST", "http://127.0.0.1:9/a", content=b"x"))


def _server_tls() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(TLS / "cert.pem", TLS / "key.pem")
    return context


@pytest.mark.anyio
async def test_tls_is_verified() -> None:
    with serving(always(response(b"secret")), tls=_server_tls()) as server:
        trusting = ssl.create_default_context(cafile=str(TLS / "cert.pem"))
        async with client(ssl_context=trusting) as c:
            assert (await c.get(server.url)).content == b"secret"
            assert (await c.get(server.url)).content == b"secret"
        assert server.connections == 1
        async with client() as c:  # the default roots do not know the test's certificate
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await c.get(server.url)


@pytest.mark.parametrize(
    ("method", "status", "version", "headers", "expected"),
    [
        ("GET", 200, b"HTTP/1.1", [(b"Content-Length", b"5")], ("length", 5, True)),
        ("GET", 200, b"HTTP/1.1", [(b"content-length", b"5, 5")], ("length", 5, True)),
        ("GET", 200, b"HTTP/1.1", [(b"Content-Length", b"0")], ("none", 0, True)),
        ("HEAD", 200, b"HTTP/1.1", [(b"Content-Length", b"5")], ("none", 0, True)),
        ("GET", 304, b"HTTP/1.1", [], ("none", 0, True)),
        ("GET", 200, b"HTTP/1.1", [], ("close", 0, False)),
        ("GET", 200, b"HTTP/1.0", [(b"Content-Length", b"1")], ("length", 1, False)),
        (
            "GET",
            200,
            b"HTTP/1.0",
            [(b"Content-Length", b"1"), (b"Connection", b"Keep-Alive")],
            ("length", 1, True),
        ),
        (
            "GET",
            200,
            b"HTTP/1.1",
            [(b"Content-Length", b"1"), (b"Connection", b"keep-alive, Close")],
            ("length", 1, False),
        ),
        ("GET", 200, b"HTTP/1.1", [(b"Transfer-Encoding", b"gzip, chunked")], ("chunked", 0, True)),
        ("GET", 200, b"HTTP/1.1", [(b"Transfer-Encoding", b"gzip")], ("close", 0, False)),
        (
            "GET",
            200,
            b"HTTP/1.1",
            [(b"Transfer-Encoding", b"chunked"), (b"Content-Length", b"9")],
            ("chunked", 0, False),
        ),
    ],
)
def test_framing(
    method: str,
    status: int,
    version: bytes,
    headers: list[tuple[bytes, bytes]],
    expected: tuple[str, int, bool],
) -> None:
    assert _framing(method, status, version, headers) == expected

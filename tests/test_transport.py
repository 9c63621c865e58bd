"""The run's client (httpx over harvester/http1.py) against a real server on 127.0.0.1: what
a caller sees for a whole body, a body cut short, a refused connection, a silent server and a
result over the size limit."""

from __future__ import annotations

import random
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from harvester.api.fetcher import ResultFetcher
from harvester.api.ratelimit import RateLimiter
from harvester.api.retry import RetryPolicy
from harvester.api.transport import open_client
from harvester.sandbox import Sandbox
from harvester.storage.layout import Layout
from harvester.storage.store import ImageFailure, ImageStore, StoredImage
from tests.conftest import KEY

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8


class RawServer:
    """Answers every connection with ``reply`` (raw bytes), then closes it."""

    def __init__(self, reply: bytes, *, hold: float = 0.0) -> None:
        self.reply = reply
        self.hold = hold
        self.requests: list[bytes] = []
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen()
        self._sock.settimeout(0.05)  # so the thread notices ``close`` soon
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                self.requests.append(conn.recv(65536))
                if self.hold:
                    self._stop.wait(self.hold)
                conn.sendall(self.reply)

    def close(self) -> None:
        self._stop.set()
        self._sock.close()
        self._thread.join(timeout=5)


@pytest.fixture
def server(request: pytest.FixtureRequest) -> Iterator[RawServer]:
    reply, hold = request.param
    srv = RawServer(reply, hold=hold)
    yield srv
    srv.close()


def _head(length: int) -> bytes:
    return (
        f"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: {length}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()


WHOLE = (_head(len(PNG)) + PNG, 0.0)
CUT = (_head(len(PNG)) + PNG[:1000], 0.0)


@pytest.mark.anyio
@pytest.mark.parametrize("server", [WHOLE], indirect=True)
async def test_streams_a_whole_body(server: RawServer) -> None:
    async with open_client(max_connections=4, connect_timeout=5, read_timeout=5) as client:
        request = client.build_request("GET", server.url + "/a.png")
        response = await client.send(request, stream=True)
        body = b"".join([chunk async for chunk in response.aiter_bytes()])
        await response.aclose()
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    assert body == PNG
    assert server.requests[0].startswith(b"GET /a.png HTTP/1.1\r\n")


@pytest.mark.anyio
@pytest.mark.parametrize("server", [CUT], indirect=True)
async def test_a_body_cut_short_is_a_transport_error(server: RawServer) -> None:
    async with open_client(max_connections=4, connect_timeout=5, read_timeout=5) as client:
        response = await client.send(client.build_request("GET", server.url), stream=True)
        with pytest.raises(httpx.TransportError):
            async for _ in response.aiter_bytes():
                pass
        await response.aclose()


@pytest.mark.anyio
@pytest.mark.parametrize("server", [CUT], indirect=True)
async def test_store_retries_a_cut_body_and_keeps_no_file(
    server: RawServer, tmp_path: Path
) -> None:
    layout = Layout(tmp_path / "out")
    layout.prepare()
    policy = RetryPolicy(max_attempts=2, base_delay=0.001, max_delay=0.001)
    async with open_client(max_connections=4, connect_timeout=5, read_timeout=5) as client:
        store = ImageStore(client, layout, policy=policy, rng=random.Random(0))
        got = await store.store(server.url + "/a.png")
    assert isinstance(got, ImageFailure)
    assert got.status == "error" and got.attempts == 2
    assert "cut short" in got.error
    assert store.retries == 1
    assert not any(layout.images.rglob("*.*")) and not any(layout.tmp.iterdir())


@pytest.mark.anyio
@pytest.mark.parametrize("server", [WHOLE], indirect=True)
async def test_store_over_the_real_transport_sends_no_authorization(
    server: RawServer, tmp_path: Path
) -> None:
    layout = Layout(tmp_path / "out")
    layout.prepare()
    async with open_client(max_connections=4, connect_timeout=5, read_timeout=5) as client:
        client.headers["Authorization"] = "Bearer must-not-leak"
        store = ImageStore(client, layout, policy=RetryPolicy(), rng=random.Random(0))
        got = await store.store(server.url + "/a.png")
    assert isinstance(got, StoredImage) and got.bytes == len(PNG)
    assert b"authorization" not in server.requests[0].lower()


@pytest.mark.anyio
async def test_refused_connection_is_a_connect_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
        async with open_client(max_connections=4, connect_timeout=5, read_timeout=5) as client:
            with pytest.raises(httpx.ConnectError):
                await client.get(f"http://127.0.0.1:{port}/")


@pytest.mark.anyio
@pytest.mark.parametrize("server", [(_head(3) + b"abc", 2.0)], indirect=True)
async def test_silent_server_is_a_read_timeout(server: RawServer) -> None:
    async with open_client(max_connections=4, connect_timeout=5, read_timeout=0.2) as client:
        with pytest.raises(httpx.ReadTimeout):
            await client.get(server.url)


@pytest.mark.anyio
async def test_a_result_over_the_limit_is_dropped_and_the_connection_with_it(
    sandbox: Sandbox,
) -> None:
    """Over real HTTP: an ``inline-`` result (its image as a data URI: 2.3 KB) is over a
    1,000-byte limit, ordinary ones (about 450 bytes) are not; the connection left half-read
    is not reused, so the next results on the same one-connection client are whole."""
    async with open_client(max_connections=1, connect_timeout=5, read_timeout=5) as client:
        fetcher = ResultFetcher(
            client,
            base_url=sandbox.base_url,
            authorization=f"Bearer {KEY}",
            policy=RetryPolicy(max_attempts=1),
            limiter=RateLimiter(1000),
            rng=random.Random(0),
            max_result_bytes=1_000,
        )
        big = await fetcher.fetch("fal-ai/flux/dev", "inline-0001")
        ok = [await fetcher.fetch("fal-ai/flux/dev", f"req-{i}") for i in range(3)]
    assert (big.status, big.http_status, big.attempts) == ("error", 200, 1)
    assert big.error == (
        "the result body is larger than 1.0 KB (it announced 2.3 KB); not read. The relay "
        "answered with something that is not a result: check it with curl, the next run asks "
        "again"
    )
    assert [(o.status, o.http_status) for o in ok] == [("ok", 200)] * 3
    assert all(o.result is not None and o.result.images for o in ok)

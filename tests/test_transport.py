"""The run's client (httpx over aiohttp's connections) against real servers on 127.0.0.1: what
a caller sees for a whole body, a body cut short, a refused connection, a silent server, a
result over the size limit, broken answers, a forward proxy (tinyproxy), TLS, redirects and a
compression bomb."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import random
import resource
import shutil
import socket
import subprocess
import tempfile
import threading
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import httpx
import polars as pl
import pytest
from yarl import URL

from harvester.api.body import DECODED_CHUNK, decoded_chunks
from harvester.api.download import ImageDownloader, ImageFailure
from harvester.api.fetcher import ResultFetcher
from harvester.api.ratelimit import RateLimiter
from harvester.api.retry import RetryPolicy, attempt_seconds
from harvester.api.transport import Proxies, open_client
from harvester.errors import ExitCode, UnreachableError
from harvester.sandbox import Sandbox
from harvester.storage.layout import Layout
from harvester.storage.manifest import manifest_glob
from harvester.storage.objects import LocalStore
from harvester.storage.store import ContentStore, StoredImage
from tests.conftest import KEY, harvest_args, run_cli, write_csv
from tests.hostile_http import CERT, Exchange, Handler, response, serving
from tests.processes import harvester_env, run_harvest

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
        store = ImageDownloader(
            client, ContentStore(LocalStore(layout.root)).sink, policy=policy, rng=random.Random(0)
        )
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
        store = ImageDownloader(
            client,
            ContentStore(LocalStore(layout.root)).sink,
            policy=RetryPolicy(),
            rng=random.Random(0),
        )
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
        big = await fetcher.fetch("fal-ai/flux/requests/inline-0001")
        ok = [await fetcher.fetch(f"fal-ai/flux/requests/req-{i}") for i in range(3)]
    assert (big.status, big.http_status, big.attempts) == ("error", 200, 1)
    assert big.error == (
        "the result body is larger than 1.0 KB (it announced 2.3 KB); not read. The relay "
        "answered with something that is not a result: check it with curl, the next run asks "
        "again"
    )
    assert [(o.status, o.http_status) for o in ok] == [("ok", 200)] * 3
    assert all(o.result is not None and o.result.images for o in ok)


# --- The aiohttp layer under httpx: keep-alive, errors, proxies, TLS, redirects, bombs ---

RESULT_PNG = b"\x89PNG\r\n\x1a\n" + b"\x07" * 64


def _result_json() -> bytes:
    uri = "data:image/png;base64," + base64.b64encode(RESULT_PNG).decode()
    return json.dumps({"images": [{"url": uri}], "prompt": "p", "seed": 1}).encode()


async def _serve_result(exchange: Exchange, writer: asyncio.StreamWriter) -> None:
    writer.write(response(200, _result_json(), {"Content-Type": "application/json"}))


@pytest.mark.anyio
async def test_keeps_a_connection_alive_between_requests() -> None:
    with serving(_serve_result) as server:
        async with open_client(max_connections=4, connect_timeout=5, read_timeout=5) as client:
            for _ in range(3):
                got = await client.get(server.url + "/x")
                assert got.status_code == 200 and got.content == _result_json()
    assert server.connections == 1 and len(server.seen) == 3


GARBAGE = [
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x39\r\n" + b"a" * 57 + b"\r\n0\r\n\r\n",
    b"NOT HTTP AT ALL\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",
    b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\nabc",
    b"",
]


@pytest.mark.anyio
@pytest.mark.parametrize("reply", GARBAGE)
async def test_broken_answers_are_httpx_transport_errors(reply: bytes) -> None:
    """Whatever the server sends, the caller sees an httpx error, never one of aiohttp's."""

    async def garbage(exchange: Exchange, writer: asyncio.StreamWriter) -> None:
        writer.write(reply)
        writer.close()

    with serving(garbage) as server:
        async with open_client(max_connections=4, connect_timeout=5, read_timeout=5) as client:
            with pytest.raises(httpx.TransportError) as caught:
                await client.get(server.url)
    assert not isinstance(caught.value, aiohttp.ClientError)


@pytest.fixture
def _no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")


@pytest.fixture(scope="module")
def tinyproxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """Debian's tinyproxy on a free port of 127.0.0.1; yields its URL and its log file."""
    binary = shutil.which("tinyproxy") or "/usr/bin/tinyproxy"
    folder = tmp_path_factory.mktemp("tinyproxy")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = folder / "tinyproxy.log"
    config = folder / "tinyproxy.conf"
    config.write_text(
        f"Port {port}\nListen 127.0.0.1\nAllow 127.0.0.1\nTimeout 30\nMaxClients 50\n"
        f'LogLevel Connect\nLogFile "{log}"\nPidFile "{folder}/tinyproxy.pid"\n'
    )
    stderr = open(folder / "stderr", "wb")  # noqa: SIM115 (closed in finally)
    process = subprocess.Popen([binary, "-d", "-c", str(config)], stderr=stderr)
    try:
        for _ in range(200):
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if process.poll() is not None:
                raise RuntimeError(f"tinyproxy did not start: {(folder / 'stderr').read_text()}")
            threading.Event().wait(0.05)
        yield f"http://127.0.0.1:{port}", log
    finally:
        process.terminate()
        process.wait(10)
        stderr.close()


def _proxied_lines(log: Path, port: int) -> list[str]:
    text = log.read_text(errors="replace") if log.exists() else ""
    return [line for line in text.splitlines() if f"GET http://127.0.0.1:{port}/" in line]


@pytest.mark.usefixtures("_no_proxy_env")
@pytest.mark.parametrize("variable", ["HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"])
def test_a_harvest_goes_through_the_proxy_the_environment_names(
    variable: str, tinyproxy: tuple[str, Path], sandbox: Sandbox, tmp_path: Path
) -> None:
    proxy, log = tinyproxy
    port = httpx.URL(sandbox.base_url).port
    assert port is not None
    before = len(_proxied_lines(log, port))
    csv = write_csv(
        tmp_path / "in.csv", [("fal-ai/flux/dev", f"req-{variable}-{i}") for i in range(3)]
    )
    result = run_cli(harvest_args(sandbox, tmp_path / "out", csv), env={variable: proxy})
    assert result.exit_code == 0, result.output
    # Three results and their images, each one a line in the proxy's log.
    assert len(_proxied_lines(log, port)) - before >= 6


@pytest.mark.usefixtures("_no_proxy_env")
@pytest.mark.parametrize("variable", ["NO_PROXY", "no_proxy"])
def test_no_proxy_sends_a_harvest_past_the_proxy(
    variable: str, tinyproxy: tuple[str, Path], sandbox: Sandbox, tmp_path: Path
) -> None:
    proxy, log = tinyproxy
    port = httpx.URL(sandbox.base_url).port
    assert port is not None
    before = len(_proxied_lines(log, port))
    csv = write_csv(tmp_path / "in.csv", [("fal-ai/flux/dev", "req-np-1")])
    env = {"HTTP_PROXY": proxy, variable: "127.0.0.1"}
    result = run_cli(harvest_args(sandbox, tmp_path / "out", csv), env=env)
    assert result.exit_code == 0, result.output
    assert len(_proxied_lines(log, port)) == before


@pytest.mark.anyio
@pytest.mark.usefixtures("_no_proxy_env")
@pytest.mark.parametrize("variable", ["HTTPS_PROXY", "https_proxy"])
async def test_https_goes_through_the_proxy_as_a_tunnel(
    variable: str,
    tinyproxy: tuple[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """An https result and image through the proxy that ``HTTPS_PROXY`` names: a CONNECT
    tunnel (the proxy sees the host and port, never the request or the key), TLS verified end
    to end against ``SSL_CERT_FILE``."""
    proxy, log = tinyproxy
    monkeypatch.setenv(variable, proxy)
    monkeypatch.setenv("SSL_CERT_FILE", str(CERT))

    async def serve(exchange: Exchange, writer: asyncio.StreamWriter) -> None:
        if exchange.target.endswith(".png"):
            png = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
            writer.write(response(200, png, {"Content-Type": "image/png"}))
        else:
            await _serve_result(exchange, writer)

    with serving(serve, tls=True) as server:
        port = httpx.URL(server.url).port
        before = log.read_text(errors="replace").count(f"CONNECT 127.0.0.1:{port}")
        async with open_client(max_connections=4, connect_timeout=5, read_timeout=5) as client:
            outcome = await _fetcher(client, server.url).fetch("fal-ai/flux/requests/req-1")
            layout = Layout(tmp_path / "out")
            layout.prepare()
            policy, rng = RetryPolicy(), random.Random(0)
            downloader = ImageDownloader(
                client, ContentStore(LocalStore(layout.root)).sink, policy=policy, rng=rng
            )
            image = await downloader.store(server.url + "/a.png")
    assert outcome.status == "ok", outcome.error
    assert isinstance(image, StoredImage), image
    assert [e.target for e in server.seen] == ["/fal-ai/flux/requests/req-1", "/a.png"]
    text = log.read_text(errors="replace")
    assert text.count(f"CONNECT 127.0.0.1:{port}") > before, text[-2000:]
    assert KEY not in text


@pytest.mark.anyio
@pytest.mark.usefixtures("_no_proxy_env")
async def test_an_image_through_a_proxy_is_checked_by_the_stage_not_at_the_proxys_address(
    tinyproxy: tuple[str, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """With private addresses refused, an image the stage's check hears as public goes
    through the proxy, though the proxy is on loopback (named ``localhost``, so the transport
    resolves it): the proxy resolves the image's host; the proxy's own address is never
    refused."""
    proxy, log = tinyproxy
    monkeypatch.setenv("HTTP_PROXY", proxy.replace("127.0.0.1", "localhost"))

    async def png(exchange: Exchange, writer: asyncio.StreamWriter) -> None:
        writer.write(response(200, PNG, {"Content-Type": "image/png"}))

    async def public(host: str, port: int) -> list[str]:
        return ["93.184.216.34"]

    with serving(png) as server:
        port = httpx.URL(server.url).port
        assert port is not None
        before = len(_proxied_lines(log, port))  # the log is the module's: ports come again
        layout = Layout(tmp_path / "out")
        layout.prepare()
        async with open_client(max_connections=4, connect_timeout=5, read_timeout=5) as client:
            downloader = ImageDownloader(
                client,
                ContentStore(LocalStore(layout.root)).sink,
                policy=RetryPolicy(max_attempts=1),
                rng=random.Random(0),
                refuse_private=True,
                api_url="https://relay.example",
                resolve=public,
            )
            image = await downloader.store(f"{server.url}/a.png")
    assert isinstance(image, StoredImage), image
    assert len(_proxied_lines(log, port)) == before + 1


@pytest.mark.anyio
@pytest.mark.usefixtures("_no_proxy_env")
async def test_the_credentials_in_a_proxys_url_go_to_the_proxy_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On a plain-http request through the proxy and on the CONNECT of a tunnel; never in a
    message (the proxy's 407 names its URL)."""

    async def proxy(exchange: Exchange, writer: asyncio.StreamWriter) -> None:
        if exchange.method == "CONNECT":
            writer.write(response(407, headers={"Proxy-Authenticate": "Basic"}))
        else:
            writer.write(response(200, PNG, {"Content-Type": "image/png"}))

    with serving(proxy) as fake:
        named = fake.url.replace("http://", "http://user:secret@")
        monkeypatch.setenv("HTTP_PROXY", named)
        monkeypatch.setenv("HTTPS_PROXY", named)
        async with open_client(max_connections=4, connect_timeout=5, read_timeout=5) as client:
            got = await client.get("http://images.test/a.png")
            with pytest.raises(httpx.ProxyError) as refused:
                await client.get("https://images.test/a.png")
    assert got.status_code == 200 and got.content == PNG
    plain, tunnel = fake.seen
    assert (plain.method, plain.target) == ("GET", "http://images.test/a.png")
    assert (tunnel.method, tunnel.target) == ("CONNECT", "images.test:443")
    basic = base64.b64encode(b"user:secret").decode()
    for seen in (plain, tunnel):
        assert seen.headers["proxy-authorization"] == f"Basic {basic}"
        assert "authorization" not in seen.headers
    assert "407" in str(refused.value) and "secret" not in str(refused.value)


@pytest.mark.parametrize(
    ("url", "proxy"),
    [
        ("http://a.test/x", "http://p.test:3128"),
        ("https://a.test/x", "http://q.test:8080"),
        ("http://example.com/", None),
        ("http://www.example.com/", None),
        ("http://xexample.com/", "http://p.test:3128"),
        ("http://corp.test/", "http://p.test:3128"),
        ("http://a.corp.test/", None),
        ("http://10.0.0.1/", None),
        ("http://10.0.0.2/", "http://p.test:3128"),
        ("http://[::1]/", None),
        ("http://localhost:8000/", None),
        ("http://only.test/", None),
        ("https://only.test/", "http://q.test:8080"),
        ("https://port.test:8443/", None),
        ("https://port.test/", "http://q.test:8080"),
    ],
)
def test_the_proxy_for_a_url_is_chosen_as_httpx_chooses_it(url: str, proxy: str | None) -> None:
    found = {
        "http": "p.test:3128",
        "https": "http://user:secret@q.test:8080",
        "all": "http://r.test:1",
        "no": "example.com, .corp.test,10.0.0.1,::1,localhost,http://only.test,port.test:8443",
    }
    chosen = Proxies(found).proxy_for(URL(url))
    assert (chosen.url if chosen else None) == proxy
    if proxy == "http://q.test:8080":
        assert chosen is not None and chosen.authorization == "Basic dXNlcjpzZWNyZXQ="
    anything = Proxies({"all": "http://r.test:1"}).proxy_for(URL(url))
    assert anything is not None and anything.url == "http://r.test:1"
    assert not Proxies({**found, "no": "a.test,*"})
    assert not Proxies({"no": "example.com"})


def _fetcher(client: httpx.AsyncClient, base_url: str, **kwargs: int) -> ResultFetcher:
    return ResultFetcher(
        client,
        base_url=base_url,
        authorization=f"Bearer {KEY}",
        policy=RetryPolicy(max_attempts=4, base_delay=0.001, max_delay=0.001),
        limiter=RateLimiter(1000),
        rng=random.Random(0),
        **kwargs,
    )


@pytest.mark.anyio
async def test_an_unverified_certificate_is_final_and_says_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The test server's certificate is in no trust store: one attempt, no retries, a message
    that says "certificate" (not a DNS or connection problem)."""
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    with serving(_serve_result, tls=True) as server:
        async with open_client(max_connections=4, connect_timeout=5, read_timeout=5) as client:
            fetcher = _fetcher(client, server.url)
            with pytest.raises(UnreachableError, match="certificate") as caught:
                await fetcher.fetch("fal-ai/flux/requests/req-1")
            downloader = ImageDownloader(
                client,
                ContentStore(LocalStore(_layout(server.url).root)).sink,
                policy=RetryPolicy(),
                rng=random.Random(0),
            )
            image = await downloader.store(server.url + "/a.png")
    assert "cannot verify" in str(caught.value)
    assert fetcher.sent == 1 and fetcher.retries == 0
    assert isinstance(image, ImageFailure) and "certificate" in image.error
    assert image.attempts == 1 and downloader.retries == 0


@pytest.mark.anyio
@pytest.mark.parametrize("variable", ["SSL_CERT_FILE", "SSL_CERT_DIR"])
async def test_ssl_cert_file_and_dir_are_trusted(
    variable: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    if variable == "SSL_CERT_FILE":
        monkeypatch.setenv(variable, str(CERT))
    else:  # a CA folder as OpenSSL reads it: certificates named by their subject hash
        subject_hash = subprocess.run(
            ["openssl", "x509", "-hash", "-noout", "-in", str(CERT)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        (tmp_path / f"{subject_hash}.0").write_bytes(CERT.read_bytes())
        monkeypatch.setenv(variable, str(tmp_path))
    with serving(_serve_result, tls=True) as server:
        async with open_client(max_connections=4, connect_timeout=5, read_timeout=5) as client:
            outcome = await _fetcher(client, server.url).fetch("fal-ai/flux/requests/req-1")
    assert outcome.status == "ok", outcome.error


def _layout(_: str) -> Layout:
    folder = Path(tempfile.mkdtemp(prefix="harvester-test-"))
    layout = Layout(folder / "out")
    layout.prepare()
    return layout


@pytest.mark.anyio
async def test_result_redirects_are_followed_and_the_key_stays_with_its_origin(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A relay that moved: /old on the base URL -> /new on the same origin (the key goes
    along) -> http to https on another origin (the moved relay: no key) -> the result."""
    monkeypatch.setenv("SSL_CERT_FILE", str(CERT))
    with serving(_serve_result, tls=True) as moved:

        async def relay(exchange: Exchange, writer: asyncio.StreamWriter) -> None:
            if exchange.target.startswith("/old/"):
                location = exchange.target.replace("/old/", "/new/", 1)  # relative, same origin
                writer.write(response(301, headers={"Location": location}))
            else:
                writer.write(response(308, headers={"Location": moved.url + exchange.target}))

        with serving(relay) as old:
            async with open_client(max_connections=4, connect_timeout=5, read_timeout=5) as c:
                outcome = await _fetcher(c, old.url + "/old").fetch("fal-ai/flux/requests/req-9")
    assert outcome.status == "ok", outcome.error
    assert [e.target for e in old.seen] == [
        "/old/fal-ai/flux/requests/req-9",
        "/new/fal-ai/flux/requests/req-9",
    ]
    assert all(e.headers.get("authorization") == f"Bearer {KEY}" for e in old.seen)
    assert [e.target for e in moved.seen] == ["/new/fal-ai/flux/requests/req-9"]
    assert "authorization" not in moved.seen[0].headers


@pytest.mark.anyio
async def test_a_result_redirect_loop_and_a_downgrade_are_error_rows() -> None:
    async def loop(exchange: Exchange, writer: asyncio.StreamWriter) -> None:
        if "down" in exchange.target:
            writer.write(response(302, headers={"Location": "ftp://127.0.0.1/x"}))
        else:
            writer.write(response(302, headers={"Location": exchange.target}))

    with serving(loop) as server:
        async with open_client(max_connections=4, connect_timeout=5, read_timeout=5) as client:
            fetcher = _fetcher(client, server.url)
            looped = await fetcher.fetch("fal-ai/flux/requests/req-1")
            ftp = await fetcher.fetch("fal-ai/flux/requests/down-1")
    assert (looped.status, looped.error) == ("error", "result URL redirected more than 5 times")
    assert ftp.status == "error" and ftp.error is not None and "unsupported scheme" in ftp.error


def test_a_harvest_whose_result_urls_redirect_to_https_ends_ok(
    sandbox: Sandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(CERT))
    with serving(_serve_result, tls=True) as moved:

        async def relay(exchange: Exchange, writer: asyncio.StreamWriter) -> None:
            writer.write(response(301, headers={"Location": moved.url + exchange.target}))

        with serving(relay) as old:
            csv = write_csv(tmp_path / "in.csv", [("fal-ai/flux/dev", f"r-{i}") for i in range(4)])
            args = harvest_args(sandbox, tmp_path / "out", csv)
            args[args.index("--base-url") + 1] = old.url
            result = run_cli(args)
    assert result.exit_code == 0, result.output
    rows = pl.read_parquet(manifest_glob(tmp_path / "out"))
    assert rows["status"].to_list() == ["ok"] * 4
    assert not any("authorization" in e.headers for e in moved.seen)


FIXTURES = Path(__file__).parent / "fixtures"


async def _serve_bomb(exchange: Exchange, writer: asyncio.StreamWriter) -> None:
    """1 GiB of zeros in under 2 KB (fixtures/README.md), after a PNG signature for images."""
    name = "bomb-png-1gib.gz.gz" if exchange.target.endswith(".png") else "bomb-1gib.gz.gz"
    headers = {"Content-Type": "application/json", "Content-Encoding": "gzip, gzip"}
    writer.write(response(200, (FIXTURES / name).read_bytes(), headers))


@pytest.mark.anyio
async def test_a_compression_bomb_stops_at_the_limit(tmp_path: Path) -> None:
    """A result and an image that each decode to 1 GiB: both are error rows at their limits,
    and decoding never holds more than a limit's worth."""
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    layout = Layout(tmp_path / "out")
    layout.prepare()
    with serving(_serve_bomb) as server:
        async with open_client(max_connections=4, connect_timeout=5, read_timeout=5) as client:
            result = await _fetcher(client, server.url, max_result_bytes=1_000_000).fetch(
                "fal-ai/flux/requests/req-1"
            )
            downloader = ImageDownloader(
                client,
                ContentStore(LocalStore(layout.root)).sink,
                policy=RetryPolicy(),
                rng=random.Random(0),
                max_bytes=1_000_000,
            )
            image = await downloader.store(server.url + "/bomb.png")
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before
    assert result.status == "error" and result.error is not None
    assert result.error.startswith("the result body is larger than 1.0 MB; not read")
    assert isinstance(image, ImageFailure) and image.status == "failed"
    assert "larger than the 1,000,000-byte limit" in image.error
    assert grown_kib < 200_000  # far below the 1 GiB inside
    assert not any(layout.tmp.iterdir())


@pytest.mark.anyio
async def test_decoded_chunks_are_bounded_whatever_the_ratio() -> None:
    with serving(_serve_bomb) as server:
        async with open_client(max_connections=4, connect_timeout=5, read_timeout=5) as client:
            response_ = await client.send(client.build_request("GET", server.url), stream=True)
            sizes = []
            async for chunk in decoded_chunks(response_):
                sizes.append(len(chunk))
                if len(sizes) == 100:
                    break
            await response_.aclose()
    assert max(sizes) <= DECODED_CHUNK and sum(sizes) > 0


def test_an_unresolvable_host_prints_its_message_and_nothing_else(tmp_path: Path) -> None:
    """40 rows against a host that does not resolve: the run ends with the real message, and
    no "Future exception was never retrieved" (or any traceback) before it."""
    csv = write_csv(tmp_path / "in.csv", [("fal-ai/flux/dev", f"req-{i}") for i in range(40)])
    env = harvester_env()
    for name in PROXY_VARIABLES:
        env.pop(name, None)
        env.pop(name.lower(), None)
    done = run_harvest(
        "http://nonexistent.invalid", tmp_path / "out", csv, extra=["--retry-budget", "3"], env=env
    )
    assert done.returncode == ExitCode.UNREACHABLE, done.stderr
    assert "cannot reach the API at http://nonexistent.invalid" in done.stderr
    assert "never retrieved" not in done.stderr
    assert "Traceback" not in done.stderr
    assert "aiohttp" not in done.stderr.replace("aiohttp.", "")


async def _trickle(exchange: Exchange, writer: asyncio.StreamWriter) -> None:
    """A PNG (or a result) that announces 1,000 bytes and sends one every 0.2 s, forever."""
    if exchange.target.endswith("/ok"):
        await _serve_result(exchange, writer)
        return
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
    for byte in itertools.cycle(RESULT_PNG if exchange.target.endswith(".png") else b"{"):
        writer.write(bytes([byte]))
        await writer.drain()
        await asyncio.sleep(0.2)


async def _endless_continue(exchange: Exchange, writer: asyncio.StreamWriter) -> None:
    if exchange.target.endswith("/ok"):
        await _serve_result(exchange, writer)
        return
    while True:
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.02)


@pytest.mark.anyio
@pytest.mark.parametrize("handler", [_trickle, _endless_continue])
async def test_a_trickle_or_endless_100_continue_ends_at_the_attempt_deadline(
    handler: Handler, tmp_path: Path
) -> None:
    """Each read comes well within the 5 s read timeout, so only the deadline on the whole
    attempt (1 s here; 4 read timeouts by default) can end them: both become error rows after
    their attempts, and nothing is left in the store's temp folder. (The relay answered an
    earlier request: a first request that never ends says the API cannot be reached.)"""
    layout = Layout(tmp_path / "out")
    layout.prepare()
    policy = RetryPolicy(max_attempts=2, base_delay=0.001, max_delay=0.001)
    with serving(handler) as server:
        async with open_client(max_connections=4, connect_timeout=5, read_timeout=5) as client:
            fetcher = ResultFetcher(
                client,
                base_url=server.url,
                authorization=f"Bearer {KEY}",
                policy=policy,
                limiter=RateLimiter(1000),
                rng=random.Random(0),
                total_seconds=1.0,
            )
            assert (await fetcher.fetch("fal-ai/flux/requests/ok")).status == "ok"
            result = await fetcher.fetch("fal-ai/flux/requests/req-1")
            downloader = ImageDownloader(
                client,
                ContentStore(LocalStore(layout.root)).sink,
                policy=policy,
                rng=random.Random(0),
                total_seconds=1.0,
            )
            image = await downloader.store(server.url + "/slow.png")
    assert (result.status, result.attempts) == ("error", 2)
    assert result.error == "timed out (no whole answer within 1 s) (gave up after 2 attempts)"
    assert isinstance(image, ImageFailure) and (image.status, image.attempts) == ("error", 2)
    assert image.error == (
        "image download: image download timed out (not whole within 1 s) (gave up after 2 attempts)"
    )
    assert not any(layout.tmp.iterdir())


def test_the_attempt_deadline_is_four_read_timeouts_and_at_least_30_s() -> None:
    assert attempt_seconds(5) == 30.0
    assert attempt_seconds(60) == 240.0
    assert attempt_seconds(None) == 240.0


JPEG_HEAD = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00"


@pytest.mark.anyio
@pytest.mark.parametrize("size", [900_000, 3_000_000])
async def test_an_image_is_in_memory_at_most_twice(tmp_path: Path, size: int) -> None:
    """At most two copies of an image's bytes at once, traced by tracemalloc over a real
    download: the pieces as they arrived and, for a body up to 1 MiB, their join at the put;
    a larger body spills to a file as it arrives, so it is never whole in memory."""
    body = JPEG_HEAD + random.Random(size).randbytes(size)
    srv = RawServer(_head(len(body)) + body)
    layout = Layout(tmp_path / "out")
    layout.prepare()
    try:
        async with open_client(max_connections=2, connect_timeout=5, read_timeout=5) as client:
            downloader = ImageDownloader(
                client,
                ContentStore(LocalStore(layout.root)).sink,
                policy=RetryPolicy(max_attempts=1),
                rng=random.Random(0),
            )
            tracemalloc.start()
            try:
                before = tracemalloc.get_traced_memory()[0]
                got = await downloader.store(srv.url + "/a.jpg")
                peak = tracemalloc.get_traced_memory()[1] - before
            finally:
                tracemalloc.stop()
    finally:
        srv.close()
    assert isinstance(got, StoredImage), got
    assert got.bytes == len(body)
    assert peak <= 2 * len(body) + 256 * 1024, (peak, len(body))
    if size > 1 << 20:
        assert peak < len(body), (peak, len(body))
    else:
        assert peak >= len(body), (peak, len(body))  # the trace sees the bytes at all

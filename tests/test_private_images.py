"""Image URLs (and their redirects) to loopback, link-local, private and unspecified addresses
are refused, checked on the resolved address, unless the API is on such an address itself or
the user allows them. An injected resolver makes a base URL and a CDN count as public: no
traffic leaves the machine."""

from __future__ import annotations

import asyncio
import random
import socket
from pathlib import Path

import anyio
import httpx
import pytest

from harvester.api.download import ImageDownloader, ImageFailure, Resolve
from harvester.api.retry import RetryPolicy
from harvester.api.transport import Client, open_client
from harvester.api.urls import is_public
from harvester.errors import ConfigError
from harvester.jobs import load_job
from harvester.storage.layout import Layout
from harvester.storage.objects import LocalStore
from harvester.storage.store import ContentStore, StoredImage
from tests.hostile_http import Exchange, response, serving

PNG = b"\x89PNG\r\n\x1a\n" + b"\x05" * 64
PUBLIC = {"relay.example": ["93.184.216.34"], "cdn.example": ["2606:2800:220:1::1"]}
"""Names the fake resolver answers as public; anything else must be a numeric address."""


async def fake_resolve(host: str, port: int) -> list[str]:
    if host in PUBLIC:
        return PUBLIC[host]
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
    return [str(info[4][0]) for info in infos]


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("127.0.0.1", False),
        ("::1", False),
        ("169.254.169.254", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("0.0.0.0", False),  # noqa: S104 (an address to judge, never bound)
        ("::", False),
        ("::ffff:127.0.0.1", False),
        ("fe80::1%eth0", False),
        ("fd00::1", False),
        ("100.64.0.1", False),
        ("224.0.0.1", False),
        ("93.184.216.34", True),
        ("2606:2800:220:1::1", True),
    ],
)
def test_what_counts_as_public(address: str, public: bool) -> None:
    assert is_public(address) is public


async def _png(exchange: Exchange, writer: asyncio.StreamWriter) -> None:
    writer.write(response(200, PNG, {"Content-Type": "image/png"}))


def _layout(tmp_path: Path) -> Layout:
    layout = Layout(tmp_path / "out")
    layout.prepare()
    return layout


def _downloader(
    client: Client,
    folder: Path,
    *,
    refuse: bool = True,
    api_url: str | None = "https://relay.example",
    resolve: Resolve = fake_resolve,
    attempts: int = 1,
) -> ImageDownloader[StoredImage]:
    """A downloader into ``folder`` whose host lookups go to ``resolve``."""
    return ImageDownloader(
        client,
        ContentStore(LocalStore(_layout(folder).root)).sink,
        policy=RetryPolicy(max_attempts=attempts),
        rng=random.Random(0),
        refuse_private=refuse,
        api_url=api_url,
        resolve=resolve,
    )


@pytest.mark.anyio
async def test_private_image_addresses_are_refused_when_the_api_is_public(
    tmp_path: Path,
) -> None:
    """Real server on 127.0.0.1, reached as 127.0.0.1, 0x7f000001 and [::1]... none of it is
    fetched: the API (relay.example) counts as public."""
    with serving(_png) as server:
        port = httpx.URL(server.url).port
        async with open_client(max_connections=4, connect_timeout=5, read_timeout=5) as client:
            downloader = _downloader(client, tmp_path)
            got = [
                await downloader.store(f"http://{host}:{port}/a.png")
                for host in ("127.0.0.1", "0x7f000001", "[::1]", "169.254.169.254", "10.0.0.7")
            ]
    assert server.seen == []
    assert all(isinstance(g, ImageFailure) and g.status == "failed" for g in got)
    errors = [g.error for g in got if isinstance(g, ImageFailure)]
    assert errors[0] == (
        "image URL host 127.0.0.1 resolves to a non-public address (127.0.0.1); not fetched. "
        "If the images really live on your own network, run with --allow-private-images "
        "(job file: allow-private-images = true)"
    )
    assert "(127.0.0.1)" in errors[1] and "(::1)" in errors[2]
    assert "(169.254.169.254)" in errors[3] and "(10.0.0.7)" in errors[4]


@pytest.mark.anyio
async def test_a_cdn_redirect_to_a_private_address_is_refused(tmp_path: Path) -> None:
    """A public CDN (mock transport) redirects to the metadata address: the redirect is not
    followed, checked before the request is made."""
    asked: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        asked.append(str(request.url))
        if request.url.host == "cdn.example":
            return httpx.Response(302, headers={"Location": "//169.254.169.254/latest"})
        return httpx.Response(200, content=PNG)

    async with Client(transport=httpx.MockTransport(handler)) as client:
        downloader = _downloader(client, tmp_path)
        got = await downloader.store("https://cdn.example/a.png")
        again = await downloader.store("http://cdn.example/b.png")
    assert isinstance(got, ImageFailure) and "(169.254.169.254)" in got.error
    assert asked == ["https://cdn.example/a.png", "http://cdn.example/b.png"]
    assert isinstance(again, ImageFailure)  # the same redirect over http: refused too


@pytest.mark.anyio
async def test_a_host_that_resolves_again_to_a_private_address_is_refused(
    tmp_path: Path,
) -> None:
    """DNS rebinding: the download stage's check hears a public address for the host, the
    connection's own lookup gets 127.0.0.1 (here: the check's resolver says ``localhost`` is
    public, the system's says loopback). The transport checks the answer it connects to: the
    server hears nothing, and the row says why."""
    with serving(_png) as server:
        port = httpx.URL(server.url).port

        async def first_answer_public(host: str, port: int) -> list[str]:
            return ["93.184.216.34"] if host == "localhost" else await fake_resolve(host, port)

        async with open_client(max_connections=4, connect_timeout=5, read_timeout=5) as client:
            downloader = _downloader(client, tmp_path, resolve=first_answer_public, attempts=3)
            got = await downloader.store(f"http://localhost:{port}/a.png")
            allowed = _downloader(
                client,
                tmp_path / "allowed",
                refuse=False,
                api_url=None,
                resolve=first_answer_public,
            )
            fetched = await allowed.store(f"http://localhost:{port}/a.png")
    assert isinstance(got, ImageFailure), got
    assert (got.status, got.attempts) == ("failed", 1)  # final: not retried
    assert got.error.startswith("image URL host localhost resolves to a non-public address (")
    assert "--allow-private-images" in got.error
    # The same client, the same host, without the refusal: fetched (the refusal is per request).
    assert isinstance(fetched, StoredImage), fetched
    assert [e.target for e in server.seen] == ["/a.png"]


@pytest.mark.anyio
@pytest.mark.parametrize("image_host", ["127.0.0.1", "localhost"])
@pytest.mark.parametrize(("refuse", "api_host"), [(True, "127.0.0.1"), (False, "relay.example")])
async def test_local_images_are_fetched_when_the_api_is_local_or_they_are_allowed(
    refuse: bool, api_host: str, image_host: str, tmp_path: Path
) -> None:
    """The first image too: the transport's own check (for a host it resolves, ``localhost``)
    is off from the first request on when the API is local."""
    with serving(_png) as server:
        async with open_client(max_connections=4, connect_timeout=5, read_timeout=5) as client:
            downloader = _downloader(
                client, tmp_path, refuse=refuse, api_url=f"http://{api_host}:1"
            )
            got = await downloader.store(server.url.replace("127.0.0.1", image_host) + "/a.png")
    assert isinstance(got, StoredImage) and got.bytes == len(PNG)


@pytest.mark.anyio
async def test_downloads_that_start_together_wait_for_the_one_check_of_the_api(
    tmp_path: Path,
) -> None:
    """The API is local (the sandbox's case), and its address takes a moment to resolve:
    downloads that start meanwhile wait for that one check instead of refusing their images."""

    async def slow_api(host: str, port: int) -> list[str]:
        if host == "api.local":
            await asyncio.sleep(0.2)
            return ["127.0.0.1"]
        return await fake_resolve(host, port)

    with serving(_png) as server:
        async with open_client(max_connections=8, connect_timeout=5, read_timeout=5) as client:
            downloader = _downloader(
                client, tmp_path, api_url="http://api.local:1", resolve=slow_api
            )
            got: list[StoredImage | ImageFailure] = []

            async def one(n: int) -> None:
                got.append(await downloader.store(f"{server.url}/{n}.png"))

            async with anyio.create_task_group() as tg:
                for n in range(5):
                    tg.start_soon(one, n)
    assert all(isinstance(g, StoredImage) for g in got), got
    assert len(server.seen) == 5


def test_the_job_file_key_and_its_type(tmp_path: Path) -> None:
    job = tmp_path / "job.toml"
    job.write_text('inputs = ["a.csv"]\nout = "out"\nallow-private-images = true\n')
    loaded = load_job(job)
    assert loaded.allow_private_images is True
    assert loaded.harvest_config("k").allow_private_images is True
    job.write_text('inputs = ["a.csv"]\nout = "out"\nallow-private-images = "yes"\n')
    with pytest.raises(ConfigError, match="'allow-private-images' must be true or false"):
        load_job(job)

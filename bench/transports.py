"""The measurement behind harvester/http1.py: the same harvest, in this process, over httpx's
default transport (httpcore), over aiohttp's connection pool (the transport the harvester used
before, kept here for the comparison) and over harvester's own HTTP/1.1 transport, on uvloop
(and httpcore on asyncio's own loop too), in alternating rounds against nginx on 127.0.0.1.

    .venv/bin/python bench/transports.py [--n 2000] [--runs 3]

Prints, per variant, the median wall time and CPU-seconds (user + system) of the harvest
itself (imports excluded).
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import statistics
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import aiohttp
import httpx
from yarl import URL

sys.path.insert(0, str(Path(__file__).parent))

import nginx
import run

from harvester.api import transport
from harvester.api.transport import KEEPALIVE_SECONDS, USER_AGENT, Client, open_client
from harvester.run import pipeline, shard


@contextmanager
def _translated(request: httpx.Request) -> Iterator[None]:
    """Raise aiohttp's errors as the httpx ``TransportError`` each one means."""
    try:
        yield
    except aiohttp.ConnectionTimeoutError as exc:
        raise httpx.ConnectTimeout(str(exc) or "connect timed out", request=request) from exc
    except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
        raise httpx.ReadTimeout(str(exc) or "read timed out", request=request) from exc
    except aiohttp.ClientConnectorError as exc:
        raise httpx.ConnectError(str(exc), request=request) from exc
    except aiohttp.ClientPayloadError as exc:
        # A body cut short: fewer bytes than Content-Length, or a broken chunked encoding.
        raise httpx.ReadError(str(exc), request=request) from exc
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientResponseError) as exc:
        raise httpx.RemoteProtocolError(str(exc) or type(exc).__name__, request=request) from exc
    except aiohttp.InvalidURL as exc:
        raise httpx.UnsupportedProtocol(str(exc), request=request) from exc
    except (aiohttp.ClientError, OSError) as exc:
        raise httpx.NetworkError(str(exc) or type(exc).__name__, request=request) from exc


@functools.lru_cache(maxsize=16)
def _client_timeout(
    pool: float | None, connect: float | None, read: float | None
) -> aiohttp.ClientTimeout:
    """aiohttp's timeouts for httpx's (a run uses one or two distinct ones)."""
    return aiohttp.ClientTimeout(total=None, connect=pool, sock_connect=connect, sock_read=read)


class _Body(httpx.AsyncByteStream):
    """A response body, streamed from aiohttp in whatever pieces arrived."""

    def __init__(self, response: aiohttp.ClientResponse, request: httpx.Request) -> None:
        self._response = response
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _translated(self._request):
            async for chunk in self._response.content.iter_any():
                yield chunk

    async def aclose(self) -> None:
        # A fully read body gives the connection back to the pool; anything else closes it.
        if self._response.content.at_eof():
            self._response.release()
        else:
            self._response.close()


class AiohttpTransport(httpx.AsyncBaseTransport):
    """An httpx transport whose connections are an aiohttp ``TCPConnector``'s (HTTP/1.1)."""

    def __init__(self, *, max_connections: int, keepalive_seconds: float = KEEPALIVE_SECONDS):
        self._max_connections = max_connections
        self._keepalive = keepalive_seconds
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        # Created on first use: aiohttp binds the session to the running event loop.
        connector = aiohttp.TCPConnector(
            limit=self._max_connections,
            limit_per_host=0,
            keepalive_timeout=self._keepalive,
            ttl_dns_cache=300,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
            timeout=aiohttp.ClientTimeout(total=None),
        )
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        session = self._session or self._open()
        timeout = request.extensions.get("timeout", {})
        data = request.content or None
        with _translated(request):
            response = await session.request(
                request.method,
                URL(str(request.url), encoded=True),
                headers=request.headers.multi_items(),
                data=data,
                allow_redirects=False,
                timeout=_client_timeout(
                    timeout.get("pool"), timeout.get("connect"), timeout.get("read")
                ),
            )
        return httpx.Response(
            status_code=response.status,
            headers=response.raw_headers,
            stream=_Body(response, request),
            request=request,
            extensions={
                "http_version": b"HTTP/1.1",
                "reason_phrase": (response.reason or "").encode(),
            },
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def aiohttp_client(
    *, max_connections: int, connect_timeout: float, read_timeout: float
) -> httpx.AsyncClient:
    """The client as it was built before harvester/http1.py: aiohttp's pool under httpx."""
    return Client(
        transport=AiohttpTransport(max_connections=max_connections),
        timeout=httpx.Timeout(read_timeout, connect=connect_timeout, pool=None),
        follow_redirects=False,
        headers={"User-Agent": USER_AGENT},
    )


def httpcore_client(
    *, max_connections: int, connect_timeout: float, read_timeout: float
) -> httpx.AsyncClient:
    """The client as it was built before harvester/transport.py: httpx's own pool."""
    limits = httpx.Limits(
        max_connections=max_connections, max_keepalive_connections=max_connections
    )
    return httpx.AsyncClient(
        timeout=httpx.Timeout(read_timeout, connect=connect_timeout, pool=None),
        limits=limits,
        follow_redirects=False,
        headers={"User-Agent": "harvester"},
    )


VARIANTS: dict[str, tuple[Callable[..., httpx.AsyncClient], bool]] = {
    "httpcore, asyncio": (httpcore_client, False),
    "httpcore, uvloop": (httpcore_client, True),
    "aiohttp, uvloop": (aiohttp_client, True),
    "http1, uvloop": (open_client, True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    args = parser.parse_args()
    out = args.out.resolve()
    w = run.build_world(out / f"world-{args.n}", args.n, 30_000)
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in VARIANTS}
    folder = run.clear_runs(out, settle=True)
    with nginx.serving(w.www, w.spec.port) as server:
        for i in range(args.runs):
            for name, (make_client, uvloop) in VARIANTS.items():
                # One shard, in this process, so that the patched client is the one used.
                transport.open_client = make_client  # type: ignore[assignment]
                shard.EVENT_LOOP_OPTIONS = {"use_uvloop": uvloop}  # type: ignore[misc]
                target = run.fresh(folder / f"{name}-{i + 1}")
                config = pipeline.HarvestConfig(
                    inputs=(w.csv,),
                    out_dir=target,
                    api_key="bench-key",
                    base_url=server.base_url,
                    rps=100_000.0,
                    workers=1,
                )
                before, started = os.times(), time.perf_counter()
                stats = pipeline.harvest(config)
                wall, after = time.perf_counter() - started, os.times()
                cpu = (after.user + after.system) - (before.user + before.system)
                assert stats.requests["ok"] == args.n, stats.summary()
                results[name].append((wall, cpu))
                print(f"  {name:18} wall {wall:6.2f} s  cpu {cpu:6.2f} s", flush=True)
    shutil.rmtree(folder, ignore_errors=True)
    print(f"\n{args.n:,} requests, {w.images:,} images; medians of {args.runs} rounds")
    for name, rows in results.items():
        wall = statistics.median(r[0] for r in rows)
        cpu = statistics.median(r[1] for r in rows)
        print(f"  {name:18} wall {wall:6.2f} s  CPU {cpu:6.2f} s")


if __name__ == "__main__":
    main()

"""The run's HTTP client: httpx's API over aiohttp's connection pool.

The code is written against ``httpx.AsyncClient``; only the transport underneath is aiohttp's.
httpx's own transport (httpcore) rescans its whole pool on every request, which costs more
than the request itself once dozens of connections are open (encode/httpx#3215); aiohttp's
pool does not. README ("Performance") has the measurements behind this choice.

Every aiohttp error is translated here, at the one place aiohttp is called, into the httpx
exception it stands for, so callers catch ``httpx.TransportError`` and nothing else. Redirects
are never followed here (httpx, or the caller, decides), bodies are never decoded here (httpx
does that) and aiohttp keeps no cookies and adds no headers of its own.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any, Final

import aiohttp
import httpx
from yarl import URL

USER_AGENT: Final = "harvester"
_httpx_log: Final = logging.getLogger("httpx")
KEEPALIVE_SECONDS: Final = 30.0


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


class _NoCookies(httpx.Cookies):
    """A cookie jar that keeps nothing: neither the API nor an image host needs cookies, and
    reading every response's Set-Cookie through ``http.cookiejar`` is not free."""

    def extract_cookies(self, response: httpx.Response) -> None:
        return None


class Client(httpx.AsyncClient):
    """``httpx.AsyncClient`` without a cookie jar, whose ``send`` goes straight to its
    transport.

    The harvester uses none of what ``AsyncClient.send`` wraps around the transport: no auth
    flows (the key is a plain header), no redirects followed by the client (the image store
    follows them itself, checking each hop), no event hooks, no cookies. Skipping those layers
    takes about a tenth off the CPU of a request; anything that asks for them gets httpx's own
    ``send``.
    """

    _no_cookies: Final = _NoCookies()

    def __init__(self, *, transport: httpx.AsyncBaseTransport, **kwargs: Any) -> None:
        super().__init__(transport=transport, **kwargs)
        self._direct = transport

    async def send(
        self,
        request: httpx.Request,
        *,
        stream: bool = False,
        auth: httpx._types.AuthTypes
        | httpx._client.UseClientDefault
        | None = httpx.USE_CLIENT_DEFAULT,
        follow_redirects: bool | httpx._client.UseClientDefault = httpx.USE_CLIENT_DEFAULT,
    ) -> httpx.Response:
        if follow_redirects is True or auth not in (httpx.USE_CLIENT_DEFAULT, None):
            return await super().send(
                request, stream=stream, auth=auth, follow_redirects=follow_redirects
            )
        if self.is_closed:
            raise RuntimeError("Cannot send a request, as the client has been closed.")
        response = await self._direct.handle_async_request(request)
        response.request = request
        if _httpx_log.isEnabledFor(logging.INFO):
            _httpx_log.info(
                'HTTP Request: %s %s "%s %d %s"',
                request.method,
                request.url,
                response.http_version,
                response.status_code,
                response.reason_phrase,
            )
        if not stream:
            try:
                await response.aread()
            except BaseException:
                await response.aclose()
                raise
        return response

    @property
    def cookies(self) -> httpx.Cookies:
        return self._no_cookies

    @cookies.setter
    def cookies(self, cookies: httpx._types.CookieTypes) -> None:
        raise TypeError("this client keeps no cookies")


def open_client(
    *, max_connections: int, connect_timeout: float, read_timeout: float
) -> httpx.AsyncClient:
    """The one client of a run: no redirects followed, no pool timeout (slots bound the work)."""
    return Client(
        transport=AiohttpTransport(max_connections=max_connections),
        timeout=httpx.Timeout(read_timeout, connect=connect_timeout, pool=None),
        follow_redirects=False,
        headers={"User-Agent": USER_AGENT},
    )

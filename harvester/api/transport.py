"""The run's HTTP client: httpx's ``AsyncClient`` over aiohttp's connection pool.

The code is written against ``httpx.AsyncClient``; the connections under it are an aiohttp
``TCPConnector``'s (maintained, HTTP/1.1 keep-alive, proxies, TLS). This module is the glue:
one httpx transport per aiohttp session, aiohttp's errors raised as the httpx error each one
means (none of aiohttp's escapes), proxies from the environment mounted the way httpx mounts
them, TLS verified against certifi or ``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` (httpx's own rule).
Why not httpx's own transport: ``bench/transports.py`` (docs/performance.md has the figures).

Redirects are never followed here (the caller decides, hop by hop), bodies are never decoded
here (``harvester/api/body.py`` decodes them in bounded pieces); no cookies are kept. Only the
code that opens a client imports this module: aiohttp takes a while to import.

A request with the ``PUBLIC_ONLY`` extension connects only if every address its host resolves
to is public, checked on the very answer the connection uses (aiohttp's resolver), so a DNS
answer that changes between the download stage's own check and the connection is caught too.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import ssl
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Final

import aiohttp
import httpx
from aiohttp.http_exceptions import HttpProcessingError
from yarl import URL

from harvester.api.body import PUBLIC_ONLY, CertificateError, NonPublicAddressError
from harvester.api.urls import is_public, non_public_refusal

USER_AGENT: Final = "harvester"
_httpx_log: Final = logging.getLogger("httpx")
KEEPALIVE_SECONDS: Final = 30.0
"""Idle connections are closed after this long (servers close theirs after 60-75 s, CDNs
sooner)."""


_public_only: ContextVar[bool] = ContextVar("harvester_public_only", default=False)
"""Set while a ``PUBLIC_ONLY`` request is being sent; the resolver reads it (aiohttp resolves
in the request's task, or in a task it starts from there, which inherits the value)."""


class _NonPublic(OSError):
    def __init__(self, host: str, address: str) -> None:
        super().__init__(non_public_refusal(host, address))


class _PublicOnlyResolver(aiohttp.abc.AbstractResolver):
    """aiohttp's default resolver, refusing a non-public answer while ``_public_only`` is set.
    Numeric hosts never reach a resolver (the download stage checks those itself); an answer
    aiohttp keeps in its DNS cache was checked when it was resolved, unless a request that was
    not ``PUBLIC_ONLY`` (the API's own, on the same host) resolved it."""

    def __init__(self) -> None:
        self._inner = aiohttp.DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[aiohttp.abc.ResolveResult]:
        answers = await self._inner.resolve(host, port, family)
        if _public_only.get():
            for answer in answers:
                if not is_public(answer["host"]):
                    raise _NonPublic(host, answer["host"])
        return answers

    async def close(self) -> None:
        await self._inner.close()


def _cannot_connect(exc: aiohttp.ClientConnectorError) -> str:
    """``cannot connect to HOST:PORT: REASON`` in plain words (aiohttp's own message names its
    TLS setting, ``ssl:default``, even for http)."""
    cause = exc.os_error
    if cause.errno and cause.errno > 0 and not isinstance(cause, socket.gaierror):
        reason = os.strerror(cause.errno)  # asyncio's text is "Connect call failed (...)"
    else:
        reason = cause.strerror or str(cause) or type(cause).__name__
    return f"cannot connect to {exc.host}:{exc.port}: {reason[:1].lower()}{reason[1:]}"


@contextmanager
def _translated(request: httpx.Request) -> Iterator[None]:
    """Raise aiohttp's (and the socket's) errors as the httpx ``TransportError`` each means."""
    try:
        yield
    except aiohttp.ClientConnectorDNSError as exc:
        if isinstance(exc.os_error, _NonPublic):
            raise NonPublicAddressError(str(exc.os_error), request=request) from exc
        raise httpx.ConnectError(_cannot_connect(exc), request=request) from exc
    except aiohttp.ClientConnectorCertificateError as exc:
        raise CertificateError(
            f"TLS certificate of {exc.host}:{exc.port} did not verify ({exc.certificate_error}); "
            "if the server is yours, point SSL_CERT_FILE or SSL_CERT_DIR at its CA",
            request=request,
        ) from exc
    except aiohttp.ClientConnectorSSLError as exc:
        raise httpx.ConnectError(f"TLS handshake failed ({exc})", request=request) from exc
    except aiohttp.ConnectionTimeoutError as exc:
        raise httpx.ConnectTimeout(str(exc) or "connect timed out", request=request) from exc
    except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
        raise httpx.ReadTimeout(str(exc) or "read timed out", request=request) from exc
    except (aiohttp.ClientProxyConnectionError, aiohttp.ClientHttpProxyError) as exc:
        raise httpx.ProxyError(str(exc), request=request) from exc
    except aiohttp.ClientConnectorError as exc:
        raise httpx.ConnectError(_cannot_connect(exc), request=request) from exc
    except aiohttp.ClientPayloadError as exc:
        # A body cut short: fewer bytes than Content-Length, or a broken chunked encoding.
        raise httpx.ReadError(str(exc), request=request) from exc
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientResponseError) as exc:
        raise httpx.RemoteProtocolError(str(exc) or type(exc).__name__, request=request) from exc
    except HttpProcessingError as exc:
        raise httpx.RemoteProtocolError(str(exc) or type(exc).__name__, request=request) from exc
    except (aiohttp.InvalidURL, aiohttp.NonHttpUrlClientError) as exc:
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
    """An httpx transport whose connections are an aiohttp ``TCPConnector``'s (HTTP/1.1),
    direct or through ``proxy``."""

    def __init__(
        self,
        *,
        ssl_context: ssl.SSLContext,
        limits: httpx.Limits,
        proxy: httpx.Proxy | None = None,
    ) -> None:
        self._ssl = ssl_context
        self._limits = limits
        self._proxy = str(proxy.url) if proxy is not None else None
        self._proxy_auth = (
            aiohttp.BasicAuth(*proxy.auth) if proxy is not None and proxy.auth else None
        )
        self._proxy_headers = dict(proxy.headers) if proxy is not None else None
        self._session: aiohttp.ClientSession | None = None
        self._resolver: _PublicOnlyResolver | None = None

    def _open(self) -> aiohttp.ClientSession:
        # Created on first use: aiohttp binds the session to the running event loop. Through a
        # proxy only the proxy's own host is resolved here: never refused.
        if self._proxy is None:
            self._resolver = _PublicOnlyResolver()
        connector = aiohttp.TCPConnector(
            limit=self._limits.max_connections or 0,
            limit_per_host=0,
            keepalive_timeout=self._limits.keepalive_expiry or KEEPALIVE_SECONDS,
            ttl_dns_cache=300,
            ssl=self._ssl,
            resolver=self._resolver,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
            timeout=aiohttp.ClientTimeout(total=None),
            trust_env=False,  # httpx chose the proxy (or none) for this transport already
        )
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        session = self._session or self._open()
        timeout = request.extensions.get("timeout", {})
        public_only = _public_only.set(bool(request.extensions.get(PUBLIC_ONLY)))
        with _translated(request):
            try:
                response = await session.request(
                    request.method,
                    URL(str(request.url), encoded=True),
                    headers=request.headers.multi_items(),
                    data=request.content or None,
                    allow_redirects=False,
                    proxy=self._proxy,
                    proxy_auth=self._proxy_auth,
                    proxy_headers=self._proxy_headers,
                    timeout=_client_timeout(
                        timeout.get("pool"), timeout.get("connect"), timeout.get("read")
                    ),
                )
            finally:
                _public_only.reset(public_only)
        return httpx.Response(
            status_code=response.status,
            headers=response.raw_headers,
            stream=_Body(response, request),
            request=request,
            extensions={
                "http_version": b"HTTP/1.1",
                "reason_phrase": (response.reason or "").encode("latin-1", "replace"),
            },
        )

    async def aclose(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()
        if self._resolver is not None:  # a resolver handed to it, the connector leaves open
            resolver, self._resolver = self._resolver, None
            await resolver.close()


class _NoCookies(httpx.Cookies):
    """A cookie jar that keeps nothing: neither the API nor an image host needs cookies, and
    reading every response's Set-Cookie through ``http.cookiejar`` is not free."""

    def extract_cookies(self, response: httpx.Response) -> None:
        return None


class Client(httpx.AsyncClient):
    """``httpx.AsyncClient`` over ``AiohttpTransport`` (proxies from the environment mounted
    as httpx mounts them), without a cookie jar, whose ``send`` goes straight to the
    transport for the URL.

    The harvester uses none of what ``AsyncClient.send`` wraps around the transport: no auth
    flows (the key is a plain header), no redirects followed by the client (the fetcher and
    the download stage follow them themselves, checking each hop), no event hooks, no
    cookies. Anything that asks for them gets httpx's own ``send``.
    """

    _no_cookies: Final = _NoCookies()

    def _init_transport(  # type: ignore[override]
        self,
        verify: ssl.SSLContext | str | bool = True,
        cert: Any = None,
        trust_env: bool = True,
        limits: httpx.Limits = httpx.Limits(),  # noqa: B008 (httpx's own default)
        transport: httpx.AsyncBaseTransport | None = None,
        **_: Any,
    ) -> httpx.AsyncBaseTransport:
        if transport is not None:
            return transport
        return AiohttpTransport(ssl_context=_ssl_context(verify, trust_env), limits=limits)

    def _init_proxy_transport(  # type: ignore[override]
        self,
        proxy: httpx.Proxy,
        verify: ssl.SSLContext | str | bool = True,
        cert: Any = None,
        trust_env: bool = True,
        limits: httpx.Limits = httpx.Limits(),  # noqa: B008 (httpx's own default)
        **_: Any,
    ) -> httpx.AsyncBaseTransport:
        return AiohttpTransport(
            ssl_context=_ssl_context(verify, trust_env), limits=limits, proxy=proxy
        )

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
        response = await self._transport_for_url(request.url).handle_async_request(request)
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


_ssl_contexts: dict[tuple[str | None, str | None], ssl.SSLContext] = {}


def _ssl_context(verify: ssl.SSLContext | str | bool, trust_env: bool) -> ssl.SSLContext:
    """httpx's TLS context (certifi, or ``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` from the
    environment), made once per process and trust setting: loading a CA bundle takes tens of
    milliseconds."""
    if not isinstance(verify, bool) or verify is False or not trust_env:
        return httpx.create_ssl_context(verify=verify, trust_env=trust_env)
    key = (os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))
    if key not in _ssl_contexts:
        _ssl_contexts[key] = httpx.create_ssl_context(verify=True, trust_env=True)
    return _ssl_contexts[key]


def open_client(
    *, max_connections: int, connect_timeout: float, read_timeout: float
) -> httpx.AsyncClient:
    """The one client of a run: no redirects followed, no pool timeout (slots bound the work);
    proxies from ``HTTP_PROXY`` / ``HTTPS_PROXY`` / ``ALL_PROXY`` / ``NO_PROXY``."""
    return Client(
        timeout=httpx.Timeout(read_timeout, connect=connect_timeout, pool=None),
        limits=httpx.Limits(
            max_connections=max_connections,
            max_keepalive_connections=max_connections,
            keepalive_expiry=KEEPALIVE_SECONDS,
        ),
        follow_redirects=False,
        headers={"User-Agent": USER_AGENT},
    )


__all__ = [
    "KEEPALIVE_SECONDS",
    "USER_AGENT",
    "AiohttpTransport",
    "CertificateError",
    "Client",
    "open_client",
]

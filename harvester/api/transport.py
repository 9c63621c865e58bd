"""The run's HTTP client: httpx's ``AsyncClient`` over aiohttp's connection pool.

Result requests are written against ``httpx.AsyncClient``; the connections under it are an
aiohttp ``TCPConnector``'s (maintained, HTTP/1.1 keep-alive, proxies, TLS). This module is the
glue, through httpx's public API only (a ``transport=``, a public ``send``): one httpx
transport over one aiohttp session, aiohttp's errors raised as the httpx error each one means
(none of aiohttp's escapes; a whole exchange's ``SECONDS`` running out is a ``TimeoutError``),
the proxy for each request chosen from the environment as httpx chooses it, TLS verified
against certifi or ``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` (httpx's own rule). An image's bytes
come from the same session without httpx's models (``Client.open_image``), under the same
rules. Why not httpx's own transport: ``bench/transports.py`` (docs/performance.md).

Redirects are never followed here (the caller decides, hop by hop), bodies are never decoded
here (``harvester/api/body.py`` decodes them in bounded pieces); no cookies are kept. Only the
code that opens a client imports this module: aiohttp takes a while to import.

A request with the ``PUBLIC_ONLY`` extension connects only if every address its host resolves
to is public, checked on the very answer the connection uses (aiohttp's resolver), so a DNS
answer that changes between the download stage's own check and the connection is caught too.
Through a proxy the proxy resolves the host: only the download stage's own check applies.
"""

from __future__ import annotations

import base64
import ipaddress
import logging
import os
import socket
import ssl
import urllib.request
from collections.abc import AsyncIterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Final

import aiohttp
import httpx
from aiohttp.http_exceptions import HttpProcessingError
from yarl import URL

from harvester.api.body import (
    PUBLIC_ONLY,
    SECONDS,
    CertificateError,
    NonPublicAddressError,
    decoded_chunks,
)
from harvester.api.urls import is_public, non_public_refusal

USER_AGENT: Final = "harvester"
_httpx_log: Final = logging.getLogger("httpx")
KEEPALIVE_SECONDS: Final = 30.0
"""Idle connections are closed after this long (servers close theirs after 60-75 s, CDNs
sooner)."""


_public_only: ContextVar[bool] = ContextVar("harvester_public_only", default=False)
"""Set while a direct ``PUBLIC_ONLY`` request is being sent; the resolver reads it (aiohttp
resolves in the request's task, or in a task it starts from there, which inherits the value)."""


@dataclass(frozen=True, slots=True)
class _Proxy:
    url: str
    """Without credentials: aiohttp puts the URL in its messages."""
    authorization: str | None = field(default=None, repr=False)
    """The ``Proxy-Authorization`` for credentials in the variable's URL."""


def _proxy(url: str) -> _Proxy:
    """A proxy named in the environment (schemes httpx accepts, or ValueError)."""
    proxy = httpx.Proxy(url if "://" in url else f"http://{url}")
    if proxy.auth is None:
        return _Proxy(str(proxy.url))
    basic = base64.b64encode(":".join(proxy.auth).encode()).decode()
    return _Proxy(str(proxy.url), f"Basic {basic}")


@dataclass(frozen=True, slots=True)
class _Bypass:
    """One ``NO_PROXY`` entry: the URLs it sends past the proxy."""

    scheme: str
    """"all" for any."""
    name: str
    port: int | None
    itself: bool
    """The host ``name`` matches."""
    below: bool
    """Its subdomains match."""

    def matches(self, url: URL) -> bool:
        port = None if url.is_default_port() else url.port  # as httpx has it
        if self.scheme not in ("all", url.scheme) or self.port not in (None, port):
            return False
        host = url.host or ""
        return (self.itself and host == self.name) or (
            self.below and host.endswith("." + self.name)
        )


def _bypass(entry: str) -> _Bypass:
    """A ``NO_PROXY`` entry read as httpx reads it (curl's rules)."""
    if "://" not in entry:
        bare = entry.split("/")[0]
        try:
            address = ipaddress.ip_address(bare)
        except ValueError:
            entry = f"all://{entry}" if entry == "localhost" else f"all://*{entry}"
        else:
            entry = f"all://[{entry}]" if address.version == 6 else f"all://{entry}"
    url = httpx.URL(entry)
    if url.host.startswith("*."):
        return _Bypass(url.scheme, url.host[2:], url.port, itself=False, below=True)
    if url.host.startswith("*"):
        return _Bypass(url.scheme, url.host[1:], url.port, itself=True, below=True)
    return _Bypass(url.scheme, url.host, url.port, itself=True, below=False)


class Proxies:
    """The forward proxies the environment names, chosen per URL as httpx chooses them:
    ``HTTP_PROXY`` or ``HTTPS_PROXY`` by the URL's scheme, else ``ALL_PROXY`` (either case);
    none for a host that ``NO_PROXY`` lists (``*``: every host; ``example.com``: it and its
    subdomains; ``.example.com``: its subdomains; an address or ``localhost``: itself; an
    entry with a scheme or a port: URLs with that one)."""

    def __init__(self, found: Mapping[str, str]) -> None:
        """``found``: what ``urllib.request.getproxies()`` returns."""
        no_proxy = [e.strip().lower() for e in found.get("no", "").split(",") if e.strip()]
        self._by_scheme: dict[str, _Proxy] = {}
        self._bypass = [_bypass(e) for e in no_proxy if e != "*"]
        if "*" in no_proxy:
            return
        for scheme in ("http", "https"):
            url = found.get(scheme) or found.get("all")
            if url:
                self._by_scheme[scheme] = _proxy(url)

    @classmethod
    def from_environment(cls) -> Proxies:
        return cls(urllib.request.getproxies())

    def __bool__(self) -> bool:
        return bool(self._by_scheme)

    def proxy_for(self, url: URL) -> _Proxy | None:
        """The proxy ``url`` goes through, or None: directly."""
        found = self._by_scheme.get(url.scheme)
        if found is None or any(rule.matches(url) for rule in self._bypass):
            return None
        return found


class _NonPublic(OSError):
    def __init__(self, host: str, address: str) -> None:
        super().__init__(non_public_refusal(host, address))


class _PublicOnlyResolver(aiohttp.abc.AbstractResolver):
    """aiohttp's default resolver, refusing a non-public answer while ``_public_only`` is set.
    Numeric hosts never reach a resolver (the download stage checks those itself); an answer
    aiohttp keeps in its DNS cache was checked when it was resolved, unless a request that was
    not ``PUBLIC_ONLY`` (the API's own, on the same host, or a proxy's) resolved it."""

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


def _as_httpx(exc: BaseException, request: httpx.Request | None) -> httpx.TransportError | None:
    """The httpx ``TransportError`` an aiohttp (or socket) error means; None for any other
    exception, which goes on as it is: a plain ``TimeoutError`` among them (aiohttp's
    ``total``, the whole exchange's ``SECONDS``, ran out)."""
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        if isinstance(exc.os_error, _NonPublic):
            return NonPublicAddressError(str(exc.os_error), request=request)
        return httpx.ConnectError(_cannot_connect(exc), request=request)
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return CertificateError(
            f"TLS certificate of {exc.host}:{exc.port} did not verify ({exc.certificate_error}); "
            "if the server is yours, point SSL_CERT_FILE or SSL_CERT_DIR at its CA",
            request=request,
        )
    if isinstance(exc, aiohttp.ClientConnectorSSLError):
        return httpx.ConnectError(f"TLS handshake failed ({exc})", request=request)
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return httpx.ConnectTimeout(str(exc) or "connect timed out", request=request)
    if isinstance(exc, aiohttp.ServerTimeoutError):
        return httpx.ReadTimeout(str(exc) or "read timed out", request=request)
    if isinstance(exc, TimeoutError):
        return None
    if isinstance(exc, aiohttp.ClientProxyConnectionError | aiohttp.ClientHttpProxyError):
        return httpx.ProxyError(str(exc), request=request)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return httpx.ConnectError(_cannot_connect(exc), request=request)
    if isinstance(exc, aiohttp.ClientPayloadError):
        # A body cut short: fewer bytes than Content-Length, or a broken chunked encoding.
        return httpx.ReadError(str(exc), request=request)
    if isinstance(
        exc, aiohttp.ServerDisconnectedError | aiohttp.ClientResponseError | HttpProcessingError
    ):
        return httpx.RemoteProtocolError(str(exc) or type(exc).__name__, request=request)
    if isinstance(exc, aiohttp.InvalidURL | aiohttp.NonHttpUrlClientError):
        return httpx.UnsupportedProtocol(str(exc), request=request)
    if isinstance(exc, aiohttp.ClientError | OSError):
        return httpx.NetworkError(str(exc) or type(exc).__name__, request=request)
    return None


def _client_timeout(
    timeout: Mapping[str, float | None], seconds: float | None
) -> aiohttp.ClientTimeout:
    """aiohttp's timeouts for httpx's, and for ``SECONDS``."""
    return aiohttp.ClientTimeout(
        total=seconds,
        connect=timeout.get("pool"),
        sock_connect=timeout.get("connect"),
        sock_read=timeout.get("read"),
    )


class _Body(httpx.AsyncByteStream):
    """A response body, streamed from aiohttp in whatever pieces arrived."""

    def __init__(self, response: aiohttp.ClientResponse, request: httpx.Request) -> None:
        self._response = response
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except Exception as exc:
            translated = _as_httpx(exc, self._request)
            if translated is None:
                raise
            raise translated from exc

    async def aclose(self) -> None:
        _give_back(self._response)


def _give_back(response: aiohttp.ClientResponse) -> None:
    """A fully read body gives the connection back to the pool; anything else closes it."""
    if response.content.at_eof():
        response.release()
    else:
        response.close()


class ImageAnswer:
    """An image's answer straight from aiohttp (no httpx models): its status, its headers
    (case-insensitive) and its body, iterated in the pieces that arrived. Errors are httpx's
    (``_as_httpx``); a ``TimeoutError`` is the attempt's ``seconds`` running out."""

    __slots__ = ("_content", "_response", "headers", "received", "status_code")

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self._content = response.content
        self.status_code = response.status
        self.headers: Mapping[str, str] = response.headers
        self.received = 0
        """Bytes of the body so far, as they came over the wire."""

    def __aiter__(self) -> ImageAnswer:
        return self

    async def __anext__(self) -> bytes:
        try:
            chunk = await self._content.readany()
        except Exception as exc:
            translated = _as_httpx(exc, None)
            if translated is None:
                raise
            raise translated from exc
        if not chunk:
            raise StopAsyncIteration
        self.received += len(chunk)
        return chunk

    async def aclose(self) -> None:
        _give_back(self._response)


class AiohttpTransport(httpx.AsyncBaseTransport):
    """An httpx transport whose connections are an aiohttp ``TCPConnector``'s (HTTP/1.1),
    each request direct or through the proxy ``proxies`` chooses for it."""

    def __init__(
        self,
        *,
        ssl_context: ssl.SSLContext,
        limits: httpx.Limits,
        proxies: Proxies | None = None,
    ) -> None:
        self._ssl = ssl_context
        self._limits = limits
        self._proxies = proxies or None
        self._session: aiohttp.ClientSession | None = None
        self._resolver: _PublicOnlyResolver | None = None

    def _open(self) -> aiohttp.ClientSession:
        # Created on first use: aiohttp binds the session to the running event loop.
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
            trust_env=False,  # the proxy of each request is chosen by ``Proxies``
        )
        return self._session

    async def _request(
        self,
        url: URL,
        headers: list[tuple[str, str]],
        *,
        method: str = "GET",
        data: bytes | None = None,
        public_only: bool,
        timeout: aiohttp.ClientTimeout,
    ) -> aiohttp.ClientResponse:
        """One request, direct or through its proxy; raises aiohttp's errors."""
        session = self._session or self._open()
        proxy = self._proxies.proxy_for(url) if self._proxies is not None else None
        tunnel = None
        if proxy is not None and proxy.authorization is not None:
            # To the proxy alone: on the CONNECT of a tunnel, or with a plain-http request.
            if url.scheme == "https":
                tunnel = {"Proxy-Authorization": proxy.authorization}
            else:
                headers.append(("Proxy-Authorization", proxy.authorization))
        # Through a proxy, only the proxy's own host is resolved here: never refused.
        token = _public_only.set(proxy is None and public_only)
        try:
            return await session.request(
                method,
                url,
                headers=headers,
                data=data,
                allow_redirects=False,
                proxy=proxy.url if proxy is not None else None,
                proxy_headers=tunnel,
                timeout=timeout,
            )
        finally:
            _public_only.reset(token)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        extensions = request.extensions
        try:
            response = await self._request(
                URL(str(request.url), encoded=True),
                request.headers.multi_items(),
                method=request.method,
                data=request.content or None,
                public_only=bool(extensions.get(PUBLIC_ONLY)),
                timeout=_client_timeout(extensions.get("timeout", {}), extensions.get(SECONDS)),
            )
        except Exception as exc:
            translated = _as_httpx(exc, request)
            if translated is None:
                raise
            raise translated from exc
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

    async def open_image(
        self,
        url: URL,
        headers: Mapping[str, str],
        *,
        public_only: bool,
        seconds: float,
        connect: float | None,
        read: float | None,
    ) -> ImageAnswer:
        """A GET of an image, its answer unread, without httpx's models: the body streams
        from aiohttp's connection straight to the caller. ``seconds`` bounds the whole of it,
        body included (then ``TimeoutError``)."""
        try:
            response = await self._request(
                url,
                list(headers.items()),
                public_only=public_only,
                timeout=aiohttp.ClientTimeout(total=seconds, sock_connect=connect, sock_read=read),
            )
        except Exception as exc:
            translated = _as_httpx(exc, None)
            if translated is None:
                raise
            raise translated from exc
        return ImageAnswer(response)

    async def aclose(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()
        if self._resolver is not None:  # a resolver handed to it, the connector leaves open
            resolver, self._resolver = self._resolver, None
            await resolver.close()


class Client(httpx.AsyncClient):
    """``httpx.AsyncClient`` over ``transport`` (httpx's own proxy handling off: the
    transport chooses each request's proxy), whose ``send`` goes straight to it.

    The harvester uses none of what ``AsyncClient.send`` wraps around the transport: no auth
    flows (the key is a plain header), no redirects followed by the client (``follow.get``
    follows them, checking each hop), no event hooks, no cookies. Anything that asks for them
    gets httpx's own ``send``.
    """

    def __init__(self, *, transport: httpx.AsyncBaseTransport, **options: Any) -> None:
        super().__init__(transport=transport, trust_env=False, **options)
        self._send_to = transport

    async def send(
        self,
        request: httpx.Request,
        *,
        stream: bool = False,
        auth: Any = httpx.USE_CLIENT_DEFAULT,
        follow_redirects: Any = httpx.USE_CLIENT_DEFAULT,
    ) -> httpx.Response:
        if follow_redirects is True or auth not in (httpx.USE_CLIENT_DEFAULT, None):
            return await super().send(
                request, stream=stream, auth=auth, follow_redirects=follow_redirects
            )
        if self.is_closed:
            raise RuntimeError("Cannot send a request, as the client has been closed.")
        response = await self._send_to.handle_async_request(request)
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

    async def open_image(
        self, url: URL, headers: Mapping[str, str], *, public_only: bool, seconds: float
    ) -> ImageAnswer | HttpxAnswer:
        """A GET of an image, its answer unread (``api.download``'s ``Answer``), within
        ``seconds`` body included. Over ``AiohttpTransport`` it never builds httpx's models;
        over any other transport (a test's ``MockTransport``) it is an httpx exchange, which
        bounds each read but not the whole."""
        timeout = self.timeout
        if isinstance(self._send_to, AiohttpTransport):
            return await self._send_to.open_image(
                url,
                headers,
                public_only=public_only,
                seconds=seconds,
                connect=timeout.connect,
                read=timeout.read,
            )
        extensions = {"timeout": timeout.as_dict(), PUBLIC_ONLY: public_only}
        request = httpx.Request("GET", str(url), headers=headers, extensions=extensions)
        return HttpxAnswer(await self.send(request, stream=True))


class HttpxAnswer:
    """An httpx response as an image's answer (``Client.open_image`` over other transports).
    A response read already (a mock transport's) is its decoded content, without its coding."""

    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self.status_code = response.status_code
        self.headers: Mapping[str, str] = response.headers
        if response.is_stream_consumed:
            self.headers = httpx.Headers(
                [(k, v) for k, v in response.headers.multi_items() if k != "content-encoding"]
            )

    @property
    def received(self) -> int:
        return self._response.num_bytes_downloaded

    def __aiter__(self) -> AsyncIterator[bytes]:
        if self._response.is_stream_consumed:
            return decoded_chunks(self._response)
        return self._response.aiter_raw()

    async def aclose(self) -> None:
        await self._response.aclose()


_ssl_contexts: dict[tuple[str | None, str | None], ssl.SSLContext] = {}


def _ssl_context() -> ssl.SSLContext:
    """httpx's TLS context (certifi, or ``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` from the
    environment), made once per process and setting: loading a CA bundle is not free."""
    key = (os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))
    if key not in _ssl_contexts:
        _ssl_contexts[key] = httpx.create_ssl_context(verify=True, trust_env=True)
    return _ssl_contexts[key]


def open_client(*, max_connections: int, connect_timeout: float, read_timeout: float) -> Client:
    """The client of a lane: no redirects followed, no pool timeout (slots bound the work);
    proxies from ``HTTP_PROXY`` / ``HTTPS_PROXY`` / ``ALL_PROXY`` / ``NO_PROXY``."""
    limits = httpx.Limits(
        max_connections=max_connections,
        max_keepalive_connections=max_connections,
        keepalive_expiry=KEEPALIVE_SECONDS,
    )
    proxies = Proxies.from_environment()
    return Client(
        transport=AiohttpTransport(ssl_context=_ssl_context(), limits=limits, proxies=proxies),
        timeout=httpx.Timeout(read_timeout, connect=connect_timeout, pool=None),
        follow_redirects=False,
        headers={"User-Agent": USER_AGENT},
    )


__all__ = [
    "KEEPALIVE_SECONDS",
    "USER_AGENT",
    "AiohttpTransport",
    "CertificateError",
    "Client",
    "Proxies",
    "open_client",
]

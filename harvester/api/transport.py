"""The run's HTTP client: httpx's ``AsyncClient`` over harvester's own HTTP/1.1 transport.

The code is written against ``httpx.AsyncClient``; only the transport underneath is not
httpx's (``harvester/http1.py`` says why, README "Performance" has the measurements). Redirects
are never followed by the transport (httpx, or the caller, decides), bodies are never decoded
there (httpx does that) and no cookies are kept.
"""

from __future__ import annotations

import logging
from typing import Any, Final

import httpx

from harvester.api.http1 import Http1Transport

USER_AGENT: Final = "harvester"
_httpx_log: Final = logging.getLogger("httpx")
KEEPALIVE_SECONDS: Final = 30.0
"""Idle connections are closed after this long (servers close theirs after 60-75 s, CDNs
sooner; a request on a connection the server just closed is sent once more, anew)."""


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
        transport=Http1Transport(
            max_connections=max_connections, keepalive_seconds=KEEPALIVE_SECONDS
        ),
        timeout=httpx.Timeout(read_timeout, connect=connect_timeout, pool=None),
        follow_redirects=False,
        headers={"User-Agent": USER_AGENT},
    )

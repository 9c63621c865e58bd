"""One GET with its redirects followed hop by hop, for the result fetch and the image download.

One limit (``MAX_REDIRECTS``), one rule for where a redirect may lead (``urls.redirect_target``:
only http(s), never from https down to http) and one rule for the key: the Authorization
header goes only to the API's own origin (or its https upgrade), never to another origin a
redirect leads to, and never with an image. A 3xx that is not a redirect (a ``304`` from a
caching proxy, a ``300``) or a redirect without a Location is an answer that cannot be used:
``Unfollowed`` with its status.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Final, Protocol, TypeVar

import httpx
from yarl import URL

from harvester.api.urls import redirect_target, same_origin

MAX_REDIRECTS: Final = 5
"""Redirects followed per request, for results and images alike."""
REDIRECTS: Final = frozenset({301, 302, 303, 307, 308})
"""The statuses followed, as browsers and httpx follow them; any other 3xx is ``Unfollowed``."""


class Unfollowed(Exception):
    """The GET ended at a redirect that is not followed; ``str()`` is the reason for the row,
    ``status`` the HTTP status that ended it (None for a hop refused before it was sent)."""

    def __init__(self, reason: str, status: int | None) -> None:
        super().__init__(reason)
        self.status = status


@dataclass(frozen=True, slots=True)
class Key:
    """The headers that carry the key, and the origin they may be sent to."""

    origin: URL
    headers: Mapping[str, str] = field(repr=False)

    def admits(self, url: URL) -> bool:
        """``url`` is the origin's, or the origin's host over https on the default ports."""
        if same_origin(url, self.origin):
            return True
        base = self.origin
        return (
            base.scheme == "http"
            and url.scheme == "https"
            and base.host == url.host
            and base.port == 80
            and url.port == 443
        )


Check = Callable[[URL], Awaitable[str | None]]
"""Why a hop is not sent (the reason for the row), or None to send it."""


class Answer(Protocol):
    """What a hop answered, its body unread: an ``httpx.Response`` (results) or an image's
    answer straight from the transport."""

    @property
    def status_code(self) -> int: ...

    @property
    def headers(self) -> Mapping[str, str]:
        """Case-insensitive."""

    async def aclose(self) -> None: ...


A = TypeVar("A", bound=Answer)
Send = Callable[[URL, Mapping[str, str]], Awaitable[A]]
"""Sends one GET of the URL with the headers, unfollowed, its answer streamed."""


def plain_headers(defaults: httpx.Headers) -> dict[str, str]:
    """The User-Agent of a client's ``defaults``, for requests built without
    ``client.build_request``; none of its other default headers (an Authorization among them)
    is ever copied."""
    agent = defaults.get("user-agent")
    return {"User-Agent": agent} if agent else {}


def request_error_reason(exc: httpx.RequestError) -> str:
    """A short, secret-free description of a failed exchange (httpx never puts headers in
    its messages)."""
    if isinstance(exc, httpx.TimeoutException):
        kind = "timed out"
    elif isinstance(exc, httpx.DecodingError):
        kind = "body cannot be decoded"
    else:
        kind = "connection failed"
    detail = str(exc).strip()
    return f"{kind} ({type(exc).__name__}{': ' + detail if detail else ''})"


async def get(
    send: Send[A],
    url: URL,
    *,
    headers: Mapping[str, str],
    what: str,
    key: Key | None = None,
    check: Check | None = None,
) -> A:
    """The first answer to a GET of ``url`` that is not a redirect, streamed: the caller reads
    and closes it. Each hop is sent with ``headers`` (``key.headers`` where ``key`` admits
    it), after ``check`` lets it. Raises ``Unfollowed``, and whatever ``send`` raises."""
    current = url
    for _ in range(MAX_REDIRECTS + 1):
        if check is not None:
            refusal = await check(current)
            if refusal is not None:
                raise Unfollowed(refusal, None)
        sent = key.headers if key is not None and key.admits(current) else headers
        response = await send(current, sent)
        status = response.status_code
        if status not in REDIRECTS:
            if 300 <= status < 400:
                await response.aclose()
                raise Unfollowed(f"{what} answered HTTP {status}, not a redirect to follow", status)
            return response
        location = (response.headers.get("location") or "").strip()
        await response.aclose()
        if not location:
            raise Unfollowed(f"{what} answered HTTP {status} without a Location to follow", status)
        target = redirect_target(current, location, what=what)
        if isinstance(target, str):
            raise Unfollowed(target, status)
        current = target
    raise Unfollowed(f"{what} redirected more than {MAX_REDIRECTS} times", None)

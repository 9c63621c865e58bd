"""Download stage: stream each image over HTTP (or decode a ``data:`` URL) into a ``Sink``.

The caller hands the stage a factory of sinks (storage's content-addressed store implements
the protocol), so the stage never knows where the bytes end up. Redirects are followed hop by
hop (``follow.get``); transient failures are retried under the run's policy; the body is
decoded in bounded pieces and counted against ``--max-image-bytes`` while it arrives. No
Authorization header is ever sent here: image hosts are third-party CDNs.

Image hosts are third parties too: an image URL (or a redirect) that resolves to a loopback,
link-local, private or otherwise non-public address is refused (a relay must not make the
harvester fetch from the machine's own network), unless the API itself is on such an
address (a relay inside one's network, or the sandbox) or ``--allow-private-images`` says so.
The check resolves the host before each hop (for its message, and for a host named by its
address); the transport checks again the answer the connection really uses (a DNS answer that
changes in between is refused too). Through a proxy, the proxy resolves the host: only the
check here applies.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import random
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar
from urllib.parse import unquote_to_bytes

import anyio
import httpx
from yarl import URL

from harvester.api import follow
from harvester.api.body import CertificateError, NonPublicAddressError, decoded
from harvester.api.follow import Unfollowed, plain_headers, request_error_reason
from harvester.api.retry import (
    RETRYABLE_STATUS,
    RetriesExhausted,
    RetryPolicy,
    TransientError,
    attempt_seconds,
    retrying,
)
from harvester.api.urls import FOLLOWED_SCHEMES, http_url, is_public, non_public_refusal
from harvester.statuses import ERROR, FAILED

Stored = TypeVar("Stored", covariant=True)


class Sink(Protocol[Stored]):
    """Where one image's bytes go while they arrive (storage implements it). The stage calls
    ``write`` for each piece, then ``commit`` once, or ``discard`` (after a refusal or an
    error, any number of times)."""

    @property
    def size(self) -> int:
        """Bytes written so far."""

    def write(self, chunk: bytes) -> str | None:
        """Take the next bytes; the reason to stop (they are no image), or None."""

    async def commit(self, http_status: int | None, attempts: int) -> Stored | str:
        """Keep the complete bytes: what was stored, or the reason they are not kept (then
        they are dropped)."""

    def discard(self) -> None:
        """Drop the bytes; never raises."""


class Answer(Protocol):
    """An image's answer, its body unread (``transport.Client.open_image``)."""

    @property
    def status_code(self) -> int: ...

    @property
    def headers(self) -> Mapping[str, str]:
        """Case-insensitive."""

    @property
    def received(self) -> int:
        """Bytes of the body so far, as they came over the wire."""

    def __aiter__(self) -> AsyncIterator[bytes]:
        """The body's pieces as they arrive; httpx's errors."""

    async def aclose(self) -> None: ...


class ImageClient(Protocol):
    """The lane's HTTP client (``transport.Client``), as the download stage uses it."""

    @property
    def timeout(self) -> httpx.Timeout: ...

    @property
    def headers(self) -> httpx.Headers: ...

    async def open_image(
        self, url: URL, headers: Mapping[str, str], *, public_only: bool, seconds: float
    ) -> Answer:
        """One GET of ``url``, unfollowed, whole within ``seconds`` (else ``TimeoutError``);
        raises httpx's ``RequestError``s."""


@dataclass(frozen=True, slots=True)
class ImageFailure:
    """An image that was not stored: its row's status and error."""

    status: str
    error: str
    http_status: int | None
    attempts: int


def too_large(limit: int) -> str:
    return f"image is larger than the {limit:,}-byte limit (--max-image-bytes)"


Resolve = Callable[[str, int], Awaitable[list[str]]]
"""Host and port -> the addresses a connection would use."""


async def resolve_host(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


class ImageDownloader(Generic[Stored]):
    """Stores images from http(s) and ``data:`` URLs into sinks from ``sinks``; one instance
    per lane."""

    def __init__(
        self,
        client: ImageClient,
        sinks: Callable[[], Sink[Stored]],
        *,
        policy: RetryPolicy,
        rng: random.Random,
        max_bytes: int = 64 * 1024 * 1024,
        total_seconds: float | None = None,
        refuse_private: bool = False,
        api_url: str | None = None,
        resolve: Resolve = resolve_host,
    ) -> None:
        self._client = client
        self._refuse_private = refuse_private
        """True: non-public image addresses are refused (unless the API's own is one)."""
        self._api_url = api_url
        self._api_checked = anyio.Lock()
        self._resolve = resolve
        self._resolved: dict[tuple[str, int], tuple[float, list[str]]] = {}
        self._total = total_seconds or attempt_seconds(client.timeout.read)
        """The most one attempt's exchange may take, redirects and the whole body included
        (storing the bytes after it is the store's to bound)."""
        self._sinks = sinks
        self._policy = policy
        self._rng = rng
        self._max_bytes = max_bytes
        self._headers = plain_headers(client.headers)
        self.retries = 0

    async def store(self, url: str) -> Stored | ImageFailure:
        """The image at ``url`` in a committed sink, or why not. Raises what a sink raises
        (``OutputError``)."""
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme == "data":
            return await self._store_data_uri(url)
        if scheme not in FOLLOWED_SCHEMES:
            return ImageFailure(
                FAILED,
                f"unsupported image URL scheme {scheme or '(none)'!r}: "
                "only http, https and data URLs are followed",
                None,
                0,
            )

        def count_retry(_: TransientError) -> None:
            self.retries += 1

        try:
            return await retrying(
                self._policy,
                lambda n: self._bounded(url, n),
                rng=self._rng,
                on_retry=count_retry,
            )
        except RetriesExhausted as exc:
            return ImageFailure(ERROR, f"image download: {exc}", exc.last.http_status, exc.attempts)

    async def _store_data_uri(self, url: str) -> Stored | ImageFailure:
        header, sep, payload = url.partition(",")
        media_type = header[5:].split(";", 1)[0]
        if not sep:
            return ImageFailure(FAILED, "malformed data: URI (no comma)", None, 1)
        if len(payload) * 3 // 4 > self._max_bytes:
            return ImageFailure(FAILED, too_large(self._max_bytes), None, 1)
        try:
            if header.lower().endswith(";base64"):
                data = base64.b64decode(payload, validate=False)
            else:
                data = unquote_to_bytes(payload)
        except (binascii.Error, ValueError) as exc:
            return ImageFailure(
                FAILED,
                f"data:{media_type or 'text/plain'} URI is not valid base64 ({exc})",
                None,
                1,
            )
        if len(data) > self._max_bytes:
            return ImageFailure(FAILED, too_large(self._max_bytes), None, 1)
        sink = self._sinks()
        try:
            refused = sink.write(data)
            stored = await sink.commit(None, 1) if refused is None else refused
        except BaseException:
            sink.discard()
            raise
        if isinstance(stored, str):
            sink.discard()
            return ImageFailure(FAILED, stored, None, 1)
        return stored

    async def _bounded(self, url: str, attempt: int) -> Stored | ImageFailure:
        try:
            return await self._download(url, attempt, time.monotonic() + self._total)
        except TimeoutError as exc:
            raise TransientError(
                f"image download timed out (not whole within {self._total:g} s)"
            ) from exc

    async def _download(self, url: str, attempt: int, deadline: float) -> Stored | ImageFailure:
        """One attempt, which ends by ``deadline`` (redirects and the whole body included;
        else ``TimeoutError``)."""
        start = http_url(url)
        if isinstance(start, str):
            return ImageFailure(FAILED, start, None, attempt)
        if self._refuse_private and self._api_url is not None:
            await self._check_api()
        refuse = self._refuse_private
        client = self._client

        async def send(hop: URL, headers: Mapping[str, str]) -> Answer:
            seconds = deadline - time.monotonic()
            if seconds <= 0:
                raise TimeoutError
            return await client.open_image(hop, headers, public_only=refuse, seconds=seconds)

        try:
            response = await follow.get(
                send,
                start,
                # Never an Authorization header, whatever the client's defaults: image hosts
                # are third parties.
                headers=self._headers,
                what="image URL",
                check=(lambda hop: self._refusal(hop, deadline)) if refuse else None,
            )
        except Unfollowed as exc:
            return ImageFailure(FAILED, str(exc), exc.status, attempt)
        except CertificateError as exc:
            # Final: another attempt meets the same certificate.
            return ImageFailure(ERROR, f"image download: {exc}", None, attempt)
        except NonPublicAddressError as exc:
            return ImageFailure(FAILED, str(exc), None, attempt)
        except httpx.RequestError as exc:
            raise TransientError(f"image download {request_error_reason(exc)}") from exc
        try:
            status = response.status_code
            if status in (404, 410):
                return ImageFailure(
                    FAILED,
                    f"image URL answered HTTP {status}: the media has expired or was deleted",
                    status,
                    attempt,
                )
            if status in RETRYABLE_STATUS or status >= 500:
                raise TransientError(f"image download: HTTP {status}", http_status=status)
            if status != 200:
                return ImageFailure(FAILED, f"image URL answered HTTP {status}", status, attempt)
            return await self._receive(response, attempt)
        finally:
            await response.aclose()

    async def _check_api(self) -> None:
        """Once: an API on a non-public address (the user's choice) lets its images be on one
        too. Downloads that start meanwhile wait for the answer."""
        async with self._api_checked:
            if self._api_url is not None:
                local = not await self._all_public(URL(self._api_url))
                self._api_url = None
                if local:
                    self._refuse_private = False

    async def _refusal(self, url: URL, deadline: float) -> str | None:
        """Why ``url`` is not fetched (its host resolves to a non-public address), or None;
        ``TimeoutError`` if resolving its host does not end by ``deadline``."""
        try:
            addresses = await self._addresses(url, deadline)
        except OSError:
            return None  # the connection fails the same way and says why
        private = [a for a in addresses if not is_public(a)]
        if not private:
            return None
        return non_public_refusal(url.host or "", private[0])

    async def _addresses(self, url: URL, deadline: float | None = None) -> list[str]:
        """The host's addresses, remembered for a minute (a CDN serves many images); looked up
        by ``deadline`` if one is given (else ``TimeoutError``)."""
        host, port = url.raw_host or "", url.port or (443 if url.scheme == "https" else 80)
        now = time.monotonic()
        known = self._resolved.get((host, port))
        if known is not None and known[0] > now:
            return known[1]
        if deadline is None:
            addresses = await self._resolve(host, port)
        else:
            with anyio.fail_after(max(0.0, deadline - now)):
                addresses = await self._resolve(host, port)
        if len(self._resolved) >= 1024:
            self._resolved.clear()
        self._resolved[(host, port)] = (now + 60.0, addresses)
        return addresses

    async def _all_public(self, url: URL) -> bool:
        try:
            addresses = await self._addresses(url)
        except OSError:
            return True  # unresolvable here: nothing says it is local
        return all(is_public(a) for a in addresses)

    async def _receive(self, response: Answer, attempt: int) -> Stored | ImageFailure:
        status = response.status_code
        declared = response.headers.get("content-length")
        expected = int(declared) if declared and declared.isdigit() else None
        limit = self._max_bytes
        if expected is not None and expected > limit:
            return ImageFailure(FAILED, too_large(limit), status, attempt)
        sink = self._sinks()
        coding = response.headers.get("content-encoding")
        encoded = coding is not None and coding.strip().lower() not in ("", "identity")
        try:
            # Decoded in bounded pieces: the limit holds for decoded bytes, whatever the ratio.
            async for chunk in decoded(aiter(response), coding) if encoded else response:
                refused = too_large(limit) if sink.size + len(chunk) > limit else sink.write(chunk)
                if refused is not None:
                    sink.discard()
                    return ImageFailure(FAILED, refused, status, attempt)
            # Content-Length counts bytes on the wire; without a content-encoding, our size.
            received = response.received if encoded else sink.size
            if expected is not None and received != expected:
                raise TransientError(
                    f"image body cut short: {received} of {expected} bytes", http_status=status
                )
            stored = await sink.commit(status, attempt)
        except httpx.DecodingError as exc:
            sink.discard()
            raise TransientError(
                f"image body cannot be decoded ({exc})", http_status=status
            ) from exc
        except httpx.TransportError as exc:
            sink.discard()
            raise TransientError(
                f"image body cut short ({type(exc).__name__})", http_status=status
            ) from exc
        except BaseException:
            sink.discard()
            raise
        if isinstance(stored, str):
            return ImageFailure(FAILED, stored, status, attempt)
        return stored

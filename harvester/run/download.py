"""Download stage: stream each image over HTTP into the content-addressed store.

Redirects are followed hop by hop (at most ``max_redirects``, only to http(s), never from
https down to http); transient failures are retried under the run's policy; the body is
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
import random
import socket
import time
from collections.abc import Awaitable, Callable

import anyio
import httpx

from harvester.api.body import PUBLIC_ONLY, CertificateError, NonPublicAddressError, decoded_chunks
from harvester.api.fetcher import plain_headers, request_error_reason
from harvester.api.retry import (
    RETRYABLE_STATUS,
    RetriesExhausted,
    RetryPolicy,
    TransientError,
    attempt_seconds,
    retrying,
)
from harvester.api.urls import (
    FOLLOWED_SCHEMES,
    http_url,
    is_public,
    non_public_refusal,
    redirect_target,
)
from harvester.storage.objects import Store
from harvester.storage.rows import ERROR, FAILED
from harvester.storage.store import (
    SNIFF_BYTES,
    ContentStore,
    ImageFailure,
    StoredImage,
    TooLarge,
    sniff,
)

Resolve = Callable[[str, int], Awaitable[list[str]]]
"""Host and port -> the addresses a connection would use."""


async def resolve_host(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


class ImageDownloader:
    """Stores images from http(s) and ``data:`` URLs; one instance per run."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        store: Store,
        *,
        policy: RetryPolicy,
        rng: random.Random,
        max_bytes: int = 64 * 1024 * 1024,
        max_redirects: int = 5,
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
        """The most one attempt may take, redirects and the whole body included."""
        self._store = ContentStore(store, max_bytes=max_bytes)
        self._policy = policy
        self._rng = rng
        self._max_bytes = max_bytes
        self._max_redirects = max_redirects
        self._headers = plain_headers(client)
        self._extensions = {"timeout": client.timeout.as_dict()}
        self._public_only = {**self._extensions, PUBLIC_ONLY: True}
        self.retries = 0

    async def store(self, url: str) -> StoredImage | ImageFailure:
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme == "data":
            return await self._store.store_data_uri(url)
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
            outcome, _ = await retrying(
                self._policy,
                lambda n: self._bounded(url, n),
                rng=self._rng,
                on_retry=count_retry,
            )
        except RetriesExhausted as exc:
            return ImageFailure(ERROR, f"image download: {exc}", exc.last.http_status, exc.attempts)
        return outcome

    async def _bounded(self, url: str, attempt: int) -> StoredImage | ImageFailure:
        try:
            with anyio.fail_after(self._total):
                return await self._download(url, attempt)
        except TimeoutError as exc:
            raise TransientError(
                f"image download timed out (not whole within {self._total:g} s)"
            ) from exc

    async def _download(self, url: str, attempt: int) -> StoredImage | ImageFailure:
        current = http_url(url)
        for _ in range(self._max_redirects + 1):
            if isinstance(current, str):
                return ImageFailure(FAILED, current, None, attempt)
            refusal = await self._refusal(current)
            if refusal is not None:
                return ImageFailure(FAILED, refusal, None, attempt)
            # Never an Authorization header, whatever the client's defaults: image hosts are
            # third parties. (Built here rather than by build_request, which copies defaults.)
            extensions = self._public_only if self._refuse_private else self._extensions
            request = httpx.Request("GET", current, headers=self._headers, extensions=extensions)
            try:
                response = await self._client.send(request, stream=True, follow_redirects=False)
            except CertificateError as exc:
                # Final: another attempt meets the same certificate.
                return ImageFailure(ERROR, f"image download: {exc}", None, attempt)
            except NonPublicAddressError as exc:
                return ImageFailure(FAILED, str(exc), None, attempt)
            except (httpx.InvalidURL, httpx.RemoteProtocolError) as exc:
                # httpx parses a redirect's Location even when not following it.
                if isinstance(exc, httpx.InvalidURL) or "location header" in str(exc):
                    return ImageFailure(
                        FAILED,
                        f"image URL redirects to a URL that cannot be followed ({exc})",
                        None,
                        attempt,
                    )
                raise TransientError(f"image download {request_error_reason(exc)}") from exc
            except httpx.RequestError as exc:
                raise TransientError(f"image download {request_error_reason(exc)}") from exc
            try:
                status = response.status_code
                if response.is_redirect:
                    target = redirect_target(current, response.headers["location"])
                    if isinstance(target, str):
                        return ImageFailure(FAILED, target, status, attempt)
                    current = target
                    continue
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
                    return ImageFailure(
                        FAILED, f"image URL answered HTTP {status}", status, attempt
                    )
                return await self._receive(response, attempt)
            finally:
                await response.aclose()
        return ImageFailure(
            FAILED, f"image URL redirected more than {self._max_redirects} times", None, attempt
        )

    async def _refusal(self, url: httpx.URL) -> str | None:
        """Why ``url`` is not fetched (its host resolves to a non-public address), or None."""
        if not self._refuse_private:
            return None
        if self._api_url is not None:
            async with self._api_checked:  # once; downloads that start meanwhile wait for it
                if self._api_url is not None:
                    local = not await self._all_public(httpx.URL(self._api_url))
                    self._api_url = None
                    if local:
                        # The API is local by the user's choice: its images are local too.
                        self._refuse_private = False
            if not self._refuse_private:
                return None
        try:
            addresses = await self._addresses(url)
        except OSError:
            return None  # the connection fails the same way and says why
        private = [a for a in addresses if not is_public(a)]
        if not private:
            return None
        return non_public_refusal(url.host, private[0])

    async def _addresses(self, url: httpx.URL) -> list[str]:
        """The host's addresses, remembered for a minute (a CDN serves many images)."""
        port = url.port or (443 if url.scheme == "https" else 80)
        now = time.monotonic()
        known = self._resolved.get((url.host, port))
        if known is not None and known[0] > now:
            return known[1]
        addresses = await self._resolve(url.host, port)
        if len(self._resolved) >= 1024:
            self._resolved.clear()
        self._resolved[(url.host, port)] = (now + 60.0, addresses)
        return addresses

    async def _all_public(self, url: httpx.URL) -> bool:
        try:
            addresses = await self._addresses(url)
        except OSError:
            return True  # unresolvable here: nothing says it is local
        return all(is_public(a) for a in addresses)

    async def _receive(self, response: httpx.Response, attempt: int) -> StoredImage | ImageFailure:
        status = response.status_code
        declared = response.headers.get("content-length")
        expected = int(declared) if declared and declared.isdigit() else None
        if expected is not None and expected > self._max_bytes:
            return ImageFailure(FAILED, str(TooLarge(self._max_bytes)), status, attempt)
        sink = self._store.sink()
        sniffed = False
        encoded = response.headers.get("content-encoding", "identity").lower() != "identity"
        try:
            # Decoded in bounded pieces: the limit holds for decoded bytes, whatever the ratio.
            async for chunk in decoded_chunks(response):
                sink.write(chunk)
                if not sniffed and len(sink.head) >= SNIFF_BYTES:
                    sniffed = True
                    if sniff(sink.head) is None:  # don't download 64 MiB of HTML
                        sink.discard()
                        return self._store.not_an_image(sink.head, status, attempt)
        except TooLarge as exc:
            sink.discard()
            return ImageFailure(FAILED, str(exc), status, attempt)
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
        # Content-Length counts bytes on the wire; without a content-encoding that is our size.
        received = response.num_bytes_downloaded if encoded else sink.size
        if expected is not None and received != expected:
            sink.discard()
            raise TransientError(
                f"image body cut short: {received} of {expected} bytes", http_status=status
            )
        ext = sniff(sink.head)
        if ext is None:
            sink.discard()
            return self._store.not_an_image(sink.head, status, attempt)
        return await self._store.commit(sink, ext, status, attempt)

"""Download stage: stream each image over HTTP into the content-addressed store.

Redirects are followed hop by hop (at most ``max_redirects``, only to http(s), never from
https down to http); transient failures are retried under the run's policy; the body is
decoded in bounded pieces and counted against ``--max-image-bytes`` while it arrives. No
Authorization header is ever sent here: image hosts are third-party CDNs.
"""

from __future__ import annotations

import random

import anyio
import httpx

from harvester.api.fetcher import plain_headers, request_error_reason
from harvester.api.retry import (
    RETRYABLE_STATUS,
    RetriesExhausted,
    RetryPolicy,
    TransientError,
    attempt_seconds,
    retrying,
)
from harvester.api.transport import CertificateError, decoded_chunks
from harvester.api.urls import FOLLOWED_SCHEMES, http_url, redirect_target
from harvester.storage.layout import Layout
from harvester.storage.rows import ERROR, FAILED
from harvester.storage.store import (
    SNIFF_BYTES,
    ContentStore,
    ImageFailure,
    StoredImage,
    TooLarge,
    sniff,
)


class ImageDownloader:
    """Stores images from http(s) and ``data:`` URLs; one instance per run."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        layout: Layout,
        *,
        policy: RetryPolicy,
        rng: random.Random,
        max_bytes: int = 64 * 1024 * 1024,
        max_redirects: int = 5,
        total_seconds: float | None = None,
    ) -> None:
        self._client = client
        self._total = total_seconds or attempt_seconds(client.timeout.read)
        """The most one attempt may take, redirects and the whole body included."""
        self._store = ContentStore(layout, max_bytes=max_bytes)
        self._policy = policy
        self._rng = rng
        self._max_bytes = max_bytes
        self._max_redirects = max_redirects
        self._headers = plain_headers(client)
        self._extensions = {"timeout": client.timeout.as_dict()}
        self.retries = 0

    async def store(self, url: str) -> StoredImage | ImageFailure:
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme == "data":
            return self._store.store_data_uri(url)
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
            # Never an Authorization header, whatever the client's defaults: image hosts are
            # third parties. (Built here rather than by build_request, which copies defaults.)
            request = httpx.Request(
                "GET", current, headers=self._headers, extensions=self._extensions
            )
            try:
                response = await self._client.send(request, stream=True, follow_redirects=False)
            except CertificateError as exc:
                # Final: another attempt meets the same certificate.
                return ImageFailure(ERROR, f"image download: {exc}", None, attempt)
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
        return self._store.commit(sink, ext, status, attempt)

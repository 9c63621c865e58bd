"""Download stage: stream each image into the content-addressed store.

Bytes are hashed as they arrive and kept in memory (past 1 MiB they spill to a temp file);
a complete body goes to an unnamed (or temp) file inside the output folder, which is linked
(or renamed) atomically to ``images/<aa>/<sha256>.<ext>``; the extension comes from the
bytes' magic number, never from the URL or the Content-Type. Identical bytes are stored once;
a file of the wrong size under an image's name (torn by a power loss) is replaced. No
Authorization header is ever sent here: image hosts are third-party CDNs.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import itertools
import os
import random
from dataclasses import dataclass
from typing import BinaryIO, Final
from urllib.parse import unquote_to_bytes

import httpx

from harvester.api.fetcher import plain_headers, request_error_reason
from harvester.api.retry import (
    RETRYABLE_STATUS,
    RetriesExhausted,
    RetryPolicy,
    TransientError,
    retrying,
)
from harvester.api.urls import describe_url
from harvester.errors import OutputError
from harvester.storage.files import persist_new
from harvester.storage.imageinfo import HEADER_BYTES, ImageInfo, read_info
from harvester.storage.layout import Layout
from harvester.storage.rows import ERROR, FAILED

FOLLOWED_SCHEMES: Final = frozenset({"http", "https"})
SNIFF_BYTES: Final = 32
SPILL_BYTES: Final = 1 << 20
"""Image bodies up to this size are kept in memory until they are complete."""

_MAGIC: Final = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpg"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"BM", "bmp"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
)
_FTYP: Final = {
    b"avif": "avif",
    b"avis": "avif",
    b"heic": "heic",
    b"heix": "heic",
    b"mif1": "heic",
    b"msf1": "heic",
}


def sniff(head: bytes) -> str | None:
    """The file extension for an image's first bytes, or None if they are not an image we know."""
    for magic, ext in _MAGIC:
        if head.startswith(magic):
            return ext
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[4:8] == b"ftyp":
        return _FTYP.get(head[8:12])
    return None


@dataclass(frozen=True, slots=True)
class StoredImage:
    sha256: str
    path: str
    """Relative to the output folder."""
    bytes: int
    new: bool
    """True if this download put the file in the store; False if identical bytes were there."""
    http_status: int | None
    attempts: int
    info: ImageInfo | None = None
    """The format, width and height its header states (None if not read)."""


@dataclass(frozen=True, slots=True)
class ImageFailure:
    status: str
    error: str
    http_status: int | None
    attempts: int


_names = itertools.count()
"""Temp file names: this process's id and a counter are unique in DIR/.tmp, which every run
empties before it starts (under the folder's lock)."""


class _Sink:
    """Hashes what is written to it and enforces the size limit. A body up to ``spill_bytes``
    stays in memory until it is complete, so a body that turns out cut short, too large or not
    an image never creates a file, and a good one is written with one call; a larger body
    spills to a temp file as it arrives."""

    def __init__(
        self, layout: Layout, tmp: str, max_bytes: int, spill_bytes: int = SPILL_BYTES
    ) -> None:
        self._layout = layout
        self._dir = tmp
        self.path = f"{tmp}/{os.getpid()}-{next(_names)}.part"
        self._max = max_bytes
        self._spill = spill_bytes
        self._hash = hashlib.sha256()
        self._chunks: list[bytes] = []
        self._fh: BinaryIO | None = None
        self._written = False
        """True once the temp file may exist."""
        self.size = 0
        self.head = b""

    def _open(self) -> BinaryIO:
        self._written = True
        try:
            # An explicit buffer size spares the isatty() probe of every new file.
            return open(self.path, "wb", buffering=1 << 16)
        except OSError as exc:
            raise OutputError(f"cannot write to {self._layout.tmp}: {exc.strerror or exc}") from exc

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self._max:
            raise _TooLarge(self._max)
        if len(self.head) < HEADER_BYTES:
            self.head += chunk[: HEADER_BYTES - len(self.head)]
        self._hash.update(chunk)
        if self._fh is None:
            self._chunks.append(chunk)
            if self.size <= self._spill:
                return
            self._fh = self._open()
            chunks, self._chunks = self._chunks, []
        else:
            chunks = [chunk]
        try:
            self._fh.writelines(chunks)
        except OSError as exc:
            raise OutputError(f"cannot write image data: {exc.strerror or exc}") from exc

    def hexdigest(self) -> str:
        return self._hash.hexdigest()

    def persist(self, final: str, folders: set[str]) -> bool:
        """Move the bytes to ``final`` atomically (the file appears complete or not at all);
        False, and nothing written, if ``final`` exists already. ``folders`` remembers the
        shard folders made.

        A file at ``final`` of another size than these bytes is not the image: images are
        not fsynced, so a power loss can leave one short under its name. It is replaced, and
        this counts as new."""
        folder = os.path.dirname(final)
        if folder not in folders:
            try:
                os.makedirs(folder, exist_ok=True)
            except OSError:
                self.discard()
                raise
            folders.add(folder)
        source: bytes | str
        if self._fh is None:
            source, self._chunks = b"".join(self._chunks), []
        else:
            self._fh.close()
            source = self.path
        try:
            return persist_new(final, source, tmp_dir=self._dir)
        except OSError:
            self.discard()
            raise

    def discard(self) -> None:
        """Drop the bytes and remove the temp file; never raises (it runs while handling an
        error). A full disk can fail the close's flush, and an unlink can fail too: what is
        left is in DIR/.tmp, which the next run empties."""
        self._chunks = []
        if self._fh is not None:
            with contextlib.suppress(OSError):
                self._fh.close()
        if self._written:
            with contextlib.suppress(OSError):
                os.unlink(self.path)


class _TooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"image is larger than the {limit:,}-byte limit (--max-image-bytes)")


def _http_url(text: str | httpx.URL) -> httpx.URL | str:
    """``text`` as an http(s) URL with a host, or the reason it is not one."""
    try:
        url = httpx.URL(text)
        host = url.host  # decoding an IDNA host can fail too
    except (httpx.InvalidURL, ValueError) as exc:  # IDNA errors are ValueErrors
        return f"image URL is malformed ({exc})"
    if url.scheme not in FOLLOWED_SCHEMES:
        return f"unsupported image URL scheme {url.scheme or '(none)'!r}"
    if not host:
        return "image URL has no host"
    return url


def _redirect_target(current: httpx.URL, location: str) -> httpx.URL | str:
    """Where a redirect leads, or why it is not followed: only to http(s), never from https
    down to plain http, and never to a malformed URL."""
    try:
        target = current.join(location)
    except (httpx.InvalidURL, ValueError) as exc:
        return f"image URL redirects to a malformed URL ({exc})"
    if target.scheme not in FOLLOWED_SCHEMES:
        return f"image URL redirects to an unsupported scheme {target.scheme!r}"
    if current.scheme == "https" and target.scheme == "http":
        return "image URL redirects from https to plain http; not followed"
    return _http_url(target)


class ImageStore:
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
    ) -> None:
        self._client = client
        self._layout = layout
        self._policy = policy
        self._rng = rng
        self._max_bytes = max_bytes
        self._max_redirects = max_redirects
        self._folders: set[str] = set()
        self._tmp = str(layout.tmp)
        self._headers = plain_headers(client)
        self._extensions = {"timeout": client.timeout.as_dict()}
        self.retries = 0

    async def store(self, url: str) -> StoredImage | ImageFailure:
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme == "data":
            return self._store_data_uri(url)
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
                lambda n: self._download(url, n),
                rng=self._rng,
                on_retry=count_retry,
            )
        except RetriesExhausted as exc:
            return ImageFailure(ERROR, f"image download: {exc}", exc.last.http_status, exc.attempts)
        return outcome

    async def _download(self, url: str, attempt: int) -> StoredImage | ImageFailure:
        current = _http_url(url)
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
                    target = _redirect_target(current, response.headers["location"])
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
            return ImageFailure(FAILED, str(_TooLarge(self._max_bytes)), status, attempt)
        sink = _Sink(self._layout, self._tmp, self._max_bytes)
        sniffed = False
        encoded = response.headers.get("content-encoding", "identity").lower() != "identity"
        # Without a content-encoding the raw bytes are the body: skip httpx's decoder chain
        # (unless the body was read already, as a mock transport's is).
        raw = not encoded and not response.is_stream_consumed
        chunks = response.aiter_raw() if raw else response.aiter_bytes()
        try:
            async for chunk in chunks:
                sink.write(chunk)
                if not sniffed and len(sink.head) >= SNIFF_BYTES:
                    sniffed = True
                    if sniff(sink.head) is None:  # don't download 64 MiB of HTML
                        sink.discard()
                        return self._not_an_image(sink.head, status, attempt)
        except _TooLarge as exc:
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
            return self._not_an_image(sink.head, status, attempt)
        return self._commit(sink, ext, status, attempt)

    def _not_an_image(self, head: bytes, status: int | None, attempt: int) -> ImageFailure:
        return ImageFailure(
            FAILED, f"body is not an image (starts with {head[:16]!r})", status, attempt
        )

    def _store_data_uri(self, url: str) -> StoredImage | ImageFailure:
        header, sep, payload = url.partition(",")
        if not sep:
            return ImageFailure(FAILED, "malformed data: URI (no comma)", None, 1)
        if len(payload) * 3 // 4 > self._max_bytes:
            return ImageFailure(FAILED, str(_TooLarge(self._max_bytes)), None, 1)
        try:
            if header.lower().endswith(";base64"):
                data = base64.b64decode(payload, validate=False)
            else:
                data = unquote_to_bytes(payload)
        except (binascii.Error, ValueError) as exc:
            return ImageFailure(
                FAILED, f"{describe_url(url)} URI is not valid base64 ({exc})", None, 1
            )
        sink = _Sink(self._layout, self._tmp, self._max_bytes)
        try:
            sink.write(data)
        except _TooLarge as exc:
            sink.discard()
            return ImageFailure(FAILED, str(exc), None, 1)
        except BaseException:
            sink.discard()
            raise
        ext = sniff(sink.head)
        if ext is None:
            sink.discard()
            return self._not_an_image(sink.head, None, 1)
        return self._commit(sink, ext, None, 1)

    def _commit(self, sink: _Sink, ext: str, status: int | None, attempt: int) -> StoredImage:
        sha = sink.hexdigest()
        relative = self._layout.image_relpath(sha, ext)
        final = os.path.join(self._layout.root, relative)
        try:
            new = sink.persist(final, self._folders)
        except OSError as exc:
            raise OutputError(f"cannot store image {relative}: {exc.strerror or exc}") from exc
        info = read_info(sink.head)
        return StoredImage(sha, relative, sink.size, new, status, attempt, info)

"""Response bodies without aiohttp: content-codings undone in bounded pieces, and the errors a
certificate failure and a refused address are (so that the fetch and download stages need not
import the transport).
"""

from __future__ import annotations

import zlib
from collections.abc import AsyncIterator
from typing import Final

import httpx

DECODED_CHUNK: Final = 1 << 16
"""Decoding a compressed body yields at most this many bytes at a time, whatever the ratio."""


class CertificateError(httpx.ConnectError):
    """The server's TLS certificate did not verify: final, another attempt gets the same."""


PUBLIC_ONLY: Final = "harvester.public_only"
"""A request extension: true when the request may only connect to public addresses (an image
on a third party's host). The transport checks the addresses it really connects to."""


SECONDS: Final = "harvester.seconds"
"""A request extension: the seconds the whole exchange may take from now, body included; when
they run out, reading or sending raises ``TimeoutError`` (not an httpx error)."""


class NonPublicAddressError(httpx.ConnectError):
    """The host resolved to a non-public address at connection time and the request was
    ``PUBLIC_ONLY``: final, not retried. ``str()`` is the whole message for the manifest."""


def _encodings(header: str | None) -> list[str]:
    return [
        e.strip().lower()
        for e in (header or "").split(",")
        if e.strip().lower() not in ("", "identity")
    ]


async def _inflate(chunks: AsyncIterator[bytes], encoding: str) -> AsyncIterator[bytes]:
    """One content-coding undone, at most ``DECODED_CHUNK`` bytes at a time."""
    if encoding in ("gzip", "x-gzip"):
        decoder = zlib.decompressobj(zlib.MAX_WBITS | 16)
    elif encoding == "deflate":
        decoder = zlib.decompressobj(zlib.MAX_WBITS)  # zlib-wrapped; raw deflate is a fallback
    else:
        raise httpx.DecodingError(f"unsupported content-encoding {encoding!r}")
    first = True
    async for chunk in chunks:
        data = chunk
        while data:
            try:
                out = decoder.decompress(data, DECODED_CHUNK)
            except zlib.error as exc:
                if first and encoding == "deflate":
                    decoder = zlib.decompressobj(-zlib.MAX_WBITS)
                    first = False
                    continue
                raise httpx.DecodingError(f"{encoding} body cannot be decoded ({exc})") from exc
            first = False
            data = decoder.unconsumed_tail
            if out:
                yield out
            if decoder.eof:
                data = b""
            elif not data and len(out) == DECODED_CHUNK:
                data = b""
                while True:  # output may be pending inside the decoder with no input left
                    more = decoder.decompress(b"", DECODED_CHUNK)
                    if more:
                        yield more
                    if len(more) < DECODED_CHUNK:
                        break
    if not decoder.eof and not first:
        raise httpx.DecodingError(f"{encoding} body ends before its end of stream")


async def _once(body: bytes) -> AsyncIterator[bytes]:
    if body:
        yield body


def decoded(chunks: AsyncIterator[bytes], content_encoding: str | None) -> AsyncIterator[bytes]:
    """A body's pieces as they arrived, their content-codings (``content_encoding``: gzip,
    deflate, in any number) undone in pieces of at most ``DECODED_CHUNK`` bytes: a caller that
    counts what it gets stops at its limit however well the body compresses. The pieces
    themselves when there is no coding. Raises ``httpx.DecodingError``."""
    for encoding in reversed(_encodings(content_encoding)):
        chunks = _inflate(chunks, encoding)
    return chunks


def decoded_chunks(response: httpx.Response) -> AsyncIterator[bytes]:
    """A streamed httpx response's body, decoded as ``decoded`` does."""
    if response.is_stream_consumed:  # read already (a mock transport's): httpx decoded it
        return _once(response.content)
    return decoded(response.aiter_raw(), response.headers.get("content-encoding"))

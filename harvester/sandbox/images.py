"""Synthetic image files: right magic numbers, random (incompressible) content, deterministic.

The PNG is a genuinely valid file (any decoder opens it). JPEG and WEBP have correct headers
and framing (SOI ... EOI; RIFF/WEBP with a ``VP8 `` chunk) but random payloads: enough for a
client that sniffs magic numbers, not for a decoder.
"""

from __future__ import annotations

import random
import struct
import zlib
from collections.abc import Callable
from typing import Final

PNG_MAGIC: Final = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC: Final = b"\xff\xd8\xff"
WEBP_MAGIC: Final = b"RIFF"

_PNG_WIDTH: Final = 96
"""Pixels per row of the synthetic PNG; the height follows from the wanted size."""


def _noise(seed: bytes, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data)
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def make_png(seed: bytes, size: int) -> bytes:
    """An RGB PNG of random pixels, about ``size`` bytes in all."""
    stride = _PNG_WIDTH * 3
    height = max(1, size // (stride + 1))
    noise = _noise(seed, stride * height)
    raw = b"".join(
        b"\x00" + noise[row * stride : (row + 1) * stride]  # filter type 0 (None) per row
        for row in range(height)
    )
    ihdr = struct.pack(">IIBBBBB", _PNG_WIDTH, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        PNG_MAGIC
        + _png_chunk(b"IHDR", ihdr)
        # Level 0 (stored blocks) is still valid zlib; random pixels would not compress anyway.
        + _png_chunk(b"IDAT", zlib.compress(raw, 0))
        + _png_chunk(b"IEND", b"")
    )


def make_jpeg(seed: bytes, size: int) -> bytes:
    """JFIF framing (SOI, APP0, comment segments of noise, EOI), about ``size`` bytes."""
    app0 = b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    parts = [b"\xff\xd8", b"\xff\xe0" + struct.pack(">H", len(app0) + 2) + app0]
    noise = _noise(seed, max(0, size - 24))
    for start in range(0, len(noise), 65_000):  # a segment holds at most 65533 bytes
        piece = noise[start : start + 65_000]
        parts.append(b"\xff\xfe" + struct.pack(">H", len(piece) + 2) + piece)
    parts.append(b"\xff\xd9")
    return b"".join(parts)


def make_webp(seed: bytes, size: int, *, width: int = 512, height: int = 512) -> bytes:
    """RIFF/WEBP with one lossy ``VP8 `` chunk whose frame payload is noise."""
    frame_tag = b"\x10\x02\x00"  # key frame, version 0, shown; partition size is not checked
    header = frame_tag + b"\x9d\x01\x2a" + struct.pack("<HH", width, height)
    payload = header + _noise(seed, max(0, size - 30))
    chunk = b"VP8 " + struct.pack("<I", len(payload)) + payload
    if len(payload) % 2:
        chunk += b"\x00"  # RIFF chunks are padded to an even length
    body = b"WEBP" + chunk
    return WEBP_MAGIC + struct.pack("<I", len(body)) + body


MAKERS: Final[dict[str, Callable[[bytes, int], bytes]]] = {
    "png": make_png,
    "jpeg": make_jpeg,
    "webp": make_webp,
}
CONTENT_TYPES: Final = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
EXTENSIONS: Final = {"png": "png", "jpeg": "jpeg", "webp": "webp"}

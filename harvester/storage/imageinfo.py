"""An image's real format, width and height, read from its first bytes (never a full decode).

The manifest records them next to what the API declared, so a result whose ``width`` or
``content_type`` is wrong shows as a mismatch. PNG (IHDR), JPEG (the first SOFn frame header),
WebP (``VP8 ``, ``VP8L`` and ``VP8X``), GIF (the logical screen) and BMP are read; anything else,
or a header cut short, gives None and the columns stay empty.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

HEADER_BYTES: Final = 1 << 16
"""How much of the head is kept for reading the header. A JPEG's frame header comes after its
APPn segments, and EXIF data (with its thumbnail) is at most one 64 KiB segment."""

_SOF: Final = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE})
"""The JPEG start-of-frame markers (C4 DHT, C8 JPG and CC DAC are not)."""


@dataclass(frozen=True, slots=True)
class ImageInfo:
    format: str
    """``png``, ``jpeg``, ``webp``, ``gif`` or ``bmp``."""
    width: int
    height: int


def claimed_format(head: bytes) -> str | None:
    """The format ``head``'s magic number claims, among those whose header ``read_info``
    must be able to read in a real file (``png``, ``jpeg``, ``webp``, ``gif``), else None."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    return None


def read_info(head: bytes) -> ImageInfo | None:
    """The format and size the header at the start of ``head`` states, or None."""
    try:
        if head.startswith(b"\x89PNG\r\n\x1a\n") and head[12:16] == b"IHDR":
            width, height = struct.unpack(">II", head[16:24])
            return ImageInfo("png", width, height)
        if head.startswith(b"\xff\xd8"):
            return _jpeg(head)
        if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
            return _webp(head)
        if head[:6] in (b"GIF87a", b"GIF89a"):
            width, height = struct.unpack("<HH", head[6:10])
            return ImageInfo("gif", width, height)
        if head[:2] == b"BM" and len(head) >= 26:
            width, height = struct.unpack("<ii", head[18:26])
            return ImageInfo("bmp", width, abs(height))
    except (struct.error, IndexError):
        return None
    return None


def _jpeg(head: bytes) -> ImageInfo | None:
    at = 2
    while at + 4 <= len(head):
        if head[at] != 0xFF:
            return None
        marker = head[at + 1]
        if marker == 0xFF:  # fill bytes before a marker
            at += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            at += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image, or the scan began without a frame
            return None
        if marker in _SOF:
            height, width = struct.unpack(">HH", head[at + 5 : at + 9])
            return ImageInfo("jpeg", width, height)
        at += 2 + struct.unpack(">H", head[at + 2 : at + 4])[0]
    return None


def _webp(head: bytes) -> ImageInfo | None:
    kind = head[12:16]
    if kind == b"VP8 " and head[23:26] == b"\x9d\x01\x2a":
        width, height = struct.unpack("<HH", head[26:30])
        return ImageInfo("webp", width & 0x3FFF, height & 0x3FFF)
    if kind == b"VP8L" and head[20] == 0x2F:
        bits = int.from_bytes(head[21:25], "little")
        return ImageInfo("webp", (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
    if kind == b"VP8X":
        width = int.from_bytes(head[24:27], "little") + 1
        height = int.from_bytes(head[27:30], "little") + 1
        return ImageInfo("webp", width, height)
    return None

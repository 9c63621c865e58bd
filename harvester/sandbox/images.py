"""Synthetic images that decode: a gradient and a few shapes drawn from a seed, deterministic.

Every file is a real picture at the width and height asked for, in its real format, so a demo's
gallery shows pictures and a decoder opens every file. The picture is drawn once as an 8-bit
palette raster (a diagonal gradient between two colours, then discs and bars), which costs a
slice assignment per row and shape. PNG is written with zlib alone. JPEG and WebP are encoded
with Pillow (the ``sandbox`` extra, part of ``dev``); without it ``served_format`` turns them
into PNG, and ``make_jpeg`` / ``make_webp`` raise ``EncoderMissing`` rather than hand out a
file that does not decode. (An uncompressed GIF needs no library either, but is 30 times the
byte size asked for, and LZW in Python takes 0.2 s a picture.)

Files are padded to about the byte size asked for with noise in a place every decoder skips
(a private PNG chunk, JPEG comment segments, an unknown WebP chunk), so the sandbox's byte
sizes, the bench's figures and the size tests do not depend on how well a picture compresses.
"""

from __future__ import annotations

import functools
import io
import math
import random
import struct
import zlib
from collections.abc import Callable
from typing import Final

PNG_MAGIC: Final = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC: Final = b"\xff\xd8\xff"
WEBP_MAGIC: Final = b"RIFF"


class EncoderMissing(ValueError):
    """A JPEG or WebP was asked for and Pillow, which encodes them, is not installed."""


@functools.cache
def pillow_available() -> bool:
    """True if Pillow can be imported (asked once per process)."""
    try:
        import PIL  # noqa: F401
    except ImportError:
        return False
    return True


_WITHOUT_PILLOW: Final = {"jpeg": "png", "webp": "png"}


def served_format(fmt: str) -> str:
    """The format the sandbox serves where its world picks ``fmt``: ``fmt`` itself, or PNG in
    place of JPEG and WebP while Pillow is not installed."""
    return fmt if pillow_available() else _WITHOUT_PILLOW.get(fmt, fmt)


def missing_encoder_note() -> str | None:
    """The line to print once when the sandbox starts without Pillow, else None."""
    if pillow_available():
        return None
    return (
        "sandbox: Pillow is not installed, so every image is a PNG (JPEG and WebP "
        "need Pillow, the sandbox extra: pip install pillow)"
    )


_GRADIENT: Final = 200
"""Palette entries 0..199 are the background's gradient; 200.. are the shapes' colours."""
_SHAPES: Final = 6


def _noise(seed: bytes, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def _colour(rng: random.Random) -> tuple[int, int, int]:
    return (rng.randrange(256), rng.randrange(256), rng.randrange(256))


def _picture(seed: bytes, width: int, height: int) -> tuple[bytes, bytes]:
    """``(palette, raster)``: 256 RGB entries and ``height`` rows of ``width`` indices."""
    rng = random.Random(seed)
    start, end = _colour(rng), _colour(rng)
    palette = bytearray()
    for i in range(_GRADIENT):
        mix = i / (_GRADIENT - 1)
        palette += bytes(round(a + (b - a) * mix) for a, b in zip(start, end, strict=True))
    for _ in range(256 - _GRADIENT):
        palette += bytes(_colour(rng))
    span = width + height
    ramp = bytes(i * _GRADIENT // span for i in range(span))
    rows = [bytearray(ramp[y : y + width]) for y in range(height)]
    unit = min(width, height)
    for shape in range(_SHAPES):
        index = _GRADIENT + shape
        cx, cy = rng.randrange(width), rng.randrange(height)
        radius = rng.randint(unit // 12, unit // 4)
        if rng.random() < 0.6:  # a disc
            for y in range(max(0, cy - radius), min(height, cy + radius)):
                half = int(math.sqrt(radius * radius - (y - cy) ** 2))
                left, right = max(0, cx - half), min(width, cx + half)
                rows[y][left:right] = bytes([index]) * (right - left)
        else:  # a bar
            top, bottom = max(0, cy - radius // 3), min(height, cy + radius // 3)
            left, right = max(0, cx - radius), min(width, cx + radius)
            for y in range(top, bottom):
                rows[y][left:right] = bytes([index]) * (right - left)
    return bytes(palette), b"".join(rows)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data)
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def make_png(seed: bytes, size: int, *, width: int = 512, height: int = 512) -> bytes:
    """A palette PNG of ``width`` x ``height`` pixels, padded to about ``size`` bytes."""
    palette, raster = _picture(seed, width, height)
    rows = b"".join(
        b"\x00" + raster[y * width : (y + 1) * width]  # filter type 0 (None) per row
        for y in range(height)
    )
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 3, 0, 0, 0)  # 8-bit palette
    head = PNG_MAGIC + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"PLTE", palette)
    body = head + _png_chunk(b"IDAT", zlib.compress(rows, 1))
    missing = size - len(body) - 12 - 12  # the padding chunk's and IEND's framing
    if missing > 0:
        body += _png_chunk(b"haRv", _noise(seed, missing))  # ancillary, private: skipped
    return body + _png_chunk(b"IEND", b"")


def _pillow_encode(seed: bytes, fmt: str, width: int, height: int) -> bytes:
    try:
        from PIL import Image
    except ImportError as exc:
        raise EncoderMissing(f"{fmt} needs Pillow (the sandbox extra)") from exc
    palette, raster = _picture(seed, width, height)
    image = Image.frombytes("P", (width, height), raster)
    image.putpalette(palette)
    out = io.BytesIO()
    if fmt == "jpeg":
        image.convert("RGB").save(out, "JPEG", quality=80)
    else:
        image.convert("RGB").save(out, "WEBP", quality=70, method=0)
    return out.getvalue()


def _pad_jpeg(data: bytes, seed: bytes, size: int) -> bytes:
    """Comment segments of noise, put just before the scan (after the frame header)."""
    missing = size - len(data)
    if missing <= 4:
        return data
    at = 2
    while data[at + 1] != 0xDA:  # walk the segments up to Start Of Scan
        at += 2 + struct.unpack(">H", data[at + 2 : at + 4])[0]
    noise = _noise(seed, missing)
    parts = []
    for start in range(0, len(noise), 65_000):  # a segment holds at most 65533 bytes
        piece = noise[start : start + 65_000]
        parts.append(b"\xff\xfe" + struct.pack(">H", len(piece) + 2) + piece)
    return data[:at] + b"".join(parts) + data[at:]


def _pad_webp(data: bytes, seed: bytes, size: int, width: int, height: int) -> bytes:
    """The simple file made extended (a ``VP8X`` header) with an unknown chunk of noise."""
    missing = size - len(data) - 18 - 8  # the VP8X chunk, the padding chunk's header
    if missing <= 0 or data[12:16] != b"VP8 ":
        return data
    vp8x = b"VP8X" + struct.pack("<I", 10) + b"\x00\x00\x00\x00"
    vp8x += (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    missing -= missing % 2  # RIFF chunks are of even length here
    body = b"WEBP" + vp8x + data[12:] + b"HARV" + struct.pack("<I", missing) + _noise(seed, missing)
    return WEBP_MAGIC + struct.pack("<I", len(body)) + body


def make_jpeg(seed: bytes, size: int, *, width: int = 512, height: int = 512) -> bytes:
    """A JPEG of ``width`` x ``height``, about ``size`` bytes; ``EncoderMissing`` without
    Pillow."""
    return _pad_jpeg(_pillow_encode(seed, "jpeg", width, height), seed, size)


def make_webp(seed: bytes, size: int, *, width: int = 512, height: int = 512) -> bytes:
    """A lossy WebP of ``width`` x ``height``, about ``size`` bytes; ``EncoderMissing``
    without Pillow."""
    return _pad_webp(_pillow_encode(seed, "webp", width, height), seed, size, width, height)


MAKERS: Final[dict[str, Callable[..., bytes]]] = {  # (seed, size, *, width, height)
    "png": make_png,
    "jpeg": make_jpeg,
    "webp": make_webp,
}
CONTENT_TYPES: Final = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
EXTENSIONS: Final = {"png": "png", "jpeg": "jpeg", "webp": "webp"}

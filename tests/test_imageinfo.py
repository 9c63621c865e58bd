"""The header reader against files Pillow writes, and against heads cut short or not images."""

from __future__ import annotations

import io
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from harvester.storage.imageinfo import HEADER_BYTES, ImageInfo, read_info


def encoded(fmt: str, size: tuple[int, int], mode: str = "RGB", **options: object) -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, "teal").save(out, fmt, **options)
    return out.getvalue()


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (encoded("PNG", (1024, 768)), ImageInfo("png", 1024, 768)),
        (encoded("JPEG", (768, 1024)), ImageInfo("jpeg", 768, 1024)),
        (encoded("JPEG", (300, 200), progressive=True), ImageInfo("jpeg", 300, 200)),
        (encoded("WEBP", (1344, 768)), ImageInfo("webp", 1344, 768)),
        (encoded("WEBP", (513, 257), lossless=True), ImageInfo("webp", 513, 257)),
        (encoded("WEBP", (640, 480), "RGBA", exif=b"Exif\x00\x00"), ImageInfo("webp", 640, 480)),
        (encoded("GIF", (320, 240), "P"), ImageInfo("gif", 320, 240)),
        (encoded("BMP", (33, 17)), ImageInfo("bmp", 33, 17)),
    ],
    ids=["png", "jpeg", "progressive-jpeg", "webp", "webp-lossless", "webp-extended", "gif", "bmp"],
)
def test_reads_format_and_size_of_real_files(data: bytes, expected: ImageInfo) -> None:
    assert read_info(data[:HEADER_BYTES]) == expected


def test_jpeg_frame_after_a_large_exif_segment() -> None:
    """A camera's EXIF segment (with its thumbnail) comes before the frame header."""
    data = encoded("JPEG", (640, 480))
    app1 = b"\xff\xe1" + struct.pack(">H", 60_002) + b"Exif\x00\x00" + bytes(59_994)
    data = data[:2] + app1 + data[2:]
    assert read_info(data[:HEADER_BYTES]) == ImageInfo("jpeg", 640, 480)


def test_sandbox_images_are_read_as_served() -> None:
    from harvester.sandbox.images import MAKERS

    for fmt, maker in MAKERS.items():
        data = maker(b"seed", 30_000, width=1024, height=768)
        assert read_info(data[:HEADER_BYTES]) == ImageInfo(fmt, 1024, 768)


@pytest.mark.parametrize(
    "head",
    [b"", b"<!DOCTYPE html>", b"\x89PNG\r\n\x1a\n\x00\x00", b"\xff\xd8\xff\xe0\x00\x10JFIF"],
)
def test_unknown_or_short_heads_give_none(head: bytes) -> None:
    assert read_info(head) is None


@given(st.binary(max_size=64))
def test_never_raises_on_any_bytes(head: bytes) -> None:
    for prefix in (b"", b"\xff\xd8", b"RIFF\x00\x00\x00\x00WEBPVP8L", b"\x89PNG\r\n\x1a\n"):
        info = read_info(prefix + head)
        assert info is None or info.width >= 0

"""Small JPEG thumbnails for the report's gallery, with Pillow when it is installed.

Real results are 1-4 MB images: embedding them as they are makes a page of a hundred MB.
A thumbnail of at most ``THUMBNAIL_PIXELS`` a side is a few KB to a few tens of KB. Pillow is
an optional extra (``pip install 'harvester[thumbnails]'``, part of ``dev``); without it the
report embeds the stored files themselves, capped (``GalleryLimits``), and says how to get
thumbnails.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Final

THUMBNAIL_PIXELS: Final = 320
"""The longest side of a thumbnail: sharp in a gallery tile on a high-density screen."""
INSTALL_HINT: Final = "pip install 'harvester[thumbnails]'"
_MAX_PIXELS: Final = 100_000_000
"""A larger image (a decompression bomb, or a scan) is not decoded."""


def available() -> bool:
    """True if Pillow can be imported."""
    try:
        import PIL.Image  # noqa: F401
    except ImportError:
        return False
    return True


class ThumbnailError(Exception):
    """The file could not be decoded into a thumbnail (the message says why)."""


def thumbnail(source: Path | bytes, *, pixels: int = THUMBNAIL_PIXELS) -> bytes:
    """A JPEG of the image at ``source`` (a file, or its bytes), scaled to at most ``pixels``
    a side (never enlarged). Raises ``ThumbnailError`` for data Pillow cannot decode."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as opened:
            if opened.width * opened.height > _MAX_PIXELS:
                raise ThumbnailError(f"{opened.width}x{opened.height} pixels: too large to decode")
            opened.draft("RGB", (pixels, pixels))  # JPEG: decode at a fraction of the size
            opened.thumbnail((pixels, pixels))
            image: Image.Image = opened
            if image.mode in ("RGBA", "LA", "P"):
                rgba = image.convert("RGBA")
                image = Image.new("RGB", rgba.size, "white")
                image.paste(rgba, mask=rgba.getchannel("A"))
            elif image.mode != "RGB":
                image = image.convert("RGB")
            out = io.BytesIO()
            image.save(out, "JPEG", quality=72, optimize=True)
    except (UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise ThumbnailError(f"cannot decode: {exc}") from exc
    except (OSError, ValueError, SyntaxError) as exc:  # truncated or corrupt data
        raise ThumbnailError(f"cannot decode: {exc}") from exc
    return out.getvalue()

"""The content-addressed image store: where downloaded (or ``data:``) bytes land.

Bytes are hashed as they arrive and kept in memory (past 1 MiB they spill to a temp file in
the store's ``temp_dir``); a complete body becomes ``images/<aa>/<sha256>.<ext>`` with one
``Store.put_new``: atomically, once (a rename in a folder, a create-once put in a bucket).
The extension comes from the bytes' magic number, never from the URL or the Content-Type.
Identical bytes are stored once. Nothing here speaks HTTP: ``harvester/api/download.py``
streams responses into a ``Sink`` (the sink protocol it declares).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Final

from harvester.errors import OutputError
from harvester.storage.imageinfo import HEADER_BYTES, ImageInfo, read_info
from harvester.storage.layout import image_relpath

if TYPE_CHECKING:
    from harvester.storage.objects import Store

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


_names = itertools.count()
"""Temp file names: this process's id and a counter are unique in the store's temp folder
(DIR/.tmp, which every run empties before it starts under the folder's lock, or a server's
own, which only its process writes)."""


def _not_an_image(head: bytes) -> str:
    return f"body is not an image (starts with {head[:16]!r})"


class Sink:
    """One image's bytes: hashed as they arrive, refused as soon as their first bytes are no
    image. A body up to ``spill_bytes`` stays in memory until it is complete, so a body that
    turns out cut short, too large or not an image never creates a file, and a good one is
    written with one call; a larger body spills to a temp file as it arrives."""

    def __init__(self, store: ContentStore, spill_bytes: int = SPILL_BYTES) -> None:
        self._store = store
        self._dir = store.tmp
        self.path = ""
        """The spill file, once it is made."""
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
        self.path = f"{self._dir}/{os.getpid()}-{next(_names)}.part"
        try:
            # An explicit buffer size spares the isatty() probe of every new file.
            return open(self.path, "wb", buffering=1 << 16)
        except OSError as exc:
            raise OutputError(f"cannot write to {self._dir}: {exc.strerror or exc}") from exc

    def write(self, chunk: bytes) -> str | None:
        """Take the next bytes; the reason to stop (they are no image), or None. Raises
        ``OutputError`` if a spill file cannot be written."""
        self.size += len(chunk)
        if len(self.head) < HEADER_BYTES:
            sniffed = len(self.head) >= SNIFF_BYTES
            self.head += chunk[: HEADER_BYTES - len(self.head)]
            if not sniffed and len(self.head) >= SNIFF_BYTES and sniff(self.head) is None:
                return _not_an_image(self.head)  # don't download 64 MiB of HTML
        self._hash.update(chunk)
        if self._fh is None:
            self._chunks.append(chunk)
            if self.size <= self._spill:
                return None
            self._fh = self._open()
            chunks, self._chunks = self._chunks, []
        else:
            chunks = [chunk]
        try:
            self._fh.writelines(chunks)
        except OSError as exc:
            raise OutputError(f"cannot write image data: {exc.strerror or exc}") from exc
        return None

    async def commit(self, http_status: int | None, attempts: int) -> StoredImage | str:
        """Store the complete bytes under their hash, or the reason they are no image (the
        bytes are dropped). Raises ``OutputError``."""
        ext = sniff(self.head)
        if ext is None:
            self.discard()
            return _not_an_image(self.head)
        return await self._store.commit(self, ext, http_status, attempts)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()

    def take(self) -> bytes | Path:
        """The complete bytes for a put: in memory, or the closed spill file (which the put
        consumes)."""
        if self._fh is None:
            data, self._chunks = b"".join(self._chunks), []
            return data
        self._fh.close()
        return Path(self.path)

    def discard(self) -> None:
        """Drop the bytes and remove the temp file; never raises (it runs while handling an
        error). A full disk can fail the close's flush, and an unlink can fail too: what is
        left is in the store's temp folder, which the next run (or server) empties."""
        self._chunks = []
        if self._fh is not None:
            with contextlib.suppress(OSError):
                self._fh.close()
        if self._written:
            with contextlib.suppress(OSError):
                os.unlink(self.path)


class ContentStore:
    """Stores bytes under the hash of their content in ``store``; one instance per lane."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.tmp = str(store.temp_dir)

    def sink(self) -> Sink:
        """A new sink for one image's bytes."""
        return Sink(self)

    async def commit(self, sink: Sink, ext: str, status: int | None, attempt: int) -> StoredImage:
        """The complete bytes into the store under their hash, once and atomically: no
        reader ever sees part of an image; ``new`` is False if they were stored already."""
        sha = sink.hexdigest()
        relative = image_relpath(sha, ext)
        try:
            new = await self.store.put_new_async(relative, sink.take())
        except BaseException:
            sink.discard()
            raise
        info = read_info(sink.head)
        return StoredImage(sha, relative, sink.size, new, status, attempt, info)

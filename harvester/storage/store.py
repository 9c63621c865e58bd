"""The content-addressed image store: where downloaded (or ``data:``) bytes land.

Bytes are hashed as they arrive and kept in memory (past 1 MiB they spill to a temp file);
a complete body goes to an unnamed (or temp) file inside the output folder, which is linked
(or renamed) atomically to ``images/<aa>/<sha256>.<ext>``; the extension comes from the
bytes' magic number, never from the URL or the Content-Type. Identical bytes are stored once;
a file of the wrong size under an image's name (torn by a power loss) is replaced. Nothing
here speaks HTTP: ``harvester/run/download.py`` streams responses into a ``Sink``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import hashlib
import itertools
import os
from dataclasses import dataclass
from typing import BinaryIO, Final
from urllib.parse import unquote_to_bytes

from harvester.errors import OutputError
from harvester.storage.layout import Layout
from harvester.storage.rows import FAILED

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


@dataclass(frozen=True, slots=True)
class ImageFailure:
    status: str
    error: str
    http_status: int | None
    attempts: int


_names = itertools.count()
"""Temp file names: this process's id and a counter are unique in DIR/.tmp, which every run
empties before it starts (under the folder's lock)."""
_CREATE: Final = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
_ANONYMOUS: Final = os.O_WRONLY | getattr(os, "O_TMPFILE", 0) | os.O_CLOEXEC
_NO_ANONYMOUS: Final = frozenset(
    {errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT, errno.EPERM, errno.EXDEV}
)
"""What ``open(O_TMPFILE)`` or linking through ``/proc/self/fd`` fail with where the file
system, the kernel or the sandbox cannot do it (and not when the disk is full or read-only)."""


class _Anonymous:
    """Whether files without a name (Linux's ``O_TMPFILE``), linked into the store once
    complete, work here. A complete image is then one file creation and one link: no temp
    name to create, rename away and check for beforehand (the link itself fails if identical
    bytes are stored already). Tried on first use; named temp files where they do not work."""

    usable: bool = hasattr(os, "O_TMPFILE") and os.path.isdir("/proc/self/fd")

    @classmethod
    def store(cls, tmp: str, data: bytes, final: str) -> bool | None:
        """Put ``data`` at ``final``: True if stored, False if ``final`` existed, None if
        anonymous files do not work here (and are not tried again)."""
        try:
            fd = os.open(tmp, _ANONYMOUS, 0o666)
        except OSError as exc:
            if exc.errno in _NO_ANONYMOUS:
                cls.usable = False
                return None
            raise
        try:
            _write_all(fd, data)
            try:
                # linkat(2) with AT_SYMLINK_FOLLOW, the documented way to name an O_TMPFILE
                # file. CPython calls plain link(2), which would link the /proc symlink
                # itself (EXDEV), unless a dir_fd is given; the kernel ignores src_dir_fd
                # for an absolute path, so the file's own descriptor serves.
                os.link(f"/proc/self/fd/{fd}", final, src_dir_fd=fd, follow_symlinks=True)
            except FileExistsError:
                return False
            except OSError as exc:
                if exc.errno in _NO_ANONYMOUS and os.path.isdir(os.path.dirname(final)):
                    cls.usable = False
                    return None
                raise
        finally:
            os.close(fd)
        return True


def _is_whole(path: str, size: int) -> bool:
    """``path`` exists with ``size`` bytes: since files are named by the hash of their bytes,
    the image is there (a stat, only when a name is taken already)."""
    try:
        return os.stat(path).st_size == size
    except FileNotFoundError:
        return False


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class Sink:
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
            raise TooLarge(self._max)
        if len(self.head) < SNIFF_BYTES:
            self.head += chunk[: SNIFF_BYTES - len(self.head)]
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
        if self._fh is None and _Anonymous.usable:
            data = b"".join(self._chunks)
            self._chunks = []
            try:
                stored = _Anonymous.store(self._dir, data, final)
            except OSError:
                self.discard()
                raise
            if stored:
                return True
            self._chunks = [data]  # the name was taken, or anonymous files are refused
        if _is_whole(final, self.size):
            self.discard()
            return False
        try:
            if self._fh is None:
                # The whole body in one write, on a bare descriptor: no file object needed.
                self._written = True
                fd = os.open(self.path, _CREATE, 0o666)
                try:
                    _write_all(fd, b"".join(self._chunks))
                finally:
                    os.close(fd)
                self._chunks = []
            else:
                self._fh.close()
            os.replace(self.path, final)
        except OSError:
            self.discard()
            raise
        return True

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


class TooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"image is larger than the {limit:,}-byte limit (--max-image-bytes)")


class ContentStore:
    """Stores bytes under the hash of their content; one instance per run."""

    def __init__(self, layout: Layout, *, max_bytes: int = 64 * 1024 * 1024) -> None:
        self._layout = layout
        self.max_bytes = max_bytes
        self._folders: set[str] = set()
        self._tmp = str(layout.tmp)

    def sink(self) -> Sink:
        """A new sink for one image's bytes, holding the size limit."""
        return Sink(self._layout, self._tmp, self.max_bytes)

    def not_an_image(self, head: bytes, status: int | None, attempt: int) -> ImageFailure:
        return ImageFailure(
            FAILED, f"body is not an image (starts with {head[:16]!r})", status, attempt
        )

    def store_data_uri(self, url: str) -> StoredImage | ImageFailure:
        header, sep, payload = url.partition(",")
        media_type = header[5:].split(";", 1)[0]
        if not sep:
            return ImageFailure(FAILED, "malformed data: URI (no comma)", None, 1)
        if len(payload) * 3 // 4 > self.max_bytes:
            return ImageFailure(FAILED, str(TooLarge(self.max_bytes)), None, 1)
        try:
            if header.lower().endswith(";base64"):
                data = base64.b64decode(payload, validate=False)
            else:
                data = unquote_to_bytes(payload)
        except (binascii.Error, ValueError) as exc:
            return ImageFailure(
                FAILED,
                f"data:{media_type or 'text/plain'} URI is not valid base64 ({exc})",
                None,
                1,
            )
        sink = self.sink()
        try:
            sink.write(data)
        except TooLarge as exc:
            sink.discard()
            return ImageFailure(FAILED, str(exc), None, 1)
        except BaseException:
            sink.discard()
            raise
        ext = sniff(sink.head)
        if ext is None:
            sink.discard()
            return self.not_an_image(sink.head, None, 1)
        return self.commit(sink, ext, None, 1)

    def commit(self, sink: Sink, ext: str, status: int | None, attempt: int) -> StoredImage:
        sha = sink.hexdigest()
        relative = self._layout.image_relpath(sha, ext)
        final = os.path.join(self._layout.root, relative)
        try:
            new = sink.persist(final, self._folders)
        except OSError as exc:
            raise OutputError(f"cannot store image {relative}: {exc.strerror or exc}") from exc
        return StoredImage(sha, relative, sink.size, new, status, attempt)

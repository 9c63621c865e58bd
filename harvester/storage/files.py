"""Putting a complete object into a folder atomically, once: the file half of the store.

A complete image (bytes in memory, or a spill file in ``DIR/.tmp``) becomes its final file in
one step, so a reader or a crash never sees part of one: an unnamed file linked into place
where Linux allows it (``O_TMPFILE``), else a named temp file renamed into place. Both the
download stage (``store.py``) and the folder backend of the object store (``objects.py``) call
``persist_new``.
"""

from __future__ import annotations

import errno
import itertools
import os
from typing import Final

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


def persist_new(final: str, source: bytes | str, *, tmp_dir: str) -> bool:
    """Put ``source`` (bytes, or the path of a complete file in ``tmp_dir``, which is moved)
    at ``final`` atomically: True if stored, False (and nothing written, the source file
    removed) if ``final`` holds these bytes already. ``final``'s folder must exist.

    Names are hashes of the bytes, so a file of the right size under the name is the image.
    One of another size is not (images are not fsynced, so a power loss can leave one short
    under its name): it is replaced, and this counts as new."""
    if isinstance(source, str):
        try:
            size = os.stat(source).st_size
            if _is_whole(final, size):
                os.unlink(source)
                return False
            os.replace(source, final)
        except OSError:
            _unlink_quietly(source)
            raise
        return True
    if _Anonymous.usable:
        stored = _Anonymous.store(tmp_dir, source, final)
        if stored:
            return True
        # None: anonymous files are refused here; False: the name is taken (checked next)
    if _is_whole(final, len(source)):
        return False
    tmp = f"{tmp_dir}/{os.getpid()}-{next(_names)}.new"
    try:
        # The whole body in one write, on a bare descriptor: no file object needed.
        fd = os.open(tmp, _CREATE, 0o666)
        try:
            _write_all(fd, source)
        finally:
            os.close(fd)
        os.replace(tmp, final)
    except OSError:
        _unlink_quietly(tmp)
        raise
    return True


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        return

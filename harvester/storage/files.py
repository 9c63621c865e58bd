"""Putting a complete object into a folder atomically, once: the file half of
``objects.LocalStore.put_new``.

A complete image (bytes in memory, or a spill file in ``DIR/.tmp``) becomes its final file in
one step, so a reader or a crash never sees part of one: a named temp file renamed into place
(docs/performance.md compares the unnamed ``O_TMPFILE`` alternative).
"""

from __future__ import annotations

import itertools
import os
from typing import Final

_names = itertools.count()
"""Temp file names: this process's id and a counter are unique in the store's temp folder
(DIR/.tmp, which every run empties before it starts under the folder's lock, or a server's
own, which only its process writes)."""
_CREATE: Final = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC


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
            unlink_quietly(source)
            raise
        return True
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
        unlink_quietly(tmp)
        raise
    return True


def unlink_quietly(path: str) -> None:
    """Remove ``path`` if it can be; never raises."""
    try:
        os.unlink(path)
    except OSError:
        return


def persist_durable(final: str, source: bytes | str, *, tmp_dir: str) -> bool:
    """Put ``source`` (bytes, or the path of a complete file in ``tmp_dir``, which is consumed)
    at ``final`` durably and only if the name is free: the bytes written and fsynced, linked
    to ``final`` (a link never replaces a file), then ``final``'s folder fsynced. True if
    stored, False if ``final`` existed (its bytes are kept). Both folders must exist; a crash
    at any point leaves ``final`` whole or absent, never short."""
    named = isinstance(source, str)
    tmp = source if isinstance(source, str) else f"{tmp_dir}/{os.getpid()}-{next(_names)}.new"
    try:
        fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC if named else _CREATE, 0o644)
        try:
            if isinstance(source, bytes):
                _write_all(fd, source)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, final)
        except FileExistsError:
            return False
    finally:
        unlink_quietly(tmp)
    fsync_folder(os.path.dirname(final))
    return True


def fsync_folder(folder: str) -> None:
    """Make ``folder``'s entries (a file linked or made in it) durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

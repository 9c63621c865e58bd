"""One harvest per output folder at a time: an advisory ``flock`` on ``DIR/.lock``.

The kernel drops the lock when the holding process dies, however it dies, so a crashed run
never leaves a stale lock behind. The holder writes its pid into the file and empties it when
it is done; ``holder`` reads that pid (without taking the lock, so a status check can never
make a starting harvest fail).
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager

from harvester.errors import LockedError, OutputError
from harvester.storage.layout import Layout


def _open(layout: Layout, *, read_only_ok: bool) -> tuple[int | None, bool]:
    """The lock file's descriptor (None: no lock file and none can be made) and whether it
    is writable."""
    try:
        return os.open(layout.lock, os.O_RDWR | os.O_CREAT, 0o644), True
    except OSError as exc:
        if not read_only_ok:
            raise OutputError(
                f"cannot create lock file {layout.lock}: {exc.strerror or exc}"
            ) from exc
    try:
        return os.open(layout.lock, os.O_RDONLY), False
    except OSError:
        return None, False


@contextmanager
def exclusive(layout: Layout, *, read_only_ok: bool = False) -> Iterator[None]:
    """Hold ``DIR/.lock``, or raise ``LockedError`` at once (never waits).

    With ``read_only_ok`` (for checks that write nothing), a read-only folder is checked
    without writing: no harvest can be running where the lock file cannot be created.
    """
    fd, writable = _open(layout, read_only_ok=read_only_ok)
    if fd is None:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            raise LockedError(
                f"another harvest (pid {holder}) is already running on {layout.root}; "
                "this run did nothing. Wait for it to finish, or stagger the cron schedules"
            ) from None
        if writable:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield
        finally:
            if writable:
                os.ftruncate(fd, 0)
    finally:
        os.close(fd)


def holder(layout: Layout) -> int | None:
    """The pid of the harvest running on this folder, or None if none is."""
    try:
        text = layout.lock.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    if not text.isdigit():
        return None
    pid = int(text)
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return None  # killed outright (SIGKILL, OOM) before it could empty the file
    except PermissionError:
        return pid  # exists, run by another user
    return pid

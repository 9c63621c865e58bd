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
from harvester.layout import Layout


@contextmanager
def exclusive(layout: Layout) -> Iterator[None]:
    try:
        fd = os.open(layout.lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise OutputError(f"cannot create lock file {layout.lock}: {exc.strerror or exc}") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            raise LockedError(
                f"another harvest (pid {holder}) is already running on {layout.root}; "
                "this run did nothing. Wait for it to finish, or stagger the cron schedules"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield
        finally:
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

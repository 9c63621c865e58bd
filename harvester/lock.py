"""One harvest per output folder at a time: an advisory ``flock`` on ``DIR/.lock``.

The kernel drops the lock when the holding process dies, however it dies, so a crashed run
never leaves a stale lock behind.
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
        yield
    finally:
        os.close(fd)

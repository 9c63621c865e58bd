"""One harvest per output folder at a time: an advisory ``flock`` on ``DIR/.lock``.

The kernel drops the lock when the holding process dies, however it dies, so a crashed run
never leaves a stale lock behind. The holder writes its pid into the file and empties it when
it is done; ``holder`` reads that pid (without taking the lock, so a status check can never
make a starting harvest fail).

A process that writes beside the harvests without their lock (``harvester serve``) keeps its
temp files in a folder of its own (``own_temp``), held with a ``flock`` of its own for its
whole life: no run's start empties it, and the next such process removes it once its owner is
gone, however it went.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager

from harvester.errors import LockedError, OutputError
from harvester.storage.files import unlink_quietly
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


def _own_lock(folder: str) -> str:
    return f"{folder}.lock"


@contextmanager
def own_temp(layout: Layout) -> Iterator[None]:
    """Hold ``layout``'s own temp folder (``Layout.with_own_temp``) while the block runs: the
    folders of owners that are gone are removed first, this one is made and its ``flock``
    taken (beside it, ``<name>.lock``), and it is removed at the end. ``OutputError`` if it
    cannot be made."""
    if layout.own_temp is None:
        raise ValueError("a layout with a temp folder of its own")
    folder = layout.tmp
    try:
        layout.own_temps.mkdir(parents=True, exist_ok=True)
        sweep_own_temps(layout)
        fd = os.open(_own_lock(str(folder)), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise OutputError(f"cannot make the temp folder {folder}: {exc.strerror or exc}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # a fresh name: nobody else waits for it
        try:
            folder.mkdir(exist_ok=True)
        except OSError as exc:
            raise OutputError(
                f"cannot make the temp folder {folder}: {exc.strerror or exc}"
            ) from exc
        try:
            yield
        finally:
            shutil.rmtree(folder, ignore_errors=True)
            unlink_quietly(_own_lock(str(folder)))
    finally:
        os.close(fd)


def sweep_own_temps(layout: Layout) -> int:
    """Remove the own temp folders whose owner is gone (its ``flock`` is free); how many."""
    removed = 0
    try:
        entries = list(os.scandir(layout.own_temps))
    except FileNotFoundError:
        return 0
    for entry in entries:
        if not entry.is_dir(follow_symlinks=False):
            continue
        lock = _own_lock(entry.path)
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its owner runs
            shutil.rmtree(entry.path, ignore_errors=True)
            unlink_quietly(lock)
            removed += 1
        finally:
            os.close(fd)
    return removed

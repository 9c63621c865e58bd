"""Where things live inside an output folder.

DIR/images/<aa>/<sha256>.<ext>       content-addressed image store
DIR/manifest/<run_id>/part-N.parquet  the manifest dataset (immutable parts)
DIR/runs/<run_id>.json                one small record per run
DIR/.tmp/                             temp files; emptied at the start of every run
DIR/.serve-tmp/<run_id>/              a server's own temp files (``harvester serve``), which
                                      no run empties; removed when it stops, or once it is
                                      gone (storage.lock.own_temp)
DIR/inbox/                            webhook deliveries (``harvester serve``; storage.inbox)
DIR/.lock                             held (flock) while a harvest, compact or verify runs
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from harvester.errors import OutputError

OWN_TEMP: Final = ".serve-tmp"
"""The folder of the temp folders of processes that run beside a harvest without its lock."""


def image_relpath(sha256: str, ext: str) -> str:
    """A stored image's key: ``images/ab/ab12...ef.png``."""
    return f"images/{sha256[:2]}/{sha256}.{ext}"


@dataclass(frozen=True, slots=True)
class Layout:
    root: Path
    own_temp: str | None = None
    """The name of a temp folder of its own (``OWN_TEMP/<name>``) instead of the runs'
    ``.tmp``: for a process that writes beside a harvest and must not lose its temp files
    to a harvest's start."""

    def with_own_temp(self, name: str) -> Layout:
        """This layout with its temp files in ``OWN_TEMP/<name>``."""
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"not a temp folder's name: {name!r}")
        return Layout(self.root, name)

    @property
    def own_temps(self) -> Path:
        return self.root / OWN_TEMP

    @property
    def images(self) -> Path:
        return self.root / "images"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def tmp(self) -> Path:
        """Where temp files go: ``.tmp`` (a run's; emptied at every run's start), or this
        layout's own temp folder."""
        if self.own_temp is not None:
            return self.own_temps / self.own_temp
        return self.root / ".tmp"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    def temp_path(self, suffix: str = "") -> Path:
        """A fresh temp file name (same file system as the store, so renames are atomic)."""
        return self.tmp / f"{uuid.uuid4().hex}{suffix}"

    def prepare(self) -> None:
        """Create the folders and check the root is writable, with a clear error if not."""
        if self.root.exists() and not self.root.is_dir():
            raise OutputError(f"--out {self.root} is a file, not a folder; give a folder path")
        self._refuse_linked_temp()
        try:
            for folder in (self.root, self.images, self.manifest, self.runs, self.tmp):
                folder.mkdir(parents=True, exist_ok=True)
            probe = self.temp_path(".probe")
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as exc:
            raise OutputError(
                f"cannot write to output folder {self.root}: {exc.strerror or exc}; "
                "check it exists, is writable by this user and has free space"
            ) from exc

    def _refuse_linked_temp(self) -> None:
        """The temp folder is emptied (at every run, or when its owner is gone): as a link, it
        would empty whatever it points to."""
        if self.tmp.is_symlink():
            raise OutputError(
                f"{self.tmp} is a symbolic link; the harvester empties that folder at the start "
                "of every run, so it must be a real folder inside the output folder. Remove the "
                "link (not its target) and run again"
            )

    def clean_temp(self) -> int:
        """Remove temp files a dead run left behind; returns how many. Call with the lock held."""
        self._refuse_linked_temp()
        removed = 0
        if not self.tmp.is_dir():
            return 0
        for entry in os.scandir(self.tmp):
            try:
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)
                removed += 1
            except FileNotFoundError:
                continue
        return removed

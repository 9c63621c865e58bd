"""The inbox: webhook deliveries kept durably in the output until they are harvested, and a
while after.

    inbox/deliveries/<aa>/<sha256 of the request id>.delivery   one per request, create-once
    inbox/done/<aa>/<sha256 of the request id>                  its rows are in the manifest
    inbox/.tmp/                                                 a folder's temp files

The inbox is a place of its own: a harvest's start empties ``.tmp``, never this. A delivery is
named by its request id, so a repeated delivery (fal retries) finds its name taken and is not
stored twice. ``put`` returns only once the delivery is durable: in a folder, written, fsynced,
linked to its name (the link fails if the name is taken) and its folder fsynced; in a bucket,
a create-once put. A file holds one JSON line (request id, model, account, time received),
then the raw body as received.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Final

import anyio

from harvester.errors import OutputError
from harvester.storage.objects import LocalStore, Store

DELIVERIES: Final = "inbox/deliveries/"
DONE: Final = "inbox/done/"
TEMP: Final = "inbox/.tmp"
SUFFIX: Final = ".delivery"
_CREATE: Final = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
_names = itertools.count()


@dataclass(frozen=True, slots=True)
class Delivery:
    """One delivery as received: what the signature vouched for, and the raw body."""

    request_id: str
    model: str | None
    """From the URL the user registered (``?model=``); None if it named none."""
    user_id: str
    received_at: datetime
    body: bytes

    def encode(self) -> bytes:
        head = {
            "request_id": self.request_id,
            "model": self.model,
            "user_id": self.user_id,
            "received_at": self.received_at.isoformat(),
        }
        return json.dumps(head, ensure_ascii=True).encode() + b"\n" + self.body

    @classmethod
    def decode(cls, data: bytes) -> Delivery:
        """``ValueError`` if ``data`` is not a delivery file."""
        line, sep, body = data.partition(b"\n")
        head = json.loads(line)
        if not sep or not isinstance(head, dict) or not isinstance(head.get("request_id"), str):
            raise ValueError("not a delivery file")
        model = head.get("model")
        return cls(
            request_id=head["request_id"],
            model=model if isinstance(model, str) else None,
            user_id=str(head.get("user_id", "")),
            received_at=datetime.fromisoformat(str(head["received_at"])),
            body=body,
        )


def delivery_key(request_id: str) -> str:
    """The key of a request's delivery: one per request id, whatever its characters."""
    digest = hashlib.sha256(request_id.encode("utf-8", "surrogatepass")).hexdigest()
    return f"{DELIVERIES}{digest[:2]}/{digest}{SUFFIX}"


def _done_key(key: str) -> str:
    return DONE + key.removeprefix(DELIVERIES).removesuffix(SUFFIX)


def is_delivery_key(text: str | None) -> bool:
    """True for a delivery's key (what delivered rows hold as their ``source_file``)."""
    return bool(text) and str(text).startswith(DELIVERIES) and str(text).endswith(SUFFIX)


class Inbox:
    """The inbox of one output location, through its ``Store``."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._root = store.layout.root if isinstance(store, LocalStore) else None
        self._folders: set[Path] = set()

    @property
    def location(self) -> str:
        return f"{self._store.location.rstrip('/')}/inbox"

    async def put(self, delivery: Delivery) -> bool:
        """Store ``delivery`` durably unless its request's delivery is there: True if stored
        now, False if it was there already. Raises ``OutputError``."""
        key = delivery_key(delivery.request_id)
        data = delivery.encode()
        if self._root is None:
            return await self._store.put_new_async(key, data)
        return await anyio.to_thread.run_sync(self._put_local, self._root, key, data)

    def _put_local(self, root: Path, key: str, data: bytes) -> bool:
        final = root / key
        try:
            try:
                return self._write_link(root, final, data)
            except FileNotFoundError:
                # A folder this process made was removed since (an expiry removes the folders
                # it leaves empty): made again, once.
                self._folders.discard(final.parent)
                self._folders.discard(root / TEMP)
                return self._write_link(root, final, data)
        except OSError as exc:
            where = final.parent
            raise OutputError(f"cannot store a delivery in {where}: {exc.strerror or exc}") from exc

    def _write_link(self, root: Path, final: Path, data: bytes) -> bool:
        temp = root / TEMP
        self._folder(final.parent)
        self._folder(temp)
        tmp = temp / f"{os.getpid()}-{next(_names)}.new"
        fd = os.open(tmp, _CREATE, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, final)
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_folder(final.parent)
        return True

    def _folder(self, folder: Path) -> None:
        """Make ``folder`` (and its parents) durably, once per process (until a write finds it
        gone)."""
        if folder in self._folders:
            return
        missing = [f for f in (folder, *folder.parents) if not f.exists()]
        folder.mkdir(parents=True, exist_ok=True)
        for made in missing:
            _fsync_folder(made.parent)
        self._folders.add(folder)

    def read(self, key: str) -> Delivery:
        """``OutputError`` if it cannot be read, ``ValueError`` if it is not a delivery."""
        try:
            data = self._store.get(key)
        except OSError as exc:
            raise OutputError(f"cannot read delivery {key}: {exc.strerror or exc}") from exc
        return Delivery.decode(data)

    def pending(self) -> list[str]:
        """The keys of deliveries not marked done, oldest first."""
        done = {info.key for info in self._store.list(DONE)}
        found = [
            info
            for info in self._store.list(DELIVERIES)
            if info.key.endswith(SUFFIX) and _done_key(info.key) not in done
        ]
        return [info.key for info in sorted(found, key=lambda info: info.modified)]

    def mark_done(self, key: str) -> None:
        """Record that ``key``'s rows are in the manifest (create-once; again is nothing)."""
        self._store.put_new(_done_key(key), b"")

    def expire(self, before: datetime) -> int:
        """Remove deliveries marked done before ``before`` (then their marks); how many."""
        removed = 0
        for info in list(self._store.list(DONE)):
            if info.modified < before:
                delivery = DELIVERIES + info.key.removeprefix(DONE) + SUFFIX
                self._store.delete(delivery)
                self._store.delete(info.key)
                removed += 1
        return removed

    def problem(self) -> str | None:
        """Why a delivery cannot be stored now, or None: a probe is written and removed."""
        probe = f"inbox/.probe/{os.getpid()}-{uuid.uuid4().hex}"
        try:
            if self._root is not None:
                self._folder(self._root / "inbox/.probe")
                (self._root / probe).write_bytes(b"")
                (self._root / probe).unlink()
                for place in (DELIVERIES, DONE, TEMP):
                    folder = self._root / place
                    if folder.exists() and not folder.is_dir():
                        return f"{folder} is not a folder"
                    if folder.is_dir() and not os.access(folder, os.W_OK):
                        return f"{folder} is not writable"
            else:
                self._store.put_new(probe, b"")
                self._store.delete(probe)
        except OSError as exc:
            self._folders.clear()  # made again (and checked) by the next write
            return f"cannot write to {self.location}: {exc.strerror or exc}"
        except OutputError as exc:
            return str(exc)
        return None


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = [
    "DELIVERIES",
    "Delivery",
    "Inbox",
    "delivery_key",
    "is_delivery_key",
]

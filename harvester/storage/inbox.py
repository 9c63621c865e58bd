"""The inbox: webhook deliveries kept durably in the output until they are harvested, and a
while after.

    inbox/deliveries/<aa>/<sha256 of the request id>.delivery   one per request, create-once
    inbox/done/<aa>/<sha256 of the request id>                  its rows are in the manifest
    inbox/.tmp/                                                 a folder's temp files

The inbox is a place of its own: a harvest's start empties ``.tmp``, never this. A delivery is
named by its request id, so a repeated delivery (fal retries) finds its name taken and is not
stored twice. ``put`` returns only once the delivery is durable (the store's durable
``put_new``: in a folder, written, fsynced, linked to its name, which fails if the name is
taken, and its folder fsynced; in a bucket, a create-once put). A file holds one JSON line
(request id, model, account, time received), then the raw body as received.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import os
import uuid
from collections.abc import Iterator, Set
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from harvester.errors import OutputError
from harvester.storage.objects import ObjectInfo, Store

DELIVERIES: Final = "inbox/deliveries/"
DONE: Final = "inbox/done/"
SUFFIX: Final = ".delivery"


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

    @property
    def location(self) -> str:
        return f"{self._store.location.rstrip('/')}/inbox"

    async def put(self, delivery: Delivery) -> bool:
        """Store ``delivery`` durably unless its request's delivery is there: True if stored
        now, False if it was there already. Raises ``OutputError``."""
        key = delivery_key(delivery.request_id)
        return await self._store.put_new_async(key, delivery.encode(), durable=True)

    def read(self, key: str) -> Delivery:
        """``OutputError`` if it cannot be read, ``ValueError`` if it is not a delivery."""
        try:
            data = self._store.get(key)
        except OSError as exc:
            raise OutputError(f"cannot read delivery {key}: {exc.strerror or exc}") from exc
        return Delivery.decode(data)

    def pending(self) -> list[str]:
        """The keys of deliveries not marked done, oldest first."""
        return [info.key for info in sorted(self._pending(), key=lambda info: info.modified)]

    def oldest_pending(self, limit: int, *, besides: Set[str]) -> tuple[list[str], int]:
        """The ``limit`` oldest keys of deliveries not marked done and not in ``besides``,
        oldest first, and how many such deliveries there are in all (memory follows the
        limit, not the inbox)."""
        count = 0

        def counted() -> Iterator[ObjectInfo]:
            nonlocal count
            for info in self._pending():
                if info.key not in besides:
                    count += 1
                    yield info

        oldest = heapq.nsmallest(limit, counted(), key=lambda info: info.modified)
        return [info.key for info in oldest], count

    def _pending(self) -> Iterator[ObjectInfo]:
        done = {info.key for info in self._store.list(DONE)}
        for info in self._store.list(DELIVERIES):
            if info.key.endswith(SUFFIX) and _done_key(info.key) not in done:
                yield info

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
        """Why a delivery cannot be stored now, or None: a probe is stored beside the
        deliveries, as durably, and removed."""
        probe = f"{DELIVERIES}.probe/{os.getpid()}-{uuid.uuid4().hex}"
        try:
            self._store.put_new(probe, b"", durable=True)
            self._store.delete(probe)
        except OutputError as exc:
            return str(exc)
        return None


__all__ = [
    "DELIVERIES",
    "Delivery",
    "Inbox",
    "delivery_key",
    "is_delivery_key",
]

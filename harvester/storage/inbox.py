"""The inbox: webhook deliveries kept durably in the output until they are harvested, and a
while after.

    inbox/deliveries/<aa>/<sha256 of the request id>.delivery   one per request, create-once
    inbox/done/<aa>/<sha256 of the request id>                  its rows are in the manifest
    inbox/claims/<aa>/<sha256 of the request id>.<n>            who harvests it, create-once
    inbox/owners/<run id>.json                                  a harvesting process's beat
    inbox/.tmp/                                                 a folder's temp files

The inbox is a place of its own: a harvest's start empties ``.tmp``, never this. A delivery is
named by its request id, so a repeated delivery (fal retries) finds its name taken and is not
stored twice. ``put`` returns only once the delivery is durable (the store's durable
``put_new``: in a folder, written, fsynced, linked to its name, which fails if the name is
taken, and its folder fsynced; in a bucket, a create-once put). A file holds one JSON line
(request id, model, account, time received), then the raw body as received.

Several processes may harvest one inbox (two ``serve`` on one output: a rolling update, two
replicas); each delivery is harvested by one of them. Before harvesting a delivery a process
creates its claim ``.1`` once (``claim``); a process that finds the claim taken leaves the
delivery to its owner while the owner lives. An owner lives while its beat (``beat``, every
``BEAT_EVERY`` seconds) is younger than ``CLAIM_STALE`` seconds and, on the same host, its
process exists; one that stopped cleanly removed its beat (``retire``). A dead owner's claim
``.n`` is taken over by creating ``.n+1`` once (``take_over``): of several processes trying,
one succeeds. Claims are immutable and go when their delivery expires.
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import json
import os
import socket
import uuid
from collections.abc import Iterable, Iterator, Set
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final

from harvester.errors import OutputError
from harvester.storage.objects import ObjectInfo, Store

DELIVERIES: Final = "inbox/deliveries/"
DONE: Final = "inbox/done/"
CLAIMS: Final = "inbox/claims/"
OWNERS: Final = "inbox/owners/"
SUFFIX: Final = ".delivery"
BEAT_EVERY: Final = 10.0
"""Seconds between two beats of a harvesting process."""
CLAIM_STALE: Final = 60.0
"""Seconds after its owner's last beat that a claim is taken over (a process killed on
another host; on the same host, as soon as its process is gone). An owner keeps its claims
however long a harvest and its part take, as long as it beats."""
OWNERS_KEPT: Final = timedelta(days=1)
"""A dead owner's beat is removed this long after it stopped."""


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


@dataclass(frozen=True, slots=True)
class Owner:
    """A process that harvests deliveries: its name (a server's run id) and where it runs."""

    name: str
    host: str
    """The host name, its boot and its process namespace: where ``pid`` means a process."""
    pid: int

    @classmethod
    def here(cls, name: str) -> Owner:
        return cls(name, _host(), os.getpid())

    def encode(self) -> bytes:
        return json.dumps({"owner": self.name, "host": self.host, "pid": self.pid}).encode()

    @classmethod
    def decode(cls, data: bytes) -> Owner:
        """``ValueError`` if ``data`` is not an owner's record."""
        try:
            record = json.loads(data)
            return cls(str(record["owner"]), str(record["host"]), int(record["pid"]))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not an owner's record: {exc}") from exc

    def gone(self) -> bool:
        """True if this owner ran on this host and its process is gone."""
        if self.host != _host():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # someone else's process: alive
            return False
        return False


@dataclass(frozen=True, slots=True)
class Claim:
    """A delivery's newest claim as one process sees it."""

    number: int
    """The claim's ``.n`` (0: none yet)."""
    owner: Owner | None
    """None if unclaimed, or if the claim could not be read."""
    mine: bool
    """This process holds it: harvest."""
    live: bool
    """Held by another process that lives: leave it."""
    fresh: bool = False
    """Created by this call: nobody harvested the delivery before."""

    @property
    def dead(self) -> bool:
        """Claimed by an owner that is gone: to be taken over (``take_over``)."""
        return self.number > 0 and not self.mine and not self.live


@functools.cache
def _host() -> str:
    """This host, its boot and this process's pid namespace (a pid is meaningful within
    them only)."""
    parts = [socket.gethostname()]
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as fh:
            parts.append(fh.read().strip())
        parts.append(os.readlink("/proc/self/ns/pid"))
    except OSError:
        parts.append("?")  # no /proc: an unknown boot, pids not compared
    return " ".join(parts)


def delivery_key(request_id: str) -> str:
    """The key of a request's delivery: one per request id, whatever its characters."""
    digest = hashlib.sha256(request_id.encode("utf-8", "surrogatepass")).hexdigest()
    return f"{DELIVERIES}{digest[:2]}/{digest}{SUFFIX}"


def _done_key(key: str) -> str:
    return DONE + key.removeprefix(DELIVERIES).removesuffix(SUFFIX)


def _claim_key(key: str, number: int) -> str:
    return f"{CLAIMS}{key.removeprefix(DELIVERIES).removesuffix(SUFFIX)}.{number}"


def _claimed(claim_key: str) -> tuple[str, int] | None:
    """``(delivery key, n)`` of a claim's key, None if it is not one."""
    stem, _, number = claim_key.removeprefix(CLAIMS).rpartition(".")
    if not stem or not number.isdigit():
        return None
    return f"{DELIVERIES}{stem}{SUFFIX}", int(number)


def is_delivery_key(text: str | None) -> bool:
    """True for a delivery's key (what delivered rows hold as their ``source_file``)."""
    return bool(text) and str(text).startswith(DELIVERIES) and str(text).endswith(SUFFIX)


class Inbox:
    """The inbox of one output location, through its ``Store``."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._claim_owners: dict[str, Owner | None] = {}
        """Each claim read so far, by its key (claims never change)."""

    @property
    def location(self) -> str:
        return f"{self._store.location.rstrip('/')}/inbox"

    async def put(self, delivery: Delivery) -> bool:
        """Store ``delivery`` durably unless its request's delivery is there: True if stored
        now, False if it was there already. Raises ``OutputError``."""
        key = delivery_key(delivery.request_id)
        return await self._store.put_new_async(key, delivery.encode(), durable=True)

    def _create(self, key: str, data: bytes) -> bool:
        """Create ``key`` once, durably: True if created now, False if it was there."""
        return self._store.put_new(key, data, durable=True)

    def beat(self, owner: Owner) -> None:
        """Say that ``owner`` lives: its claims hold for ``CLAIM_STALE`` seconds from now.
        Raises ``OutputError``."""
        self._store.put(f"{OWNERS}{owner.name}.json", owner.encode())

    def retire(self, owner: Owner) -> None:
        """``owner`` stops: the claims it leaves may be taken over at once."""
        self._store.delete(f"{OWNERS}{owner.name}.json")

    def claim(self, key: str, owner: Owner) -> Claim:
        """Claim ``key``'s delivery for ``owner`` before harvesting it: the first claim is
        created once; a claim there already is ``owner``'s, another process's that lives
        (leave it), or a dead owner's (``Claim.dead``: check whether its rows were written,
        then ``take_over``). Raises ``OutputError``."""
        if self._create(_claim_key(key, 1), owner.encode()):
            self._claim_owners[_claim_key(key, 1)] = owner
            return Claim(1, owner, mine=True, live=False, fresh=True)
        return self.claims([key], owner)[key]

    def take_over(self, key: str, claim: Claim, owner: Owner) -> bool:
        """Claim ``key`` after ``claim``'s dead owner: True if ``owner`` holds it now, False
        if another process took it first. Raises ``OutputError``."""
        taken = _claim_key(key, claim.number + 1)
        if not self._create(taken, owner.encode()):
            return False
        self._claim_owners[taken] = owner
        return True

    def claims(self, keys: Iterable[str], owner: Owner) -> dict[str, Claim]:
        """The newest claim of each of ``keys`` as ``owner`` sees it: one listing of the
        claims and one of the owners' beats; each claim is read once per process. Raises
        ``OutputError``."""
        wanted = set(keys)
        newest: dict[str, tuple[int, ObjectInfo]] = {}
        for info in self._claim_listing(wanted):
            found = _claimed(info.key)
            if (
                found is not None
                and found[0] in wanted
                and found[1] > newest.get(found[0], (0,))[0]
            ):
                newest[found[0]] = (found[1], info)
        beats = {info.key: info.modified for info in self._store.list(OWNERS)} if newest else {}
        now = datetime.now(UTC)
        stale = timedelta(seconds=CLAIM_STALE)
        seen: dict[str, Claim] = {}
        for key in wanted:
            if key not in newest:
                seen[key] = Claim(0, None, mine=False, live=False)
                continue
            number, info = newest[key]
            holder = self._holder(info.key)
            if holder is not None and holder.name == owner.name:
                seen[key] = Claim(number, holder, mine=True, live=False)
                continue
            if holder is None:  # unreadable: taken over once it is old
                live = now - info.modified < stale
            else:
                beat = beats.get(f"{OWNERS}{holder.name}.json")
                live = beat is not None and now - beat < stale and not holder.gone()
            seen[key] = Claim(number, holder, mine=False, live=live)
        return seen

    def _claim_listing(self, keys: set[str]) -> Iterable[ObjectInfo]:
        """The claims of ``keys``' shard folders (all of them for many keys)."""
        shards = sorted({key.removeprefix(DELIVERIES).split("/", 1)[0] for key in keys})
        if len(shards) > 8:
            return list(self._store.list(CLAIMS))
        return [info for shard in shards for info in self._store.list(f"{CLAIMS}{shard}/")]

    def _holder(self, claim_key: str) -> Owner | None:
        if claim_key not in self._claim_owners:
            if len(self._claim_owners) >= 100_000:
                self._claim_owners.clear()
            try:
                self._claim_owners[claim_key] = Owner.decode(self._store.get(claim_key))
            except (OutputError, ValueError):
                return None  # read again next time
        return self._claim_owners[claim_key]

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

    def is_done(self, key: str) -> bool:
        """True if ``key`` is marked done; False if its mark is not there or cannot be read."""
        try:
            self._store.get(_done_key(key))
        except OutputError:
            return False
        return True

    def mark_done(self, key: str) -> None:
        """Record that ``key``'s rows are in the manifest (create-once; again is nothing)."""
        self._store.put_new(_done_key(key), b"")

    def expire(self, before: datetime) -> int:
        """Remove deliveries marked done before ``before`` (their claims first, their marks
        last), and the beats of owners dead for ``OWNERS_KEPT``; how many deliveries."""
        marks = [info.key for info in self._store.list(DONE) if info.modified < before]
        expired = {DELIVERIES + mark.removeprefix(DONE) + SUFFIX for mark in marks}
        if expired:
            for info in list(self._store.list(CLAIMS)):
                found = _claimed(info.key)
                if found is not None and found[0] in expired:
                    self._store.delete(info.key)
                    self._claim_owners.pop(info.key, None)
        for mark in marks:
            self._store.delete(DELIVERIES + mark.removeprefix(DONE) + SUFFIX)
            self._store.delete(mark)
        gone = datetime.now(UTC) - OWNERS_KEPT
        for info in list(self._store.list(OWNERS)):
            if info.modified < gone:
                self._store.delete(info.key)
        return len(marks)

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
    "BEAT_EVERY",
    "CLAIM_STALE",
    "DELIVERIES",
    "Claim",
    "Delivery",
    "Inbox",
    "Owner",
    "delivery_key",
    "is_delivery_key",
]

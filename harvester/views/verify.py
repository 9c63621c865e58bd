"""``harvester verify``: re-hash every stored image against the manifest.

Finds manifest rows whose file is missing, files whose bytes no longer match their name or
the manifest's sha256 (corrupt), files whose magic number says PNG, JPEG, WebP or GIF but whose
header gives no width and height (not images: framing around other bytes), files under
``images/`` that no manifest row points at (orphans), and manifest parts that cannot be read.
It holds the output folder's lock while it checks, so a harvest in progress cannot make its
unfinished work look like orphans. A server (``harvester serve``) takes no lock and writes its
rows a part at a time (``--flush-every``) after their images: a file no part names yet that was
stored since a server still serving started is counted as ``awaiting`` (checked, not judged an
orphan).
"""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Final

import pyarrow as pa

from harvester.errors import OutputError
from harvester.storage import manifest, runs
from harvester.storage.imageinfo import HEADER_BYTES, claimed_format, read_info
from harvester.storage.objects import Location, Store, as_store

_NAME: Final = re.compile(r"([0-9a-f]{64})\.[a-z0-9]+")
CLOCK_SLACK: Final = timedelta(seconds=5)
"""A file's time and a server's start come from different clocks (the disk's or the bucket's,
the server's): files this much older than a server's start are its, too."""


@dataclass(slots=True)
class VerifyReport:
    files_checked: int = 0
    bytes_checked: int = 0
    parts_checked: int = 0
    missing: list[str] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)
    not_images: list[str] = field(default_factory=list)
    """Files whose magic number claims PNG, JPEG, WebP or GIF and whose header cannot be read."""
    orphans: list[str] = field(default_factory=list)
    unreadable_parts: list[str] = field(default_factory=list)
    unjudged: int = 0
    """Files no readable part points at while some part is unreadable: maybe orphans."""
    awaiting: int = 0
    """Files no part names yet, stored since a server that still serves started: its rows
    come with its next part."""
    servers: list[str] = field(default_factory=list)
    """The run ids of the servers serving while this check ran."""

    @property
    def ok(self) -> bool:
        return not (
            self.missing or self.corrupt or self.not_images or self.orphans or self.unreadable_parts
        )

    def summary(self, limit: int = 10) -> str:
        lines = [
            f"checked {self.files_checked:,} image files ({self.bytes_checked:,} bytes) and "
            f"{self.parts_checked:,} manifest parts: {len(self.missing)} missing, "
            f"{len(self.corrupt)} corrupt, {len(self.orphans)} orphans, "
            f"{len(self.unreadable_parts)} unreadable parts, "
            f"{len(self.not_images)} not images"
        ]
        for label, items in (
            ("missing", self.missing),
            ("corrupt", self.corrupt),
            ("not an image", self.not_images),
            ("orphan", self.orphans),
            ("unreadable part", self.unreadable_parts),
        ):
            lines += [f"  {label}: {item}" for item in items[:limit]]
            if len(items) > limit:
                lines.append(f"  ... and {len(items) - limit:,} more {label} entries")
        if self.awaiting:
            lines.append(
                f"  {self.awaiting:,} files stored since a running server started "
                f"({', '.join(self.servers)}) are not named by a part yet: a server writes its "
                "rows every --flush-every seconds; not judged (run verify again later)"
            )
        if self.unjudged:
            lines.append(
                f"  {self.unjudged:,} files are not referenced by any readable part; with "
                "unreadable parts, whether they are orphans cannot be told"
            )
        if self.missing or self.corrupt:
            lines.append(
                "  missing or corrupt files are usually a power loss (images are not fsynced) "
                "or a hand edit: their manifest rows name the requests; harvest those into a "
                "fresh folder (a CSV of model,request_id) to fetch them again while the API "
                "still has them"
            )
        if self.not_images:
            lines.append(
                "  not images: the magic number names an image format, but no width and "
                "height can be read after it (the server sent framing around other bytes); "
                "their manifest rows name the requests"
            )
        if self.orphans:
            lines.append(
                "  orphans are usually left by a run killed before it wrote its rows: "
                "harvesting the same inputs again records them"
            )
        return "\n".join(lines)


def _judge_header(rel: str, head: bytes, report: VerifyReport) -> None:
    """A file whose magic number claims a format ``read_info`` reads, yet it reads nothing."""
    claimed = claimed_format(head)
    if claimed is not None and read_info(head) is None:
        report.not_images.append(f"{rel} (starts like a {claimed}; its header has no size)")


def _referenced(store: Store, report: VerifyReport) -> dict[str, set[str]]:
    """``path -> {sha256}`` from every readable part (each read whole, every page, one in
    memory at a time); unreadable parts go into the report."""
    referenced: dict[str, set[str]] = defaultdict(set)
    keys = [i.key for i in store.list("manifest/") if i.key.endswith(".parquet")]
    for key in keys:
        report.parts_checked += 1
        try:
            table = manifest.read_part(store.get(key))
            paths = table.column("path").to_pylist()
            shas = table.column("sha256").to_pylist()
        except (OutputError, OSError, pa.ArrowException, KeyError) as exc:
            report.unreadable_parts.append(f"{key}: {exc}")
            continue
        for path, sha in zip(paths, shas, strict=True):
            if path is not None:
                referenced[path].add(sha)
    return referenced


def _check(store: Store, key: str, expected: str, report: VerifyReport) -> None:
    """Hash one image as it streams in (memory stays bounded); a mismatch with ``expected``
    (or its own name) makes it corrupt, a header that says nothing not an image."""
    report.files_checked += 1
    digest = hashlib.sha256()
    head = b""
    try:
        for chunk in store.iter_bytes(key):
            digest.update(chunk)
            report.bytes_checked += len(chunk)
            if len(head) < HEADER_BYTES:
                head += chunk[: HEADER_BYTES - len(head)]
    except OutputError as exc:
        report.corrupt.append(f"{key} (cannot be read: {exc})")
        return
    actual = digest.hexdigest()
    if actual != expected or not key.rsplit("/", 1)[-1].startswith(actual):
        report.corrupt.append(key)
    else:
        _judge_header(key, head, report)


def verify(where: Store | Location) -> VerifyReport:
    """Check a harvest (a store, or its location); holds its lock while it checks
    (``LockedError`` while a harvest runs on it)."""
    store = as_store(where)
    report = VerifyReport()
    with store.lock(owner="harvester verify", read_only_ok=True):
        now = datetime.now(UTC)
        host = runs.this_host()
        servers = [r for r in runs.read_all(store)[0] if r.is_live(now, host=host)]
        report.servers = [r.run_id for r in servers]
        referenced = _referenced(store, report)
        stored = {info.key: info.modified for info in store.list("images/")}
        for rel, shas in sorted(referenced.items()):
            check = partial(_check, store, rel)
            _judge_named(report, rel, shas, exists=rel in stored, check=check)
        since = min((r.started_at for r in servers), default=None)
        for key in sorted(stored.keys() - referenced.keys()):
            check = partial(_check, store, key)
            if since is not None and stored[key] >= since - CLOCK_SLACK:
                before = len(report.corrupt)
                check(key.rsplit("/", 1)[-1].split(".", 1)[0], report)
                report.awaiting += len(report.corrupt) == before
                continue
            _judge_unnamed(report, key, key.rsplit("/", 1)[-1], check)
    return report


def _judge_named(
    report: VerifyReport,
    rel: str,
    shas: set[str],
    *,
    exists: bool,
    check: Callable[[str, VerifyReport], None],
) -> None:
    """An image the manifest names: missing, named with two sha256s, or checked."""
    if not exists:
        report.missing.append(rel)
    elif len(shas) > 1:
        report.corrupt.append(f"{rel} (manifest rows disagree on its sha256)")
    else:
        check(next(iter(shas)) or "", report)


def _judge_unnamed(
    report: VerifyReport, rel: str, name: str, check: Callable[[str, VerifyReport], None]
) -> None:
    """A stored image no manifest row names: corrupt if its bytes are not its name's sha256,
    else an orphan (or not judged while a manifest part cannot be read)."""
    match = _NAME.fullmatch(name)
    before = len(report.corrupt)
    check(match.group(1) if match else "", report)
    if len(report.corrupt) > before:
        return
    if report.unreadable_parts:
        report.unjudged += 1
    else:
        report.orphans.append(rel)

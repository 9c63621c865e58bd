"""``harvester verify``: re-hash every stored image against the manifest.

Finds manifest rows whose file is missing, files whose bytes no longer match their name or
the manifest's sha256 (corrupt), files under ``images/`` that no manifest row points at
(orphans), and manifest parts that cannot be read.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import polars as pl
import pyarrow.parquet as pq

from harvester import manifest
from harvester.layout import Layout

_NAME: Final = re.compile(r"([0-9a-f]{64})\.[a-z0-9]+")


@dataclass(slots=True)
class VerifyReport:
    files_checked: int = 0
    bytes_checked: int = 0
    parts_checked: int = 0
    missing: list[str] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)
    unreadable_parts: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.corrupt or self.orphans or self.unreadable_parts)

    def summary(self, limit: int = 10) -> str:
        lines = [
            f"checked {self.files_checked:,} image files ({self.bytes_checked:,} bytes) and "
            f"{self.parts_checked:,} manifest parts: {len(self.missing)} missing, "
            f"{len(self.corrupt)} corrupt, {len(self.orphans)} orphans, "
            f"{len(self.unreadable_parts)} unreadable parts"
        ]
        for label, items in (
            ("missing", self.missing),
            ("corrupt", self.corrupt),
            ("orphan", self.orphans),
            ("unreadable part", self.unreadable_parts),
        ):
            lines += [f"  {label}: {item}" for item in items[:limit]]
            if len(items) > limit:
                lines.append(f"  ... and {len(items) - limit:,} more {label} entries")
        return "\n".join(lines)


def _sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def verify(out_dir: Path) -> VerifyReport:
    layout = Layout(out_dir)
    report = VerifyReport()
    parts = sorted(layout.manifest.glob("*/*.parquet"))
    for part in parts:
        report.parts_checked += 1
        try:
            pq.read_metadata(part)
        except (OSError, ValueError) as exc:  # pyarrow raises ArrowInvalid (a ValueError)
            report.unreadable_parts.append(f"{part.relative_to(out_dir)}: {exc}")
    referenced: dict[str, str] = {}
    if parts and not report.unreadable_parts:
        stored = (
            manifest.scan(out_dir)
            .filter(pl.col("path").is_not_null())
            .select("path", "sha256")
            .unique()
            .collect()
        )
        referenced = dict(zip(stored["path"].to_list(), stored["sha256"].to_list(), strict=True))
    for rel, sha in referenced.items():
        path = out_dir / rel
        if not path.is_file():
            report.missing.append(rel)
            continue
        report.files_checked += 1
        report.bytes_checked += path.stat().st_size
        if _sha256(path) != sha or not path.name.startswith(sha):
            report.corrupt.append(rel)
    if layout.images.is_dir():
        for path in layout.images.rglob("*"):
            if not path.is_file():
                continue
            rel = path.relative_to(out_dir).as_posix()
            if rel in referenced:
                continue
            match = _NAME.fullmatch(path.name)
            report.files_checked += 1
            report.bytes_checked += path.stat().st_size
            if match is None or _sha256(path) != match.group(1):
                report.corrupt.append(rel)
            else:
                report.orphans.append(rel)
    return report

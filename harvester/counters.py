"""What a harvest did, in numbers: one type from a lane to a shard's result, the run's total,
the run record, the summary, ``status`` and the metrics file, and one way to add two.

Storage, run and views all read it; it imports none of them.
"""

from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Final


@dataclass(slots=True, kw_only=True)
class Counters:
    """Counts that add up across lanes, shards and the driver (``a + b``), and three gauges
    (``lowest_rps``, ``waiting``, ``waiting_until``: a moment's, so the run record keeps
    none of them)."""

    skipped: int = 0
    """Requests already ok in earlier runs (or given up on), not fetched again."""
    duplicates: int = 0
    """Input rows whose pair came earlier in the inputs."""
    requests: Counter[str] = field(default_factory=Counter)
    """Finished requests by status."""
    images_new: int = 0
    images_existing: int = 0
    images_failed: int = 0
    bytes_new: int = 0
    """Image bytes added to the store (new files only)."""
    bytes_downloaded: int = 0
    result_requests: int = 0
    """Result requests that reached the wire, retries included."""
    retries: int = 0
    throttled: int = 0
    """429 answers."""
    manifest_rows: int = 0
    manifest_parts: int = 0
    nodes: tuple[str, ...] = ()
    """The Ray nodes the shards ran on, sorted (none on one machine)."""
    lowest_rps: float = 0.0
    """The rate limiters' lowest rate so far, summed over the shards."""
    waiting: int = 0
    """Requests waiting for a pending result now (``--pending-wait``)."""
    waiting_until: float = 0.0
    """Unix time the last of them stops waiting."""

    @property
    def done(self) -> int:
        return sum(self.requests.values())

    def __add__(self, other: Counters) -> Counters:
        return Counters(
            **{
                name: _MERGE.get(name, operator.add)(getattr(self, name), getattr(other, name))
                for name in _NAMES
            }
        )

    def to_json(self, *, gauges: bool = False) -> dict[str, Any]:
        """The counts as the run record writes them (its key names); ``gauges``: the gauges
        too (a shard's progress)."""
        data = {
            "skipped_already_ok": self.skipped,
            "duplicate_rows": self.duplicates,
            "requests": dict(self.requests),
            "images": {
                "new": self.images_new,
                "already_stored": self.images_existing,
                "failed": self.images_failed,
            },
            "bytes_new": self.bytes_new,
            "bytes_downloaded": self.bytes_downloaded,
            "result_requests": self.result_requests,
            "retries": self.retries,
            "rate_limited": self.throttled,
            "manifest_rows": self.manifest_rows,
            "manifest_parts": self.manifest_parts,
            **({"nodes": list(self.nodes)} if self.nodes else {}),
        }
        if gauges:
            data |= {"lowest_rps": self.lowest_rps, "waiting": self.waiting}
            data["waiting_until"] = self.waiting_until
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Counters:
        """Read ``to_json``'s keys (any missing one is 0); raises TypeError, ValueError or
        AttributeError for values that are not counts."""
        images = data.get("images") or {}

        def count(value: Any) -> int:
            return int(value or 0)

        return cls(
            skipped=count(data.get("skipped_already_ok")),
            duplicates=count(data.get("duplicate_rows")),
            requests=Counter({str(k): count(v) for k, v in (data.get("requests") or {}).items()}),
            images_new=count(images.get("new")),
            images_existing=count(images.get("already_stored")),
            images_failed=count(images.get("failed")),
            bytes_new=count(data.get("bytes_new")),
            bytes_downloaded=count(data.get("bytes_downloaded")),
            result_requests=count(data.get("result_requests")),
            retries=count(data.get("retries")),
            throttled=count(data.get("rate_limited")),
            manifest_rows=count(data.get("manifest_rows")),
            manifest_parts=count(data.get("manifest_parts")),
            nodes=tuple(str(n) for n in data.get("nodes") or ()),
            lowest_rps=float(data.get("lowest_rps") or 0),
            waiting=count(data.get("waiting")),
            waiting_until=float(data.get("waiting_until") or 0),
        )


_NAMES: Final = tuple(f.name for f in fields(Counters))
_MERGE: Final[dict[str, Callable[[Any, Any], Any]]] = {
    "nodes": lambda a, b: tuple(sorted({*a, *b})),
    "waiting_until": max,
}
"""How a field adds up, where it is not ``+``."""

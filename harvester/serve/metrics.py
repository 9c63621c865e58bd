"""``GET /metrics``: what ``harvester serve`` has done since it started, in Prometheus' text
format (deliveries stored, repeated, refused by reason, answered 503; the backlog; what the
intake harvested; how long acknowledging took), written by ``views.metrics.exposition``."""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, field
from typing import Final

from harvester.counters import Counters
from harvester.views.metrics import Family, Sample, exposition

ACK_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
"""Seconds: upper bounds of the acknowledgement latency histogram."""


@dataclass(slots=True)
class Latency:
    """A Prometheus histogram of seconds."""

    counts: list[int] = field(default_factory=lambda: [0] * len(ACK_BUCKETS))
    total: float = 0.0
    count: int = 0

    def observe(self, seconds: float) -> None:
        index = bisect.bisect_left(ACK_BUCKETS, seconds)
        if index < len(self.counts):
            self.counts[index] += 1
        self.total += seconds
        self.count += 1

    def samples(self) -> list[Sample]:
        """The histogram's samples: cumulative buckets, then its sum and count."""
        out: list[Sample] = []
        running = 0
        for bound, count in zip(ACK_BUCKETS, self.counts, strict=True):
            running += count
            out.append(("_bucket", {"le": f"{bound:g}"}, running))
        out.append(("_bucket", {"le": "+Inf"}, self.count))
        out += [("_sum", {}, round(self.total, 6)), ("_count", {}, self.count)]
        return out


def render(
    *,
    stored: int,
    repeated: int,
    unavailable: int,
    refused: Counter[str],
    backlog: int,
    failed: Counter[str],
    harvested: Counters,
    latency: Latency,
) -> str:
    """The text of ``/metrics``."""
    images = harvested.images_new + harvested.images_existing

    def one(value: float) -> list[Sample]:
        return [("", {}, value)]

    def by(label: str, counts: Counter[str]) -> list[Sample]:
        return [("", {label: key}, count) for key, count in sorted(counts.items())]

    stored_by = {"stored": stored, "repeated": repeated, "unavailable": unavailable}
    return exposition(
        [
            Family(
                "harvester_serve_deliveries_total",
                "counter",
                "Deliveries answered, by outcome.",
                [("", {"outcome": k}, v) for k, v in stored_by.items()],
            ),
            Family(
                "harvester_serve_refused_total",
                "counter",
                "Deliveries refused (401, 408, 413, 400), by reason.",
                by("reason", refused),
            ),
            Family(
                "harvester_serve_harvest_failed_total",
                "counter",
                "Deliveries not harvested (left in the inbox), by error.",
                by("error", failed),
            ),
            Family(
                "harvester_serve_backlog",
                "gauge",
                "Deliveries stored and not yet harvested.",
                one(backlog),
            ),
            Family(
                "harvester_serve_harvested_total",
                "counter",
                "Deliveries harvested into rows.",
                one(harvested.done),
            ),
            Family(
                "harvester_serve_ok_total",
                "counter",
                "Deliveries harvested with every row ok.",
                one(harvested.requests["ok"]),
            ),
            Family(
                "harvester_serve_rows_total",
                "counter",
                "Manifest rows built from deliveries.",
                one(harvested.manifest_rows),
            ),
            Family(
                "harvester_serve_images_total",
                "counter",
                "Images stored (new, or already in the store).",
                one(images),
            ),
            Family(
                "harvester_serve_bytes_new_total",
                "counter",
                "Bytes of images new to the store.",
                one(harvested.bytes_new),
            ),
            Family(
                "harvester_serve_ack_seconds",
                "histogram",
                "From a delivery's arrival to its 200.",
                latency.samples(),
            ),
        ]
    )

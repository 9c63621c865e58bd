"""``GET /metrics``: what ``harvester serve`` has done since it started, in Prometheus' text
format (deliveries stored, repeated, refused by reason, answered 503; the backlog; what the
intake harvested; how long acknowledging took)."""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, field
from typing import Final

from harvester.counters import Counters

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

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for bound, count in zip(ACK_BUCKETS, self.counts, strict=True):
            running += count
            out.append(f'{name}_bucket{{le="{bound:g}"}} {running}')
        out.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        out += [f"{name}_sum {self.total:.6f}", f"{name}_count {self.count}"]
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
    lines = [
        "# HELP harvester_serve_deliveries_total Deliveries answered, by outcome.",
        "# TYPE harvester_serve_deliveries_total counter",
        f'harvester_serve_deliveries_total{{outcome="stored"}} {stored}',
        f'harvester_serve_deliveries_total{{outcome="repeated"}} {repeated}',
        f'harvester_serve_deliveries_total{{outcome="unavailable"}} {unavailable}',
        "# HELP harvester_serve_refused_total Deliveries refused (401, 408, 413, 400), by reason.",
        "# TYPE harvester_serve_refused_total counter",
        *(
            f'harvester_serve_refused_total{{reason="{reason}"}} {count}'
            for reason, count in sorted(refused.items())
        ),
        "# HELP harvester_serve_harvest_failed_total Deliveries not harvested (left in the "
        "inbox), by error.",
        "# TYPE harvester_serve_harvest_failed_total counter",
        *(
            f'harvester_serve_harvest_failed_total{{error="{error}"}} {count}'
            for error, count in sorted(failed.items())
        ),
        "# HELP harvester_serve_backlog Deliveries stored and not yet harvested.",
        "# TYPE harvester_serve_backlog gauge",
        f"harvester_serve_backlog {backlog}",
        "# HELP harvester_serve_harvested_total Deliveries harvested into rows.",
        "# TYPE harvester_serve_harvested_total counter",
        f"harvester_serve_harvested_total {harvested.done}",
        "# HELP harvester_serve_ok_total Deliveries harvested with every row ok.",
        "# TYPE harvester_serve_ok_total counter",
        f"harvester_serve_ok_total {harvested.requests['ok']}",
        "# HELP harvester_serve_rows_total Manifest rows built from deliveries.",
        "# TYPE harvester_serve_rows_total counter",
        f"harvester_serve_rows_total {harvested.manifest_rows}",
        "# HELP harvester_serve_images_total Images stored (new, or already in the store).",
        "# TYPE harvester_serve_images_total counter",
        f"harvester_serve_images_total {images}",
        "# HELP harvester_serve_bytes_new_total Bytes of images new to the store.",
        "# TYPE harvester_serve_bytes_new_total counter",
        f"harvester_serve_bytes_new_total {harvested.bytes_new}",
        "# HELP harvester_serve_ack_seconds From a delivery's arrival to its 200.",
        "# TYPE harvester_serve_ack_seconds histogram",
        *latency.lines("harvester_serve_ack_seconds"),
    ]
    return "\n".join(lines) + "\n"

"""One counters type: how two add up, and the run record's layout both ways."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

from harvester.counters import Counters

SAMPLE = Counters(
    skipped=4,
    duplicates=1,
    requests=Counter({"ok": 3, "failed": 1}),
    images_new=2,
    images_existing=3,
    bytes_new=10,
    bytes_downloaded=12,
    result_requests=5,
    retries=2,
    throttled=1,
    manifest_rows=6,
    manifest_parts=1,
    nodes=("n2",),
    lowest_rps=2.5,
    waiting=1,
    waiting_until=100.0,
)


def test_two_counters_add_up_field_by_field() -> None:
    other = Counters(
        requests=Counter({"ok": 1}),
        images_new=1,
        manifest_parts=2,
        nodes=("n1", "n2"),
        lowest_rps=2.5,
        waiting_until=50.0,
    )
    total = SAMPLE + other
    assert total.requests == Counter({"ok": 4, "failed": 1}) and total.done == 5
    assert (total.images_new, total.bytes_new, total.manifest_parts) == (3, 10, 3)
    assert total.nodes == ("n1", "n2")  # a union, sorted
    assert (total.lowest_rps, total.waiting, total.waiting_until) == (5.0, 1, 100.0)
    assert SAMPLE.requests == Counter({"ok": 3, "failed": 1})  # neither side changes
    assert sum((SAMPLE, other), Counters()) == total


def test_the_record_layout_reads_back_without_the_gauges() -> None:
    data = SAMPLE.to_json()
    assert data["images"] == {"new": 2, "already_stored": 3, "failed": 0}
    assert (data["rate_limited"], data["skipped_already_ok"], data["nodes"]) == (1, 4, ["n2"])
    assert "waiting" not in data and "nodes" not in Counters().to_json()
    assert Counters.from_json(data) == replace(SAMPLE, lowest_rps=0.0, waiting=0, waiting_until=0.0)
    assert Counters.from_json(SAMPLE.to_json(gauges=True)) == SAMPLE
    assert Counters.from_json({}) == Counters()  # an older record's missing keys are 0

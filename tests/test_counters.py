"""One counters type: how two add up, and the run record's layout both ways."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

from harvester.counters import Counters


def test_two_counters_add_up_field_by_field() -> None:
    a = Counters(
        requests=Counter({"ok": 3, "failed": 1}),
        images_new=2,
        bytes_new=10,
        throttled=1,
        nodes=("n2",),
        lowest_rps=2.5,
        waiting=1,
        waiting_until=100.0,
    )
    b = Counters(
        requests=Counter({"ok": 1}),
        images_new=1,
        bytes_new=5,
        manifest_parts=2,
        nodes=("n1", "n2"),
        lowest_rps=2.5,
        waiting_until=50.0,
    )
    total = a + b
    assert total.requests == Counter({"ok": 4, "failed": 1}) and total.done == 5
    assert (total.images_new, total.bytes_new, total.throttled) == (3, 15, 1)
    assert total.manifest_parts == 2
    assert total.nodes == ("n1", "n2")  # a union, sorted
    assert (total.lowest_rps, total.waiting, total.waiting_until) == (5.0, 1, 100.0)
    assert a.requests == Counter({"ok": 3, "failed": 1})  # neither side changes
    assert sum((a, b), Counters()) == total


def test_the_record_layout_reads_back_without_the_gauges() -> None:
    counters = Counters(
        skipped=4,
        duplicates=1,
        requests=Counter({"ok": 2}),
        images_existing=3,
        bytes_downloaded=9,
        result_requests=5,
        retries=2,
        throttled=1,
        manifest_rows=6,
        manifest_parts=1,
        nodes=("n1",),
        waiting=2,
        waiting_until=7.0,
    )
    data = counters.to_json()
    assert data["images"] == {"new": 0, "already_stored": 3, "failed": 0}
    assert (data["rate_limited"], data["skipped_already_ok"], data["nodes"]) == (1, 4, ["n1"])
    assert "waiting" not in data and "nodes" not in Counters().to_json()
    assert Counters.from_json(data) == replace(counters, waiting=0, waiting_until=0.0)
    assert Counters.from_json(counters.to_json(gauges=True)) == counters
    assert Counters.from_json({}) == Counters()  # an older record's missing keys are 0

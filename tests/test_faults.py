"""The issue's 'done when': 2,000 requests through a sandbox injecting 20% mixed faults.

The sandbox runs as its own process (``harvester sandbox --faults mixed=0.2``), the harvest
in this one through ``harvest()``, with a fast retry policy and small time scales. Every
request must end with the status ``expected_status`` says a correct harvester records, and
``harvester verify`` must pass. Counts, never timings.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import polars as pl
import pytest

from harvester.api.retry import RetryPolicy
from harvester.errors import ExitCode
from harvester.run.pipeline import HarvestConfig, harvest
from harvester.sandbox import FaultRates, SandboxConfig, expected_status
from harvester.storage.manifest import latest
from harvester.storage.objects import open_store
from harvester.views.verify import verify
from tests.conftest import KEY, write_csv
from tests.processes import sandbox_process

FAULTS = "mixed=0.2"
REQUESTS = 2_000
MODELS = ("fal-ai/flux/dev", "fal-ai/flux", "fal-ai/flux-pro/v1.1-ultra")


@pytest.mark.slow
def test_two_thousand_requests_under_twenty_percent_faults(tmp_path: Path) -> None:
    pairs = [(MODELS[n % 3], f"night-{n:06d}-c0ffee") for n in range(REQUESTS)]
    csv = write_csv(tmp_path / "export.csv", pairs)
    out = tmp_path / "out"
    world = SandboxConfig(faults=FaultRates.parse(FAULTS))  # the sandbox CLI's seed, 0
    expected = {request_id: expected_status(request_id, world) for _, request_id in pairs}
    # Per-id faults: the sandbox makes some ids permanently not_found / failed / pending.
    assert Counter(expected.values()).keys() == {"ok", "not_found", "failed"}

    with sandbox_process(
        "--faults", FAULTS, "--image-bytes", "1000", "--slow", "0.2", "--retry-after", "0.1"
    ) as sandbox:
        stats = harvest(
            HarvestConfig(
                inputs=(csv,),
                out=open_store(out),
                api_key=KEY,
                base_url=sandbox.base_url,
                rps=1000,
                pending_wait=30,
                retry=RetryPolicy(max_attempts=10, base_delay=0.01, max_delay=0.2, budget=60),
                seed=3,
            )
        )
        served = sandbox.stats()

    state = (
        latest(out)
        .group_by("request_id")
        .agg(pl.col("request_status").first(), pl.col("error").drop_nulls().first())
        .collect()
    )
    got = dict(state.select("request_id", "request_status").iter_rows())
    wrong = {rid: (want, got.get(rid)) for rid, want in expected.items() if got.get(rid) != want}
    assert not wrong, f"{len(wrong)} requests differ (expected, got): {list(wrong.items())[:5]}"
    assert stats.exit_code == ExitCode.INCOMPLETE
    assert dict(stats.counters.requests) == dict(Counter(expected.values()))

    # Every fault kind fired, and the harvester saw what the sandbox did.
    for kind in ("rate_limit", "rate_limit_retry_after", "server_error", "gateway_html"):
        assert served[f"fault_{kind}"] > 0, kind
    for kind in ("reset", "truncate", "slow", "malformed_json"):
        assert served[f"fault_{kind}"] > 0, kind
    assert served["pending_served"] > 0
    assert stats.counters.throttled == served["rate_limited"] > 0
    # The transport resends a GET once when a reused keep-alive connection is closed
    # under it (RFC 9112 section 9.3.1), so only resets can make the server see more.
    assert 0 <= served["result_requests"] - stats.counters.result_requests <= served["fault_reset"]
    assert stats.counters.retries > served["rate_limited"]
    assert served["auth_leaks"] == 0
    summary = stats.summary()
    assert f"{stats.counters.throttled:,} rate-limited (429)" in summary
    assert f"{stats.counters.result_requests:,} result requests (" in summary

    # Expired images are failed rows that keep the rest of their request.
    expired = state.filter(pl.col("error").str.contains("expired or was deleted"))
    assert expired.height == sum(1 for rid in expired["request_id"] if expected[rid] == "failed")
    report = verify(out)
    assert report.ok, report.summary()
    assert report.files_checked == stats.counters.images_new > 4_000
    assert list((out / ".tmp").iterdir()) == []
    print(f"\n{summary}\nsandbox: {served}")  # the figures quoted in the README

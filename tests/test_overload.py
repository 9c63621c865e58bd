"""Overload without collapse (issue 12, item 5): the throttle's math, the sandbox's overload
modes, and a harvest under steady 429s that ends with every pair ok. Counts, never timings;
the rates themselves are measured in ``make bench`` (its ``overload`` section)."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import anyio
import httpx
import polars as pl
import pytest

from harvester.api.ratelimit import (
    K,
    RateLimiter,
    ThrottleWindow,
    _Turns,
    most_starts_in_window,
    reject_share,
    throttled_rate,
)
from harvester.api.retry import RetryPolicy
from harvester.errors import ExitCode
from harvester.run.pipeline import HarvestConfig, harvest
from harvester.sandbox import FaultRates, SandboxConfig, running_sandbox
from harvester.storage.manifest import latest
from harvester.storage.objects import open_store
from harvester.views.verify import verify
from tests.conftest import KEY, write_csv

AUTH = {"Authorization": f"Key {KEY}"}


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


# -- the math ---------------------------------------------------------------------------


def test_reject_share_is_zero_while_the_server_accepts_enough() -> None:
    assert reject_share(100, 90) == 0.0  # a tenth throttled
    assert reject_share(120, 100) == 0.0  # 429 twice for a tenth of the requests
    assert reject_share(100, 100 / K) == 0.0  # exactly K sent per accepted one
    assert reject_share(0, 0) == 0.0


def test_reject_share_follows_the_sre_formula() -> None:
    assert reject_share(100, 40, k=2) == pytest.approx(20 / 101)
    assert reject_share(100, 0, k=2) == pytest.approx(100 / 101)
    assert reject_share(100, 60, k=1.25) == pytest.approx(25 / 101)


def test_throttled_rate_keeps_the_full_rate_under_a_steady_tenth() -> None:
    assert throttled_rate(500, 450, 10, max_rps=50, min_rps=0.5) == 50
    assert throttled_rate(600, 500, 10, max_rps=50, min_rps=0.5) == 50


def test_throttled_rate_sends_k_times_what_the_server_accepts() -> None:
    # A server that accepts 20 a second of the 50 sent: the next rate is K * 20.
    assert throttled_rate(500, 200, 10, max_rps=50, min_rps=0.5) == pytest.approx(K * 20)
    # ... and that is the fixed point: sent K * 20, accepted 20, the rate stays.
    assert throttled_rate(250, 200, 10, max_rps=50, min_rps=0.5) == 50  # 25 sent: no cut
    assert throttled_rate(260, 200, 10, max_rps=50, min_rps=0.5) == pytest.approx(K * 20)


def test_throttled_rate_stays_within_its_bounds() -> None:
    assert throttled_rate(100, 0, 10, max_rps=50, min_rps=0.5) == 0.5
    assert throttled_rate(10, 1, 1, max_rps=50, min_rps=2) == 2
    assert throttled_rate(10_000, 5_000, 10, max_rps=50, min_rps=0.5) == 50


def test_throttle_window_forgets_answers_older_than_its_seconds() -> None:
    window = ThrottleWindow(seconds=10)
    for t in range(20):
        window.add(t + 0.5, accepted=t % 2 == 0)
        window.add(t + 0.6, accepted=True)
    requests, accepts, span = window.totals(19.7)
    assert (requests, accepts) == (20, 15)  # seconds 10..19
    assert span == pytest.approx(9.7)  # from the start of second 10 to now
    assert window.totals(100.0) == (0, 0, 0.0)
    fresh = ThrottleWindow(seconds=10)
    fresh.add(3.2, accepted=True)
    assert fresh.totals(3.4) == (1, 1, 1.0)  # a young window spans at least a second


def test_limiter_keeps_its_rate_when_a_tenth_of_answers_are_429() -> None:
    clock = FakeClock()
    limiter = RateLimiter(50, clock=clock)
    for n in range(2_000):
        clock.now = n / 50
        if n % 10 == 0:
            limiter.on_throttled()
        else:
            limiter.on_success()
    assert limiter.rate == 50
    assert limiter.lowest_rate == 50
    assert limiter.throttled == 200


def test_limiter_settles_at_k_times_the_accepted_rate_and_recovers() -> None:
    clock = FakeClock()
    limiter = RateLimiter(50, clock=clock)
    accepted: list[float] = []
    t = 0.0
    # A server that accepts at most 20 a second (a sliding window), fed at the limiter's rate.
    while t < 60:
        accepted = [a for a in accepted if a > t - 1]
        clock.now = t
        if len(accepted) < 20:
            accepted.append(t)
            limiter.on_success()
        else:
            limiter.on_throttled()
        t += 1 / limiter.rate
    assert limiter.rate == pytest.approx(K * 20, rel=0.1)
    assert limiter.lowest_rate < 50
    # The server accepts everything again: the full rate comes back within a window.
    for n in range(600):
        clock.now = 60 + n / 50
        limiter.on_success()
    assert limiter.rate == 50


@pytest.mark.anyio
async def test_a_429_never_pauses_the_other_requests() -> None:
    clock = FakeClock()
    limiter = RateLimiter(1000, clock=clock)
    for _ in range(5):
        await limiter.acquire()
    limiter.on_throttled()  # a Retry-After is the throttled request's own wait
    await limiter.acquire()
    assert clock.now < 0.01


@pytest.mark.anyio
async def test_repolls_take_their_turn_before_new_requests() -> None:
    turns = _Turns()
    order: list[str] = []

    async def take(name: str, *, first: bool) -> None:
        await turns.acquire(first=first)
        order.append(name)
        turns.release()

    await turns.acquire(first=False)  # a turn in progress
    async with anyio.create_task_group() as tg:
        for name, first in (("new-1", False), ("new-2", False), ("repoll", True)):
            tg.start_soon(partial(take, name, first=first))
            await anyio.wait_all_tasks_blocked()
        turns.release()
    assert order == ["repoll", "new-1", "new-2"]
    await turns.acquire(first=False)  # free again: taken at once
    turns.release()


@pytest.mark.anyio
async def test_a_cancelled_waiter_leaves_the_queue() -> None:
    turns = _Turns()
    order: list[str] = []
    scopes: dict[str, anyio.CancelScope] = {}

    async def take(name: str) -> None:
        with anyio.CancelScope() as scope:
            scopes[name] = scope
            await turns.acquire(first=False)
            order.append(name)
            turns.release()

    await turns.acquire(first=False)
    async with anyio.create_task_group() as tg:
        for name in ("cancelled", "next"):
            tg.start_soon(take, name)
            await anyio.wait_all_tasks_blocked()
        scopes["cancelled"].cancel()
        await anyio.wait_all_tasks_blocked()
        turns.release()
    assert order == ["next"]
    with anyio.fail_after(10):  # a turn handed to the cancelled waiter would hang here
        await turns.acquire(first=False)
    turns.release()


# -- the sandbox's overload modes -------------------------------------------------------


def test_throttle_share_answers_429_n_times_then_the_result() -> None:
    config = SandboxConfig(key=KEY, throttle_share=1.0, throttle_times=2)
    ids = [f"t-{n}" for n in range(40)]
    with running_sandbox(config) as sb, httpx.Client(headers=AUTH, base_url=sb.base_url) as c:
        answers = {rid: [c.get(f"/a/b/requests/{rid}") for _ in range(3)] for rid in ids}
        stats = sb.stats()
        accepted = sb.accepted_starts()
    for rid, (first, second, third) in answers.items():
        assert (first.status_code, second.status_code, third.status_code) == (429, 429, 200), rid
        assert first.headers.get("retry-after") == second.headers.get("retry-after")
    with_header = [rid for rid, a in answers.items() if a[0].headers.get("retry-after") == "1"]
    assert 10 <= len(with_header) <= 30  # about half, drawn per id
    assert stats["throttled_per_id"] == stats["rate_limited"] == 80
    assert len(accepted) == 40


def test_throttle_share_picks_a_stable_share_of_ids() -> None:
    config = SandboxConfig(key=KEY, throttle_share=0.1, throttle_times=1)
    with running_sandbox(config) as sb, httpx.Client(headers=AUTH, base_url=sb.base_url) as c:
        codes = [c.get(f"/a/b/requests/id-{n}").status_code for n in range(400)]
    assert 20 <= codes.count(429) <= 60


def test_max_rps_accepts_at_most_x_in_any_second_of_the_server_clock() -> None:
    config = SandboxConfig(key=KEY, max_rps=3)
    with running_sandbox(config) as sb, httpx.Client(headers=AUTH, base_url=sb.base_url) as c:
        codes = [c.get(f"/a/b/requests/r-{n}").status_code for n in range(30)]
        accepted = sb.accepted_starts()
        arrived = sb.result_starts()
        stats = sb.stats()
    assert codes[:3] == [200, 200, 200]
    assert set(codes) <= {200, 429}
    assert len(arrived) == 30 and len(accepted) == codes.count(200)
    assert most_starts_in_window(accepted) <= 3
    assert stats["over_max_rps"] == codes.count(429)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--throttle-share", "1.5"], "--throttle-share"),
        (["--throttle-times", "0"], "--throttle-times"),
        (["--max-rps", "0"], "--max-rps"),
    ],
)
def test_sandbox_cli_checks_the_overload_options(args: list[str], message: str) -> None:
    from click.testing import CliRunner

    from harvester.cli import main

    result = CliRunner().invoke(main, ["sandbox", "--port", "0", *args])
    assert result.exit_code == 2
    assert message in result.output


def test_sandbox_config_checks_the_overload_fields() -> None:
    with pytest.raises(ValueError, match="throttle_share"):
        SandboxConfig(throttle_share=2)
    with pytest.raises(ValueError, match="throttle_times"):
        SandboxConfig(throttle_times=0)
    with pytest.raises(ValueError, match="max_rps"):
        SandboxConfig(max_rps=0)


# -- a harvest under steady 429s ---------------------------------------------------------


def test_a_harvest_under_steady_429s_ends_ok_with_every_pair_ok(tmp_path: Path) -> None:
    pairs = [("fal-ai/flux/dev", f"night-{n:05d}") for n in range(400)]
    csv = write_csv(tmp_path / "export.csv", pairs)
    out = tmp_path / "out"
    config = SandboxConfig(
        key=KEY,
        image_bytes=1_000,
        throttle_share=0.1,
        throttle_times=2,
        retry_after_seconds=0.2,
        faults=FaultRates(pending_then_done=0.05),
    )
    with running_sandbox(config) as sandbox:
        stats = harvest(
            HarvestConfig(
                inputs=(csv,),
                out=open_store(out),
                api_key=KEY,
                base_url=sandbox.base_url,
                rps=1000,
                pending_wait=30,
                retry=RetryPolicy(base_delay=0.05, max_delay=0.5, budget=60),
                seed=5,
            )
        )
        served = sandbox.stats()

    assert stats.exit_code == ExitCode.OK, stats.summary()
    assert dict(stats.counters.requests) == {"ok": len(pairs)}
    state = latest(out).group_by("request_id").agg(pl.col("status").first()).collect()
    assert state.height == len(pairs)
    assert set(state["status"]) == {"ok"}
    assert served["throttled_per_id"] > 0 and served["pending_served"] > 0
    assert stats.counters.throttled == served["rate_limited"]
    assert verify(out).ok

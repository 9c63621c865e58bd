"""Two harvesting processes on one inbox: each delivery is claimed once and harvested once, a
dead process's claims are taken over, and rows it wrote before its marks are not written
again. Two ``Intake`` objects (each with its own run id, claims and manifest folder) stand for
two ``serve`` processes on one output, on a folder and on Ceph's gateway; the images come from
the sandbox over real sockets."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

import anyio
import polars as pl
import pytest

from harvester.sandbox import Sandbox
from harvester.serve.config import ServeConfig
from harvester.serve.intake import Intake
from harvester.storage import manifest
from harvester.storage.inbox import DELIVERIES, Delivery, Inbox, Owner, delivery_key
from harvester.storage.manifest import ManifestRow, ManifestWriter
from harvester.storage.objects import Store
from tests.conftest import Output
from tests.test_serve import result_of

MODEL = "fal-ai/flux/dev"


def body_of(sandbox: Sandbox, request_id: str) -> bytes:
    payload = result_of(sandbox, request_id)
    return json.dumps(
        {"request_id": request_id, "status": "OK", "payload": payload, "error": None}
    ).encode()


async def store_deliveries(store: Store, sandbox: Sandbox, ids: list[str]) -> list[str]:
    inbox = Inbox(store)
    for request_id in ids:
        body = body_of(sandbox, request_id)
        now = datetime.now(UTC)
        assert await inbox.put(Delivery(request_id, MODEL, "sandbox-user", now, body))
    return [delivery_key(request_id) for request_id in ids]


def intake(store: Store, run_id: str) -> Intake:
    config = ServeConfig(
        out=store.location,
        jwks_url="http://127.0.0.1:9/",
        allow_private_images=True,
        seconds_per_part=0.2,
    )
    return Intake(config, store, Inbox(store), run_id=run_id)


async def until_done(store: Store, timeout: float = 60) -> None:
    inbox = Inbox(store)
    with anyio.fail_after(timeout):
        while await anyio.to_thread.run_sync(inbox.pending):
            await anyio.sleep(0.1)


def dead_owner(name: str) -> Owner:
    """An owner on this host whose process has exited."""
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    return Owner(name, Owner.here(name).host, int(child.stdout))


def rows_by_request(store: Store) -> pl.DataFrame:
    return (
        manifest.scan(store)
        .group_by("request_id")
        .agg(pl.len().alias("rows"), pl.col("run_id").unique().alias("runs"))
        .collect()
        .sort("request_id")
    )


@pytest.mark.anyio
async def test_two_processes_offered_the_same_deliveries_harvest_each_once(
    output: Output, sandbox: Sandbox
) -> None:
    store = output.store
    ids = [f"twice-{n}" for n in range(24)]
    keys = await store_deliveries(store, sandbox, ids)
    first, second = (
        intake(store, "20261201T000000Z-aaaaaa"),
        intake(store, "20261201T000000Z-bbbbbb"),
    )
    async with anyio.create_task_group() as tg:
        await tg.start(first.run)
        await tg.start(second.run)  # both found every key at their start...
        for key in keys:  # ... and both are offered each (both received it)
            first.offer(key)
            second.offer(key)
        await until_done(store)
        tg.cancel_scope.cancel()
    table = rows_by_request(store)
    assert table["request_id"].to_list() == sorted(ids)
    for request_id, count, runs in table.iter_rows():
        images = len(result_of(sandbox, request_id)["images"])
        assert (count, len(runs)) == (images, 1), request_id
    harvested = first.counters().manifest_rows + second.counters().manifest_rows
    assert harvested == table["rows"].sum()
    assert sum(first.counters().requests.values()) + sum(
        second.counters().requests.values()
    ) == len(ids)
    # One claim each, whoever reached it first; both retired: no beats left.
    assert len(list(store.list("inbox/claims/"))) == len(ids)
    assert list(store.list("inbox/owners/")) == []


@pytest.mark.anyio
async def test_a_live_processs_claims_are_left_to_it_and_a_dead_ones_taken_over(
    output: Output, sandbox: Sandbox
) -> None:
    store = output.store
    inbox = Inbox(store)
    live, dead = Owner.here("20261201T000000Z-live00"), dead_owner("20261201T000000Z-dead00")
    ids = ["held-live", "held-dead", "written-dead", "free"]
    keys = dict(zip(ids, await store_deliveries(store, sandbox, ids), strict=True))
    inbox.beat(live)
    inbox.beat(dead)  # a fresh beat: its process being gone on this host is enough
    assert inbox.claim(keys["held-live"], live).mine
    assert inbox.claim(keys["held-dead"], dead).mine
    assert inbox.claim(keys["written-dead"], dead).mine
    # The dead process wrote a part with these rows and died before marking them done.
    writer = ManifestWriter(store, dead.name)
    writer.add(
        [
            ManifestRow(
                run_id=dead.name,
                harvested_at=datetime.now(UTC),
                source_file=keys["written-dead"],
                source_line=None,
                model=MODEL,
                request_id="written-dead",
                request_status="failed",
                status="failed",
                error="fal: written before the marks",
            )
        ]
    )
    writer.flush()
    survivor = intake(store, "20261201T000000Z-cccccc")
    async with anyio.create_task_group() as tg:
        await tg.start(survivor.run)
        with anyio.fail_after(60):
            while set(inbox.pending()) != {keys["held-live"]}:
                await anyio.sleep(0.1)
        assert survivor.backlog == 0
        assert inbox.claims([keys["held-live"]], live)[keys["held-live"]].mine
        # The live one stops without harvesting it: the survivor takes it over at its next
        # look.
        inbox.retire(live)
        survivor.rescan_soon()
        await until_done(store)
        tg.cancel_scope.cancel()
    table = rows_by_request(store)
    assert table["request_id"].to_list() == sorted(ids)
    by_id = {rid: (rows, runs) for rid, rows, runs in table.iter_rows()}
    assert by_id["written-dead"] == (1, [dead.name])  # marked done, not harvested again
    for request_id in ("held-live", "held-dead", "free"):
        images = len(result_of(sandbox, request_id)["images"])
        assert by_id[request_id] == (images, [survivor.run_id])
    claims = sorted(
        info.key.rsplit("/", 1)[-1].rsplit(".", 1)[-1] for info in store.list("inbox/claims/")
    )
    assert claims == ["1", "1", "1", "1", "2", "2"]  # free: 1; the other three: 1, two taken over


def test_a_claim_taken_is_not_taken_again(output: Output) -> None:
    store = output.store
    inbox = Inbox(store)
    key = delivery_key("one")
    first, second = Owner.here("20261201T000000Z-first0"), Owner.here("20261201T000000Z-secnd0")
    inbox.beat(first)
    inbox.beat(second)
    assert inbox.claim(key, first).mine
    held = inbox.claim(key, second)
    assert (held.mine, held.live, held.dead, held.owner) == (False, True, False, first)
    assert inbox.claim(key, first).mine  # its own again
    inbox.retire(first)
    gone = inbox.claim(key, second)
    assert gone.dead and gone.number == 1
    third = Owner.here("20261201T000000Z-third0")
    assert inbox.take_over(key, gone, second)
    assert not inbox.take_over(key, gone, third)  # of two trying, one
    assert inbox.claim(key, second).mine and not inbox.claim(key, third).mine
    assert key.startswith(DELIVERIES)


@contextmanager
def started(
    out: str, run_id: str, flush_every: float, env: dict[str, str]
) -> Iterator[subprocess.Popen[str]]:
    """``tests.intake_process`` running on ``out``; killed at the end if still running."""
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.intake_process", out, run_id, str(flush_every)],
        stdout=subprocess.PIPE,
        text=True,
        env=os.environ | env,
    )
    assert process.stdout is not None
    try:
        assert process.stdout.readline() == "ready\n"
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        process.stdout.close()


@pytest.mark.anyio
async def test_two_processes_harvest_each_delivery_once_and_take_over_a_killed_ones(
    output: Output, sandbox: Sandbox
) -> None:
    store = output.store
    ids = [f"procs-{n}" for n in range(40)]
    await store_deliveries(store, sandbox, ids)
    # The first process claims and harvests, but writes no part before it is killed.
    with started(output.location, "20261201T000000Z-proc01", 600, output.env) as first:
        with anyio.fail_after(60):
            while len(list(store.list("inbox/claims/"))) < 5:
                await anyio.sleep(0.05)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
    with (
        started(output.location, "20261201T000000Z-proc02", 0.3, output.env) as second,
        started(output.location, "20261201T000000Z-proc03", 0.3, output.env) as third,
    ):
        await until_done(store)
        for process in (second, third):
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=30) == 0
    table = rows_by_request(store)
    assert table["request_id"].to_list() == sorted(ids)
    for request_id, count, runs in table.iter_rows():
        images = len(result_of(sandbox, request_id)["images"])
        assert (count, len(runs)) == (images, 1), request_id
        assert runs[0] != "20261201T000000Z-proc01"
    taken = [i.key for i in store.list("inbox/claims/") if i.key.endswith(".2")]
    assert taken  # the killed process's claims, taken over
    assert list(store.list("inbox/owners/")) == [
        i for i in store.list("inbox/owners/") if "proc01" in i.key
    ]  # the stopped ones retired; the killed one's beat is left to age

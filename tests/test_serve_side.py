"""``harvester serve`` side by side with the nightly run on one output: a harvest, a compaction
and a check run beside a running server, on a folder and on Ceph's S3 gateway, and neither side
corrupts the other; ``status`` and ``report`` show the server. Real processes and sockets: the
sandbox delivers (as ``--webhook`` does), signed; an image server of the tests' own holds a
download halfway while a harvest starts."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import struct
import threading
import time
import zlib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from harvester.errors import ExitCode
from harvester.sandbox import Sandbox
from harvester.storage import generations, manifest, runs
from harvester.storage.compact import compact
from harvester.storage.layout import OWN_TEMP
from harvester.storage.manifest import ManifestRow
from harvester.storage.objects import LocalStore, Store, open_store, scratch_dir
from harvester.views.status import status
from tests import hostile_http
from tests.conftest import Output, harvest_args, run_cli, write_csv
from tests.parts import put_run
from tests.test_serve import (
    MODEL,
    Serving,
    delivery,
    post,
    result_of,
    serving,
    submit,
    wait_delivered,
)

SIDE = ("--flush-every", "0.2")
OURS = ("--fal-user-id", "sandbox-user")


def png(size: int) -> bytes:
    """``size`` bytes that read as a 64 x 48 PNG (a signature and an IHDR, then filler)."""
    ihdr = struct.pack(">IIBBBBB", 64, 48, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    head = b"\x89PNG\r\n\x1a\n" + chunk
    return head + os.urandom(size - len(head))


class Stall:
    """An image answered halfway, then held until ``release`` is set: the download's spill
    file sits in the server's temp folder meanwhile."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.halfway = threading.Event()
        self.release = threading.Event()

    async def handler(self, exchange: hostile_http.Exchange, writer: asyncio.StreamWriter) -> None:
        half = len(self.data) * 3 // 4
        head = f"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: {len(self.data)}"
        writer.write(head.encode() + b"\r\n\r\n" + self.data[:half])
        await writer.drain()
        self.halfway.set()
        while not self.release.is_set():
            await asyncio.sleep(0.05)
        writer.write(self.data[half:])


def payload_with_image(sandbox: Sandbox, request_id: str, url: str) -> dict[str, Any]:
    payload = result_of(sandbox, request_id)
    payload["images"] = [{**payload["images"][0], "url": url}]
    return payload


def own_temps(output: Output) -> Path:
    """Where serve keeps its temp folders: in the output folder, or for a bucket in the
    local scratch folder every process on this location shares (``scratch_dir``)."""
    if isinstance(output.store, LocalStore):
        return Path(output.location) / OWN_TEMP
    return scratch_dir(output.location, env=output.env) / OWN_TEMP


def runs_temp(output: Output) -> Path:
    """The runs' temp folder, which a harvest empties at its start."""
    if isinstance(output.store, LocalStore):
        return Path(output.location) / ".tmp"
    return scratch_dir(output.location, env=output.env) / ".tmp"


def wait_for(check: Any, what: str, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"no {what} after {timeout} s")


def inbox(store: Store) -> dict[str, bytes]:
    return {info.key: store.get(info.key) for info in store.list("inbox/")}


def served_run_id(store: Store) -> str:
    servers = [r for r in runs.read_all(store)[0] if r.serves]
    assert len(servers) == 1, servers
    return servers[0].run_id


def checked(store: Store) -> pl.DataFrame:
    """Every live row, each image hashing to its row's sha256."""
    table = manifest.scan(store).collect()
    for path, sha in table.select("path", "sha256").drop_nulls().unique().iter_rows():
        assert hashlib.sha256(store.get(path)).hexdigest() == sha
    return table


def test_a_nightly_harvest_beside_a_running_serve(
    output: Output, sandbox: Sandbox, tmp_path: Path
) -> None:
    """The harvest runs to the end as usual while serve holds a download halfway; serve's
    spill file is not in the place the harvest's start empties, its delivery ends as ok rows
    whose image hashes right, and the harvest leaves the inbox as it was."""
    store, env = output.store, output.env
    delivered = [f"side-d{n}" for n in range(5)]
    fetched = [f"side-f{n}" for n in range(5)]
    image = png(1_600_000)  # over the 1 MiB a sink holds in memory: a spill file
    stall = Stall(image)
    before = sandbox.stats()["webhooks_delivered"]
    with (
        hostile_http.serving(stall.handler) as images,
        serving(output.location, sandbox, *SIDE, env=env) as serve,
    ):
        for request_id in delivered:
            submit(sandbox, request_id, serve.hook())
        wait_delivered(sandbox, before + len(delivered))
        serve.wait_idle()
        wait_for(lambda: manifest.has_manifest(store), "part of the server's")
        body = delivery("side-big", payload_with_image(sandbox, "side-big", f"{images.url}/a.png"))
        assert post(serve.hook(), sandbox.signer, "side-big", body).status_code == 200
        assert stall.halfway.wait(30)
        spill = wait_for(lambda: list(own_temps(output).glob("*/*.part")), "spill file")
        assert not any(runs_temp(output).glob("*.part"))
        kept = inbox(store)

        csv = write_csv(tmp_path / "night.csv", [(MODEL, rid) for rid in delivered + fetched])
        night = run_cli(harvest_args(sandbox, output.location, csv), env=env)

        assert night.exit_code == ExitCode.OK, night.output
        assert all(path.exists() for path in spill)  # the harvest's start left it alone
        stall.release.set()
        serve.wait_idle()
        after = inbox(store)
        assert {key: after.get(key) for key in kept} == kept  # the harvest touched nothing
        assert serve.stop() == 0
    served = served_run_id(store)
    table = checked(store)
    by_request = table.group_by("request_id").agg(
        pl.col("run_id").unique(), pl.col("request_status").unique()
    )
    assert sorted(by_request["request_id"]) == sorted([*delivered, *fetched, "side-big"])
    for request_id, run_ids, statuses in by_request.iter_rows():
        assert statuses == ["ok"], request_id
        if request_id not in fetched:
            assert run_ids == [served], request_id
    big = table.filter(pl.col("request_id") == "side-big").row(0, named=True)
    assert big["sha256"] == hashlib.sha256(image).hexdigest()
    assert not any(own_temps(output).glob("*/*"))  # removed when serve stopped
    assert run_cli(["verify", output.location], env=env).exit_code == 0


def test_two_harvests_and_a_compaction_beside_serve_on_a_folder_exit_as_usual(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    """Nothing serve holds makes a harvest, a compaction or a check exit 5."""
    out = tmp_path / "out"
    csv = write_csv(tmp_path / "a.csv", [(MODEL, "usual-1"), (MODEL, "missing-usual")])
    with serving(out, sandbox, *SIDE) as serve:
        assert run_cli(harvest_args(sandbox, out, csv)).exit_code == ExitCode.INCOMPLETE
        assert run_cli(harvest_args(sandbox, out, csv)).exit_code == ExitCode.INCOMPLETE
        assert run_cli(["compact", str(out)]).exit_code == 0
        assert run_cli(["verify", str(out)]).exit_code == 0
        assert serve.health().status_code == 200
        assert serve.stop() == 0


class Feeder:
    """Deliveries posted one after another, signed, until stopped: the server writes parts
    all the while (``--flush-every 0.2``)."""

    def __init__(self, serve: Serving, sandbox: Sandbox, tag: str) -> None:
        self.serve = serve
        self.sandbox = sandbox
        self.tag = tag
        self.sent: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.errors: list[str] = []

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            request_id = f"{self.tag}-{n:04d}"
            body = delivery(request_id, result_of(self.sandbox, request_id))
            answer = post(self.serve.hook(), self.sandbox.signer, request_id, body)
            if answer.status_code != 200:
                self.errors.append(f"{request_id}: {answer.status_code} {answer.text}")
            self.sent.append(request_id)
            n += 1
            time.sleep(0.02)

    def __enter__(self) -> Feeder:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def test_compact_beside_a_running_serve_loses_no_row(output: Output, sandbox: Sandbox) -> None:
    """Compactions while deliveries keep arriving and parts keep being written: every
    delivery ends as its rows, each once, read back with polars, and the server's folder
    goes on taking parts."""
    store, env = output.store, output.env
    with serving(output.location, sandbox, *SIDE, env=env) as serve:
        with Feeder(serve, sandbox, "comp") as feeder:
            wait_for(lambda: len(feeder.sent) > 10, "deliveries")
            wait_for(lambda: manifest.has_manifest(store), "part of the server's")
            first = run_cli(["compact", output.location], env=env)
            assert first.exit_code == 0, first.output
            assert "a server's or without a run record" in first.output
            wait_for(lambda: len(feeder.sent) > 30, "deliveries")
            second = run_cli(["compact", output.location], env=env)
            assert second.exit_code == 0, second.output
            wait_for(lambda: len(feeder.sent) > 40, "deliveries")
            assert status(store).verdict == "serving"
        assert feeder.errors == []
        serve.wait_idle()
        assert serve.stop() == 0
    assert status(store).verdict == "stopped"
    sent = feeder.sent
    listing = generations.read(store)
    assert listing.generation is not None and listing.generation.taken
    assert listing.run_parts  # written after the last compaction: still the server's
    rows = pl.scan_parquet(
        [store.url(key) for key in manifest.parts(store)],
        storage_options=store.storage_options,
    ).collect()
    per_request = rows.group_by("request_id").agg(pl.len(), pl.col("image_count").first())
    assert sorted(per_request["request_id"]) == sorted(sent)
    assert (per_request["len"] == per_request["image_count"]).all()  # each row once
    checked(store)
    final = compact(store)  # the server stopped: the rest merged
    assert final.runs_merged == 1 and generations.read(store).run_parts == []
    assert manifest.scan(store).select(pl.len()).collect().item() == rows.height


def serve_row(run_id: str, request_id: str) -> ManifestRow:
    return ManifestRow(
        run_id=run_id,
        harvested_at=datetime.now(UTC),
        source_file=f"inbox/deliveries/{request_id}.delivery",
        source_line=None,
        model=MODEL,
        request_id=request_id,
        request_status="ok",
        status="ok",
    )


def serve_record(store: Store, run_id: str, **changes: Any) -> runs.RunRecord:
    record = runs.RunRecord(
        run_id=run_id,
        kind=runs.SERVE,
        state=runs.SERVING,
        pid=os.getpid(),
        host=runs.this_host(),
        started_at=datetime.now(UTC),
        intake=runs.IntakeRecord(heartbeat_at=datetime.now(UTC)),
        **changes,
    )
    runs.write(store, record)
    return record


def test_a_part_written_while_a_compaction_merges_stays_live(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race itself, made certain: the server writes a part (and rewrites one it wrote,
    as a retried put does) after the compaction listed its folder; the new part is live,
    the rewritten one too (another size), and no row is read twice or lost."""
    from harvester.storage import compact as compaction

    run_id = "20261201T000000.000Z-5e7e00"
    serve_record(store, run_id)
    put_run(store, run_id, [serve_row(run_id, f"r{n}") for n in range(6)], parts=2)
    merge = compaction._merge

    def merge_while_serving(*args: Any, **kwargs: Any) -> Any:
        done = merge(*args, **kwargs)
        put_run(store, run_id, [serve_row(run_id, "late")], parts=1, first=2)
        return done

    monkeypatch.setattr(compaction, "_merge", merge_while_serving)
    stats = compact(store)
    assert stats.served == 1
    listing = generations.read(store)
    assert listing.run_parts == [f"manifest/{run_id}/part-00002.parquet"]
    ids = manifest.scan(store).select("request_id").collect()["request_id"].to_list()
    assert sorted(ids) == sorted([f"r{n}" for n in range(6)] + ["late"])
    # A taken key written again with other rows (another size) is live, not stale.
    taken = sorted(key for key, _ in listing.generation.taken)  # type: ignore[union-attr]
    put_run(store, run_id, [serve_row(run_id, "again"), serve_row(run_id, "again2")], parts=1)
    assert taken[0] == f"manifest/{run_id}/part-00000.parquet"
    ids = manifest.scan(store).select("request_id").collect()["request_id"].to_list()
    assert sorted(ids) == sorted([f"r{n}" for n in range(6)] + ["late", "again", "again2"])


def test_status_during_and_after_serve(tmp_path: Path, sandbox: Sandbox) -> None:
    out = tmp_path / "out"
    with serving(out, sandbox, *SIDE, *OURS) as serve:
        body = delivery("st-serve-1", result_of(sandbox, "st-serve-1"))
        assert post(serve.hook(), sandbox.signer, "st-serve-1", body).status_code == 200
        theirs = post(serve.hook(), sandbox.signer, "st-serve-2", body, user_id="someone-else")
        assert theirs.status_code == 401
        serve.wait_idle()
        time.sleep(runs.HEARTBEAT_SECONDS + 1)  # a refresh with the delivery in it
        during = run_cli(["status", str(out)])
        assert during.exit_code == 0, during.output
        lines = during.output.splitlines()
        assert lines[0].startswith("SERVING: no harvest here; serve 2"), during.output
        at = next(n for n, line in enumerate(lines) if line.startswith("  serving:  serve "))
        assert f"(pid {serve.process.pid} on " in lines[at] and " since 20" in lines[at]
        assert lines[at + 1].startswith("            last delivery 20")
        assert lines[at + 1].endswith("; backlog 0")
        assert lines[at + 2] == (
            "            deliveries: 1 stored, 0 repeated, 1 refused, 0 answered 503"
        )
        assert lines[at + 3].startswith("            harvested: 1 requests (ok 1), 2 images")
        as_json = json.loads(run_cli(["status", str(out), "--json"]).output)
        assert as_json["verdict"] == "serving" and as_json["exit_code"] == 0
        assert as_json["servers"][0]["state"] == "serving"
        assert as_json["servers"][0]["intake"]["stored"] == 1
        # A nightly harvest alongside: judged on its own; the server is shown beside it.
        csv = write_csv(tmp_path / "e.csv", [(MODEL, "st-night")])
        assert run_cli(harvest_args(sandbox, out, csv)).exit_code == 0
        both = run_cli(["status", str(out)])
        assert both.exit_code == 0 and both.output.startswith("OK: last run 2"), both.output
        assert "\n  serving:  serve " in both.output
        assert serve.stop() == 0
    after = run_cli(["status", str(out)])
    assert after.exit_code == 0
    assert "\n  intake:   serve " in after.output and " stopped 20" in after.output
    alone = tmp_path / "alone"
    with serving(alone, sandbox, *SIDE) as serve:
        serve.wait_idle()
        assert serve.stop() == 0
    stopped = run_cli(["status", str(alone)])
    assert stopped.exit_code == 0 and stopped.output.startswith("STOPPED: no harvest here")


def test_status_says_a_killed_server_is_gone(tmp_path: Path, sandbox: Sandbox) -> None:
    out = tmp_path / "out"
    with serving(out, sandbox, *SIDE) as serve:
        serving_now = status(out)
        assert serving_now.verdict == "serving"
        os.kill(serve.process.pid, signal.SIGKILL)
        serve.process.wait(timeout=10)
    gone = run_cli(["status", str(out)])  # on this host: its process is gone
    assert gone.exit_code == ExitCode.NO_RECENT_RUN
    assert gone.output.startswith("GONE: no harvest here; serve "), gone.output
    assert "killed or hung" in gone.output
    # Seen from another host, only its record's age tells: gone once it is 60 s old.
    record = runs.read_all(out)[0][-1]
    remote = runs.RunRecord(**{**_fields(record), "host": "elsewhere"})
    runs.write(open_store(out), remote)
    beat = record.intake.heartbeat_at if record.intake else None
    assert beat is not None
    assert status(out, now=beat + timedelta(seconds=30)).verdict == "serving"
    late = status(out, now=beat + timedelta(seconds=runs.STALE_SECONDS + 1))
    assert late.verdict == "gone" and late.exit_code == ExitCode.NO_RECENT_RUN


def _fields(record: runs.RunRecord) -> dict[str, Any]:
    return {name: getattr(record, name) for name in runs.RunRecord.__dataclass_fields__}


def test_report_counts_a_servers_intake(tmp_path: Path, sandbox: Sandbox) -> None:
    out = tmp_path / "out"
    ids = ["rep-1", "rep-2"]
    with serving(out, sandbox, *SIDE, *OURS) as serve:
        for request_id in ids:
            body = delivery(request_id, result_of(sandbox, request_id))
            assert post(serve.hook(), sandbox.signer, request_id, body).status_code == 200
        theirs = delivery("rep-3", result_of(sandbox, "rep-3"))
        other = post(serve.hook(), sandbox.signer, "rep-3", theirs, user_id="someone-else")
        stale = post(serve.hook(), sandbox.signer, "rep-4", theirs, timestamp=1)
        assert other.status_code == stale.status_code == 401
        serve.wait_idle()
        assert serve.stop() == 0
    from harvester.views.report import build

    report = build(out)
    row = report.runs.row(0, named=True)
    assert report.runs.height == 1 and row["exit_code"] == 0
    assert row["requests"] == row["ok"] == 2
    images = checked(open_store(out)).filter(pl.col("path").is_not_null())
    assert row["images"] == images.height and row["new_bytes"] == images["bytes"].sum()
    assert row["refused"] == 2
    text = run_cli(["report", str(out)])
    assert text.exit_code == 0 and "refused" in text.output


def test_verify_beside_a_server_waits_for_its_rows(tmp_path: Path, sandbox: Sandbox) -> None:
    """Images a serving server stored before its next part are not orphans; once it wrote
    them, verify judges them as any."""
    out = tmp_path / "out"
    with serving(out, sandbox, "--flush-every", "600") as serve:
        body = delivery("ver-1", result_of(sandbox, "ver-1"))
        assert post(serve.hook(), sandbox.signer, "ver-1", body).status_code == 200
        serve.wait_idle()
        assert not manifest.has_manifest(out)  # its rows wait for the part
        during = run_cli(["verify", str(out)])
        assert during.exit_code == 0, during.output
        assert "0 orphans" in during.output and "not named by a part yet" in during.output
        assert serve.stop() == 0
    after = run_cli(["verify", str(out)])
    assert after.exit_code == 0 and "not named by a part yet" not in after.output


def test_a_killed_servers_temp_folder_is_removed_by_the_next(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    out = tmp_path / "out"
    with serving(out, sandbox) as serve:
        (folder,) = [p for p in (out / OWN_TEMP).iterdir() if p.is_dir()]
        (folder / "left.part").write_bytes(b"x")
        os.kill(serve.process.pid, signal.SIGKILL)
        serve.process.wait(timeout=10)
    assert folder.is_dir()
    with serving(out, sandbox) as serve:
        serve.wait_idle()
        assert not folder.exists()
        assert len([p for p in (out / OWN_TEMP).iterdir() if p.is_dir()]) == 1
        assert serve.stop() == 0
    assert not any(p.is_dir() for p in (out / OWN_TEMP).iterdir())

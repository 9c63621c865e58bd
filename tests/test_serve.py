"""``harvester serve`` as fal meets it: real processes, real sockets, deliveries signed by the
sandbox (and by other keys, for the refusals), the manifest read back with polars."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import polars as pl
import pytest
from prometheus_client.parser import text_string_to_metric_families

from harvester.errors import ExitCode
from harvester.sandbox import Sandbox, SandboxConfig, running_sandbox
from harvester.sandbox.webhooks import Signer
from harvester.storage import manifest
from harvester.storage.inbox import delivery_key
from harvester.storage.objects import open_store
from tests.conftest import KEY, harvest_args, run_cli, write_csv
from tests.processes import harvester_command, harvester_env
from tests.s3gateway import Gateway

MODEL = "fal-ai/flux/dev"


@dataclass
class Serving:
    url: str
    """``http://127.0.0.1:PORT/fal/webhook``"""
    process: subprocess.Popen[str]
    lines: list[str]

    @property
    def base(self) -> str:
        return self.url.removesuffix("/fal/webhook")

    def hook(self, model: str | None = MODEL) -> str:
        return self.url if model is None else f"{self.url}?model={quote(model)}"

    def health(self) -> httpx.Response:
        return httpx.get(f"{self.base}/healthz", timeout=10)

    def wait_idle(self, timeout: float = 60) -> None:
        """Until every stored delivery is harvested (its rows wait for the next part)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            answer = self.health()
            if answer.status_code == 200 and answer.json()["backlog"] == 0:
                return
            time.sleep(0.1)
        raise AssertionError(f"serve still busy after {timeout} s: {self.health().text}")

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)


@contextmanager
def serving(
    out: Path | str, sandbox: Sandbox, *args: str, env: dict[str, str] | None = None
) -> Iterator[Serving]:
    """``harvester serve`` in its own process on a free port, keys from the sandbox."""
    command = harvester_command(
        "serve",
        "--out",
        str(out),
        "--listen",
        "127.0.0.1:0",
        "--jwks-url",
        sandbox.jwks_url,
        "--allow-private-images",
        "--flush-every",
        "0.5",
        *args,
    )
    process = subprocess.Popen(
        command, stderr=subprocess.PIPE, text=True, env=harvester_env() | (env or {})
    )
    assert process.stderr is not None
    stderr = process.stderr
    lines: list[str] = []
    first = stderr.readline()
    while first and not first.startswith("serving on "):  # log lines of the start
        lines.append(first)
        first = stderr.readline()
    assert first.startswith("serving on "), "".join(lines) + stderr.read()
    drain = threading.Thread(target=lambda: lines.extend(stderr), daemon=True)
    drain.start()
    try:
        yield Serving(first.split()[2], process, lines)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        drain.join(timeout=10)
        stderr.close()


def submit(sandbox: Sandbox, request_id: str, webhook: str) -> None:
    """A request submitted to the sandbox with ``fal_webhook``, as a fal user does."""
    answer = httpx.post(
        sandbox.submit_url(MODEL),
        params={"fal_webhook": webhook},
        json={"request_id": request_id, "prompt": "a cat"},
        headers={"Authorization": f"Key {KEY}"},
        timeout=10,
    )
    assert answer.status_code == 200, answer.text


def wait_delivered(sandbox: Sandbox, count: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while sandbox.stats()["webhooks_delivered"] < count:
        assert time.monotonic() < deadline, sandbox.stats()
        time.sleep(0.05)


def result_of(sandbox: Sandbox, request_id: str) -> dict[str, Any]:
    answer = httpx.get(
        sandbox.result_url("fal-ai/flux", request_id),
        headers={"Authorization": f"Key {KEY}"},
        timeout=10,
    )
    body: dict[str, Any] = answer.json()
    return body


def delivery(request_id: str, payload: object = None, *, status: str = "OK") -> bytes:
    return json.dumps(
        {
            "request_id": request_id,
            "gateway_request_id": request_id,
            "status": status,
            "payload": payload,
            "error": None,
        }
    ).encode()


def post(
    url: str,
    signer: Signer,
    request_id: str,
    body: bytes,
    *,
    user_id: str = "sandbox-user",
    timestamp: int | None = None,
) -> httpx.Response:
    headers = signer.headers(request_id, body, user_id=user_id, timestamp=timestamp)
    return httpx.post(url, content=body, headers=headers, timeout=10)


def scrape(serve: Serving) -> dict[str, float]:
    """``/metrics`` read with Prometheus' own parser: each sample by name and labels."""
    text = httpx.get(f"{serve.base}/metrics", timeout=10).text
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            found[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return found


def rows(out: Path) -> pl.DataFrame:
    return pl.read_parquet(str(out / "manifest" / "*" / "*.parquet"))


def stored_deliveries(out: Path) -> list[Path]:
    folder = out / "inbox" / "deliveries"
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def test_deliveries_from_the_sandbox_are_stored_and_harvested(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    out = tmp_path / "out"
    ids = ["hook-a", "hook-b", "hook-c", "fail-hook", "badjson-hook"]
    before = sandbox.stats()["webhooks_delivered"]
    with serving(out, sandbox) as serve:
        assert serve.health().json() == {"status": "ok", "backlog": 0}
        for request_id in ids:
            submit(sandbox, request_id, serve.hook())
        wait_delivered(sandbox, before + len(ids))
        serve.wait_idle()
        figures = scrape(serve)
        assert serve.stop() == 0
    assert figures['harvester_serve_deliveries_total{outcome="stored"}'] == len(ids)
    assert figures["harvester_serve_harvested_total"] == len(ids)
    assert figures["harvester_serve_ok_total"] == 3
    assert figures["harvester_serve_ack_seconds_count"] == len(ids)
    assert figures["harvester_serve_backlog"] == 0
    assert any("5 deliveries stored" in line for line in serve.lines), serve.lines

    table = rows(out)
    by_id = {rid: table.filter(pl.col("request_id") == rid) for rid in ids}
    for request_id in ids[:3]:
        got = by_id[request_id].sort("image_index")
        truth = [image["url"] for image in result_of(sandbox, request_id)["images"]]
        assert got["request_status"].to_list() == ["ok"] * len(truth)
        assert set(got["model"]) == {MODEL}
        assert set(got["source_file"]) == {delivery_key(request_id)}
        assert got["source_line"].null_count() == len(truth)
        for url, sha, path in zip(truth, got["sha256"], got["path"], strict=True):
            served = httpx.get(url, timeout=10).content
            assert hashlib.sha256(served).hexdigest() == sha
            assert hashlib.sha256((out / path).read_bytes()).hexdigest() == sha
    failed = by_id["fail-hook"].row(0, named=True)
    assert (failed["request_status"], failed["status"]) == ("failed", "failed")
    assert failed["error"].startswith("fal: ")
    broken = by_id["badjson-hook"].row(0, named=True)
    assert broken["status"] == "error" and "no payload" in broken["error"]
    assert len(stored_deliveries(out)) == len(ids)


def test_refused_deliveries_leave_nothing_but_a_count_and_a_line(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    out = tmp_path / "out"
    signer = sandbox.signer
    body = delivery("r-1", {"images": [], "seed": 1, "prompt": "p"})
    with serving(out, sandbox, "--fal-user-id", "sandbox-user", "--max-body-bytes", "2000") as s:
        url = s.hook()
        forged = signer.headers("r-1", body)
        refusals = {
            "forged": httpx.post(url, content=body + b" ", headers=forged, timeout=10),
            "unknown key": post(url, Signer(), "r-1", body),
            "stale": post(url, signer, "r-1", body, timestamp=int(time.time()) - 310),
            "future": post(url, signer, "r-1", body, timestamp=int(time.time()) + 310),
            "another account": post(url, signer, "r-1", body, user_id="someone-else"),
            "no signature": httpx.post(
                url,
                content=body,
                headers={k: v for k, v in forged.items() if k != "X-Fal-Webhook-Signature"},
                timeout=10,
            ),
            "no headers": httpx.post(url, content=body, timeout=10),
        }
        big = delivery("r-2", {"images": [], "seed": 1, "prompt": "x" * 3000})
        too_large = post(url, signer, "r-2", big)
        assert {name: r.status_code for name, r in refusals.items()} == dict.fromkeys(refusals, 401)
        assert too_large.status_code == 413
        assert stored_deliveries(out) == []
        good = post(url, signer, "r-1", body)  # the control: the same delivery, signed
        assert good.status_code == 200 and good.json() == {"stored": True}
        s.wait_idle()
        figures = scrape(s)
        refused = {
            key: value
            for key, value in figures.items()
            if key.startswith("harvester_serve_refused")
        }
        assert refused == {
            'harvester_serve_refused_total{reason="bad-signature"}': 2,
            'harvester_serve_refused_total{reason="stale-timestamp"}': 2,
            'harvester_serve_refused_total{reason="other-account"}': 1,
            'harvester_serve_refused_total{reason="missing-headers"}': 2,
            'harvester_serve_refused_total{reason="too-large"}': 1,
        }
        assert s.stop() == 0
    log = "\n".join(s.lines)
    assert log.count("delivery refused") == len(refusals) + 1
    assert forged["X-Fal-Webhook-Signature"] not in log and '"seed"' not in log
    assert len(stored_deliveries(out)) == 1
    assert rows(out)["request_id"].to_list() == ["r-1"]


def test_a_delivery_repeated_three_times_is_one_set_of_rows(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    out = tmp_path / "out"
    payload = result_of(sandbox, "again-1")
    body = delivery("again-1", payload)
    with serving(out, sandbox) as serve:
        answers = [post(serve.hook(), sandbox.signer, "again-1", body) for _ in range(3)]
        assert [a.json()["stored"] for a in answers] == [True, False, False]
        serve.wait_idle()
        assert serve.stop() == 0
    with serving(out, sandbox) as serve:  # and once more after a restart
        assert post(serve.hook(), sandbox.signer, "again-1", body).json() == {"stored": False}
        assert serve.stop() == 0
    table = rows(out)
    assert table.height == len(payload["images"])
    assert table["image_index"].sort().to_list() == list(range(table.height))


def test_rows_written_before_the_marks_are_not_written_twice(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    """A process that dies between a part and the inbox's done marks: on restart the
    deliveries are found in the manifest and marked, not harvested again."""
    out = tmp_path / "out"
    with serving(out, sandbox) as serve:
        for n in range(3):
            request_id = f"marks-{n}"
            body = delivery(request_id, result_of(sandbox, request_id))
            assert post(serve.hook(), sandbox.signer, request_id, body).status_code == 200
        serve.wait_idle()
        assert serve.stop() == 0
    first = rows(out).height
    for mark in (out / "inbox" / "done").rglob("*"):
        if mark.is_file():
            mark.unlink()
    with serving(out, sandbox) as serve:
        serve.wait_idle()
        assert serve.stop() == 0
    assert rows(out).height == first
    assert len([m for m in (out / "inbox" / "done").rglob("*") if m.is_file()]) == 3


def test_kill_9_after_acknowledging_loses_no_delivery(tmp_path: Path, sandbox: Sandbox) -> None:
    out = tmp_path / "out"
    acknowledged = []
    # Parts are due only every 10 minutes: nothing harvested is written before the kill.
    with serving(out, sandbox, "--flush-every", "600") as serve:
        for n in range(40):
            request_id = f"kill-{n}"
            body = delivery(request_id, result_of(sandbox, request_id))
            if post(serve.hook(), sandbox.signer, request_id, body).status_code == 200:
                acknowledged.append(request_id)
        os.kill(serve.process.pid, signal.SIGKILL)
        serve.process.wait(timeout=10)
    assert len(acknowledged) == 40
    assert not (out / "manifest").exists() or not list((out / "manifest").rglob("*.parquet"))
    with serving(out, sandbox) as serve:
        serve.wait_idle()
        assert serve.stop() == 0
    table = rows(out)
    latest = table.group_by("request_id").agg(pl.col("request_status").unique())
    assert sorted(latest["request_id"]) == sorted(acknowledged)
    assert all(statuses.to_list() == ["ok"] for statuses in latest["request_status"])
    for sha, path in zip(table["sha256"], table["path"], strict=True):
        assert hashlib.sha256((out / path).read_bytes()).hexdigest() == sha


def test_an_unwritable_inbox_answers_503_and_healthz_says_so(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    out = tmp_path / "out"
    body = delivery("late-1", {"images": [], "seed": 1, "prompt": "p"})
    with serving(out, sandbox) as serve:
        assert serve.health().status_code == 200
        deliveries = out / "inbox" / "deliveries"
        if deliveries.exists():
            deliveries.rmdir()
        deliveries.write_text("not a folder")  # refused even to root, unlike a chmod
        health = serve.health()
        assert health.status_code == 503 and "not a folder" in health.json()["problem"]
        assert post(serve.hook(), sandbox.signer, "late-1", body).status_code == 503
        deliveries.unlink()
        assert serve.health().status_code == 200
        assert post(serve.hook(), sandbox.signer, "late-1", body).status_code == 200
        serve.wait_idle()
        assert serve.stop() == 0
    assert rows(out)["request_id"].to_list() == ["late-1"]


def test_a_bad_model_parameter_is_refused(tmp_path: Path, sandbox: Sandbox) -> None:
    out = tmp_path / "out"
    body = delivery("m-1", {"images": [], "seed": 1, "prompt": "p"})
    with serving(out, sandbox) as serve:
        answer = post(serve.hook("flux"), sandbox.signer, "m-1", body)
        assert answer.status_code == 400
        no_model = post(serve.hook(None), sandbox.signer, "m-1", body)
        assert no_model.status_code == 200
        serve.wait_idle()
        assert serve.stop() == 0
    row = rows(out).row(0, named=True)
    assert row["model"] is None and row["request_status"] == "ok"


@pytest.mark.parametrize("where", ["top", "table"])
def test_serve_reads_a_job_files_serve_table(tmp_path: Path, sandbox: Sandbox, where: str) -> None:
    out = tmp_path / "out"
    job = tmp_path / "job.toml"
    serve_keys = (
        f'listen = "127.0.0.1:0"\njwks-url = "{sandbox.jwks_url}"\n'
        'fal-user-id = ["sandbox-user"]\nallow-private-images = true\n'
    )
    shared = 'out = "out"\ninputs = ["exports/*.csv"]\nrps = 5\n'
    if where == "top":
        job.write_text(shared + "[serve]\n" + serve_keys)
    else:
        job.write_text('inputs = ["x.csv"]\n[serve]\nout = "out"\n' + serve_keys)
    process = subprocess.Popen(
        harvester_command("serve", "--job", str(job)),
        stderr=subprocess.PIPE,
        text=True,
        env=harvester_env(),
    )
    assert process.stderr is not None
    try:
        first = process.stderr.readline()
        assert first.startswith("serving on "), first + process.stderr.read()
        url = first.split()[2]
        body = delivery("job-1", {"images": [], "seed": 1, "prompt": "p"})
        other = post(url, sandbox.signer, "job-1", body, user_id="someone-else")
        assert other.status_code == 401  # fal-user-id came from the table
        assert post(url, sandbox.signer, "job-1", body).status_code == 200
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        process.stderr.close()
    assert (out / "inbox" / "deliveries").is_dir()


def test_the_commands_docs_webhooks_shows_work(tmp_path: Path) -> None:
    """docs/webhooks.md's "Try it" commands, as printed but for the ports: two free ones
    instead of 8787 and 8790 (which a developer's own sandbox may hold), given to the sandbox
    and serve as --port and --listen."""
    page = (Path(__file__).parent.parent / "docs" / "webhooks.md").read_text()
    block = page.split("## Try it with the sandbox", 1)[1].split("```console\n", 1)[1]
    commands = [line[2:] for line in block.split("```", 1)[0].splitlines()]
    assert [c.split()[:2] for c in commands] == [
        ["harvester", "sandbox"],
        ["harvester", "serve"],
        ["curl", "-s"],
        ["curl", "-s"],
    ]
    ports = {}
    for name in ("8787", "8790"):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            ports[name] = str(probe.getsockname()[1])

    def as_run(command: str) -> str:
        for shown, port in ports.items():
            command = command.replace(f"127.0.0.1:{shown}", f"127.0.0.1:{port}")
        return command

    env = dict(harvester_env(None), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    started = []
    try:
        for command, ready in zip(commands[:2], ("sandbox listening", "serving on"), strict=True):
            extra = (
                f" --port {ports['8787']}"
                if command.startswith("harvester sandbox")
                else f" --listen 127.0.0.1:{ports['8790']}"
            )
            process = subprocess.Popen(
                ["bash", "-c", f"exec {as_run(command)}{extra}"],
                cwd=tmp_path,
                env=env,
                stderr=subprocess.PIPE,
                text=True,
            )
            started.append(process)
            assert process.stderr is not None
            line = process.stderr.readline()
            assert line.startswith(ready), line
        submitted = subprocess.run(
            ["bash", "-c", as_run(commands[2])],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        request_id = json.loads(submitted.stdout)["request_id"]
        sandbox_stats = f"http://127.0.0.1:{ports['8787']}/__sandbox/stats"
        deadline = time.monotonic() + 60
        while httpx.get(sandbox_stats, timeout=10).json()["webhooks_delivered"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        health = subprocess.run(
            ["bash", "-c", as_run(commands[3])],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert json.loads(health.stdout)["status"] == "ok"
        deadline = time.monotonic() + 60
        while json.loads(httpx.get(f"http://127.0.0.1:{ports['8790']}/healthz", timeout=10).text)[
            "backlog"
        ]:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        serve = started[1]
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(timeout=60) == 0
    finally:
        for process in started:
            if process.poll() is None:
                process.terminate()
                process.wait(timeout=10)
            if process.stderr is not None:
                process.stderr.close()
    table = rows(tmp_path / "webhook-out")
    assert set(table["request_id"]) == {request_id}
    assert set(table["request_status"]) == {"ok"} and set(table["model"]) == {MODEL}


def test_a_slow_sender_is_cut_and_an_announced_oversize_body_is_not_read(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    out = tmp_path / "out"
    with serving(out, sandbox, "--timeout", "1", "--max-body-bytes", "1000") as serve:
        host, port = serve.base.removeprefix("http://").split(":")
        head = (
            f"POST /fal/webhook?model={MODEL} HTTP/1.1\r\nHost: {host}\r\n"
            "Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
        )
        with socket.create_connection((host, int(port)), timeout=10) as slow:
            started = time.monotonic()
            slow.sendall(head.format(length=100).encode() + b'{"request_id": ')
            answer = slow.recv(4096).decode()
            assert answer.startswith("HTTP/1.1 408"), answer
            assert 0.9 < time.monotonic() - started < 5
        with socket.create_connection((host, int(port)), timeout=10) as big:
            big.sendall(head.format(length=10**9).encode())  # and never a byte of the body
            answer = big.recv(4096).decode()
            assert answer.startswith("HTTP/1.1 413"), answer
        assert serve.stop() == 0
    assert stored_deliveries(out) == []
    log = "\n".join(serve.lines)
    assert "delivery refused (slow)" in log and "delivery refused (too-large)" in log


def test_on_s3_deliveries_are_create_once_objects_and_survive_kill_9(
    sandbox: Sandbox, s3_gateway: Gateway, s3_bucket: str
) -> None:
    out = f"s3://{s3_bucket}/hooks"
    env = s3_gateway.env()
    store = open_store(out, env=env)
    ids = [f"s3-{n}" for n in range(4)]
    with serving(out, sandbox, "--flush-every", "600", env=env) as serve:
        for request_id in ids:
            body = delivery(request_id, result_of(sandbox, request_id))
            answers = [post(serve.hook(), sandbox.signer, request_id, body) for _ in range(2)]
            assert [a.json()["stored"] for a in answers] == [True, False]
        os.kill(serve.process.pid, signal.SIGKILL)
        serve.process.wait(timeout=10)
    keys = sorted(info.key for info in store.list("inbox/deliveries/"))
    assert keys == sorted(delivery_key(request_id) for request_id in ids)
    assert list(store.list("manifest/")) == []
    # A killed process's lease holds the bucket until it expires (60 s): wait it out.
    deadline = time.monotonic() + 90
    while store.holder() is not None:
        assert time.monotonic() < deadline
        time.sleep(1)
    with serving(out, sandbox, env=env) as serve:
        serve.wait_idle()
        assert serve.health().json()["status"] == "ok"
        assert serve.stop() == 0
    table = manifest.scan(store).collect()
    assert sorted(set(table["request_id"])) == ids
    assert set(table["request_status"]) == {"ok"}
    for sha, path in zip(table["sha256"], table["path"], strict=True):
        assert hashlib.sha256(store.get(path)).hexdigest() == sha


def test_harvested_deliveries_are_kept_keep_deliveries_days(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    out = tmp_path / "out"
    body = {rid: delivery(rid, {"images": [], "seed": 1, "prompt": rid}) for rid in ("old", "new")}
    with serving(out, sandbox) as serve:
        for request_id, data in body.items():
            assert post(serve.hook(), sandbox.signer, request_id, data).status_code == 200
        serve.wait_idle()
        assert serve.stop() == 0
    key = {rid: delivery_key(rid) for rid in body}
    done = {
        rid: out / key[rid].replace("deliveries/", "done/").removesuffix(".delivery")
        for rid in body
    }
    assert all(mark.is_file() for mark in done.values())
    eight_days_ago = time.time() - 8 * 86400
    os.utime(done["old"], (eight_days_ago, eight_days_ago))
    with serving(out, sandbox, "--keep-deliveries", "7") as serve:
        deadline = time.monotonic() + 30
        while (out / key["old"]).exists():
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert serve.stop() == 0
    assert not done["old"].exists()
    assert (out / key["new"]).is_file() and done["new"].is_file()
    claim = {
        rid: out / f"{key[rid].replace('deliveries/', 'claims/').removesuffix('.delivery')}.1"
        for rid in body
    }
    assert not claim["old"].exists() and claim["new"].is_file()  # a claim goes with its delivery
    assert sorted(rows(out)["request_id"]) == ["new", "old"]  # the rows stay


def test_log_format_json_is_one_object_per_line(tmp_path: Path, sandbox: Sandbox) -> None:
    command = harvester_command(
        "serve",
        "--out",
        str(tmp_path / "out"),
        "--listen",
        "127.0.0.1:0",
        "--jwks-url",
        sandbox.jwks_url,
        "--log-format",
        "json",
    )
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=harvester_env())
    assert process.stderr is not None
    first = json.loads(process.stderr.readline())
    assert first["message"].startswith("serving on ") and first["run_id"]
    body = delivery("j-1", {"images": [], "seed": 1, "prompt": "p"})
    assert post(first["url"], Signer(), "j-1", body).status_code == 401
    process.send_signal(signal.SIGTERM)
    _, rest = process.communicate(timeout=60)
    assert process.returncode == 0
    lines = [json.loads(line) for line in rest.splitlines()]
    assert any("delivery refused (bad-signature)" in line["message"] for line in lines)
    assert lines[-1]["message"].startswith("stopped: 0 deliveries stored")


def test_sigterm_mid_download_keeps_what_was_acknowledged(tmp_path: Path) -> None:
    """SIGTERM while images are still downloading: exit 0 at once, the harvested rows
    written, the rest left in the inbox and harvested, once, by the next start."""
    out = tmp_path / "out"
    with running_sandbox(SandboxConfig(key=KEY, image_bytes=4_000, latency=1.0)) as slow:
        ids = [f"term-{n}" for n in range(8)]
        bodies = {rid: delivery(rid, result_of(slow, rid)) for rid in ids}
        with serving(out, slow) as serve:
            for request_id, body in bodies.items():
                assert post(serve.hook(), slow.signer, request_id, body).status_code == 200
            started = time.monotonic()
            assert serve.stop() == 0
            assert time.monotonic() - started < 10
        assert len(stored_deliveries(out)) == len(ids)
        marks = [m for m in (out / "inbox" / "done").rglob("*") if m.is_file()]
        assert len(marks) < len(ids)  # some were still downloading
        with serving(out, slow) as serve:
            serve.wait_idle()
            assert serve.stop() == 0
    table = rows(out)
    per_request = table.group_by("request_id").agg(
        pl.len().alias("rows"), pl.col("image_count").first(), pl.col("request_status").unique()
    )
    assert sorted(per_request["request_id"]) == sorted(ids)
    assert (per_request["rows"] == per_request["image_count"]).all()  # each image once
    assert all(s.to_list() == ["ok"] for s in per_request["request_status"])


def test_a_delivery_is_stored_after_an_expiry_removed_its_shards_folder(tmp_path: Path) -> None:
    """The expiry removes the folders it leaves empty; a later delivery in the same shard is
    still stored by the same process (its folder made again)."""
    import anyio

    from harvester.storage.inbox import Delivery, Inbox

    shard = delivery_key("old").rsplit("/", 2)[-2]
    later = next(f"new-{n}" for n in range(10_000) if f"/{shard}/" in delivery_key(f"new-{n}"))
    (tmp_path / "out" / ".tmp").mkdir(parents=True)  # as serve's start makes it
    inbox = Inbox(open_store(tmp_path / "out"))

    def stored(request_id: str) -> bool:
        received = Delivery(request_id, MODEL, "sandbox-user", datetime.now(UTC), b"{}")
        return anyio.run(inbox.put, received)

    assert stored("old")
    inbox.mark_done(delivery_key("old"))
    assert inbox.expire(datetime.now(UTC) + timedelta(seconds=1)) == 1
    assert not (tmp_path / "out" / delivery_key("old")).parent.exists()
    assert stored(later)
    assert (tmp_path / "out" / delivery_key(later)).is_file()


def test_a_delivery_that_cannot_be_harvested_is_counted_and_the_server_goes_on(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    out = tmp_path / "out"
    bad = out / delivery_key("bad")
    bad.parent.mkdir(parents=True)
    bad.write_bytes(json.dumps({"request_id": "bad"}).encode() + b"\n" + delivery("bad"))
    payload = {"images": [], "seed": 1, "prompt": "good"}
    with serving(out, sandbox) as serve:
        assert (
            post(serve.hook(), sandbox.signer, "good", delivery("good", payload)).status_code == 200
        )
        serve.wait_idle()
        assert serve.process.poll() is None
        assert scrape(serve)['harvester_serve_harvest_failed_total{error="KeyError"}'] == 1
        assert serve.stop() == 0
    assert any(f"{delivery_key('bad')}" in line and "KeyError" in line for line in serve.lines)
    assert bad.is_file()
    assert list(rows(out)["request_id"]) == ["good"]


def test_a_stored_delivery_acknowledged_as_repeated_is_harvested_without_a_restart(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    """A put answered 503 after its delivery was stored leaves the delivery in the inbox;
    fal's retry is answered ``stored: false``, and the delivery is harvested all the same."""
    out = tmp_path / "out"
    payload = {"images": [], "seed": 1, "prompt": "left"}
    body = delivery("left", payload)
    with serving(out, sandbox) as serve:
        assert post(serve.hook(), sandbox.signer, "first", delivery("first", payload)).is_success
        serve.wait_idle()
        # What the failed put left behind: the delivery stored, no harvest offered.
        head = {"request_id": "left", "model": MODEL, "user_id": "sandbox-user"}
        head["received_at"] = datetime.now(UTC).isoformat()
        stored = out / delivery_key("left")
        stored.parent.mkdir(parents=True, exist_ok=True)
        stored.write_bytes(json.dumps(head).encode() + b"\n" + body)
        answer = post(serve.hook(), sandbox.signer, "left", body)
        assert answer.json() == {"stored": False}
        deadline = time.monotonic() + 30
        while scrape(serve)["harvester_serve_harvested_total"] < 2:
            assert time.monotonic() < deadline, "".join(serve.lines)
            time.sleep(0.2)
        serve.wait_idle()
        time.sleep(1)  # a part is due every 0.5 s
        assert serve.process.poll() is None
        assert serve.stop() == 0
    assert sorted(rows(out)["request_id"]) == ["first", "left"]


def test_bodies_in_flight_are_bounded_and_the_excess_answered_503_unread(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    out = tmp_path / "out"
    payload = {"images": [], "seed": 1, "prompt": "after"}
    with serving(out, sandbox, "--timeout", "2", "--max-body-bytes", "1000") as serve:
        host, port = serve.base.removeprefix("http://").split(":")
        head = (
            f"POST /fal/webhook?model={MODEL} HTTP/1.1\r\nHost: {host}\r\n"
            "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
        ).encode()
        held = [socket.create_connection((host, int(port)), timeout=10) for _ in range(4)]
        try:
            for sock in held:  # four bodies of the largest size, never finished
                sock.sendall(head + b'{"request_id": ')
            time.sleep(0.5)
            with socket.create_connection((host, int(port)), timeout=10) as fifth:
                fifth.sendall(head)
                answer = fifth.recv(4096).decode()
                assert answer.startswith("HTTP/1.1 503"), answer
        finally:
            for sock in held:
                sock.close()
        deadline = time.monotonic() + 10
        while (
            post(serve.hook(), sandbox.signer, "after", delivery("after", payload)).status_code
            != 200
        ):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert scrape(serve)['harvester_serve_deliveries_total{outcome="unavailable"}'] >= 1
        assert serve.stop() == 0
    assert [p.name for p in stored_deliveries(out)] == [Path(delivery_key("after")).name]


@pytest.mark.anyio
async def test_the_intake_harvests_fewer_deliveries_at_once_while_many_arrive(
    tmp_path: Path,
) -> None:
    """Acknowledging comes first: above ``BUSY_RATE`` deliveries a second the intake harvests
    a few at once, and all of ``--image-concurrency`` again once they slow down."""
    import anyio

    from harvester.serve import ServeConfig
    from harvester.serve.intake import BUSY_RATE, PRIORITY_TICK, Intake, busy_harvests
    from harvester.storage.inbox import Inbox

    store = open_store(tmp_path / "out")
    store.prepare()
    config = ServeConfig(out=tmp_path / "out", jwks_url="http://127.0.0.1:9/jwks")
    intake = Intake(config, store, Inbox(store), run_id="r")
    assert intake.harvests_at_once == config.image_concurrency
    async with anyio.create_task_group() as tg:
        tg.start_soon(intake._prioritizer)
        per_tick = int(BUSY_RATE * PRIORITY_TICK) + 1
        for n in range(3):
            await anyio.sleep(PRIORITY_TICK / per_tick / 2)
            for i in range(per_tick):
                intake.offer(delivery_key(f"fast-{n}-{i}"))
            await anyio.sleep(PRIORITY_TICK)
        assert intake.harvests_at_once == busy_harvests(config.image_concurrency) < 16
        await anyio.sleep(PRIORITY_TICK * 2.5)
        assert intake.harvests_at_once == config.image_concurrency
        tg.cancel_scope.cancel()
    intake._keys.close()  # what ``run`` would have read the keys from
    intake._receive.close()


@pytest.mark.anyio
async def test_keys_beyond_the_queue_stay_in_the_inbox_counted_and_are_harvested(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Memory does not follow the backlog: past ``MAX_QUEUED`` keys a delivery stays in the
    inbox, the backlog counts it, and a look at the inbox takes it once the queue is down to
    half (well before the minute between two looks)."""
    import anyio

    from harvester.serve import ServeConfig
    from harvester.serve import intake as intake_module
    from harvester.serve.intake import Intake
    from harvester.storage.inbox import Delivery, Inbox

    monkeypatch.setattr(intake_module, "MAX_QUEUED", 4)
    monkeypatch.setattr(intake_module, "RESCAN_SOONEST", 0.1)
    store = open_store(tmp_path / "out")
    store.prepare()
    inbox = Inbox(store)
    config = ServeConfig(out=tmp_path / "out", jwks_url="http://127.0.0.1:9/jwks")
    intake = Intake(config, store, inbox, run_id="r")
    payload = {"images": [], "seed": 1, "prompt": "p"}
    ids = [f"many-{n}" for n in range(20)]
    bodies = [delivery(request_id, payload) for request_id in ids]
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            await tg.start(intake.run)
            for request_id, body in zip(ids, bodies, strict=True):  # as the server does
                received = Delivery(request_id, MODEL, "sandbox-user", datetime.now(UTC), body)
                assert await inbox.put(received)
                intake.offer(delivery_key(request_id))
            assert intake.backlog == len(ids) - intake.counters().done
            while intake.counters().done < len(ids):
                assert len(intake._queued) <= 4
                await anyio.sleep(0.01)
            assert intake.backlog == 0
            tg.cancel_scope.cancel()
    intake._keys.close()
    intake._receive.close()
    assert sorted(rows(tmp_path / "out")["request_id"]) == sorted(ids)


@pytest.mark.anyio
async def test_no_look_at_the_inbox_while_deliveries_arrive_fast(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A look lists the whole inbox: asked for during a burst, it waits for the burst's end."""
    import anyio

    from harvester.serve import ServeConfig
    from harvester.serve import intake as intake_module
    from harvester.serve.intake import BUSY_RATE, PRIORITY_TICK, Intake
    from harvester.storage.inbox import Delivery, Inbox

    monkeypatch.setattr(intake_module, "RESCAN_SOONEST", 0.05)
    store = open_store(tmp_path / "out")
    store.prepare()
    inbox = Inbox(store)
    intake = Intake(
        ServeConfig(out=tmp_path / "out", jwks_url="http://127.0.0.1:9/jwks"),
        store,
        inbox,
        run_id="r",
    )
    left = Delivery("left", MODEL, "sandbox-user", datetime.now(UTC), delivery("left"))
    assert await inbox.put(left)  # stored, never offered (a put answered 503)
    burst = anyio.Event()

    async def arrive() -> None:
        n = 0
        while not burst.is_set():
            for _ in range(int(BUSY_RATE * PRIORITY_TICK / 5) + 1):
                intake.offer(delivery_key(f"burst-{n}"))
                n += 1
            await anyio.sleep(PRIORITY_TICK / 5)

    async with anyio.create_task_group() as tg:
        tg.start_soon(arrive)
        tg.start_soon(intake._prioritizer)
        tg.start_soon(intake._rescanner)
        await anyio.sleep(PRIORITY_TICK * 2)
        intake.rescan_soon()
        await anyio.sleep(PRIORITY_TICK * 4)
        assert not intake.holds(delivery_key("left"))
        burst.set()
        with anyio.fail_after(5):
            while not intake.holds(delivery_key("left")):
                await anyio.sleep(0.05)
        tg.cancel_scope.cancel()
    intake._keys.close()
    intake._receive.close()


@pytest.mark.parametrize("named", [True, False], ids=["with-model", "without-model"])
def test_the_nightly_harvest_fetches_only_what_no_delivery_brought_ok(
    tmp_path: Path, sandbox: Sandbox, named: bool
) -> None:
    """A delivered request and a CSV row are one request when their ids and the model's
    owner/app agree (``fal-ai/flux/dev`` delivered, ``fal-ai/flux/dev`` or ``fal-ai/flux`` in
    the export), or by id alone for a delivery without ``?model=``."""
    out = tmp_path / "out"
    tag = "named" if named else "bare"
    delivered = [f"night-{tag}-{n}" for n in range(4)]
    others = [f"night-{tag}-other-{n}" for n in range(3)]
    before = sandbox.stats()["webhooks_delivered"]
    export = write_csv(
        tmp_path / "export.csv",
        [(MODEL, delivered[0]), (MODEL, delivered[1]), ("fal-ai/flux", delivered[2])]
        + [(MODEL, delivered[3])]
        + [(MODEL, request_id) for request_id in others],
    )
    with serving(out, sandbox) as serve:
        for request_id in delivered:
            submit(sandbox, request_id, serve.hook(MODEL if named else None))
        wait_delivered(sandbox, before + len(delivered))
        deadline = time.monotonic() + 60  # harvested, and their rows in a part
        while len([m for m in (out / "inbox" / "done").rglob("*") if m.is_file()]) < 4:
            assert time.monotonic() < deadline, serve.lines
            time.sleep(0.1)
        assert set(rows(out)["model"].to_list()) == ({MODEL} if named else {None})
        gets = sandbox.stats()["result_requests"]
        night = run_cli(harvest_args(sandbox, out, export))  # beside the running server
        assert night.exit_code == ExitCode.OK, night.output
        assert sandbox.stats()["result_requests"] - gets == len(others)
        assert f"{len(delivered)} already ok in earlier runs" in night.output
        assert serve.stop() == 0
    fetched = rows(out).filter(pl.col("source_line").is_not_null())
    assert sorted(set(fetched["request_id"])) == others


@pytest.mark.parametrize("kill", [False, True], ids=["both-serving", "one-killed"])
def test_two_serve_processes_on_one_out_harvest_each_delivery_once(
    tmp_path: Path, sandbox: Sandbox, kill: bool
) -> None:
    """Every delivery reaches both servers (a load balancer's retry, a rolling update): each is
    harvested once, by whichever claims it. Killed with deliveries claimed and no part
    written, the first leaves them to the other, which takes them over."""
    out = tmp_path / "out"
    ids = [f"pair-{kill}-{n}" for n in range(30)]
    bodies = {
        request_id: delivery(request_id, result_of(sandbox, request_id)) for request_id in ids
    }
    with (
        serving(out, sandbox, "--flush-every", "600" if kill else "0.5") as first,
        serving(out, sandbox) as survivor,
    ):
        for request_id in ids:
            stored = [
                post(s.hook(), sandbox.signer, request_id, bodies[request_id]).json()["stored"]
                for s in (first, survivor)
            ]
            assert stored == [True, False]
        if kill:
            deadline = time.monotonic() + 30
            while not list((out / "inbox" / "claims").rglob("*.1")):
                assert time.monotonic() < deadline
                time.sleep(0.05)
            os.kill(first.process.pid, signal.SIGKILL)
            first.process.wait(timeout=10)
            # A repeated delivery makes the survivor look at the inbox within 2 s (else
            # within a minute): it takes over what the killed one claimed.
            again = post(survivor.hook(), sandbox.signer, ids[0], bodies[ids[0]])
            assert again.json() == {"stored": False}
        deadline = time.monotonic() + 60
        while len([m for m in (out / "inbox" / "done").rglob("*") if m.is_file()]) < len(ids):
            assert time.monotonic() < deadline, survivor.lines
            time.sleep(0.1)
        if not kill:
            assert first.stop() == 0
        assert survivor.stop() == 0
    table = rows(out)
    for request_id in ids:
        mine = table.filter(pl.col("request_id") == request_id)
        images = len(result_of(sandbox, request_id)["images"])
        assert (mine.height, mine["run_id"].n_unique()) == (images, 1), request_id


def test_a_sigterm_as_soon_as_serve_says_it_serves_is_a_clean_stop(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    """The signal is caught from the start: one sent on the "serving on" line, before anything
    else happens, ends serve with exit 0 and a finished run record (not killed by it)."""
    out = tmp_path / "out"
    with serving(out, sandbox) as served:
        served.process.send_signal(signal.SIGTERM)
        assert served.process.wait(timeout=60) == 0, "".join(served.lines)
    [record] = [json.loads(p.read_text()) for p in (out / "runs").glob("*.json")]
    assert (record["state"], record["exit_code"]) == ("finished", 0)

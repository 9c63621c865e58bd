"""A hostile relay for tests: a raw asyncio HTTP/1.1 server on 127.0.0.1 that answers each
request id with a scripted status line, headers and body, byte for byte, whatever they hold.

``GET /<owner>/<app>/requests/<id>`` answers the script for ``<id>`` (404 if there is none);
``GET /img/<name>`` answers ``images[<name>]``, or a small PNG-looking body. Every request line
and header block is recorded, so a test can check what the harvester sent (a URL that carries
the key, say).

``check_invariants`` asserts what must hold after any harvest, however hostile the relay:
every input pair in the manifest, the run record truthful, ``harvester verify`` clean, and
the key in no file under the output folder and in no output.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq

from harvester.sandbox.images import make_png
from tests.processes import harvester_env, run_records

IMAGE = make_png(b"hostile", 1_100, width=16, height=16)
"""A real PNG: ``verify`` (in ``check_invariants``) flags a PNG magic number with no header."""


@dataclass(frozen=True, slots=True)
class Answer:
    """One scripted answer: a raw body (bytes) or a JSON-able value, sent as is."""

    body: bytes | str = b"{}"
    status: int = 200
    reason: str = "OK"
    headers: Mapping[str, str] = field(default_factory=dict)
    cut_short: bool = False
    """Announce the whole body's length, send half of it, then close the connection."""

    def raw(self) -> bytes:
        body = self.body.encode("utf-8") if isinstance(self.body, str) else self.body
        head = f"HTTP/1.1 {self.status} {self.reason}\r\n".encode("latin-1", "replace")
        headers = {"Content-Type": "application/json", **self.headers}
        for name, value in headers.items():
            head += f"{name}: {value}\r\n".encode("latin-1", "replace")
        head += f"Content-Length: {len(body)}\r\n\r\n".encode()
        return head + (body[: len(body) // 2] if self.cut_short else body)


def result_body(**fields: object) -> str:
    """A well-formed result body, with ``fields`` overriding (values dumped as JSON)."""
    base: dict[str, object] = {"images": [], "seed": 1, "prompt": "a cat", "timings": {}}
    base.update(fields)
    return json.dumps(base)


@dataclass
class Hostile:
    script: dict[str, Answer]
    images: dict[str, Answer] = field(default_factory=dict)
    port: int = 0
    seen: list[bytes] = field(default_factory=list)
    """Each request's head (request line and headers) as received."""

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                    return
                self.seen.append(head)
                target = head.split(b"\r\n", 1)[0].split(b" ")[1].decode("latin-1")
                answer = self._answer(target)
                writer.write(answer.raw())
                await writer.drain()
                if answer.cut_short:
                    return
        except ConnectionError:
            return
        finally:
            writer.close()

    def _answer(self, target: str) -> Answer:
        if target.startswith("/img/"):
            answer = self.images.get(target[len("/img/") :])
            return answer or Answer(body=IMAGE, headers={"Content-Type": "image/png"})
        parts = target.split("/")
        if len(parts) >= 5 and parts[3] == "requests":
            answer = self.script.get(parts[4])
            if answer is not None:
                return answer
        return Answer(body='{"detail": "Request not found"}', status=404, reason="Not Found")


@contextmanager
def hostile_server(script: dict[str, Answer]) -> Iterator[Hostile]:
    """Serve ``script`` on a free port of 127.0.0.1 from a thread, for the ``with`` block."""
    server = Hostile(script)
    loop = asyncio.new_event_loop()
    started = threading.Event()
    stop: asyncio.Event | None = None

    async def serve() -> None:
        nonlocal stop
        stop = asyncio.Event()
        srv = await asyncio.start_server(server._handle, "127.0.0.1", 0, limit=1 << 20)
        server.port = srv.sockets[0].getsockname()[1]
        started.set()
        async with srv:
            await stop.wait()

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    assert started.wait(10), "the hostile server did not start"
    try:
        yield server
    finally:
        assert stop is not None
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        loop.close()


def write_ids(path: Path, ids: Sequence[str], model: str = "fal-ai/flux") -> Path:
    path.write_text("model,request_id\n" + "".join(f"{model},{rid}\n" for rid in ids))
    return path


def harvest(
    server: Hostile, out: Path, csv: Path, *, key: str, extra: Sequence[str] = ()
) -> subprocess.CompletedProcess[str]:
    """``harvester harvest CSV --out OUT --base-url SERVER`` in its own process, as cron would."""
    command = [
        sys.executable,
        "-m",
        "harvester",
        "harvest",
        str(csv),
        "--out",
        str(out),
        "--base-url",
        server.base_url,
        "--rps",
        "1000",
        "--max-attempts",
        "2",
        *extra,
    ]
    env = harvester_env(key)
    return subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=300, check=False
    )


def manifest(out: Path) -> pl.DataFrame:
    return pl.read_parquet(str(out / "manifest" / "**" / "*.parquet"))


def _strings_in_parquet(path: Path) -> Iterator[str]:
    table = pq.read_table(path)
    for column in table.columns:
        for value in column.to_pylist():
            if isinstance(value, str):
                yield value


def check_invariants(
    out: Path,
    csv: Path,
    run: subprocess.CompletedProcess[str],
    *,
    key: str,
    secrets: Sequence[str] = (),
) -> pl.DataFrame:
    """What holds after any harvest; returns the manifest."""
    assert "Traceback" not in run.stderr, run.stderr
    lines = csv.read_text().splitlines()[1:]
    pairs = {tuple(line.split(",", 1)) for line in lines}
    df = manifest(out)
    assert pairs <= set(df.select("model", "request_id").iter_rows()), run.stderr
    record = run_records(out)[-1]
    assert record["exit_code"] == run.returncode, (record, run.stderr)
    verify = subprocess.run(
        [sys.executable, "-m", "harvester", "verify", str(out)],
        capture_output=True,
        text=True,
        env=harvester_env(None),
        timeout=120,
        check=False,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    for secret in (key, *secrets):
        assert secret not in run.stdout + run.stderr
        for path in out.rglob("*"):
            if not path.is_file() or path.is_symlink():
                continue
            if path.suffix == ".parquet":
                assert not any(secret in s for s in _strings_in_parquet(path)), path
            else:
                assert secret.encode() not in path.read_bytes(), path
    return df

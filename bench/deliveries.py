"""The serve section: ``harvester serve`` under a stream of signed deliveries.

A sender signs deliveries as fal does (the sandbox's ``Signer``; its JWKS is a static file
beside the world) and POSTs them from ``concurrency`` connections at once to a ``harvester
serve`` subprocess; each delivery is a result of the bench world (1-4 image URLs on the bench
nginx) under a request id of its own, padded to ``body_bytes`` with a field the manifest does
not keep (a prompt is short; a large result is mostly the fields beside it).
A delivery answered anything but 2xx is sent again after a short wait, as fal does. The
sender measures each acknowledgement (request sent to 2xx received); a thread samples serve's
RSS. When every delivery is acknowledged, the backlog is waited for (``/healthz``), serve is
stopped with SIGTERM, and the manifest must hold every delivery as ok rows.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import aiohttp
import world

from harvester.sandbox.webhooks import Signer, delivery_body

HARVESTER: Final = [sys.executable, "-m", "harvester"]
RETRY_WAIT: Final = 0.5
"""Seconds before a delivery answered non-2xx is sent again."""
RSS_EVERY: Final = 0.5


@dataclass(slots=True)
class Sent:
    latencies: list[float] = field(default_factory=list)
    """Seconds from each acknowledged POST to its 2xx."""
    not_acknowledged: int = 0
    """Attempts answered non-2xx or failed (each sent again)."""
    wall: float = 0.0
    """From the first POST to the last acknowledgement."""

    def quantile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.wall if self.wall else 0.0


@dataclass(slots=True)
class RssSamples:
    """Serve's RSS (MB) sampled every ``RSS_EVERY`` s, with how many were acknowledged then."""

    pid: int
    acknowledged: list[int]
    samples: list[tuple[int, float]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self._stop.wait(RSS_EVERY):
            rss = rss_mb(self.pid)
            if rss:
                self.samples.append((self.acknowledged[0], rss))

    def stop(self) -> None:
        self._stop.set()

    def at(self, count: int) -> float:
        """The first sample taken once ``count`` deliveries were acknowledged (the last if
        none)."""
        for done, rss in self.samples:
            if done >= count:
                return rss
        return self.samples[-1][1] if self.samples else 0.0


def rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def write_jwks(www: Path, signer: Signer) -> str:
    """The signer's JWKS as a static file of the world; its path on the server."""
    path = www / ".well-known" / "jwks.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(signer.jwks())
    return "/.well-known/jwks.json"


def results(w: world.World) -> list[tuple[str, str, bytes]]:
    """``(model, request id, result)`` of every request of the world."""
    found = []
    with open(w.csv) as csv:
        next(csv)
        for line in csv:
            model, rid = line.strip().split(",")
            app = "/".join(model.split("/")[:2])
            found.append((model, rid, (w.www / app / "requests" / rid).read_bytes()))
    return found


def padded(result: bytes, body_bytes: int) -> bytes:
    """``result`` with a field added so the delivery is about ``body_bytes`` long."""
    data = json.loads(result)
    data["debug"] = "x" * max(0, body_bytes - len(result) - 150)
    return json.dumps(data).encode()


async def send(
    hook: str,
    signer: Signer,
    world_results: list[tuple[str, str, bytes]],
    *,
    n: int,
    concurrency: int,
    body_bytes: int,
    acknowledged: list[int],
) -> Sent:
    """POST ``n`` deliveries (the world's results in turn, each under a request id of its
    own) from ``concurrency`` connections; ``acknowledged[0]`` counts the 2xx answers."""
    sent = Sent()
    next_index = iter(range(n))
    timeout = aiohttp.ClientTimeout(total=60)

    async def one(session: aiohttp.ClientSession, i: int) -> None:
        model, rid, result = world_results[i % len(world_results)]
        request_id = f"{rid}-{i // len(world_results)}"
        # Padded here, not once for the whole world: 20,000 bodies of 30 KB would be 600 MB.
        body = delivery_body(request_id, 200, padded(result, body_bytes))
        while True:
            headers = signer.headers(request_id, body)
            started = time.perf_counter()
            try:
                async with session.post(
                    hook, params={"model": model}, data=body, headers=headers
                ) as answer:
                    await answer.read()
                    ok = 200 <= answer.status < 300
            except (aiohttp.ClientError, TimeoutError):
                ok = False
            if ok:
                sent.latencies.append(time.perf_counter() - started)
                acknowledged[0] += 1
                return
            sent.not_acknowledged += 1
            await asyncio.sleep(RETRY_WAIT)

    async def worker(session: aiohttp.ClientSession) -> None:
        for i in next_index:
            await one(session, i)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        started = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        sent.wall = time.perf_counter() - started
    return sent


@dataclass(frozen=True, slots=True)
class ServeRun:
    sent: Sent
    rss: RssSamples
    backlog: int
    """Deliveries stored and not yet harvested at the last acknowledgement."""
    drain: float
    """Seconds from the last acknowledgement to an empty backlog."""
    stop: float
    """Seconds from SIGTERM to serve's exit."""
    returncode: int
    rows_ok: int
    """Deliveries that ended as ok rows (each request id once)."""


def start_serve(
    out: Path, jwks_url: str, port: int, log: Path, extra: list[str]
) -> subprocess.Popen[bytes]:
    args = [
        *HARVESTER, "serve", "--out", str(out), "--listen", f"127.0.0.1:{port}",
        "--jwks-url", jwks_url, "--fal-user-id", "sandbox-user", "--allow-private-images",
        "--log-format", "json", *extra,
    ]  # fmt: skip
    with open(log, "wb") as fh:
        return subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT)


def wait_health(base: str, proc: subprocess.Popen[bytes], *, idle: bool, timeout: float) -> None:
    """Until ``/healthz`` answers 200 (and, with ``idle``, a backlog of 0)."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"bench: serve exited with {proc.returncode}")
        try:
            answer = httpx.get(f"{base}/healthz", timeout=10)
            if answer.status_code == 200 and (not idle or answer.json()["backlog"] == 0):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"bench: serve not {'idle' if idle else 'up'} after {timeout:g} s")


def backlog_now(base: str) -> int:
    import httpx

    backlog: int = httpx.get(f"{base}/healthz", timeout=10).json()["backlog"]
    return backlog


def ok_deliveries(out: Path) -> int:
    import polars as pl

    table = pl.read_parquet(str(out / "manifest" / "*" / "*.parquet"))
    ok = table.group_by("request_id").agg((pl.col("request_status") == "ok").all().alias("ok"))
    return int(ok["ok"].sum())


def run(
    w: world.World,
    base_url: str,
    out: Path,
    *,
    n: int,
    concurrency: int,
    body_bytes: int,
    extra: list[str],
    log: Path,
    port: int,
) -> ServeRun:
    """One serve process under ``n`` deliveries, then drained and stopped (see the module)."""
    signer = Signer()
    jwks_url = base_url + write_jwks(w.www, signer)
    proc = start_serve(out, jwks_url, port, log, extra)
    base = f"http://127.0.0.1:{port}"
    acknowledged = [0]
    rss = RssSamples(proc.pid, acknowledged)
    sampler = threading.Thread(target=rss.run, daemon=True)
    try:
        wait_health(base, proc, idle=False, timeout=60)
        rss.samples.append((0, rss_mb(proc.pid)))
        sampler.start()
        sent = asyncio.run(
            send(
                f"{base}/fal/webhook",
                signer,
                results(w),
                n=n,
                concurrency=concurrency,
                body_bytes=body_bytes,
                acknowledged=acknowledged,
            )
        )
        done = time.perf_counter()
        backlog = backlog_now(base)
        wait_health(base, proc, idle=True, timeout=max(600.0, n / 50))
        drain = time.perf_counter() - done
        rss.samples.append((acknowledged[0], rss_mb(proc.pid)))
        rss.stop()
        stopping = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        returncode = proc.wait(timeout=120)
        stop = time.perf_counter() - stopping
    finally:
        rss.stop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return ServeRun(sent, rss, backlog, drain, stop, returncode, ok_deliveries(out))

"""The measurement behind harvester/api/transport.py: the same harvest, in this process, with
the harvester's client over httpx's default transport (httpcore), over the httpx-aiohttp
package's transport (both: images through httpx's models too) and over its own aiohttp glue
(images straight from aiohttp), all on uvloop, in alternating rounds
against nginx on 127.0.0.1 (the bench's world: `make bench` installs nginx).

    .venv/bin/python bench/transports.py [--n 2000] [--runs 3]

Prints, per variant, the median wall time and CPU-seconds (user + system) of the harvest
itself (imports excluded).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import httpx_aiohttp

sys.path.insert(0, str(Path(__file__).parent))

import nginx
import run

from harvester.api import transport
from harvester.api.transport import KEEPALIVE_SECONDS, USER_AGENT, Client, open_client
from harvester.run import pipeline, shard
from harvester.storage.objects import open_store


def _limits(max_connections: int) -> httpx.Limits:
    return httpx.Limits(
        max_connections=max_connections,
        max_keepalive_connections=max_connections,
        keepalive_expiry=KEEPALIVE_SECONDS,
    )


def httpx_aiohttp_client(
    *, max_connections: int, connect_timeout: float, read_timeout: float
) -> Client:
    """The httpx-aiohttp package's transport under the harvester's client (its images then
    go through httpx's models, as every request does)."""
    return Client(
        transport=httpx_aiohttp.AiohttpTransport(limits=_limits(max_connections)),
        timeout=httpx.Timeout(read_timeout, connect=connect_timeout, pool=None),
        follow_redirects=False,
        headers={"User-Agent": USER_AGENT},
    )


def httpcore_client(*, max_connections: int, connect_timeout: float, read_timeout: float) -> Client:
    """httpx's own pool (httpcore) under the harvester's client."""
    return Client(
        transport=httpx.AsyncHTTPTransport(limits=_limits(max_connections)),
        timeout=httpx.Timeout(read_timeout, connect=connect_timeout, pool=None),
        follow_redirects=False,
        headers={"User-Agent": USER_AGENT},
    )


VARIANTS: dict[str, tuple[Callable[..., Client], bool]] = {
    "httpcore": (httpcore_client, True),
    "httpx-aiohttp": (httpx_aiohttp_client, True),
    "harvester's": (open_client, True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    args = parser.parse_args()
    out = args.out.resolve()
    w = run.build_world(out / f"world-{args.n}", args.n, 30_000)
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in VARIANTS}
    with run.scratch(out) as folder, nginx.serving(w.www, w.spec.port) as server:
        for i in range(args.runs):
            for name, (make_client, uvloop) in VARIANTS.items():
                # One shard, in this process, so that the patched client is the one used.
                transport.open_client = make_client
                vars(shard)["EVENT_LOOP_OPTIONS"] = {"use_uvloop": uvloop}
                target = run.fresh(folder / f"{name}-{i + 1}")
                config = pipeline.HarvestConfig(
                    inputs=(w.csv,),
                    out=open_store(target),
                    api_key="bench-key",
                    base_url=server.base_url,
                    rps=100_000.0,
                    workers=1,
                )
                before, started = os.times(), time.perf_counter()
                stats = pipeline.harvest(config)
                wall, after = time.perf_counter() - started, os.times()
                cpu = (after.user + after.system) - (before.user + before.system)
                assert stats.counters.requests["ok"] == args.n, stats.summary()
                results[name].append((wall, cpu))
                print(f"  {name:18} wall {wall:6.2f} s  cpu {cpu:6.2f} s", flush=True)
    print(f"\n{args.n:,} requests, {w.images:,} images; medians of {args.runs} rounds")
    for name, rows in results.items():
        wall = statistics.median(r[0] for r in rows)
        cpu = statistics.median(r[1] for r in rows)
        print(f"  {name:18} wall {wall:6.2f} s  CPU {cpu:6.2f} s")


if __name__ == "__main__":
    main()

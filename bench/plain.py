"""The script a skilled user would write instead of the harvester (``make bench``'s second
contender): a fixed pool of aiohttp tasks, sha256 while streaming, files named by hash, on
uvloop when it is installed (as the harvester runs), else on asyncio's own loop. No retries, no
manifest. Usage: plain.py CSV BASE_URL OUT_DIR [CONCURRENCY]; key in HARVESTER_API_KEY.
"""

import asyncio
import csv
import hashlib
import os
import sys
from collections.abc import Callable

import aiohttp

try:
    import uvloop
except ImportError:  # runs on asyncio's own loop
    uvloop = None  # type: ignore[assignment]


async def worker(
    session: aiohttp.ClientSession, pairs: list[list[str]], base: str, out: str
) -> None:
    while pairs:
        model, request_id = pairs.pop()
        app = "/".join(model.split("/")[:2])
        async with session.get(f"{base}/{app}/requests/{request_id}") as response:
            response.raise_for_status()
            result = await response.json()
        for n, image in enumerate(result["images"]):
            digest, part = hashlib.sha256(), f"{out}/{request_id}.{n}.part"
            async with session.get(image["url"]) as response:
                response.raise_for_status()
                with open(part, "wb") as fh:
                    async for chunk in response.content.iter_chunked(65536):
                        digest.update(chunk)
                        fh.write(chunk)
            os.replace(part, f"{out}/{digest.hexdigest()}.png")


async def main(path: str, base: str, out: str, concurrency: int) -> None:
    with open(path, newline="") as fh:
        pairs = [row[:2] for row in csv.reader(fh)][1:]
    os.makedirs(out, exist_ok=True)
    headers = {"Authorization": f"Bearer {os.environ['HARVESTER_API_KEY']}"}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(headers=headers, connector=connector) as session:
        await asyncio.gather(*(worker(session, pairs, base, out) for _ in range(concurrency)))


if __name__ == "__main__":
    concurrency = int(sys.argv[4]) if len(sys.argv) > 4 else 64
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = (
        uvloop.new_event_loop if uvloop is not None else None
    )
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(main(sys.argv[1], sys.argv[2].rstrip("/"), sys.argv[3], concurrency))

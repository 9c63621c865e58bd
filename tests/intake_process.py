"""A process that harvests an output's inbox as ``harvester serve`` does, without its HTTP
side (and so without its lock): ``python -m tests.intake_process OUT RUN_ID FLUSH_EVERY``.
Prints ``ready`` once its intake runs; SIGTERM stops it as it stops ``serve``."""

from __future__ import annotations

import signal
import sys

import anyio

from harvester.serve.config import ServeConfig
from harvester.serve.intake import Intake
from harvester.storage.inbox import Inbox
from harvester.storage.objects import open_store


async def main(out: str, run_id: str, flush_every: float) -> None:
    store = open_store(out)
    store.prepare()
    config = ServeConfig(
        out=out,
        jwks_url="http://127.0.0.1:9/",
        allow_private_images=True,
        seconds_per_part=flush_every,
    )
    intake = Intake(config, store, Inbox(store), run_id=run_id)
    with anyio.open_signal_receiver(signal.SIGTERM) as signals:
        async with anyio.create_task_group() as tg:
            await tg.start(intake.run)
            print("ready", flush=True)
            async for _ in signals:
                tg.cancel_scope.cancel()
                break


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], sys.argv[2], float(sys.argv[3]))

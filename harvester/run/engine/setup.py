"""How a harvest's shards run, chosen once before the driver starts: the engine, how many
shards, the run's progress channel (a ``Board``) and, on Ray, the cluster's actors.

    one lane (the default)   one shard in the driver's process; progress as files
    --workers N              one shard in the driver's process, the others in a local
                             process pool (``LocalEngine``); progress as files
    --engine ray             Ray tasks and one rate limiter actor for the cluster; progress as
                             files on a shared disk, else a board actor on the driver's node
                             (an ``s3://`` output: the shards' pairs go through the bucket)
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from harvester.errors import UsageError
from harvester.run.engine import Engine
from harvester.run.engine.local import ChildLogging, LocalEngine
from harvester.run.shard import Board, FileBoard, work_dir

if TYPE_CHECKING:
    from harvester.run.config import HarvestConfig


@dataclass(frozen=True, slots=True, kw_only=True)
class Setup:
    """What the driver needs to run a harvest's shards."""

    engine: Engine | None
    """None: one shard, in the driver's process."""
    count: int
    """How many shards."""
    board: Board
    limiter: Any = None
    """The cluster's rate limiter (a Ray actor handle) every shard keeps to; None: each
    shard has its own share of ``--rps``."""
    lowest_rate: Callable[[], float] | None = None
    """Reads the cluster limiter's lowest rate so far."""
    logging: ChildLogging | None = None
    """How shards log in processes the harvest did not start (Ray's workers)."""
    pairs_in_store: bool = False
    """The shards' nodes cannot read the driver's disk: their pairs go through the output."""


def start(config: HarvestConfig, *, run_id: str, log_format: str, cleanup: ExitStack) -> Setup:
    """The run's engine and its shards; what must end with the run goes on ``cleanup``.
    Raises ``UsageError`` for a cluster that cannot be used as asked."""
    files = FileBoard(work_dir(config.out, run_id))
    child = ChildLogging(
        levels={n: logging.getLogger(n).getEffectiveLevel() for n in ("harvester", "httpx")},
        json_run_id=run_id if log_format == "json" else None,
        secrets=(config.api_key,),
    )
    if config.engine != "ray":
        if config.lanes == 1:
            return Setup(engine=None, count=1, board=files)
        engine = LocalEngine(workers=config.lanes, logging_setup=child, here=True)
        return Setup(engine=engine, count=config.lanes, board=files)

    from harvester.run.engine.ray import RayEngine  # the optional extra

    ray_engine = cleanup.enter_context(
        RayEngine(address=config.ray_address, json_lines=log_format == "json")
    )
    nodes = ray_engine.node_count()
    if nodes > 1 and not config.out.everywhere and not config.shared_fs:
        raise UsageError(
            f"--out {config.out.location} is a folder on this machine, and the Ray cluster at "
            f"{ray_engine.address} has {nodes} nodes: each would write images and manifest "
            "parts to its own disk, and could not read the run's shard files. Use a folder "
            "that every node mounts at the same path (NFS, a shared volume) and say so "
            "with --shared-fs (job key shared-fs = true)"
        )
    count = max(1, min(config.workers or ray_engine.cpus(), config.concurrency, config.image_slots))
    limiter = ray_engine.start_limiter(config.rps)
    cleanup.callback(ray_engine.stop_actor, limiter)
    board: Board = files
    if config.out.everywhere:  # the nodes share no disk with the driver
        ray_board = ray_engine.start_board(run_id)
        cleanup.callback(ray_engine.stop_actor, ray_board.handle)
        board = ray_board
    return Setup(
        engine=ray_engine,
        count=count,
        board=board,
        limiter=limiter,
        lowest_rate=lambda: ray_engine.lowest_rate(limiter) or config.rps,
        logging=child,
        pairs_in_store=config.out.everywhere,
    )

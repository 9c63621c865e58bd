"""``harvest``: the one call that runs a harvest, given its configuration
(``harvester.run.config``): the engine set up by ``harvester.run.engine.setup``, the run driven
by ``harvester.run.driver``.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from contextlib import ExitStack
from datetime import UTC, datetime
from typing import Final

from harvester.errors import HarvesterError, UsageError
from harvester.run import reader
from harvester.run.config import HarvestConfig
from harvester.run.driver import Driver
from harvester.run.engine import setup as engine_setup
from harvester.run.stats import RunStats

KEY_ENV_VARS: Final = ("HARVESTER_API_KEY", "FAL_KEY")


def api_key_from_env(environ: dict[str, str] | os._Environ[str], name: str | None = None) -> str:
    """The API key: from ``name`` if given, else HARVESTER_API_KEY, FAL_KEY, or
    FAL_KEY_ID + FAL_KEY_SECRET (as fal's clients read it). Raises ``UsageError`` if none."""
    names = (name,) if name else KEY_ENV_VARS
    for var in names:
        value = environ.get(var, "").strip()
        if value:
            return value
    if not name:
        key_id = environ.get("FAL_KEY_ID", "").strip()
        key_secret = environ.get("FAL_KEY_SECRET", "").strip()
        if key_id and key_secret:
            return f"{key_id}:{key_secret}"
    where = name or "HARVESTER_API_KEY (or FAL_KEY, or FAL_KEY_ID + FAL_KEY_SECRET)"
    raise UsageError(f"no API key: set {where} in the environment; nothing was fetched")


def new_run_id(now: datetime) -> str:
    """Sortable and unique: ``20261124T031500.123Z-3f9a1c``. Runs on one folder are serialised
    by its lock, so the milliseconds keep a later run's id above an earlier one's."""
    return f"{now:%Y%m%dT%H%M%S}.{now.microsecond // 1000:03d}Z-{secrets.token_hex(3)}"


def harvest(
    config: HarvestConfig,
    *,
    on_start: Callable[[RunStats], None] | None = None,
    on_tick: Callable[[RunStats], None] | None = None,
    tick: float = 0.5,
    run_id: str | None = None,
    log_format: str = "text",
) -> RunStats:
    """Run one harvest to the end and return its stats (``stats.exit_code`` says how it went).

    Raises ``HarvesterError`` subclasses for run-level problems: bad options, unusable input,
    a rejected key, a locked or unwritable output folder. ``run_id`` names the run (default:
    a fresh ``new_run_id``), so a caller can tag its log lines before the run starts;
    ``log_format`` (text or json) is how shards in other processes write their log lines.
    """
    config.validate()
    files = reader.inspect(config.inputs, columns=config.columns)
    config.out.prepare()
    started = datetime.now(UTC)
    stats = RunStats(
        run_id=run_id or new_run_id(started),
        started_at=started,
        out_dir=config.out.location,
        inputs=files,
        rows_in_input=sum(f.rows for f in files),
        rps=config.rps,
    )
    with ExitStack() as cleanup:
        setup = engine_setup.start(
            config, run_id=stats.run_id, log_format=log_format, cleanup=cleanup
        )
        stats.processes = stats.shards = setup.count
        driver = Driver(config, stats, setup=setup)
        driver.run(files, on_start=on_start, on_tick=on_tick, tick=tick)
    return stats


__all__ = [
    "HarvestConfig",
    "HarvesterError",
    "RunStats",
    "api_key_from_env",
    "harvest",
]

"""A harvest: its configuration and checks, and ``harvest``, the one call that runs it (the
engine set up by ``harvester.run.engine.setup``, the run driven by ``harvester.run.driver``).
"""

from __future__ import annotations

import math
import os
import secrets
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import httpx

from harvester.api.retry import RetryPolicy
from harvester.defaults import AUTH_SCHEMES, DEFAULT_BASE_URL, FAL_QUEUE_HOST
from harvester.errors import HarvesterError, UsageError
from harvester.run import reader
from harvester.run.driver import Driver
from harvester.run.engine import DEFAULT_MAX_RETRIES
from harvester.run.engine import setup as engine_setup
from harvester.run.request import LaneSettings
from harvester.run.stats import RunStats
from harvester.storage.layout import Layout
from harvester.storage.objects import open_store

KEY_ENV_VARS: Final = ("HARVESTER_API_KEY", "FAL_KEY")
IMAGE_SLOTS_PER_FETCH: Final = 2
"""A result has 1.75 images on average, and an image takes about as long as a result: two
download slots per fetch slot keep every fetch slot busy, on a slow link too (README
"Performance" has the measurements)."""
ENGINES: Final = ("local", "ray")


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


@dataclass(frozen=True, slots=True, kw_only=True)
class HarvestConfig:
    inputs: tuple[Path, ...]
    out_dir: Path
    """The output folder; with ``out_url``, a local folder for the run's temp files only
    (shard files, progress, spill files, parts being built; ``objects.scratch_dir``)."""
    out_url: str | None = None
    """``s3://bucket/prefix``: images, manifest and run records go there (credentials from
    the AWS environment variables)."""
    api_key: str = field(repr=False)
    base_url: str = DEFAULT_BASE_URL
    auth_scheme: str = "auto"
    """``bearer`` (relays), ``key`` (fal.ai), or ``auto``: key for fal.ai's own queue host."""
    concurrency: int = 32
    """Result fetches in flight."""
    image_concurrency: int | None = None
    """Image downloads in flight; None: ``IMAGE_SLOTS_PER_FETCH`` per result fetch."""
    rps: float = 50.0
    """Result requests per second, retries included, across the whole run."""
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    pending_wait: float = 0.0
    """Seconds to keep re-polling requests that are still in progress, within this run."""
    max_image_bytes: int = 64 * 1024 * 1024
    allow_private_images: bool = False
    """Fetch images from loopback, link-local and private addresses too (they are refused
    unless the API base URL is on such an address itself)."""
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    rows_per_part: int = 5_000
    seconds_per_part: float = 30.0
    seed: int | None = None
    """Seed for retry jitter (tests); None draws one."""
    workers: int | None = None
    """Processes that fetch and download (this one included); None: one. One process is as
    fast as two on the bench world, with 0.89x the CPU and 0.38x the summed peak RSS
    (docs/performance.md, "Processes")."""
    give_up_after: float = 7.0
    """Days: a request never ok this long after its first row gets a final ``expired`` row
    and is no longer fetched."""
    retry_expired: bool = False
    """Fetch given-up (``expired``) requests again, and give up on none in this run."""
    columns: reader.Columns = field(default_factory=reader.Columns)
    """The exports' model and request id columns (``model``, ``request_id``)."""
    engine: str = "local"
    """``local``: this machine's processes; ``ray``: Ray tasks on the cluster at
    ``ray_address`` (one shard per CPU of the cluster unless ``workers`` says how many)."""
    ray_address: str | None = None
    """The Ray head's ``host:port`` (None: ``RAY_ADDRESS``)."""
    shared_fs: bool = False
    """``out_dir`` is on a file system every node of the cluster mounts at the same path."""
    max_retries: int = DEFAULT_MAX_RETRIES
    """How often a shard runs again after its process or node died."""

    @property
    def lanes(self) -> int:
        """How many shards the work is split into, each run by its own process (each needs
        at least one fetch slot)."""
        wanted = 1 if self.workers is None else self.workers
        # Each lane needs a fetch slot, a download slot and a whole request per second of its
        # own (see ``lane_rps``).
        return max(1, min(wanted, self.concurrency, self.image_slots, math.floor(self.rps)))

    def lane_rps(self, index: int) -> float:
        """Shard ``index``'s share of ``rps``. A shard's limiter lets at most ``floor(its
        rate)`` requests start in any one-second window, so the shares are whole numbers that
        add up to ``floor(rps)`` (then scaled by ``rps / floor(rps)``): the shards' windows
        together never hold more than ``rps`` starts, and their rates add up to ``rps``."""
        n = self.lanes
        if n == 1:
            return self.rps
        whole = math.floor(self.rps)
        return (whole // n + (1 if index < whole % n else 0)) * self.rps / whole

    @property
    def image_slots(self) -> int:
        """Image downloads in flight: as set, or ``IMAGE_SLOTS_PER_FETCH`` per fetch slot."""
        if self.image_concurrency is not None:
            return self.image_concurrency
        return IMAGE_SLOTS_PER_FETCH * self.concurrency

    def lane_settings(
        self, run_id: str, index: int, *, count: int | None = None, shared_rate: bool = False
    ) -> LaneSettings:
        """Shard ``index``'s share (of ``count`` shards, default ``lanes``): the concurrencies
        and ``rps`` split so that all shards together never exceed them. ``shared_rate``: a
        cluster limiter keeps ``rps`` for all shards, each may go up to all of it."""
        n = count or self.lanes

        def share(total: int) -> int:
            return total // n + (1 if index < total % n else 0)

        return LaneSettings(
            run_id=run_id,
            out_dir=self.out_dir,
            base_url=self.base_url,
            authorization=self.authorization,
            concurrency=share(self.concurrency),
            image_concurrency=share(self.image_slots),
            rps=self.rps if shared_rate else self.lane_rps(index),
            retry=self.retry,
            pending_wait=self.pending_wait,
            max_image_bytes=self.max_image_bytes,
            allow_private_images=self.allow_private_images,
            connect_timeout=self.connect_timeout,
            read_timeout=self.read_timeout,
            seed=None if self.seed is None else self.seed + index,
            out_url=self.out_url,
        )

    def validate(self) -> None:
        """Check option values and combinations before any file or network is touched."""
        try:
            url = httpx.URL(self.base_url)
            host = url.host  # decoding an IDNA host can fail too
        except (httpx.InvalidURL, ValueError) as exc:
            raise UsageError(f"--base-url {self.base_url!r} is not a valid URL ({exc})") from None
        if url.scheme not in ("http", "https") or not host:
            raise UsageError(f"--base-url {self.base_url!r} must be an http:// or https:// URL")
        if url.query or url.fragment:
            raise UsageError(f"--base-url {self.base_url!r} must not have a query or fragment")
        if self.auth_scheme not in AUTH_SCHEMES:
            raise UsageError(f"--auth-scheme must be one of {', '.join(AUTH_SCHEMES)}")
        if not self.api_key or any(c in self.api_key for c in "\r\n"):
            raise UsageError("the API key is empty or contains a line break")
        checks = (
            (self.concurrency >= 1, "--concurrency must be at least 1"),
            (self.image_slots >= 1, "--image-concurrency must be at least 1"),
            (self.workers is None or self.workers >= 1, "--workers must be at least 1"),
            (self.rps > 0, "--rps must be greater than 0"),
            (self.retry.max_attempts >= 1, "--max-attempts must be at least 1"),
            (self.retry.budget > 0, "--retry-budget must be greater than 0"),
            (self.pending_wait >= 0, "--pending-wait must not be negative"),
            (self.max_image_bytes >= 1, "--max-image-bytes must be at least 1"),
            (self.give_up_after > 0, "--give-up-after must be greater than 0 days"),
        )
        for ok, message in checks:
            if not ok:
                raise UsageError(message)
        if not self.inputs:
            raise UsageError("give at least one CSV export to harvest")
        if self.engine not in ENGINES:
            raise UsageError(f"--engine must be one of {', '.join(ENGINES)}")
        if self.ray_address and self.engine != "ray":
            raise UsageError("--ray-address is for --engine ray")

    @property
    def location(self) -> Path | str:
        """Where the output lives: ``out_url``, else ``out_dir``."""
        return self.out_url or self.out_dir

    @property
    def authorization(self) -> str:
        scheme = self.auth_scheme
        if scheme == "auto":
            scheme = "key" if httpx.URL(self.base_url).host == FAL_QUEUE_HOST else "bearer"
        return f"{'Key' if scheme == 'key' else 'Bearer'} {self.api_key}"


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
    layout = Layout(config.out_dir)
    layout.prepare()
    remote = None if config.out_url is None else open_store(config.out_url, temp_dir=layout.tmp)
    started = datetime.now(UTC)
    stats = RunStats(
        run_id=run_id or new_run_id(started),
        started_at=started,
        out_dir=config.location,
        inputs=files,
        rows_in_input=sum(f.rows for f in files),
        rps=config.rps,
    )
    with ExitStack() as cleanup:
        setup = engine_setup.start(
            config, run_id=stats.run_id, log_format=log_format, cleanup=cleanup
        )
        stats.processes = stats.shards = setup.count
        driver = Driver(config, stats, layout=layout, remote=remote, setup=setup)
        driver.run(files, on_start=on_start, on_tick=on_tick, tick=tick)
    return stats


__all__ = [
    "AUTH_SCHEMES",
    "DEFAULT_BASE_URL",
    "HarvestConfig",
    "HarvesterError",
    "RunStats",
    "api_key_from_env",
    "harvest",
]

"""A harvest's configuration (``HarvestConfig``), its checks, and how it is split among shards.

The fields an option sets take their defaults from the option's declaration
(``harvester.options``); ``HarvestConfig.from_options`` puts option values where their
declarations say.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import httpx

from harvester import options
from harvester.api.retry import RetryPolicy
from harvester.api.urls import http_url
from harvester.defaults import FAL_QUEUE_HOST
from harvester.errors import UsageError
from harvester.options import AUTO_WORKERS_MAX, AUTO_WORKERS_RPS, IMAGE_SLOTS_PER_FETCH
from harvester.run import reader
from harvester.run.engine import DEFAULT_MAX_RETRIES
from harvester.run.request import LaneSettings
from harvester.storage.objects import Store

_DEFAULT: Final = options.defaults()


def auto_workers(rps: float) -> int:
    """``--workers auto``: one process per core this process may use (at most
    ``AUTO_WORKERS_MAX``) from ``AUTO_WORKERS_RPS`` up, where one process would be short of
    CPU; one below it."""
    if rps < AUTO_WORKERS_RPS:
        return 1
    return max(1, min(AUTO_WORKERS_MAX, usable_cores()))


CPU_MAX: Final = Path("/sys/fs/cgroup/cpu.max")
"""cgroup v2's CPU quota of this process's group: ``max PERIOD`` or ``QUOTA PERIOD``."""


def usable_cores(cpu_max: Path = CPU_MAX) -> int:
    """The cores this process may run on (its affinity, else the machine's), at most what a
    cgroup's CPU quota allows (a container limited to 1.5 CPUs: 2)."""
    affinity = getattr(os, "sched_getaffinity", None)
    cores = len(affinity(0)) if affinity is not None else (os.cpu_count() or 1)
    try:
        quota, period = cpu_max.read_text().split()[:2]
    except (OSError, ValueError):
        return cores
    if quota == "max" or not quota.isdigit() or not period.isdigit() or int(period) == 0:
        return cores
    return max(1, min(cores, math.ceil(int(quota) / int(period))))


@dataclass(frozen=True, slots=True, kw_only=True)
class HarvestConfig:
    """What one harvest does. Fields an option sets are documented by the option's help."""

    inputs: tuple[Path, ...]
    out: Store
    """Where images, manifest and run records go (``objects.open_store``)."""
    api_key: str = field(repr=False)
    base_url: str = _DEFAULT["base_url"]
    auth_scheme: str = _DEFAULT["auth_scheme"]
    concurrency: int = _DEFAULT["concurrency"]
    image_concurrency: int | None = _DEFAULT["image_concurrency"]
    rps: float = _DEFAULT["rps"]
    """Across the whole run."""
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    pending_wait: float = _DEFAULT["pending_wait"]
    max_image_bytes: int = _DEFAULT["max_image_bytes"]
    allow_private_images: bool = _DEFAULT["allow_private_images"]
    connect_timeout: float = 10.0
    read_timeout: float = _DEFAULT["timeout"]
    rows_per_part: int = 5_000
    seconds_per_part: float = _DEFAULT["flush_every"]
    seed: int | None = None
    """Seed for retry jitter (tests); None draws one."""
    workers: int | None = _DEFAULT["workers"]
    """None: one process (docs/performance.md, "Processes", says why); on Ray, one shard per
    CPU of the cluster."""
    give_up_after: float = _DEFAULT["give_up_after"]
    retry_expired: bool = _DEFAULT["retry_expired"]
    columns: reader.Columns = field(default_factory=reader.Columns)
    engine: str = _DEFAULT["engine"]
    ray_address: str | None = _DEFAULT["ray_address"]
    """None: ``RAY_ADDRESS``."""
    shared_fs: bool = _DEFAULT["shared_fs"]
    max_retries: int = DEFAULT_MAX_RETRIES
    """How often a shard runs again after its process or node died."""

    @classmethod
    def from_options(cls, values: Mapping[str, Any], **given: Any) -> HarvestConfig:
        """The configuration of option ``values`` (by Python name, as ``Job`` holds them),
        each put where its declaration's ``setting`` says; ``given`` sets the other fields."""
        groups: dict[str, dict[str, Any]] = {}
        for option in options.for_command(options.JOB_COMMAND):
            if option.target is not None and option.attr in values:
                head, _, part = option.target.partition(".")
                if part:
                    groups.setdefault(head, {})[part] = values[option.attr]
                else:
                    given[head] = values[option.attr]
        makers = {f.name: f.default_factory for f in dataclasses.fields(cls)}
        for head, parts in groups.items():
            make = makers[head]
            assert callable(make), f"{head}: a setting of several options needs a default_factory"
            given[head] = dataclasses.replace(make(), **parts)
        return cls(**given)

    def setting(self, target: str) -> Any:
        """The value at an option's ``target`` (``retry.budget``)."""
        value: Any = self
        for name in target.split("."):
            value = getattr(value, name)
        return value

    @property
    def lanes(self) -> int:
        """How many shards the work is split into, each run by a process of its own, the
        harvest's included (each needs
        at least one fetch slot)."""
        wanted = auto_workers(self.rps) if self.workers is None else self.workers
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
            store=self.out,
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
        )

    def validate(self) -> None:
        """Check option values and combinations before any file or network is touched:
        ``UsageError`` naming the option."""
        try:
            url = httpx.URL(self.base_url)
            host = url.host  # decoding an IDNA host can fail too
        except (httpx.InvalidURL, ValueError) as exc:
            raise UsageError(f"--base-url {self.base_url!r} is not a valid URL ({exc})") from None
        if url.scheme not in ("http", "https") or not host:
            raise UsageError(f"--base-url {self.base_url!r} must be an http:// or https:// URL")
        if url.userinfo:
            raise UsageError(
                "--base-url must not carry a user name or password; the key comes from the "
                "environment"
            )
        checked = http_url(self.base_url, what="--base-url")
        if isinstance(checked, str):
            raise UsageError(checked)
        if url.query or url.fragment:
            raise UsageError(f"--base-url {self.base_url!r} must not have a query or fragment")
        if not self.api_key or any(c in self.api_key for c in "\r\n"):
            raise UsageError("the API key is empty or contains a line break")
        for option in options.for_command(options.JOB_COMMAND):
            value = None if option.target is None else self.setting(option.target)
            refusal = None if value is None else option.refusal(value)
            if refusal:
                raise UsageError(f"--{option.name} {refusal}")
        if not self.inputs:
            raise UsageError("give at least one CSV export to harvest")
        if self.ray_address and self.engine != "ray":
            raise UsageError("--ray-address is for --engine ray")

    @property
    def authorization(self) -> str:
        scheme = self.auth_scheme
        if scheme == "auto":
            scheme = "key" if httpx.URL(self.base_url).host == FAL_QUEUE_HOST else "bearer"
        return f"{'Key' if scheme == 'key' else 'Bearer'} {self.api_key}"

"""The Ray engine: a run's shards as Ray tasks on a cluster, and the run's one rate limiter as a
Ray actor.

Each spec becomes one task (``fn`` is pickled once, by reference: the workers import it from
their own harvester install). At most ``max_in_flight`` tasks are submitted at a time, so the
specs' iterable is consumed as fast as the cluster works and no faster, and results are handed
to ``on_result`` in the driver as they finish (``ray.wait``). Tasks are spread over the nodes:
a harvest is bound by each machine's network, not its CPU.

Retries are Ray's own: a task whose worker process or node dies runs again elsewhere, at most
``max_retries`` times (``retry_exceptions=False``: a shard that raised would raise again).
What still fails comes back as a :class:`~harvester.run.engine.Failure`.

Ray is an optional extra (``pip install 'harvester[ray]'``): this module imports it when an
engine is made, and says how to install it when it is missing.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Iterable, Iterator
from types import ModuleType
from typing import TYPE_CHECKING, Any, Final

from harvester.errors import ExitCode, UsageError
from harvester.run.engine import DEFAULT_MAX_RETRIES, Failure, R, S, failure_of
from harvester.run.engine.board import ProgressBoard
from harvester.run.engine.limiter import ClusterPermits, RateLimiterActor

if TYPE_CHECKING:
    from ray.actor import ActorHandle

log = logging.getLogger("harvester")

INSTALL_HINT: Final = "pip install 'harvester[ray]'"
BOARD_PREFIX: Final = "harvester-board-"
CALL_TIMEOUT: Final = 30.0
"""Seconds the driver waits for an answer of the run's actors on its own node."""
LOCAL: Final = "local"
"""The address that starts a Ray of this machine's own for the run (``ray.init()``)."""


def import_ray() -> ModuleType:
    """Ray, or a UsageError that says how to get it."""
    try:
        import ray  # an optional extra, imported only when asked for
    except ImportError as exc:
        raise UsageError(f"the ray engine needs Ray, an optional extra: {INSTALL_HINT}") from exc
    return ray


def cluster_address(address: str | None) -> str:
    """The cluster to connect to: ``address``, else ``RAY_ADDRESS``, else a UsageError."""
    chosen = address or os.environ.get("RAY_ADDRESS", "")
    if not chosen:
        raise UsageError(
            "the ray engine needs a cluster: set RAY_ADDRESS or --ray-address "
            f"(host:port of the head node, or {LOCAL!r} to start Ray on this machine only)"
        )
    return chosen


PROBE_TIMEOUT: Final = 10.0
"""Seconds to wait for the head node to accept a connection before Ray is asked to join it."""


def probe_head(address: str, *, timeout: float = PROBE_TIMEOUT) -> None:
    """A UsageError, at once, when nothing listens at ``host:port``: Ray itself keeps retrying
    a wrong address for minutes. Other forms (``ray://``, ``auto``) are left to Ray."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address or not host:
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise UsageError(
            f"cannot reach the Ray head node at {address} ({exc.strerror or exc}): check "
            "RAY_ADDRESS or --ray-address (host:port of the head's GCS, 6379 by default) "
            "and that `ray start --head` runs there"
        ) from exc


class RayEngine:
    """Runs specs as Ray tasks on the cluster at ``address`` (default: ``RAY_ADDRESS``).
    ``json_lines``: the tasks log JSON lines, which Ray forwards to this process's stderr
    unchanged (in a process that has not imported Ray yet).

    Connects on first use, unless this process is already connected; ``close()`` disconnects
    only what it connected."""

    def __init__(
        self,
        *,
        address: str | None = None,
        max_in_flight: int | None = None,
        num_cpus: float = 1.0,
        json_lines: bool = False,
    ) -> None:
        if json_lines:
            # The shards' lines reach this process's stderr as they are: without the
            # "(run_shard pid=..., ip=...)" prefix and not folded into "[repeated 3x across
            # cluster]" (Ray's defaults, read when Ray is imported).
            os.environ.setdefault("RAY_DISABLE_WORKER_LOG_PREFIX", "1")
            os.environ.setdefault("RAY_DEDUP_LOGS", "0")
        self._json_lines = json_lines
        self._ray = import_ray()
        self.address = cluster_address(address)
        self.max_in_flight = max_in_flight
        """Tasks submitted and not yet finished; default: twice the cluster's CPUs."""
        self.num_cpus = num_cpus
        """CPUs a task holds on its node (a shard is mostly waiting on the network)."""
        self._connected_here = False

    def connect(self) -> None:
        ray = self._ray
        if ray.is_initialized():
            return
        if self.address != LOCAL:
            probe_head(self.address)
        if self._json_lines:
            # Ray's own lines on this process ("Connecting to existing Ray cluster ...") go
            # through the run's JSON handler, not a plain one of Ray's.
            ray_log = logging.getLogger("ray")
            ray_log.handlers.clear()
            ray_log.propagate = True
        try:
            ray.init(
                address=None if self.address == LOCAL else self.address,
                configure_logging=not self._json_lines,
            )
        except ConnectionError as exc:
            raise UsageError(
                f"cannot connect to the Ray cluster at {self.address}: {exc}; "
                "check RAY_ADDRESS or --ray-address and that the head node is up"
            ) from exc
        self._connected_here = True

    def node_count(self) -> int:
        """How many nodes of the cluster are alive."""
        self.connect()
        return sum(1 for node in self._ray.nodes() if node.get("Alive"))

    def cpus(self) -> int:
        """The cluster's CPUs (at least 1)."""
        self.connect()
        return max(1, int(self._ray.cluster_resources().get("CPU", 1)))

    def close(self) -> None:
        if self._connected_here:
            self._ray.shutdown()
            self._connected_here = False

    def __enter__(self) -> RayEngine:
        self.connect()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def run(
        self,
        fn: Callable[[S], R],
        specs: Iterable[S],
        *,
        on_result: Callable[[S, R], None],
        max_retries: int = DEFAULT_MAX_RETRIES,
    ) -> list[Failure[S]]:
        self.connect()
        ray = self._ray
        task = ray.remote(fn).options(
            max_retries=max_retries,
            retry_exceptions=False,
            num_cpus=self.num_cpus,
            scheduling_strategy="SPREAD",
        )
        limit = self.max_in_flight or max(1, 2 * int(ray.cluster_resources().get("CPU", 1)))
        todo: Iterator[S] = iter(specs)
        in_flight: dict[Any, S] = {}
        failures: list[Failure[S]] = []
        try:
            for spec in todo:
                in_flight[task.remote(spec)] = spec
                if len(in_flight) >= limit:
                    self._finish_one(in_flight, on_result, failures)
            while in_flight:
                self._finish_one(in_flight, on_result, failures)
        finally:
            for ref in in_flight:  # only when the driver itself stops early (a bug, Ctrl-C)
                ray.cancel(ref, force=True)
        return failures

    def _finish_one(
        self,
        in_flight: dict[Any, S],
        on_result: Callable[[S, R], None],
        failures: list[Failure[S]],
    ) -> None:
        ray = self._ray
        done, _ = ray.wait(list(in_flight), num_returns=1)
        for ref in done:
            spec = in_flight.pop(ref)
            try:
                result: R = ray.get(ref)
            except ray.exceptions.RayTaskError as exc:  # the shard function raised
                failures.append(failure_of(spec, exc.cause))
                continue
            except ray.exceptions.RayError as exc:  # its worker or node died, past the retries
                first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                failures.append(
                    Failure(
                        spec=spec,
                        error=f"{type(exc).__name__}: {first_line}",
                        exit_code=ExitCode.WORKER,
                    )
                )
                continue
            on_result(spec, result)

    def _on_this_node(self, cls: type, *args: object, name: str | None = None) -> Any:
        """An actor of ``cls`` on this (the driver's) node, holding no CPU, never restarted."""
        self.connect()
        ray = self._ray
        from ray.util.scheduling_strategies import (  # the optional extra
            NodeAffinitySchedulingStrategy,
        )

        here = ray.get_runtime_context().get_node_id()
        return (
            ray.remote(cls)
            .options(
                num_cpus=0,
                max_restarts=0,
                name=name,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=here, soft=False),
            )
            .remote(*args)
        )

    def start_limiter(self, max_rps: float) -> ActorHandle[RateLimiterActor]:
        """The run's cluster-wide rate limiter, on this (the driver's) node, holding no CPU.
        It is not restarted if it dies: a new one would not know the slots already given."""
        handle: ActorHandle[RateLimiterActor] = self._on_this_node(RateLimiterActor, max_rps)
        return handle

    def lowest_rate(self, limiter: ActorHandle[RateLimiterActor]) -> float | None:
        """The limiter's lowest rate so far (the cluster's, after 429s); None if it is gone."""
        ray = self._ray
        try:
            return float(ray.get(limiter.stats.remote(), timeout=CALL_TIMEOUT)["lowest_rate"])
        except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
            return None

    def start_board(self, run_id: str) -> RayBoard:
        """The run's progress board (``harvester.run.engine.board``), on this node, named
        ``harvester-board-<run_id>`` in the driver's namespace."""
        return RayBoard(self._on_this_node(ProgressBoard, name=f"{BOARD_PREFIX}{run_id}"))

    def stop_actor(self, actor: Any) -> None:
        """End a run's actor (when this process stays connected after the run)."""
        if self._ray.is_initialized():
            self._ray.kill(actor)


def cluster_permits(limiter: ActorHandle[RateLimiterActor]) -> ClusterPermits:
    """The worker side of the limiter: made inside a shard's task from the actor's handle (a
    handle pickles into the shard's spec)."""
    return ClusterPermits(limiter.lease.remote, limiter.on_throttled.remote)


class RayBoard:
    """The run's progress board (a Ray actor on the driver's node), as the shards (``post``,
    from their event loop) and the driver (``snapshot``, ``stop``) use it: a
    ``harvester.run.shard.Board``. Pickles into the shards' specs (an actor handle does)."""

    def __init__(self, handle: ActorHandle[ProgressBoard]) -> None:
        self.handle = handle

    async def post(self, result: Any) -> bool:
        """A shard's counters; True when the run asks its shards to stop."""
        return bool(await self.handle.post.remote(result.index, result))

    def snapshot(self) -> dict[int, Any]:
        """Every shard's last counters (none if the board cannot be reached)."""
        ray = import_ray()
        handle: Any = self.handle  # Ray's stubs type this call as never returning
        try:
            found: Any = ray.get(handle.snapshot.remote(), timeout=CALL_TIMEOUT)
        except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
            return {}
        return dict(found)

    def stop(self) -> None:
        """Ask every shard to stop at its next post (they keep what they finished)."""
        ray = import_ray()
        handle: Any = self.handle  # as in snapshot
        try:
            ray.get(handle.stop.remote(), timeout=CALL_TIMEOUT)
        except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
            log.warning("cannot ask the shards to stop: the run's board actor is gone")


def current_node() -> str:
    """The Ray node id of this process (a shard's task), or "" outside Ray."""
    ray = import_ray()
    if not ray.is_initialized():
        return ""
    return str(ray.get_runtime_context().get_node_id())

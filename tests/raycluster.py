"""A real two-node Ray cluster on 127.0.0.1 for the ray-marked tests.

A head and a second node (``ray.cluster_utils.Cluster``: each node is its own GCS/raylet
processes, as ``ray start`` makes them), every Ray process on loopback
(``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` and ``node_ip_address``), with a temporary HOME (Ray's
token auth writes under ``~/.ray``), its own temp dir (no other Ray on the machine is touched)
and no usage stats. The test process is the driver, on the head node, so the second node can be
killed mid-run. At the end every process the cluster started is gone, or the test fails.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent

RAY_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    # Workers import the tests' shard functions by name, as they would the harvester's.
    "PYTHONPATH": str(REPO),
}


# Ray reads this one when it is first imported (by whichever test or module imports it first),
# not when a node starts: set here, at collection, before any test runs.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"


def import_ray() -> Any:
    """Ray, or a failure (never a skip) that says how to install it."""
    try:
        import ray
        import ray.cluster_utils
        from ray._private import ray_constants
    except ImportError:
        pytest.fail(
            "the ray-marked tests need Ray: make install (the dev extra has harvester[ray])"
        )
    # Else the driver looks for its raylet on the machine's own address and hangs.
    assert not ray_constants.ENABLE_RAY_CLUSTER, "Ray was imported before tests.raycluster"
    return ray


@dataclass(slots=True)
class RayCluster:
    cluster: Any
    """The ``ray.cluster_utils.Cluster``."""
    head: Any
    worker: Any
    """The second node: ``cluster.remove_node(worker, allow_graceful=False)`` kills it."""
    address: str
    node_args: dict[str, Any]

    def replace_worker(self) -> None:
        """After a test killed the second node: a new second node, for the tests after it
        (the cluster is shared by the whole session)."""
        self.worker = self.cluster.add_node(**self.node_args)
        self.cluster.wait_for_nodes()

    def worker_raylet_pid(self) -> int:
        """The second node's raylet: its task processes are its children."""
        return int(self.worker.all_processes["raylet"][0].process.pid)

    def kill_worker(self) -> None:
        """Kill the second node as when its machine is lost: the node, and its task processes
        with it (on their own they would notice a moment later, and could still hand in a
        result)."""
        doomed = children(self.worker_raylet_pid())
        self.cluster.remove_node(self.worker, allow_graceful=False)
        for pid in doomed:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    @property
    def head_id(self) -> str:
        return str(self.head.node_id)

    @property
    def worker_id(self) -> str:
        return str(self.worker.node_id)


def children(parent: int) -> set[int]:
    """The processes whose parent is ``parent``."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with suppress(OSError, ValueError, IndexError):
                stat = (entry / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
                    found.add(int(entry.name))
    return found


def _leftovers(home: str) -> list[int]:
    """Ray's processes started with the cluster's own HOME: Ray's workers rename themselves
    (``ray::IDLE``), but keep the environment they were started with. Other tests' processes
    started while the cluster runs inherit that HOME too (a sandbox, a harvest): only a
    command line that names Ray counts."""
    mark = f"HOME={home}".encode() + b"\0"
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            cmdline = (entry / "cmdline").read_bytes().lower()
        except OSError:
            continue
        if mark in environ and b"ray" in cmdline:
            pids.append(int(entry.name))
    return pids


@contextmanager
def ray_cluster(*, num_cpus: int = 2) -> Iterator[RayCluster]:
    """Start the head and a second node, connect this process as the driver; stop it all."""
    # Short: Ray's unix sockets live under it and have a 107-byte limit.
    root = Path(tempfile.mkdtemp(prefix="hvray-"))
    saved = {name: os.environ.get(name) for name in [*RAY_ENV, "HOME", "RAY_TMPDIR"]}
    os.environ.update(RAY_ENV)
    os.environ["HOME"] = str(root / "home")
    os.environ["RAY_TMPDIR"] = str(root)  # where Ray notes the current cluster's address
    (root / "home").mkdir()
    ray = import_ray()
    cluster = None
    try:
        node_args = {
            "node_ip_address": "127.0.0.1",
            "num_cpus": num_cpus,
            "include_dashboard": False,
            "temp_dir": str(root / "ray"),
        }
        cluster = ray.cluster_utils.Cluster(
            initialize_head=True, head_node_args=node_args, shutdown_at_exit=False
        )
        worker = cluster.add_node(**node_args)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        yield RayCluster(cluster, cluster.head_node, worker, cluster.address, node_args)
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        left = _wait_gone(str(root / "home"))
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        shutil.rmtree(root, ignore_errors=True)
        assert not left, f"Ray processes left running after the cluster stopped: {left}"


def _wait_gone(mark: str, timeout: float = 30.0) -> list[int]:
    """Wait (bounded) for the cluster's processes to exit; kill and name any that do not."""
    deadline = time.monotonic() + timeout
    while (left := _leftovers(mark)) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in left:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return left

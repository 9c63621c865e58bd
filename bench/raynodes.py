"""Ray nodes on this machine for the bench's cluster section: ``ray.cluster_utils.Cluster``
(a head and more nodes, each its own raylet, as ``ray start`` makes them; ``ray start
--address`` itself refuses a second node when ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, which
keeps every process on 127.0.0.1), with a temporary HOME (Ray's token auth writes under
``~/.ray``) and its own temp folder. The bench process does not join: the harvest it starts
is the driver. At the end it stops exactly the processes it started (found by that HOME in
their environment): never ``ray stop``, which stops every Ray on the machine.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any


def _ours(home: str) -> list[int]:
    mark = f"HOME={home}".encode() + b"\0"
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with suppress(OSError):
                if mark in (entry / "environ").read_bytes():
                    pids.append(int(entry.name))
    return pids


@contextmanager
def ray_nodes(count: int, *, cpus_per_node: int = 1) -> Iterator[str]:
    """``count`` Ray nodes (a head and ``count - 1`` more); yields the head's address. The
    environment of this process is set for the run (a harvest started from it joins them)."""
    root = Path(tempfile.mkdtemp(prefix="hvb-"))  # short: Ray's unix sockets live under it
    home = str(root / "home")
    Path(home).mkdir()
    saved = dict(os.environ)
    os.environ.update(
        HOME=home,
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_USAGE_STATS_ENABLED="0",
        RAY_TMPDIR=str(root),  # where Ray notes the current cluster's address
    )
    try:
        import ray.cluster_utils  # after the environment: Ray reads it when imported

        node_args: dict[str, Any] = {
            "node_ip_address": "127.0.0.1",
            "num_cpus": cpus_per_node,
            "include_dashboard": False,
            "temp_dir": str(root / "ray"),
        }
        cluster = ray.cluster_utils.Cluster(
            initialize_head=True, head_node_args=node_args, shutdown_at_exit=False
        )
        for _ in range(count - 1):
            cluster.add_node(**node_args)
        cluster.wait_for_nodes()
        yield str(cluster.address)
    finally:
        os.environ.clear()
        os.environ.update(saved)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in _ours(home):
                with suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + 15
            while _ours(home) and time.monotonic() < deadline:
                time.sleep(0.2)
        shutil.rmtree(root, ignore_errors=True)

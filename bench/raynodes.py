"""Ray nodes on this machine for the bench's cluster section: ``ray start --head`` and
``ray start --address`` as on separate machines, every process on 127.0.0.1
(``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``), with a temporary HOME (Ray's token auth writes under
``~/.ray``) and its own temp folder. At the end the bench stops exactly the processes it
started (found by that HOME in their environment): never ``ray stop``, which stops every Ray
on the machine.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
    )
    port = _free_port()
    address = f"127.0.0.1:{port}"
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", str(cpus_per_node)]
    try:
        subprocess.run(
            [RAY, "start", "--head", "--port", str(port), "--include-dashboard", "false",
             "--temp-dir", str(root / "ray"), *common],
            check=True, capture_output=True,
        )  # fmt: skip
        for _ in range(count - 1):
            subprocess.run(
                [RAY, "start", "--address", address, *common], check=True, capture_output=True
            )
        time.sleep(2)  # the nodes register with the head
        yield address
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

"""Ceph's object gateway (a real S3 implementation, from Debian's packages) on 127.0.0.1.

One monitor, one OSD on ``memstore`` (objects live in the OSD's memory) and ``radosgw`` with
the ``beast`` frontend, all state under one temp folder, all on free ports, cephx on (with
authentication off the gateway loops on ``get_initial_auth_request returned -13``). The order
follows Ceph's manual deployment guide: every key, the monmap, the monitor, ``osd new``, the
OSD, the gateway, then an S3 user made with ``radosgw-admin``. Ready in 3-4 s on two busy
cores, about 135 MB resident when idle (``python -m tests.s3gateway`` measures both). Every daemon
runs in the foreground as a child of the test process, so stopping is a SIGTERM to each.

Install the binaries (Debian) with::

    apt-get install -y --no-install-recommends radosgw ceph-mon ceph-osd
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import httpx

BINARIES: Final = (
    "ceph",
    "ceph-authtool",
    "ceph-mon",
    "ceph-osd",
    "monmaptool",
    "radosgw",
    "radosgw-admin",
)
INSTALL_HINT: Final = (
    "the S3 tests need Ceph's object gateway from Debian's packages; as root run "
    "'apt-get install -y --no-install-recommends radosgw ceph-mon ceph-osd' "
    "(make test does this as root)"
)
REGION: Final = "us-east-1"
"""Signed into every request; the gateway's default zonegroup accepts any."""


KEYS: Final = {
    "client.admin": (("mon", "allow *"), ("osd", "allow *"), ("mgr", "allow *")),
    "osd.0": (("mon", "allow profile osd"), ("osd", "allow *"), ("mgr", "allow profile osd")),
    "client.rgw": (("mon", "allow rw"), ("osd", "allow rwx")),
}
"""The cephx keys the command line tools, the OSD and the gateway use, with their caps."""


class GatewayError(RuntimeError):
    """The gateway did not come up; the message has the log tail that says why."""


def missing_binaries() -> list[str]:
    return [name for name in BINARIES if shutil.which(name) is None]


@dataclass(frozen=True, slots=True)
class Gateway:
    """A running gateway and the S3 user made on it."""

    endpoint: str
    """``http://127.0.0.1:PORT``"""
    access_key: str
    secret_key: str
    region: str = REGION
    state_dir: Path = field(default=Path(), repr=False)
    pids: tuple[int, ...] = ()
    """The monitor's, the OSD's and the gateway's process ids."""

    def env(self) -> dict[str, str]:
        """The standard AWS variables a client (the harvester, polars) reads."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "AWS_ENDPOINT_URL": self.endpoint,
        }

    def storage_options(self) -> dict[str, str]:
        """The same, as polars' ``storage_options`` for ``s3://`` paths."""
        return {
            "aws_endpoint_url": self.endpoint,
            "aws_allow_http": "true",
            "aws_access_key_id": self.access_key,
            "aws_secret_access_key": self.secret_key,
            "aws_region": self.region,
        }

    def create_bucket(self, name: str) -> None:
        """A new, empty bucket (obstore cannot make buckets; pyarrow's S3 client can)."""
        from pyarrow import fs

        s3 = fs.S3FileSystem(
            access_key=self.access_key,
            secret_key=self.secret_key,
            region=self.region,
            endpoint_override=self.endpoint,
            allow_bucket_creation=True,
        )
        s3.create_dir(name)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _config(
    root: Path, *, fsid: str, mon_port: int, rgw_port: int, device_bytes: int = 1 << 30
) -> str:
    return f"""\
[global]
fsid = {fsid}
mon host = v2:127.0.0.1:{mon_port}
mon initial members = a
public addr = 127.0.0.1
ms bind ipv6 = false
ms bind msgr1 = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
osd objectstore = memstore
memstore device bytes = {device_bytes}
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
mon allow pool delete = true
osd crush chooseleaf type = 0
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
mon warn on pool no redundancy = false
# The gateway makes its pools one map change at a time, each waiting out the monitor's
# propose interval (1 s by default): 13 s to ready at the default, 3-4 s at this.
paxos propose interval = 0.05
run dir = {root}/run
log file = {root}/log/$name.log
admin socket = {root}/run/$name.$pid.asok
pid file = {root}/run/$name.pid
keyring = {root}/$name.keyring
mon data = {root}/mon/$name
osd data = {root}/osd/$name
crash dir = {root}/crash
exporter sock dir = {root}/run

[client.rgw]
rgw frontends = beast endpoint=127.0.0.1:{rgw_port}
rgw data = {root}/rgw
rgw enable usage log = false
rgw thread pool size = 32
"""


class _Cluster:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.conf = root / "ceph.conf"
        self.processes: list[subprocess.Popen[bytes]] = []

    def run(self, *args: str, timeout: float = 60) -> str:
        """A Ceph command line tool with this cluster's config; its stdout."""
        command = [args[0], "-c", str(self.conf), *args[1:]]
        done = subprocess.run(command, capture_output=True, timeout=timeout, check=False)
        if done.returncode != 0:
            raise GatewayError(
                f"{' '.join(args[:3])} exited {done.returncode}: "
                f"{done.stderr.decode(errors='replace')[-2000:]}"
            )
        return done.stdout.decode()

    def start(self, *args: str) -> subprocess.Popen[bytes]:
        """A daemon in the foreground (``-f``), output into the state folder."""
        name = args[0]
        log = open(self.root / "log" / f"{name}.out", "ab")  # noqa: SIM115 (closed below)
        try:
            process = subprocess.Popen(
                [name, "-c", str(self.conf), "-f", *args[1:]],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        finally:
            log.close()
        self.processes.append(process)
        return process

    def check_alive(self) -> None:
        for process in self.processes:
            if process.poll() is not None:
                raise GatewayError(
                    f"{process.args[0]!s} exited {process.returncode}: {self.log_tail()}"
                )

    def log_tail(self) -> str:
        lines: list[str] = []
        for log in sorted((self.root / "log").glob("*")):
            text = log.read_text(errors="replace").splitlines()[-8:]
            lines += [f"--- {log.name}", *text]
        return "\n".join(lines)

    def stop(self) -> None:
        """The gateway, then the OSD, then the monitor, each gone before the next is asked
        (an OSD whose monitor is gone first waits seconds for it)."""
        for process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=20)


def _wait(what: str, cluster: _Cluster, ready: object, *, timeout: float = 90) -> None:
    """Poll ``ready()`` until true; fail with the logs if a daemon dies or time runs out."""
    assert callable(ready)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        cluster.check_alive()
        if ready():
            return
        time.sleep(0.1)
    raise GatewayError(f"{what} not ready after {timeout:.0f} s: {cluster.log_tail()}")


@contextlib.contextmanager
def running_gateway(root: Path, *, device_bytes: int = 1 << 30) -> Iterator[Gateway]:
    """Start a monitor, an OSD and the gateway with all state under ``root``; stop them all
    on exit (also when starting fails). ``device_bytes``: what the OSD's memory store holds."""
    missing = missing_binaries()
    if missing:
        raise GatewayError(f"{', '.join(missing)} not found: {INSTALL_HINT}")
    for folder in ("run", "log", "mon", "osd", "rgw", "crash"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    mon_port, rgw_port = free_port(), free_port()
    fsid = str(uuid.uuid4())
    cluster = _Cluster(root)
    cluster.conf.write_text(
        _config(root, fsid=fsid, mon_port=mon_port, rgw_port=rgw_port, device_bytes=device_bytes)
    )
    try:
        # Every key is made here and given to the monitor at birth: no round trips later.
        mon_keyring = str(root / "mon.keyring")
        cluster.run(
            "ceph-authtool", "--create-keyring", mon_keyring, "--gen-key", "-n", "mon.",
            "--cap", "mon", "allow *",
        )  # fmt: skip
        for name, caps in KEYS.items():
            keyring = str(root / f"{name}.keyring")
            cap_args = [arg for service, cap in caps for arg in ("--cap", service, cap)]
            cluster.run(
                "ceph-authtool", "--create-keyring", keyring, "--gen-key", "-n", name, *cap_args
            )
            cluster.run("ceph-authtool", mon_keyring, "--import-keyring", keyring)
        monmap = str(root / "monmap")
        cluster.run(
            "monmaptool", "--create", "--addv", "a", f"[v2:127.0.0.1:{mon_port}]",
            "--fsid", fsid, monmap,
        )  # fmt: skip
        cluster.run("ceph-mon", "--mkfs", "-i", "a", "--monmap", monmap, "--keyring", mon_keyring)
        cluster.start("ceph-mon", "-i", "a")

        osd_uuid = str(uuid.uuid4())
        osd_id = cluster.run("ceph", "osd", "new", osd_uuid, "0").strip()
        (root / "osd" / f"osd.{osd_id}").mkdir()
        cluster.run("ceph-osd", "-i", osd_id, "--mkfs", "--osd-uuid", osd_uuid)
        cluster.start("ceph-osd", "-i", osd_id)
        # The gateway waits for the OSD by itself (it makes its pools once one is up).
        cluster.start("radosgw", "-n", "client.rgw")
        endpoint = f"http://127.0.0.1:{rgw_port}"

        def answers() -> bool:
            try:
                httpx.get(endpoint, timeout=2)
            except httpx.TransportError:
                return False
            return True

        _wait("the gateway", cluster, answers)
        access_key = "HARVESTER" + secrets.token_hex(6).upper()
        secret_key = secrets.token_urlsafe(30)
        cluster.run(
            "radosgw-admin", "user", "create", "--uid=harvester", "--display-name=harvester",
            f"--access-key={access_key}", f"--secret={secret_key}",
        )  # fmt: skip
        yield Gateway(
            endpoint=endpoint,
            access_key=access_key,
            secret_key=secret_key,
            state_dir=root,
            pids=tuple(p.pid for p in cluster.processes),
        )
    finally:
        cluster.stop()


def rss_bytes(pids: tuple[int, ...]) -> int:
    """Resident memory of these processes together (from ``/proc``)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total


if __name__ == "__main__":  # python -m tests.s3gateway: start, report, stop
    import tempfile

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="s3gw-") as tmp:
        with running_gateway(Path(tmp)) as gw:
            took = time.monotonic() - started
            print(f"ready in {took:.1f} s, {rss_bytes(gw.pids) >> 20} MiB resident", flush=True)
            gw.create_bucket("probe")
            stopping = time.monotonic()
        print(f"stopped in {time.monotonic() - stopping:.1f} s")

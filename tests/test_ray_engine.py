"""The engines: the inline reference, and Ray on a real two-node cluster on 127.0.0.1.

The ray-marked tests share one cluster (``cluster`` in conftest, started once per session). The
test that kills the second node starts a new one at its end.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from harvester.api.ratelimit import most_starts_in_window
from harvester.errors import AuthError, ExitCode, UsageError
from harvester.run.engine import Failure, InlineEngine
from tests.raycluster import RayCluster, import_ray


@dataclass(frozen=True, slots=True)
class Spec:
    n: int
    gate: str = ""
    """A folder: the shard writes ``N.NODE`` there when it starts, then waits for ``go``."""


def node_of(spec: Spec) -> tuple[int, str]:
    """The toy shard: which node ran it (after a pause, so that the work spreads)."""
    node = import_ray().get_runtime_context().get_node_id()
    if spec.gate:
        gate = Path(spec.gate)
        (gate / f"{spec.n}.{node}").write_text(str(os.getpid()))
        deadline = time.monotonic() + 120
        while not (gate / "go").exists():
            if time.monotonic() > deadline:
                raise TimeoutError("the test never opened the gate")
            time.sleep(0.05)
    else:
        time.sleep(0.2)
    return spec.n, node


def fails_on_odd(spec: Spec) -> int:
    if spec.n == 1:
        raise AuthError("the API refused the key")
    if spec.n % 2:
        raise ValueError(f"bad spec {spec.n}")
    return spec.n


def collect() -> tuple[list[tuple[Spec, Any]], Any]:
    got: list[tuple[Spec, Any]] = []

    def on_result(spec: Spec, result: Any) -> None:
        got.append((spec, result))

    return got, on_result


def test_inline_engine_reports_what_raised() -> None:
    got, on_result = collect()
    failures = InlineEngine().run(fails_on_odd, map(Spec, range(5)), on_result=on_result)
    assert [r for _, r in got] == [0, 2, 4]
    assert [(f.spec.n, f.exit_code) for f in failures] == [
        (1, ExitCode.AUTH),
        (3, ExitCode.BUG),
    ]
    assert failures[1].error == "ValueError: bad spec 3"


def test_without_ray_the_engine_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from harvester.run.engine.ray import RayEngine

    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` meets when it is absent
    with pytest.raises(UsageError, match=r"pip install 'harvester\[ray\]'"):
        RayEngine(address="127.0.0.1:6379")


def test_the_cli_s_process_does_not_load_ray() -> None:
    """The engines module and the base install never import Ray on their own."""
    code = "import sys, harvester.run.engine, harvester.cli; print('ray' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "False"


def test_a_wrong_address_is_a_usage_error_at_once() -> None:
    from harvester.run.engine.ray import RayEngine

    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    with pytest.raises(UsageError, match=rf"cannot reach the Ray head node at 127.0.0.1:{port}"):
        RayEngine(address=f"127.0.0.1:{port}").connect()


@pytest.mark.ray
def test_ray_engine_needs_an_address(monkeypatch: pytest.MonkeyPatch) -> None:
    import_ray()
    from harvester.run.engine.ray import RayEngine

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(UsageError, match="set RAY_ADDRESS or --ray-address"):
        RayEngine()


@pytest.mark.ray
def test_specs_run_on_both_nodes(cluster: RayCluster) -> None:
    from harvester.run.engine.ray import RayEngine

    got, on_result = collect()
    engine = RayEngine(address=cluster.address, max_in_flight=6)
    failures = engine.run(node_of, map(Spec, range(20)), on_result=on_result)
    assert failures == []
    assert sorted(spec.n for spec, _ in got) == list(range(20))
    assert all(spec.n == n for spec, (n, _) in got)
    assert {node for _, (_, node) in got} == {cluster.head_id, cluster.worker_id}


@pytest.mark.ray
def test_a_failing_spec_is_reported_not_retried(cluster: RayCluster) -> None:
    from harvester.run.engine.ray import RayEngine

    got, on_result = collect()
    failures = RayEngine(address=cluster.address).run(
        fails_on_odd, map(Spec, range(6)), on_result=on_result
    )
    assert sorted(r for _, r in got) == [0, 2, 4]
    assert sorted((f.spec.n, f.exit_code) for f in failures) == [
        (1, ExitCode.AUTH),
        (3, ExitCode.BUG),
        (5, ExitCode.BUG),
    ]
    assert Failure(Spec(3), "ValueError: bad spec 3", ExitCode.BUG) in failures


class _Clock(BaseHTTPRequestHandler):
    """Answers every GET with 200 and notes when it arrived, on the server's clock."""

    arrivals: list[float]
    lock: threading.Lock
    protocol_version = "HTTP/1.1"  # keep-alive: no new connection (and thread) per request

    def do_GET(self) -> None:
        with self.lock:
            self.arrivals.append(time.monotonic())
        body = b"ok"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def clock_server() -> Iterator[tuple[str, list[float]]]:
    arrivals: list[float] = []
    handler = type("Handler", (_Clock,), {"arrivals": arrivals, "lock": threading.Lock()})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", arrivals
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@dataclass(frozen=True, slots=True)
class LoadSpec:
    url: str
    limiter: Any
    requests: int
    lanes: int


def limited_load(spec: LoadSpec) -> tuple[str, int, int]:
    """A shard that only starts requests: ``lanes`` tasks share its ``requests``, each start
    waits for the cluster limiter. Returns its node, how many it started and how many slots
    it dropped."""
    from harvester.run.engine.ray import cluster_permits

    permits = cluster_permits(spec.limiter)

    async def main() -> None:
        left = [spec.requests]
        async with httpx.AsyncClient(timeout=30) as client:

            async def lane() -> None:
                while left[0] > 0:
                    left[0] -= 1
                    await permits.acquire()
                    response = await client.get(spec.url)
                    response.raise_for_status()
                    permits.on_success()

            await asyncio.gather(*(lane() for _ in range(spec.lanes)))

    asyncio.run(main())
    node = import_ray().get_runtime_context().get_node_id()
    return node, permits.started, permits.dropped


@pytest.mark.ray
def test_the_limiter_holds_the_rate_across_two_nodes(
    cluster: RayCluster, clock_server: tuple[str, list[float]]
) -> None:
    from harvester.run.engine.ray import RayEngine

    url, arrivals = clock_server
    rps = 20
    engine = RayEngine(address=cluster.address)
    limiter = engine.start_limiter(rps)
    specs = [LoadSpec(url, limiter, requests=20, lanes=4) for _ in range(4)]
    got, on_result = collect()
    assert engine.run(limited_load, specs, on_result=on_result) == []
    assert {node for _, (node, _, _) in got} == {cluster.head_id, cluster.worker_id}
    assert sum(started for _, (_, started, _) in got) == len(arrivals) == 80
    assert most_starts_in_window(arrivals) <= rps


@pytest.mark.ray
def test_a_killed_node_s_specs_run_again_elsewhere_once(
    cluster: RayCluster, tmp_path: Path
) -> None:
    from harvester.run.engine.ray import RayEngine

    gate = tmp_path / "gate"
    gate.mkdir()

    def kill_when_busy() -> None:
        deadline = time.monotonic() + 120
        while not any(p.suffix == f".{cluster.worker_id}" for p in gate.iterdir()):
            assert time.monotonic() < deadline, "no spec ever started on the second node"
            time.sleep(0.05)
        cluster.kill_worker()
        (gate / "go").touch()

    got, on_result = collect()
    engine = RayEngine(address=cluster.address, max_in_flight=8)
    with ThreadPoolExecutor(1) as pool:
        killer = pool.submit(kill_when_busy)
        failures = engine.run(
            node_of, (Spec(n, str(gate)) for n in range(20)), on_result=on_result, max_retries=3
        )
        killer.result()
    started_on_worker = {int(p.stem) for p in gate.iterdir() if p.suffix == f".{cluster.worker_id}"}
    assert failures == []
    assert sorted(spec.n for spec, _ in got) == list(range(20))  # each exactly once
    assert started_on_worker
    try:
        assert {node for _, (_, node) in got} == {cluster.head_id}
        assert os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
    finally:
        cluster.replace_worker()

"""Shared fixtures: a clean environment, a real sandbox on 127.0.0.1, CSV builders, CLI runner."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from harvester.cli import main
from harvester.sandbox import Sandbox, SandboxConfig, running_sandbox
from harvester.storage.objects import LocalStore, S3Store, Store
from tests import s3gateway
from tests.raycluster import RayCluster, ray_cluster

KEY = "sk-test-3b1f0d9c7e5a"
"""The sandbox key in tests: distinctive, so a leak into any output is easy to find."""

_ENV_PREFIXES = ("HARVESTER_", "FAL_", "AWS_")
_ENV_NAMES = frozenset(
    {"HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "SSL_CERT_FILE", "SSL_CERT_DIR"}
)
"""Proxies and trust stores change where requests go: the tests set them where they mean to."""


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The developer's own shell must not change a result."""
    for name in list(os.environ):
        if name.startswith(_ENV_PREFIXES) or name.upper() in _ENV_NAMES:
            monkeypatch.delenv(name)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def sandbox() -> Iterator[Sandbox]:
    with running_sandbox(SandboxConfig(key=KEY, image_bytes=4_000)) as sb:
        yield sb


@pytest.fixture(scope="session")
def s3_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[s3gateway.Gateway]:
    """Ceph's object gateway on 127.0.0.1 for the whole session (about 13 s to start). Never
    skipped: without the binaries the tests that need it fail and say how to install them."""
    missing = s3gateway.missing_binaries()
    if missing:
        pytest.fail(f"{', '.join(missing)} not found: {s3gateway.INSTALL_HINT}", pytrace=False)
    with s3gateway.running_gateway(tmp_path_factory.mktemp("ceph")) as gateway:
        yield gateway


@pytest.fixture(scope="session")
def cluster() -> Iterator[RayCluster]:
    """A two-node Ray cluster on 127.0.0.1 for the whole session (about 10-20 s to start),
    this process its driver. A test that kills the second node replaces it at its end."""
    with ray_cluster() as running:
        yield running


@pytest.fixture
def s3_bucket(s3_gateway: s3gateway.Gateway) -> str:
    """A fresh, empty bucket on the gateway for one test."""
    name = f"test-{uuid.uuid4().hex[:16]}"
    s3_gateway.create_bucket(name)
    return name


@dataclass(frozen=True, slots=True)
class Output:
    """A harvest's output location, and the environment a harvester needs to reach it."""

    store: Store
    env: dict[str, str]

    @property
    def location(self) -> str:
        return self.store.location


@pytest.fixture(params=["folder", pytest.param("s3", marks=pytest.mark.s3)])
def output(request: pytest.FixtureRequest, tmp_path: Path) -> Output:
    """A folder, and then a prefix in a fresh bucket on Ceph's gateway: a storage behaviour
    that matters for both is tested on both."""
    if request.param == "folder":
        local = LocalStore(tmp_path / "out")
        local.prepare()
        return Output(local, {})
    gw: s3gateway.Gateway = request.getfixturevalue("s3_gateway")
    bucket: str = request.getfixturevalue("s3_bucket")
    remote = S3Store(f"s3://{bucket}/nightly", env=gw.env(), scratch=tmp_path / "scratch")
    remote.prepare()
    return Output(remote, gw.env())


@pytest.fixture
def store(output: Output) -> Store:
    return output.store


def write_csv(
    path: Path, rows: Sequence[tuple[str, str]], header: str = "model,request_id"
) -> Path:
    lines = [header] + [f"{model},{request_id}" for model, request_id in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def run_cli(
    args: Sequence[str], *, key: str | None = KEY, env: dict[str, str] | None = None
) -> Result:
    runner = CliRunner()
    full_env = {"HARVESTER_API_KEY": key} if key else {}
    full_env.update(env or {})
    return runner.invoke(main, list(args), env=full_env, catch_exceptions=False)


def harvest_args(
    sandbox: Sandbox, out: Path | str, *inputs: Path, extra: Sequence[str] = ()
) -> list[str]:
    """``harvest`` of ``inputs`` from the sandbox into ``out`` (a folder, or ``s3://...``)."""
    return [
        "harvest",
        *(str(p) for p in inputs),
        "--out",
        str(out),
        "--base-url",
        sandbox.base_url,
        "--rps",
        "1000",
        "--retry-budget",
        "20",
        # One shard, in the test's own process (so log lines and patches reach it); tests of
        # several processes pass --workers N in ``extra`` (the last value counts).
        "--workers",
        "1",
        *extra,
    ]

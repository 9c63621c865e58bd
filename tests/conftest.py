"""Shared fixtures: a clean environment, a real sandbox on 127.0.0.1, CSV builders, CLI runner."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from harvester.cli import main
from harvester.sandbox import Sandbox, SandboxConfig, running_sandbox

KEY = "sk-test-3b1f0d9c7e5a"
"""The sandbox key in tests: distinctive, so a leak into any output is easy to find."""

_ENV_PREFIXES = ("HARVESTER_", "FAL_")
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
    sandbox: Sandbox, out: Path, *inputs: Path, extra: Sequence[str] = ()
) -> list[str]:
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
        *extra,
    ]

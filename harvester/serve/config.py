"""The settings of ``harvester serve``, built once from its options (``harvester.options``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from harvester.storage.objects import Location

CONNECT_TIMEOUT: Final = 10.0
SHUTDOWN_GRACE: Final = 20.0
"""Seconds SIGTERM waits for requests in flight to be answered."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ServeConfig:
    out: Location
    host: str = "127.0.0.1"
    port: int = 8790
    jwks_url: str
    user_ids: frozenset[str] = frozenset()
    keep_days: float = 7.0
    max_body_bytes: int = 32 * 1024 * 1024
    image_concurrency: int = 16
    max_image_bytes: int = 64 * 1024 * 1024
    allow_private_images: bool = False
    read_timeout: float = 60.0
    """Seconds to receive a delivery's body, and an image's next bytes."""
    flush_every: float = 30.0


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:8790`` for IPv6) as a host and a port; ``ValueError``."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--listen {text}: expected HOST:PORT, as in 127.0.0.1:8790")
    host = host.removeprefix("[").removesuffix("]")
    return host or "127.0.0.1", int(port)

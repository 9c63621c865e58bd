"""Keeping the API key out of everything the harvester prints or stores.

No code path formats the key into a message; this is the second line of defence, for text
that comes from elsewhere (an API's error detail, a library's exception) on its way out.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

MIN_SECRET_CHARS: Final = 8
"""Shorter values are not masked: a 1-character "key" would turn every 'x' into ``***``.
Real keys are far longer (fal keys are ``<uuid>:<hex>``)."""


def secret_parts(key: str) -> tuple[str, ...]:
    """What to mask for a key: the key itself and, for fal's ``id:secret`` form, the secret."""
    key = key.strip()
    parts = [key]
    if ":" in key:
        parts.append(key.split(":", 1)[1])
    return tuple(p for p in parts if len(p) >= MIN_SECRET_CHARS)


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every secret replaced by ``***``."""
    for secret in secrets:
        text = text.replace(secret, "***")
    return text

"""Keeping the API key out of everything the harvester prints or stores.

No code path formats the key into a message; this is the second line of defence, for text
that comes from elsewhere (an API's error detail, a library's exception) on its way out.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Final
from urllib.parse import unquote

MIN_SECRET_CHARS: Final = 8
"""Shorter values are not masked: a 1-character "key" would turn every 'x' into ``***``.
Real keys are far longer (fal keys are ``<uuid>:<hex>``)."""


def secret_parts(key: str) -> tuple[str, ...]:
    """What to mask for a key: the key itself and, for fal's ``id:secret`` form, the secret
    and the key id (it names the key: a relay that echoes it must not publish it either)."""
    key = key.strip()
    parts = [key]
    if ":" in key:
        key_id, secret = key.split(":", 1)
        parts += [secret, key_id]
    return tuple(p for p in parts if len(p) >= MIN_SECRET_CHARS)


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every secret replaced by ``***``."""
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


def contains_secret(text: str, secrets: Iterable[str]) -> bool:
    """Whether ``text`` holds a secret as it is or percent-decoded (a URL's query, say)."""
    decoded = unquote(text)
    return any(secret in text or secret in decoded for secret in secrets)


def clip(text: str, limit: int, secrets: Sequence[str], *, cut: bool = False) -> str:
    """``text`` redacted, then cut to ``limit`` characters (``...`` marks a cut): a cut
    before redaction would leave the head of a secret that no longer matches it. ``cut``
    says ``text`` is itself the head of something longer; its last characters, which may
    hold the head of a secret, are then dropped before redacting."""
    if cut and secrets:
        text = text[: -max(len(s) for s in secrets)]
    text = redact(text, secrets)
    if len(text) > limit or cut:
        return text[:limit] + "..."
    return text

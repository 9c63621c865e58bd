"""Keeping the API key, and raw control characters, out of everything the harvester prints.

No code path formats the key into a message; this is the second line of defence, for text
that comes from elsewhere (an API's error detail, a library's exception) on its way out.
``printable`` escapes the control characters input data may hold.
"""

from __future__ import annotations

import re
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


_CONTROL: Final = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # tab and line feed pass
_CONTROL_OR_NEWLINE: Final = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f]")  # tab passes


def printable(text: str, *, newlines: bool = False) -> str:
    """``text`` safe for a terminal: control characters (C0 but tab and, with ``newlines``,
    line feed; DEL; C1) become ``\\x07``-style escapes, so input data cannot ring the bell,
    move the cursor, recolour the screen or forge a log line. Every message that may carry
    input data (file names, ids, an API's error text) goes through this on its way out."""
    pattern = _CONTROL if newlines else _CONTROL_OR_NEWLINE
    return pattern.sub(lambda m: f"\\x{ord(m.group()):02x}", text)

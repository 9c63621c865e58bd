"""Keeping the API key, and raw control characters, out of everything the harvester prints.

No code path formats the key into a message; this is the second line of defence, for text
that comes from elsewhere (an API's error detail, a library's exception) on its way out.
``printable`` escapes the control characters input data may hold.
"""

from __future__ import annotations

import re
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


_CONTROL: Final = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # tab and line feed pass
_CONTROL_OR_NEWLINE: Final = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f]")  # tab passes


def printable(text: str, *, newlines: bool = False) -> str:
    """``text`` safe for a terminal: control characters (C0 but tab and, with ``newlines``,
    line feed; DEL; C1) become ``\\x07``-style escapes, so input data cannot ring the bell,
    move the cursor, recolour the screen or forge a log line. Every message that may carry
    input data (file names, ids, an API's error text) goes through this on its way out."""
    pattern = _CONTROL if newlines else _CONTROL_OR_NEWLINE
    return pattern.sub(lambda m: f"\\x{ord(m.group()):02x}", text)

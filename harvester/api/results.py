"""Parse a result body (the seed document's schema) into typed values, checking its shape.

Unknown keys are ignored (relays echo extras); ``timings`` is kept as JSON text, losslessly.
A body that cannot be trusted raises ``ResultShapeError`` with a message a user can act on.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import unquote

from harvester.redact import contains_secret, redact

INT64_MIN: Final = -(2**63)
INT64_MAX: Final = 2**63 - 1


MAX_IMAGES_PER_RESULT: Final = 1_000
"""Images fetched per result at most; the rest are failed rows with the reason, so that no
one result holds its lane for the rest of the night."""
MAX_TEXT_CHARS: Final = 65_536
"""A stored text (prompt, timings, content_type, an error's detail) is cut to this many
characters; the row says so. A relay's megabytes of prompt cost a row no more memory."""
TOO_DEEP: Final = "nested too deeply to read (a relay's answer is not a result)"


class ResultShapeError(ValueError):
    """The result is JSON, but not of the documented shape."""


@dataclass(frozen=True, slots=True)
class ImageRef:
    index: int
    url: str
    content_type: str | None
    width: int | None
    height: int | None
    has_nsfw_concept: bool | None
    refused: str | None = None
    """Why this image is not to be fetched (its row is ``failed`` with this reason)."""


@dataclass(frozen=True, slots=True)
class Result:
    seed: int | None
    """The seed when it fits in 64 bits (the manifest's ``seed`` is int64), else None."""
    seed_text: str
    """The seed's exact decimal digits, whatever its size."""
    prompt: str | None
    timings: str | None
    inference_seconds: float | None
    images: tuple[ImageRef, ...]
    note: str | None = None
    """A non-fatal oddity worth recording (e.g. fewer NSFW flags than images)."""
    altered: bool = False
    """A stored text is not what the relay sent (the key masked, ...); ``note`` says which."""


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _optional_int(item: dict[str, Any], key: str) -> int | None:
    value = item.get(key)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**31:
        return value
    return None


KEY_IN_URL: Final = (
    "the image URL contains the API key (or a part of it): not fetched, so the key is not "
    "sent to the image host; the URL is stored with the key masked. Ask the relay's operator "
    "why it puts the key in its URLs"
)


def parse_result(
    body: bytes,
    *,
    secrets: tuple[str, ...] = (),
    max_images: int = MAX_IMAGES_PER_RESULT,
    max_text: int = MAX_TEXT_CHARS,
) -> Result:
    """Parse and check a 200 body; raises ``ResultShapeError`` (or ``ValueError`` for bad JSON).

    ``secrets`` (``redact.secret_parts`` of the key) are masked in every stored text, and an
    image whose URL holds one is refused: a relay that echoes the key must not publish it.
    Images past ``max_images`` are refused, texts cut to ``max_text`` characters (``timings``,
    which a cut would make invalid JSON, is then not stored); ``note`` says so.
    """
    try:
        return _parse_result(body, secrets, max_images, max_text)
    except RecursionError as exc:
        # Thousands of nested brackets: json's decoder (or encoder) runs out of stack. The
        # same answer comes every night, so it is the row's error, not a retry.
        raise ResultShapeError(f"result is JSON {TOO_DEEP}") from exc


def _parse_result(body: bytes, secrets: tuple[str, ...], max_images: int, max_text: int) -> Result:
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"result is not valid JSON ({exc})") from exc
    except ValueError:
        # An integer of more than 4,300 digits (Python's limit on parsing them): kept as
        # its digits, read again without the limit only for this rare body.
        data = json.loads(body, parse_int=_integer)
    if not isinstance(data, dict):
        raise ResultShapeError(f"result is a JSON {_kind(data)}, expected an object")

    images = data.get("images")
    if not isinstance(images, list):
        raise ResultShapeError(f"'images' is {_kind(images)}, expected a list")
    seed = data.get("seed")
    if isinstance(seed, _Digits):
        seed_text, seed = str(seed), None
    elif isinstance(seed, int) and not isinstance(seed, bool):
        seed_text = str(seed)
        seed = seed if INT64_MIN <= seed <= INT64_MAX else None
    else:
        raise ResultShapeError(f"'seed' is {_kind(seed)}, expected an integer")
    prompt = data.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise ResultShapeError(f"'prompt' is {_kind(prompt)}, expected a string")
    flags = data.get("has_nsfw_concepts", [])
    if flags is None:
        flags = []
    if not isinstance(flags, list):
        raise ResultShapeError(f"'has_nsfw_concepts' is {_kind(flags)}, expected a list")
    timings = data.get("timings")
    if timings is not None and not isinstance(timings, dict):
        raise ResultShapeError(f"'timings' is {_kind(timings)}, expected an object")
    inference = timings.get("inference") if timings else None
    inference_seconds = (
        float(inference)
        if isinstance(inference, int | float)
        and not isinstance(inference, bool)
        and math.isfinite(inference)
        else None
    )

    notes: list[str] = []
    masked: list[str] = []
    altered = False

    cut: dict[str, int] = {}

    def mask(name: str, text: str) -> str:
        """``text`` with the key masked, then cut to ``max_text`` characters (in that order:
        a cut first could leave the head of the key that no longer matches it)."""
        clean = redact(text, secrets) if secrets else text
        if clean != text and name not in masked:
            masked.append(name)
        if len(clean) > max_text:
            cut[name] = max(cut.get(name, 0), len(clean))
            clean = clean[:max_text]
        return clean

    refs: list[ImageRef] = []
    for index, item in enumerate(images):
        if not isinstance(item, dict):
            raise ResultShapeError(f"images[{index}] is {_kind(item)}, expected an object")
        url = item.get("url")
        if not isinstance(url, str) or not url:
            raise ResultShapeError(f"images[{index}].url is {_kind(url)}, expected a string")
        content_type = item.get("content_type")
        flag = flags[index] if index < len(flags) else None
        refused = None
        if index >= max_images:
            refused = (
                f"the result has {len(images):,} images; only the first {max_images:,} are "
                "fetched (the cap per result)"
            )
        elif len(url) > max_text and url[:5].lower() != "data:":
            refused = f"the image URL is longer than {max_text:,} characters: not fetched"
            url = url[:max_text]
        # A data: URI goes to no host and only its media type is stored: not scanned (MBs).
        if secrets and url[:5].lower() != "data:" and contains_secret(url, secrets):
            refused = KEY_IN_URL
            url = redact(url, secrets)
            if contains_secret(url, secrets):  # percent-encoded
                url = redact(unquote(url), secrets)
        refs.append(
            ImageRef(
                index=index,
                url=url,
                refused=refused,
                content_type=mask("content_type", content_type)
                if isinstance(content_type, str)
                else None,
                width=_optional_int(item, "width"),
                height=_optional_int(item, "height"),
                has_nsfw_concept=flag if isinstance(flag, bool) else None,
            )
        )
    if len(flags) != len(refs):
        notes.append(f"has_nsfw_concepts has {len(flags)} entries for {len(refs)} images")
    timings_text = None
    if timings is not None:
        try:
            timings_text = json.dumps(timings, ensure_ascii=False, allow_nan=False)
        except ValueError:  # 1e400, NaN or Infinity: not JSON, and json_decode rejects it
            timings_text = json.dumps(_finite(timings), ensure_ascii=False)
            notes.append("non-finite numbers in timings stored as null")
            altered = True
    prompt = None if prompt is None else mask("prompt", prompt)
    if timings_text is not None and len(timings_text) > max_text:
        notes.append(f"timings of {len(timings_text):,} characters not stored (cap {max_text:,})")
        timings_text, altered = None, True
    elif timings_text is not None:
        timings_text = mask("timings", timings_text)
    if masked:
        notes.append(f"the API key was masked in {', '.join(masked)}")
    for name, length in cut.items():
        notes.append(f"{name} truncated to {max_text:,} of {length:,} characters")
    altered = altered or bool(masked) or bool(cut)
    return Result(
        seed=seed,
        seed_text=seed_text,
        prompt=prompt,
        timings=timings_text,
        inference_seconds=inference_seconds,
        images=tuple(refs),
        note="; ".join(notes) or None,
        altered=altered,
    )


class _Digits(str):
    """A JSON integer too long for Python to parse, as its digits."""

    __slots__ = ()


def _integer(text: str) -> int | str:
    return _Digits(text) if len(text) > 4000 else int(text)


def _finite(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def error_detail(body: bytes) -> str | None:
    """The ``detail`` of an error body as text (a string, or validation errors joined), if any."""
    try:
        return _error_detail(body)
    except RecursionError:
        return f"the answer is JSON {TOO_DEEP}"


def _error_detail(body: bytes) -> str | None:
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(data, dict):
        return None
    detail = data.get("detail")
    if isinstance(detail, str):
        return detail
    if isinstance(detail, list):
        parts = []
        for item in detail:
            if isinstance(item, dict):
                loc = ".".join(str(x) for x in item.get("loc", []) if x is not None)
                msg = item.get("msg", "")
                parts.append(f"{loc}: {msg}" if loc else str(msg))
            else:
                parts.append(str(item))
        return "; ".join(parts)
    if detail is not None:
        return json.dumps(detail, ensure_ascii=False)
    status = data.get("status")
    return status if isinstance(status, str) else None

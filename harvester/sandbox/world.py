"""The sandbox's synthetic world: pure functions from (seed, request id) to responses.

Everything here is deterministic and stateless: a result is computed from the world seed and
the request id, and an image from the token in its URL, so the server keeps no store and other
tools (benchmarks, tests) can compute what the server will answer without asking it.

Request ids with a special prefix (``pending-``, ``missing-``, ``dup-``, ...) get a fixed
behaviour, see ``PREFIXES``. Other ids are normal results, unless a per-id fault
(``FaultRates.pending_then_done`` and friends) is drawn for them from a stable hash.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import math
import random
import re
from enum import StrEnum
from typing import Any, Final, NamedTuple

from harvester.sandbox.config import PER_ID_FAULTS, SandboxConfig
from harvester.sandbox.images import (
    CONTENT_TYPES,
    EXTENSIONS,
    MAKERS,
    EncoderMissing,
    make_png,
    served_format,
)


class Reply(NamedTuple):
    """One HTTP response, before it is put on the wire."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


class Behaviour(StrEnum):
    """What a request id does; a prefix, a per-id fault, or plain ``OK``."""

    OK = "ok"
    PENDING = "pending-"
    PENDING_422 = "pending422-"
    MISSING = "missing-"
    FAIL = "fail-"
    INVALID = "invalid-"
    EMPTY = "empty-"
    INLINE = "inline-"
    EXPIRED_IMAGE = "expiredimg-"
    NOT_IMAGE = "notimage-"
    REDIRECT = "redirect-"
    BAD_REDIRECT = "badredirect-"
    BAD_JSON = "badjson-"
    BAD_SHAPE = "badshape-"
    SHORT_NSFW = "shortnsfw-"
    NULL_SEED = "nullseed-"
    BIG = "big-"
    ECHO = "echo-"
    DUP = "dup-"
    MISLABEL = "mislabel-"
    # Per-id faults (FaultRates), and ids outside SandboxConfig.known_request_ids.
    FAULT_NOT_FOUND = "fault:permanent_not_found"
    FAULT_FAILURE = "fault:permanent_failure"
    FAULT_EXPIRED_IMAGE = "fault:expired_image"
    FAULT_PENDING_THEN_DONE = "fault:pending_then_done"
    UNKNOWN = "unknown"


PREFIXES: Final = {b.value: b for b in Behaviour if b.value.endswith("-")}
_PER_ID_BEHAVIOURS: Final = {name: Behaviour(f"fault:{name}") for name in PER_ID_FAULTS}

EXPECTED: Final = {
    Behaviour.OK: "ok",
    Behaviour.PENDING: "pending",
    Behaviour.PENDING_422: "pending",
    Behaviour.MISSING: "not_found",
    Behaviour.FAIL: "failed",
    Behaviour.INVALID: "failed",
    Behaviour.EMPTY: "ok",
    Behaviour.INLINE: "ok",
    Behaviour.EXPIRED_IMAGE: "failed",
    Behaviour.NOT_IMAGE: "failed",
    Behaviour.REDIRECT: "ok",
    Behaviour.BAD_REDIRECT: "failed",
    Behaviour.BAD_JSON: "error",
    Behaviour.BAD_SHAPE: "error",
    Behaviour.SHORT_NSFW: "ok",
    Behaviour.NULL_SEED: "error",
    Behaviour.BIG: "ok",
    Behaviour.ECHO: "ok",
    Behaviour.DUP: "ok",
    Behaviour.MISLABEL: "ok",
    Behaviour.FAULT_NOT_FOUND: "not_found",
    Behaviour.FAULT_FAILURE: "failed",
    Behaviour.FAULT_EXPIRED_IMAGE: "failed",
    Behaviour.FAULT_PENDING_THEN_DONE: "ok",
    Behaviour.UNKNOWN: "not_found",
}
"""The final status a correct harvester records for each behaviour (see ``expected_status``)."""

PENDING_FETCHES: Final = 2
"""How many result fetches of a ``pending_then_done`` id answer "still in progress"."""
BIG_IMAGE_BYTES: Final = 3_000_000
MAX_IMAGE_BYTES: Final = 10_000_000
"""Tokens asking for more are refused, so a URL cannot make the server build huge files."""

JSON: Final = "application/json"

PENDING_BODY: Final = b'{"detail": "Request is still in progress"}'
NOT_FOUND_BODY: Final = b'{"status": "NOT_FOUND"}'
MODEL_ERROR_BODY: Final = (
    b'{"detail": "Internal error while running the model", "error_type": "internal_error"}'
)
VALIDATION_ERROR_BODY: Final = json.dumps(
    {
        "detail": [
            {
                "loc": ["body", "image_size"],
                "msg": "value is not a valid enumeration member; permitted: 'square_hd', "
                "'square', 'portrait_4_3', 'portrait_16_9', 'landscape_4_3', 'landscape_16_9'",
                "type": "type_error.enum",
            }
        ]
    }
).encode()
TRUNCATED_JSON_BODY: Final = b'{"images": ['
CUT_RESULT_BODY: Final = b'{"images": [], "seed": 1, "prompt": "half of me is on the wire"}'
"""The ``malformed_json`` fault announces this body's length and sends half of it."""

PROMPTS: Final = (
    "a red fox in fresh snow, morning light",
    "three variations of a portrait",
    "a watercolor map of an island",
    "极度特写一只老虎的眼睛，正面视角。清晰聚焦于虹膜和瞳孔，展现丰富质感与色彩并有自然高光。"
    "眼睛上用白色粗笔刷书写“FLUX”。",
    "an isometric cutaway of a tiny bakery, soft pastel colours",
    'a neon sign that says "open late", rain on the window',
    "macro photo of a dew drop on a leaf",
    "portrait of an astronaut, oil painting, dramatic lighting",
)
SIZES: Final = ((1024, 768), (1024, 1024), (768, 1024), (1344, 768), (512, 512))
"""The width and height a result declares, and its images have, at the default image size."""
FULL_SIZE_BYTES: Final = 30_000
"""At ``--image-bytes`` below this, pictures shrink (by the square root of the ratio): a test's
1,000-byte images are about 190 pixels wide, so thousands of them are drawn in moments."""
INLINE_SIZE: Final = (64, 48)
MAX_SIDE: Final = 4096


def scaled(width: int, height: int, image_bytes: int) -> tuple[int, int]:
    """``SIZES``' width and height for images of about ``image_bytes``."""
    factor = min(1.0, math.sqrt(image_bytes / FULL_SIZE_BYTES))
    return max(16, round(width * factor)), max(16, round(height * factor))


_FORMAT_LETTERS: Final = {"p": "png", "j": "jpeg", "w": "webp"}
_LETTER_OF: Final = {fmt: letter for letter, fmt in _FORMAT_LETTERS.items()}
_TOKEN: Final = re.compile(
    r"([0-9a-f]{8})-([0-9a-f]{16})-([pjw])([pjw])-([0-9]{1,4})x([0-9]{1,4})-([0-9]{1,8})"
    r"(?:-([xhrb]))?"
)
"""``uid-cid-RL-WxH-size[-mode]``: uid makes the URL unique, cid (content id), the real format
R, the width W and height H and size fix the bytes, L is the labelled format (URL extension and
Content-Type), and mode is x (expired: 404), h (HTML instead of an image), r (redirect),
b (redirect to ftp:)."""


def _digest(*parts: object) -> bytes:
    return hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()


def unit(*parts: object) -> float:
    """A stable number in [0, 1) for ``parts``."""
    return int.from_bytes(_digest(*parts)[:8], "big") / 2**64


def behaviour(request_id: str, config: SandboxConfig) -> Behaviour:
    """What the sandbox does for ``request_id``: prefixes first, then per-id faults."""
    if config.known_request_ids is not None and request_id not in config.known_request_ids:
        return Behaviour.UNKNOWN
    head, dash, _ = request_id.partition("-")
    special = PREFIXES.get(head + dash)
    if special is not None:
        return special
    draw = unit(config.seed, "per-id-fault", request_id)
    for name, kind in _PER_ID_BEHAVIOURS.items():
        draw -= getattr(config.faults, name)
        if draw < 0:
            return kind
    return Behaviour.OK


def expected_status(request_id: str, config: SandboxConfig, *, repolls: bool = True) -> str:
    """The final status a correct harvester records for ``request_id``.

    One of ``"ok"``, ``"not_found"``, ``"failed"``, ``"error"``, ``"pending"`` (the
    manifest's vocabulary). Transient faults do not change it (a client that retries gets
    through). A ``pending_then_done`` id is ``"ok"`` for a client that re-polls (its third
    result fetch answers the result; ``harvester harvest --pending-wait``), and
    ``"pending"`` with ``repolls=False`` (a first run without ``--pending-wait``).
    ``"failed"`` is a final answer of the API or the CDN: model errors, validation errors,
    expired or non-image media, a redirect to ``ftp:``.
    ``"error"`` is a body no client can use: ``badjson-`` (never valid JSON), ``badshape-``
    (images not a list, seed a string) and ``nullseed-`` (a null seed).
    """
    kind = behaviour(request_id, config)
    if kind is Behaviour.FAULT_PENDING_THEN_DONE and not repolls:
        return "pending"
    return EXPECTED[kind]


def json_reply(status: int, body: bytes, request_id: str | None = None) -> Reply:
    headers: tuple[tuple[str, str], ...] = (("Content-Type", JSON),)
    if request_id is not None:
        headers += (("X-Fal-Request-Id", request_id),)
    return Reply(status, headers, body)


def result_for(
    app: str, request_id: str, base_url: str, config: SandboxConfig, *, fetch: int = 1
) -> Reply:
    """The result endpoint's answer for ``request_id``.

    ``fetch`` counts the result fetches of this id so far, this one included (1 for the
    first); only ``pending_then_done`` ids depend on it. ``app`` only shows in ``echo-``
    bodies: a result depends on the id alone, whatever spelling of the model reached it.
    """
    kind = behaviour(request_id, config)
    if kind in (Behaviour.UNKNOWN, Behaviour.MISSING, Behaviour.FAULT_NOT_FOUND):
        return json_reply(404, NOT_FOUND_BODY, request_id)
    if kind is Behaviour.PENDING or (
        kind is Behaviour.FAULT_PENDING_THEN_DONE and fetch <= PENDING_FETCHES
    ):
        return json_reply(400, PENDING_BODY, request_id)
    if kind is Behaviour.PENDING_422:
        return json_reply(422, PENDING_BODY, request_id)
    if kind in (Behaviour.FAIL, Behaviour.FAULT_FAILURE):
        reply = json_reply(500, MODEL_ERROR_BODY, request_id)
        return reply._replace(headers=(*reply.headers, ("X-Fal-Error-Type", "internal_error")))
    if kind is Behaviour.INVALID:
        return json_reply(422, VALIDATION_ERROR_BODY, request_id)
    if kind is Behaviour.BAD_JSON:
        return json_reply(200, TRUNCATED_JSON_BODY, request_id)
    body = _result_body(kind, app, request_id, base_url, config)
    return json_reply(200, json.dumps(body, ensure_ascii=False).encode(), request_id)


def status_for(
    request_id: str, base_url: str, path: str, config: SandboxConfig, *, fetches: int = 0
) -> Reply:
    """The status endpoint: 202 IN_QUEUE / IN_PROGRESS, 200 COMPLETED, or 404.

    ``path`` is the request's URL path without ``/status``; ``fetches`` counts the result
    fetches of this id so far.
    """
    kind = behaviour(request_id, config)
    if kind in (Behaviour.UNKNOWN, Behaviour.MISSING, Behaviour.FAULT_NOT_FOUND):
        return json_reply(404, NOT_FOUND_BODY, request_id)
    urls = {"response_url": base_url + path, "status_url": base_url + path + "/status"}
    body: dict[str, Any]
    if kind in (Behaviour.PENDING, Behaviour.PENDING_422):
        body = {"status": "IN_PROGRESS", "request_id": request_id, **urls, "logs": None}
        return json_reply(202, json.dumps(body).encode(), request_id)
    if kind is Behaviour.FAULT_PENDING_THEN_DONE and fetches < PENDING_FETCHES:
        body = {"status": "IN_QUEUE", "queue_position": PENDING_FETCHES - fetches - 1}
        body |= {"request_id": request_id, **urls}
        return json_reply(202, json.dumps(body).encode(), request_id)
    rng = random.Random(_digest(config.seed, "result", request_id))
    metrics = {"inference_time": rng.uniform(0.3, 6.0)}
    body = {"status": "COMPLETED", "request_id": request_id, **urls, "logs": None}
    body["metrics"] = metrics
    return json_reply(200, json.dumps(body).encode(), request_id)


def _token(
    uid: bytes,
    cid: bytes,
    real: str,
    label: str,
    dims: tuple[int, int],
    size: int,
    mode: str = "",
) -> str:
    letters = f"{_LETTER_OF[real]}{_LETTER_OF[label]}-{dims[0]}x{dims[1]}"
    token = f"{uid[:4].hex()}-{cid[:8].hex()}-{letters}-{size}"
    return f"{token}-{mode}" if mode else token


def media_url(base_url: str, token: str) -> str:
    """The absolute URL of a media token; its extension is the labelled format's."""
    label = _FORMAT_LETTERS[token.split("-")[2][1]]
    return f"{base_url}/media/{token}.{EXTENSIONS[label]}"


_MODES: Final = {
    Behaviour.EXPIRED_IMAGE: "x",
    Behaviour.FAULT_EXPIRED_IMAGE: "x",
    Behaviour.NOT_IMAGE: "h",
    Behaviour.REDIRECT: "r",
    Behaviour.BAD_REDIRECT: "b",
}


def _result_body(
    kind: Behaviour, app: str, request_id: str, base_url: str, config: SandboxConfig
) -> dict[str, Any]:
    rng = random.Random(_digest(config.seed, "result", request_id))
    inference = rng.uniform(0.3, 6.0)
    count = rng.randint(1, 4)
    seed = rng.randint(2**53 + 1, 2**63 - 1) if rng.random() < 0.2 else rng.randint(0, 2**32 - 1)
    prompt = rng.choice(PROMPTS)
    dims = scaled(*rng.choice(SIZES), config.image_bytes)
    if kind is Behaviour.SHORT_NSFW:
        count = 3
    elif kind is Behaviour.BIG:
        count = 1
    elif kind is Behaviour.EMPTY:
        count = 0

    images: list[dict[str, Any]] = []
    for index in range(count):
        real = rng.choices(("png", "jpeg", "webp"), weights=(6, 3, 1))[0]
        label = real if rng.random() >= 0.05 else rng.choice(("png", "jpeg", "webp"))
        size = round(config.image_bytes * rng.uniform(0.8, 1.2))
        cid = _digest(config.seed, "image", request_id, index)
        if kind is Behaviour.DUP:  # the same bytes behind every dup- id's URL
            real, label, size = "png", "png", config.image_bytes
            cid, dims = _digest(config.seed, "dup"), scaled(*SIZES[0], config.image_bytes)
        elif kind is Behaviour.MISLABEL:
            real, label = "jpeg", "png"
        elif kind is Behaviour.BIG:
            real, label, size = "png", "png", BIG_IMAGE_BYTES
        real, label = served_format(real), served_format(label)
        uid = _digest(config.seed, "uid", request_id, index)
        token = _token(uid, cid, real, label, dims, size, _MODES.get(kind, ""))
        width, height = dims
        image: dict[str, Any] = {
            "url": media_url(base_url, token),
            "content_type": CONTENT_TYPES[label],
        }
        if kind is Behaviour.INLINE:
            width, height = INLINE_SIZE
            data = make_png(cid, 1_500, width=width, height=height)
            image["url"] = "data:image/png;base64," + base64.b64encode(data).decode()
            image["content_type"] = "image/png"
        if kind is Behaviour.ECHO:
            image["file_name"] = image["url"].rsplit("/", 1)[1]
            image["file_size"] = len(image_for(token)[0])
        else:
            image |= {"width": width, "height": height}
        images.append(image)
        if kind is Behaviour.INLINE:
            break

    nsfw = [rng.random() < 0.1 for _ in images]
    body: dict[str, Any] = {
        "images": images,
        "seed": seed,
        "has_nsfw_concepts": nsfw,
        "prompt": prompt,
        "timings": {"inference": inference},
    }
    if kind is Behaviour.SHORT_NSFW:
        body["has_nsfw_concepts"] = nsfw[:1]
    elif kind is Behaviour.NULL_SEED:
        body["seed"] = None
    elif kind is Behaviour.BAD_SHAPE:
        body["images"] = images[0]["url"] if images else ""
        body["seed"] = str(seed)
    elif kind is Behaviour.ECHO:
        body["timings"] = {}
        body["request"] = {"model": app, "num_images": count, "prompt": prompt}
    return body


class Token(NamedTuple):
    """A parsed media token."""

    uid: str
    cid: str
    real: str
    label: str
    size: int
    mode: str
    width: int
    height: int

    @classmethod
    def parse(cls, token: str) -> Token:
        match = _TOKEN.fullmatch(token)
        if match is None:
            raise ValueError(f"not a media token: {token!r}")
        uid, cid, real, label, wide, high, size, mode = match.groups()
        if not 100 <= int(size) <= MAX_IMAGE_BYTES:
            raise ValueError(f"media token {token!r} asks for {size} bytes")
        width, height = int(wide), int(high)
        if not (1 <= width <= MAX_SIDE and 1 <= height <= MAX_SIDE):
            raise ValueError(f"media token {token!r} asks for {width}x{height} pixels")
        real, label = _FORMAT_LETTERS[real], _FORMAT_LETTERS[label]
        return cls(uid, cid, real, label, int(size), mode or "", width, height)


def image_for(token: str) -> tuple[bytes, str]:
    """The bytes and the (labelled) Content-Type of the image behind ``token``.

    The bytes depend on the content id, real format and size only, so two URLs may share
    them (``dup-`` ids). Raises ``ValueError`` for a token this world never hands out (a JPEG
    or WebP one without Pillow among them: ``EncoderMissing``).
    """
    parsed = Token.parse(token)
    data = _render(parsed.real, parsed.cid, parsed.size, parsed.width, parsed.height)
    return data, CONTENT_TYPES[parsed.label]


def _render(fmt: str, cid: str, size: int, width: int, height: int) -> bytes:
    if size > 1_000_000:  # big images are rare: don't let them crowd the cache
        return MAKERS[fmt](bytes.fromhex(cid), size, width=width, height=height)
    return _render_cached(fmt, cid, size, width, height)


@functools.lru_cache(maxsize=256)
def _render_cached(fmt: str, cid: str, size: int, width: int, height: int) -> bytes:
    return MAKERS[fmt](bytes.fromhex(cid), size, width=width, height=height)


NOT_IMAGE_BODY: Final = (
    b"<!DOCTYPE html><html><head><title>Access denied</title></head>"
    b"<body><h1>Access denied</h1><p>This file is no longer available.</p></body></html>"
)
BAD_REDIRECT_TARGET: Final = "ftp://127.0.0.1/x.png"


def media_for(token: str, ext: str, base_url: str) -> Reply:
    """The CDN's answer for ``/media/{token}.{ext}``."""
    try:
        parsed = Token.parse(token)
    except ValueError:
        return json_reply(404, b'{"detail": "Not Found"}')
    if ext != EXTENSIONS[parsed.label]:
        return json_reply(404, b'{"detail": "Not Found"}')
    if parsed.mode == "x":
        return json_reply(404, b'{"detail": "File not found or expired"}')
    if parsed.mode == "h":
        return Reply(200, (("Content-Type", "image/png"),), NOT_IMAGE_BODY)
    if parsed.mode == "b":
        return Reply(302, (("Location", BAD_REDIRECT_TARGET),), b"")
    if parsed.mode == "r":
        uid = _digest("redirected", parsed.uid)
        dims = (parsed.width, parsed.height)
        cid = bytes.fromhex(parsed.cid)
        target = _token(uid, cid, parsed.real, parsed.label, dims, parsed.size)
        url = media_url(base_url, target)
        if int(parsed.uid, 16) % 2:  # half the redirects are relative, half absolute
            url = url.removeprefix(base_url)
        return Reply(302, (("Location", url),), b"")
    try:
        data, content_type = image_for(token)
    except EncoderMissing:  # another sandbox's token: never a file that does not decode
        return json_reply(404, b'{"detail": "Not Found"}')
    headers = (("Content-Type", content_type), ("Cache-Control", "public, max-age=604800"))
    return Reply(200, headers, data)

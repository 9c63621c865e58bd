"""Just enough HTTP/1.1 for the sandbox: parse a request head, serialize a response head."""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from typing import Final
from urllib.parse import quote, unquote

MAX_HEAD_BYTES: Final = 16_384
"""Request line plus headers; a larger head is answered 431 and the connection closed."""
MAX_HEADERS: Final = 100
MAX_BODY_BYTES: Final = 1_048_576
"""A GET with a body this large or larger is answered 413 (the body is read and ignored)."""

_TOKEN_CHARS: Final = frozenset(
    "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)


class BadRequest(Exception):
    """The request cannot be served; answer ``status`` and close the connection."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    """The target's path, still percent-encoded; see ``segments``."""
    http_10: bool
    headers: dict[str, str]
    """Lower-case names; repeated headers are joined with ", "."""
    query: str = ""
    """The target's query, still percent-encoded, without the ``?``."""

    @property
    def segments(self) -> list[str]:
        """The path's segments, percent-decoded, without the leading empty one."""
        return [unquote(part) for part in self.path.split("/")[1:]]

    @property
    def keep_alive(self) -> bool:
        tokens = {t.strip().lower() for t in self.headers.get("connection", "").split(",")}
        if self.http_10:
            return "keep-alive" in tokens
        return "close" not in tokens

    @property
    def content_length(self) -> int:
        """The announced body length (0 if none); raises ``BadRequest`` if unusable."""
        if "transfer-encoding" in self.headers:
            raise BadRequest(400, "request bodies with Transfer-Encoding are not supported")
        raw = self.headers.get("content-length")
        if raw is None:
            return 0
        values = {v.strip() for v in raw.split(",")}
        if len(values) != 1 or not (value := values.pop()).isdigit():
            raise BadRequest(400, f"bad Content-Length {raw!r}")
        return int(value)


def parse_head(head: bytes) -> Request:
    """Parse a request line and headers (without the final blank line)."""
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError:
        raise BadRequest(400, "request head is not ASCII") from None
    request_line, *lines = text.split("\r\n")
    parts = request_line.split(" ")
    if len(parts) != 3 or not parts[0] or not set(parts[0]) <= _TOKEN_CHARS:
        raise BadRequest(400, f"malformed request line {request_line[:100]!r}")
    method, target, version = parts
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        if version.startswith("HTTP/"):
            raise BadRequest(505, f"{version} is not supported")
        raise BadRequest(400, f"malformed request line {request_line[:100]!r}")
    if not target.startswith("/"):
        raise BadRequest(400, f"request target {target[:100]!r} is not a path")
    if len(lines) > MAX_HEADERS:
        raise BadRequest(431, f"more than {MAX_HEADERS} headers")
    headers: dict[str, str] = {}
    for line in lines:
        name, colon, value = line.partition(":")
        if not colon or not name or not set(name) <= _TOKEN_CHARS:
            raise BadRequest(400, f"malformed header line {line[:100]!r}")
        key = name.lower()
        value = value.strip(" \t")
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    path, _, query = target.partition("?")
    return Request(method, path, version == "HTTP/1.0", headers, query)


@functools.lru_cache(maxsize=1)
def _formatted_date(now: int) -> str:
    return formatdate(now, usegmt=True)


def http_date() -> str:
    """The current time as an HTTP date, formatted once a second."""
    return _formatted_date(int(time.time()))


_HEADER_SAFE: Final = "".join(chr(c) for c in range(0x20, 0x7F))


def _header_value(value: str) -> str:
    """``value`` as a header may carry it: printable ASCII as it is, anything else (a request
    id with a check mark, CR LF, NUL) percent-encoded, never a crash nor a second header."""
    if value.isascii() and value.isprintable():
        return value
    return quote(value, safe=_HEADER_SAFE)


def response_head(
    status: int,
    headers: tuple[tuple[str, str], ...],
    content_length: int,
    *,
    keep_alive: bool,
    http_10: bool = False,
) -> bytes:
    """Status line and headers, ending with the blank line; always with Content-Length."""
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", f"Date: {http_date()}"]
    lines.append("Server: harvester-sandbox")
    lines.extend(f"{name}: {_header_value(value)}" for name, value in headers)
    lines.append(f"Content-Length: {content_length}")
    if not keep_alive:
        lines.append("Connection: close")
    elif http_10:
        lines.append("Connection: keep-alive")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

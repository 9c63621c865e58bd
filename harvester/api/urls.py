"""Result URLs (which part of a model id goes into ``{base}/{owner}/{app}/requests/{id}``.

fal's official clients (Python ``AppId.from_endpoint_id``, JS ``parseEndpointId``) submit to the
full model path but read status and results at the first two segments only, after an optional
``workflows/`` or ``comfy/`` namespace. ``fal-ai/flux/dev`` and ``fal-ai/flux`` therefore share
the result URL ``fal-ai/flux/requests/{id}``) and the rules for following a redirect.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Final

from yarl import URL

NAMESPACES: Final = frozenset({"workflows", "comfy"})
FOLLOWED_SCHEMES: Final = frozenset({"http", "https"})

# A safe path segment: RFC 3986 pchars that need no escaping (so the id travels exactly as given),
# which excludes '/', '\\', '?', '#', '%', spaces and control characters; '.' and '..' are refused
# separately. Request ids are UUIDs in practice; model segments are slugs like "v1.1-ultra".
_SEGMENT: Final = re.compile(r"[A-Za-z0-9._~:@!$&'()*+,;=-]+")


class UnsafeIdError(ValueError):
    """A model or request id that cannot be placed in a URL path safely."""


def check_segment(value: str, what: str) -> str:
    """Return ``value`` if it is one safe URL path segment, else raise ``UnsafeIdError``."""
    if not value:
        raise UnsafeIdError(f"{what} is empty")
    if value in {".", ".."}:
        raise UnsafeIdError(f"{what} {value!r} is a relative path segment")
    if not _SEGMENT.fullmatch(value):
        bad = next(ch for ch in value if not _SEGMENT.fullmatch(ch))
        raise UnsafeIdError(
            f"{what} {value!r} contains {bad!r}, which is not allowed in a URL path"
        )
    return value


@dataclass(frozen=True, slots=True)
class AppId:
    """The part of a model id that addresses its queue: ``[namespace/]owner/app``."""

    owner: str
    app: str
    namespace: str | None = None

    @classmethod
    def from_model(cls, model: str) -> AppId:
        """Parse a model id as found in a CSV export (``fal-ai/flux/dev``, ``fal-ai/flux``,
        ``workflows/me/wf``); a single segment such as ``auto`` (a relay placeholder) is
        accepted and used as it stands."""
        parts = model.split("/")
        namespace = None
        if len(parts) > 1 and parts[0] in NAMESPACES:
            namespace, parts = parts[0], parts[1:]
        for part in parts:
            check_segment(part, "model segment")
        if len(parts) == 1:
            if namespace is not None:
                raise UnsafeIdError(f"model {model!r} has a namespace but no owner/app")
            return cls(owner=parts[0], app="", namespace=None)
        return cls(owner=parts[0], app=parts[1], namespace=namespace)

    @property
    def path(self) -> str:
        segments = [s for s in (self.namespace, self.owner, self.app) if s]
        return "/".join(segments)


def request_path(model: str, request_id: str) -> str:
    """``{[ns/]owner/app}/requests/{id}``, the checked path of a request's result (built once,
    when its row is read); raises ``UnsafeIdError`` on unsafe parts."""
    app = AppId.from_model(model)
    check_segment(request_id, "request_id")
    return f"{app.path}/requests/{request_id}"


def result_url(base_url: str, path: str) -> str:
    """``{base}/{path}``, ``path`` from ``request_path``."""
    return f"{base_url.rstrip('/')}/{path}"


def describe_url(url: str) -> str:
    """A URL for messages and the manifest: ``data:`` URIs are reduced to their media type."""
    if url[:5].lower() == "data:":
        media_type = url[5:].split(",", 1)[0].split(";", 1)[0]
        return f"data:{media_type or 'text/plain'}"
    return url


_AS_IS: Final = re.compile(r"(?:[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=]|%[0-9A-Fa-f]{2})+")
"""A URL of RFC 3986's characters only, its escapes whole: it travels exactly as written."""
_UNSAFE: Final = re.compile(r"%(?![0-9A-Fa-f]{2})|[^A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]+")
"""What RFC 3986 does not allow in a URL: escaped, one UTF-8 byte at a time."""
_HOST: Final = re.compile(r"[A-Za-z0-9\-._:%]+")


def _escape(match: re.Match[str]) -> str:
    return "".join(f"%{b:02X}" for b in match.group().encode("utf-8", "surrogatepass"))


def as_url(text: str) -> URL:
    """``text`` as a URL, changed as little as sending it needs: its escapes stay as they are
    (a signed URL's must), what RFC 3986 does not allow is escaped, and a host that is not
    ASCII is IDNA-encoded. ``ValueError`` if it cannot be one."""
    if _AS_IS.fullmatch(text):
        return URL(text, encoded=True)
    scheme, sep, rest = text.partition("://")
    if not sep:
        return URL(_UNSAFE.sub(_escape, text), encoded=True)
    cut = min((i for i in map(rest.find, "/?#") if i >= 0), default=len(rest))
    authority, tail = rest[:cut], rest[cut:]
    if not authority.isascii():
        authority = URL(f"{scheme}://{authority}").raw_authority
    return URL(f"{scheme}://{authority}{_UNSAFE.sub(_escape, tail)}", encoded=True)


def http_url(text: str, *, what: str = "image URL") -> URL | str:
    """``text`` as an http(s) URL with a host (``as_url``), or the reason it is not one."""
    try:
        url = as_url(text)
        host = url.raw_host
        url.host  # noqa: B018 - decoding an IDNA host can fail too
    except ValueError as exc:  # IDNA errors are UnicodeErrors, ValueErrors too
        return f"{what} is malformed ({exc})"
    return _checked(url, host, what)


def _checked(url: URL, host: str | None, what: str) -> URL | str:
    if url.scheme not in FOLLOWED_SCHEMES:
        return f"unsupported {what} scheme {url.scheme or '(none)'!r}"
    if not host:
        return f"{what} has no host"
    if not _HOST.fullmatch(host):
        return f"{what} is malformed (its host is {host!r})"
    if url.raw_user is not None or url.raw_password is not None:
        return f"{what} carries a user name or password; not fetched"
    labels = host.split(".")
    if len(host) > _MAX_HOST or any(len(label) > _MAX_LABEL for label in labels):
        return f"{what} has a host name longer than DNS allows"
    if "" in labels[:-1] and ":" not in host:  # a trailing dot is fine, an empty label is not
        return f"{what} is malformed (empty label in {host!r})"
    return url


_MAX_HOST: Final = 253
_MAX_LABEL: Final = 63


def redirect_target(current: URL, location: str, *, what: str = "image URL") -> URL | str:
    """Where a redirect leads, or why it is not followed: only to http(s), never from https
    down to plain http, and never to a malformed URL."""
    try:
        target = current.join(as_url(location))
        target.host  # noqa: B018 - decoding an IDNA host can fail too
    except ValueError as exc:
        return f"{what} redirects to a malformed URL ({exc})"
    if target.scheme not in FOLLOWED_SCHEMES:
        return f"{what} redirects to an unsupported scheme {target.scheme!r}"
    if current.scheme == "https" and target.scheme == "http":
        return f"{what} redirects from https to plain http; not followed"
    return _checked(target, target.raw_host, what)


def same_origin(a: URL, b: URL) -> bool:
    """Scheme, host and port (the default port of the scheme when none is given) all equal."""
    return (a.scheme, a.host, a.port) == (b.scheme, b.host, b.port)


def is_public(address: str) -> bool:
    """An address on the public internet: not loopback, link-local, private, unspecified,
    shared, reserved or multicast (an IPv4-mapped IPv6 address is judged as its IPv4)."""
    ip = ipaddress.ip_address(address.partition("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def non_public_refusal(host: str, address: str) -> str:
    """Why an image URL whose host resolves to ``address`` (not public) is not fetched."""
    return (
        f"image URL host {host} resolves to a non-public address ({address}); "
        "not fetched. If the images really live on your own network, run with "
        "--allow-private-images (job file: allow-private-images = true)"
    )

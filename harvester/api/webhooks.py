"""fal's webhook signatures: checking a delivery against the keys of a JWKS.

fal signs ``request_id + "\\n" + user_id + "\\n" + timestamp + "\\n" + sha256(body).hexdigest()``
with ED25519; the signature (hex) and its three inputs come as ``X-Fal-Webhook-*`` headers,
the public keys from a JWKS (``kty`` OKP, ``crv`` Ed25519). ``WebhookVerifier`` checks the raw
bytes before anything parses them: the headers are there, the timestamp is within 5 minutes
of this clock, the account is one of those allowed, and one key of the JWKS verifies the
signature. Keys are cached up to 24 hours and fetched again, at most once a minute, when no
cached key verifies (fal rotating its keys). The JWKS is fetched with the harvester's own
client (the same proxies and CA settings), with timeouts.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

import anyio
import httpx
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

REQUEST_ID: Final = "X-Fal-Webhook-Request-Id"
USER_ID: Final = "X-Fal-Webhook-User-Id"
TIMESTAMP: Final = "X-Fal-Webhook-Timestamp"
SIGNATURE: Final = "X-Fal-Webhook-Signature"
HEADERS: Final = (REQUEST_ID, USER_ID, TIMESTAMP, SIGNATURE)
MAX_SKEW: Final = 300.0
"""Seconds a delivery's timestamp may be off this machine's clock."""
CACHE_SECONDS: Final = 24 * 3600.0
REFETCH_SECONDS: Final = 60.0
"""The least time between two fetches of the JWKS."""
RETRY_UNAVAILABLE_SECONDS: Final = 5.0
"""With no keys at all, the least time between two tries to fetch them (deliveries meanwhile
are answered 503 without a fetch each)."""
JWKS_MAX_BYTES: Final = 1 << 20


class Refused(Exception):
    """A delivery that is not taken (401). ``reason`` is a short word for counters and logs;
    the message never holds the body or the signature."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class KeysUnavailable(Exception):
    """The JWKS cannot be had now (503: fal retries the delivery)."""


@dataclass(frozen=True, slots=True)
class Verified:
    """What a good signature vouches for."""

    request_id: str
    user_id: str
    timestamp: int


def signed_message(request_id: str, user_id: str, timestamp: str, body: bytes) -> bytes:
    """The bytes fal signs for a delivery."""
    digest = hashlib.sha256(body).hexdigest()
    return f"{request_id}\n{user_id}\n{timestamp}\n{digest}".encode()


def parse_jwks(data: bytes) -> tuple[Ed25519PublicKey, ...]:
    """The Ed25519 keys of a JWKS document; others are skipped. ``ValueError`` if it is not
    a JWKS."""
    document = json.loads(data)
    keys = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(keys, list):
        raise ValueError("not a JWKS (no 'keys' list)")
    found = []
    for key in keys:
        if not isinstance(key, dict) or key.get("kty") != "OKP" or key.get("crv") != "Ed25519":
            continue
        x = key.get("x")
        if not isinstance(x, str):
            continue
        try:
            raw = base64.urlsafe_b64decode(x + "=" * (-len(x) % 4))
            found.append(Ed25519PublicKey.from_public_bytes(raw))
        except (binascii.Error, ValueError):
            continue
    return tuple(found)


class WebhookVerifier:
    """Checks deliveries; one per server. ``user_ids`` empty: any account is accepted."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        jwks_url: str,
        *,
        user_ids: frozenset[str] = frozenset(),
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._url = jwks_url
        self._user_ids = user_ids
        self._clock = clock
        self._monotonic = monotonic
        self._keys: tuple[Ed25519PublicKey, ...] = ()
        self._fetched_at: float | None = None
        self._attempted_at: float | None = None
        """When the last fetch ended, answered or not."""
        self._fetching = anyio.Lock()
        self.fetches = 0

    async def verify(self, headers: Mapping[str, str], body: bytes) -> Verified:
        """The delivery's request id, account and time if fal signed ``body`` for an allowed
        account within ``MAX_SKEW``; else ``Refused``. ``KeysUnavailable`` if no key could be
        had to check it."""
        values = {name: headers.get(name, "") for name in HEADERS}
        missing = [name for name, value in values.items() if not value]
        if missing:
            raise Refused("missing-headers", f"no {', '.join(missing)} header")
        request_id, user_id = values[REQUEST_ID], values[USER_ID]
        stamp = values[TIMESTAMP]
        if not stamp.isascii() or not stamp.isdigit() or len(stamp) > 12:
            raise Refused("bad-timestamp", "the timestamp is not Unix seconds")
        skew = int(stamp) - self._clock()
        if abs(skew) > MAX_SKEW:
            raise Refused("stale-timestamp", f"the timestamp is {skew:+.0f} s off this clock")
        if self._user_ids and user_id not in self._user_ids:
            raise Refused("other-account", "the delivery is for another fal account")
        try:
            signature = bytes.fromhex(values[SIGNATURE])
        except ValueError:
            raise Refused("bad-signature", "the signature is not hex") from None
        message = signed_message(request_id, user_id, stamp, body)
        keys = await self._current_keys()
        if self._verifies(keys, signature, message):
            return Verified(request_id, user_id, int(stamp))
        if await self._refetch(keys) and self._verifies(self._keys, signature, message):
            return Verified(request_id, user_id, int(stamp))
        raise Refused("bad-signature", "no key of the JWKS verifies the signature")

    @staticmethod
    def _verifies(keys: tuple[Ed25519PublicKey, ...], signature: bytes, message: bytes) -> bool:
        for key in keys:
            try:
                key.verify(signature, message)
            except InvalidSignature:
                continue
            return True
        return False

    def _fresh(self) -> bool:
        fetched = self._fetched_at
        return fetched is not None and self._monotonic() - fetched <= CACHE_SECONDS

    def _attempted_within(self, seconds: float) -> bool:
        attempted = self._attempted_at
        return attempted is not None and self._monotonic() - attempted < seconds

    async def _current_keys(self) -> tuple[Ed25519PublicKey, ...]:
        """The keys, fetched first if they are over ``CACHE_SECONDS`` old. Keys past their
        age still serve while one request fetches them, and when the last try (answered or
        not) was within ``REFETCH_SECONDS``; with no keys at all, the next try waits
        ``RETRY_UNAVAILABLE_SECONDS``. ``KeysUnavailable`` if there are none."""
        if self._fresh():
            return self._keys
        pause = REFETCH_SECONDS if self._keys else RETRY_UNAVAILABLE_SECONDS
        if not self._attempted_within(pause) and not (self._keys and self._fetching.locked()):
            async with self._fetching:
                if not self._fresh() and not self._attempted_within(pause):  # nobody meanwhile
                    await self._fetch()
        if not self._keys:
            raise KeysUnavailable(f"the JWKS at {self._url} could not be fetched just now")
        return self._keys

    async def _refetch(self, seen: tuple[Ed25519PublicKey, ...]) -> bool:
        """Fetch the keys again unless the last try (answered or not) was within
        ``REFETCH_SECONDS``; True if the keys are now other than ``seen``."""
        if not self._attempted_within(REFETCH_SECONDS):
            async with self._fetching:
                if not self._attempted_within(REFETCH_SECONDS):  # nobody tried meanwhile
                    await self._fetch()
        return self._keys is not seen

    async def _fetch(self) -> None:
        """Fetch the JWKS. On failure: ``KeysUnavailable`` if there are no keys to fall back
        on, else the cached keys stay."""
        try:
            self.fetches += 1
            request = self._client.build_request("GET", self._url)
            response = await self._client.send(request, stream=True)
            try:
                if response.status_code != 200:
                    status = response.status_code
                    raise KeysUnavailable(f"the JWKS at {self._url} answered {status}")
                data = bytearray()
                async for chunk in response.aiter_bytes():
                    data += chunk
                    if len(data) > JWKS_MAX_BYTES:
                        raise KeysUnavailable(f"the JWKS at {self._url} is over 1 MiB")
            finally:
                await response.aclose()
            keys = parse_jwks(bytes(data))
            if not keys:
                raise KeysUnavailable(f"the JWKS at {self._url} holds no Ed25519 key")
        except (httpx.HTTPError, ValueError, KeysUnavailable) as exc:
            self._attempted_at = self._monotonic()
            if self._keys:
                return
            if isinstance(exc, KeysUnavailable):
                raise
            raise KeysUnavailable(f"cannot fetch the JWKS at {self._url}: {exc}") from exc
        self._keys = keys
        self._fetched_at = self._attempted_at = self._monotonic()


__all__ = [
    "HEADERS",
    "MAX_SKEW",
    "KeysUnavailable",
    "Refused",
    "Verified",
    "WebhookVerifier",
    "parse_jwks",
    "signed_message",
]

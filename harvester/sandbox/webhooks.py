"""Webhooks as fal sends them: a signed POST of each finished request, retried on failure.

The sandbox signs with an ED25519 key of its own, made when it starts, and publishes it as a
JWKS at ``/.well-known/jwks.json``; a delivery carries fal's four ``X-Fal-Webhook-*``
headers and fal's body (``request_id``, ``gateway_request_id``, ``status``, ``payload``,
``error``; ``payload`` null and ``payload_error`` set when the result is not JSON). A delivery
that is not answered 2xx is sent again, ``ATTEMPTS`` times in all, with doubling waits (fal
retries 10 times over 2 hours; the sandbox over about 4 minutes, so that tests and demos
see it through).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import time
from typing import Final

import anyio
import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

logger = logging.getLogger(__name__)

ATTEMPTS: Final = 10
FIRST_WAIT: Final = 0.5
MAX_WAIT: Final = 60.0
TIMEOUT: Final = 15.0
"""Seconds a receiver has to answer a delivery (fal's)."""
USER_ID: Final = "sandbox-user"


class Signer:
    """An ED25519 key that signs deliveries as fal does, and its JWKS."""

    def __init__(self, key: Ed25519PrivateKey | None = None) -> None:
        self._key = key or Ed25519PrivateKey.generate()
        raw = self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.x = base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
        self.kid = hashlib.sha256(raw).hexdigest()[:16]

    def jwks(self) -> bytes:
        key = {"kty": "OKP", "crv": "Ed25519", "x": self.x, "kid": self.kid, "use": "sig"}
        return json.dumps({"keys": [key]}).encode()

    def headers(
        self, request_id: str, body: bytes, *, user_id: str = USER_ID, timestamp: int | None = None
    ) -> dict[str, str]:
        """The four headers of a delivery of ``body``."""
        stamp = str(int(time.time()) if timestamp is None else timestamp)
        digest = hashlib.sha256(body).hexdigest()
        message = f"{request_id}\n{user_id}\n{stamp}\n{digest}".encode()
        return {
            "X-Fal-Webhook-Request-Id": request_id,
            "X-Fal-Webhook-User-Id": user_id,
            "X-Fal-Webhook-Timestamp": stamp,
            "X-Fal-Webhook-Signature": self._key.sign(message).hex(),
            "Content-Type": "application/json",
        }


def delivery_body(request_id: str, status: int, result: bytes) -> bytes:
    """fal's delivery of a request whose result endpoint answers ``status`` and ``result``."""
    envelope: dict[str, object] = {"request_id": request_id, "gateway_request_id": request_id}
    try:
        payload = json.loads(result)
    except ValueError as exc:
        payload = None
        envelope["payload_error"] = f"Response payload is not valid JSON: {exc}"
    if status == 200:
        envelope |= {"status": "OK", "payload": payload, "error": None}
    else:
        error = f"Invalid status code: {status}"
        envelope |= {"status": "ERROR", "payload": payload, "error": error}
    return json.dumps(envelope).encode()


class Sender:
    """Sends deliveries, each retried until answered 2xx or ``ATTEMPTS`` are spent."""

    def __init__(
        self, signer: Signer, *, user_id: str = USER_ID, first_wait: float = FIRST_WAIT
    ) -> None:
        self.signer = signer
        self.user_id = user_id
        self.first_wait = first_wait
        self.sent = 0
        self.delivered = 0
        self.failed_attempts = 0
        self.given_up = 0
        self._client: httpx.AsyncClient | None = None

    async def deliver(self, url: str, request_id: str, body: bytes) -> bool:
        """POST ``body`` to ``url`` until it is answered 2xx; False if never."""
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=TIMEOUT, trust_env=False)
        wait = self.first_wait
        for attempt in range(1, ATTEMPTS + 1):
            self.sent += 1
            # Signed again for each attempt, as fal does: the timestamp is the attempt's.
            headers = self.signer.headers(request_id, body, user_id=self.user_id)
            try:
                response = await self._client.post(url, content=body, headers=headers)
                if 200 <= response.status_code < 300:
                    self.delivered += 1
                    return True
                why = f"HTTP {response.status_code}"
            except httpx.HTTPError as exc:
                why = type(exc).__name__
            self.failed_attempts += 1
            logger.info("webhook %s attempt %d: %s", request_id, attempt, why)
            if attempt < ATTEMPTS:
                await anyio.sleep(wait)
                wait = min(wait * 2, MAX_WAIT)
        self.given_up += 1
        return False

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()

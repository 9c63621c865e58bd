"""What a sandbox serves: its key, its world seed, and the faults it injects."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Final

# Short names accepted by ``FaultRates.parse`` (``--faults``), mapped to field names.
FAULT_NAMES: Final = {
    "429": "rate_limit",
    "429ra": "rate_limit_retry_after",
    "503": "server_error",
    "502html": "gateway_html",
    "reset": "reset",
    "truncate": "truncate",
    "slow": "slow",
    "pending": "pending_then_done",
    "expired": "expired_image",
    "badjson": "malformed_json",
    "notfound": "permanent_not_found",
    "failed": "permanent_failure",
}

# Drawn once per attempt at a result endpoint; at most one of them fires.
RESULT_FAULTS: Final = (
    "rate_limit",
    "rate_limit_retry_after",
    "server_error",
    "gateway_html",
    "reset",
    "slow",
    "malformed_json",
)
# Drawn once per attempt at a media (image) URL.
MEDIA_FAULTS: Final = ("reset", "truncate", "slow")
# Drawn once per request id from a stable hash: the id always behaves the same way.
PER_ID_FAULTS: Final = (
    "permanent_not_found",
    "permanent_failure",
    "expired_image",
    "pending_then_done",
)

# How ``mixed=X`` splits X across the transient kinds (weights sum to 1) ...
_MIXED_TRANSIENT: Final = {
    "rate_limit": 0.30,
    "rate_limit_retry_after": 0.15,
    "server_error": 0.15,
    "gateway_html": 0.10,
    "reset": 0.10,
    "truncate": 0.10,
    "malformed_json": 0.07,
    "slow": 0.03,
}
# ... and the smaller per-id share it adds on top (mixed=0.2 -> pending 5%, others 1%).
_MIXED_PER_ID: Final = {
    "pending_then_done": 0.25,
    "expired_image": 0.05,
    "permanent_not_found": 0.05,
    "permanent_failure": 0.05,
}

AUTH_SCHEMES: Final = ("any", "bearer", "key")


@dataclass(frozen=True, slots=True)
class FaultRates:
    """Probabilities (0..1) of each fault.

    Transient faults are drawn per attempt, so a client that retries gets through;
    ``pending_then_done``, ``expired_image``, ``permanent_not_found`` and
    ``permanent_failure`` are drawn once per request id, so an id always behaves the same.
    """

    rate_limit: float = 0.0
    """429 with ``X-Fal-Needs-Retry: 1`` and no ``Retry-After``."""
    rate_limit_retry_after: float = 0.0
    """429 with ``Retry-After`` (alternately delay-seconds and HTTP-date)."""
    server_error: float = 0.0
    """503 ``{"detail": "Service temporarily unavailable"}``."""
    gateway_html: float = 0.0
    """502 with nginx's HTML page, no JSON."""
    reset: float = 0.0
    """Connection reset (RST) before any response; results and media."""
    truncate: float = 0.0
    """Media only: full Content-Length announced, part of the body sent, then close."""
    slow: float = 0.0
    """The response is delayed by ``SandboxConfig.slow_seconds``; results and media."""
    pending_then_done: float = 0.0
    """Per id: the first 2 result fetches answer "still in progress", later ones the result."""
    expired_image: float = 0.0
    """Per id: the result is fine but its image URLs answer 404."""
    malformed_json: float = 0.0
    """200 with a JSON body cut short on the wire: its whole Content-Length announced, half of
    it sent, then close (transient; a complete body that is not JSON is the ``badjson-``
    prefix)."""
    permanent_not_found: float = 0.0
    """Per id: 404 ``{"status": "NOT_FOUND"}``."""
    permanent_failure: float = 0.0
    """Per id: 500 model error with ``X-Fal-Error-Type``."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not 0.0 <= value <= 1.0:  # also rejects NaN
                raise ValueError(f"fault rate {f.name}={value!r} is outside 0..1")
        for group, names in (
            ("result", RESULT_FAULTS),
            ("media", MEDIA_FAULTS),
            ("per-request-id", PER_ID_FAULTS),
        ):
            total = sum(getattr(self, name) for name in names)
            if total > 1.0 + 1e-9:
                raise ValueError(
                    f"the {group} fault rates ({', '.join(names)}) add up to {total:g}, more than 1"
                )

    @property
    def enabled(self) -> bool:
        """True if any fault can fire."""
        return any(getattr(self, f.name) for f in dataclasses.fields(self))

    @classmethod
    def parse(cls, spec: str) -> FaultRates:
        """Parse ``--faults``, e.g. ``"429=0.05,503=0.02,pending=0.05"`` or ``"mixed=0.2"``.

        Items apply left to right, so ``"mixed=0.2,reset=0"`` is the mix without resets.
        Field names (``rate_limit=0.1``) are accepted as well as the short names.
        """
        valid = ", ".join([*FAULT_NAMES, "mixed"])
        rates: dict[str, float] = {}
        for raw_item in spec.split(","):
            item = raw_item.strip()
            if not item:
                continue
            name, sep, raw_value = (part.strip() for part in item.partition("="))
            if not sep:
                raise ValueError(f"fault {item!r} has no '=RATE'; write NAME=RATE, e.g. 429=0.05")
            try:
                value = float(raw_value)
            except ValueError:
                raise ValueError(f"fault {item!r}: {raw_value!r} is not a number") from None
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"fault {item!r}: rate must be between 0 and 1")
            if name == "mixed":
                for kind, weight in (_MIXED_TRANSIENT | _MIXED_PER_ID).items():
                    rates[kind] = value * weight
            elif name in FAULT_NAMES:
                rates[FAULT_NAMES[name]] = value
            elif name in FAULT_NAMES.values():
                rates[name] = value
            else:
                raise ValueError(f"unknown fault {name!r} in {item!r}; valid names: {valid}")
        return cls(**rates)


@dataclass(frozen=True, slots=True)
class SandboxConfig:
    """How a sandbox behaves. The host is always 127.0.0.1."""

    port: int = 0
    """0 picks a free port."""
    key: str = "sandbox-key"
    """Accepted as ``Bearer <key>`` or ``Key <key>`` (see ``auth_scheme``)."""
    auth_scheme: str = "any"
    """``"any"``, ``"bearer"`` or ``"key"``: which Authorization scheme is accepted."""
    faults: FaultRates = field(default_factory=FaultRates)
    seed: int = 0
    """World seed: the same seed serves the same results and the same image bytes."""
    image_bytes: int = 30_000
    """Approximate size of each synthetic image."""
    latency: float = 0.0
    """Seconds added to every response."""
    slow_seconds: float = 2.0
    retry_after_seconds: float = 1.0
    known_request_ids: frozenset[str] | None = None
    """If set, only these ids exist; every other id answers 404 NOT_FOUND."""
    throttle_share: float = 0.0
    """Share (0..1) of request ids whose first ``throttle_times`` result fetches answer 429
    (drawn once per id; half of them, also per id, carry ``Retry-After: 1``)."""
    throttle_times: int = 2
    max_rps: float | None = None
    """If set, result requests beyond this many accepted in the last second (a sliding window
    on the server's clock) answer 429, as a relay with a per-key rate limit does."""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port {self.port} is outside 0..65535")
        if self.auth_scheme not in AUTH_SCHEMES:
            raise ValueError(
                f"auth_scheme {self.auth_scheme!r} is not one of {', '.join(AUTH_SCHEMES)}"
            )
        if not self.key:
            raise ValueError("key must not be empty")
        if self.image_bytes < 1_000:
            raise ValueError(f"image_bytes {self.image_bytes} is below the minimum of 1000")
        for name in ("latency", "slow_seconds", "retry_after_seconds"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0")
        if not 0.0 <= self.throttle_share <= 1.0:  # also rejects NaN
            raise ValueError(f"throttle_share {self.throttle_share!r} is outside 0..1")
        if self.throttle_times < 1:
            raise ValueError(f"throttle_times {self.throttle_times} must be at least 1")
        if self.max_rps is not None and not self.max_rps > 0:
            raise ValueError(f"max_rps {self.max_rps!r} must be above 0")

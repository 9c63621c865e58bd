"""The status vocabulary of requests and images (README: "Statuses"): what the API layer says
of an answer, what a manifest row records, what status and the metrics count."""

from __future__ import annotations

from typing import Final

OK: Final = "ok"
PENDING: Final = "pending"
NOT_FOUND: Final = "not_found"
FAILED: Final = "failed"
ERROR: Final = "error"
INVALID: Final = "invalid"
EXPIRED: Final = "expired"
"""Given up: not ok for ``--give-up-after`` days since first seen; no longer fetched."""
STATUSES: Final = (OK, PENDING, NOT_FOUND, FAILED, ERROR, INVALID, EXPIRED)

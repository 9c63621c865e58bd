"""A webhook delivery's body read as the outcome of a result fetch.

fal POSTs ``{"request_id", "gateway_request_id", "status": "OK" | "ERROR", "payload",
"error"}`` (``payload`` null and ``payload_error`` set when the result was not valid JSON).
An ``OK`` payload goes through the same parsing as a fetched result (``results.parse_result``);
``ERROR`` is a ``failed`` outcome with fal's error; a missing payload, or one of the wrong
shape, an ``error`` outcome. Only the signature-checked raw body comes here.
"""

from __future__ import annotations

import json
from typing import Any

from harvester.api.fetcher import FetchOutcome
from harvester.api.results import MAX_TEXT_CHARS, ResultShapeError, error_detail, parse_result
from harvester.statuses import ERROR, FAILED, OK


def _text(value: Any) -> str | None:
    if value is None:
        return None
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text[:MAX_TEXT_CHARS]


def delivery_outcome(body: bytes) -> FetchOutcome:
    """The outcome a delivery's body reports (never raises on a bad body: it is an
    ``error`` outcome saying why)."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        return FetchOutcome(ERROR, None, 1, f"the delivery is not valid JSON ({exc})")
    if not isinstance(data, dict):
        return FetchOutcome(ERROR, None, 1, "the delivery is not a JSON object")
    status = data.get("status")
    payload = data.get("payload")
    if status == "ERROR":
        detail = error_detail(json.dumps(payload).encode()) if payload is not None else None
        parts = [p for p in (_text(data.get("error")), detail) if p]
        message = "; ".join(parts) or "fal reported an error without details"
        return FetchOutcome(FAILED, None, 1, f"fal: {message}"[:MAX_TEXT_CHARS])
    if status != "OK":
        return FetchOutcome(ERROR, None, 1, f"the delivery's status is {_text(status)!s}")
    if payload is None:
        why = _text(data.get("payload_error")) or "no payload"
        return FetchOutcome(ERROR, None, 1, f"the delivery has no payload: {why}")
    try:
        result = parse_result(json.dumps(payload, ensure_ascii=False).encode())
    except ResultShapeError as exc:
        return FetchOutcome(ERROR, None, 1, f"result has the wrong shape: {exc}")
    except ValueError as exc:
        return FetchOutcome(ERROR, None, 1, str(exc))
    return FetchOutcome(OK, None, 1, result.note, result)


__all__ = ["delivery_outcome"]

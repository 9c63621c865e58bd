"""The fetch stage: every kind of answer classified, retried or final, over a mock transport.

Fixture bodies are in tests/fixtures/ (see its README). Waits are recorded, not slept: the
tests count what the retry policy asked for, they never time it.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import anyio
import httpx
import pytest

from harvester.api.fetcher import MAX_RESULT_BYTES, FetchOutcome, ResultFetcher
from harvester.api.ratelimit import RateLimiter
from harvester.api.retry import RetryPolicy
from harvester.errors import AuthError

FIXTURES = Path(__file__).parent / "fixtures"
KEY = "sk-fetch-5d2c9a41e0"
URL = "https://relay.test/fal-ai/flux/requests/req-1"

Handler = Callable[[httpx.Request], httpx.Response]


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Record every ``anyio.sleep`` (retry waits and limiter spacing) instead of sleeping."""
    waits: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        waits.append(seconds)
        await anyio.lowlevel.checkpoint()

    monkeypatch.setattr(anyio, "sleep", fake_sleep)
    return waits


async def fetch(
    handler: Handler,
    *,
    max_attempts: int = 3,
    limiter: RateLimiter | None = None,
    max_result_bytes: int = MAX_RESULT_BYTES,
) -> tuple[FetchOutcome, ResultFetcher]:
    policy = RetryPolicy(max_attempts=max_attempts, base_delay=0.01, max_delay=0.05, budget=600)
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        fetcher = ResultFetcher(
            client,
            base_url="https://relay.test",
            authorization=f"Bearer {KEY}",
            policy=policy,
            limiter=limiter or RateLimiter(1000),
            rng=random.Random(0),
            max_result_bytes=max_result_bytes,
        )
        outcome = await fetcher.fetch("fal-ai/flux/requests/req-1")
    return outcome, fetcher


def answer(status: int, body: bytes, **headers: str) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        assert str(request.url) == URL
        assert request.headers["authorization"] == f"Bearer {KEY}"
        return httpx.Response(status, content=body, headers=headers)

    return handler


def then_ok(first: Handler) -> tuple[Handler, list[int]]:
    """``first`` for the first attempt, a good result afterwards; also returns a call count."""
    calls: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        if len(calls) == 1:
            return first(request)
        return httpx.Response(200, content=fixture("result_ok_flux_dev.json"))

    return handler, calls


# -- final answers ---------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("name", "images"),
    [
        ("result_ok_flux_dev.json", 1),
        ("result_ok_seed_example.json", 1),
        ("result_ok_multi_nsfw.json", 3),
        ("result_ok_data_uri.json", 1),
        ("result_ok_relay_echo.json", 1),
        ("result_ok_no_images.json", 0),
    ],
)
async def test_results_are_ok(name: str, images: int) -> None:
    outcome, fetcher = await fetch(answer(200, fixture(name)))
    assert (outcome.status, outcome.http_status, outcome.attempts) == ("ok", 200, 1)
    assert outcome.result is not None and len(outcome.result.images) == images
    assert fetcher.retries == 0


@pytest.mark.anyio
@pytest.mark.parametrize("status", [200, 202, 400, 422, 429, 500, 503])
async def test_still_in_progress_is_pending_whatever_the_status(status: int) -> None:
    outcome, _ = await fetch(answer(status, fixture("result_pending.json")))
    assert (outcome.status, outcome.http_status, outcome.attempts) == ("pending", status, 1)
    assert outcome.error == "Request is still in progress"


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("body", "error"),
    [
        (fixture("result_not_found.json"), "NOT_FOUND"),
        (b'{"detail": "Request not found"}', "Request not found"),
        (b"", "NOT_FOUND"),
    ],
)
async def test_404_is_not_found_at_once(body: bytes, error: str) -> None:
    outcome, fetcher = await fetch(answer(404, body))
    assert (outcome.status, outcome.error, outcome.attempts) == ("not_found", error, 1)
    assert fetcher.retries == 0


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("status", "body", "headers", "error"),
    [
        (
            422,
            fixture("result_validation_error_422.json"),
            {},
            "body.image_size: value is not a valid enumeration member; permitted: 'square_hd'",
        ),
        (
            500,
            fixture("result_model_error_500.json"),
            {"x-fal-error-type": "internal_error"},
            "internal_error: Internal error while running the model",
        ),
        (500, fixture("result_model_error_500.json"), {}, "Internal error while running"),
        (400, b"<html><body>Bad request</body></html>", {}, "HTTP 400: <html><body>Bad"),
        (410, b'{"detail": "Result deleted"}', {}, "Result deleted"),
    ],
)
async def test_model_answers_are_failed_with_their_detail(
    status: int, body: bytes, headers: dict[str, str], error: str
) -> None:
    outcome, fetcher = await fetch(answer(status, body, **headers))
    assert (outcome.status, outcome.http_status, outcome.attempts) == ("failed", status, 1)
    assert outcome.error is not None and outcome.error.startswith(error)
    assert fetcher.retries == 0


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"images": "x", "seed": 1}', "'images' is str, expected a list"),
        (b'{"images": [], "seed": "12"}', "'seed' is str, expected an integer"),
        (b'{"images": [], "seed": null}', "'seed' is null, expected an integer"),
        (b"[1, 2]", "result is a JSON list, expected an object"),
    ],
)
async def test_wrong_shape_is_an_error_row_not_a_retry(body: bytes, message: str) -> None:
    outcome, fetcher = await fetch(answer(200, body))
    assert (outcome.status, outcome.attempts) == ("error", 1)
    assert outcome.error == f"result has the wrong shape: {message}"
    assert fetcher.retries == 0


def streamed(body: bytes, chunk: int = 1000) -> Handler:
    """A 200 whose body comes in chunks with no Content-Length (chunked coding on the wire)."""

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(body), chunk):
            yield body[i : i + chunk]

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=chunks())

    return handler


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("handler", "announced"),
    [
        (answer(200, fixture("result_ok_multi_nsfw.json")), True),
        (streamed(fixture("result_ok_multi_nsfw.json")), False),
    ],
    ids=["announced", "streamed"],
)
async def test_a_result_over_the_size_limit_is_an_error_row_not_read(
    handler: Handler, announced: bool
) -> None:
    body = fixture("result_ok_multi_nsfw.json")
    limit = len(body) - 1
    outcome, fetcher = await fetch(handler, max_result_bytes=limit)
    assert (outcome.status, outcome.http_status, outcome.attempts) == ("error", 200, 1)
    said = f" (it announced {len(body):,} B)" if announced else ""
    assert outcome.error == (
        f"the result body is larger than {limit:,} B{said}; not read. The relay answered "
        "with something that is not a result: check it with curl, the next run asks again"
    )
    assert outcome.result is None
    assert fetcher.retries == 0

    at_limit, _ = await fetch(handler, max_result_bytes=len(body))
    assert at_limit.status == "ok"
    assert at_limit.result is not None
    assert len(at_limit.result.images) == 3


# -- transient answers -------------------------------------------------------------------------


def raising(exc_type: type[httpx.TransportError]) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc_type("boom", request=request)

    return handler


TRANSIENT: list[tuple[str, Handler]] = [
    *(
        (f"{status} gateway html", answer(status, fixture("gateway_502.html")))
        for status in (408, 409, 429, 500, 502, 503, 504)
    ),
    ("429 json", answer(429, fixture("rate_limited_429.json"), **{"x-fal-needs-retry": "1"})),
    ("503 json", answer(503, b'{"detail": "Service temporarily unavailable"}')),
    ("504 json", answer(504, b'{"detail": "Gateway timeout"}')),
    ("200 truncated json", answer(200, b'{"images": [')),
    ("200 html", answer(200, b"<html>maintenance</html>")),
    ("200 bad gzip", answer(200, b"not gzip", **{"content-encoding": "gzip"})),
    ("connect error", raising(httpx.ConnectError)),
    ("read timeout", raising(httpx.ReadTimeout)),
    ("reset mid-body", raising(httpx.RemoteProtocolError)),
]


@pytest.mark.anyio
@pytest.mark.parametrize(("label", "first"), TRANSIENT, ids=[label for label, _ in TRANSIENT])
async def test_transient_answers_are_retried(
    label: str, first: Handler, sleeps: list[float]
) -> None:
    handler, calls = then_ok(first)
    outcome, fetcher = await fetch(handler)
    assert (outcome.status, outcome.attempts) == ("ok", 2), outcome.error
    assert len(calls) == 2
    assert fetcher.retries == 1


@pytest.mark.anyio
async def test_retries_are_bounded_by_max_attempts(sleeps: list[float]) -> None:
    calls: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(502, content=fixture("gateway_502.html"))

    outcome, fetcher = await fetch(handler, max_attempts=4)
    assert (outcome.status, outcome.http_status, outcome.attempts) == ("error", 502, 4)
    assert outcome.error is not None
    assert outcome.error.startswith("HTTP 502: <html> <head><title>502 Bad Gateway</title>")
    assert outcome.error.endswith("(gave up after 4 attempts)")
    assert len(calls) == 4 and fetcher.retries == 3


@pytest.mark.anyio
@pytest.mark.parametrize("status", [429, 503])
@pytest.mark.parametrize("form", ["seconds", "http-date"])
async def test_retry_after_is_honoured_on_429_and_503(
    status: int, form: str, sleeps: list[float]
) -> None:
    if form == "seconds":
        value, low, high = "7", 7.0, 7.0
    else:
        value = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
        low, high = 28.0, 31.0
    handler, _ = then_ok(answer(status, b'{"detail": "slow down"}', **{"retry-after": value}))
    limiter = RateLimiter(1000)
    outcome, _ = await fetch(handler, limiter=limiter)
    assert outcome.status == "ok"
    assert any(low <= wait <= high for wait in sleeps), sleeps
    # A 429 counts toward the throttled share (one 429 is not a share: the rate stays);
    # a 503 does not count.
    assert limiter.throttled == (1 if status == 429 else 0)
    assert limiter.rate == 1000


@pytest.mark.anyio
async def test_retry_after_is_ignored_on_other_statuses(sleeps: list[float]) -> None:
    handler, _ = then_ok(answer(502, b"bad gateway", **{"retry-after": "120"}))
    outcome, _ = await fetch(handler)
    assert outcome.status == "ok"
    assert max(sleeps) < 1


# -- the key ---------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("status", [401, 403])
async def test_rejected_key_raises_auth_error_without_the_key(status: int) -> None:
    calls: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        body = f'{{"detail": "Invalid key {KEY}"}}'.encode()
        return httpx.Response(status, content=body)

    with pytest.raises(AuthError) as info:
        await fetch(handler)
    message = str(info.value)
    assert f"refused the key (HTTP {status}: Invalid key ***)" in message
    assert "HARVESTER_API_KEY" in message and "--auth-scheme" in message
    assert KEY not in message and KEY not in repr(info.value)
    assert len(calls) == 1  # never retried


@pytest.mark.anyio
async def test_a_detail_echoing_the_key_is_redacted(sleeps: list[float]) -> None:
    outcome, _ = await fetch(answer(422, f'{{"detail": "bad input for {KEY}"}}'.encode()))
    assert outcome.error == "bad input for ***"
    outcome, _ = await fetch(answer(502, f"<p>upstream said {KEY}</p>".encode()), max_attempts=2)
    assert outcome.error is not None and KEY not in outcome.error and "***" in outcome.error

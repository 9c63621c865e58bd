"""Fetch stage: one result request, with the retry policy and the shared rate limiter.

Every answer becomes a ``FetchOutcome`` with a status from the manifest's vocabulary, except a
rejected key, which raises ``AuthError`` and stops the run.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

import httpx
from yarl import URL

from harvester.api import follow
from harvester.api.body import SECONDS, CertificateError, decoded_chunks
from harvester.api.follow import Key, Unfollowed, plain_headers, request_error_reason
from harvester.api.ratelimit import RateLimiter
from harvester.api.results import (
    MAX_TEXT_CHARS,
    Result,
    ResultShapeError,
    error_detail,
    parse_result,
)
from harvester.api.retry import (
    RETRY_AFTER_STATUS,
    RETRYABLE_STATUS,
    RetriesExhausted,
    RetryPolicy,
    TransientError,
    attempt_seconds,
    parse_retry_after,
    retrying,
)
from harvester.api.urls import result_url
from harvester.errors import AuthError, UnreachableError
from harvester.redact import clip, redact, secret_parts
from harvester.statuses import ERROR, FAILED, NOT_FOUND, OK, PENDING
from harvester.units import duration, plural, size

log = logging.getLogger("harvester")

IN_PROGRESS: Final = "request is still in progress"

NOT_JSON_ANSWERS: Final = 2
"""Complete 200 answers that are not JSON before the request is the row's ``error``: one more
ask covers a relay's hiccup; the same bytes again would only spend every attempt's backoff. A
body cut short on the wire (fewer bytes than announced, a dropped connection) is a transport
error instead, retried under the policy like any other."""
MAX_RESULT_BYTES: Final = 64_000_000
"""A result body larger than this is not read: a result is a small JSON document (one with
four images inline as data URIs is a few MB), and a relay that streams without end must not
take the run's memory with it."""


class _ResultTooLarge(Exception):
    status: int | None = None

    def __init__(self, limit: int, announced: int | None) -> None:
        said = f" (it announced {size(announced)})" if announced is not None else ""
        super().__init__(
            f"the result body is larger than {size(limit)}{said}; not read. "
            "The relay answered with something that is not a result: check it with curl, "
            "the next run asks again"
        )


async def read_body(response: httpx.Response, limit: int) -> bytes:
    """The whole (decoded) body of a streamed response, or ``_ResultTooLarge`` as soon as it
    is known to pass ``limit``: from Content-Length before reading, or while reading and
    decoding (a compression bomb stops at the limit)."""
    announced = response.headers.get("content-length")
    if announced is not None and announced.isdigit() and int(announced) > limit:
        raise _ResultTooLarge(limit, int(announced))
    chunks: list[bytes] = []
    total = 0
    async for chunk in decoded_chunks(response):
        total += len(chunk)
        if total > limit:
            raise _ResultTooLarge(limit, None)
        chunks.append(chunk)
    return b"".join(chunks)


@dataclass(frozen=True, slots=True)
class FetchOutcome:
    status: str
    http_status: int | None
    attempts: int
    error: str | None = None
    result: Result | None = None


def _snippet(body: bytes, secrets: tuple[str, ...], limit: int = 120) -> str:
    """The head of a body as one line, redacted before it is cut (a cut first could leave
    the head of a secret that no longer matches it)."""
    window = limit * 8
    text = " ".join(body[:window].decode("utf-8", "replace").split())
    return clip(text, limit, secrets, cut=len(body) > window)


class _NotJson(TransientError):
    """A complete 200 body that does not parse as JSON."""


class ResultFetcher:
    """Fetches results from ``{base_url}/{owner}/{app}/requests/{id}``."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        base_url: str,
        authorization: str,
        policy: RetryPolicy,
        limiter: RateLimiter,
        rng: random.Random,
        max_result_bytes: int = MAX_RESULT_BYTES,
        total_seconds: float | None = None,
    ) -> None:
        self._client = client
        self._total = total_seconds or attempt_seconds(client.timeout.read)
        """The most one attempt's exchange may take, redirects and the whole body included."""
        self._max_result_bytes = max_result_bytes
        self._base_url = base_url
        # httpx's Headers, made once: a request copies them without parsing them again.
        plain = {**plain_headers(client.headers), "Accept": "application/json"}
        self._plain = httpx.Headers(plain)
        self._key = Key(URL(base_url), httpx.Headers({**plain, "Authorization": authorization}))
        self._extensions = {"timeout": client.timeout.as_dict()}
        self._policy = policy
        self._limiter = limiter
        self._rng = rng
        self._secrets = secret_parts(authorization.partition(" ")[2])
        self.retries = 0
        self.sent = 0
        """Attempts that reached the wire (a response or a transport error)."""
        self.answered = 0
        """Attempts that got an HTTP response: 0 means the API was never reached."""

    async def fetch(self, path: str, *, repoll: bool = False) -> FetchOutcome:
        """The result at ``path`` (``urls.request_path``), retried under the policy; a
        ``repoll`` of a pending request takes its turns at the rate limiter before new
        requests."""
        url = result_url(self._base_url, path)
        not_json = 0

        async def attempt(n: int) -> FetchOutcome:
            nonlocal not_json
            await self._limiter.acquire(first=repoll)
            self.sent += 1
            try:
                response, body = await self._get(url, time.monotonic() + self._total)
            except TimeoutError as exc:
                reason = f"timed out (no whole answer within {self._total:g} s)"
                raise TransientError(reason) from exc
            except CertificateError as exc:
                reason = f"cannot verify the server: {exc}"
                if self.answered == 0:
                    # Final for the whole run: every request meets the same certificate.
                    raise UnreachableError(
                        f"cannot reach the API at {self._base_url}: {reason}"
                    ) from exc
                return FetchOutcome(ERROR, None, n, reason)
            except httpx.RequestError as exc:
                if self.answered == 0 and self.sent == 1:
                    log.warning(
                        "cannot reach the API at %s: %s; retrying %s over about %s (at most "
                        "%s) before the run stops",
                        self._base_url,
                        str(exc).strip() or type(exc).__name__,
                        plural(self._policy.max_attempts - 1, "more time"),
                        duration(self._policy.expected_waits()),
                        duration(self._policy.budget),
                    )
                raise TransientError(request_error_reason(exc)) from exc
            except (Unfollowed, _ResultTooLarge) as exc:
                self.answered += 1
                self._limiter.on_success()
                return FetchOutcome(ERROR, exc.status, n, str(exc))
            self.answered += 1
            try:
                return self._classify(response, body, n)
            except _NotJson as exc:
                not_json += 1
                if not_json >= NOT_JSON_ANSWERS:
                    return FetchOutcome(ERROR, 200, n, f"{exc} (gave up after {n} attempts)")
                raise

        def count_retry(_: TransientError) -> None:
            self.retries += 1

        started = time.monotonic()
        try:
            outcome = await retrying(self._policy, attempt, rng=self._rng, on_retry=count_retry)
        except RetriesExhausted as exc:
            if self.answered == 0 and exc.last.http_status is None:
                # Not one answer since the run began: the API is unreachable, not one request.
                cause = exc.last.__cause__
                what = str(cause).strip() if cause is not None else ""
                raise UnreachableError(
                    f"cannot reach the API at {self._base_url}: {what or exc.last.reason}; "
                    f"tried {plural(exc.attempts, 'time')} over "
                    f"{duration(time.monotonic() - started)} and no request got an answer, so "
                    "none was recorded. Check --base-url, DNS and the network, then run again"
                ) from exc
            return FetchOutcome(ERROR, exc.last.http_status, exc.attempts, str(exc))
        return outcome

    async def _get(self, url: str, deadline: float) -> tuple[httpx.Response, bytes]:
        """One GET of ``url``, its redirects followed (``follow.get``: the key only to the
        origin of ``--base-url``), and the whole body of its answer, by ``deadline`` (else
        ``TimeoutError``)."""

        async def send(hop: URL, headers: Mapping[str, str]) -> httpx.Response:
            seconds = deadline - time.monotonic()
            if seconds <= 0:
                raise TimeoutError
            # Built here, not by client.get, which would merge the client's base URL and
            # default headers into the request.
            extensions = {**self._extensions, SECONDS: seconds}
            request = httpx.Request("GET", str(hop), headers=headers, extensions=extensions)
            return await self._client.send(request, stream=True)

        response = await follow.get(
            send, URL(url), headers=self._plain, what="result URL", key=self._key
        )
        try:
            body = await read_body(response, self._max_result_bytes)
        except _ResultTooLarge as exc:
            exc.status = response.status_code
            raise
        finally:
            await response.aclose()
        return response, body

    def _classify(self, response: httpx.Response, body: bytes, attempt: int) -> FetchOutcome:
        """One answer as an outcome; raises ``TransientError`` (retry) or ``AuthError``.

        Text from the server (``detail``, a body snippet) goes through ``redact``: a relay
        that echoes the key must not put it in the manifest or a message.
        """
        status = response.status_code
        detail = error_detail(body) if status != 200 or b'"detail"' in body[:200] else None
        if detail is not None:
            detail = clip(detail, MAX_TEXT_CHARS, self._secrets)
        if detail is not None and IN_PROGRESS in detail.lower():
            self._limiter.on_success()
            return FetchOutcome(PENDING, status, attempt, detail)
        if status == 200 and detail is None:  # the common case: a result
            self._limiter.on_success()
            return self._result(body, attempt)
        snippet = _snippet(body, self._secrets)
        if status in RETRYABLE_STATUS:
            retry_after = None
            if status in RETRY_AFTER_STATUS:
                retry_after = parse_retry_after(response.headers.get("retry-after"))
            if status == 429:
                self._limiter.on_throttled(retry_after)
            phrase = clip(response.reason_phrase, 120, self._secrets)
            reason = f"HTTP {status}: {detail or snippet or phrase}"
            raise TransientError(reason, http_status=status, retry_after=retry_after)
        if status in (401, 403):
            raise AuthError(
                f"the API at {self._base_url} refused the key (HTTP {status}: "
                f"{detail or snippet}); check HARVESTER_API_KEY (or FAL_KEY) and "
                "--auth-scheme (bearer for relays, key for fal.ai itself)"
            )
        self._limiter.on_success()
        if status == 200:
            return self._result(body, attempt)
        if status == 202:
            return FetchOutcome(PENDING, status, attempt, detail or "accepted, not finished")
        if status == 404:
            return FetchOutcome(NOT_FOUND, status, attempt, detail or "NOT_FOUND")
        if status >= 500 and detail is None:
            raise TransientError(f"HTTP {status}: {snippet}", http_status=status)
        if status >= 400:
            error_type = redact(response.headers.get("x-fal-error-type", ""), self._secrets)
            text = detail or f"HTTP {status}: {snippet}"
            return FetchOutcome(
                FAILED, status, attempt, f"{error_type}: {text}" if error_type else text
            )
        return FetchOutcome(ERROR, status, attempt, f"unexpected HTTP {status} from the result API")

    def _result(self, body: bytes, attempt: int) -> FetchOutcome:
        try:
            result = parse_result(body, secrets=self._secrets)
        except ResultShapeError as exc:
            return FetchOutcome(ERROR, 200, attempt, f"result has the wrong shape: {exc}")
        except ValueError as exc:  # the whole body arrived: see NOT_JSON_ANSWERS
            raise _NotJson(str(exc), http_status=200) from exc
        return FetchOutcome(OK, 200, attempt, result.note, result)

"""The signature check against a real JWKS server: keys cached, fetched again when fal
rotates them (at most once a minute), and a JWKS that cannot be had is not a refusal."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

import anyio
import httpx
import pytest
from aiohttp import web

from harvester.api.transport import open_client
from harvester.api.webhooks import KeysUnavailable, Refused, WebhookVerifier, parse_jwks
from harvester.sandbox import Sandbox
from harvester.sandbox.webhooks import Sender, Signer


class Keys:
    """A JWKS endpoint on 127.0.0.1 whose keys the test changes."""

    def __init__(self) -> None:
        self.signers = [Signer()]
        self.fetches = 0
        self.status = 200
        self.delay = 0.0
        self.url = ""

    async def jwks(self, _: web.Request) -> web.Response:
        self.fetches += 1
        await anyio.sleep(self.delay)
        keys = [key for s in self.signers for key in parse_keys(s)]
        return web.json_response({"keys": keys}, status=self.status)


def parse_keys(signer: Signer) -> list[dict[str, str]]:
    keys: list[dict[str, str]] = json.loads(signer.jwks())["keys"]
    return keys


@pytest.fixture
async def keys() -> AsyncIterator[Keys]:
    served = Keys()
    app = web.Application()
    app.router.add_get("/jwks.json", served.jwks)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    served.url = f"http://127.0.0.1:{port}/jwks.json"
    try:
        yield served
    finally:
        await runner.cleanup()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.anyio
async def test_keys_are_cached_and_fetched_again_when_fal_rotates_them(keys: Keys) -> None:
    clock = Clock()
    client = open_client(max_connections=2, connect_timeout=5, read_timeout=5)
    async with client:
        verifier = WebhookVerifier(client, keys.url, monotonic=clock)
        old = keys.signers[0]
        body = b'{"request_id": "r"}'
        for _ in range(3):
            assert (await verifier.verify(old.headers("r", body), body)).request_id == "r"
        assert keys.fetches == 1  # cached

        new = Signer()
        keys.signers = [new]  # fal rotates its key
        with pytest.raises(Refused):  # within the minute: not fetched again
            await verifier.verify(new.headers("r", body), body)
        assert keys.fetches == 1
        clock.now += 61
        assert (await verifier.verify(new.headers("r", body), body)).user_id == "sandbox-user"
        assert keys.fetches == 2
        for _ in range(2):  # an unknown key: fetched again at most once a minute
            with pytest.raises(Refused) as refused:
                await verifier.verify(Signer().headers("r", body), body)
            assert refused.value.reason == "bad-signature"
        assert keys.fetches == 2
        clock.now += 24 * 3600 + 1  # a day on: fetched again before use
        keys.signers = [new]
        await verifier.verify(new.headers("r", body), body)
        assert keys.fetches == 3


@pytest.mark.anyio
async def test_a_jwks_that_cannot_be_had_is_503_not_a_refusal(keys: Keys) -> None:
    keys.status = 502
    clock = Clock()
    client = open_client(max_connections=2, connect_timeout=5, read_timeout=5)
    async with client:
        verifier = WebhookVerifier(client, keys.url, monotonic=clock)
        body = b"{}"
        with pytest.raises(KeysUnavailable, match="answered 502"):
            await verifier.verify(keys.signers[0].headers("r", body), body)
        with pytest.raises(KeysUnavailable, match="just now"):  # not a fetch per delivery
            await verifier.verify(keys.signers[0].headers("r", body), body)
        assert keys.fetches == 1
        keys.status = 200
        clock.now += 6
        assert (await verifier.verify(keys.signers[0].headers("r", body), body)).request_id
        assert keys.fetches == 2


@pytest.mark.anyio
async def test_the_checks_before_the_keys_need_no_fetch(keys: Keys) -> None:
    client = open_client(max_connections=2, connect_timeout=5, read_timeout=5)
    async with client:
        verifier = WebhookVerifier(client, keys.url, user_ids=frozenset({"mine"}))
        signer, body = keys.signers[0], b"{}"
        cases = {
            "stale-timestamp": signer.headers(
                "r", body, user_id="mine", timestamp=int(time.time()) - 400
            ),
            "other-account": signer.headers("r", body, user_id="theirs"),
            "missing-headers": {"X-Fal-Webhook-Request-Id": "r"},
            "bad-timestamp": {
                **signer.headers("r", body, user_id="mine"),
                "X-Fal-Webhook-Timestamp": "soon",
            },
        }
        for reason, headers in cases.items():
            with pytest.raises(Refused) as refused:
                await verifier.verify(headers, body)
            assert refused.value.reason == reason
        assert keys.fetches == 0
        ok = await verifier.verify(signer.headers("r", body, user_id="mine"), body)
        assert ok.user_id == "mine" and keys.fetches == 1


@pytest.mark.anyio
async def test_the_sandbox_sends_again_until_answered_2xx() -> None:
    answers = [503, 500, 200]
    seen: list[dict[str, str]] = []

    async def receive(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        await request.read()
        return web.Response(status=answers[len(seen) - 1])

    app = web.Application()
    app.router.add_post("/hook", receive)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/hook"
    sender = Sender(Signer(), first_wait=0.01)
    try:
        assert await sender.deliver(url, "r-9", b'{"request_id": "r-9"}')
    finally:
        await sender.aclose()
        await runner.cleanup()
    assert (sender.sent, sender.delivered, sender.failed_attempts) == (3, 1, 2)
    assert {h["X-Fal-Webhook-Request-Id"] for h in seen} == {"r-9"}


def test_a_submission_needs_the_key_and_the_jwks_is_public(sandbox: Sandbox) -> None:
    assert httpx.post(sandbox.submit_url("fal-ai/flux/dev"), json={}).status_code == 401
    keys = parse_jwks(httpx.get(sandbox.jwks_url, timeout=10).content)
    assert len(keys) == 1


@pytest.mark.anyio
async def test_a_failing_jwks_is_tried_at_most_once_a_minute_and_cached_keys_serve(
    keys: Keys,
) -> None:
    clock = Clock()
    client = open_client(max_connections=2, connect_timeout=5, read_timeout=5)
    async with client:
        verifier = WebhookVerifier(client, keys.url, monotonic=clock)
        signer = keys.signers[0]
        body = b"{}"
        assert (await verifier.verify(signer.headers("r", body), body)).request_id == "r"
        assert keys.fetches == 1
        keys.status = 503
        clock.now += 61
        for _ in range(5):  # forged: one try, however many come, the keys kept
            with pytest.raises(Refused):
                await verifier.verify(Signer().headers("r", body), body)
        assert keys.fetches == 2
        clock.now += 61
        with pytest.raises(Refused):
            await verifier.verify(Signer().headers("r", body), body)
        assert keys.fetches == 3
        clock.now += 24 * 3600  # the keys past their age: tried once, then served as they are
        for _ in range(5):
            assert (await verifier.verify(signer.headers("r", body), body)).request_id == "r"
        assert keys.fetches == 4
        clock.now += 61
        keys.status = 200
        await verifier.verify(signer.headers("r", body), body)
        assert keys.fetches == 5
        await verifier.verify(signer.headers("r", body), body)
        assert keys.fetches == 5  # fresh again


@pytest.mark.anyio
async def test_concurrent_forged_deliveries_against_a_failing_jwks_share_one_try(
    keys: Keys,
) -> None:
    clock = Clock()
    client = open_client(max_connections=20, connect_timeout=5, read_timeout=5)
    async with client:
        verifier = WebhookVerifier(client, keys.url, monotonic=clock)
        body = b"{}"
        await verifier.verify(keys.signers[0].headers("r", body), body)
        keys.status, keys.delay = 503, 0.3
        clock.now += 61
        refused = 0

        async def forged() -> None:
            nonlocal refused
            with pytest.raises(Refused):
                await verifier.verify(Signer().headers("r", body), body)
            refused += 1

        async with anyio.create_task_group() as tg:
            for _ in range(10):
                tg.start_soon(forged)
        assert refused == 10
        assert keys.fetches == 2

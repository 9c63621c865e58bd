"""The sandbox server, over real HTTP on 127.0.0.1."""

from __future__ import annotations

import base64
import io
import json
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from email.utils import parsedate_to_datetime
from typing import Any, Final

import anyio
import httpx
import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from harvester.cli import main
from harvester.sandbox import (
    FaultRates,
    Sandbox,
    SandboxConfig,
    expected_status,
    running_sandbox,
    serve_forever,
    world,
)
from harvester.sandbox.config import FAULT_NAMES

KEY = "sandbox-key"
AUTH = {"Authorization": f"Key {KEY}"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    with running_sandbox(SandboxConfig(key=KEY)) as running:
        yield running


@pytest.fixture
def client(sandbox: Sandbox) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sandbox.base_url, headers=AUTH, timeout=10) as c:
        yield c


def result(client: httpx.Client, request_id: str, model: str = "fal-ai/flux") -> httpx.Response:
    return client.get(f"/{model}/requests/{request_id}")


_cdn: list[httpx.Client] = []


@pytest.fixture(scope="module", autouse=True)
def cdn() -> Iterator[None]:
    """One client for image URLs (``media``), opened once: creating clients is slow."""
    with httpx.Client(timeout=10) as c:
        _cdn.append(c)
        yield
        _cdn.clear()


def media(url: str, **kwargs: Any) -> httpx.Response:
    """Fetch an image the way the harvester must: without the API key."""
    return _cdn[0].get(url, **kwargs)


def assert_valid_png(data: bytes) -> None:
    """Walk every chunk, check CRCs, and inflate IDAT to exactly the declared pixel count."""
    assert data[:8] == PNG_MAGIC
    pos, chunks = 8, {}
    idat = b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert zlib.crc32(kind + body) == crc, kind
        chunks[kind] = body
        idat += body if kind == b"IDAT" else b""
        pos += 12 + length
    assert pos == len(data)
    assert list(chunks)[:: len(chunks) - 1] == [b"IHDR", b"IEND"]
    width, height, depth, colour = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (depth, colour) == (8, 3)  # 8-bit palette
    assert len(chunks[b"PLTE"]) == 3 * 256
    assert len(zlib.decompress(idat)) == height * (1 + width)


# -- results -------------------------------------------------------------------------------


def test_ok_result_has_the_seed_schema(client: httpx.Client, sandbox: Sandbox) -> None:
    counts = set()
    for n in range(40):
        response = result(client, f"req-{n}")
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/json"
        assert response.headers["x-fal-request-id"] == f"req-{n}"
        body = response.json()
        assert set(body) == {"images", "seed", "has_nsfw_concepts", "prompt", "timings"}
        assert 1 <= len(body["images"]) <= 4
        counts.add(len(body["images"]))
        assert len(body["has_nsfw_concepts"]) == len(body["images"])
        assert isinstance(body["seed"], int) and 0 <= body["seed"] < 2**63
        assert isinstance(body["timings"]["inference"], float)
        for image in body["images"]:
            assert image["url"].startswith(f"{sandbox.base_url}/media/")
            assert image["content_type"] in ("image/png", "image/jpeg", "image/webp")
            assert image["width"] > 0 and image["height"] > 0
    assert len(counts) >= 3


def test_results_are_deterministic_and_span_int64_seeds(client: httpx.Client) -> None:
    bodies = [result(client, f"det-{n}").json() for n in range(60)]
    assert bodies == [result(client, f"det-{n}").json() for n in range(60)]
    assert any(body["seed"] > 2**53 for body in bodies)
    flags = [flag for body in bodies for flag in body["has_nsfw_concepts"]]
    assert any(flags) and not all(flags)


def test_model_spellings_and_namespaces_reach_the_same_result(client: httpx.Client) -> None:
    plain = result(client, "same-1").json()
    assert result(client, "same-1", "workflows/fal-ai/flux").json() == plain
    assert result(client, "same-1", "comfy/someone/graph").json() == plain
    assert result(client, "same-1", "auto").json() == plain  # a relay's placeholder model


def test_images_are_valid_and_deterministic(client: httpx.Client) -> None:
    """Every image decodes (Pillow), at the width and height its result declares, in the
    format its magic number says, and no two images are the same picture."""
    kinds: dict[bytes, int] = {}
    pictures: set[bytes] = set()
    for n in range(30):
        for image in result(client, f"img-{n}").json()["images"]:
            first = media(image["url"])
            assert first.status_code == 200
            assert media(image["url"]).content == first.content
            assert 20_000 < len(first.content) < 40_000
            magic = first.content[:3]
            kinds[magic] = kinds.get(magic, 0) + 1
            if first.content.startswith(PNG_MAGIC):
                assert_valid_png(first.content)
            elif magic == b"\xff\xd8\xff":
                assert first.content.endswith(b"\xff\xd9")
            else:
                data = first.content
                assert data[:4] == b"RIFF" and data[8:16] in (b"WEBPVP8 ", b"WEBPVP8X")
                assert struct.unpack("<I", data[4:8])[0] == len(data) - 8
            Image.open(io.BytesIO(first.content)).verify()
            with Image.open(io.BytesIO(first.content)) as picture:
                picture.load()
                assert picture.format == {b"\x89PN": "PNG", b"RIF": "WEBP"}.get(magic, "JPEG")
                assert picture.size == (image["width"], image["height"])
                pictures.add(picture.convert("RGB").resize((32, 32)).tobytes())
    assert set(kinds) == {b"\x89PN", b"\xff\xd8\xff", b"RIF"}
    assert len(pictures) == sum(kinds.values())


def test_same_seed_same_bytes_other_seed_other_bytes() -> None:
    def first_image(seed: int) -> bytes:
        with running_sandbox(SandboxConfig(seed=seed)) as sb, httpx.Client(headers=AUTH) as c:
            url = c.get(f"{sb.base_url}/a/b/requests/x1").json()["images"][0]["url"]
            return c.get(url).content

    assert first_image(7) == first_image(7)
    assert first_image(7) != first_image(8)


def test_distinct_requests_get_distinct_images_but_dup_ids_share_bytes(
    client: httpx.Client,
) -> None:
    def images(request_id: str) -> list[bytes]:
        return [media(i["url"]).content for i in result(client, request_id).json()["images"]]

    normal = images("one") + images("two") + images("three")
    assert len(set(normal)) == len(normal)
    dups = images("dup-1") + images("dup-2") + images("dup-x")
    assert len(dups) >= 3 and len(set(dups)) == 1
    dup_urls = [i["url"] for n in (1, 2) for i in result(client, f"dup-{n}").json()["images"]]
    assert len(set(dup_urls)) == len(dup_urls)  # different URLs, same bytes


@pytest.mark.parametrize(
    ("request_id", "status", "body"),
    [
        ("pending-1", 400, {"detail": "Request is still in progress"}),
        ("pending422-1", 422, {"detail": "Request is still in progress"}),
        ("missing-1", 404, {"status": "NOT_FOUND"}),
        (
            "fail-1",
            500,
            {"detail": "Internal error while running the model", "error_type": "internal_error"},
        ),
    ],
)
def test_prefixes_with_fixed_answers(
    client: httpx.Client, request_id: str, status: int, body: dict[str, Any]
) -> None:
    response = result(client, request_id)
    assert (response.status_code, response.json()) == (status, body)


def test_fail_prefix_carries_the_error_type_header(client: httpx.Client) -> None:
    assert result(client, "fail-9").headers["x-fal-error-type"] == "internal_error"


def test_invalid_prefix_answers_the_validation_fixture(client: httpx.Client) -> None:
    response = result(client, "invalid-1")
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert detail[0]["loc"] == ["body", "image_size"] and detail[0]["type"] == "type_error.enum"


def test_body_shape_prefixes(client: httpx.Client) -> None:
    empty = result(client, "empty-1").json()
    assert empty["images"] == [] and empty["has_nsfw_concepts"] == []

    inline = result(client, "inline-1").json()["images"]
    assert len(inline) == 1
    prefix = "data:image/png;base64,"
    assert inline[0]["url"].startswith(prefix)
    assert_valid_png(base64.b64decode(inline[0]["url"].removeprefix(prefix)))

    bad = result(client, "badjson-1")
    assert (bad.status_code, bad.content) == (200, b'{"images": [')

    shape = result(client, "badshape-1").json()
    assert isinstance(shape["images"], str) and isinstance(shape["seed"], str)

    short = result(client, "shortnsfw-1").json()
    assert len(short["images"]) == 3 and len(short["has_nsfw_concepts"]) == 1

    assert result(client, "nullseed-1").json()["seed"] is None

    echo = result(client, "echo-1", "fal-ai/flux").json()
    assert echo["request"]["model"] == "flux"
    for image in echo["images"]:
        assert "width" not in image and "height" not in image
        assert image["file_size"] == len(media(image["url"]).content)


def test_media_prefixes(client: httpx.Client, sandbox: Sandbox) -> None:
    def urls(request_id: str) -> list[str]:
        return [i["url"] for i in result(client, request_id).json()["images"]]

    for url in urls("expiredimg-1"):
        assert media(url).status_code == 404

    for url in urls("notimage-1"):
        response = media(url)
        assert response.status_code == 200
        assert response.headers["content-type"] == "image/png"
        assert response.content.startswith(b"<!DOCTYPE html>")

    locations = []
    for n in range(4):
        for url in urls(f"redirect-{n}"):
            hop = media(url)
            assert hop.status_code == 302
            locations.append(hop.headers["location"])
            final = media(url, follow_redirects=True)
            assert final.status_code == 200 and final.url != url
            assert final.content[:3] in (b"\x89PN", b"\xff\xd8\xff", b"RIF")
    assert any(loc.startswith("/media/") for loc in locations)
    assert any(loc.startswith(f"{sandbox.base_url}/media/") for loc in locations)

    for url in urls("badredirect-1"):
        hop = media(url)
        assert (hop.status_code, hop.headers["location"]) == (302, "ftp://127.0.0.1/x.png")

    for url in urls("mislabel-1"):
        response = media(url)
        assert url.endswith(".png") and response.headers["content-type"] == "image/png"
        assert response.content[:3] == b"\xff\xd8\xff"

    (big,) = urls("big-1")
    data = media(big).content
    assert 2_900_000 < len(data) < 3_100_000
    assert_valid_png(data)


def test_unknown_media_and_routes_answer_404_json(client: httpx.Client) -> None:
    for path in ("/media/nope.png", "/media/00000000-0000000000000000-pp-64x48-30000.jpeg", "/x"):
        response = client.get(path)
        assert response.status_code == 404 and "detail" in response.json()
    assert client.get("/fal-ai/flux/dev/requests/abc").status_code == 404


def test_status_endpoint(client: httpx.Client) -> None:
    done = client.get("/fal-ai/flux/requests/abc/status")
    assert (done.status_code, done.json()["status"]) == (200, "COMPLETED")
    assert done.json()["response_url"].endswith("/fal-ai/flux/requests/abc")
    running = client.get("/fal-ai/flux/requests/pending-1/status")
    assert (running.status_code, running.json()["status"]) == (202, "IN_PROGRESS")
    assert client.get("/fal-ai/flux/requests/missing-1/status").status_code == 404


def test_non_get_is_405(client: httpx.Client) -> None:
    response = client.post("/fal-ai/flux/requests/abc", json={})
    assert response.status_code == 405 and response.headers["allow"] == "GET"


# -- auth ----------------------------------------------------------------------------------


def test_wrong_or_missing_key_is_401(sandbox: Sandbox) -> None:
    url = f"{sandbox.base_url}/fal-ai/flux/requests/abc"
    for headers in ({}, {"Authorization": "Key wrong"}, {"Authorization": KEY}):
        response = httpx.get(url, headers=headers)
        assert (response.status_code, response.json()) == (401, {"detail": "Unauthorized"})
    assert httpx.get(url + "/status").status_code == 401


@pytest.mark.parametrize(
    ("scheme", "accepted", "rejected"),
    [
        ("any", ["Bearer", "Key", "bearer"], []),
        ("key", ["Key"], ["Bearer"]),
        ("bearer", ["Bearer"], ["Key"]),
    ],
)
def test_auth_schemes(scheme: str, accepted: list[str], rejected: list[str]) -> None:
    with running_sandbox(SandboxConfig(key="k1", auth_scheme=scheme)) as sb:
        url = f"{sb.base_url}/fal-ai/flux/requests/abc"
        for word in accepted:
            assert httpx.get(url, headers={"Authorization": f"{word} k1"}).status_code == 200
        for word in rejected:
            assert httpx.get(url, headers={"Authorization": f"{word} k1"}).status_code == 401
        assert sb.stats()["unauthorized"] == len(rejected)


def test_media_needs_no_key_and_counts_leaked_keys() -> None:
    with running_sandbox() as sb, httpx.Client(headers=AUTH) as api:
        urls = [i["url"] for i in api.get(f"{sb.base_url}/a/b/requests/leak").json()["images"]]
        for url in urls:
            assert httpx.get(url).status_code == 200
        assert sb.stats()["auth_leaks"] == 0
        assert api.get(urls[0]).status_code == 200  # the key went to the CDN
        stats = sb.stats()
        assert stats["auth_leaks"] == 1 and stats["media_requests"] == len(urls) + 1


# -- faults --------------------------------------------------------------------------------


def test_parse_fault_specs() -> None:
    spec = (
        "429=0.05,429ra=0.03,503=0.02,502html=0.03,reset=0.02,truncate=0.02,slow=0.02,"
        "pending=0.05,expired=0.01,badjson=0.01,notfound=0.01,failed=0.01"
    )
    rates = FaultRates.parse(spec)
    assert rates.rate_limit == 0.05 and rates.permanent_failure == 0.01
    assert rates.pending_then_done == 0.05 and rates.malformed_json == 0.01
    assert FaultRates.parse("") == FaultRates()
    assert FaultRates.parse(" rate_limit = 0.5 ") == FaultRates(rate_limit=0.5)

    mixed = FaultRates.parse("mixed=0.2")
    transient = (
        *("rate_limit", "rate_limit_retry_after", "server_error", "gateway_html"),
        *("reset", "truncate", "slow", "malformed_json"),
    )
    assert sum(getattr(mixed, name) for name in transient) == pytest.approx(0.2)
    assert mixed.pending_then_done == pytest.approx(0.05)
    assert 0 < mixed.permanent_not_found < 0.05
    assert FaultRates.parse("mixed=0.2,reset=0").reset == 0


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("bogus=0.1", "unknown fault 'bogus'"),
        ("429=1.5", "between 0 and 1"),
        ("429=-0.1", "between 0 and 1"),
        ("429=lots", "not a number"),
        ("429", "no '=RATE'"),
        ("429=0.6,503=0.6", "add up to 1.2"),
        ("pending=0.7,notfound=0.7", "per-request-id"),
    ],
)
def test_bad_fault_specs_name_the_problem(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match="fault") as info:
        FaultRates.parse(spec)
    assert message in str(info.value)
    if "unknown" in message:
        assert all(name in str(info.value) for name in [*FAULT_NAMES, "mixed"])


@given(st.dictionaries(st.sampled_from(sorted(FAULT_NAMES)), st.floats(0, 0.1), max_size=12))
def test_parse_round_trips(rates: dict[str, float]) -> None:
    spec = ",".join(f"{name}={value!r}" for name, value in rates.items())
    parsed = FaultRates.parse(spec)
    for name, value in rates.items():
        assert getattr(parsed, FAULT_NAMES[name]) == value


def test_config_is_checked() -> None:
    with pytest.raises(ValueError, match="auth_scheme"):
        SandboxConfig(auth_scheme="basic")
    with pytest.raises(ValueError, match=r"outside 0\.\.1"):
        FaultRates(reset=2.0)
    with pytest.raises(ValueError, match="port"):
        SandboxConfig(port=70_000)


def one_fault(**rates: float) -> SandboxConfig:
    return SandboxConfig(
        faults=FaultRates(**rates), slow_seconds=0.3, retry_after_seconds=2, key=KEY
    )


def test_rate_limit_faults() -> None:
    with running_sandbox(one_fault(rate_limit=1.0)) as sb, httpx.Client(headers=AUTH) as c:
        response = c.get(f"{sb.base_url}/a/b/requests/r")
        assert response.status_code == 429
        assert response.headers["x-fal-needs-retry"] == "1"
        assert "retry-after" not in response.headers
        assert response.json()["detail"] == "Too many concurrent requests"
    with (
        running_sandbox(one_fault(rate_limit_retry_after=1.0)) as sb,
        httpx.Client(headers=AUTH) as c,
    ):
        values = [c.get(f"{sb.base_url}/a/b/requests/r").headers["retry-after"] for _ in "ab"]
        assert "2" in values
        (date,) = [v for v in values if v != "2"]
        assert 1 <= parsedate_to_datetime(date).timestamp() - time.time() <= 3
        assert sb.stats()["rate_limited"] == 2 and sb.stats()["faults_injected"] == 2


def test_gateway_faults() -> None:
    with running_sandbox(one_fault(server_error=1.0)) as sb, httpx.Client(headers=AUTH) as c:
        response = c.get(f"{sb.base_url}/a/b/requests/r")
        assert response.status_code == 503
        assert response.json() == {"detail": "Service temporarily unavailable"}
    with running_sandbox(one_fault(gateway_html=1.0)) as sb, httpx.Client(headers=AUTH) as c:
        response = c.get(f"{sb.base_url}/a/b/requests/r")
        assert response.status_code == 502 and response.headers["content-type"] == "text/html"
        assert "<center>nginx</center>" in response.text
        assert "x-fal-request-id" not in response.headers


def test_malformed_json_and_slow_faults() -> None:
    cut = pytest.raises(httpx.RemoteProtocolError, match="without sending complete message body")
    with (
        running_sandbox(one_fault(malformed_json=1.0)) as sb,
        httpx.Client(headers=AUTH) as c,
        cut,  # the body is cut short on the wire
    ):
        c.get(f"{sb.base_url}/a/b/requests/r")
    with running_sandbox(one_fault(slow=1.0)) as sb, httpx.Client(headers=AUTH) as c:
        start = time.monotonic()
        assert c.get(f"{sb.base_url}/a/b/requests/r").status_code == 200
        assert time.monotonic() - start >= 0.3


def test_latency_applies_to_every_response() -> None:
    with running_sandbox(SandboxConfig(latency=0.2)) as sb:
        start = time.monotonic()
        assert httpx.get(f"{sb.base_url}/nowhere").status_code == 404
        assert time.monotonic() - start >= 0.2


def test_reset_fault_resets_the_connection() -> None:
    with running_sandbox(one_fault(reset=1.0)) as sb:
        port = int(sb.base_url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"GET /a/b/requests/r HTTP/1.1\r\nHost: x\r\nAuthorization: Key k\r\n\r\n")
            # 401 comes first: auth is checked before faults.
            assert sock.recv(65536).startswith(b"HTTP/1.1 401 ")
            sock.sendall(b"GET /a/b/requests/r HTTP/1.1\r\nHost: x\r\n" + auth_line() + b"\r\n")
            with pytest.raises(ConnectionResetError):
                sock.recv(65536)
        with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
            httpx.get(f"{sb.base_url}/a/b/requests/r", headers=AUTH)
        assert sb.stats()["fault_reset"] == 2


def test_truncate_fault_cuts_image_bodies_only() -> None:
    with running_sandbox(one_fault(truncate=1.0)) as sb, httpx.Client(headers=AUTH) as c:
        body = c.get(f"{sb.base_url}/a/b/requests/r").json()  # results are never truncated
        with pytest.raises(httpx.RemoteProtocolError):
            httpx.get(body["images"][0]["url"])
        assert sb.stats()["fault_truncate"] == 1


def test_pending_then_done() -> None:
    config = SandboxConfig(faults=FaultRates(pending_then_done=1.0))
    with running_sandbox(config) as sb, httpx.Client(headers=AUTH, base_url=sb.base_url) as c:
        status = c.get("/a/b/requests/p1/status")
        assert (status.status_code, status.json()["status"]) == (202, "IN_QUEUE")
        codes = [c.get("/a/b/requests/p1").status_code for _ in range(4)]
        assert codes == [400, 400, 200, 200]
        assert c.get("/a/b/requests/p1/status").json()["status"] == "COMPLETED"
        assert sb.stats()["pending_served"] == 2
    assert expected_status("p1", config) == "ok"


def test_known_request_ids() -> None:
    config = SandboxConfig(known_request_ids=frozenset({"a1", "fail-2"}))
    with running_sandbox(config) as sb, httpx.Client(headers=AUTH, base_url=sb.base_url) as c:
        assert c.get("/x/y/requests/a1").status_code == 200
        assert c.get("/x/y/requests/fail-2").status_code == 500
        assert c.get("/x/y/requests/a2").json() == {"status": "NOT_FOUND"}
    assert expected_status("a2", config) == "not_found"


PREFIX_IDS = [f"{prefix}{n}" for prefix in world.PREFIXES for n in range(2)]


def observe(client: httpx.Client, request_id: str) -> str:
    """What a careful harvester would record: retry transient trouble, re-poll pending."""
    body, pending = None, False
    for _ in range(40):
        try:
            response = client.get(f"/fal-ai/flux/requests/{request_id}")
        except httpx.TransportError:
            continue
        if response.status_code in (429, 502, 503):
            continue
        if response.status_code == 404:
            return "not_found"
        if response.content.endswith(b'still in progress"}'):
            pending = True
            continue
        if response.status_code != 200:
            return "failed"
        try:
            body = response.json()
        except json.JSONDecodeError:
            continue
        break
    if body is None:
        return "pending" if pending else "error"
    if not isinstance(body["images"], list) or not isinstance(body["seed"], int):
        return "error"
    for image in body["images"]:
        if image["url"].startswith("data:"):
            continue
        for _ in range(40):
            try:
                got = media(image["url"], follow_redirects=True)
                break
            except (httpx.TransportError, httpx.UnsupportedProtocol) as exc:
                if isinstance(exc, httpx.UnsupportedProtocol):
                    return "failed"
        if got.status_code != 200 or got.content[:3] not in (b"\x89PN", b"\xff\xd8\xff", b"RIF"):
            return "failed"
    return "ok"


def test_expected_status_matches_what_is_served_under_faults() -> None:
    config = SandboxConfig(
        key=KEY,
        seed=3,
        faults=FaultRates.parse("mixed=0.3,slow=0,pending=0.1,expired=0.1,notfound=0.1,failed=0.1"),
        retry_after_seconds=0,
    )
    ids = [f"r{n}" for n in range(150)] + PREFIX_IDS
    with running_sandbox(config) as sb, httpx.Client(headers=AUTH, base_url=sb.base_url) as c:
        seen = {request_id: observe(c, request_id) for request_id in ids}
        stats = sb.stats()
    expected = {request_id: expected_status(request_id, config) for request_id in ids}
    assert seen == expected
    assert set(expected.values()) == {"ok", "not_found", "failed", "error", "pending"}
    assert stats["faults_injected"] > 20 and stats["internal_errors"] == 0


# -- the wire ------------------------------------------------------------------------------


def auth_line() -> bytes:
    return f"Authorization: Bearer {KEY}\r\n".encode()


def raw_exchange(sandbox: Sandbox, request: bytes) -> bytes:
    """Send raw bytes, read until the server closes the connection."""
    port = int(sandbox.base_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_keep_alive_serves_many_requests_on_one_connection() -> None:
    with running_sandbox() as sb, httpx.Client(headers=AUTH, base_url=sb.base_url) as c:
        for n in range(200):
            assert c.get(f"/a/b/requests/k{n}").status_code == 200
        assert sb.stats()["connections"] == 1
        assert sb.stats()["result_requests"] == 200


def test_connection_close_is_honoured(sandbox: Sandbox) -> None:
    request = b"GET /a/b/requests/c1 HTTP/1.1\r\nHost: x\r\n" + auth_line()
    answer = raw_exchange(sandbox, request + b"Connection: close\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    assert b"\r\nConnection: close" in head
    assert f"Content-Length: {len(body)}".encode() in head
    # Two pipelined requests on one connection, the second one closing it.
    answer = raw_exchange(sandbox, request + b"\r\n" + request + b"Connection: close\r\n\r\n")
    assert answer.count(b"HTTP/1.1 200 OK") == 2
    # HTTP/1.0 closes unless asked to keep alive.
    answer = raw_exchange(sandbox, b"GET /nowhere HTTP/1.0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 404 ") and b"Connection: close" in answer


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GARBAGE\r\n\r\n", b"400"),
        (b"GET /x HTTP/1.1\r\nno colon here\r\n\r\n", b"400"),
        (b"GET /x HTTP/2.0\r\n\r\n", b"505"),
        (b"GET http://elsewhere/x HTTP/1.1\r\n\r\n", b"400"),
        (b"GET /x HTTP/1.1\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n", b"431"),
        (b"GET /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", b"400"),
        (b"GET /x HTTP/1.1\r\nContent-Length: 2000000\r\n\r\n", b"413"),
    ],
)
def test_malformed_requests_get_an_error_and_close(
    sandbox: Sandbox, request_bytes: bytes, status: bytes
) -> None:
    answer = raw_exchange(sandbox, request_bytes)
    assert answer.startswith(b"HTTP/1.1 " + status + b" ")
    assert b"Connection: close" in answer


def test_stats_endpoint(sandbox: Sandbox, client: httpx.Client) -> None:
    result(client, "s1")
    served = client.get("/__sandbox/stats").json()
    assert served["result_requests"] >= 1
    assert set(served) == set(sandbox.stats())


@pytest.mark.anyio
async def test_many_concurrent_connections() -> None:
    with running_sandbox() as sb:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(headers=AUTH, base_url=sb.base_url, limits=limits) as c:
            codes: list[int] = []

            async def fetch(n: int) -> None:
                codes.append((await c.get(f"/a/b/requests/c{n}")).status_code)

            async with anyio.create_task_group() as group:
                for n in range(128):
                    group.start_soon(fetch, n)
        assert codes == [200] * 128
        assert 32 <= sb.stats()["connections"] <= 64


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_serve_forever_stops_cleanly_on_a_signal(stop: signal.Signals) -> None:
    code = (
        "from harvester.sandbox import SandboxConfig, serve_forever\n"
        "serve_forever(SandboxConfig(), on_ready=lambda s: print(s.base_url, flush=True))\n"
        "print('stopped', flush=True)\n"
    )
    with subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True
    ) as process:
        assert process.stdout is not None
        base_url = process.stdout.readline().strip()
        assert httpx.get(f"{base_url}/a/b/requests/x", headers=AUTH).status_code == 200
        process.send_signal(stop)
        assert process.wait(timeout=10) == 0
        assert process.stdout.read() == "stopped\n"


def test_a_taken_port_raises_oserror() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = SandboxConfig(port=taken.getsockname()[1])
        with pytest.raises(OSError, match="in use"), running_sandbox(config):
            pass
        with pytest.raises(OSError, match="in use"):
            serve_forever(config)


# -- the world, without a server -----------------------------------------------------------


def test_world_is_pure_and_matches_the_server(client: httpx.Client, sandbox: Sandbox) -> None:
    served = result(client, "pure-1")
    status, _, body = world.result_for("flux", "pure-1", sandbox.base_url, sandbox.config)
    assert (status, body) == (served.status_code, served.content)
    for image in json.loads(body)["images"]:
        token = image["url"].rpartition("/")[2].rpartition(".")[0]
        data, content_type = world.image_for(token)
        assert data == media(image["url"]).content
        assert content_type == image["content_type"]
    with pytest.raises(ValueError, match="not a media token"):
        world.image_for("../etc/passwd")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--key", ""], "key must not be empty"),
        (["--image-bytes", "100"], "100 is not in the range x>=1000"),
        (["--faults", "429=2"], "rate must be between 0 and 1"),
        (["--faults", "mixed=0.9,reset=0.5"], "add up to"),
        (["--slow", "-1"], "-1.0 is not in the range x>=0"),
    ],
)
def test_sandbox_cli_turns_bad_options_into_usage_errors(args: list[str], message: str) -> None:
    result = CliRunner().invoke(main, ["sandbox", "--port", "0", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


HIDE_PILLOW: Final = (
    "import sys\n"
    "sys.modules['PIL'] = None  # import PIL raises ImportError, as in a plain install\n"
    "from harvester.cli import main\n"
    "main(['sandbox', '--port', '0'])\n"
)


def test_without_pillow_the_sandbox_serves_only_images_that_decode(client: httpx.Client) -> None:
    """``harvester sandbox`` without Pillow (a plain install) says so once when it starts and
    serves PNG for every image, each decoding at its declared size; a JPEG or WebP URL (another
    sandbox's) is a 404, never a file that does not decode."""
    from harvester.sandbox.images import missing_encoder_note

    assert missing_encoder_note() is None  # Pillow is here: nothing to say
    with subprocess.Popen(
        [sys.executable, "-c", HIDE_PILLOW], stderr=subprocess.PIPE, text=True
    ) as process:
        try:
            assert process.stderr is not None
            first = process.stderr.readline()
            base_url = first.split()[3]
            lines = [process.stderr.readline() for _ in range(2)]
            assert lines[1].startswith("sandbox: Pillow is not installed, so every image is a PNG")
            with httpx.Client(base_url=base_url, headers=AUTH, timeout=10) as plain:
                formats: dict[str, int] = {}
                for request_id in [f"img-{n}" for n in range(30)] + ["mislabel-1", "echo-1"]:
                    for image in result(plain, request_id).json()["images"]:
                        served = media(image["url"])
                        assert served.status_code == 200
                        assert served.headers["content-type"] == image["content_type"]
                        with Image.open(io.BytesIO(served.content)) as picture:
                            picture.load()
                            formats[picture.format or ""] = formats.get(picture.format or "", 0) + 1
                            if "width" in image:
                                assert picture.size == (image["width"], image["height"])
                assert formats.keys() == {"PNG"} and sum(formats.values()) > 30
                elsewhere = [
                    i["url"]
                    for n in range(30)
                    for i in result(client, f"img-{n}").json()["images"]
                    if not i["url"].endswith(".png")
                ]
                assert elsewhere  # the sandbox with Pillow hands out JPEG and WebP URLs
                for url in elsewhere[:3]:
                    path = url.split("/media/", 1)[1]
                    assert media(f"{base_url}/media/{path}").status_code == 404
        finally:
            process.send_signal(signal.SIGINT)
            process.wait(timeout=10)
        assert process.stderr.read().count("Pillow is not installed") == 0

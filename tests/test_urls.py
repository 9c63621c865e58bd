"""Result URLs: only [namespace/]owner/app go into the path; unsafe ids are refused."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from yarl import URL

from harvester.api.urls import (
    AppId,
    UnsafeIdError,
    check_segment,
    describe_url,
    http_url,
    redirect_target,
    request_path,
    result_url,
)

BASE = "https://relay.test/api"


@pytest.mark.parametrize(
    ("model", "path"),
    [
        ("fal-ai/flux/dev", "fal-ai/flux"),
        ("fal-ai/flux", "fal-ai/flux"),
        ("fal-ai/flux-pro/v1.1-ultra", "fal-ai/flux-pro"),
        ("fal-ai/flux-lora/image-to-image/extra", "fal-ai/flux-lora"),
        ("workflows/acme/upscale", "workflows/acme/upscale"),
        ("workflows/acme/upscale/v2", "workflows/acme/upscale"),
        ("comfy/acme/graph", "comfy/acme/graph"),
        ("auto", "auto"),
    ],
)
def test_app_path(model: str, path: str) -> None:
    assert AppId.from_model(model).path == path
    assert result_url(BASE, request_path(model, "abc-123")) == f"{BASE}/{path}/requests/abc-123"


def test_trailing_slash_in_base_is_ignored() -> None:
    assert (
        result_url(BASE + "/", request_path("fal-ai/flux", "x")) == f"{BASE}/fal-ai/flux/requests/x"
    )


@pytest.mark.parametrize(
    "request_id",
    ["", ".", "..", "a/b", "../x", "a\\b", "a b", "a?b", "a#b", "a%2Fb", "a\x00", "é", "a\nb"],
)
def test_unsafe_request_ids_are_refused(request_id: str) -> None:
    with pytest.raises(UnsafeIdError):
        result_url(BASE, request_path("fal-ai/flux", request_id))


@pytest.mark.parametrize(
    "model", ["", "fal-ai//flux", "fal-ai/../flux", "workflows/acme", "a b/c", "fal-ai/flux?x"]
)
def test_unsafe_models_are_refused(model: str) -> None:
    with pytest.raises(UnsafeIdError):
        AppId.from_model(model)


@given(st.text())
def test_a_safe_segment_never_changes_the_path_shape(value: str) -> None:
    try:
        check_segment(value, "request_id")
    except UnsafeIdError:
        return
    url = result_url(BASE, request_path("fal-ai/flux/dev", value))
    assert url.count("/") == BASE.count("/") + 4
    assert url.endswith("/requests/" + value)
    assert value not in {".", ".."}


@given(st.lists(st.from_regex(r"[a-z0-9][a-z0-9.-]{0,12}", fullmatch=True), min_size=2, max_size=5))
def test_model_and_its_app_share_a_url(segments: list[str]) -> None:
    model = "/".join(segments)
    app = "/".join(segments[:2])
    if segments[0] in ("workflows", "comfy") or ".." in segments or "." in segments:
        return
    assert result_url(BASE, request_path(model, "r")) == result_url(BASE, request_path(app, "r"))


def test_describe_url_hides_data_payloads() -> None:
    assert describe_url("data:image/png;base64,iVBORw0KGgo=") == "data:image/png"
    assert describe_url("DATA:,hello") == "data:text/plain"
    assert describe_url("https://v3.fal.media/files/x.png") == "https://v3.fal.media/files/x.png"


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("https://user:pw@cdn.test/a.png", "user name or password"),
        (f"https://{'a' * 64}.test/a.png", "longer than DNS allows"),
        (f"https://{'a.' * 127}test/a.png", "longer than DNS allows"),
        ("ftp://cdn.test/a.png", "unsupported"),
    ],
)
def test_image_urls_that_cannot_be_fetched_are_refused(url: str, reason: str) -> None:
    """Each becomes the row's reason; none reaches the resolver or aiohttp, which raise
    (UnicodeError, ValueError) where a row is expected."""
    refusal = http_url(url)
    assert isinstance(refusal, str)
    assert reason in refusal
    target = redirect_target(URL("https://cdn.test/x"), url)
    assert isinstance(target, str)
    assert reason in target


@pytest.mark.parametrize(
    ("url", "sent"),
    [
        # RFC 3986 text travels exactly as written: a signed URL's escapes never change.
        (
            "https://cdn.test/a%2fb.png?sig=%2B%2F%3D&x=%41",
            "https://cdn.test/a%2fb.png?sig=%2B%2F%3D&x=%41",
        ),
        # Anything else: only what RFC 3986 does not allow is escaped; the escapes stay.
        ("https://cdn.test/ü.png?sig=%2B%2F%3D", "https://cdn.test/%C3%BC.png?sig=%2B%2F%3D"),
        ("https://cdn.test/a b%zz.png?y=^", "https://cdn.test/a%20b%25zz.png?y=%5E"),
        ("https://bücher.test/ä.png", "https://xn--bcher-kva.test/%C3%A4.png"),
    ],
)
def test_image_urls_are_sent_as_written_but_for_what_must_be_escaped(url: str, sent: str) -> None:
    checked = http_url(url)
    assert not isinstance(checked, str), checked
    assert str(checked) == sent
    target = redirect_target(URL("https://cdn.test/start"), url)
    assert not isinstance(target, str) and str(target) == sent


def test_an_image_host_with_a_space_is_malformed() -> None:
    refusal = http_url("https://ex ample.test/a.png")
    assert isinstance(refusal, str) and "malformed" in refusal

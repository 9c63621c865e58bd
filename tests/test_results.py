"""Result bodies: the seed schema and every fixture shape, parsed or refused clearly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harvester.api.results import ResultShapeError, error_detail, parse_result

FIXTURES = Path(__file__).parent / "fixtures"


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def test_flux_dev_result() -> None:
    result = parse_result(fixture("result_ok_flux_dev.json"))
    assert result.seed == 3207449837
    assert result.inference_seconds == pytest.approx(1.2249955059960485)
    (image,) = result.images
    assert (image.width, image.height, image.content_type) == (1024, 768, "image/png")
    assert image.has_nsfw_concept is False
    assert json.loads(result.timings or "") == {"inference": 1.2249955059960485}


def test_seed_example_keeps_empty_timings_and_unicode_prompt() -> None:
    result = parse_result(fixture("result_ok_seed_example.json"))
    assert result.timings == "{}"
    assert result.inference_seconds is None
    assert result.prompt is not None
    assert "FLUX" in result.prompt


def test_multi_nsfw_and_seed_above_2_53() -> None:
    result = parse_result(fixture("result_ok_multi_nsfw.json"))
    assert result.seed == 9007199254740993
    assert [i.has_nsfw_concept for i in result.images] == [False, True, False]


def test_relay_echo_ignores_unknown_keys() -> None:
    result = parse_result(fixture("result_ok_relay_echo.json"))
    (image,) = result.images
    assert (image.width, image.height) == (None, None)


def test_no_images_and_data_uri() -> None:
    assert parse_result(fixture("result_ok_no_images.json")).images == ()
    (image,) = parse_result(fixture("result_ok_data_uri.json")).images
    assert image.url.startswith("data:image/png;base64,")


def test_fewer_nsfw_flags_than_images_is_noted_not_fatal() -> None:
    body = json.dumps(
        {
            "images": [{"url": "https://x/a"}, {"url": "https://x/b"}],
            "seed": 1,
            "has_nsfw_concepts": [True],
            "prompt": "p",
            "timings": {},
        }
    )
    result = parse_result(body.encode())
    assert [i.has_nsfw_concept for i in result.images] == [True, None]
    assert result.note == "has_nsfw_concepts has 1 entries for 2 images"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"images": "x", "seed": 1}, "'images' is str, expected a list"),
        ({"images": [], "seed": "1"}, "'seed' is str, expected an integer"),
        ({"images": [], "seed": None}, "'seed' is null"),
        ({"images": [], "seed": True}, "'seed' is bool"),
        ({"images": [None], "seed": 1}, "images[0] is null"),
        ({"images": [{"content_type": "x"}], "seed": 1}, "images[0].url is null"),
        ({"images": [], "seed": 1, "timings": []}, "'timings' is list"),
        ({"images": [], "seed": 1, "prompt": 3}, "'prompt' is int"),
        ([], "result is a JSON list"),
    ],
)
def test_wrong_shapes_say_what_is_wrong(body: object, message: str) -> None:
    with pytest.raises(ResultShapeError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_result(json.dumps(body).encode())


def test_invalid_json_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="not valid JSON"):
        parse_result(b'{"images": [')


@pytest.mark.parametrize(
    ("name", "detail"),
    [
        ("result_pending.json", "Request is still in progress"),
        ("result_not_found.json", "NOT_FOUND"),
        ("result_model_error_500.json", "Internal error while running the model"),
        ("unauthorized_401.json", "Unauthorized"),
        ("rate_limited_429.json", "Too many concurrent requests"),
        ("gateway_502.html", None),
    ],
)
def test_error_detail(name: str, detail: str | None) -> None:
    assert error_detail(fixture(name)) == detail


def test_validation_detail_list_is_joined() -> None:
    detail = error_detail(fixture("result_validation_error_422.json"))
    assert detail is not None
    assert detail.startswith("body.image_size: value is not a valid enumeration member")


@pytest.mark.parametrize("seed", [2**63 - 1, 2**63, 2**64 + 5, 10**30, -(2**63) - 1])
def test_a_seed_of_any_size_is_kept_exactly(seed: int) -> None:
    result = parse_result(json.dumps({"images": [], "seed": seed}).encode())
    assert result.seed_text == str(seed)
    assert result.seed == (seed if -(2**63) <= seed < 2**63 else None)

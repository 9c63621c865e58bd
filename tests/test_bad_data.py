"""Bad data (issue item 8): a clear per-row error or a clear run error, never a traceback.

CSV problems are exercised through the CLI; result bodies of the wrong shape come from the
sandbox's prefixes (``badjson-``, ``badshape-``, ``shortnsfw-``, ``nullseed-``).
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from harvester.errors import ExitCode
from harvester.run.reader import MAX_LINE_CHARS
from harvester.sandbox import Sandbox, expected_status
from harvester.storage.manifest import manifest_glob
from tests.conftest import harvest_args, run_cli

PNG_HEAD = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (PNG_HEAD, "looks like a binary file, not a CSV export"),
        (b"model,request_id\nfal-ai/flux,a1\n" + bytes(range(256)) * 8, "looks like a binary"),
        (
            "model,request_id\nfal-ai/flux,a1\n".encode("utf-16"),
            "is UTF-16 text (a spreadsheet's 'Unicode text' export?); save it as 'CSV UTF-8'",
        ),
        (b"", "is empty: expected a header row with 'model' and 'request_id'"),
        (b"\xff\xd8\xff\xe0 not a csv\n", "has no 'model' or 'request_id' column"),
    ],
    ids=["png", "binary-tail", "utf-16", "empty", "jpeg-bytes"],
)
def test_an_unusable_csv_is_a_clear_input_error(
    tmp_path: Path, sandbox: Sandbox, content: bytes, message: str
) -> None:
    csv = tmp_path / "export.csv"
    csv.write_bytes(content)
    before = sandbox.stats()["result_requests"]

    result = run_cli(harvest_args(sandbox, tmp_path / "out", csv))

    assert result.exit_code == ExitCode.INPUT
    assert result.output.startswith(f"harvester: error: {csv} ")
    assert message in result.output
    assert result.output.count("\n") == 1 and "Traceback" not in result.output
    assert sandbox.stats()["result_requests"] == before


def test_bad_rows_are_invalid_rows_and_the_rest_is_harvested(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    csv = tmp_path / "export.csv"
    with csv.open("wb") as fh:
        fh.write(b"model,request_id\n")
        fh.write(b"fal-ai/flux,good-1\n")
        fh.write(b"fal-ai/flux,caf\xe9-latin1\n")  # line 3: not UTF-8
        fh.write(b"fal-ai/flux," + b"x" * (MAX_LINE_CHARS * 20) + b"\n")  # line 4: 1.3 MB
        fh.write(b"fal-ai/flux,good-2\n")
        fh.write(b"fal-ai/flux,\n")  # line 6
        fh.write(b"\x00\x01\x02,\x03\n".rjust(9000, b" "))  # line 7: NUL, past the sniffed head
        fh.write(b"fal-ai/flux,good-3\n")

    result = run_cli(harvest_args(sandbox, tmp_path / "out", csv))

    assert result.exit_code == ExitCode.INCOMPLETE, result.output
    assert "Traceback" not in result.output
    assert "by status:  ok 3, invalid 4" in result.output
    df = pl.read_parquet(manifest_glob(tmp_path / "out"))
    errors = dict(
        df.filter(pl.col("status") == "invalid").select("source_line", "error").iter_rows()
    )
    assert errors == {
        3: f"{csv}:3: not valid UTF-8",
        4: f"{csv}:4: line longer than {MAX_LINE_CHARS} characters",
        6: f"{csv}:6: missing request_id",
        7: f"{csv}:7: model segment '\\x00\\x01\\x02' contains '\\x00', which is not allowed "
        "in a URL path",
    }
    assert set(df.filter(pl.col("status") == "ok")["request_id"]) == {
        "good-1",
        "good-2",
        "good-3",
    }


def test_results_of_the_wrong_shape_are_clear_row_errors(tmp_path: Path, sandbox: Sandbox) -> None:
    ids = ["badjson-1", "badshape-1", "nullseed-1", "shortnsfw-1", "ok-shape-1"]
    csv = tmp_path / "export.csv"
    csv.write_text("model,request_id\n" + "".join(f"fal-ai/flux,{rid}\n" for rid in ids))

    result = run_cli(harvest_args(sandbox, tmp_path / "out", csv, extra=["--max-attempts", "2"]))

    assert result.exit_code == ExitCode.INCOMPLETE
    assert "Traceback" not in result.output
    df = pl.read_parquet(manifest_glob(tmp_path / "out"))
    first = {row["request_id"]: row for row in df.unique("request_id").iter_rows(named=True)}
    for rid in ids:
        assert first[rid]["request_status"] == expected_status(rid, sandbox.config), rid
    assert first["badjson-1"]["error"].startswith("result is not valid JSON (")
    assert first["badjson-1"]["error"].endswith("(gave up after 2 attempts)")
    assert first["badshape-1"]["error"] == (
        "result has the wrong shape: 'images' is str, expected a list"
    )
    assert first["nullseed-1"]["error"] == (
        "result has the wrong shape: 'seed' is null, expected an integer"
    )
    # Fewer NSFW flags than images is noted, and the images are kept, their flags null.
    short = df.filter(pl.col("request_id") == "shortnsfw-1").sort("image_index")
    assert short["status"].to_list() == ["ok", "ok", "ok"]
    assert short["has_nsfw_concept"].to_list()[1:] == [None, None]
    assert set(short["error"]) == {"has_nsfw_concepts has 1 entries for 3 images"}


@pytest.mark.parametrize(
    ("base_url", "message"),
    [
        ("http://[::1", "is not a valid URL (Invalid port: ':1')"),
        ("https://xn--/", "is not a valid URL (Malformed A-label"),
        ("ftp://relay.test", "must be an http:// or https:// URL"),
    ],
)
def test_a_malformed_base_url_is_a_usage_error(tmp_path: Path, base_url: str, message: str) -> None:
    csv = tmp_path / "e.csv"
    csv.write_text("model,request_id\nfal-ai/flux,a1\n")
    result = run_cli(["harvest", str(csv), "--out", str(tmp_path / "out"), "--base-url", base_url])
    assert result.exit_code == ExitCode.USAGE
    assert result.output.startswith(f"harvester: error: --base-url {base_url!r} ")
    assert message in result.output
    assert not (tmp_path / "out").exists()

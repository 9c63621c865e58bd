"""Nothing a relay sends can lose a night (issue 12): each case is served by the hostile
relay in ``tests/hostile.py`` to the real CLI, and every run keeps the invariants of
``check_invariants``."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from harvester.errors import ExitCode
from tests.hostile import Answer, check_invariants, harvest, hostile_server, result_body, write_ids

KEY = "3f1c0a7e-1111-2222-3333-444455556666:9a8b7c6d5e4f3a2b1c0d"
"""A fal-shaped key (``id:secret``): each part alone must stay home too."""
KEY_ID, KEY_SECRET = KEY.split(":")


def rows(df: pl.DataFrame, rid: str) -> list[dict[str, object]]:
    return df.filter(pl.col("request_id") == rid).sort("image_index").to_dicts()


def test_a_lone_surrogate_is_stored_repaired_and_the_run_goes_on(tmp_path: Path) -> None:
    with hostile_server({}) as srv:
        image = {"url": f"{srv.base_url}/img/a.png", "content_type": "image/\ud800png"}
        srv.script.update(
            {
                "surr-prompt": Answer(result_body(prompt="a \ud800 cat")),
                "surr-ct": Answer(result_body(images=[image])),
                "surr-detail": Answer(
                    json.dumps({"detail": "bad \udfff input"}), status=422, reason="Bad"
                ),
                "fine-1": Answer(result_body()),
            }
        )
        csv = write_ids(tmp_path / "e.csv", list(srv.script))
        out = tmp_path / "out"
        run = harvest(srv, out, csv, key=KEY)
        assert run.returncode == ExitCode.INCOMPLETE, run.stderr
        df = check_invariants(out, csv, run, key=KEY)
        [prompt] = rows(df, "surr-prompt")
        assert prompt["status"] == "ok"
        assert prompt["prompt"] == "a \ufffd cat"
        assert prompt["altered"] is True
        assert "text that is not valid Unicode was repaired" in str(prompt["error"])
        [ct] = rows(df, "surr-ct")
        assert ct["status"] == "ok" and ct["content_type"] == "image/\ufffdpng"
        assert ct["altered"] is True
        [detail] = rows(df, "surr-detail")
        assert detail["status"] == "failed" and "bad \ufffd input" in str(detail["error"])
        [fine] = rows(df, "fine-1")
        assert fine["altered"] is False and fine["error"] is None
        # A rerun does not crash either (the failed pairs are asked again).
        again = harvest(srv, out, csv, key=KEY)
        assert again.returncode == ExitCode.INCOMPLETE, again.stderr
        check_invariants(out, csv, again, key=KEY)


def test_deeply_nested_json_is_a_row_error_not_the_end_of_the_run(tmp_path: Path) -> None:
    deep = "[" * 100_000 + "]" * 100_000
    with hostile_server({}) as srv:
        srv.script.update(
            {
                "deep-result": Answer(deep),
                "deep-404": Answer(deep, status=404, reason="Not Found"),
                "deep-500": Answer(deep, status=500, reason="Oops"),
                "deep-detail": Answer('{"detail": ' + deep + "}", status=400, reason="Bad"),
                "deep-timings": Answer(result_body()[:-1] + ', "timings": {"a": ' + deep + "}}"),
                "deep-ok-detail": Answer('{"detail": ' + deep + "}"),
                "fine-2": Answer(result_body()),
            }
        )
        csv = write_ids(tmp_path / "e.csv", list(srv.script))
        out = tmp_path / "out"
        run = harvest(srv, out, csv, key=KEY)
        assert run.returncode == ExitCode.INCOMPLETE, run.stderr
        df = check_invariants(out, csv, run, key=KEY)
        for rid in srv.script:
            [row] = rows(df, rid)
            if rid == "fine-2":
                assert row["status"] == "ok"
                continue
            assert row["status"] != "ok", rid
            assert "nested too deeply" in str(row["error"]) or rid == "deep-404", (rid, row)
        again = harvest(srv, out, csv, key=KEY)
        assert again.returncode == ExitCode.INCOMPLETE, again.stderr
        check_invariants(out, csv, again, key=KEY)

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


def test_the_key_stays_home_whatever_the_relay_echoes(tmp_path: Path) -> None:
    cut = "e" * 105 + " " + KEY_SECRET + " " + KEY  # the 120-character cut lands in a secret
    partial = [KEY_ID, KEY_SECRET, KEY_ID[:8], KEY_SECRET[:8]]
    with hostile_server({}) as srv:
        img = f"{srv.base_url}/img"
        images = [
            {"url": f"{img}/ok.png"},
            {"url": f"{img}/a.png?key={KEY}"},
            {"url": f"{img}/b.png?id={KEY_ID}"},
            {"url": f"{img}/c.png?s=%39{KEY_SECRET[1:]}"},  # '9' percent-encoded
        ]
        srv.script.update(
            {
                "echo-502": Answer(b"", status=502, reason=f"Bad Gateway (Bearer {KEY})"),
                "echo-503": Answer(b"", status=503, reason=f"Busy {KEY_ID}"),
                "echo-400": Answer(cut, status=400, reason="Bad Request"),
                "echo-detail": Answer(json.dumps({"detail": cut}), status=400, reason="Bad"),
                "echo-prompt": Answer(result_body(prompt=f"a cat, key {KEY} id {KEY_ID}")),
                "echo-url": Answer(result_body(images=images)),
            }
        )
        csv = write_ids(tmp_path / "e.csv", list(srv.script))
        out = tmp_path / "out"
        run = harvest(srv, out, csv, key=KEY, extra=["--auth-scheme", "key"])
        assert run.returncode == ExitCode.INCOMPLETE, run.stderr
        df = check_invariants(out, csv, run, key=KEY, secrets=partial)
        # No URL that carries the key, or a part of it, went out.
        sent = b"".join(head.split(b"\r\n", 1)[0] for head in srv.seen).decode()
        assert "/img/ok.png" in sent
        assert "/img/a.png" not in sent and "/img/b.png" not in sent and "/img/c.png" not in sent
        url_rows = rows(df, "echo-url")
        assert [r["status"] for r in url_rows] == ["ok", "failed", "failed", "failed"]
        for r in url_rows[1:]:
            assert "contains the API key" in str(r["error"]), r
        [prompt] = rows(df, "echo-prompt")
        assert prompt["prompt"] == "a cat, key *** id ***" and prompt["altered"] is True
        report = tmp_path / "report.html"
        html = harvest_report(out, report)
        for secret in [KEY, *partial]:
            assert secret not in html

        # A 401 whose detail echoes the key id: not in stderr, nor in the run record.
        srv.script["echo-401"] = Answer(
            json.dumps({"detail": f"Key {KEY_ID} is not valid"}), status=401, reason="No"
        )
        csv2 = write_ids(tmp_path / "e2.csv", ["echo-401"])
        run = harvest(srv, tmp_path / "out2", csv2, key=KEY)
        assert run.returncode == ExitCode.AUTH, run.stderr
        assert "refused the key" in run.stderr
        record = (tmp_path / "out2" / "runs").glob("*.json")
        for text in [run.stdout, run.stderr, *(p.read_text() for p in record)]:
            for secret in [KEY, *partial]:
                assert secret not in text


def test_a_redirect_status_without_a_location_costs_one_row(tmp_path: Path) -> None:
    """A caching proxy's 304 to a result request, an image host's 303 without a Location:
    each is one row with its status (the result: error, the image: failed); the run goes
    on, and no image request carries the key, on the API's own origin either."""
    with hostile_server({}) as srv:
        srv.images["see-other.png"] = Answer(b"", status=303, reason="See Other", headers={})
        images = [
            {"url": f"{srv.base_url}/img/see-other.png"},
            {"url": f"{srv.base_url}/img/a.png"},
        ]
        srv.script.update(
            {
                "not-modified": Answer(b"", status=304, reason="Not Modified"),
                "image-303": Answer(result_body(images=images)),
                "fine-4": Answer(result_body()),
            }
        )
        csv = write_ids(tmp_path / "e.csv", list(srv.script))
        out = tmp_path / "out"
        run = harvest(srv, out, csv, key=KEY)
        assert run.returncode == ExitCode.INCOMPLETE, run.stderr
        df = check_invariants(out, csv, run, key=KEY)
    [result] = rows(df, "not-modified")
    assert (result["status"], result["http_status"]) == ("error", 304)
    assert "HTTP 304, not a redirect to follow" in str(result["error"])
    see_other, fine_image = rows(df, "image-303")
    assert (see_other["status"], see_other["http_status"]) == ("failed", 303)
    assert "HTTP 303 without a Location" in str(see_other["error"])
    assert fine_image["status"] == "ok" and see_other["request_status"] == "failed"
    [fine] = rows(df, "fine-4")
    assert fine["status"] == "ok"
    image_heads = [head for head in srv.seen if head.startswith(b"GET /img/")]
    assert len(image_heads) == 2
    assert not any(b"authorization" in head.lower() for head in image_heads)


def harvest_report(out: Path, report: Path) -> str:
    import subprocess
    import sys

    from tests.processes import harvester_env

    subprocess.run(
        [sys.executable, "-m", "harvester", "report", str(out), "--html", str(report)],
        check=True,
        capture_output=True,
        env=harvester_env(None),
        timeout=120,
    )
    return report.read_text()


def test_seeds_of_any_size_are_kept_and_timings_are_valid_json(tmp_path: Path) -> None:
    seeds = {
        "seed-small": "7",
        "seed-max": str(2**63 - 1),
        "seed-2-63": str(2**63),
        "seed-2-64-5": str(2**64 + 5),
        "seed-1e30": str(10**30),
        "seed-neg": str(-(2**63) - 1),
        "seed-huge": "9" * 5000,  # past Python's 4,300-digit int parsing limit
    }
    with hostile_server({}) as srv:
        for rid, seed in seeds.items():
            srv.script[rid] = Answer('{"images": [], "prompt": "p", "seed": ' + seed + "}")
        srv.script["inf-timings"] = Answer(
            '{"images": [], "seed": 1, "timings": {"inference": 1e400, "x": NaN, "y": 0.5}}'
        )
        csv = write_ids(tmp_path / "e.csv", list(srv.script))
        out = tmp_path / "out"
        run = harvest(srv, out, csv, key=KEY)
        assert run.returncode == ExitCode.OK, run.stderr
        df = check_invariants(out, csv, run, key=KEY)
        for rid, seed in seeds.items():
            [row] = rows(df, rid)
            assert row["status"] == "ok", row
            assert row["seed_text"] == seed
            fits = len(seed) < 30 and -(2**63) <= int(seed) < 2**63
            assert row["seed"] == (int(seed) if fits else None)
        [inf] = rows(df, "inf-timings")
        assert json.loads(str(inf["timings"])) == {"inference": None, "x": None, "y": 0.5}
        assert inf["inference_seconds"] is None and inf["altered"] is True
        assert "non-finite numbers in timings stored as null" in str(inf["error"])
        decoded = df["timings"].str.json_decode(pl.Struct({"inference": pl.Float64}))
        assert decoded.len() == df.height


def test_sizes_are_capped_per_result_and_per_text(tmp_path: Path) -> None:
    import base64

    from harvester.api.results import MAX_IMAGES_PER_RESULT, MAX_TEXT_CHARS
    from tests.hostile import IMAGE

    data_uri = "data:image/png;base64," + base64.b64encode(IMAGE).decode()
    many = MAX_IMAGES_PER_RESULT + 7
    with hostile_server({}) as srv:
        srv.script.update(
            {
                "many-images": Answer(result_body(images=[{"url": data_uri}] * many)),
                "big-prompt": Answer(result_body(prompt="p" * 1_000_000)),
                "big-detail": Answer(json.dumps({"detail": "d" * 1_000_000}), status=400),
                "big-type": Answer(
                    result_body(images=[{"url": data_uri, "content_type": "t" * 100_000}])
                ),
                "big-timings": Answer(result_body(timings={"x": "t" * 1_000_000})),
            }
        )
        csv = write_ids(tmp_path / "e.csv", list(srv.script))
        out = tmp_path / "out"
        run = harvest(srv, out, csv, key=KEY)
        assert run.returncode == ExitCode.INCOMPLETE, run.stderr
        df = check_invariants(out, csv, run, key=KEY)
    images = rows(df, "many-images")
    assert len(images) == many
    assert [r["status"] for r in images].count("ok") == MAX_IMAGES_PER_RESULT
    rest = images[MAX_IMAGES_PER_RESULT:]
    assert {r["status"] for r in rest} == {"failed"}
    assert f"only the first {MAX_IMAGES_PER_RESULT:,} are fetched" in str(rest[0]["error"])
    [prompt] = rows(df, "big-prompt")
    assert prompt["status"] == "ok" and prompt["altered"] is True
    assert prompt["prompt"] == "p" * MAX_TEXT_CHARS
    assert "prompt truncated to 65,536 of 1,000,000 characters" in str(prompt["error"])
    [detail] = rows(df, "big-detail")
    assert detail["status"] == "failed" and len(str(detail["error"])) <= MAX_TEXT_CHARS + 100
    [ctype] = rows(df, "big-type")
    assert ctype["status"] == "ok" and len(str(ctype["content_type"])) <= MAX_TEXT_CHARS
    [timings] = rows(df, "big-timings")
    assert timings["timings"] is None and "timings" in str(timings["error"])


def test_a_symlinked_tmp_is_refused_and_its_target_kept(tmp_path: Path) -> None:
    target = tmp_path / "precious"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    out = tmp_path / "out"
    out.mkdir()
    (out / ".tmp").symlink_to(target)
    with hostile_server({"fine-3": Answer(result_body())}) as srv:
        csv = write_ids(tmp_path / "e.csv", ["fine-3"])
        run = harvest(srv, out, csv, key=KEY)
    assert run.returncode == ExitCode.OUTPUT, run.stderr
    assert f"{out / '.tmp'} is a symbolic link" in run.stderr
    assert "Traceback" not in run.stderr
    assert [p.name for p in target.iterdir()] == ["keep.txt"]


def test_the_report_never_follows_links_out_of_dir_and_caps_prompts(tmp_path: Path) -> None:
    import base64

    outside = tmp_path / "outside.png"
    outside.write_bytes(b"\x89PNG\r\n\x1a\n" + b"private bytes of someone else " * 20)
    with hostile_server({}) as srv:
        srv.script["img-1"] = Answer(
            result_body(images=[{"url": f"{srv.base_url}/img/x.png"}], prompt="q" * 300_000)
        )
        csv = write_ids(tmp_path / "e.csv", ["img-1"])
        out = tmp_path / "out"
        run = harvest(srv, out, csv, key=KEY)
        assert run.returncode == ExitCode.OK, run.stderr
        df = check_invariants(out, csv, run, key=KEY)
    [row] = rows(df, "img-1")
    stored = out / str(row["path"])
    stored.unlink()
    stored.symlink_to(outside)
    html = harvest_report(out, tmp_path / "report.html")
    assert base64.b64encode(outside.read_bytes()).decode()[:40] not in html
    assert "links out of the output folder" in html
    assert "q" * 2_000 not in html and len(html) < 200_000


def test_an_unterminated_quote_in_the_export_loses_no_other_row(tmp_path: Path) -> None:
    ids = [f"q-{i:04d}" for i in range(300)]
    csv = tmp_path / "e.csv"
    lines = [f"fal-ai/flux,{rid}" for rid in ids]
    lines[48] = 'fal-ai/flux,"q-broken'  # line 50 of the file; the quote is never closed
    csv.write_text("model,request_id\n" + "\n".join(lines) + "\n")
    with hostile_server({rid: Answer(result_body()) for rid in ids}) as srv:
        run = harvest(srv, tmp_path / "out", csv, key=KEY)
    assert run.returncode == ExitCode.INCOMPLETE, run.stderr
    assert "Traceback" not in run.stderr
    df = pl.read_parquet(str(tmp_path / "out" / "manifest" / "**" / "*.parquet"))
    ok = set(df.filter(pl.col("status") == "ok")["request_id"])
    assert ok == {rid for i, rid in enumerate(ids) if i != 48}
    [bad] = df.filter(pl.col("status") == "invalid").to_dicts()
    assert bad["source_line"] == 50
    assert "opened on line 50 runs to line 301" in str(bad["error"])


def test_a_complete_body_that_is_not_json_is_asked_twice_a_cut_one_is_retried(
    tmp_path: Path,
) -> None:
    """A 200 whose whole body arrived but is not JSON: asked once more, then the row's error,
    whatever --max-attempts allows. A body cut short on the wire (fewer bytes than its
    Content-Length, then the connection closed) is transient: retried up to --max-attempts."""
    with hostile_server({}) as srv:
        srv.script.update(
            {
                "not-json": Answer("<html>a relay's error page</html>"),
                "cut": Answer(result_body(), cut_short=True),
                "fine": Answer(result_body()),
            }
        )
        csv = write_ids(tmp_path / "e.csv", list(srv.script))
        out = tmp_path / "out"
        extra = ["--max-attempts", "4", "--retry-budget", "60"]
        run = harvest(srv, out, csv, key=KEY, extra=extra)
        assert run.returncode == ExitCode.INCOMPLETE, run.stderr
        df = check_invariants(out, csv, run, key=KEY)
        asked = [head.split(b" ")[1].rsplit(b"/", 1)[1].decode() for head in srv.seen]
    assert {rid: asked.count(rid) for rid in srv.script} == {"not-json": 2, "cut": 4, "fine": 1}
    [not_json] = rows(df, "not-json")
    assert not_json["status"] == "error" and not_json["attempts"] == 2
    assert str(not_json["error"]).startswith("result is not valid JSON (")
    assert str(not_json["error"]).endswith("(gave up after 2 attempts)")
    [cut] = rows(df, "cut")
    assert cut["status"] == "error" and cut["attempts"] == 4
    assert "gave up after 4 attempts" in str(cut["error"])
    assert "not valid JSON" not in str(cut["error"])

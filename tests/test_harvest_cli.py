"""End to end: the CLI against a real sandbox over HTTP, the manifest read back with polars."""

from __future__ import annotations

import hashlib
import socket
from pathlib import Path

import polars as pl
import pytest

from harvester.errors import ExitCode
from harvester.sandbox import Sandbox, SandboxConfig, running_sandbox
from harvester.storage.layout import Layout
from harvester.storage.lock import exclusive
from harvester.storage.manifest import SCHEMA, manifest_glob
from tests.conftest import KEY, harvest_args, run_cli, write_csv
from tests.processes import run_records, start_harvest

SPECIAL = [
    ("fal-ai/flux/dev", "pending-0001"),
    ("fal-ai/flux/dev", "missing-0001"),
    ("fal-ai/flux/dev", "fail-0001"),
    ("fal-ai/flux/dev", "invalid-0001"),
    ("fal-ai/flux/dev", "empty-0001"),
    ("fal-ai/flux/dev", "inline-0001"),
    ("fal-ai/flux/dev", "mislabel-0001"),
    ("fal-ai/flux/dev", "dup-0001"),
    ("fal-ai/flux-pro/v1.1-ultra", "dup-0002"),
    ("workflows/acme/upscale", "echo-0001"),
    ("auto", "redirect-0001"),
]


def read_manifest(out: Path) -> pl.DataFrame:
    return pl.read_parquet(manifest_glob(out))


def normal_pairs(n: int, prefix: str = "req") -> list[tuple[str, str]]:
    models = ["fal-ai/flux/dev", "fal-ai/flux", "fal-ai/flux-pro/v1.1-ultra"]
    return [(models[i % 3], f"{prefix}-{i:06d}-8c1e") for i in range(n)]


def assert_store_matches(out: Path, df: pl.DataFrame) -> None:
    stored = df.filter(pl.col("path").is_not_null())
    for path, sha, size in stored.select("path", "sha256", "bytes").iter_rows():
        data = (out / path).read_bytes()
        assert hashlib.sha256(data).hexdigest() == sha
        assert len(data) == size
        assert Path(path).name.startswith(sha)
        assert path == f"images/{sha[:2]}/{Path(path).name}"


def test_harvest_end_to_end(tmp_path: Path, sandbox: Sandbox) -> None:
    pairs = normal_pairs(30) + SPECIAL
    csv = write_csv(tmp_path / "export.csv", pairs)
    out = tmp_path / "out"

    result = run_cli(harvest_args(sandbox, out, csv))

    assert result.exit_code == ExitCode.INCOMPLETE, result.output
    assert "by status:" in result.output
    df = read_manifest(out)
    assert df.schema == pl.Schema(pl.from_arrow(SCHEMA.empty_table()).schema)  # type: ignore[union-attr]
    assert set(df.select("model", "request_id").unique().iter_rows()) == set(pairs)
    state = dict(df.group_by("request_id").agg(pl.col("request_status").first()).iter_rows())
    assert state["pending-0001"] == "pending"
    assert state["missing-0001"] == "not_found"
    assert state["fail-0001"] == "failed"
    assert state["invalid-0001"] == "failed"
    assert state["empty-0001"] == "ok"
    assert all(state[rid] == "ok" for _, rid in normal_pairs(30))
    # one row per image; exactly one row for a request without images or that failed
    for rid in ("pending-0001", "missing-0001", "fail-0001", "empty-0001"):
        assert df.filter(pl.col("request_id") == rid).height == 1
    assert_store_matches(out, df)
    # extension from the bytes, not the URL: mislabel- serves JPEG bytes under a .png URL
    mislabel = df.filter(pl.col("request_id") == "mislabel-0001")
    assert mislabel.height and all(p.endswith(".jpg") for p in mislabel["path"])
    # what the file's header says sits next to what the API declared: the mislabel shows
    assert set(mislabel.select("content_type", "image_format").iter_rows()) == {
        ("image/png", "jpeg")
    }
    stored = df.filter(pl.col("path").is_not_null())
    assert stored["image_format"].null_count() == 0
    declared = stored.filter(pl.col("width").is_not_null())
    assert declared.height > 30
    assert declared["width"].to_list() == declared["image_width"].to_list()
    assert declared["height"].to_list() == declared["image_height"].to_list()
    # data: URIs are stored, and only their media type is kept
    inline = df.filter(pl.col("request_id") == "inline-0001").row(0, named=True)
    assert inline["image_url"] == "data:image/png" and inline["path"].endswith(".png")
    # identical bytes are stored once
    dup = df.filter(pl.col("request_id").str.starts_with("dup-"))
    assert dup["sha256"].n_unique() < dup.height
    files = [p for p in (out / "images").rglob("*") if p.is_file()]
    assert len(files) == df["sha256"].drop_nulls().n_unique()
    assert sandbox.stats()["auth_leaks"] == 0


def test_rerun_fetches_only_what_is_not_ok(tmp_path: Path, sandbox: Sandbox) -> None:
    pairs = [
        *normal_pairs(20, "rerun"),
        ("fal-ai/flux", "pending-rerun"),
        ("fal-ai/flux", "missing-rerun"),
    ]
    csv = write_csv(tmp_path / "export.csv", pairs)
    out = tmp_path / "out"
    first = run_cli(harvest_args(sandbox, out, csv))
    assert first.exit_code == ExitCode.INCOMPLETE
    parts = {p: p.read_bytes() for p in (out / "manifest").rglob("*.parquet")}
    before = sandbox.stats()

    second = run_cli(harvest_args(sandbox, out, csv))

    after = sandbox.stats()
    assert second.exit_code == ExitCode.INCOMPLETE
    assert after["result_requests"] - before["result_requests"] == 2  # pending + missing only
    assert after["media_requests"] == before["media_requests"]
    assert all(p.read_bytes() == data for p, data in parts.items())  # earlier parts untouched
    runs = read_manifest(out)["run_id"].unique()
    assert runs.len() == 2
    assert "20 already ok" in second.output


def test_all_ok_exits_zero_and_duplicates_are_harvested_once(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    pairs = normal_pairs(5, "once")
    a = write_csv(tmp_path / "a.csv", pairs + pairs[:2])
    b = write_csv(tmp_path / "b.csv", pairs[1:])
    before = sandbox.stats()["result_requests"]

    result = run_cli(harvest_args(sandbox, tmp_path / "out", a, b))

    assert result.exit_code == ExitCode.OK, result.output
    assert sandbox.stats()["result_requests"] - before == 5
    df = read_manifest(tmp_path / "out")
    assert df.select("model", "request_id").unique().height == 5


def test_model_with_and_without_subpath_reach_the_same_result(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    csv = write_csv(tmp_path / "e.csv", [("fal-ai/flux/dev", "same-1"), ("fal-ai/flux", "same-1")])
    result = run_cli(harvest_args(sandbox, tmp_path / "out", csv))
    assert result.exit_code == ExitCode.OK
    df = read_manifest(tmp_path / "out")
    # both model strings are kept exactly as given, and they found the same images
    assert set(df["model"]) == {"fal-ai/flux/dev", "fal-ai/flux"}
    by_model = df.group_by("model").agg(pl.col("sha256").sort())
    assert by_model["sha256"][0].to_list() == by_model["sha256"][1].to_list()


def test_no_key_is_a_usage_error_before_any_request(tmp_path: Path, sandbox: Sandbox) -> None:
    csv = write_csv(tmp_path / "e.csv", normal_pairs(3))
    before = sandbox.stats()["result_requests"]
    result = run_cli(harvest_args(sandbox, tmp_path / "out", csv), key=None)
    assert result.exit_code == ExitCode.USAGE
    assert "no API key: set HARVESTER_API_KEY" in result.output
    assert sandbox.stats()["result_requests"] == before
    assert not (tmp_path / "out").exists()


def test_fal_key_is_the_fallback(tmp_path: Path, sandbox: Sandbox) -> None:
    csv = write_csv(tmp_path / "e.csv", normal_pairs(2, "falkey"))
    result = run_cli(harvest_args(sandbox, tmp_path / "out", csv), key=None, env={"FAL_KEY": KEY})
    assert result.exit_code == ExitCode.OK, result.output


@pytest.mark.parametrize(
    "extra",
    [["--concurrency", "4"], ["--rps", "50"], ["--workers", "2", "--rps", "1000"]],
    ids=["4 slots", "default rate", "2 processes"],
)
def test_rejected_key_stops_the_run_with_its_own_code(
    tmp_path: Path, sandbox: Sandbox, extra: list[str]
) -> None:
    """More pairs than the run's queue holds, so the reader is still handing them out when
    every lane stops on the 401: the key's error, not the closed queue, ends the run."""
    csv = write_csv(tmp_path / "e.csv", normal_pairs(600, "badkey"))
    before = sandbox.stats()["unauthorized"]
    out = tmp_path / "out"
    result = run_cli(harvest_args(sandbox, out, csv, extra=extra), key="wrong-key-0000")
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    assert result.exit_code == ExitCode.AUTH, result.output
    assert "refused the key (HTTP 401" in result.output
    assert "wrong-key-0000" not in result.output
    assert sandbox.stats()["unauthorized"] - before < 100  # stopped early, not 600 times
    assert [r["exit_code"] for r in run_records(out)] == [ExitCode.AUTH]


def test_auth_scheme_key_sends_fal_style_header(tmp_path: Path) -> None:
    csv = write_csv(tmp_path / "e.csv", normal_pairs(2, "scheme"))
    with running_sandbox(SandboxConfig(key=KEY, auth_scheme="key", image_bytes=2_000)) as sb:
        bearer = run_cli(harvest_args(sb, tmp_path / "o1", csv))
        key = run_cli(harvest_args(sb, tmp_path / "o2", csv, extra=["--auth-scheme", "key"]))
    assert bearer.exit_code == ExitCode.AUTH
    assert key.exit_code == ExitCode.OK, key.output


def test_key_never_reaches_output_manifest_or_image_hosts(tmp_path: Path, sandbox: Sandbox) -> None:
    csv = write_csv(tmp_path / "e.csv", normal_pairs(5, "leak") + SPECIAL)
    out = tmp_path / "out"
    result = run_cli(harvest_args(sandbox, out, csv, extra=["-vv"]))
    assert KEY not in result.output
    for path in out.rglob("*"):
        if path.is_file() and path.parent.parent.name != "images":
            assert KEY.encode() not in path.read_bytes(), path
    assert sandbox.stats()["auth_leaks"] == 0


def test_missing_columns_is_a_clear_input_error(tmp_path: Path, sandbox: Sandbox) -> None:
    csv = tmp_path / "wrong.csv"
    csv.write_text("endpoint,id\nfal-ai/flux,abc\n")
    result = run_cli(harvest_args(sandbox, tmp_path / "out", csv))
    assert result.exit_code == ExitCode.INPUT
    assert "has no 'model' or 'request_id' column (columns found: 'endpoint', 'id')" in (
        result.output
    )
    assert "name the columns to read with --model-column endpoint and --id-column id" in (
        result.output
    )


@pytest.mark.parametrize(
    ("header", "options"),
    [
        ("endpoint_id,id", ["--model-column", "endpoint_id", "--id-column", "id"]),
        ("App, Request ", ["--model-column", "app", "--id-column", "REQUEST"]),
    ],
)
def test_columns_named_otherwise_are_read_with_the_column_options(
    tmp_path: Path, sandbox: Sandbox, header: str, options: list[str]
) -> None:
    pairs = normal_pairs(3, "cols")
    csv = write_csv(tmp_path / "export.csv", pairs, header=header)
    refused = run_cli(harvest_args(sandbox, tmp_path / "out", csv))
    assert refused.exit_code == ExitCode.INPUT
    assert "--model-column" in refused.output and "--id-column" in refused.output
    result = run_cli(harvest_args(sandbox, tmp_path / "out", csv, extra=options))
    assert result.exit_code == ExitCode.OK, result.output
    df = read_manifest(tmp_path / "out")
    assert set(df.select("model", "request_id").iter_rows()) == set(pairs)


def test_job_file_names_the_columns(tmp_path: Path, sandbox: Sandbox) -> None:
    csv = write_csv(tmp_path / "export.csv", normal_pairs(2, "jobcols"), header="app,request")
    job = tmp_path / "job.toml"
    job.write_text(
        f'inputs = ["export.csv"]\nout = "out"\nbase-url = "{sandbox.base_url}"\n'
        'model-column = "app"\nid-column = "request"\n',
        encoding="utf-8",
    )
    result = run_cli(["run", str(job)])
    assert result.exit_code == ExitCode.OK, result.output
    assert read_manifest(tmp_path / "out").height >= 2
    assert csv.exists()


def test_overlapping_run_exits_with_locked_code(tmp_path: Path, sandbox: Sandbox) -> None:
    csv = write_csv(tmp_path / "e.csv", normal_pairs(2, "lock"))
    out = tmp_path / "out"
    layout = Layout(out)
    layout.prepare()
    with exclusive(layout):
        result = run_cli(harvest_args(sandbox, out, csv))
    assert result.exit_code == ExitCode.LOCKED
    assert "another harvest" in result.output
    assert run_cli(harvest_args(sandbox, out, csv)).exit_code == ExitCode.OK


@pytest.mark.slow
def test_thousand_requests_every_sha_matches(tmp_path: Path, sandbox: Sandbox) -> None:
    pairs = normal_pairs(1_000, "k")
    csv = write_csv(tmp_path / "big.csv", pairs)
    out = tmp_path / "out"
    result = run_cli(harvest_args(sandbox, out, csv, extra=["--concurrency", "32"]))
    assert result.exit_code == ExitCode.OK, result.output
    df = read_manifest(out)
    assert df.select("model", "request_id").unique().height == 1_000
    assert (df["status"] == "ok").all()
    assert_store_matches(out, df)
    verify = run_cli(["verify", str(out)])
    assert verify.exit_code == ExitCode.OK, verify.output


def test_out_that_is_a_file_and_verify_of_a_foreign_folder(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    csv = write_csv(tmp_path / "e.csv", normal_pairs(1, "file"))
    result = run_cli(harvest_args(sandbox, csv, csv))
    assert result.exit_code == ExitCode.OUTPUT
    assert "is a file, not a folder" in result.output
    verify = run_cli(["verify", str(tmp_path)])
    assert verify.exit_code == ExitCode.USAGE
    assert "has no manifest/ or images/ folder" in verify.output


def test_an_unreachable_api_stops_the_run_with_its_own_code(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    csv = write_csv(tmp_path / "e.csv", normal_pairs(100, "down"))
    out = tmp_path / "out"
    result = run_cli(
        [
            "harvest",
            str(csv),
            "--out",
            str(out),
            "--base-url",
            f"http://127.0.0.1:{port}",
            "--max-attempts",
            "2",
            "--retry-budget",
            "5",
        ]
    )
    assert result.exit_code == ExitCode.UNREACHABLE
    assert f"cannot reach the API at http://127.0.0.1:{port}" in result.output
    assert "Check --base-url" in result.output
    assert not list((out / "manifest").rglob("*.parquet"))  # no pile of 'error' rows


def test_nothing_listening_says_at_once_what_failed_and_how_long_it_keeps_trying(
    tmp_path: Path,
) -> None:
    """The first refused connection prints one plain line at once, with the retry schedule;
    the run goes on retrying (the budget is not cut) and ends with the same in words. No
    aiohttp internals (``ssl:default`` for an http URL) in either."""
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    csv = write_csv(tmp_path / "e.csv", normal_pairs(20, "down"))
    base = f"http://127.0.0.1:{port}"
    extra = ["--max-attempts", "4", "--retry-budget", "60"]
    with start_harvest(base, tmp_path / "out", csv, extra=extra) as process:
        assert process.stderr is not None
        lines = [process.stderr.readline() for _ in range(2)]
        still_trying = process.poll() is None  # the waits add up to 3.5 s (1.75 s at least)
        rest = process.stderr.read()
        assert process.wait(timeout=60) == ExitCode.UNREACHABLE
    assert " started: 20 rows in 1 input file" in lines[0]
    refused = f"cannot connect to 127.0.0.1:{port}: connection refused"
    assert lines[1].endswith(
        f" WARNING harvester: cannot reach the API at {base}: {refused}; retrying 3 more "
        "times over about 4s (at most 1m00s) before the run stops\n"
    )
    assert still_trying
    assert rest.startswith(f"harvester: error: cannot reach the API at {base}: {refused}; ")
    assert "tried 4 times over " in rest and "Check --base-url" in rest
    assert "WARNING" not in rest
    for internal in ("ssl:default", "Connect call failed", "ConnectError", "aiohttp"):
        assert internal not in "".join(lines) + rest, internal

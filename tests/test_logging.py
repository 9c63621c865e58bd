"""What a run prints: JSON lines for aggregators, short plain output for cron, a bar on a TTY."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from harvester.cli import main
from harvester.errors import ExitCode, UsageError
from harvester.run.pipeline import RunStats
from harvester.sandbox import Sandbox
from harvester.storage.objects import open_store
from harvester.units import size
from harvester.views.console import Console, Snapshot, duration
from tests.conftest import KEY, harvest_args, run_cli, write_csv

PAIRS = [
    ("fal-ai/flux/dev", "log-0001"),
    ("fal-ai/flux", "log-0002"),
    ("fal-ai/flux/dev", "pending-log"),
    ("fal-ai/flux/dev", "fail-log"),
    ("fal-ai/flux/dev", "bad/id"),
]


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """The CLI replaces the root handler; put the test runner's back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def invoke(args: list[str], *, key: str = KEY) -> Result:
    return CliRunner().invoke(main, args, env={"HARVESTER_API_KEY": key}, catch_exceptions=False)


def json_lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines()]


def test_json_lines_parse_and_all_carry_the_run_id(tmp_path: Path, sandbox: Sandbox) -> None:
    csv = write_csv(tmp_path / "e.csv", PAIRS)
    out = tmp_path / "out"

    result = invoke(harvest_args(sandbox, out, csv, extra=["--log-format", "json", "-vv"]))

    assert result.exit_code == ExitCode.INCOMPLETE
    assert result.stdout == ""  # everything is on stderr, one object per line
    lines = json_lines(result.stderr)
    [record_file] = (out / "runs").glob("*.json")
    run_id = record_file.stem
    assert {line["run_id"] for line in lines} == {run_id}
    for line in lines:
        assert {"ts", "level", "run_id", "logger", "message"} <= line.keys()
        datetime.fromisoformat(str(line["ts"]))
    assert any(line["logger"] == "httpx" for line in lines)  # -vv: every request, as JSON
    started = next(line for line in lines if line.get("event") == "started")
    assert started["rows_in_input"] == len(PAIRS)
    finished = lines[-1]
    assert finished["event"] == "finished" and finished["level"] == "warning"
    assert finished["exit_code"] == ExitCode.INCOMPLETE
    assert finished["requests"] == {"ok": 2, "pending": 1, "failed": 1, "invalid": 1}
    assert finished == {**finished, **json.loads(record_file.read_text())}
    assert KEY not in result.stderr


def test_json_error_line_for_a_rejected_key(tmp_path: Path, sandbox: Sandbox) -> None:
    csv = write_csv(tmp_path / "e.csv", PAIRS[:2])
    result = invoke(
        harvest_args(sandbox, tmp_path / "out", csv, extra=["--log-format", "json"]),
        key="wrong-key-5e6f",
    )
    assert result.exit_code == ExitCode.AUTH
    last = json_lines(result.stderr)[-1]
    assert last["level"] == "error" and last["exit_code"] == ExitCode.AUTH
    assert "refused the key" in str(last["message"])
    assert last["run_id"]
    assert "wrong-key-5e6f" not in result.output


def test_json_error_for_a_bad_job_file(tmp_path: Path) -> None:
    job = tmp_path / "j.toml"
    job.write_text('inputs = "a.csv"\nout = "o"\nrps = "fast"\n')
    result = invoke(["run", str(job), "--log-format", "json"])
    assert result.exit_code == ExitCode.CONFIG
    [line] = json_lines(result.stderr)
    assert line["exit_code"] == ExitCode.CONFIG
    assert line["run_id"] is None  # no run was started
    assert "j.toml:3: 'rps' must be a number" in str(line["message"])


def test_text_output_off_a_terminal_is_a_few_lines(tmp_path: Path, sandbox: Sandbox) -> None:
    csv = write_csv(tmp_path / "e.csv", [*PAIRS, *[("m/a", f"x/{i}") for i in range(50)]])

    result = invoke(harvest_args(sandbox, tmp_path / "out", csv))

    assert result.exit_code == ExitCode.INCOMPLETE
    assert result.stdout.startswith("run ")  # the summary, and only the summary, on stdout
    errors = result.stderr.splitlines()
    assert "started: 55 rows in 1 input file" in errors[0]
    invalid = [line for line in errors if "invalid row:" in line]
    assert len(invalid) == 20  # 51 bad rows, cut after 20
    assert "further warnings like the one above are not shown" in errors[21]
    assert len(errors) == 22
    assert "\r" not in result.stderr  # no progress bar off a terminal


def test_quiet_leaves_only_the_summary(tmp_path: Path, sandbox: Sandbox) -> None:
    csv = write_csv(tmp_path / "e.csv", PAIRS)
    result = invoke(harvest_args(sandbox, tmp_path / "out", csv, extra=["-q"]))
    assert result.exit_code == ExitCode.INCOMPLETE
    assert result.stderr == ""
    assert "by status:" in result.stdout


def test_verbose_shows_every_warning(tmp_path: Path, sandbox: Sandbox) -> None:
    csv = write_csv(tmp_path / "e.csv", [("m/a", f"x/{i}") for i in range(30)])
    result = invoke(harvest_args(sandbox, tmp_path / "out", csv, extra=["-v"]))
    assert result.stderr.count("invalid row:") == 30


def stats(**counts: int) -> RunStats:
    s = RunStats(run_id="r1", started_at=datetime.now(UTC), out_dir=Path("out"))
    s.rows_in_input = counts.get("rows", 100)
    s.counters.requests["ok"] = counts.get("ok", 40)
    s.counters.duplicates = counts.get("duplicates", 10)
    return s


def test_progress_bar_on_a_terminal_steps_aside_for_log_lines() -> None:
    stream = io.StringIO()
    console = Console(log_format="text", verbosity=0, stream=stream, interactive=True)
    console.redact(KEY)
    console.tick(stats())
    logging.getLogger("harvester").warning("a warning while the bar is drawn, key %s", KEY)
    console.tick(stats(ok=90))
    console.finished(stats(ok=90))

    text = stream.getvalue()
    assert "[##########--------------] 40/90 requests" in text
    # the bar is cleared before the log line, short on a terminal: time, level, message
    assert re.search(r"\r\x1b\[K\d\d:\d\d:\d\d WARNING a warning while", text)
    assert "key ***" in text and KEY not in text
    assert text.endswith("\r\x1b[K")  # cleared at the end, the summary goes to stdout


def test_json_console_masks_the_key_in_fields_too() -> None:
    stream = io.StringIO()
    console = Console(log_format="json", verbosity=0, run_id="r9", stream=stream)
    console.redact(KEY)
    logging.getLogger("harvester").warning("x", extra={"detail": f"Bearer {KEY}"})
    console.failed(UsageError(f"bad {KEY}"))
    lines = json_lines(stream.getvalue())
    assert [line["run_id"] for line in lines] == ["r9", "r9"]
    assert lines[0]["detail"] == "Bearer ***"
    assert KEY not in stream.getvalue()


def test_snapshot_counts_what_is_left_to_do() -> None:
    snap = Snapshot.of(stats(rows=100, ok=40, duplicates=10).record(running=True))
    assert (snap.done, snap.total) == (40, 90)
    assert snap.eta is not None and snap.eta > 0
    assert duration(42) == "42s" and duration(185) == "3m05s" and duration(3725) == "1h02m"
    assert size(999) == "999 B" and size(1_234_567) == "1.2 MB"


def test_vv_shows_request_lines_but_never_headers(tmp_path: Path, sandbox: Sandbox) -> None:
    csv = write_csv(tmp_path / "e.csv", [("fal-ai/flux", "vv-1")])
    result = run_cli(harvest_args(sandbox, tmp_path / "out", csv, extra=["-vv"]))
    assert result.exit_code == 0, result.output
    assert "HTTP Request: GET" in result.output
    assert "headers" not in result.output.lower()
    assert KEY not in result.output


def snapshot(**fields: object) -> Snapshot:
    values: dict[str, object] = {
        "done": 1_234,
        "total": 20_000,
        "images": 2_160,
        "bytes": 61_000_000,
        "rate": 48.7,
        "eta": 345.0,
    }
    values.update(fields)
    return Snapshot(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize("columns", [12, 20, 30, 40, 50, 60, 80, 100, 120, 200])
def test_progress_line_fits_the_terminal_and_never_cuts_rate_or_eta(columns: int) -> None:
    for snap in (snapshot(), snapshot(throttled=37, retries=41)):
        line = snap.line(columns)
        assert len(line) <= columns - 1
        if columns > len("48.7/s  ETA 5m45s"):
            assert line.endswith("48.7/s  ETA 5m45s"), line
    wide = snapshot(throttled=37, retries=1).line(200)
    assert "37 x 429" in wide and "1 retry" in wide and "1,234/20,000 requests" in wide
    assert "37 x 429" in snapshot(throttled=37).line(60)  # 429s outlast images and bytes


def test_progress_says_what_it_waits_for_when_only_pending_requests_remain() -> None:
    until = datetime(2026, 12, 1, 6, 40).timestamp()
    snap = snapshot(done=19_998, eta=0.4, waiting=2, waiting_until=until)
    assert snap.line(100).endswith("waiting on 2 pending until 06:40")
    assert "ETA" not in snap.line(100) and "ETA" not in snap.text()
    assert snap.fields()["eta_seconds"] is None
    # pending requests waiting while others are still to do: the rate and ETA stay
    assert snapshot(waiting=2).line(100).endswith("ETA 5m45s")


def test_a_run_reports_requests_waiting_on_pending_results(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    """Lane counters carry the waiting requests to the stats the console reads."""
    from harvester.run.pipeline import HarvestConfig, harvest

    csv = write_csv(tmp_path / "e.csv", [("fal-ai/flux", "pending-wait-1"), ("fal-ai/flux", "x1")])
    seen: list[Snapshot] = []
    stats = harvest(
        HarvestConfig(
            inputs=(csv,),
            out=open_store(tmp_path / "out"),
            api_key=KEY,
            base_url=sandbox.base_url,
            pending_wait=4,
            seed=1,
        ),
        on_tick=lambda s: seen.append(Snapshot.of(s.record(running=True))),
        tick=0.2,
    )
    assert stats.counters.requests["pending"] == 1
    waiting = [s for s in seen if s.only_waiting]
    assert waiting, "the run spent four seconds waiting on one pending request"
    assert waiting[-1].waiting == 1 and waiting[-1].waiting_until is not None
    assert "waiting on 1 pending until " in waiting[-1].line(100)


def test_control_characters_from_input_never_reach_the_terminal(tmp_path: Path) -> None:
    stream = io.StringIO()
    console = Console(log_format="text", verbosity=0, stream=stream, interactive=False)
    logging.getLogger("harvester").warning("messy.csv:14: id %r", "x\x07\x1b[31m\r\nFAKE")
    logging.getLogger("harvester").warning("plain %s", "bell\x07 and \x9b csi")
    console.failed(UsageError("bad\x07file\x1b]0;title\x07.csv"))
    text = stream.getvalue()
    assert not any(c in text for c in "\x07\x1b\r\x9b")
    assert "bell\\x07 and \\x9b csi" in text and "bad\\x07file\\x1b]0;title\\x07.csv" in text
    assert len(text.splitlines()) == 3  # no forged line


def test_singular_and_plural() -> None:
    from harvester.units import plural

    assert (plural(1, "row"), plural(2, "row"), plural(1_000, "row")) == (
        "1 row",
        "2 rows",
        "1,000 rows",
    )
    assert (plural(1, "retry", "retries"), plural(0, "retry", "retries")) == (
        "1 retry",
        "0 retries",
    )
    one = stats(rows=1, ok=1, duplicates=0)
    one.counters.result_requests = 1
    summary = one.summary()
    assert "1 request in" in summary and "1 result request (" in summary
    assert "0 duplicate rows" in summary and "new parts" in summary


def test_rate_and_eta_count_fetched_requests_not_rows_recorded_without_one() -> None:
    """88 requests, 6 of them invalid rows recorded at once: the first tick shows no rate and
    no ETA (not 6 invalid rows "done" in a blink), later ticks the rate of fetched ones."""
    s = stats(rows=99, ok=0, duplicates=11)
    s.counters.requests["invalid"] = 6
    s.started_at = datetime.now(UTC) - timedelta(seconds=0.02)
    first = Snapshot.of(s.record(running=True))
    assert (first.done, first.total, first.rate, first.eta) == (6, 88, 0.0, None)
    assert first.tail() == "0.0/s  ETA --"
    s.counters.requests["ok"], s.counters.requests["expired"] = 20, 2
    s.started_at = datetime.now(UTC) - timedelta(seconds=2)
    later = Snapshot.of(s.record(running=True))
    assert later.done == 28
    assert 9.5 < later.rate <= 10.0  # 20 fetched in 2 s, not 28
    assert later.eta is not None and 6.0 <= later.eta < 6.4  # 60 left at 10/s

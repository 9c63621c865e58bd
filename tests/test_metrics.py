"""--metrics-file: the run's figures in Prometheus' text format, read back with its own parser."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from harvester.errors import ExitCode
from harvester.sandbox import Sandbox
from harvester.views.metrics import RunFigures, render, write_metrics
from tests.conftest import harvest_args, run_cli, write_csv


def samples(path: Path) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``(name, labels without out) -> value`` for every sample; every sample has ``out``."""
    found = {}
    for family in text_string_to_metric_families(path.read_text(encoding="utf-8")):
        assert family.type == "gauge" and family.documentation
        for sample in family.samples:
            labels = dict(sample.labels)
            assert labels.pop("out")
            found[sample.name, tuple(sorted(labels.items()))] = sample.value
    return found


def test_a_run_writes_its_figures_and_a_later_failure_keeps_the_last_success(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    out, prom = tmp_path / "out", tmp_path / "textfile" / "harvester.prom"
    prom.parent.mkdir()
    pairs = [("fal-ai/flux", f"metrics-{n}") for n in range(12)]
    first = run_cli(
        harvest_args(
            sandbox, out, write_csv(tmp_path / "a.csv", pairs), extra=["--metrics-file", str(prom)]
        )
    )
    assert first.exit_code == ExitCode.OK, first.output

    got = samples(prom)
    assert got["harvester_run_requests", (("status", "ok"),)] == 12
    assert got["harvester_run_requests", (("status", "not_found"),)] == 0
    assert got["harvester_run_exit_code", ()] == 0
    assert got["harvester_run_images", (("outcome", "new"),)] >= 12
    assert got["harvester_run_stored_bytes", ()] > 12 * 1_000
    assert got["harvester_run_downloaded_bytes", ()] >= got["harvester_run_stored_bytes", ()]
    assert got["harvester_run_duration_seconds", ()] > 0
    assert {"harvester_run_rate_limited_responses", "harvester_run_retries"} <= {n for n, _ in got}
    success = got["harvester_last_success_timestamp_seconds", ()]
    assert success == got["harvester_run_end_timestamp_seconds", ()]
    assert os.listdir(prom.parent) == ["harvester.prom"]  # no temp file left behind

    # the next run, from a job file, is not all ok: the last success stays the first run's
    job = tmp_path / "job.toml"
    more = write_csv(tmp_path / "b.csv", [*pairs, ("fal-ai/flux", "missing-metrics")])
    job.write_text(
        f'inputs = ["{more}"]\nout = "{out}"\nbase-url = "{sandbox.base_url}"\n'
        'metrics-file = "textfile/harvester.prom"\n',
        encoding="utf-8",
    )
    second = run_cli(["run", str(job)])
    assert second.exit_code == ExitCode.INCOMPLETE, second.output
    got = samples(prom)
    assert got["harvester_run_exit_code", ()] == ExitCode.INCOMPLETE
    assert got["harvester_run_requests", (("status", "not_found"),)] == 1
    assert got["harvester_run_skipped_requests", ()] == 12
    assert got["harvester_last_success_timestamp_seconds", ()] == success
    assert got["harvester_run_end_timestamp_seconds", ()] >= success


def test_a_run_that_fails_outright_still_writes_its_exit_code(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    prom = tmp_path / "harvester.prom"
    csv = write_csv(tmp_path / "a.csv", [("fal-ai/flux", "metrics-x")])
    result = run_cli(
        harvest_args(sandbox, tmp_path / "out", csv, extra=["--metrics-file", str(prom)]),
        key="wrong-key",
    )
    assert result.exit_code == ExitCode.AUTH, result.output
    got = samples(prom)
    assert got["harvester_run_exit_code", ()] == ExitCode.AUTH
    assert ("harvester_last_success_timestamp_seconds", ()) not in got


def test_a_metrics_folder_that_does_not_exist_stops_the_run_before_it_starts(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    csv = write_csv(tmp_path / "a.csv", [("fal-ai/flux", "metrics-y")])
    before = sandbox.stats()["result_requests"]
    result = run_cli(
        harvest_args(
            sandbox, tmp_path / "out", csv, extra=["--metrics-file", str(tmp_path / "no/h.prom")]
        )
    )
    assert result.exit_code == ExitCode.OUTPUT
    assert "folder" in result.output and "does not exist" in result.output
    assert sandbox.stats()["result_requests"] == before


def test_labels_are_escaped_and_the_text_parses() -> None:
    figures = RunFigures(
        out_dir='/srv/odd "name"\\x\n', exit_code=3, started_at=1.0, finished_at=2.5
    )
    text = render(figures, last_success=None)
    families = list(text_string_to_metric_families(text))
    outs = {s.labels["out"] for f in families for s in f.samples}
    assert outs == {'/srv/odd "name"\\x\n'}


def test_write_failure_is_an_output_error(tmp_path: Path) -> None:
    from harvester.errors import OutputError

    figures = RunFigures(out_dir="x", exit_code=0, started_at=1.0, finished_at=2.0)
    with pytest.raises(OutputError, match="cannot write metrics file"):
        write_metrics(tmp_path / "missing" / "h.prom", figures)


def test_serve_metrics_are_written_by_the_same_writer_and_parse() -> None:
    """``harvester serve``'s ``/metrics`` text, through the one writer: Prometheus' parser
    reads every family, labels escaped, the histogram cumulative."""
    from collections import Counter

    from harvester.counters import Counters
    from harvester.serve.metrics import Latency
    from harvester.serve.metrics import render as render_serve

    latency = Latency()
    for seconds in (0.004, 0.03, 0.03, 7.0):
        latency.observe(seconds)
    text = render_serve(
        stored=3,
        repeated=1,
        unavailable=0,
        refused=Counter({'bad "sig"': 2}),
        backlog=5,
        failed=Counter(),
        harvested=Counters(requests=Counter({"ok": 2})),
        latency=latency,
    )
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples["harvester_serve_refused_total", (("reason", 'bad "sig"'),)] == 2
    assert samples["harvester_serve_backlog", ()] == 5
    assert samples["harvester_serve_ack_seconds_bucket", (("le", "0.05"),)] == 3
    assert samples["harvester_serve_ack_seconds_bucket", (("le", "+Inf"),)] == 4
    assert samples["harvester_serve_ack_seconds_count", ()] == 4

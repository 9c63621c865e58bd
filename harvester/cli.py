"""The ``harvester`` command: parses options, builds the library's objects, reports results.

Only the project's own errors are turned into a message and an exit code here; see
``harvester.errors.ExitCode`` for the codes.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import textwrap
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from harvester import __version__, options
from harvester.errors import ExitCode, HarvesterError
from harvester.jobs import Job, load_job
from harvester.options import Option
from harvester.redact import printable
from harvester.storage.objects import as_location
from harvester.views import metrics
from harvester.views.console import Console

# The run layer (and with it httpx, anyio, pyarrow) is imported only inside the commands that
# harvest: ``harvester status`` and the other views never load it.
if TYPE_CHECKING:
    from harvester.run.stats import RunStats


def _fail(exc: HarvesterError, *, log_format: str = "text") -> None:
    Console(log_format=log_format, verbosity=0, interactive=False).failed(exc)
    sys.exit(int(exc.exit_code))


class _HelpFormatter(click.HelpFormatter):
    """Click's formatter, with no line wider than the terminal: the lines click leaves as they
    are (``\\b`` blocks, a long usage line) are wrapped too, each continuation aligned under
    the text it continues."""

    def getvalue(self) -> str:
        return "\n".join(_fit_line(line, self.width) for line in super().getvalue().split("\n"))


def _fit_line(line: str, width: int) -> str:
    if len(line) <= width:
        return line
    # "  Label:   text" continues under "text"; any other line under its own first word.
    aligned = re.match(r"(\s*\S.*?\s{2,})\S", line)
    indent = len(aligned.group(1)) if aligned else len(line) - len(line.lstrip()) + 2
    if indent > width // 2:
        indent = len(line) - len(line.lstrip()) + 2
    return textwrap.fill(line, width=width, subsequent_indent=" " * indent, break_on_hyphens=False)


class _Context(click.Context):
    formatter_class = _HelpFormatter


class _Command(click.Command):
    context_class = _Context


class _Group(click.Group):
    context_class = _Context
    command_class = _Command


# Help is at most 100 columns wide, and never wider than the terminal (80 when unknown).
@click.group(
    cls=_Group,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(__version__, prog_name="harvester")
def main() -> None:
    """Harvest fal.ai-compatible queue results and their images into a content-addressed
    store with a Parquet manifest.

    \b
    Every night:   harvester run jobs/nightly.toml      (key from the environment)
    Next morning:  harvester status DIR                 (exit 0: it worked)
    Any time:      harvester report DIR --html report.html
    After a year:  harvester compact DIR   (or compact = true in the job file)
    Calling fal:   harvester serve --job jobs/webhooks.toml   (its webhooks)
    Try it:        harvester sandbox, then HARVESTER_API_KEY=sandbox-key
                   harvester run jobs/sandbox.toml (see the README)

    Exit codes: 0 all ok; 1 unexpected error (a bug); 2 usage error; 3 finished but some
    requests not ok; 4 key rejected; 5 another run holds the output folder; 6 bad input
    file; 7 output folder not writable; 8 bad job file; 9 verify found problems; 10 (status)
    no recent run, or the last one crashed; 11 the API never answered; 12 a shard's process
    died; 13 (almost) nothing ok (at least 10 requests tried and under 5% ok, or the share
    not ok over 3x the last 7 runs' median and 50 points above it); 130 interrupted.
    """


F = TypeVar("F", bound=Callable[..., Any])


def _location(_ctx: click.Context, _param: click.Parameter, value: str | None) -> Any:
    """``--out``/``DIR``: ``s3://...`` stays text, anything else is a path."""
    return None if value is None else as_location(value)


def _check_folder(out_dir: Path | str) -> None:
    """Exit 2 if a local DIR is not a folder (an s3:// location is checked when read)."""
    if isinstance(out_dir, Path) and not out_dir.is_dir():
        click.echo(f"harvester: error: {out_dir} is not a folder", err=True)
        sys.exit(int(ExitCode.USAGE))


def _harvest_options(command: str) -> Callable[[F], F]:
    """The click options of ``command``, made from the declarations of ``harvester.options``.
    For ``run`` each defaults to None, meaning "as the job file says" (and the job file's own
    default after that)."""
    made = [_click_option(o, command) for o in options.for_command(command) if o.command_line]
    made += [
        click.option(
            "-v", "--verbose", count=True, help="More log lines (-vv: every HTTP request)."
        ),
        click.option("-q", "--quiet", is_flag=True, help="Only errors and the summary."),
    ]

    def apply(function: F) -> F:
        for option in reversed(made):
            function = option(function)
        return function

    return apply


def _click_option(option: Option, command: str) -> Callable[[F], F]:
    """``option`` as a click option of ``command``; the job file's command has no defaults of
    its own and reads no environment variable (the job file says)."""
    from_job = command == options.JOB_COMMAND
    default = None if from_job else option.default_for(command)
    envvar = None if from_job else option.envvar
    text = f"{option.help[:-1]} (env {envvar})." if envvar else option.help
    if option.default_text and command not in dict(option.command_defaults):
        text += f" Default: {option.default_text}"
        text += f" (or the job's '{option.name}')." if from_job else "."
    elif option.required and from_job:
        text += f" Default: the job's '{option.name}'."
    settings: dict[str, Any] = {"help": text, "default": default, "envvar": envvar}
    name = f"--{option.name}"
    if option.kind == "texts":
        settings |= {"multiple": True, "metavar": option.metavar, "default": default or ()}
    elif option.kind == "boolean":
        if option.negatable:
            name += f"/--no-{option.name}"
        else:
            settings["is_flag"] = True
    else:
        settings |= {"type": _click_type(option), "show_default": default is not None}
        settings |= {
            "metavar": option.metavar,
            "required": bool(option.required and not from_job and command != options.SERVE),
        }
    if option.kind == "location":
        settings["callback"] = _location
    return click.option(name, **settings)


class _CountOrAuto(click.ParamType):  # type: ignore[type-arg]
    """An integer of at least 1, or ``auto`` (None)."""

    name = "integer"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
            return None
        return click.IntRange(min=1).convert(value, param, ctx)


def _click_type(option: Option) -> click.ParamType[Any, Any] | None:
    if option.auto:
        return _CountOrAuto()
    if option.choices:
        return click.Choice(option.choices)
    if option.kind == "path":
        return click.Path(path_type=Path, dir_okay=False)
    if option.kind == "integer":
        return click.IntRange(min=None if option.minimum is None else int(option.minimum))
    if option.kind == "number":
        return click.FloatRange(min=option.minimum, min_open=option.above)
    return None


@main.command("harvest")
@click.argument("inputs", nargs=-1, required=True, metavar="INPUT.csv...")
@_harvest_options("harvest")
def harvest_command(inputs: tuple[str, ...], verbose: int, quiet: bool, **values: Any) -> None:
    """Fetch every result listed in the CSV exports, store its images, write the manifest.

    Each INPUT.csv needs 'model' and 'request_id' columns (or the ones --model-column and
    --id-column name); a glob (quoted, so the shell leaves it alone) reads every file it
    matches. All the files make one run, and a pair listed in several is harvested once.
    Requests already ok in OUT are skipped; everything else is (re)tried. The API key comes
    from the environment, never from an option.
    """
    _execute(Job(inputs=inputs, **values), verbose=verbose, quiet=quiet)


@main.command("run", short_help="Run the harvest a TOML job file describes (for cron and systemd).")
@click.argument("job_file", metavar="JOB.toml", type=click.Path(path_type=Path, dir_okay=False))
@click.argument("inputs", nargs=-1, metavar="[INPUT.csv...]")
@_harvest_options("run")
def run_command(
    job_file: Path, inputs: tuple[str, ...], verbose: int, quiet: bool, **values: Any
) -> None:
    """Run the harvest a job file describes (see jobs/nightly.toml); what cron and systemd call.

    Every option overrides the job file's value; INPUT.csv arguments, if any, replace its
    'inputs'. Relative paths inside the job file are relative to the job file's folder;
    on the command line, to the current folder. The API key comes from the environment
    variable the job's 'key-env' names (default HARVESTER_API_KEY, then FAL_KEY).
    Exits 8 if the job file is invalid, naming the key and its line.
    """
    overrides = {name: value for name, value in values.items() if value is not None}
    if inputs:
        overrides["inputs"] = inputs
    try:
        job = load_job(job_file, overrides)
    except HarvesterError as exc:
        _fail(exc, log_format=values["log_format"] or "text")
        return
    _execute(job, verbose=verbose, quiet=quiet)


def _execute(job: Job, *, verbose: int, quiet: bool) -> None:
    """Run ``job`` with the console set up for where it runs; exits with the run's code."""
    from harvester.run.pipeline import api_key_from_env, harvest, new_run_id

    run_id = new_run_id(datetime.now(UTC))
    console = Console(log_format=job.log_format, verbosity=-1 if quiet else verbose, run_id=run_id)
    started = time.time()
    try:
        if job.metrics_file is not None:
            metrics.check_writable(job.metrics_file)
    except HarvesterError as exc:
        console.failed(exc)
        sys.exit(int(exc.exit_code))
    try:
        api_key = api_key_from_env(os.environ, job.key_env)
        console.redact(api_key)
        config = job.harvest_config(api_key)
        stats = harvest(
            config,
            on_start=console.started,
            on_tick=console.tick,
            run_id=run_id,
            log_format=job.log_format,
        )
    except HarvesterError as exc:
        console.failed(exc)
        figures = metrics.RunFigures(
            out_dir=str(job.out),
            exit_code=int(exc.exit_code),
            started_at=started,
            finished_at=time.time(),
        )
        _write_metrics(job, figures, console)
        sys.exit(int(exc.exit_code))
    console.finished(stats)
    _write_metrics(job, _figures(stats), console)
    if job.compact and stats.exit_code in (ExitCode.OK, ExitCode.INCOMPLETE):
        from harvester.storage.compact import compact

        try:
            compacted = compact(job.out)
        except HarvesterError as exc:
            console.failed(exc)
            sys.exit(int(exc.exit_code))
        if not quiet:
            click.echo(compacted.summary())
    sys.exit(int(stats.exit_code))


def _figures(stats: RunStats) -> metrics.RunFigures:
    return metrics.RunFigures(
        out_dir=str(stats.out_dir),
        exit_code=int(stats.exit_code),
        started_at=stats.started_at.timestamp(),
        finished_at=stats.started_at.timestamp() + stats.elapsed,
        counters=stats.counters,
    )


def _write_metrics(job: Job, figures: metrics.RunFigures, console: Console) -> None:
    """The run's metrics, if asked for; a failure to write them is reported, and the run's
    own exit code stands (the figures are in the run record too)."""
    if job.metrics_file is None:
        return
    try:
        metrics.write_metrics(job.metrics_file, figures)
    except HarvesterError as exc:
        console.failed(exc)


@main.command("serve", short_help="Receive fal's signed webhooks into DIR and harvest them.")
@click.option(
    "--job",
    "job_file",
    metavar="JOB.toml",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Take the options from a job file: the top-level keys serve shares with 'run' (out, "
    "timeout, ...), then its [serve] table. Options given here override both.",
)
@_harvest_options("serve")
def serve_command(job_file: Path | None, verbose: int, quiet: bool, **values: Any) -> None:
    """Receive fal's webhook deliveries on POST /fal/webhook?model=owner/app[/path] and harvest
    each into OUT at once: the same parsing, image download, store and manifest as a fetched
    result (docs/webhooks.md).

    A delivery is answered 200 only once it is stored durably in OUT's inbox; one whose
    signature does not check (fal's ED25519, keys from --jwks-url), whose timestamp is over
    5 minutes off, or whose account is not a --fal-user-id is answered 401 and not stored.
    GET /healthz answers 200 while deliveries can be stored, 503 while they cannot. Runs
    until SIGTERM or Ctrl-C, then writes what it harvested and exits 0. Takes no lock: the
    nightly harvest, compact and verify run on the same OUT beside it, and 'harvester status
    OUT' shows it serving.
    """
    from harvester.jobs import ServeJob, load_serve_job
    from harvester.run.pipeline import new_run_id
    from harvester.serve import ServeConfig, serve_forever
    from harvester.serve.config import parse_listen
    from harvester.views.console import setup_logging

    context = click.get_current_context()
    given = {
        name: value
        for name, value in values.items()
        if context.get_parameter_source(name)
        in (click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT)
    }
    log_format = values["log_format"]
    try:
        if job_file is not None:
            job: ServeJob = load_serve_job(job_file, given)
        elif values.get("out") is None:
            raise click.UsageError("Missing option '--out' (or a job file with --job).")
        else:
            job = ServeJob(**values)
        log_format = job.log_format
        host, port = parse_listen(job.listen)
    except HarvesterError as exc:
        _fail(exc, log_format=log_format)
        return
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--listen") from exc
    config = ServeConfig(
        out=job.out,
        host=host,
        port=port,
        jwks_url=job.jwks_url,
        user_ids=frozenset(job.fal_user_id),
        keep_days=job.keep_deliveries,
        max_body_bytes=job.max_body_bytes,
        image_concurrency=job.image_concurrency,
        max_image_bytes=job.max_image_bytes,
        allow_private_images=job.allow_private_images,
        read_timeout=job.timeout,
        flush_every=job.flush_every,
    )
    run_id = new_run_id(datetime.now(UTC))
    setup_logging(
        -1 if quiet else max(verbose, 1), secrets=[], log_format=log_format, run_id=run_id
    )

    def say(message: str, **fields: object) -> None:
        """A line for the operator: plain text, or one JSON object with --log-format json."""
        if log_format == "json":
            logging.getLogger("harvester.serve").warning(message, extra=fields)
        else:
            click.echo(message, err=True)

    def ready(url: str) -> None:
        say(f"serving on {url} (stop with Ctrl-C or SIGTERM)", url=url)
        if not config.user_ids:
            say("warning: no --fal-user-id: deliveries of any fal account are accepted")

    try:
        summary = serve_forever(config, run_id=run_id, on_ready=ready)
    except HarvesterError as exc:
        _fail(exc, log_format=log_format)
        return
    except OSError as exc:
        click.echo(
            f"harvester: error: cannot listen on {job.listen}: {exc.strerror or exc}", err=True
        )
        sys.exit(int(ExitCode.USAGE))
    served, harvested = summary.served, summary.harvested
    refused = sum(served.refused.values())
    say(
        f"stopped: {served.accepted:,} deliveries stored ({served.repeated:,} repeated, "
        f"{refused:,} refused, {served.unavailable:,} answered 503); {harvested.done:,} "
        f"harvested ({harvested.requests['ok']:,} ok, {harvested.manifest_rows:,} rows)"
    )


@main.command("status", short_help="Did the last run work? Its record, exit code and meaning.")
@click.argument("out_dir", metavar="DIR", callback=_location)
@click.option(
    "--max-age",
    type=click.FloatRange(min=0, min_open=True),
    metavar="HOURS",
    default=None,
    help="Also exit 10 if the last run started more than HOURS ago: catches a run that "
    "never started (cron off, timer disabled) or was killed outright.",
)
@click.option(
    "--incomplete-ok",
    is_flag=True,
    help="Exit 0, not 3, when the last run finished with some requests not ok (expired or "
    "invalid ids that every run reports again). Never for 13: (almost) nothing ok.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@click.option(
    "-q",
    "--quiet",
    is_flag=True,
    help="Print nothing when the exit code is 0, so cron mails only when something is wrong.",
)
def status_command(
    out_dir: Path | str, max_age: float | None, incomplete_ok: bool, as_json: bool, quiet: bool
) -> None:
    """Did the last run work? Shows the last run record in DIR/runs (start, end, exit code and
    its meaning, inputs, counts by status, 429s, bytes) and whether a harvest is running now.

    Exits with the last run's own exit code: 0 every request ok, 3 finished but some
    requests not ok (retried next run; 0 with --incomplete-ok), 13 (almost) nothing ok,
    4/7/130 the run stopped early (see harvester -h); 10 if DIR has no run record, the last
    is older than --max-age, or it crashed (its record says running, its process is gone).
    """
    from harvester.views.status import status

    _check_folder(out_dir)
    age = timedelta(hours=max_age) if max_age is not None else None
    try:
        result = status(out_dir, max_age=age, incomplete_ok=incomplete_ok)
    except HarvesterError as exc:  # an s3:// location that cannot be read
        _fail(exc)
        return
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
    elif not (quiet and result.exit_code == 0):
        click.echo(printable(result.text(), newlines=True))
    sys.exit(result.exit_code)


@main.command(
    "report", short_help="Tables of what the harvest holds; --html for a page with charts."
)
@click.argument("out_dir", metavar="DIR", callback=_location)
@click.option(
    "--html",
    "html_file",
    metavar="FILE",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Write the report as one self-contained HTML page (tables, charts, a gallery of the "
    "latest run's images) instead of printing the tables.",
)
@click.option(
    "--gallery",
    "gallery_images",
    type=click.IntRange(min=0),
    default=48,
    show_default=True,
    help="Images of the latest run embedded in the HTML gallery at most.",
)
def report_command(out_dir: Path | str, html_file: Path | None, gallery_images: int) -> None:
    """What the harvest holds: requests by status and model, NSFW rate per model, inference-time
    percentiles per model (all over the latest state of every request), and images and bytes
    per run.

    The HTML page opens from disk and fetches nothing: inline CSS and SVG charts, images
    embedded (NSFW-flagged ones blurred), each capped at 2 MB and 40 MB in all.
    """
    from harvester.views import thumbnails
    from harvester.views.report import build
    from harvester.views.report_html import GalleryLimits, write_html

    _check_folder(out_dir)
    try:
        report = build(out_dir, gallery_limit=gallery_images)
        if html_file is None:
            click.echo(printable(report.text(), newlines=True))
            return
        written = write_html(report, html_file, limits=GalleryLimits(images=gallery_images))
    except HarvesterError as exc:
        _fail(exc)
        return
    click.echo(
        f"wrote {written.path} ({written.bytes / 1e6:,.1f} MB): {report.requests:,} requests, "
        f"{written.images_embedded} images embedded"
        + (" as thumbnails" if written.thumbnails else "")
        + (
            f", {written.images_placeholder} shown as placeholders"
            if written.images_placeholder
            else ""
        )
        + ("" if written.thumbnails else f" (for thumbnails: {thumbnails.INSTALL_HINT})")
    )


@main.command("verify", short_help="Re-hash every stored image against the manifest.")
@click.argument("out_dir", metavar="DIR", callback=_location)
def verify_command(out_dir: Path | str) -> None:
    """Re-hash every stored image against the manifest; report missing, corrupt, orphaned and
    non-image files and unreadable manifest parts. Exits 9 if anything is wrong."""
    from harvester.views.verify import verify

    _check_folder(out_dir)
    if isinstance(out_dir, Path):
        _require_harvest_folder(out_dir, ("manifest", "images"))
    try:
        report = verify(out_dir)
    except HarvesterError as exc:
        _fail(exc)
        return
    click.echo(printable(report.summary(), newlines=True))
    sys.exit(int(ExitCode.OK if report.ok else ExitCode.VERIFY))


def _require_harvest_folder(out_dir: Path, names: tuple[str, ...]) -> None:
    """Exit 2 unless ``out_dir`` holds one of the folders a harvest makes."""
    if not any((out_dir / name).is_dir() for name in names):
        folders = " or ".join(f"{name}/" for name in names)
        click.echo(
            f"harvester: error: {out_dir} has no {folders} folder: is it the --out folder of "
            "a harvest?",
            err=True,
        )
        sys.exit(int(ExitCode.USAGE))


@main.command("compact", short_help="Merge the manifest's parts; rewrite the current-state table.")
@click.argument("out_dir", metavar="DIR", callback=_location)
def compact_command(out_dir: Path | str) -> None:
    """Merge every run's manifest parts into a few large ones and rewrite the current-state
    table (DIR/current/), so the latest state reads fast however many runs there were.
    DIR is a folder or s3://bucket/prefix.

    No row and no history is lost: every row keeps its run_id. It is atomic: a reader
    during a compaction, and one after a compaction was killed, sees each row once; the
    next compaction finishes what a killed one left. Holds DIR's lock (exit 5 while a
    harvest runs); a running 'harvester serve' goes on: its parts written so far are merged,
    its folder left to it. Job files run it after each harvest with 'compact = true'.
    """
    from harvester.storage.compact import compact

    if isinstance(out_dir, Path):
        _require_harvest_folder(out_dir, ("manifest",))
    try:
        stats = compact(out_dir)
    except HarvesterError as exc:
        _fail(exc)
        return
    click.echo(stats.summary())


@main.command("sandbox")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8787,
    show_default=True,
    help="Port on 127.0.0.1 (0 picks a free one).",
)
@click.option(
    "--key", default="sandbox-key", show_default=True, help="The API key the sandbox accepts."
)
@click.option(
    "--auth-scheme",
    type=click.Choice(["any", "bearer", "key"]),
    default="any",
    show_default=True,
    help="Which Authorization scheme the sandbox accepts.",
)
@click.option(
    "--pairs",
    "pairs_csv",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Serve only the request ids of this CSV export (others 404).",
)
@click.option(
    "--faults",
    default="",
    metavar="SPEC",
    help="Fault rates, e.g. 'mixed=0.2' or '429=0.05,502html=0.03,reset=0.02'.",
)
@click.option(
    "--latency-ms",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Delay added to every response.",
)
@click.option(
    "--image-bytes",
    type=click.IntRange(min=1_000),
    default=30_000,
    show_default=True,
    help="Approximate size of each synthetic image.",
)
@click.option(
    "--slow",
    "slow_seconds",
    type=click.FloatRange(min=0),
    default=2.0,
    show_default=True,
    help="Seconds a 'slow' fault delays its answer.",
)
@click.option(
    "--retry-after",
    "retry_after_seconds",
    type=click.FloatRange(min=0),
    default=1.0,
    show_default=True,
    help="Seconds the Retry-After of a '429ra' fault asks for.",
)
@click.option(
    "--throttle-share",
    type=click.FloatRange(0, 1),
    default=0.0,
    show_default=True,
    help="Share of request ids whose first --throttle-times result fetches answer 429 "
    "(half of them with Retry-After).",
)
@click.option(
    "--throttle-times",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help="429s each throttled request id gets before its result.",
)
@click.option(
    "--max-rps",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Answer 429 to result requests beyond this many accepted in the last second.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="World seed.")
@click.option(
    "--webhook",
    "webhook_url",
    metavar="URL",
    default=None,
    help="Deliver each submitted request (POST /owner/app) here when it is done, signed as "
    "fal signs webhooks (keys at /.well-known/jwks.json); a submission's ?fal_webhook= "
    "overrides it.",
)
@click.option(
    "--webhook-user-id",
    default="sandbox-user",
    show_default=True,
    metavar="ID",
    help="The fal account the deliveries are signed for.",
)
def sandbox_command(
    port: int,
    key: str,
    auth_scheme: str,
    pairs_csv: Path | None,
    faults: str,
    latency_ms: float,
    image_bytes: int,
    slow_seconds: float,
    retry_after_seconds: float,
    throttle_share: float,
    throttle_times: int,
    max_rps: float | None,
    seed: int,
    webhook_url: str | None,
    webhook_user_id: str,
) -> None:
    """Run a local fal-compatible API on 127.0.0.1 that serves synthetic results and images.

    Request-id prefixes choose a behaviour: pending-, missing-, fail-, invalid-, empty-,
    inline-, expiredimg-, notimage-, redirect-, badjson-, badshape-, dup-; anything else is
    a normal result with 1-4 images.

    Webhooks: POST /owner/app[/path] submits a request (the JSON input's 'request_id', if
    any, is its id); with --webhook URL (or ?fal_webhook=URL) its result is delivered there
    at once, signed like fal's, and retried with doubling waits until answered 2xx.
    """
    from harvester.run import reader
    from harvester.sandbox import FaultRates, SandboxConfig, serve_forever
    from harvester.sandbox.images import missing_encoder_note

    try:
        fault_rates = FaultRates.parse(faults) if faults else FaultRates()
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--faults") from exc
    known: frozenset[str] | None = None
    try:
        if pairs_csv is not None:
            files = reader.inspect([pairs_csv])
            known = frozenset(
                item.request_id
                for batch in reader.iter_items(files)
                for item in batch
                if isinstance(item, reader.Pair)
            )
    except HarvesterError as exc:
        _fail(exc)
    try:
        config = SandboxConfig(
            port=port,
            key=key,
            auth_scheme=auth_scheme,
            faults=fault_rates,
            seed=seed,
            image_bytes=image_bytes,
            latency=latency_ms / 1000,
            slow_seconds=slow_seconds,
            retry_after_seconds=retry_after_seconds,
            known_request_ids=known,
            throttle_share=throttle_share,
            throttle_times=throttle_times,
            max_rps=max_rps,
            webhook_url=webhook_url,
            webhook_user_id=webhook_user_id,
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc

    def ready(sandbox: object) -> None:
        base = getattr(sandbox, "base_url", "")
        click.echo(f"sandbox listening on {base} (key: {key}); stop with Ctrl-C", err=True)
        if webhook_url:
            click.echo(f"webhooks to {webhook_url}, keys at {base}/.well-known/jwks.json", err=True)
        click.echo(
            f"try: HARVESTER_API_KEY={key} harvester harvest sample_inputs/*.csv "
            f"--base-url {base} --out sandbox-out",
            err=True,
        )
        if (note := missing_encoder_note()) is not None:
            click.echo(note, err=True)

    try:
        serve_forever(config, on_ready=ready)
    except OSError as exc:
        click.echo(
            f"harvester: error: cannot listen on 127.0.0.1:{port}: {exc.strerror or exc}", err=True
        )
        sys.exit(int(ExitCode.USAGE))

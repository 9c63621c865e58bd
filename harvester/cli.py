"""The ``harvester`` command: parses options, builds the library's objects, reports results.

Only the project's own errors are turned into a message and an exit code here; see
``harvester.errors.ExitCode`` for the codes.
"""

from __future__ import annotations

import glob
import os
import sys
from pathlib import Path

import click

from harvester import __version__
from harvester.console import Progress, setup_logging
from harvester.errors import ExitCode, HarvesterError, InputError
from harvester.pipeline import (
    AUTH_SCHEMES,
    DEFAULT_BASE_URL,
    HarvestConfig,
    api_key_from_env,
    harvest,
)
from harvester.retry import RetryPolicy

_GLOB_CHARS = set("*?[")


def expand_inputs(patterns: tuple[str, ...]) -> tuple[Path, ...]:
    """Paths as given, plus shell-style globs the shell did not expand (job files, quoting)."""
    paths: list[Path] = []
    for pattern in patterns:
        if _GLOB_CHARS & set(pattern) and not Path(pattern).exists():
            matches = sorted(glob.glob(pattern, recursive=True))
            if not matches:
                raise InputError(f"no file matches {pattern!r}")
            paths.extend(Path(m) for m in matches)
        else:
            paths.append(Path(pattern))
    unique = {p.resolve(): p for p in reversed(paths)}  # the same file once, as first named
    return tuple(reversed(unique.values()))


def _fail(exc: HarvesterError) -> None:
    click.echo(f"harvester: error: {exc}", err=True)
    sys.exit(int(exc.exit_code))


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="harvester")
def main() -> None:
    """Harvest fal.ai-compatible queue results and their images into a content-addressed
    store with a Parquet manifest.

    \b
    Exit codes: 0 all ok; 2 usage error; 3 finished but some requests not ok;
    4 key rejected; 5 another run holds the output folder; 6 bad input file;
    7 output folder not writable; 8 bad job file; 9 verify found problems; 130 interrupted.
    """


@main.command("harvest")
@click.argument("inputs", nargs=-1, required=True, metavar="INPUT.csv...")
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(path_type=Path),
    help="Output folder: images/, manifest/ and runs/ live here.",
)
@click.option(
    "--base-url",
    envvar="HARVESTER_BASE_URL",
    default=DEFAULT_BASE_URL,
    show_default=True,
    help="The API's base URL (env HARVESTER_BASE_URL).",
)
@click.option(
    "--auth-scheme",
    type=click.Choice(AUTH_SCHEMES),
    default="auto",
    show_default=True,
    help="Authorization header: 'bearer' (relays), 'key' (fal.ai); 'auto' uses key "
    "for fal.ai's queue host and bearer elsewhere.",
)
@click.option(
    "--key-env",
    metavar="NAME",
    default=None,
    help="Read the API key from this environment variable instead of HARVESTER_API_KEY / FAL_KEY.",
)
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    default=32,
    show_default=True,
    help="Result fetches in flight.",
)
@click.option(
    "--image-concurrency",
    type=click.IntRange(min=1),
    default=32,
    show_default=True,
    help="Image downloads in flight.",
)
@click.option(
    "--rps",
    type=click.FloatRange(min=0, min_open=True),
    default=50.0,
    show_default=True,
    help="Result requests per second, retries included.",
)
@click.option(
    "--max-attempts",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Attempts per request on transient errors (429, 5xx gateway, network).",
)
@click.option(
    "--retry-budget",
    type=click.FloatRange(min=0, min_open=True),
    default=300.0,
    show_default=True,
    help="Seconds one request may spend retrying.",
)
@click.option(
    "--pending-wait",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Seconds to keep re-polling results still in progress (0: record as "
    "pending at once; the next run retries them).",
)
@click.option(
    "--max-image-bytes",
    type=click.IntRange(min=1),
    default=64 * 1024 * 1024,
    show_default=True,
    help="Refuse images larger than this.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=60.0,
    show_default=True,
    help="Seconds to wait for a response or the next body bytes.",
)
@click.option(
    "--flush-every",
    type=click.FloatRange(min=0, min_open=True),
    default=30.0,
    show_default=True,
    help="Seconds between manifest writes: a crash loses at most this much finished work.",
)
@click.option("-v", "--verbose", count=True, help="More log lines (-vv: every HTTP request).")
@click.option("-q", "--quiet", is_flag=True, help="Only errors and the summary.")
def harvest_command(
    inputs: tuple[str, ...],
    out_dir: Path,
    base_url: str,
    auth_scheme: str,
    key_env: str | None,
    concurrency: int,
    image_concurrency: int,
    rps: float,
    max_attempts: int,
    retry_budget: float,
    pending_wait: float,
    max_image_bytes: int,
    timeout: float,
    flush_every: float,
    verbose: int,
    quiet: bool,
) -> None:
    """Fetch every result listed in the CSV exports, store its images, write the manifest.

    Each INPUT.csv needs 'model' and 'request_id' columns. Requests already ok in OUT are
    skipped; everything else is (re)tried.
    """
    try:
        api_key = api_key_from_env(os.environ, key_env)
        setup_logging(-1 if quiet else verbose, secrets=[api_key])
        config = HarvestConfig(
            inputs=expand_inputs(inputs),
            out_dir=out_dir,
            api_key=api_key,
            base_url=base_url,
            auth_scheme=auth_scheme,
            concurrency=concurrency,
            image_concurrency=image_concurrency,
            rps=rps,
            retry=RetryPolicy(max_attempts=max_attempts, budget=retry_budget),
            pending_wait=pending_wait,
            max_image_bytes=max_image_bytes,
            read_timeout=timeout,
            seconds_per_part=flush_every,
        )
        progress = Progress(sys.stderr, enabled=sys.stderr.isatty() and not quiet)
        try:
            stats = harvest(config, on_tick=progress.tick)
        finally:
            progress.close()
    except HarvesterError as exc:
        _fail(exc)
        return
    click.echo(stats.summary())
    sys.exit(int(stats.exit_code))


@main.command("verify")
@click.argument("out_dir", metavar="DIR", type=click.Path(path_type=Path, file_okay=False))
def verify_command(out_dir: Path) -> None:
    """Re-hash every stored image against the manifest; report missing, corrupt and orphaned
    files and unreadable manifest parts. Exits 9 if anything is wrong."""
    from harvester.verify import verify

    if not out_dir.is_dir():
        click.echo(f"harvester: error: {out_dir} is not a folder", err=True)
        sys.exit(int(ExitCode.USAGE))
    try:
        report = verify(out_dir)
    except HarvesterError as exc:
        _fail(exc)
        return
    click.echo(report.summary())
    sys.exit(int(ExitCode.OK if report.ok else ExitCode.VERIFY))


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
@click.option("--seed", type=int, default=0, show_default=True, help="World seed.")
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
    seed: int,
) -> None:
    """Run a local fal-compatible API on 127.0.0.1 that serves synthetic results and images.

    \b
    Request-id prefixes choose a behaviour: pending-, missing-, fail-, invalid-, empty-,
    inline-, expiredimg-, notimage-, redirect-, badjson-, badshape-, dup-; anything else is
    a normal result with 1-4 images.
    """
    from harvester import reader
    from harvester.sandbox import FaultRates, SandboxConfig, serve_forever

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
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc

    def ready(sandbox: object) -> None:
        base = getattr(sandbox, "base_url", "")
        click.echo(f"sandbox listening on {base} (key: {key}); stop with Ctrl-C", err=True)
        click.echo(
            f"try: HARVESTER_API_KEY={key} harvester harvest sample_inputs/*.csv "
            f"--base-url {base} --out harvest-out",
            err=True,
        )

    try:
        serve_forever(config, on_ready=ready)
    except OSError as exc:
        click.echo(
            f"harvester: error: cannot listen on 127.0.0.1:{port}: {exc.strerror or exc}", err=True
        )
        sys.exit(int(ExitCode.USAGE))

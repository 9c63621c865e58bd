"""The options of the commands that harvest, each declared once.

An ``Option`` says everything about one: its name (the long option without dashes, and the
job file's key), type and range or choices, default, help, which commands take it, an
environment variable, and where its value goes in the run's configuration. From ``OPTIONS``
``harvester.cli`` makes the click options of ``harvest`` and ``run``, ``harvester.jobs`` a job
file's keys and their checks, and ``harvester.run.config`` the ``HarvestConfig`` and its
defaults. Adding an option is one declaration here, plus its tests.

Plain data, cheap to load: nothing here imports click, an HTTP library or the run layer.
"""

from __future__ import annotations

import re
from dataclasses import KW_ONLY, dataclass
from typing import Any, Final, Literal

from harvester.defaults import AUTH_SCHEMES, DEFAULT_BASE_URL, LOG_FORMATS

Kind = Literal["text", "texts", "integer", "number", "boolean", "path", "location", "globs"]
"""``path``: a file, relative to the job file's folder in a job file; ``location``: a folder
or ``s3://bucket/prefix``; ``globs``: a glob or a list of them (a job file's ``inputs``);
``texts``: a repeatable option, a string or a list of them in a job file."""

HARVEST: Final = frozenset({"harvest", "run"})
"""``harvest`` takes its values from the command line; ``run`` from a job file, which each
option given on the command line overrides."""
JOB_COMMAND: Final = "run"
"""The command whose job file holds the top-level keys."""
SERVE: Final = "serve"
"""``harvester serve``: takes the top-level keys it shares with ``run`` from a job file, and
its own (or overriding) values from the file's ``[serve]`` table."""
SERVING: Final = HARVEST | {SERVE}
FAL_JWKS_URL: Final = "https://rest.alpha.fal.ai/.well-known/jwks.json"
AUTO_WORKERS_RPS: Final = 500.0
"""``--workers auto`` uses more than one process from this ``--rps`` up: below it one process
spends well under a core (docs/performance.md, "Processes")."""
AUTO_WORKERS_MAX: Final = 4
IMAGE_SLOTS_PER_FETCH: Final = 2
"""Image download slots per result fetch slot: enough to keep every fetch slot busy on a slow
link too (docs/performance.md, "Slow link", has the figures)."""


@dataclass(frozen=True, slots=True)
class Option:
    """One option of the commands in ``commands``, and the job-file key of the same name."""

    name: str
    """``max-attempts``: ``--max-attempts`` on the command line, ``max-attempts`` in a job file."""
    kind: Kind
    default: Any
    help: str
    _: KW_ONLY
    minimum: float | None = None
    above: bool = False
    """True: the value must be greater than ``minimum``, not equal to it."""
    choices: tuple[str, ...] = ()
    pattern: str | None = None
    """A job file's text must match this whole (``re.fullmatch``), else the error says
    ``'key' <mismatch>``; the value itself is never echoed (it may be a pasted secret)."""
    mismatch: str = ""
    metavar: str | None = None
    envvar: str | None = None
    """Read when the option is not given, by the commands that take no job file."""
    default_text: str | None = None
    """The default in words, when it is derived (``2 x --concurrency``) or not ours."""
    negatable: bool = False
    """A boolean that has a ``--no-`` form too."""
    required: str | None = None
    """A harvest cannot go without it; says what it is (``the output folder``)."""
    command_line: bool = True
    """False: a job-file key only (the commands take ``inputs`` as arguments)."""
    setting: str | None = ""
    """Where the value goes in ``HarvestConfig``: ``""`` the field of the option's own name
    (dashes as underscores), another field's name, ``field.attribute`` for a setting made of
    several options (``retry.budget``), or None: not part of the run's configuration."""
    commands: frozenset[str] = HARVEST
    command_defaults: tuple[tuple[str, Any], ...] = ()
    """``(command, default)`` for a command whose default is not ``default``."""
    auto: bool = False
    """An integer option that takes the word ``auto`` too: None, the harvester chooses."""

    @property
    def attr(self) -> str:
        """The option's Python name: ``max_attempts``."""
        return self.name.replace("-", "_")

    @property
    def target(self) -> str | None:
        """``setting`` with ``""`` spelled out."""
        return self.attr if self.setting == "" else self.setting

    def default_for(self, command: str) -> Any:
        return dict(self.command_defaults).get(command, self.default)

    def refusal(self, value: Any) -> str | None:
        """What is wrong with a value of the right type (``must be at least 1``), or None."""
        if self.choices and value not in self.choices:
            return f"must be one of {', '.join(self.choices)}"
        if isinstance(value, str) and self.pattern and not re.fullmatch(self.pattern, value):
            return self.mismatch
        if self.minimum is None or not isinstance(value, int | float):
            return None
        if self.above and value <= self.minimum:
            return f"must be greater than {self.minimum:g}"
        if value < self.minimum:
            return f"must be at least {self.minimum:g}"
        return None


# Every option, in the order help and the docs list them; read it when needed, not at import,
# where a test may add one. A table, each option in a row or two (the formatter would give
# every argument a line of its own).
# fmt: off
OPTIONS: tuple[Option, ...] = (
    Option("inputs", "globs", None,
           "CSV exports: paths or glob patterns (** matches folders recursively).",
           required="CSV exports to read", command_line=False, setting=None),
    Option("out", "location", None,
           "Output folder, or s3://bucket/prefix (credentials from AWS_* environment variables): "
           "images/, manifest/ and runs/ live there.",
           metavar="DIR|s3://BUCKET/PREFIX", required="the output folder", setting=None,
           commands=SERVING),
    Option("base-url", "text", DEFAULT_BASE_URL, "The API's base URL.",
           envvar="HARVESTER_BASE_URL", pattern=r"(?is)https?://.*",
           mismatch="must start with http:// or https://"),
    Option("auth-scheme", "text", "auto",
           "Authorization header: 'bearer' (relays), 'key' (fal.ai); 'auto' uses key for "
           "fal.ai's queue host and bearer elsewhere.", choices=AUTH_SCHEMES),
    Option("key-env", "text", None,
           "Read the API key from this environment variable instead of HARVESTER_API_KEY / "
           "FAL_KEY.", metavar="NAME", setting=None, pattern="[A-Za-z_][A-Za-z0-9_]*",
           mismatch="must be the name of an environment variable (letters, digits and _), not "
           "the key itself"),
    Option("concurrency", "integer", 32, "Result fetches in flight.", minimum=1),
    Option("image-concurrency", "integer", None, "Image downloads in flight.", minimum=1,
           default_text=f"{IMAGE_SLOTS_PER_FETCH} x --concurrency", commands=SERVING,
           command_defaults=((SERVE, 16),)),
    Option("rps", "number", 50.0, "Result requests per second, retries included.",
           minimum=0, above=True),
    Option("workers", "integer", None,
           "Processes that fetch and download, this one included, or 'auto'.", minimum=1,
           auto=True, metavar="N|auto",
           default_text=f"auto: one per core (at most {AUTO_WORKERS_MAX}) at --rps "
           f"{AUTO_WORKERS_RPS:g} or more, else 1"),
    Option("max-attempts", "integer", 8,
           "Attempts per request on transient errors (429, 5xx gateway, network).",
           minimum=1, setting="retry.max_attempts"),
    Option("retry-budget", "number", 300.0, "Seconds one request may spend retrying.",
           minimum=0, above=True, setting="retry.budget"),
    Option("pending-wait", "number", 0.0,
           "Seconds to keep re-polling results still in progress (0: record as pending at once; "
           "the next run retries them).", minimum=0),
    Option("max-image-bytes", "integer", 64 * 1024 * 1024, "Refuse images larger than this.",
           minimum=1, commands=SERVING),
    Option("allow-private-images", "boolean", False,
           "Fetch images from loopback, link-local and private addresses too (refused unless "
           "the API itself is on one).", commands=SERVING),
    Option("timeout", "number", 60.0,
           "Seconds to wait for a response or the next body bytes; one attempt takes at most 4x "
           "this (at least 30 s).", minimum=0, above=True, setting="read_timeout",
           commands=SERVING),
    Option("flush-every", "number", 30.0,
           "Seconds between manifest writes: a crash loses at most this much finished work.",
           minimum=0, above=True, setting="seconds_per_part", commands=SERVING),
    Option("log-format", "text", "text",
           "text: a progress bar on a terminal, a few plain lines elsewhere (cron mail); json: "
           "one JSON object per line on stderr, each with the run_id, for log aggregators.",
           choices=LOG_FORMATS, setting=None, commands=SERVING),
    Option("model-column", "text", "model",
           "The exports' column holding the model (e.g. endpoint_id, app).",
           metavar="NAME", setting="columns.model"),
    Option("id-column", "text", "request_id",
           "The exports' column holding the request id (e.g. id, request).",
           metavar="NAME", setting="columns.request_id"),
    Option("metrics-file", "path", None,
           "At the end of the run, write its figures here in Prometheus' text format (for "
           "node_exporter's textfile collector; docs/metrics.md).", setting=None),
    Option("give-up-after", "number", 7.0,
           "A request not ok this many days after it was first seen gets the final status "
           "'expired' and is no longer fetched.", minimum=0, above=True, metavar="DAYS"),
    Option("retry-expired", "boolean", False,
           "Fetch 'expired' requests of these exports again (and give up on none this run)."),
    Option("compact", "boolean", False,
           "Run 'harvester compact' on the output folder after the harvest.",
           negatable=True, setting=None),
    Option("engine", "text", "local",
           "What runs the shards: 'local', this machine's processes (--workers); 'ray', Ray "
           "tasks on the cluster at RAY_ADDRESS or --ray-address (needs pip install "
           "'harvester[ray]'; docs/cluster.md).", choices=("local", "ray")),
    Option("ray-address", "text", None, "The Ray head node, for --engine ray.",
           metavar="HOST:PORT", default_text="RAY_ADDRESS"),
    Option("shared-fs", "boolean", False,
           "--out is on a file system every node of the Ray cluster mounts at the same path "
           "(needed for a local --out on a cluster of several nodes)."),
    Option("listen", "text", "127.0.0.1:8790",
           "Address and port to receive fal's webhooks on (put a TLS proxy in front: "
           "docs/webhooks.md).", metavar="HOST:PORT", pattern=r"\[?[^\s\]]*\]?:\d{1,5}",
           mismatch="must be HOST:PORT", setting=None, commands=frozenset({SERVE})),
    Option("jwks-url", "text", FAL_JWKS_URL,
           "Where the keys that sign deliveries are published (a JWKS, cached up to 24 h).",
           pattern=r"(?is)https?://.*", mismatch="must start with http:// or https://",
           setting=None, commands=frozenset({SERVE})),
    Option("fal-user-id", "texts", (),
           "Accept deliveries of this fal account only (repeatable). Strongly advised: a valid "
           "signature proves fal sent a delivery, not that it is yours.", metavar="ID",
           setting=None, commands=frozenset({SERVE})),
    Option("keep-deliveries", "number", 7.0,
           "Days delivered bodies are kept in the output's inbox after they are harvested.",
           minimum=0, above=True, metavar="DAYS", setting=None, commands=frozenset({SERVE})),
    Option("max-body-bytes", "integer", 32 * 1024 * 1024,
           "Refuse deliveries larger than this (413, unread).", minimum=1, setting=None,
           commands=frozenset({SERVE})),
)
# fmt: on


def for_command(command: str) -> tuple[Option, ...]:
    """The options ``command`` takes."""
    return tuple(option for option in OPTIONS if command in option.commands)


def defaults(command: str = JOB_COMMAND) -> dict[str, Any]:
    """Each option's default for ``command``, by its Python name."""
    return {option.attr: option.default_for(command) for option in for_command(command)}

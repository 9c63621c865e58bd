"""Job files: everything a nightly run needs except the secret, in one TOML file.

    # jobs/nightly.toml
    inputs = ["exports/*.csv"]        # globs of CSV exports; all of them make one run
    out = "/srv/harvest"
    base-url = "https://relay.example"
    key-env = "RELAY_KEY"             # the *name* of the variable holding the key

Keys are the long options of ``harvester harvest`` without their dashes, plus ``inputs`` and
``out``. Relative paths in a job file resolve against the job file's own folder, so a job
means the same thing whatever the current directory is (cron starts in $HOME, systemd in /).
An unknown key or a wrong type is a ``ConfigError`` naming the file, the line and the key.

``Job`` is also what ``harvester harvest`` builds from its options: both commands turn a Job
into a ``HarvestConfig`` the same way.
"""

from __future__ import annotations

import difflib
import glob
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from harvester.defaults import AUTH_SCHEMES, DEFAULT_BASE_URL
from harvester.errors import ConfigError, InputError
from harvester.storage.objects import as_location, open_store
from harvester.views.console import LOG_FORMATS

if TYPE_CHECKING:  # the run layer is loaded only by the commands that run a harvest
    from harvester.run.pipeline import HarvestConfig

_GLOB_CHARS: Final = frozenset("*?[")
_ENV_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True, slots=True, kw_only=True)
class Job:
    """One harvest, described by a job file or by ``harvest``'s command line."""

    inputs: tuple[str, ...]
    """CSV exports: paths or glob patterns (``**`` matches folders recursively)."""
    out: Path | str
    """The output folder, or ``s3://bucket/prefix``."""
    base_url: str = DEFAULT_BASE_URL
    auth_scheme: str = "auto"
    key_env: str | None = None
    """The name of the environment variable that holds the API key (None: the usual ones)."""
    concurrency: int = 32
    image_concurrency: int | None = None
    """None: two per result fetch (``concurrency``)."""
    rps: float = 50.0
    workers: int | None = None
    """Processes that fetch and download; None: chosen from ``rps`` and the cores."""
    max_attempts: int = 8
    retry_budget: float = 300.0
    pending_wait: float = 0.0
    max_image_bytes: int = 64 * 1024 * 1024
    allow_private_images: bool = False
    timeout: float = 60.0
    flush_every: float = 30.0
    """Seconds between manifest writes: a crash loses at most this much finished work."""
    log_format: str = "text"
    """``text`` or ``json`` (one object per line, for log aggregators)."""
    model_column: str = "model"
    """The exports' column with the model (``endpoint_id``, ``app``, ... in some exports)."""
    id_column: str = "request_id"
    """The exports' column with the request id."""
    metrics_file: Path | None = None
    """Where to write the run's figures for node_exporter's textfile collector (None: nowhere)."""
    give_up_after: float = 7.0
    """Days after its first row a request never ok gets a final ``expired`` row."""
    retry_expired: bool = False
    """Fetch ``expired`` requests again this run (and give up on none)."""
    compact: bool = False
    """Run ``harvester compact`` on ``out`` after a harvest that finished (exit 0 or 3)."""
    engine: str = "local"
    """``local`` (this machine's processes) or ``ray`` (a Ray cluster; docs/cluster.md)."""
    ray_address: str | None = None
    """The Ray head's ``host:port``; None: ``RAY_ADDRESS``."""
    shared_fs: bool = False
    """``out`` is on a file system every node of the cluster mounts at the same path."""
    source: Path | None = field(default=None, compare=False)
    """The job file this came from, if any."""

    def harvest_config(self, api_key: str) -> HarvestConfig:
        """The library's run configuration; expands ``inputs`` (``InputError`` if a pattern
        matches nothing)."""
        from harvester.api.retry import RetryPolicy
        from harvester.run.pipeline import HarvestConfig
        from harvester.run.reader import Columns

        return HarvestConfig(
            inputs=expand_inputs(self.inputs),
            out=open_store(self.out),
            api_key=api_key,
            base_url=self.base_url,
            auth_scheme=self.auth_scheme,
            concurrency=self.concurrency,
            image_concurrency=self.image_concurrency,
            rps=self.rps,
            workers=self.workers,
            retry=RetryPolicy(max_attempts=self.max_attempts, budget=self.retry_budget),
            pending_wait=self.pending_wait,
            max_image_bytes=self.max_image_bytes,
            allow_private_images=self.allow_private_images,
            read_timeout=self.timeout,
            seconds_per_part=self.flush_every,
            columns=Columns(model=self.model_column, request_id=self.id_column),
            give_up_after=self.give_up_after,
            retry_expired=self.retry_expired,
            engine=self.engine,
            ray_address=self.ray_address,
            shared_fs=self.shared_fs,
        )


def expand_inputs(patterns: tuple[str, ...]) -> tuple[Path, ...]:
    """Paths as given, plus shell-style globs the shell did not expand (job files, quoting).
    A file named twice (or matched by two patterns) is read once."""
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


@dataclass(frozen=True, slots=True)
class _Key:
    """What one job-file key accepts."""

    kind: str
    """``strings`` (a string or a list of them), ``string``, ``integer``, ``number`` or
    ``boolean``."""
    minimum: float | None = None
    above: bool = False
    """True: the value must be greater than ``minimum``, not equal to it."""
    choices: tuple[str, ...] = ()


_KEYS: Final[dict[str, _Key]] = {
    "inputs": _Key("strings"),
    "out": _Key("string"),
    "base-url": _Key("string"),
    "auth-scheme": _Key("string", choices=AUTH_SCHEMES),
    "key-env": _Key("string"),
    "concurrency": _Key("integer", 1),
    "image-concurrency": _Key("integer", 1),
    "rps": _Key("number", 0, above=True),
    "workers": _Key("integer", 1),
    "max-attempts": _Key("integer", 1),
    "retry-budget": _Key("number", 0, above=True),
    "pending-wait": _Key("number", 0),
    "max-image-bytes": _Key("integer", 1),
    "allow-private-images": _Key("boolean"),
    "timeout": _Key("number", 0, above=True),
    "flush-every": _Key("number", 0, above=True),
    "log-format": _Key("string", choices=LOG_FORMATS),
    "model-column": _Key("string"),
    "id-column": _Key("string"),
    "metrics-file": _Key("string"),
    "give-up-after": _Key("number", 0, above=True),
    "retry-expired": _Key("boolean"),
    "compact": _Key("boolean"),
    "engine": _Key("string", choices=("local", "ray")),
    "ray-address": _Key("string"),
    "shared-fs": _Key("boolean"),
}
KEYS: Final = tuple(_KEYS)
"""Every key a job file may hold, in the order the docs list them."""
assert {k.replace("-", "_") for k in KEYS} == {f.name for f in fields(Job) if f.name != "source"}, (
    "every Job field has a job-file key and every key a field"
)

_SECRET_KEYS: Final = frozenset({"key", "api-key", "api_key", "apikey", "token", "secret"})


def load_job(path: Path, overrides: Mapping[str, object] | None = None) -> Job:
    """Read a job file. ``overrides`` (Job field names: ``out``, ``rps``, ...) replace the
    file's values; they come from the command line, so relative paths in them stay relative
    to the current directory. Raises ``ConfigError`` for anything wrong with the file."""
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read job file {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc

    values: dict[str, Any] = {}  # Job field -> value, each checked by _check
    for key, value in data.items():
        line = _line_of(text, key)
        where = f"{path}:{line}" if line else str(path)
        values[key.replace("-", "_")] = _check(where, key, value)
    base = path.resolve().parent
    if "inputs" in values:
        values["inputs"] = tuple(_resolve(base, p) for p in values["inputs"])
    for key in ("out", "metrics_file"):
        if key in values:
            values[key] = as_location(values[key], base=base)
    values.update(overrides or {})
    for required, what in (("inputs", "CSV exports to read"), ("out", "the output folder")):
        if required not in values:
            raise ConfigError(
                f"{path}: missing key {required!r} ({what}); add it to the file "
                f"or give it on the command line"
            )
    return Job(source=path, **values)


def _check(where: str, key: str, value: object) -> object:
    """The value if ``key`` accepts it; else a ``ConfigError`` naming the place and the key."""
    spec = _KEYS.get(key)
    if spec is None:
        if key.lower() in _SECRET_KEYS:
            raise ConfigError(
                f"{where}: {key!r}: the API key does not belong in a job file; put it in the "
                "environment (an EnvironmentFile for systemd) and name the variable with key-env"
            )
        close = difflib.get_close_matches(key, KEYS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"{where}: unknown key {key!r}; {hint}known keys: {', '.join(KEYS)}")
    if spec.kind == "strings":
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not items or not all(isinstance(v, str) for v in items):
            raise ConfigError(
                f"{where}: {key!r} must be a glob or a non-empty list of globs, "
                f"not {_describe(value)}"
            )
        if not all(item.strip() for item in items):
            raise ConfigError(f"{where}: {key!r} holds an empty path")
        return tuple(items)
    if spec.kind == "string":
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(
                f"{where}: {key!r} must be a non-empty string, not {_describe(value)}"
            )
        if key == "key-env" and not _ENV_NAME.fullmatch(value):
            # Never echo this value: someone may have pasted the key itself here.
            raise ConfigError(
                f"{where}: 'key-env' must be the name of an environment variable "
                "(letters, digits and _), not the key itself"
            )
        if key == "base-url" and not value.startswith(("http://", "https://")):
            raise ConfigError(f"{where}: 'base-url' must start with http:// or https://")
        if spec.choices and value not in spec.choices:
            raise ConfigError(f"{where}: {key!r} must be one of {', '.join(spec.choices)}")
        return value
    if spec.kind == "boolean":
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {key!r} must be true or false, not {_describe(value)}")
        return value
    allowed = int if spec.kind == "integer" else int | float
    if not isinstance(value, allowed) or isinstance(value, bool):
        article = "an" if spec.kind == "integer" else "a"
        raise ConfigError(f"{where}: {key!r} must be {article} {spec.kind}, not {_describe(value)}")
    if spec.minimum is not None and (value <= spec.minimum if spec.above else value < spec.minimum):
        bound = f"greater than {spec.minimum:g}" if spec.above else f"at least {spec.minimum:g}"
        raise ConfigError(f"{where}: {key!r} must be {bound}, not {value!r}")
    return float(value) if spec.kind == "number" else value


def _describe(value: object) -> str:
    """A TOML value's type and a short rendering of it, for error messages."""
    kinds: tuple[tuple[type, str], ...] = (
        (bool, "a boolean"),
        (int, "an integer"),
        (float, "a number"),
        (str, "a string"),
        (list, "an array"),
        (dict, "a table"),
    )
    kind = next((name for t, name in kinds if isinstance(value, t)), "a date or time")
    shown = repr(value)
    return f"{kind} ({shown[:40]}...)" if len(shown) > 40 else f"{kind} ({shown})"


def _line_of(text: str, key: str) -> int | None:
    """The 1-based line where a top-level key is set (``key =``, ``"key" =``, ``key.x =`` or
    a ``[key]`` table header). tomllib gives no positions, so this scans the text."""
    k = re.escape(key)
    pattern = re.compile(rf"""^[ \t]*(?:\[\[?[ \t]*)?(?:{k}|"{k}"|'{k}')[ \t]*(?:=|\.|\])""", re.M)
    match = pattern.search(text)
    return text.count("\n", 0, match.start()) + 1 if match else None


def _resolve(base: Path, value: str) -> str:
    """A job file's path or glob, made absolute against the job file's folder."""
    expanded = os.path.expanduser(value)
    return expanded if os.path.isabs(expanded) else os.path.normpath(base / expanded)

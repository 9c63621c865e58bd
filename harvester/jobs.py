"""Job files: everything a nightly run needs except the secret, in one TOML file.

    # jobs/nightly.toml
    inputs = ["exports/*.csv"]        # globs of CSV exports; all of them make one run
    out = "/srv/harvest"
    base-url = "https://relay.example"
    key-env = "RELAY_KEY"             # the *name* of the variable holding the key

Keys are the options ``harvester.options`` declares for ``run``: the long options of
``harvester harvest`` without their dashes, plus ``inputs``. A ``[serve]`` table holds the
options of ``harvester serve --job`` (``listen``, ``fal-user-id``, ...); serve takes the
top-level keys it shares with ``run`` (``out``, ``timeout``, ...) too, and the table's
values override them (``load_serve_job``). Relative paths in a job file
resolve against the job file's own folder, so a job means the same thing whatever the current
directory is (cron starts in $HOME, systemd in /).
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
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from harvester import options
from harvester.errors import ConfigError, InputError
from harvester.options import Option
from harvester.storage.objects import as_location, open_store

if TYPE_CHECKING:  # the run layer is loaded only by the commands that run a harvest
    from harvester.run.config import HarvestConfig

_GLOB_CHARS: Final = frozenset("*?[")


class Job:
    """One harvest: a value for every option ``harvester.options`` declares, by its Python
    name (``job.rps``), as a job file or ``harvest``'s command line gives it, else the
    option's default."""

    __slots__ = ("_values",)
    command = options.JOB_COMMAND

    def __init__(self, **values: Any) -> None:
        known = options.defaults(self.command)
        unknown = sorted(values.keys() - known.keys())
        if unknown:
            raise TypeError(f"no such option: {', '.join(unknown)}")
        self._values: dict[str, Any] = known | values

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(name) from None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Job) and self._values == other._values

    def __repr__(self) -> str:
        return f"Job({', '.join(f'{k}={v!r}' for k, v in self._values.items())})"

    def harvest_config(self, api_key: str) -> HarvestConfig:
        """The library's run configuration; expands ``inputs`` (``InputError`` if a pattern
        matches nothing)."""
        from harvester.run.config import HarvestConfig

        return HarvestConfig.from_options(
            self._values,
            inputs=expand_inputs(self.inputs),
            api_key=api_key,
            out=open_store(self.out),
        )


class ServeJob(Job):
    """What ``harvester serve`` runs: a value for each of its options."""

    __slots__ = ()
    command = options.SERVE


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


KEYS: Final = tuple(option.name for option in options.for_command(options.JOB_COMMAND))
"""Every key a job file may hold, in the order the docs list them."""

SERVE_TABLE: Final = options.SERVE
"""A job file's table of ``harvester serve``'s keys."""

_SECRET_KEYS: Final = frozenset({"key", "api-key", "api_key", "apikey", "token", "secret"})


def load_job(path: Path, overrides: Mapping[str, object] | None = None) -> Job:
    """Read a job file. ``overrides`` (options' Python names: ``out``, ``rps``, ...) replace the
    file's values; they come from the command line, so relative paths in them stay relative
    to the current directory. Raises ``ConfigError`` for anything wrong with the file (its
    ``[serve]`` table included)."""
    text, data = _read(path)
    values = _values(path, text, data, options.JOB_COMMAND)
    _values(path, text, data, options.SERVE)  # the [serve] table is checked too
    values.update(overrides or {})
    _require(path, options.JOB_COMMAND, values)
    return Job(**values)


def load_serve_job(path: Path, overrides: Mapping[str, object] | None = None) -> ServeJob:
    """``harvester serve``'s options from a job file: the top-level keys it shares with
    ``run``, then its ``[serve]`` table's, then ``overrides`` (from the command line). The
    top-level keys only ``run`` takes are checked and left alone. Raises ``ConfigError``."""
    text, data = _read(path)
    values = _values(path, text, data, options.JOB_COMMAND)
    shared = {o.attr for o in options.for_command(options.SERVE)}
    values = {name: value for name, value in values.items() if name in shared}
    values.update(_values(path, text, data, options.SERVE))
    values.update(overrides or {})
    _require(path, options.SERVE, values)
    return ServeJob(**values)


def _read(path: Path) -> tuple[str, dict[str, Any]]:
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
    return text, data


def _values(path: Path, text: str, data: dict[str, Any], command: str) -> dict[str, Any]:
    """The checked values of ``command``'s keys: the top level for ``run``, the ``[serve]``
    table for ``serve`` (where every key serve takes is allowed)."""
    by_key = {option.name: option for option in options.for_command(command)}
    if command == options.SERVE:
        table = data.get(SERVE_TABLE, {})
        if not isinstance(table, dict):
            line = _line_of(text, SERVE_TABLE)
            where = f"{path}:{line}" if line else str(path)
            raise ConfigError(f"{where}: {SERVE_TABLE!r} must be a table ([serve])")
        items, prefix = table, f"{SERVE_TABLE}."
    else:
        items, prefix = {k: v for k, v in data.items() if k != SERVE_TABLE}, ""
    base = path.resolve().parent
    values: dict[str, Any] = {}
    for key, value in items.items():
        line = _line_of(text, key)
        where = f"{path}:{line}" if line else str(path)
        if key not in by_key:
            raise _unknown(where, f"{prefix}{key}", by_key, prefix)
        values[by_key[key].attr] = _check(where, by_key[key], value, base)
    return values


def _require(path: Path, command: str, values: Mapping[str, object]) -> None:
    for option in options.for_command(command):
        if option.required and option.attr not in values:
            raise ConfigError(
                f"{path}: missing key {option.name!r} ({option.required}); add it to the file "
                f"or give it on the command line"
            )


def _unknown(where: str, key: str, keys: Collection[str], prefix: str = "") -> ConfigError:
    """The error for a key no option has: a pasted secret refused unechoed, else the closest
    known key (``prefix``: the table's, ``serve.``)."""
    if key.removeprefix(prefix).lower() in _SECRET_KEYS:
        return ConfigError(
            f"{where}: {key!r}: the API key does not belong in a job file; put it in the "
            "environment (an EnvironmentFile for systemd) and name the variable with key-env"
        )
    known = [f"{prefix}{k}" for k in keys]
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return ConfigError(f"{where}: unknown key {key!r}; {hint}known keys: {', '.join(known)}")


def _check(where: str, option: Option, value: object, base: Path) -> object:
    """The value if ``option`` accepts it (paths resolved against ``base``); else a
    ``ConfigError`` naming the place and the key."""
    key = option.name
    if option.kind == "globs":
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not items or not all(isinstance(v, str) for v in items):
            raise ConfigError(
                f"{where}: {key!r} must be a glob or a non-empty list of globs, "
                f"not {_describe(value)}"
            )
        if not all(item.strip() for item in items):
            raise ConfigError(f"{where}: {key!r} holds an empty path")
        return tuple(_resolve(base, item) for item in items)
    if option.kind == "texts":
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(v, str) and v for v in items):
            raise ConfigError(
                f"{where}: {key!r} must be a string or a list of strings, not {_describe(value)}"
            )
        return tuple(items)
    if option.kind == "boolean":
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {key!r} must be true or false, not {_describe(value)}")
        return value
    if option.auto and isinstance(value, str) and value.strip().lower() == "auto":
        return None
    if option.kind in ("integer", "number"):
        allowed = int if option.kind == "integer" else int | float
        if not isinstance(value, allowed) or isinstance(value, bool):
            kind = "an integer" if option.kind == "integer" else "a number"
            kind += " or 'auto'" if option.auto else ""
            raise ConfigError(f"{where}: {key!r} must be {kind}, not {_describe(value)}")
        refusal = option.refusal(value)
        if refusal:
            raise ConfigError(f"{where}: {key!r} {refusal}, not {value!r}")
        return float(value) if option.kind == "number" else value
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: {key!r} must be a non-empty string, not {_describe(value)}")
    refusal = option.refusal(value)
    if refusal:  # never with the value: someone may have pasted the key itself
        raise ConfigError(f"{where}: {key!r} {refusal}")
    if option.kind == "text":
        return value
    return as_location(value, base=base)


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

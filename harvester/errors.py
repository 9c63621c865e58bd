"""The harvester's own errors, and the exit codes the CLI gives them.

Library code raises these (translating lower-level exceptions with ``raise ... from exc``);
the CLI turns them into one clear message and the exit code below. Anything else that
escapes is a bug, and is allowed to show as one.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Final


class ExitCode(IntEnum):
    """Process exit codes, documented in the README for cron and alerting."""

    OK = 0
    """Every request in the run is ok."""
    BUG = 1
    """An unexpected error, a bug in the harvester (Python's own code for an uncaught
    exception): the traceback says where; finished rows are kept, the run record has it."""
    INCOMPLETE = 3
    """The run finished, but some requests are not ok (pending, not_found, failed, error,
    invalid): they are in the manifest and the next run retries them."""
    USAGE = 2
    """Bad options or arguments (click's own code for usage errors)."""
    AUTH = 4
    """The API rejected the key (401/403): the run stopped early."""
    LOCKED = 5
    """Another harvest is running on the same output folder."""
    INPUT = 6
    """An input file cannot be read as a CSV export, or lacks the model/request_id columns."""
    OUTPUT = 7
    """The output folder cannot be written (permissions, disk full)."""
    CONFIG = 8
    """A job file is invalid."""
    VERIFY = 9
    """``harvester verify`` found missing, corrupt, orphaned or non-image files."""
    NO_RECENT_RUN = 10
    """``harvester status``: no run record in the folder, or the last run started longer ago
    than ``--max-age`` (cron or the timer did not run, or the run was killed outright)."""
    UNREACHABLE = 11
    """No request ever got an answer from the API (wrong --base-url, DNS, network down)."""
    WORKER = 12
    """A shard's process died (killed, out of memory): finished rows are kept; run again."""
    NOTHING_OK = 13
    """The run finished, but (almost) nothing in it was ok: at least 10 requests tried and
    under 5% ok, or the share not ok jumped far above the last runs' (more than 3x their
    median and more than 50 points above it). A wrong --base-url, a dead relay, a wrong
    account: never counted as ok by ``status --incomplete-ok`` or the systemd unit."""
    INTERRUPTED = 130
    """Stopped by SIGINT or SIGTERM: finished rows are kept; the next run picks up the rest."""


MEANINGS: Final[dict[int, str]] = {
    ExitCode.OK: "every request ok",
    ExitCode.BUG: "an unexpected error (a bug): see the log's traceback; finished rows are kept",
    ExitCode.USAGE: "usage error: nothing was fetched",
    ExitCode.INCOMPLETE: "finished, but some requests are not ok; the next run retries them",
    ExitCode.AUTH: "the API refused the key; the run stopped early",
    ExitCode.LOCKED: "another harvest was running on the same folder",
    ExitCode.INPUT: "an input file is unreadable or lacks the columns",
    ExitCode.OUTPUT: "the output folder could not be written",
    ExitCode.CONFIG: "the job file is invalid",
    ExitCode.VERIFY: "verify found missing, corrupt, orphaned or non-image files",
    ExitCode.NO_RECENT_RUN: "no recent run",
    ExitCode.UNREACHABLE: "the API never answered; nothing was recorded",
    ExitCode.WORKER: "a shard's process died; finished rows are kept, run again",
    ExitCode.NOTHING_OK: "(almost) no request was ok: check --base-url, the key and the inputs",
    ExitCode.INTERRUPTED: "interrupted (SIGINT/SIGTERM); finished rows are kept",
}
"""One line per exit code, for ``harvester status`` and the docs."""


class HarvesterError(Exception):
    """Base of every error the harvester reports to a user."""

    exit_code: ExitCode = ExitCode.USAGE


class UsageError(HarvesterError):
    """An option or combination of options cannot work; raised before any network call."""

    exit_code = ExitCode.USAGE


class InputError(HarvesterError):
    """An input CSV cannot be used at all (as opposed to one bad row, which is data)."""

    exit_code = ExitCode.INPUT


class AuthError(HarvesterError):
    """The API refused the key: continuing would only record thousands of identical rows."""

    exit_code = ExitCode.AUTH


class UnreachableError(HarvesterError):
    """The API never answered: every attempt failed before an HTTP response."""

    exit_code = ExitCode.UNREACHABLE


class LockedError(HarvesterError):
    """Another process holds the output folder's lock."""

    exit_code = ExitCode.LOCKED


class OutputError(HarvesterError):
    """The output folder cannot be written."""

    exit_code = ExitCode.OUTPUT


class ManifestError(HarvesterError):
    """The existing manifest in the output folder cannot be read."""

    exit_code = ExitCode.OUTPUT


class ConfigError(HarvesterError):
    """A job file has an unknown key, a wrong type or bad TOML."""

    exit_code = ExitCode.CONFIG


class WorkerError(HarvesterError):
    """A worker process of the run died or failed unexpectedly."""

    exit_code = ExitCode.WORKER


def first_harvester_error(group: BaseExceptionGroup[BaseException]) -> HarvesterError | None:
    """The first of our own errors in a (nested) exception group: task groups wrap what their
    tasks raise, and the CLI reports our errors plainly."""
    for exc in group.exceptions:
        if isinstance(exc, HarvesterError):
            return exc
        if isinstance(exc, BaseExceptionGroup):
            found = first_harvester_error(exc)
            if found is not None:
                return found
    return None

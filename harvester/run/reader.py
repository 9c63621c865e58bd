"""Read stage: CSV exports in, unique ``(model, request_id)`` pairs out, in batches.

Exports are read twice: ``inspect`` checks every file up front (readable, UTF-8-ish, has the
columns) and counts rows, so a broken file stops the run before any network call; ``iter_items``
then streams the rows in batches. A bad row is data, not a crash: it comes out as a ``BadRow``
with its file and line. Memory does not grow with the row count, except for the 16-byte pair
digests used to drop duplicates, in a ``set`` (about 85 bytes a pair).
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Container, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TextIO

from harvester.api.urls import UnsafeIdError, request_path
from harvester.counters import Counters
from harvester.errors import InputError

MODEL: Final = "model"
REQUEST_ID: Final = "request_id"
MAX_LINE_CHARS: Final = 64 * 1024
"""A physical line longer than this is reported as a bad row and skipped, not read into memory."""

csv.field_size_limit(MAX_LINE_CHARS * 4)


@dataclass(frozen=True, slots=True)
class Pair:
    """One request to harvest, with where it was first seen."""

    model: str
    request_id: str
    source: str
    line: int
    key: int
    """``pair_key(model, request_id)``, computed once, when the row is read."""
    path: str
    """The result's URL path (``urls.request_path``), checked once, when the row is read."""


@dataclass(frozen=True, slots=True)
class BadRow:
    """A row that cannot be harvested, and why."""

    source: str
    line: int
    reason: str
    model: str | None = None
    request_id: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Columns:
    """The header names of the model and request id columns (matched without case or
    surrounding spaces): exports that call them ``endpoint_id,id`` or ``app,request`` are
    read with ``--model-column`` / ``--id-column``."""

    model: str = MODEL
    request_id: str = REQUEST_ID

    def normalised(self) -> Columns:
        model, request_id = _normalise_header(self.model), _normalise_header(self.request_id)
        return Columns(model=model, request_id=request_id)


_ALIASES: Final = {
    "model": ("endpoint_id", "endpoint", "app", "app_id", "model_id", "application"),
    "request_id": ("id", "request", "requestid", "request-id", "req_id"),
}
"""Names other exports use, for the hint when a file lacks the columns asked for."""


@dataclass(frozen=True, slots=True)
class InputFile:
    """What ``inspect`` learnt about one export."""

    path: Path
    sha256: str
    size: int
    rows: int
    columns: tuple[str, ...]
    names: Columns = Columns()
    """The columns read as model and request id."""


def pair_key(model: str, request_id: str) -> int:
    """A 128-bit digest of a pair; sets of these deduplicate without keeping the strings."""
    digest = hashlib.blake2b(f"{model}\x00{request_id}".encode(), digest_size=16).digest()
    return int.from_bytes(digest, "big")


def request_key(model: str | None, request_id: str) -> int | None:
    """The digest by which an ok row makes a harvest skip CSV rows (``iter_items``'s
    ``done``): its request as the queue names it, the model's ``[namespace/]owner/app`` and
    the request id (``fal-ai/flux/dev`` from a webhook and ``fal-ai/flux/dev`` or
    ``fal-ai/flux`` in an export are one request), or the request id alone for a delivery
    that named no model (``model`` None). None if the two cannot name a request."""
    if model is None:
        return _digest(f"\x00{request_id}")
    try:
        return _digest(request_path(model, request_id))
    except UnsafeIdError:
        return None


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=16).digest(), "big")


def is_done(pair: Pair, done: Container[int]) -> bool:
    """True if ``done`` holds ``pair``: its ``pair_key``, its ``request_key``, or its
    request id's (an ok delivery that named no model)."""
    return (
        pair.key in done or _digest(pair.path) in done or _digest(f"\x00{pair.request_id}") in done
    )


def _normalise_header(cell: str) -> str:
    return cell.replace("\ufeff", "").strip().lower()


def _clean(value: str) -> str:
    """Make ``surrogateescape`` text printable (undecodable bytes become U+FFFD)."""
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


class _Lines:
    """Feeds the csv module physical lines, cutting any line longer than ``MAX_LINE_CHARS``
    (the rest of it is skipped and its line number remembered) so one giant line cannot
    exhaust memory.

    It keeps the lines of the record being parsed (at most the csv field limit's worth), so
    that a record found to have swallowed the lines after it (an unterminated quote) can
    have them read again."""

    def __init__(self, fh: TextIO) -> None:
        self._fh = fh
        self._read = 0
        self.line_no = 0
        self.too_long: set[int] = set()
        self.record: list[tuple[int, str]] = []
        """``(line number, text)`` of each line of the record being parsed."""
        self._again: list[tuple[int, str]] = []
        """Lines to hand out again before reading on, the next one last."""

    def __iter__(self) -> Iterator[str]:
        return self

    def next_record(self) -> None:
        self.record = []

    def read_again(self, lines: Sequence[tuple[int, str]]) -> None:
        self._again.extend(reversed(lines))

    def __next__(self) -> str:
        if self._again:
            self.line_no, line = self._again.pop()
        else:
            line = self._physical()
            self.line_no = self._read
        self.record.append((self.line_no, line))
        return line

    def _physical(self) -> str:
        line = self._fh.readline(MAX_LINE_CHARS)
        if not line:
            raise StopIteration
        self._read += 1
        if len(line) == MAX_LINE_CHARS and not line.endswith("\n"):
            self.too_long.add(self._read)
            while True:
                rest = self._fh.readline(MAX_LINE_CHARS)
                if not rest or rest.endswith("\n"):
                    break
            return "\n"
        return line


def _open(path: Path) -> TextIO:
    try:
        with open(path, "rb") as raw:
            head = raw.read(8192)
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise InputError(
            f"{path} is UTF-16 text (a spreadsheet's 'Unicode text' export?); "
            "save it as 'CSV UTF-8' and try again"
        )
    if b"\x00" in head:
        raise InputError(f"{path} looks like a binary file, not a CSV export")
    return open(path, encoding="utf-8-sig", errors="surrogateescape", newline="")


def _header(
    path: Path, rows: Iterator[list[str]], wanted: Columns = Columns()
) -> tuple[int, int, tuple[str, ...]]:
    want = wanted.normalised()
    for cells in rows:
        if not any(cell.strip() for cell in cells):
            continue
        names = tuple(_normalise_header(_clean(c)) for c in cells)
        options = {
            "model": (want.model, "--model-column"),
            "request_id": (want.request_id, "--id-column"),
        }
        missing = {role: spec for role, spec in options.items() if spec[0] not in names}
        if missing:
            found = ", ".join(repr(n) for n in names) or "none"
            hint = ""
            if len(names) == 1 and any(sep in names[0] for sep in ";\t|"):
                hint = " (is it separated by something other than commas? exports must be CSV)"
            fixes = []
            for role, (_, option) in missing.items():
                alias = next((a for a in _ALIASES[role] if a in names), None)
                fixes.append(f"{option} {alias or 'NAME'}")
            raise InputError(
                f"{path} has no {' or '.join(repr(n) for n, _ in missing.values())} column "
                f"(columns found: {found}){hint}; name the columns to read with "
                f"{' and '.join(fixes)} (job-file keys model-column, id-column)"
            )
        return names.index(want.model), names.index(want.request_id), names
    raise InputError(
        f"{path} is empty: expected a header row with '{want.model}' and '{want.request_id}'"
    )


def _records(path: Path) -> Iterator[tuple[int, list[str] | None, str | None]]:
    """Yield ``(line, cells, problem)`` for every data row, the header first.

    A quote that is never closed makes the csv module read the lines after it as one field,
    up to the field limit or the end of the file. A record spanning lines is taken as such a
    swallow when the csv module gives up on it, when its model or request_id cell holds a
    line break (neither ever does), or when it spans more than ``MAX_RECORD_LINES`` lines:
    its first line is then the bad row, naming the lines swallowed, and the lines after it
    are read again. A quoted cell of another column may hold a few line breaks.
    """
    with _open(path) as fh:
        lines = _Lines(fh)
        reader = csv.reader(lines)
        key_columns: tuple[int, ...] | None = None
        while True:
            lines.next_record()
            try:
                cells = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                if len(lines.record) > 1:
                    yield _swallowed(lines, str(exc))
                else:
                    yield lines.line_no, None, f"unparseable CSV row: {exc}"
                continue
            line = lines.line_no
            if line in lines.too_long:
                yield line, None, f"line longer than {MAX_LINE_CHARS} characters"
                continue
            if key_columns is None:
                if any(cell.strip() for cell in cells):
                    names = [_normalise_header(c) for c in cells]
                    key_columns = tuple(i for i, n in enumerate(names) if n in (MODEL, REQUEST_ID))
            elif len(lines.record) > 1:
                why = _why_swallowed(cells, key_columns, len(lines.record))
                if why is not None:
                    yield _swallowed(lines, why)
                    continue
            yield line, cells, None


MAX_RECORD_LINES: Final = 100
"""A record of more lines is an unterminated quote, not a multi-line cell."""


def _why_swallowed(cells: list[str], key_columns: tuple[int, ...], span: int) -> str | None:
    for i in key_columns:
        if i < len(cells) and ("\n" in cells[i] or "\r" in cells[i]):
            return "a model or request_id cell spans lines"
    if span > MAX_RECORD_LINES:
        return f"one record of more than {MAX_RECORD_LINES} lines"
    return None


def _swallowed(lines: _Lines, why: str) -> tuple[int, None, str]:
    """The bad row for an unterminated quote; the lines after its first are read again."""
    first, last = lines.record[0][0], lines.record[-1][0]
    lines.read_again(lines.record[1:])
    return (
        first,
        None,
        f"unterminated quote: the quoted field opened on line {first} runs to line {last} "
        f"({why}); line {first} is skipped, lines {first + 1}-{last} are read again",
    )


def inspect(paths: Sequence[Path], *, columns: Columns = Columns()) -> list[InputFile]:
    """Check every export before the run starts; raises ``InputError`` for an unusable file.
    ``columns`` names the model and request id columns."""
    if not paths:
        raise InputError("no input files given")
    found: list[InputFile] = []
    for path in paths:
        if path.is_dir():
            raise InputError(f"{path} is a folder; pass the CSV files in it, e.g. {path}/*.csv")
        if not path.is_file():
            raise InputError(f"{path} does not exist or is not a file")
        sha = hashlib.sha256()
        try:
            with open(path, "rb") as raw:
                while chunk := raw.read(1 << 20):
                    sha.update(chunk)
        except OSError as exc:
            raise InputError(f"cannot read {path}: {exc.strerror or exc}") from exc
        records = _records(path)
        header_cells = (cells for _, cells, _ in records if cells is not None)
        _, _, names = _header(path, header_cells, columns)
        rows = sum(1 for _, cells, problem in records if problem or (cells and any(cells)))
        found.append(
            InputFile(
                path=path,
                sha256=sha.hexdigest(),
                size=path.stat().st_size,
                rows=rows,
                columns=names,
                names=columns,
            )
        )
    return found


def _validate(source: str, line: int, model: str, request_id: str) -> Pair | BadRow:
    missing = [name for name, value in ((MODEL, model), (REQUEST_ID, request_id)) if not value]
    if missing:
        return BadRow(
            source, line, f"missing {' and '.join(missing)}", model or None, request_id or None
        )
    if "\ufffd" in model + request_id:
        return BadRow(source, line, "not valid UTF-8", model, request_id)
    try:
        path = request_path(model, request_id)
    except UnsafeIdError as exc:
        return BadRow(source, line, str(exc), model, request_id)
    return Pair(model, request_id, source, line, pair_key(model, request_id), path)


def iter_items(
    files: Iterable[InputFile],
    *,
    batch_size: int = 1_000,
    done: Container[int] | None = None,
    counts: Counters | None = None,
) -> Iterator[list[Pair | BadRow]]:
    """Stream every row of ``files`` as batches of ``Pair`` (first sighting only) and ``BadRow``.

    ``done`` holds digests of pairs to skip (already harvested): their ``pair_key``, or the
    ``request_key`` of an ok row (``is_done``); a pair repeated within or across files comes
    out once. ``counts`` (if given) tallies what was skipped
    (``duplicates``, and ``skipped`` for those in ``done``).
    """
    done = set() if done is None else done
    counts = Counters() if counts is None else counts
    seen: set[int] = set()
    batch: list[Pair | BadRow] = []
    for f in files:
        source = str(f.path)
        records = _records(f.path)
        model_at = request_at = -1
        for line, cells, problem in records:
            if problem is not None:
                batch.append(BadRow(source, line, problem))
            elif cells is None or not any(c.strip() for c in cells):
                continue
            elif model_at < 0:
                model_at, request_at, _ = _header(f.path, iter([cells]), f.names)
                continue
            else:
                model = _clean(cells[model_at]).strip() if model_at < len(cells) else ""
                request_id = _clean(cells[request_at]).strip() if request_at < len(cells) else ""
                item = _validate(source, line, model, request_id)
                if isinstance(item, Pair):
                    if item.key in seen:
                        counts.duplicates += 1
                        continue
                    seen.add(item.key)
                    if is_done(item, done):
                        counts.skipped += 1
                        continue
                batch.append(item)
            if len(batch) >= batch_size:
                yield batch
                batch = []
    if batch:
        yield batch

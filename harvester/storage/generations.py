"""Which manifest parts are live: the record a compaction commits, and how every reader
honours it (docs/architecture.md, "Compaction's commit protocol").

A compaction's generation N is the object ``manifest/_compacted-NNNNNN/generation.json``,
created once and only after every part it names is in place. Readers take the newest
generation that has one: its parts (listed by key, with their row counts; a full part of an
older generation is named again rather than copied) and the parts of every run folder it
does not replace, less the parts it took one by one. Nothing else under ``manifest/`` is
live: a generation folder without a record (a compaction killed before its commit), an older
record and the parts no newer record names, the run folders the newest replaces and the parts
it took (a compaction killed before it deleted them).

A generation replaces a finished run's folder whole. A server's folder (``harvester serve``,
which writes beside a compaction without the lock) may still grow: the generation takes its
parts one by one (``taken``: key and size, as listed), and a part written there later (or a
part rewritten since, which has another size) stays live.
``Listing.stale`` names all of that; ``settle`` deletes it, with the location's lock held.
Both work through a ``Store``: a folder and a bucket follow the same rule.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from harvester.errors import ManifestError, OutputError
from harvester.storage.objects import Store

MANIFEST: Final = "manifest/"
GENERATION_PREFIX: Final = "_compacted-"
GENERATION_FILE: Final = "generation.json"
CURRENT_FOLDER: Final = "current"


def folder(number: int) -> str:
    """Generation ``number``'s folder: ``manifest/_compacted-000012``."""
    return f"{MANIFEST}{GENERATION_PREFIX}{number:06d}"


def record_key(number: int) -> str:
    return f"{folder(number)}/{GENERATION_FILE}"


def current_key(number: int) -> str:
    """The current-state table as of generation ``number``."""
    return f"{CURRENT_FOLDER}/current-{number:06d}.parquet"


@dataclass(frozen=True, slots=True)
class Part:
    key: str
    rows: int
    """-1: not recorded (a generation committed by a release before parts were counted)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Generation:
    """A committed generation: its parts hold every row of the run folders it replaces and
    of the generation before it."""

    number: int
    parts: tuple[Part, ...]
    replaces: frozenset[str]
    """Names of the run folders merged into this generation."""
    taken: frozenset[tuple[str, int]] = frozenset()
    """Parts merged one by one (key, size) from folders that may still grow (a server's)."""
    current: str | None
    """The key of its current-state table (None if there is none)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Listing:
    """What ``manifest/`` holds, as readers see it."""

    generation: Generation | None
    runs: dict[str, tuple[str, ...]]
    """Each run folder the generation does not replace: its parts' keys, oldest first."""
    stale: tuple[str, ...]
    """Keys no reader uses: what a killed compaction left, to be deleted."""
    sizes: dict[str, int] = field(default_factory=dict)
    """The size of each run folder's live part, as listed."""

    @property
    def parts(self) -> list[str]:
        """Every live part's key: each manifest row is in exactly one of them."""
        found = [p.key for p in self.generation.parts] if self.generation else []
        for keys in self.runs.values():
            found.extend(keys)
        return found

    @property
    def run_parts(self) -> list[str]:
        """The live parts of the run folders (the runs since the generation)."""
        return [key for keys in self.runs.values() for key in keys]


def read(store: Store) -> Listing:
    """``manifest/`` and ``current/`` of ``store``, as readers see them. Raises
    ``ManifestError`` if the newest generation's record cannot be read."""
    runs: dict[str, list[str]] = {}
    sizes: dict[str, int] = {}
    generations: dict[int, list[str]] = {}
    for info in store.list(MANIFEST):
        name, _, rest = info.key.removeprefix(MANIFEST).partition("/")
        if not rest:
            continue
        number = name.removeprefix(GENERATION_PREFIX)
        if name.startswith(GENERATION_PREFIX) and number.isdigit():
            generations.setdefault(int(number), []).append(info.key)
        elif not name.startswith(("_", ".")) and "/" not in rest and rest.endswith(".parquet"):
            runs.setdefault(name, []).append(info.key)
            sizes[info.key] = info.size
    tables = [i.key for i in store.list(f"{CURRENT_FOLDER}/")]
    committed = [n for n, keys in generations.items() if record_key(n) in keys]
    gen = _generation(store, max(committed), tables) if committed else None
    live = {p.key for p in gen.parts} | {record_key(gen.number)} if gen is not None else set()
    stale = [key for keys in generations.values() for key in keys if key not in live]
    replaced = gen.replaces if gen is not None else frozenset()
    taken = gen.taken if gen is not None else frozenset()
    stale += [key for name in sorted(runs) if name in replaced for key in runs[name]]
    stale += [key for keys in runs.values() for key in keys if (key, sizes[key]) in taken]
    stale += [key for key in tables if gen is None or key != gen.current]
    kept = {
        name: tuple(sorted(key for key in keys if (key, sizes[key]) not in taken))
        for name, keys in sorted(runs.items())
        if name not in replaced
    }
    return Listing(
        generation=gen,
        runs={name: keys for name, keys in kept.items() if keys},
        stale=tuple(sorted(stale)),
        sizes={key: sizes[key] for keys in kept.values() for key in keys},
    )


def _generation(store: Store, number: int, tables: list[str]) -> Generation:
    key = record_key(number)
    try:
        record = json.loads(store.get(key))
        parts = tuple(_part(number, entry) for entry in record["parts"])
        replaces = frozenset(str(name) for name in record["replaces"])
        taken = frozenset((str(e["key"]), int(e["size"])) for e in record.get("taken", ()))
    except (OSError, OutputError, ValueError, KeyError, TypeError) as exc:
        raise ManifestError(
            f"cannot read {store.location}/{key}: {exc}; the manifest's newest compacted "
            f"generation has no valid record. Move {store.location}/{folder(number)} out of "
            "the manifest and run 'harvester compact' again"
        ) from exc
    current = current_key(number)
    return Generation(
        number=number,
        parts=parts,
        replaces=replaces,
        taken=taken,
        current=current if current in tables else None,
    )


def _part(number: int, entry: object) -> Part:
    """A record's part: ``{"key": ..., "rows": ...}``, or a file name in the generation's
    folder (records written before parts were listed by key)."""
    if isinstance(entry, str):
        return Part(f"{folder(number)}/{entry}", -1)
    if not isinstance(entry, dict):
        raise TypeError(f"a part is {entry!r}")
    return Part(str(entry["key"]), int(entry["rows"]))


def settle(store: Store, listing: Listing, *, each: Callable[[], None] | None = None) -> int:
    """Delete ``listing.stale``: finish a committed compaction (the folders it replaces, the
    older generation) or roll back one killed before its commit. Call with the location's
    lock held. ``each`` is called after every deletion. Returns how many folders went."""
    folders = {key.rsplit("/", 1)[0] for key in listing.stale}
    for key in listing.stale:
        store.delete(key)
        if each is not None:
            each()
    still = {f"{MANIFEST}{name}" for name in listing.runs}  # a server's folder with live parts
    return len(folders - still - {CURRENT_FOLDER})


__all__ = [
    "CURRENT_FOLDER",
    "GENERATION_FILE",
    "GENERATION_PREFIX",
    "Generation",
    "Listing",
    "Part",
    "current_key",
    "folder",
    "read",
    "record_key",
    "settle",
]

"""Where a harvest's output lives: a local folder or an S3 bucket, behind one small interface.

Keys are relative paths with the same layout in both (``images/aa/<sha256>.<ext>``,
``manifest/<run_id>/part-NNNNN.parquet``, ``runs/<run_id>.json``). ``open_store`` turns
``--out`` into a store, and is the only code outside the two classes that tells a folder
from a bucket; everything a harvest writes or reads goes through the store it returns.
Every write is atomic: a reader never sees part of an object. ``put_new`` creates an object
only if the key is free (images: the key names the bytes, so whoever writes first wins and
the others learn it was stored); ``put`` replaces a whole object (manifest parts, run
records).

The S3 backend is obstore (Rust ``object_store``, what polars itself uses for ``s3://``).
Credentials, region and endpoint come only from the standard AWS environment variables and
are never put into a message. obstore's exceptions become the harvester's here, and only here.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol

from harvester.errors import LockedError, OutputError
from harvester.storage import lock as folder_lock
from harvester.storage.files import fsync_folder, persist_durable, persist_new
from harvester.storage.layout import Layout

if TYPE_CHECKING:
    from obstore.store import S3Store as _ObstoreS3

Source = bytes | Path
"""What a put takes: bytes, or a complete local file in the store's ``temp_dir`` (consumed:
moved or uploaded, then gone, whether the put succeeds or not)."""

READ_CHUNK: Final = 1 << 20
SINGLE_PUT_BYTES: Final = 16 << 20
"""Objects up to this size go up in one conditional PUT (``If-None-Match: *``), read into
memory; larger spill files go up in parts of ``PART_BYTES``, ``PART_CONCURRENCY`` at a time."""
PART_BYTES: Final = 8 << 20
PART_CONCURRENCY: Final = 2
REMOTE_TEMP: Final = ".tmp/"
"""The runs' temp objects in a bucket (a shard's pairs, for nodes without the driver's disk):
``.tmp/<run_id>/``, deleted when the run ends, or by the next run on the prefix."""
LEASE_SECONDS: Final = 60.0
"""How long a lease on an S3 prefix lasts unless renewed (every third of it)."""
AWS_ENV: Final = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_ENDPOINT_URL",
)
_ENV_KEPT: Final = (*AWS_ENV, "AWS_DEFAULT_REGION", "TMPDIR")


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    key: str
    """Relative to the store's root: ``images/ab/ab12...ef.png``."""
    size: int
    modified: datetime


@dataclass(frozen=True, slots=True)
class Holder:
    """Who holds a location's lock (what a lease object records)."""

    owner: str
    host: str
    pid: int
    expires_at: datetime | None = None
    """None for a folder: the kernel drops a flock when its process dies."""
    since: datetime | None = None
    """When the holder took the lock, if the lock says (a folder's lock file's time)."""


class Held(Protocol):
    """What ``Store.lock`` yields: the run asks it before each write it must not make
    once another run has taken the location over."""

    @property
    def lost(self) -> bool:
        """True once another run holds the location (an S3 lease taken over after expiry)."""

    def check(self) -> None:
        """Raise ``LockedError`` if the lock was lost."""


class Store(Protocol):
    """Everything a harvest writes and reads under its output location. Picklable: a shard
    in another process (or on another node) gets the store the driver opened."""

    @property
    def location(self) -> str:
        """For messages: the folder, or ``s3://bucket/prefix`` (never a credential)."""

    @property
    def temp_dir(self) -> Path:
        """A local folder for the run's own files (shard files, progress, spill files, parts
        being built): the output folder's ``.tmp``, or a scratch folder for a bucket. A put
        of a file from here consumes it."""

    @property
    def everywhere(self) -> bool:
        """Every machine reaches the location itself (a bucket). A folder is on this
        machine's disk, unless every node mounts it (``--shared-fs``); its temp files are."""

    def prepare(self) -> None:
        """Make the local folders a run writes and check they are writable (``OutputError``
        with the fix if not)."""

    def clean_temp(self) -> int:
        """Empty ``temp_dir`` of what a dead run left; returns how many. With the lock held."""

    def own_temp(self, name: str) -> AbstractContextManager[Store]:
        """This store with its temp files in a folder of its own (``.serve-tmp/<name>/`` in
        the output folder, or in the scratch folder for a bucket) for as long as the block
        runs: for a process that writes beside the harvests without their lock, whose starts
        empty ``.tmp``. The folder is held (``flock``) and removed at the end; those of owners
        that are gone are removed first. ``OutputError`` if it cannot be made."""

    def on_node(self, scratch: Path) -> Store:
        """This store for a process on a machine without the driver's disk, its temp files
        in ``scratch`` (a folder store stays itself: every node mounts it, ``--shared-fs``)."""

    def put_new(self, key: str, source: Source, *, durable: bool = False) -> bool:
        """Create ``key`` unless it exists, atomically: True if created, False if it was
        there (its bytes are kept). For keys that name their content (images). ``durable``:
        returns only once the object survives a crash or a power loss (a folder: its bytes
        and its name fsynced; a bucket's create-once put is), and the name is never taken
        over, whatever the bytes under it."""

    async def put_new_async(self, key: str, source: Source, *, durable: bool = False) -> bool:
        """``put_new`` for an event loop (a durable put in a folder runs in a thread)."""

    def put(self, key: str, source: Source) -> None:
        """Write the whole object at ``key``, replacing any, durably: readers see the old or
        the new."""

    def get(self, key: str) -> bytes:
        """A small object's bytes; ``OutputError`` if it cannot be read (or is not there, or
        would be read from outside the location)."""

    def iter_bytes(self, key: str, *, chunk_size: int = READ_CHUNK) -> Iterator[bytes]:
        """An object's bytes in chunks (memory stays bounded); ``OutputError``."""

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object whose key starts with the folder ``prefix`` (``manifest/``)."""

    def delete(self, key: str) -> None:
        """Remove ``key``; nothing if it is not there."""

    def url(self, key: str) -> str:
        """What polars and pyarrow open for ``key`` (with ``storage_options``)."""

    @property
    def storage_options(self) -> dict[str, str] | None:
        """polars' ``storage_options`` for ``url``s (None for a folder)."""

    def lock(self, *, owner: str, read_only_ok: bool = False) -> AbstractContextManager[Held]:
        """Hold the location for one run, or raise ``LockedError`` at once (never waits).
        ``read_only_ok``: for checks that write nothing (a read-only folder cannot be in use)."""

    def holder(self) -> Holder | None:
        """Who runs on this location now, or None."""


# --------------------------------------------------------------------------- a local folder


class LocalStore:
    """An output folder: its layout (``Layout``), its lock (``flock`` on ``.lock``), atomic
    puts (a temp file renamed into place; ``put`` fsyncs first), and no read from outside
    the folder (a link out of it is refused). A durable ``put_new`` writes its temp file in
    the ``.tmp`` of the key's first folder (``inbox/.tmp`` for ``inbox/...``), which no run
    empties, and links it into place."""

    everywhere = False

    def __init__(self, root: Path, *, own_temp: str | None = None) -> None:
        self.layout = Layout(root) if own_temp is None else Layout(root).with_own_temp(own_temp)
        self._root = str(self.layout.root)
        self._tmp = str(self.layout.tmp)
        self._folders: set[str] = set()
        self._durable_folders: set[Path] = set()
        """Folders made (or found) with their entries in their parents fsynced, by this
        process: forgotten when a delete removes one, or a put finds one gone."""
        self._real: Path | None = None

    def __getstate__(self) -> tuple[Path, str | None]:
        return self.layout.root, self.layout.own_temp

    def __setstate__(self, state: tuple[Path, str | None]) -> None:
        root, own = state
        self.__init__(root, own_temp=own)  # type: ignore[misc]  # a fresh cache of made folders

    def __repr__(self) -> str:
        return f"LocalStore({str(self.layout.root)!r})"

    @property
    def location(self) -> str:
        return str(self.layout.root)

    @property
    def temp_dir(self) -> Path:
        return self.layout.tmp

    def prepare(self) -> None:
        self.layout.prepare()

    def clean_temp(self) -> int:
        return self.layout.clean_temp()

    @contextmanager
    def own_temp(self, name: str) -> Iterator[Store]:
        own = LocalStore(self.layout.root, own_temp=name)
        with folder_lock.own_temp(own.layout):
            yield own

    def on_node(self, scratch: Path) -> Store:
        return self

    def _path(self, key: str) -> Path:
        return self.layout.root / key

    def _folder(self, folder: str) -> None:
        """Make ``folder`` unless this store made it already."""
        if folder not in self._folders:
            os.makedirs(folder, exist_ok=True)
            self._folders.add(folder)

    def _gone(self, path: str, source: str | None) -> bool:
        """After a ``FileNotFoundError``: True if ``path``'s folder was made by this store
        and removed since (another process deleted its last object: a compaction takes a
        server's parts, an expiry its deliveries), and is made again for one more try."""
        folder = path.rpartition("/")[0]
        if folder not in self._folders or os.path.isdir(folder):
            return False
        if source is not None and not os.path.exists(source):
            return False
        os.makedirs(folder, exist_ok=True)
        return True

    def put_new(self, key: str, source: Source, *, durable: bool = False) -> bool:
        if durable:
            return self._put_durable(key, source)
        # Strings, not Paths: this runs for every image.
        path = f"{self._root}/{key}"
        data = str(source) if isinstance(source, Path) else source
        try:
            self._folder(path.rpartition("/")[0])
            try:
                return persist_new(path, data, tmp_dir=self._tmp)
            except FileNotFoundError:
                if not self._gone(path, data if isinstance(data, str) else None):
                    raise
                return persist_new(path, data, tmp_dir=self._tmp)
        except OSError as exc:
            if isinstance(source, Path):
                source.unlink(missing_ok=True)
            raise OutputError(f"cannot store {key}: {exc.strerror or exc}") from exc

    async def put_new_async(self, key: str, source: Source, *, durable: bool = False) -> bool:
        if durable:  # two fsyncs: off the loop
            import anyio

            return await anyio.to_thread.run_sync(self._put_durable, key, source)
        return self.put_new(key, source)  # a rename: no reason to leave the loop

    def _put_durable(self, key: str, source: Source) -> bool:
        path = self._path(key)
        top = key.split("/", 1)[0]
        temp = self.layout.root / top / ".tmp" if "/" in key else self.layout.tmp
        data = str(source) if isinstance(source, Path) else source
        try:
            try:
                self._durable_folder(path.parent)
                self._durable_folder(temp)
                return persist_durable(str(path), data, tmp_dir=str(temp))
            except FileNotFoundError:
                if isinstance(source, Path):
                    raise
                # A folder made earlier was removed since (by a delete in another process, an
                # expiry leaving it empty): made again, once.
                self._durable_folders.difference_update({path.parent, temp})
                self._durable_folder(path.parent)
                self._durable_folder(temp)
                return persist_durable(str(path), data, tmp_dir=str(temp))
        except NotADirectoryError as exc:
            raise OutputError(
                f"cannot store {key}: a path on the way to {path.parent} is not a folder"
            ) from exc
        except OSError as exc:
            if isinstance(source, Path):
                source.unlink(missing_ok=True)
            raise OutputError(f"cannot store {key}: {exc.strerror or exc}") from exc

    def _durable_folder(self, folder: Path) -> None:
        """Make ``folder`` and its missing parents, each new entry fsynced in its parent."""
        if folder in self._durable_folders:
            return
        missing = [f for f in (folder, *folder.parents) if not f.exists()]
        folder.mkdir(parents=True, exist_ok=True)
        for made in missing:
            fsync_folder(str(made.parent))
        self._durable_folders.add(folder)

    def put(self, key: str, source: Source) -> None:
        path = self._path(key)
        tmp = source if isinstance(source, Path) else self.layout.temp_path()
        try:
            self._folder(str(path.parent))
            if isinstance(source, bytes):
                self._folder(str(tmp.parent))
                tmp.write_bytes(source)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            try:
                os.replace(tmp, path)
            except FileNotFoundError:
                if not self._gone(str(path), str(tmp)):
                    raise
                os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from exc

    def _inside(self, key: str) -> Path:
        """``key``'s path, refused (``OutputError``) if a link takes it out of the folder."""
        if self._real is None:
            self._real = self.layout.root.resolve()
        path = self._path(key)
        try:
            path.resolve().relative_to(self._real)
        except (OSError, RuntimeError, ValueError) as exc:  # outside, or a loop of links
            raise OutputError(f"{key} links out of the output folder: not read") from exc
        return path

    def get(self, key: str) -> bytes:
        path = self._inside(key)
        try:
            return path.read_bytes()
        except OSError as exc:
            raise OutputError(f"cannot read {path}: {exc.strerror or exc}") from exc

    def iter_bytes(self, key: str, *, chunk_size: int = READ_CHUNK) -> Iterator[bytes]:
        path = self._inside(key)
        try:
            with open(path, "rb") as fh:
                while chunk := fh.read(chunk_size):
                    yield chunk
        except OSError as exc:
            raise OutputError(f"cannot read {path}: {exc.strerror or exc}") from exc

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        base = self._path(prefix)
        if not base.is_dir():
            return
        root = self.layout.root
        for folder, dirs, files in os.walk(base):
            dirs.sort()
            for name in sorted(files):
                path = Path(folder, name)
                try:
                    stat = path.stat()
                except FileNotFoundError:
                    continue
                modified = datetime.fromtimestamp(stat.st_mtime, UTC)
                yield ObjectInfo(path.relative_to(root).as_posix(), stat.st_size, modified)

    def delete(self, key: str) -> None:
        """Remove ``key``, then the folders it leaves empty below the layout's own
        (``manifest/<run_id>/`` goes with its last part, as in a bucket; ``manifest/`` stays)."""
        path = self._path(key)
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot delete {path}: {exc.strerror or exc}") from exc
        root = self.layout.root
        for folder in path.parents:
            if folder.parent == root or root not in folder.parents:
                break
            self._folders.discard(str(folder))
            self._durable_folders.discard(folder)
            try:
                folder.rmdir()
            except OSError:  # not empty (or gone): the folders above are not either
                break

    def url(self, key: str) -> str:
        return str(self._path(key))

    @property
    def storage_options(self) -> dict[str, str] | None:
        return None

    @contextmanager
    def lock(self, *, owner: str = "", read_only_ok: bool = False) -> Iterator[Held]:
        """The folder's ``flock``: the kernel drops it when the process dies, so it is never
        lost."""
        with folder_lock.exclusive(self.layout, read_only_ok=read_only_ok):
            yield _Flock()

    def holder(self) -> Holder | None:
        pid = folder_lock.holder(self.layout)
        if pid is None:
            return None
        try:
            since: datetime | None = datetime.fromtimestamp(self.layout.lock.stat().st_mtime, UTC)
        except OSError:
            since = None
        return Holder(owner="", host=socket.gethostname(), pid=pid, since=since)


class _Flock:
    lost = False

    def check(self) -> None:
        return


# --------------------------------------------------------------------------- an S3 prefix


@dataclass(frozen=True, slots=True)
class S3Location:
    bucket: str
    prefix: str
    """Without leading or trailing slashes; may be empty."""

    @classmethod
    def parse(cls, location: str) -> S3Location:
        rest = location.removeprefix("s3://")
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise OutputError(f"--out {location}: name a bucket, as in s3://bucket/prefix")
        return cls(bucket, prefix.strip("/"))

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"


def _s3_error(what: str, where: str, exc: Exception) -> OutputError:
    """obstore's error as ours: the kind and the HTTP status, never the request's headers."""
    from obstore import exceptions as obx

    if isinstance(exc, obx.PermissionDeniedError | obx.UnauthenticatedError):
        hint = "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the bucket's policy"
    elif isinstance(exc, FileNotFoundError):
        hint = "check the bucket exists"
    else:
        hint = "check AWS_ENDPOINT_URL, AWS_REGION and the network"
    # The first line names the operation and the HTTP status; the server's body after it can
    # echo request details (an AWS SignatureDoesNotMatch body holds the access key id).
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    first = first.split(": <?xml", 1)[0]
    return OutputError(f"cannot {what} {where}: {first[:300]}; {hint}")


class S3Store:
    """A prefix in an S3 bucket (any S3-compatible server: AWS, Ceph's gateway, ...)."""

    everywhere = True

    def __init__(
        self,
        location: str,
        *,
        env: dict[str, str] | None = None,
        scratch: Path | None = None,
        lease_seconds: float = LEASE_SECONDS,
        clock: Callable[[], float] = time.time,
        give_up_after: float = 180.0,
        own_temp: str | None = None,
    ) -> None:
        """``scratch``: the local folder for the run's own files (default: one per location
        under ``TMPDIR``, ``scratch_dir``); ``give_up_after``: seconds a request is retried
        (5xx, dropped connections) before its error is raised; ``own_temp``: the temp files
        in a folder of their own in ``scratch`` (``own_temp``)."""
        from obstore.store import S3Store as ObstoreS3

        self._where = S3Location.parse(location)
        env = {k: v for k, v in (os.environ if env is None else env).items() if k in _ENV_KEPT}
        self._env = env
        config: dict[str, str] = {}
        for name in AWS_ENV:
            if env.get(name):
                config[name.lower().removeprefix("aws_")] = env[name]
        endpoint = config.pop("endpoint_url", None)
        if endpoint:
            config["endpoint"] = endpoint
        if "region" not in config and env.get("AWS_DEFAULT_REGION"):
            config["region"] = env["AWS_DEFAULT_REGION"]
        allow_http = bool(endpoint and endpoint.startswith("http://"))
        self._store: _ObstoreS3 = ObstoreS3(
            self._where.bucket,
            prefix=self._where.prefix or None,
            config=config,  # type: ignore[arg-type]  # keys are S3Config's, built from env
            client_options={
                "allow_http": allow_http,
                "timeout": timedelta(seconds=min(give_up_after, 30.0)),
            },
            retry_config={"retry_timeout": timedelta(seconds=give_up_after)},
        )
        self.scratch = Layout(scratch or scratch_dir(str(self._where), env=env))
        if own_temp is not None:
            self.scratch = self.scratch.with_own_temp(own_temp)
        self.lease_seconds = lease_seconds
        self.clock = clock
        self._give_up_after = give_up_after

    def __getstate__(self) -> dict[str, object]:
        """The settings, not obstore's client (which does not pickle): the AWS settings the
        driver has travel with the store, so a cluster's nodes write where it reads."""
        return {
            "location": str(self._where),
            "env": self._env,
            "scratch": self.scratch.root,
            "lease_seconds": self.lease_seconds,
            "clock": self.clock,
            "give_up_after": self._give_up_after,
            "own_temp": self.scratch.own_temp,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"S3Store({str(self._where)!r})"

    @property
    def location(self) -> str:
        return str(self._where)

    @property
    def temp_dir(self) -> Path:
        return self.scratch.tmp

    def prepare(self) -> None:
        self.scratch.prepare()

    def clean_temp(self) -> int:
        """The scratch folder's leftovers, and the temp objects dead runs left in the bucket
        (``REMOTE_TEMP``: a shard's pairs for nodes without the driver's disk); with a temp
        folder of its own, that folder only."""
        removed = self.scratch.clean_temp()
        if self.scratch.own_temp is not None:
            return removed
        for info in list(self.list(REMOTE_TEMP)):
            self.delete(info.key)
            removed += 1
        return removed

    @contextmanager
    def own_temp(self, name: str) -> Iterator[Store]:
        own = S3Store(**{**self.__getstate__(), "own_temp": name})  # type: ignore[arg-type]
        try:
            own.scratch.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot make {own.scratch.root}: {exc.strerror or exc}") from exc
        with folder_lock.own_temp(own.scratch):
            yield own

    def on_node(self, scratch: Path) -> Store:
        state = self.__getstate__()
        store = S3Store(**{**state, "scratch": scratch})  # type: ignore[arg-type]
        try:
            store.temp_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot make {store.temp_dir}: {exc.strerror or exc}") from exc
        return store

    def url(self, key: str) -> str:
        return f"{self._where}/{key}"

    @property
    def storage_options(self) -> dict[str, str] | None:
        return storage_options(self._env)

    def _exists(self, key: str) -> bool:
        import obstore

        try:
            obstore.head(self._store, key)
        except FileNotFoundError:
            return False
        return True

    def put_new(self, key: str, source: Source, *, durable: bool = False) -> bool:
        """``durable`` or not: a create-once put is stored when it is answered."""
        import obstore
        from obstore import exceptions as obx

        try:
            if isinstance(source, Path) and source.stat().st_size > SINGLE_PUT_BYTES:
                return self._put_new_parts(key, source)
            obstore.put(self._store, key, source, mode="create")
        except obx.AlreadyExistsError:
            return False
        except (obx.BaseError, OSError) as exc:
            raise _s3_error("store", self.url(key), exc) from exc
        finally:
            if isinstance(source, Path):
                source.unlink(missing_ok=True)
        return True

    def _put_new_parts(self, key: str, path: Path) -> bool:
        """A large spill file, uploaded in parts with bounded memory. S3 has no conditional
        multipart write that Ceph's gateway honours (nor a conditional copy), so: a HEAD, then
        the upload, which appears whole when it completes. Two runs racing on one image both
        upload and both count it new; the bytes are the same, since the key is their hash."""
        import obstore

        if self._exists(key):
            return False
        obstore.put(
            self._store,
            key,
            path,
            use_multipart=True,
            chunk_size=PART_BYTES,
            max_concurrency=PART_CONCURRENCY,
        )
        return True

    async def put_new_async(self, key: str, source: Source, *, durable: bool = False) -> bool:
        import anyio
        import obstore
        from obstore import exceptions as obx

        if isinstance(source, Path) and source.stat().st_size > SINGLE_PUT_BYTES:
            return await anyio.to_thread.run_sync(self.put_new, key, source)
        try:
            await obstore.put_async(self._store, key, source, mode="create")
        except obx.AlreadyExistsError:
            return False
        except (obx.BaseError, OSError) as exc:
            raise _s3_error("store", self.url(key), exc) from exc
        finally:
            if isinstance(source, Path):
                source.unlink(missing_ok=True)
        return True

    def put(self, key: str, source: Source) -> None:
        import obstore
        from obstore import exceptions as obx

        try:
            obstore.put(
                self._store, key, source, chunk_size=PART_BYTES, max_concurrency=PART_CONCURRENCY
            )
        except (obx.BaseError, OSError) as exc:
            raise _s3_error("write", self.url(key), exc) from exc
        finally:
            if isinstance(source, Path):
                source.unlink(missing_ok=True)

    def get(self, key: str) -> bytes:
        import obstore
        from obstore import exceptions as obx

        try:
            return bytes(obstore.get(self._store, key).bytes())
        except (obx.BaseError, FileNotFoundError) as exc:
            raise _s3_error("read", self.url(key), exc) from exc

    def iter_bytes(self, key: str, *, chunk_size: int = READ_CHUNK) -> Iterator[bytes]:
        import obstore
        from obstore import exceptions as obx

        try:
            yield from obstore.get(self._store, key).stream(min_chunk_size=chunk_size)
        except (obx.BaseError, FileNotFoundError) as exc:
            raise _s3_error("read", self.url(key), exc) from exc

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        import obstore
        from obstore import exceptions as obx

        try:
            for batch in obstore.list(self._store, prefix or None):
                for meta in batch:
                    yield ObjectInfo(meta["path"], meta["size"], meta["last_modified"])
        except FileNotFoundError:  # the bucket itself
            return
        except obx.BaseError as exc:
            raise _s3_error("list", self.url(prefix), exc) from exc

    def delete(self, key: str) -> None:
        import obstore
        from obstore import exceptions as obx

        try:
            obstore.delete(self._store, key)
        except FileNotFoundError:
            return
        except obx.BaseError as exc:
            raise _s3_error("delete", self.url(key), exc) from exc

    def lease(self, *, owner: str) -> Lease:
        # Its own client, whose requests give up well within the lease: a renewal that hangs
        # on a dead connection is retried at the next tick instead of outliving the lease.
        store = S3Store(
            self.location,
            env=self._env,
            scratch=self.scratch.root,
            lease_seconds=self.lease_seconds,
            clock=self.clock,
            give_up_after=self.lease_seconds / 6,
        )
        return Lease(store, owner=owner, seconds=self.lease_seconds, clock=self.clock)

    @contextmanager
    def lock(self, *, owner: str = "", read_only_ok: bool = False) -> Iterator[Held]:
        """A lease renewed by a background thread every third of ``lease_seconds``, then the
        scratch folder's ``flock`` (runs on one location share it)."""
        lease = self.lease(owner=owner)
        lease.acquire()
        stop = threading.Event()
        keeper = threading.Thread(
            target=lease.keep, args=(stop,), name="harvester-lease", daemon=True
        )
        keeper.start()
        try:
            with folder_lock.exclusive(self.scratch, read_only_ok=True):
                yield lease
        finally:
            stop.set()
            keeper.join()
            lease.release()

    def holder(self) -> Holder | None:
        return self.lease(owner="").live_holder()


# --------------------------------------------------------------------------- the S3 lease

LEASE_PREFIX: Final = ".lock/"


class Lease:
    """A lock on an S3 prefix made of create-once objects, ``.lock/<generation>.json``.

    S3 has no flock, and Ceph's gateway mishandles ``If-Match`` on PUT (it compares the
    quoted ETag), so the lease uses only ``If-None-Match: *``. The newest generation says who
    holds the prefix (owner, host, pid) and until when. To take a free or expired prefix, or
    to renew, a run creates the next generation: of two runs trying at once, one creation
    fails and that run is refused (or, renewing, learns it lost the lease). A run that
    created an older number than the newest (it was hung while others moved on) sees the
    newer one and gives up. Ending a run writes a released generation, so the next run need
    not wait. A run killed outright holds the prefix until its lease expires (``seconds``);
    a machine that hangs longer than that loses the lease, and finds out at its next renewal.
    Expiry is judged by the acquirer's clock against the holder's: keep clocks in sync.
    """

    def __init__(
        self, store: S3Store, *, owner: str, seconds: float, clock: Callable[[], float]
    ) -> None:
        self._store = store
        self._owner = owner
        self._seconds = seconds
        self._clock = clock
        self._token = uuid.uuid4().hex
        """Tells this lease's generations from another's (same owner, host and pid too)."""
        self.generation = 0
        """The generation this run created last (0: none)."""
        self.lost = False

    def check(self) -> None:
        if self.lost:
            raise LockedError(
                f"the lease on {self._store.location} was taken over while this run was "
                f"stalled (longer than {self._seconds:.0f} s); this run stops writing"
            )

    def _generations(self) -> list[int]:
        found = []
        for info in self._store.list(LEASE_PREFIX):
            name = info.key.rsplit("/", 1)[-1].removesuffix(".json")
            if name.isdigit():
                found.append(int(name))
        return sorted(found)

    @staticmethod
    def _key(generation: int) -> str:
        return f"{LEASE_PREFIX}{generation:012d}.json"

    def _read(self, generation: int) -> dict[str, object] | None:
        try:
            record: dict[str, object] = json.loads(self._store.get(self._key(generation)))
        except (OutputError, ValueError):
            return None
        return record

    def live_holder(self) -> Holder | None:
        """The holder of the newest generation, unless it was released or has expired."""
        generations = self._generations()
        if not generations:
            return None
        record = self._read(generations[-1])
        if record is None or record.get("released"):
            return None
        expires = float(str(record.get("expires", 0)))
        if expires <= self._clock():
            return None
        return Holder(
            owner=str(record.get("owner", "")),
            host=str(record.get("host", "")),
            pid=int(str(record.get("pid", 0))),
            expires_at=datetime.fromtimestamp(expires, UTC),
        )

    def _create(self, generation: int, *, released: bool = False) -> bool:
        expires = self._clock() + (0 if released else self._seconds)
        record = {
            "owner": self._owner,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "expires": expires,
            "expires_at": datetime.fromtimestamp(expires, UTC).isoformat(),
            "released": released,
            "token": self._token,
        }
        body = (json.dumps(record) + "\n").encode()
        if self._store.put_new(self._key(generation), body):
            return True
        # Taken, perhaps by this lease itself: a put the server stored but whose answer was
        # lost (a timeout) is retried on the next tick and finds its own generation.
        existing = self._read(generation)
        return existing is not None and existing.get("token") == self._token

    def _prune(self, below: int) -> None:
        for generation in self._generations():
            if generation < below:
                self._store.delete(self._key(generation))

    def acquire(self) -> None:
        """Take the prefix, or raise ``LockedError`` (never waits)."""
        holder = self.live_holder()
        if holder is not None:
            raise LockedError(self._locked_message(holder))
        generations = self._generations()
        nxt = (generations[-1] if generations else 0) + 1
        if not self._create(nxt) or self._generations()[-1] != nxt:
            raise LockedError(self._locked_message(self.live_holder()))
        self.generation = nxt
        self._prune(nxt)

    def renew(self) -> None:
        """Extend the lease by ``seconds`` from now; ``LockedError`` if it was taken over."""
        nxt = self.generation + 1
        if not self._create(nxt) or self._generations()[-1] != nxt:
            self.lost = True
            self.check()
        self.generation = nxt
        self._prune(nxt)

    def release(self) -> None:
        """Mark the prefix free (unless the lease was lost)."""
        if self.lost or not self.generation:
            return
        nxt = self.generation + 1
        if self._create(nxt, released=True):
            self._prune(nxt)
        self.generation = 0

    def keep(self, stop: threading.Event) -> None:
        """Renew every third of the lease until ``stop`` is set or the lease is lost."""
        while not stop.wait(self._seconds / 3):
            try:
                self.renew()
            except (LockedError, OutputError):
                return  # ``lost`` says so; a failed renewal is retried on the next tick

    def _locked_message(self, holder: Holder | None) -> str:
        who = (
            f"{holder.owner or 'a run'} on {holder.host}, pid {holder.pid}, lease until "
            f"{holder.expires_at:%Y-%m-%d %H:%M:%S} UTC"
            if holder is not None and holder.expires_at is not None
            else "another run"
        )
        return (
            f"another harvest ({who}) is already running on {self._store.location}; this run "
            "did nothing. Wait for it to finish (a killed run's lease expires after "
            f"{self._seconds:.0f} s), or stagger the cron schedules"
        )


Location = Path | str
"""Where a harvest's output lives: a local folder (a ``Path``), or ``s3://bucket/prefix``."""


def as_location(text: str | Path, *, base: Path | None = None) -> Location:
    """``--out``'s text as a location: ``s3://...`` stays a string, anything else is a path
    (relative ones resolved against ``base``, the job file's folder, if given)."""
    if isinstance(text, str) and text.startswith("s3://"):
        return text
    if base is None:
        return Path(text)
    expanded = os.path.expanduser(text)
    return Path(expanded if os.path.isabs(expanded) else os.path.normpath(base / expanded))


def as_store(where: Store | Location) -> Store:
    """``where`` as a store: a location (a folder, or ``s3://bucket/prefix``) is opened, so a
    Python caller may name a harvest the way the CLI does."""
    return open_store(where) if isinstance(where, Path | str) else where


def scratch_dir(location: str, *, env: dict[str, str] | None = None) -> Path:
    """The local folder for the temp files of runs on an S3 location: under ``TMPDIR``, one
    per location (so a run empties what a killed run on the same location left behind)."""
    env = dict(os.environ if env is None else env)
    base = env.get("TMPDIR") or tempfile.gettempdir()
    digest = hashlib.sha256(location.rstrip("/").encode()).hexdigest()[:12]
    return Path(base) / f"harvester-{digest}"


def storage_options(env: dict[str, str] | None = None) -> dict[str, str]:
    """polars' ``storage_options`` for ``s3://`` from the AWS environment variables (what
    ``pl.scan_parquet("s3://...", storage_options=...)`` needs for an endpoint of its own)."""
    env = dict(os.environ if env is None else env)
    options = {name.lower(): env[name] for name in AWS_ENV if env.get(name)}
    if "aws_region" not in options and env.get("AWS_DEFAULT_REGION"):
        options["aws_region"] = env["AWS_DEFAULT_REGION"]
    if options.get("aws_endpoint_url", "").startswith("http://"):
        options["aws_allow_http"] = "true"
    return options


def open_store(location: Location, *, env: dict[str, str] | None = None) -> Store:
    """The store for ``--out``: ``s3://bucket/prefix``, or a local folder. The one place
    that tells the two apart."""
    if isinstance(location, str) and location.startswith("s3://"):
        return S3Store(location, env=env)
    if isinstance(location, str) and "://" in location:
        scheme = location.split("://", 1)[0]
        raise OutputError(f"--out {location}: {scheme}:// is not supported; use s3:// or a path")
    return LocalStore(Path(location))


__all__ = [
    "LEASE_SECONDS",
    "Holder",
    "Lease",
    "LocalStore",
    "Location",
    "ObjectInfo",
    "S3Location",
    "S3Store",
    "Store",
    "as_location",
    "as_store",
    "open_store",
    "scratch_dir",
    "storage_options",
]

"""One harvest output on either backend, for the behaviour tests that must hold on both: a
folder, or a prefix in a fresh bucket on Ceph's S3 gateway (the ``out`` fixture, imported by
the test modules that use it)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from harvester.storage import manifest
from harvester.storage.layout import Layout
from harvester.storage.manifest import ManifestRow
from harvester.storage.objects import LocalStore, Location, S3Store, Store
from tests.s3gateway import Gateway

BACKENDS = ["folder", pytest.param("s3", marks=pytest.mark.s3)]


@dataclass(frozen=True, slots=True)
class Out:
    """An output location: what the harvester's readers take, its store, and what polars
    and a process of the harvester need to read it."""

    location: Location
    store: Store
    env: dict[str, str]
    """The AWS variables (empty for a folder); the fixture also sets them in this process."""
    storage_options: dict[str, str] | None

    @property
    def url(self) -> str:
        return str(self.location)


@pytest.fixture(params=BACKENDS)
def out(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Out:
    if request.param == "folder":
        folder = tmp_path / "out"
        Layout(folder).prepare()
        return Out(folder, LocalStore(folder), {}, None)
    gateway: Gateway = request.getfixturevalue("s3_gateway")
    bucket: str = request.getfixturevalue("s3_bucket")
    for name, value in gateway.env().items():  # the readers open the store from these
        monkeypatch.setenv(name, value)
    location = f"s3://{bucket}/night"
    return Out(
        location, S3Store(location, env=gateway.env()), gateway.env(), gateway.storage_options()
    )


def put_run(store: Store, run_id: str, rows: Sequence[ManifestRow], *, parts: int = 1) -> None:
    """An earlier run's manifest parts, ``rows`` split into ``parts`` of about equal size."""
    size = -(-len(rows) // parts)
    for index in range(parts):
        buffer = io.BytesIO()
        pq.write_table(manifest.rows_to_table(rows[index * size : (index + 1) * size]), buffer)
        store.put(f"manifest/{run_id}/part-{index:05d}.parquet", buffer.getvalue())

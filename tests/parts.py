"""Manifest parts of earlier runs, written straight into a store (what a harvest would have
written), for tests of what reads them."""

from __future__ import annotations

import io
from collections.abc import Sequence

import pyarrow.parquet as pq

from harvester.storage import manifest
from harvester.storage.manifest import ManifestRow
from harvester.storage.objects import Store


def put_run(
    store: Store, run_id: str, rows: Sequence[ManifestRow], *, parts: int = 1, first: int = 0
) -> None:
    """An earlier run's manifest parts, ``rows`` split into ``parts`` of about equal size,
    numbered from ``first``."""
    size = -(-len(rows) // parts)
    for index in range(parts):
        buffer = io.BytesIO()
        pq.write_table(manifest.rows_to_table(rows[index * size : (index + 1) * size]), buffer)
        store.put(f"manifest/{run_id}/part-{first + index:05d}.parquet", buffer.getvalue())

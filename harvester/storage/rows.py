"""The manifest's row, in the vocabulary of ``harvester.statuses``, without pyarrow or polars.

Worker processes build rows and import only this; ``harvester.storage.manifest`` declares the Arrow
schema the rows are written with, and checks that the two list the same columns.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True, slots=True)
class ManifestRow:
    """One manifest row; field names and order match ``SCHEMA``."""

    run_id: str
    harvested_at: datetime
    source_file: str | None
    source_line: int | None
    model: str | None
    request_id: str | None
    request_status: str
    status: str
    error: str | None = None
    http_status: int | None = None
    attempts: int | None = None
    seed: int | None = None
    prompt: str | None = None
    image_count: int | None = None
    image_index: int | None = None
    image_url: str | None = None
    content_type: str | None = None
    sha256: str | None = None
    path: str | None = None
    bytes: int | None = None
    stored_new: bool | None = None
    width: int | None = None
    height: int | None = None
    image_format: str | None = None
    """What the stored file's header says (png, jpeg, webp, gif, bmp), next to content_type."""
    image_width: int | None = None
    image_height: int | None = None
    """The stored file's own size, next to the declared width and height."""
    has_nsfw_concept: bool | None = None
    timings: str | None = None
    inference_seconds: float | None = None
    seed_text: str | None = None
    altered: bool = False
    """A stored text is not what the relay sent (repaired, truncated, nulled); ``error``
    says which and why."""

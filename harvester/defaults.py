"""Option values the CLI, job files and the run share, kept where loading them costs nothing
(``harvester status`` must not load the run layer or an HTTP library)."""

from __future__ import annotations

from typing import Final

DEFAULT_BASE_URL: Final = "https://queue.fal.run"
FAL_QUEUE_HOST: Final = "queue.fal.run"
AUTH_SCHEMES: Final = ("auto", "bearer", "key")
LOG_FORMATS: Final = ("text", "json")

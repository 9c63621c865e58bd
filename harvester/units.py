"""Human-readable quantities, shared by the summary, status and report."""

from __future__ import annotations


def size(n: int) -> str:
    """``812 B``, ``4.2 MB``: decimal units, as disks are sold."""
    value, unit = float(n), "B"
    for bigger in ("KB", "MB", "GB", "TB"):
        if value < 1000:
            break
        value, unit = value / 1000, bigger
    return f"{n:,} B" if unit == "B" else f"{value:,.1f} {unit}"


def duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h02m``."""
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def plural(n: int, word: str, many: str | None = None) -> str:
    """``1 row``, ``2 rows``, ``1,000 rows``; ``many`` for irregular words (``retries``)."""
    return f"{n:,} {word if n == 1 else many or word + 's'}"

"""The one exception of the report package, raised by every layer (Parquet, manifests, writing)."""

from __future__ import annotations

__all__ = ["ReportError"]


class ReportError(ValueError):
    """The run, round or a file cannot be reported on; the message names it and what to do."""

"""The one exception of the report package, raised by every layer (Parquet, manifests, writing)."""

from __future__ import annotations

from pipeline.errors import UserError

__all__ = ["ReportError"]


class ReportError(UserError, ValueError):
    """The run, round or a file cannot be reported on; the message names it and what to do.
    A :class:`~pipeline.errors.UserError` like every module's own error, so that a job or a
    script built on the library shows it as one line and exits 2."""

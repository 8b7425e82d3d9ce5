"""The base of every error that the user fixes by changing an input, an option or the storage."""

from __future__ import annotations


class UserError(Exception):
    """A mistake to fix, not a bug: the jobs print its message as one line (``teacher: error:
    ...``) and exit 2, without a traceback (``jobs/_common.py``). Each module's own error class
    (ConfigError, DatasetError, CheckpointError, ...) derives from it, so the jobs can catch them
    all without importing the modules that define them, some of which import torch."""

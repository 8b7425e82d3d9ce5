"""TensorBoard event files of a round: ``tensorboard --logdir <root>/artifacts/<run>``.

Written with tensorboardX (a small writer with no TensorFlow behind it; the ``tensorboard``
package is only needed to view the files). Training writes from rank 0 only, the pseudo-label
stages from the driver, each into the round's ``tensorboard/`` folder, so one ``--logdir``
shows every round of a run side by side. A writer that cannot be created (no tensorboardX,
an unwritable folder) turns into a no-op with one warning: event files are a view, never a
reason to stop a round.
"""

from __future__ import annotations

import math
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from pipeline.fs import S3Path, StorageError, location


class Events:
    """Scalars by tag and step; ``folder`` None writes nothing."""

    def __init__(self, folder: str | Path | None, *, prefix: str = "") -> None:
        self._writer: Any = None
        self._remote: Any = None  # an s3:// folder: events are written here, then uploaded
        self._local: Path | None = None
        self.prefix = prefix
        if folder is None:
            return
        try:
            from tensorboardX import SummaryWriter

            dest = location(folder)
            if isinstance(dest, S3Path):
                self._remote, self._local = dest, Path(tempfile.mkdtemp(prefix="ns-events-"))
                logdir = self._local
            else:
                dest.mkdir(parents=True, exist_ok=True)
                logdir = dest
            self._writer = SummaryWriter(logdir=str(logdir), flush_secs=10)
        except (ImportError, OSError) as e:
            print(f"warning: no TensorBoard files in {folder} ({e})", file=sys.stderr)

    def scalars(self, step: int, values: dict[str, float | int | None]) -> None:
        """Each value that is a finite number under ``prefix + tag`` (None: not measured)."""
        if self._writer is None:
            return
        for tag, value in values.items():
            if value is not None and math.isfinite(float(value)):
                self._writer.add_scalar(self.prefix + tag, float(value), step)
        self._writer.flush()
        self._upload()

    def _upload(self) -> None:
        # Event files are small; uploading them whole after each flush keeps the bucket's copy
        # at most one flush behind (object stores cannot append).
        if self._remote is None or self._local is None:
            return
        try:
            for f in sorted(self._local.iterdir()):
                (self._remote / f.name).upload(f)
        except StorageError as e:
            print(f"warning: TensorBoard files not uploaded ({e})", file=sys.stderr)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            self._upload()
        if self._local is not None:
            shutil.rmtree(self._local, ignore_errors=True)
            self._local = None

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
import sys
from pathlib import Path
from typing import Any


class Events:
    """Scalars by tag and step; ``folder`` None writes nothing."""

    def __init__(self, folder: str | Path | None, *, prefix: str = "") -> None:
        self._writer: Any = None
        self.prefix = prefix
        if folder is None:
            return
        try:
            from tensorboardX import SummaryWriter

            Path(folder).mkdir(parents=True, exist_ok=True)
            self._writer = SummaryWriter(logdir=str(folder), flush_secs=10)
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

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

"""Agreement of two rounds' pseudo-labels: which keys changed label between consecutive teachers.

Definition (the report restates it): flips between rounds N and N+1 (both pseudo-labeled, by the
teachers of rounds N-1 and N): rows of the same shard file joined by key; a flip is a key whose
label differs. The flip matrix counts (label in round N, label in round N+1) pairs.

Unlike the sums of :mod:`pipeline.report.stats`, a join needs the keys themselves: one shard's file
of each round is in memory at a time, never a whole round.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.report.errors import ReportError
from pipeline.report.parquet import BATCH_ROWS, iter_batches, schema_names

__all__ = ["FlipStats", "compare_files"]


@dataclass
class FlipStats:
    """Agreement of two rounds' pseudo-labels on the keys both labeled."""

    matrix: np.ndarray  # (C, C) int64: [label in round a, label in round b]
    only_a: int = 0  # keys in round a's files and not in round b's
    only_b: int = 0
    kept_both: int = 0  # keys with copies >= 1 in both rounds (when both have copies)
    kept_both_flipped: int = 0
    has_copies: bool = True
    duplicate_keys: int = 0  # repeated keys inside one file: the first row is used

    @property
    def common(self) -> int:
        return int(self.matrix.sum())

    @property
    def flipped(self) -> int:
        return self.common - int(np.trace(self.matrix))


def compare_files(path_a: str | Path | None, path_b: str | Path | None, num_classes: int,
                  stats: FlipStats, *, use_copies: tuple[bool, bool] = (True, True),
                  batch_rows: int = BATCH_ROWS) -> None:
    """Add one shard's pair of files (either may be None: that shard is missing in a round).

    ``use_copies`` says, per round, whether its copies column is final (select complete).
    """
    a = (_read_keyed(path_a, num_classes, batch_rows, use_copies[0])
         if path_a is not None else None)
    b = (_read_keyed(path_b, num_classes, batch_rows, use_copies[1])
         if path_b is not None else None)
    if a is None or b is None:
        stats.only_a += len(a) if a is not None else 0
        stats.only_b += len(b) if b is not None else 0
        return
    for df in (a, b):
        stats.duplicate_keys += int(df["key"].duplicated().sum())
    a = a.drop_duplicates("key")
    b = b.drop_duplicates("key")
    # Join by key, never by row position: the two rounds may have written rows in another order.
    both = a.merge(b, on="key", how="inner", suffixes=("_a", "_b"))
    stats.only_a += len(a) - len(both)
    stats.only_b += len(b) - len(both)
    la = both["label_a"].to_numpy(np.int64)
    lb = both["label_b"].to_numpy(np.int64)
    stats.matrix += np.bincount(la * num_classes + lb,
                                minlength=num_classes * num_classes).reshape(num_classes,
                                                                             num_classes)
    if "copies_a" in both and "copies_b" in both:
        kept = (both["copies_a"].to_numpy() > 0) & (both["copies_b"].to_numpy() > 0)
        stats.kept_both += int(kept.sum())
        stats.kept_both_flipped += int((kept & (la != lb)).sum())
    else:
        stats.has_copies = False


def _read_keyed(path: str | Path, num_classes: int, batch_rows: int,
                use_copies: bool) -> pd.DataFrame:
    """key, label (and copies) of one shard's file, rows with an invalid label dropped."""
    have = set(schema_names(path))
    cols = ["key", "label"] + (["copies"] if use_copies and "copies" in have else [])
    if not {"key", "label"} <= have:
        raise ReportError(f"{path}: pseudo-label file lacks the key or label column")
    parts = [pd.DataFrame(b) for b in iter_batches(path, cols, batch_rows)]
    df = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(
        {c: pd.Series(dtype=object if c == "key" else np.int64) for c in cols})
    ok = df["key"].notna() & (df["label"] >= 0) & (df["label"] < num_classes)
    return df[ok]


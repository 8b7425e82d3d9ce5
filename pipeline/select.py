"""Class-balanced selection of pseudo-labels, in two passes that never need the whole corpus.

Noisy Student (official ImageNet settings) keeps a pseudo-labeled image when the teacher's confidence
is at least a threshold (0.3), then balances classes: a class with more than K images keeps its K most
confident ones; a class with fewer is duplicated up to K, each image used K / count times rounded at
random (floor, plus one more with probability equal to the fractional part).

A corpus of hundreds of millions of rows does not fit one process, so selection is split:

1. per shard, ``class_stats`` builds a histogram of confidences per predicted class; histograms are
   summed (``merge_stats``) and ``plan_selection`` turns the total into a per-class plan: a cutoff
   bin, the fraction of the boundary bin to keep, and a duplication factor;
2. per shard, ``apply_selection`` applies the plan and returns a ``copies`` column (0 = not used).

The planner and its two passes are pure (DataFrame in, arrays out); :func:`select_pseudo_labels`
at the bottom runs them over the pseudo-label files, which it reads and rewrites through
:mod:`pipeline.pseudo_files`.

The approximation, stated plainly: a class's rows are ranked by confidence only down to the bin
(``num_bins`` equal bins on [threshold, 1]; 4096 bins are about 1.7e-4 wide at threshold 0.3). Bins
above the boundary bin are kept whole, bins below are dropped, and each row in the boundary bin is kept
with probability ``(K - rows above) / rows in the bin``. So the kept count per class equals K in
expectation, exactly K when K falls on a bin edge (always the case when no bin is shared by rows of the
same class), and otherwise off by a binomial error of at most about ``sqrt(rows in bin) / 2``. Inside the
boundary bin the choice ignores confidence: rows there differ by less than one bin width, which is a
tie for any practical purpose. Likewise the copies of a duplicated class sum to K in expectation, with
a binomial error from the random rounding.

Every per-row random decision is a hash of (seed, shard, key), not of row position or processing
order, so the result does not depend on how shards are ordered, split across workers, or resumed.
The shard name is hashed together with the key because WebDataset keys are often only unique within
a shard (e.g. "000123" in every shard); keys repeated across shards would otherwise share their draws.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import reduce
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline.config import PseudoLabelConfig
from pipeline.fs import S3Path, location, read_table
from pipeline.pause import pause_point
from pipeline.pseudo_files import PseudoFileError, file_footer, file_meta, write_table
from pipeline.shards import KeyIndex
from pipeline.storage import sha256_file

__all__ = [
    "ClassStats",
    "SelectionPlan",
    "apply_selection",
    "class_stats",
    "default_k",
    "merge_stats",
    "plan_selection",
    "select_pseudo_labels",
]

DEFAULT_THRESHOLD = 0.3
DEFAULT_NUM_BINS = 4096

_STATS_COLUMNS = ("label", "confidence")
_APPLY_COLUMNS = ("key", "shard", "label", "confidence")


@dataclass(frozen=True, eq=False)
class ClassStats:
    """Mergeable per-class statistics of one or more pseudo-label shards.

    ``hist[c, b]`` counts rows predicted as class ``c`` whose confidence is at least ``threshold`` and
    falls in bin ``b`` of ``num_bins`` equal bins on [threshold, 1] (the top bin includes 1).
    ``total[c]`` counts all rows predicted as ``c``, below the threshold too, for reports.
    Arrays are read-only; equality is not defined (compare the arrays).
    """

    hist: np.ndarray  # (C, num_bins) int64
    total: np.ndarray  # (C,) int64
    threshold: float

    def __post_init__(self) -> None:
        if self.hist.ndim != 2 or self.total.shape != (self.hist.shape[0],):
            raise ValueError(
                f"ClassStats needs hist of shape (C, bins) and total of shape (C,); "
                f"got {self.hist.shape} and {self.total.shape}."
            )
        object.__setattr__(self, "hist", _readonly(self.hist))
        object.__setattr__(self, "total", _readonly(self.total))

    @property
    def num_classes(self) -> int:
        return int(self.hist.shape[0])

    @property
    def num_bins(self) -> int:
        return int(self.hist.shape[1])

    @property
    def counts(self) -> np.ndarray:
        """(C,) rows at or above the threshold, per class."""
        return self.hist.sum(axis=1)

    @property
    def rows(self) -> int:
        """All rows seen, below the threshold included."""
        return int(self.total.sum())

    def merge(self, other: ClassStats) -> ClassStats:
        """Sum of two statistics; they must share class count, threshold and bins."""
        if self.hist.shape != other.hist.shape or self.threshold != other.threshold:
            raise ValueError(
                "Cannot merge ClassStats computed with different settings: "
                f"(classes, bins, threshold) = {(*self.hist.shape, self.threshold)} vs "
                f"{(*other.hist.shape, other.threshold)}. Recompute all shards with the same ones."
            )
        return ClassStats(
            hist=self.hist + other.hist, total=self.total + other.total, threshold=self.threshold
        )


def class_stats(
    df: pd.DataFrame,
    num_classes: int,
    threshold: float = DEFAULT_THRESHOLD,
    num_bins: int = DEFAULT_NUM_BINS,
) -> ClassStats:
    """Per-class confidence histogram of one pseudo-label table (pass 1, per shard)."""
    _check_settings(num_classes, threshold, num_bins)
    _require_columns(df, _STATS_COLUMNS, "class_stats")
    labels = _labels(df, num_classes)
    conf = df["confidence"].to_numpy(dtype=np.float64)
    above = conf >= threshold  # NaN compares False, so a broken confidence is never selected
    bins = _bin_index(conf[above], threshold, num_bins)
    # One flat bincount instead of a Python loop over classes: cheap for 1000 classes x 4096 bins.
    flat = np.bincount(labels[above] * num_bins + bins, minlength=num_classes * num_bins)
    return ClassStats(
        hist=flat.reshape(num_classes, num_bins).astype(np.int64),
        total=np.bincount(labels, minlength=num_classes).astype(np.int64),
        threshold=float(threshold),
    )


def merge_stats(stats: Iterable[ClassStats]) -> ClassStats:
    """Sum of any number of statistics (order does not matter: it is integer addition)."""
    stats = list(stats)
    if not stats:
        raise ValueError("merge_stats needs at least one ClassStats (got none: no shards?).")
    return reduce(ClassStats.merge, stats)


def default_k(counts: np.ndarray) -> int:
    """K when the user sets none: the median per-class count over classes that have any rows.

    Why the median: it balances toward the typical class, so about half the classes are trimmed to
    their most confident rows and half are duplicated, as in the paper (130M images used, 81M of them
    unique). Unlike the mean, a few huge classes (a catch-all class of the unlabeled corpus) do not
    inflate it; unlike the minimum, one rare class does not throw away most of the data. Classes with
    no rows are left out because they cannot be duplicated and would drag the median to 0.
    Returns 0 only when no class has any row.
    """
    counts = np.asarray(counts)
    nonzero = counts[counts > 0]
    if nonzero.size == 0:
        return 0
    # Round half up so that K is a whole number and never below 1.
    return max(1, int(np.floor(np.median(nonzero) + 0.5)))


@dataclass(frozen=True, eq=False)
class SelectionPlan:
    """What pass 2 needs to select rows of any shard, per class.

    A row of class ``c`` in confidence bin ``b`` is kept when ``b > cut_bin[c]``, or when
    ``b == cut_bin[c]`` and its hash-uniform draw is below ``keep_frac[c]``. A kept row is used
    ``floor(copy_factor[c])`` times, plus once more with probability ``frac(copy_factor[c])``.
    """

    threshold: float
    num_bins: int
    k: int
    seed: int
    counts: np.ndarray  # (C,) int64 rows at or above the threshold
    cut_bin: np.ndarray  # (C,) int64; num_bins for a class with no rows (keeps nothing)
    keep_frac: np.ndarray  # (C,) float64 in (0, 1]
    copy_factor: np.ndarray  # (C,) float64, K / count for a class with fewer than K rows, else 1

    def __post_init__(self) -> None:
        for name in ("counts", "cut_bin", "keep_frac", "copy_factor"):
            object.__setattr__(self, name, _readonly(getattr(self, name)))

    @property
    def num_classes(self) -> int:
        return int(self.counts.shape[0])

    @property
    def expected_kept(self) -> np.ndarray:
        """(C,) distinct rows kept per class, in expectation (exact integers by construction)."""
        return np.minimum(self.counts, self.k)

    @property
    def expected_copies(self) -> np.ndarray:
        """(C,) total copies per class, in expectation: K for every class that has rows."""
        return np.where(self.counts > 0, self.k, 0).astype(np.int64)

    def to_dict(self) -> dict:
        """JSON-friendly summary for the manifest (expected values; the shards hold the actual)."""
        kept = self.expected_kept
        copies = self.expected_copies
        return {
            "threshold": self.threshold,
            "k": self.k,
            "seed": self.seed,
            "num_bins": self.num_bins,
            "rows_above_threshold": int(self.counts.sum()),
            "kept": int(kept.sum()),
            "selected_with_copies": int(copies.sum()),
            "per_class": {
                str(c): {"kept": int(kept[c]), "copies": int(copies[c])}
                for c in range(self.num_classes)
            },
        }


def plan_selection(stats: ClassStats, k: int | None = None, seed: int = 0) -> SelectionPlan:
    """Turn merged statistics into a per-class plan: top-K by confidence, duplicate up to K."""
    counts = stats.counts
    if k is None:
        k = default_k(counts)
    elif isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k must be a whole number >= 1, or None for the default; got {k!r}.")
    k = int(k)
    num_classes, num_bins = stats.hist.shape

    # Rows in bin b or above, per class: non-increasing in b.
    at_or_above = np.cumsum(stats.hist[:, ::-1], axis=1)[:, ::-1]  # (C, bins)
    # The boundary bin is the highest bin at which the count from the top reaches K.
    boundary = (at_or_above >= k).sum(axis=1) - 1  # (C,); -1 when the class has fewer than K
    over = counts > k
    rows = np.arange(num_classes)
    b = np.clip(boundary, 0, num_bins - 1)
    in_bin = stats.hist[rows, b]
    strictly_above = at_or_above[rows, b] - in_bin
    with np.errstate(divide="ignore", invalid="ignore"):
        boundary_frac = (k - strictly_above) / in_bin

    cut_bin = np.where(over, boundary, 0)
    keep_frac = np.where(over, boundary_frac, 1.0)
    copy_factor = np.where(over, 1.0, k / np.maximum(counts, 1))
    # A class with no rows keeps nothing; the cutoff above every bin says so even for stray rows.
    empty = counts == 0
    cut_bin = np.where(empty, num_bins, cut_bin)
    copy_factor = np.where(empty, 0.0, copy_factor)
    return SelectionPlan(
        threshold=stats.threshold,
        num_bins=num_bins,
        k=k,
        seed=int(seed),
        counts=counts.astype(np.int64),
        cut_bin=cut_bin.astype(np.int64),
        keep_frac=keep_frac.astype(np.float64),
        copy_factor=copy_factor.astype(np.float64),
    )


def apply_selection(df: pd.DataFrame, plan: SelectionPlan) -> np.ndarray:
    """(N,) int32 copies per row of ``df`` (pass 2, per shard); 0 means not selected."""
    _require_columns(df, _APPLY_COLUMNS, "apply_selection")
    if len(df) == 0:
        return np.zeros(0, dtype=np.int32)
    labels = _labels(df, plan.num_classes)
    conf = df["confidence"].to_numpy(dtype=np.float64)
    above = conf >= plan.threshold
    # Bins of rows below the threshold are meaningless; -1 keeps them below every cutoff.
    bins = np.full(len(df), -1, dtype=np.int64)
    bins[above] = _bin_index(conf[above], plan.threshold, plan.num_bins)
    u_keep, u_copy = _row_uniforms(df, plan.seed)

    cut = plan.cut_bin[labels]
    keep = above & ((bins > cut) | ((bins == cut) & (u_keep < plan.keep_frac[labels])))
    factor = plan.copy_factor[labels]
    whole = np.floor(factor)
    copies = whole + (u_copy < factor - whole)
    return np.where(keep, copies, 0).astype(np.int32)


# --- helpers -----------------------------------------------------------------------------------


def _bin_index(conf: np.ndarray, threshold: float, num_bins: int) -> np.ndarray:
    """Bin of each confidence (all >= threshold) on [threshold, 1]; values above 1 go to the top."""
    # Float16/float32 softmax outputs can exceed 1 by a rounding error: clip instead of failing.
    scaled = (conf - threshold) * (num_bins / (1.0 - threshold))
    return np.clip(scaled.astype(np.int64), 0, num_bins - 1)


def _labels(df: pd.DataFrame, num_classes: int) -> np.ndarray:
    labels = df["label"].to_numpy(dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)][0]
        raise ValueError(
            f"Pseudo-label table has label {bad}, outside the {num_classes} classes: "
            "check that num_classes matches the teacher that wrote the table."
        )
    return labels


def _row_uniforms(df: pd.DataFrame, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two independent uniforms on [0, 1) per row, a pure function of (seed, shard name, key).

    The shard's file name, not its path: the same corpus moved or mounted elsewhere selects the
    same rows."""
    # pandas needs a 16-byte hash key; derive it from the seed so every seed gives other draws.
    hash_key = hashlib.blake2b(f"noisy-student-select:{seed}".encode(), digest_size=8).hexdigest()
    ids = pd.DataFrame({"shard": df["shard"].astype(str).str.rsplit("/", n=1).str[-1],
                        "key": df["key"].to_numpy()})
    h = pd.util.hash_pandas_object(ids, index=False, hash_key=hash_key)
    h = _mix64(h.to_numpy(dtype=np.uint64))
    # The two 32-bit halves are independent draws: one for the boundary bin, one for rounding.
    scale = 1.0 / 2.0**32
    high = (h >> np.uint64(32)).astype(np.float64) * scale
    low = (h & np.uint64(0xFFFFFFFF)).astype(np.float64) * scale
    return high, low


def _mix64(h: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: pandas combines column hashes with a weak multiply-xor step."""
    h = h.copy()
    h ^= h >> np.uint64(30)
    h *= np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(27)
    h *= np.uint64(0x94D049BB133111EB)
    h ^= h >> np.uint64(31)
    return h


def _require_columns(df: pd.DataFrame, columns: tuple[str, ...], where: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(
            f"{where} needs pseudo-label columns {list(columns)}; missing {missing} "
            f"(got {list(df.columns)})."
        )


def _check_settings(num_classes: int, threshold: float, num_bins: int) -> None:
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1; got {num_classes}.")
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"Confidence threshold must be in [0, 1); got {threshold}.")
    if num_bins < 1:
        raise ValueError(f"num_bins must be >= 1; got {num_bins}.")


def _readonly(array: np.ndarray) -> np.ndarray:
    # A frozen dataclass should not be mutable through its arrays. A read-only view (not a copy:
    # a 1000-class x 4096-bin histogram is 32 MB) leaves the caller's own array writable.
    view = np.asarray(array).view()
    view.setflags(write=False)
    return view


# ----------------------------------------------------------------------------- over the files


def select_pseudo_labels(out_dir: str | Path, num_classes: int, cfg: PseudoLabelConfig, *,
                         classes: list[str] | None = None, names: list[str] | None = None,
                         progress: Callable[[str], Any] = print) -> dict[str, Any]:
    """Threshold + per-class balancing over all files in ``out_dir``; rewrites ``copies``.

    Pass 1 reads key, shard, label and confidence (and checks keys are unique across shards);
    pass 2 rewrites one file at a time (atomically), so
    memory is one shard's table. Idempotent: running it again gives the same files, and a file
    already written with the same plan is not rewritten (resume after a kill).
    ``names`` limits it to these files (default: every pseudo-label file in ``out_dir``).
    Returns the manifest's ``pseudo_labels`` dict, with per-class counts taken from the files.
    """
    cfg.validate()
    out_dir = location(out_dir)
    classes = classes or [str(i) for i in range(num_classes)]
    rows = _selection_files(out_dir, names)
    paths = list(rows)
    # Pass 1 reads every key anyway: a key two shards share is found here (8 bytes a key).
    keys = KeyIndex("unlabeled", expected=sum(rows.values()))
    shard_of: dict[str, Path | S3Path] = {}
    parts = []
    for p in paths:
        table = read_table(p, columns=["key", "shard", "label", "confidence"])
        shard = table.column("shard")[0].as_py() if table.num_rows else str(p)
        shard_of[shard] = p
        keys.add(shard, table.column("key").to_numpy(zero_copy_only=False))
        parts.append(class_stats(table.select(["label", "confidence"]).to_pandas(), num_classes,
                                 cfg.threshold))
    keys.check(lambda shard: read_table(shard_of[shard], columns=["key"]).column("key")
               .to_pylist())
    stats = merge_stats(parts)
    plan = plan_selection(stats, k=cfg.k, seed=cfg.seed)
    kept = np.zeros(num_classes, np.int64)
    copies = np.zeros(num_classes, np.int64)
    files = []
    for i, path in enumerate(paths):  # pass 2
        labels, file_copies, sha = _apply_plan(path, plan)
        if i == 0:
            pause_point("select")  # tests only (tests/test_faults.py)
        kept += np.bincount(labels[file_copies > 0], minlength=num_classes)
        copies += np.bincount(labels, weights=file_copies, minlength=num_classes).astype(np.int64)
        # Per file: what the training readers are dealt by (train_stage.make_job), so that a
        # student's start reads the manifest, not one column of every file.
        files.append({"name": path.name, "rows": len(labels), "kept": int((file_copies > 0).sum()),
                      "copies": int(file_copies.sum()), "sha256": sha})
    progress(f"select: threshold {cfg.threshold}, K {plan.k}: {int(kept.sum())} of "
             f"{stats.rows} images kept, {int(copies.sum())} with copies")
    return {
        "uri": str(out_dir), "files": files, "rows": stats.rows, "kept": int(kept.sum()),
        "selected_with_copies": int(copies.sum()), "threshold": cfg.threshold,
        "k": plan.k, "seed": cfg.seed, "rows_above_threshold": int(stats.counts.sum()),
        "per_class": {classes[c]: {"kept": int(kept[c]), "copies": int(copies[c])}
                      for c in range(num_classes)},
    }


def _selection_files(out_dir: Path | S3Path,
                     names: list[str] | None) -> dict[Path | S3Path, int]:
    """The files to select over, sorted, with their row counts (one footer read each)."""
    listed = sorted(out_dir.glob("*.parquet") if names is None else (out_dir / n for n in names))
    footers = {p: file_footer(p) for p in listed}
    missing = [p for p, (meta, _) in footers.items() if meta is None]
    if names is not None and missing:
        raise PseudoFileError(f"{missing[0]} is missing or not a pseudo-label file; run the "
                               "pseudo_label stage again")
    rows = {p: n for p, (meta, n) in footers.items() if meta is not None}
    if not rows:
        raise PseudoFileError(f"no pseudo-label files in {out_dir}; run the pseudo_label stage")
    return rows


def _apply_plan(path: Path | S3Path, plan: SelectionPlan
                ) -> tuple[np.ndarray, np.ndarray, str]:
    """Rewrite one file's ``copies`` (unless it already holds this plan's); (labels, copies,
    sha256 of the file)."""
    fingerprint = _plan_fingerprint(plan)
    meta = file_meta(path)
    if meta.get("selection") == fingerprint:
        done = read_table(path, columns=["label", "copies"])
        return done["label"].to_numpy(), done["copies"].to_numpy(), sha256_file(path)
    table = read_table(path)
    copies = apply_selection(table.select(["key", "shard", "label", "confidence"]).to_pandas(),
                             plan)
    table = table.set_column(table.schema.get_field_index("copies"), "copies",
                             pa.array(copies, pa.int32()))
    sha = write_table(path, table, {**meta, "selection": fingerprint})
    return table["label"].to_numpy(), copies, sha


def _plan_fingerprint(plan: SelectionPlan) -> str:
    h = hashlib.sha256(json.dumps(plan.to_dict(), sort_keys=True).encode())
    for arr in (plan.cut_bin, plan.keep_frac, plan.copy_factor):
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()[:16]

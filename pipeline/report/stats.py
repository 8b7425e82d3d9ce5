"""Streaming statistics of pseudo-label and prediction files: sums that record batches add to.

Scale. The pseudo-label corpus may hold hundreds of millions of rows, so nothing here holds every
row: each Parquet file is read in record batches of only the columns needed, and every statistic is a
sum that batches add to (counts per class, histograms with fixed bins, a class x class flip matrix).
The exceptions are bounded by design: the agreement between two rounds joins one shard's file of each
round at a time (one shard's keys in memory; see :mod:`pipeline.report.flips`), and the held-out
truth of the unlabeled split, when the dataset has one, is held as a sorted array of 64-bit key
hashes plus labels (12 bytes a row), in hash partitions of at most ``truth_rows_per_pass`` rows,
each partition costing one more read of the key and label columns.

Definitions (the report restates them):

* median confidence: from a per-class histogram of 1000 equal bins on [0, 1]: the point where the
  cumulative count reaches half the rows, interpolated linearly inside its bin. Where rows are dense
  (any class of a real corpus) that is within one bin, 0.001, of the exact median; with a handful of
  rows it can land anywhere between the two middle values;
* precision of class c: among rows pseudo-labeled c that have a held-out truth label, the share whose
  truth is c. ``precision`` counts every pseudo-labeled row (the teacher on the whole corpus);
  ``precision_kept`` only the distinct rows selection kept (copies >= 1); ``precision_copies`` weights
  each row by its copies, i.e. it is the precision of what the student trains on, duplicates counted as
  often as they are used. Run-level values are micro-averages over all classes;
* expected calibration error (Guo et al., 2017): 15 equal-width bins (lo, hi] on confidence (0 goes to
  the first bin); ECE = sum over bins of (rows in bin / rows) * |accuracy in bin - mean confidence in
  bin|.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.fs import parquet_file
from pipeline.report.errors import ReportError
from pipeline.report.parquet import BATCH_ROWS, iter_batches, schema_names

__all__ = [
    "CONFIDENCE_BINS",
    "ECE_BINS",
    "PLOT_BINS",
    "TRUTH_ROWS_PER_PASS",
    "CalibrationSums",
    "PseudoLabelStats",
    "calibration_bins",
    "calibration_from_file",
    "coarsen",
    "expected_calibration_error",
    "median_from_histogram",
    "scan_pseudo_labels",
]

CONFIDENCE_BINS = 1000  # fine bins on [0, 1]: the median's resolution
PLOT_BINS = 50  # coarse bins of the plotted histograms; divides CONFIDENCE_BINS
ECE_BINS = 15
TRUTH_ROWS_PER_PASS = 50_000_000  # 600 MB of hashes + labels

CalibrationSums = tuple[np.ndarray, np.ndarray, np.ndarray]  # per bin: count, conf sum, correct sum


# ============================================================================ pure statistics


def median_from_histogram(hist: np.ndarray, lo: float = 0.0, hi: float = 1.0) -> np.ndarray:
    """Median of each row of ``hist`` (counts in equal bins on [lo, hi]); NaN for empty rows.

    The middle row's bin is found from the cumulative counts and the median interpolated linearly
    inside it, as if its rows were spread evenly: the error is at most one bin width.
    """
    hist = np.atleast_2d(np.asarray(hist, dtype=np.float64))  # (C, B)
    width = (hi - lo) / hist.shape[1]
    total = hist.sum(axis=1)
    half = total / 2.0
    cum = np.cumsum(hist, axis=1)
    # First bin whose cumulative count reaches half of the rows.
    b = np.minimum((cum < half[:, None]).sum(axis=1), hist.shape[1] - 1)
    rows = np.arange(hist.shape[0])
    before = cum[rows, b] - hist[rows, b]
    with np.errstate(divide="ignore", invalid="ignore"):
        inside = np.where(hist[rows, b] > 0, (half - before) / hist[rows, b], 0.0)
    return np.where(total > 0, lo + (b + inside) * width, np.nan)


def calibration_bins(
    confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-bin (count, sum of confidence, sum of correct) over ``bins`` equal bins (lo, hi] of [0, 1].

    Sums rather than means so that batches add up; :func:`expected_calibration_error` turns them into
    the ECE.
    """
    conf = np.clip(np.asarray(confidence, dtype=np.float64), 0.0, 1.0)
    # (lo, hi] bins as in Guo et al.: ceil(conf * M) - 1, with 0 put in the first bin.
    idx = np.clip(np.ceil(conf * bins).astype(np.int64) - 1, 0, bins - 1)
    count = np.bincount(idx, minlength=bins).astype(np.int64)
    conf_sum = np.bincount(idx, weights=conf, minlength=bins)
    correct_sum = np.bincount(idx, weights=np.asarray(correct, dtype=np.float64), minlength=bins)
    return count, conf_sum, correct_sum


def expected_calibration_error(
    confidence: np.ndarray | None = None,
    correct: np.ndarray | None = None,
    *,
    bins: int = ECE_BINS,
    sums: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> float:
    """ECE from rows (``confidence``, ``correct``) or from accumulated :func:`calibration_bins` sums."""
    if sums is None:
        if confidence is None or correct is None:
            raise ValueError("expected_calibration_error needs confidence and correct, or sums")
        sums = calibration_bins(confidence, correct, bins)
    count, conf_sum, correct_sum = (np.asarray(a, dtype=np.float64) for a in sums)
    n = count.sum()
    if n == 0:
        return math.nan
    # |acc_m - conf_m| * n_m / n == |correct_sum_m - conf_sum_m| / n: no division by empty bins.
    return float(np.abs(correct_sum - conf_sum).sum() / n)


def coarsen(fine: np.ndarray, bins: int = PLOT_BINS) -> np.ndarray:
    """Sum groups of adjacent fine bins (the fine count must be a multiple of ``bins``)."""
    return fine.reshape(bins, -1).sum(axis=1)


def _key_hash(keys: np.ndarray) -> np.ndarray:
    # A fixed hash key so that hashes of the truth file and of the pseudo-label files agree.
    return pd.util.hash_array(np.asarray(keys, dtype=object), categorize=False)


# ============================================================================ pseudo-label stats


@dataclass
class PseudoLabelStats:
    """Sums over pseudo-label rows, per predicted class: every field adds across batches and files.

    Arrays are (C,) unless noted. ``kept``/``copies`` stay zero and ``has_copies`` False when the
    select stage has not written the copies column; ``truth_*`` stay zero without a held-out truth.
    """

    num_classes: int
    threshold: float | None
    rows: np.ndarray = field(init=False)  # rows predicted as c
    above: np.ndarray = field(init=False)  # ... with confidence >= threshold
    kept: np.ndarray = field(init=False)  # ... with copies >= 1
    copies: np.ndarray = field(init=False)  # sum of copies
    conf_sum: np.ndarray = field(init=False)
    conf_hist: np.ndarray = field(init=False)  # (C, CONFIDENCE_BINS)
    kept_conf_hist: np.ndarray = field(init=False)  # (CONFIDENCE_BINS,) rows with copies >= 1
    entropy_hist: np.ndarray = field(init=False)  # (PLOT_BINS,) on [0, ln C]
    truth_rows: np.ndarray = field(init=False)  # rows with a truth label
    correct: np.ndarray = field(init=False)
    truth_kept: np.ndarray = field(init=False)
    correct_kept: np.ndarray = field(init=False)
    truth_copies: np.ndarray = field(init=False)  # sum of copies over rows with a truth label
    correct_copies: np.ndarray = field(init=False)
    invalid_rows: int = 0  # null/NaN confidence or a label outside the classes: skipped
    has_copies: bool = False
    has_truth: bool = False

    def __post_init__(self) -> None:
        c = self.num_classes
        for name in ("rows", "above", "kept", "copies", "truth_rows", "correct", "truth_kept",
                     "correct_kept", "truth_copies", "correct_copies"):
            setattr(self, name, np.zeros(c, dtype=np.int64))
        self.conf_sum = np.zeros(c, dtype=np.float64)
        self.conf_hist = np.zeros((c, CONFIDENCE_BINS), dtype=np.int64)
        self.kept_conf_hist = np.zeros(CONFIDENCE_BINS, dtype=np.int64)
        self.entropy_hist = np.zeros(PLOT_BINS, dtype=np.int64)

    @property
    def entropy_max(self) -> float:
        """Upper edge of the entropy bins: ln C, the entropy of the uniform distribution."""
        return math.log(max(self.num_classes, 2))

    def valid_rows(self, label: np.ndarray, confidence: np.ndarray) -> np.ndarray:
        ok = (label >= 0) & (label < self.num_classes) & np.isfinite(confidence)
        self.invalid_rows += int((~ok).sum())
        return ok

    def add(self, label: np.ndarray, confidence: np.ndarray, entropy: np.ndarray | None = None,
            copies: np.ndarray | None = None) -> None:
        """Add a batch of valid rows (see :meth:`valid_rows`)."""
        c = self.num_classes
        label = label.astype(np.int64)
        conf = np.clip(confidence.astype(np.float64), 0.0, 1.0)
        self.rows += np.bincount(label, minlength=c)
        if self.threshold is not None:
            self.above += np.bincount(label[conf >= self.threshold], minlength=c)
        self.conf_sum += np.bincount(label, weights=conf, minlength=c)
        fine = np.minimum((conf * CONFIDENCE_BINS).astype(np.int64), CONFIDENCE_BINS - 1)
        # One flat bincount rather than a loop over classes.
        self.conf_hist += np.bincount(label * CONFIDENCE_BINS + fine,
                                      minlength=c * CONFIDENCE_BINS).reshape(c, CONFIDENCE_BINS)
        if entropy is not None:
            ent = entropy.astype(np.float64)
            ent = ent[np.isfinite(ent)]
            # Rounding can push an entropy a hair past ln C or below 0: clip into the end bins.
            eb = np.clip((ent / self.entropy_max * PLOT_BINS).astype(np.int64), 0, PLOT_BINS - 1)
            self.entropy_hist += np.bincount(eb, minlength=PLOT_BINS)
        if copies is not None:
            self.has_copies = True
            cp = np.maximum(copies.astype(np.int64), 0)
            keep = cp > 0
            self.kept += np.bincount(label[keep], minlength=c)
            self.copies += np.bincount(label, weights=cp, minlength=c).astype(np.int64)
            self.kept_conf_hist += np.bincount(fine[keep], minlength=CONFIDENCE_BINS)

    def add_truth(self, label: np.ndarray, truth: np.ndarray, copies: np.ndarray | None) -> None:
        """Add rows (valid labels) with a truth label (``truth`` >= 0 for every row given)."""
        c = self.num_classes
        self.has_truth = True
        label = label.astype(np.int64)
        hit = truth == label
        self.truth_rows += np.bincount(label, minlength=c)
        self.correct += np.bincount(label[hit], minlength=c)
        if copies is not None:
            cp = np.maximum(copies.astype(np.int64), 0)
            keep = cp > 0
            self.truth_kept += np.bincount(label[keep], minlength=c)
            self.correct_kept += np.bincount(label[keep & hit], minlength=c)
            self.truth_copies += np.bincount(label, weights=cp, minlength=c).astype(np.int64)
            self.correct_copies += np.bincount(label[hit], weights=cp[hit],
                                               minlength=c).astype(np.int64)

    # ---------------------------------------------------------------- derived values

    def mean_confidence(self) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self.rows > 0, self.conf_sum / np.maximum(self.rows, 1), np.nan)

    def median_confidence(self) -> np.ndarray:
        return median_from_histogram(self.conf_hist)

    def precision(self) -> dict[str, np.ndarray]:
        """Per-class precisions (NaN without truth rows); see the module docstring."""
        def ratio(num: np.ndarray, den: np.ndarray, available: bool) -> np.ndarray:
            if not available:
                return np.full(self.num_classes, np.nan)
            with np.errstate(divide="ignore", invalid="ignore"):
                return np.where(den > 0, num / np.maximum(den, 1), np.nan)

        with_copies = self.has_truth and self.has_copies
        return {
            "precision": ratio(self.correct, self.truth_rows, self.has_truth),
            "precision_kept": ratio(self.correct_kept, self.truth_kept, with_copies),
            "precision_copies": ratio(self.correct_copies, self.truth_copies, with_copies),
        }

    def overall_precision(self) -> dict[str, float]:
        """Micro-averaged precisions over all classes."""
        def ratio(num: np.ndarray, den: np.ndarray, available: bool) -> float:
            d = int(den.sum())
            return float(num.sum() / d) if available and d > 0 else math.nan

        with_copies = self.has_truth and self.has_copies
        return {
            "precision": ratio(self.correct, self.truth_rows, self.has_truth),
            "precision_kept": ratio(self.correct_kept, self.truth_kept, with_copies),
            "precision_copies": ratio(self.correct_copies, self.truth_copies, with_copies),
            "truth_coverage": (float(self.truth_rows.sum() / self.rows.sum())
                               if self.has_truth and self.rows.sum() else math.nan),
        }


class _TruthIndex:
    """Held-out labels of the unlabeled split for the keys whose hash falls in one partition.

    Sorted uint64 key hashes + int32 labels: 12 bytes a row, whatever the key length.
    """

    def __init__(self, hashes: np.ndarray, labels: np.ndarray, duplicates: int) -> None:
        self.hashes, self.labels, self.duplicates = hashes, labels, duplicates

    @classmethod
    def load(cls, path: Path, part: int, parts: int, batch_rows: int = BATCH_ROWS) -> _TruthIndex:
        hs, ls = [], []
        for batch in iter_batches(path, ["key", "label"], batch_rows):
            keys = batch["key"]
            labels = batch["label"]
            ok = (labels >= 0) & pd.notna(keys)
            h = _key_hash(keys[ok])
            mine = (h % np.uint64(parts)) == np.uint64(part)
            hs.append(h[mine])
            ls.append(labels[ok][mine].astype(np.int32))
        h = np.concatenate(hs) if hs else np.zeros(0, dtype=np.uint64)
        lab = np.concatenate(ls) if ls else np.zeros(0, dtype=np.int32)
        order = np.argsort(h, kind="stable")
        h, lab = h[order], lab[order]
        dup = np.zeros(len(h), dtype=bool)  # (np.r_[False, ...] is one too long when h is empty)
        dup[1:] = h[1:] == h[:-1]
        # A key listed twice (or a 64-bit hash collision) keeps its first label.
        return cls(h[~dup], lab[~dup], int(dup.sum()))

    def lookup(self, hashes: np.ndarray) -> np.ndarray:
        """Truth label per hash, -1 where the key has none."""
        if self.hashes.size == 0:
            return np.full(hashes.shape, -1, dtype=np.int64)
        # Searching in sorted order walks the big array forwards (cache-friendly): ~3x faster
        # than random-order probes into a table of millions.
        order = np.argsort(hashes, kind="stable")
        i = np.empty(hashes.shape, dtype=np.int64)
        i[order] = np.searchsorted(self.hashes, hashes[order])
        i = np.minimum(i, self.hashes.size - 1)
        return np.where(self.hashes[i] == hashes, self.labels[i].astype(np.int64), -1)


def scan_pseudo_labels(
    files: Sequence[str | Path],
    num_classes: int,
    *,
    threshold: float | None = None,
    use_copies: bool = True,
    truth: str | Path | None = None,
    truth_rows_per_pass: int = TRUTH_ROWS_PER_PASS,
    batch_rows: int = BATCH_ROWS,
) -> PseudoLabelStats:
    """Accumulate :class:`PseudoLabelStats` over pseudo-label Parquet files, batch by batch.

    ``use_copies=False`` ignores a copies column (the select stage has not finished, so its values
    are not final). ``truth`` is a Parquet of (key, label) for precision.
    """
    stats = PseudoLabelStats(num_classes=num_classes, threshold=threshold)
    parts = 1
    if truth is not None:
        rows = parquet_file(truth).metadata.num_rows
        parts = max(1, math.ceil(rows / max(1, truth_rows_per_pass)))
    index = _TruthIndex.load(truth, 0, parts, batch_rows) if truth is not None else None
    # Pass 1 builds every statistic and the precision of truth partition 0; each further partition
    # rereads only the columns precision needs.
    for part in range(parts):
        if part > 0:
            index = _TruthIndex.load(truth, part, parts, batch_rows)  # type: ignore[arg-type]
        for path in files:
            have = set(schema_names(path))
            wanted = ["label", "confidence"]
            if part == 0 and "entropy" in have:
                wanted.append("entropy")
            if use_copies and "copies" in have:
                wanted.append("copies")
            if index is not None:
                wanted.append("key")
            missing = {"label", "confidence"} - have
            if missing:
                raise ReportError(f"{path}: pseudo-label file lacks column(s) "
                                  f"{', '.join(sorted(missing))}; it was not written by this tool")
            for b in iter_batches(path, wanted, batch_rows):
                if part == 0:
                    ok = stats.valid_rows(b["label"], b["confidence"])
                else:
                    ok = ((b["label"] >= 0) & (b["label"] < num_classes)
                          & np.isfinite(b["confidence"]))
                label = b["label"][ok]
                copies = b["copies"][ok] if "copies" in b else None
                if part == 0:
                    stats.add(label, b["confidence"][ok],
                              b["entropy"][ok] if "entropy" in b else None, copies)
                if index is not None:
                    h = _key_hash(b["key"][ok])
                    mine = (h % np.uint64(parts)) == np.uint64(part)
                    t = index.lookup(h[mine])
                    has = t >= 0
                    stats.add_truth(label[mine][has], t[has],
                                    copies[mine][has] if copies is not None else None)
        if index is not None:
            stats.has_truth = True
    return stats


# ============================================================================ calibration


def calibration_from_file(
    path: str | Path, bins: int = ECE_BINS, batch_rows: int = BATCH_ROWS
) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], int]:
    """Accumulated :func:`calibration_bins` sums of a test_predictions.parquet, and rows skipped."""
    count = np.zeros(bins, dtype=np.int64)
    conf_sum = np.zeros(bins)
    correct_sum = np.zeros(bins)
    skipped = 0
    have = set(schema_names(path))
    if not {"label", "pred", "confidence"} <= have:
        raise ReportError(f"{path}: test predictions need columns label, pred, confidence; "
                          f"found {', '.join(sorted(have))}")
    for b in iter_batches(path, ["label", "pred", "confidence"], batch_rows):
        ok = np.isfinite(b["confidence"]) & (b["label"] >= 0) & (b["pred"] >= 0)
        skipped += int((~ok).sum())
        n, s, c = calibration_bins(b["confidence"][ok], b["label"][ok] == b["pred"][ok], bins)
        count += n
        conf_sum += s
        correct_sum += c
    return (count, conf_sum, correct_sum), skipped

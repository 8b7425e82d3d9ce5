"""Reports of a run: pandas tables and matplotlib plots from the manifests and pseudo-label files.

``load_run(root, run)`` returns a :class:`RunReport` (tables only, nothing written) for a notebook;
``write_report(report)`` writes ``reports/<run>/``: one CSV per table, PNG plots and ``report.md``
(or ``report.html``). ``jobs/report.py`` is the command line.

Scale. The pseudo-label corpus may hold hundreds of millions of rows, so nothing here holds every
row: each Parquet file is read in record batches of only the columns needed, and every statistic is a
sum that batches add to (counts per class, histograms with fixed bins, a class x class flip matrix).
The exceptions are bounded by design: the agreement between two rounds joins one shard's file of each
round at a time (one shard's keys in memory), and the held-out truth of the unlabeled split, when the
dataset has one, is held as a sorted array of 64-bit key hashes plus labels (12 bytes a row), in
hash partitions of at most ``truth_rows_per_pass`` rows, each partition costing one more read of the
key and label columns.

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
* flips between rounds N and N+1 (both pseudo-labeled, by the teachers of rounds N-1 and N): rows of
  the same shard file joined by key; a flip is a key whose label differs. The flip matrix counts
  (label in round N, label in round N+1) pairs;
* expected calibration error (Guo et al., 2017): 15 equal-width bins (lo, hi] on confidence (0 goes to
  the first bin); ECE = sum over bins of (rows in bin / rows) * |accuracy in bin - mean confidence in
  bin|.
"""

from __future__ import annotations

import datetime as _dt
import html
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.manifest import (
    ManifestError,
    artifact_dir,
    list_rounds,
    load_manifest,
    manifest_dir,
    report_dir,
    stage_complete,
)

__all__ = [
    "CONFIDENCE_BINS",
    "ECE_BINS",
    "PLOT_BINS",
    "PseudoLabelStats",
    "ReportError",
    "RunReport",
    "calibration_bins",
    "compare_files",
    "expected_calibration_error",
    "load_run",
    "median_from_histogram",
    "scan_pseudo_labels",
    "FlipStats",
    "calibration_from_file",
    "has_pseudo_labels",
    "plot_class_distribution",
    "plot_confidence",
    "plot_flip_matrix",
    "plot_reliability",
    "plot_top1",
    "summary_lines",
    "write_report",
]

CONFIDENCE_BINS = 1000  # fine bins on [0, 1]: the median's resolution
PLOT_BINS = 50  # coarse bins of the plotted histograms; divides CONFIDENCE_BINS
ECE_BINS = 15
BATCH_ROWS = 65_536
TRUTH_ROWS_PER_PASS = 50_000_000  # 600 MB of hashes + labels
STAGE_ORDER = ("pseudo_label", "select", "train", "finetune", "evaluate")
TEST_PREDICTIONS = "test_predictions.parquet"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_MAX_MD_ROWS = 30  # longer tables are excerpted in the report and given whole in their CSV
_HEATMAP_MAX_CLASSES = 50  # a flip-matrix image is unreadable beyond this


class ReportError(ValueError):
    """The run, round or a file cannot be reported on; the message names it and what to do."""


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


def _coarsen(fine: np.ndarray, bins: int = PLOT_BINS) -> np.ndarray:
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
        for batch in _iter_batches(path, ["key", "label"], batch_rows):
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
        dup = np.r_[False, h[1:] == h[:-1]]
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
        rows = pq.ParquetFile(truth).metadata.num_rows
        parts = max(1, math.ceil(rows / max(1, truth_rows_per_pass)))
    index = _TruthIndex.load(Path(truth), 0, parts, batch_rows) if truth is not None else None
    # Pass 1 builds every statistic and the precision of truth partition 0; each further partition
    # rereads only the columns precision needs.
    for part in range(parts):
        if part > 0:
            index = _TruthIndex.load(Path(truth), part, parts, batch_rows)  # type: ignore[arg-type]
        for path in files:
            have = set(_schema_names(path))
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
            for b in _iter_batches(path, wanted, batch_rows):
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


# ============================================================================ flips between rounds


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
    have = set(_schema_names(path))
    cols = ["key", "label"] + (["copies"] if use_copies and "copies" in have else [])
    if not {"key", "label"} <= have:
        raise ReportError(f"{path}: pseudo-label file lacks the key or label column")
    parts = [pd.DataFrame(b) for b in _iter_batches(path, cols, batch_rows)]
    df = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(
        {c: pd.Series(dtype=object if c == "key" else np.int64) for c in cols})
    ok = df["key"].notna() & (df["label"] >= 0) & (df["label"] < num_classes)
    return df[ok]


# ============================================================================ calibration


def calibration_from_file(
    path: str | Path, bins: int = ECE_BINS, batch_rows: int = BATCH_ROWS
) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], int]:
    """Accumulated :func:`calibration_bins` sums of a test_predictions.parquet, and rows skipped."""
    count = np.zeros(bins, dtype=np.int64)
    conf_sum = np.zeros(bins)
    correct_sum = np.zeros(bins)
    skipped = 0
    have = set(_schema_names(path))
    if not {"label", "pred", "confidence"} <= have:
        raise ReportError(f"{path}: test predictions need columns label, pred, confidence; "
                          f"found {', '.join(sorted(have))}")
    for b in _iter_batches(path, ["label", "pred", "confidence"], batch_rows):
        ok = np.isfinite(b["confidence"]) & (b["label"] >= 0) & (b["pred"] >= 0)
        skipped += int((~ok).sum())
        n, s, c = calibration_bins(b["confidence"][ok], b["label"][ok] == b["pred"][ok], bins)
        count += n
        conf_sum += s
        correct_sum += c
    return (count, conf_sum, correct_sum), skipped


# ============================================================================ reading Parquet


def _schema_names(path: str | Path) -> list[str]:
    try:
        return pq.ParquetFile(path).schema_arrow.names
    except (OSError, pa.ArrowException) as e:
        raise ReportError(f"{path}: cannot read Parquet ({_first_line(e)})") from None


def _iter_batches(path: str | Path, columns: list[str],
                  batch_rows: int = BATCH_ROWS) -> Iterator[dict[str, np.ndarray]]:
    """Batches of ``columns`` as numpy arrays; nulls become -1 (integers) or NaN (floats)."""
    try:
        pf = pq.ParquetFile(path)
        for batch in pf.iter_batches(batch_size=batch_rows, columns=columns):
            out = {}
            for name in columns:
                col = batch.column(name)
                if pa.types.is_integer(col.type):
                    col = col.fill_null(-1) if col.null_count else col
                    out[name] = col.to_numpy()
                elif pa.types.is_floating(col.type):
                    # float16 columns convert through float32: numpy has no arrow half-float path.
                    col = col.cast(pa.float32()) if pa.types.is_float16(col.type) else col
                    out[name] = col.to_numpy(zero_copy_only=False).astype(np.float64)
                else:
                    out[name] = col.to_numpy(zero_copy_only=False)
            yield out
    except (OSError, pa.ArrowException) as e:
        raise ReportError(f"{path}: cannot read Parquet ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ============================================================================ the run


@dataclass
class RunReport:
    """Every table of a run's report; ``tables()`` names them as their CSV files are named.

    * ``rounds``: one row per round (model, metrics, pseudo-label counts, precision, flip rate vs
      the previous round's pseudo-labels, ECE, ``seconds_<stage>`` per stage);
    * ``per_class``: one row per (round, class) for rounds with pseudo-labels;
    * ``histograms``: (round, metric, lower, upper, count) with metric confidence, confidence_kept,
      entropy;
    * ``flips``: one row per pair of consecutive pseudo-labeled rounds; ``flip_matrix`` its
      non-zero cells; ``class_changes`` per class: kept counts and flips between the two rounds;
    * ``calibration``: one row per round with test predictions; ``reliability`` its 15 bins.
    """

    run: str
    root: Path
    classes: list[str]
    rounds: pd.DataFrame
    per_class: pd.DataFrame
    histograms: pd.DataFrame
    flips: pd.DataFrame
    flip_matrix: pd.DataFrame
    class_changes: pd.DataFrame
    calibration: pd.DataFrame
    reliability: pd.DataFrame
    round_filter: int | None = None
    notes: list[str] = field(default_factory=list)

    def tables(self) -> dict[str, pd.DataFrame]:
        return {
            "rounds": self.rounds, "per_class": self.per_class, "histograms": self.histograms,
            "flips": self.flips, "flip_matrix": self.flip_matrix,
            "class_changes": self.class_changes, "calibration": self.calibration,
            "reliability": self.reliability,
        }

    def pseudo_label_rounds(self) -> list[int]:
        return sorted(int(r) for r in self.per_class["round"].unique())


def has_pseudo_labels(m: dict[str, Any]) -> bool:
    """A round whose pseudo-label stage finished and recorded where its files are."""
    return m["round"] >= 1 and stage_complete(m, "pseudo_label") and bool(_pseudo_label_uri(m))


def _pseudo_label_uri(m: dict[str, Any]) -> str | None:
    # ``pseudo_labels`` is filled in by the select stage; until then the pseudo_label stage's
    # entry is where the folder is recorded.
    pl = m.get("pseudo_labels") or {}
    return pl.get("uri") or (m.get("stages", {}).get("pseudo_label") or {}).get("uri")


def _no_pseudo_labels_reason(m: dict[str, Any]) -> str:
    if m["round"] == 0:
        return "round 0 is the teacher, trained on labeled data only; it has no pseudo-labels"
    status = m.get("stages", {}).get("pseudo_label", {}).get("status", "not started")
    if status != "complete":
        return (f"its pseudo_label stage is {status}; finish it with "
                f"`python jobs/student.py --run {m['run']} --round {m['round']}`")
    return "its manifest records no pseudo_labels.uri (nor stages.pseudo_label.uri)"


def load_run(root: str | Path, run: str, round_: int | None = None, *,
             truth_rows_per_pass: int = TRUTH_ROWS_PER_PASS) -> RunReport:
    """The report tables of ``run`` under ``root`` (reads manifests and Parquet; writes nothing).

    ``round_`` limits the per-round pseudo-label tables to that round (and the agreement to the pair
    ending at it); the run-level and calibration tables always cover every round.
    """
    root = Path(root)
    manifests = _load_manifests(root, run)
    notes: list[str] = []
    if round_ is not None:
        if round_ not in manifests:
            raise ReportError(f"run {run!r} has no round {round_} (rounds: "
                              f"{', '.join(map(str, manifests))})")
        if not has_pseudo_labels(manifests[round_]):
            raise ReportError(f"round {round_} of run {run!r} has no pseudo-labels: "
                              f"{_no_pseudo_labels_reason(manifests[round_])}")
    labeled = [r for r, m in manifests.items() if has_pseudo_labels(m)]
    scan_rounds = [round_] if round_ is not None else labeled
    dataset, problem = _load_dataset(root, manifests)
    if dataset is None and scan_rounds:
        # Per-class tables need the class list; guessing it from labels seen would be silent.
        raise ReportError(f"cannot report on the pseudo-labels of run {run!r}: {problem}; "
                          "restore it or run from the folder the jobs ran in")
    classes = list(dataset.classes) if dataset is not None else []
    truth = _truth_path(dataset, notes) if scan_rounds else None
    files = {r: _pseudo_label_files(root, manifests[r], notes) for r in labeled
             if r in scan_rounds or r + 1 in scan_rounds}
    stats = {}
    for r in scan_rounds:
        m = manifests[r]
        stats[r] = scan_pseudo_labels(
            [p for p in files[r].values()], len(classes), threshold=_threshold(m),
            use_copies=stage_complete(m, "select"), truth=truth,
            truth_rows_per_pass=truth_rows_per_pass)
        if stats[r].invalid_rows:
            notes.append(f"round {r}: {stats[r].invalid_rows} pseudo-label rows skipped (null or "
                         f"NaN confidence, or a label outside the {len(classes)} classes)")
        if not stage_complete(m, "select"):
            notes.append(f"round {r}: select stage not complete; kept and copies are not shown")
        if truth is not None and stats[r].rows.sum() and not stats[r].truth_rows.sum():
            notes.append(f"round {r}: no pseudo-label key is in the held-out truth {truth}; do "
                         "the keys of the unlabeled shards match the truth file's?")

    pairs = [(r - 1, r) for r in scan_rounds if r - 1 in labeled]
    flips = {pair: _compare_rounds(files[pair[0]], files[pair[1]], len(classes), pair, notes,
                                   tuple(stage_complete(manifests[r], "select") for r in pair))
             for pair in pairs}
    calib = _calibration(root, run, manifests, notes)

    per_class = _per_class_table(manifests, stats, classes)
    return RunReport(
        run=run, root=root, classes=classes,
        rounds=_rounds_table(manifests, stats, flips, calib[0]),
        per_class=per_class,
        histograms=_histogram_table(stats),
        flips=_flips_table(flips),
        flip_matrix=_flip_matrix_table(flips, classes),
        class_changes=_class_changes_table(flips, per_class, classes),
        calibration=calib[0], reliability=calib[1],
        round_filter=round_, notes=list(dict.fromkeys(notes)),
    )


def _load_manifests(root: Path, run: str) -> dict[int, dict[str, Any]]:
    rounds = list_rounds(root, run)
    if not rounds:
        where = manifest_dir(root, run)
        runs = sorted(p.name for p in where.parent.glob("*") if p.is_dir())
        known = f"runs there: {', '.join(runs)}" if runs else "no runs there"
        raise ReportError(f"no run {run!r}: {where} has no round-<N>.json ({known}); "
                          "check --run and --root")
    try:
        return {r: load_manifest(root, run, r) for r in rounds}
    except ManifestError as e:
        raise ReportError(str(e)) from None


def _load_dataset(root: Path, manifests: dict[int, dict[str, Any]]) -> tuple[Any, str | None]:
    """The run's DatasetInfo, or None and why not."""
    from pipeline.dataset import DatasetError, load_dataset

    path = next((m.get("data", {}).get("dataset") for m in reversed(manifests.values())
                 if m.get("data", {}).get("dataset")), None)
    if not path:
        return None, "its manifests record no data.dataset"
    # Relative paths were written relative to the root the jobs ran from; the current folder is
    # the usual root, so it is the second guess.
    p = Path(path)
    for candidate in [p] if p.is_absolute() else [root / p, p]:
        if (candidate / "dataset.json").exists() or (candidate.name == "dataset.json"
                                                     and candidate.exists()):
            try:
                return load_dataset(candidate), None
            except DatasetError as e:
                return None, str(e)
    where = str(p) if p.is_absolute() else f"under {root} or the current folder"
    return None, f"its dataset {path} (manifest data.dataset) is not found {where}"


def _truth_path(dataset: Any, notes: list[str]) -> Path | None:
    if dataset is None or dataset.unlabeled_truth is None:
        notes.append("the dataset has no held-out truth for the unlabeled split: no precision")
        return None
    if not Path(dataset.unlabeled_truth).exists():
        notes.append(f"held-out truth {dataset.unlabeled_truth} is missing: no precision")
        return None
    return Path(dataset.unlabeled_truth)


def _selection_setting(m: dict[str, Any], name: str) -> Any:
    """A selection setting as recorded: pseudo_labels first, then the select stage, then config."""
    for source in (m.get("pseudo_labels") or {}, m.get("stages", {}).get("select", {}),
                   m.get("config", {})):
        if source.get(name) is not None:
            return source[name]
    return None


def _threshold(m: dict[str, Any]) -> float | None:
    value = _selection_setting(m, "threshold")
    return None if value is None else float(value)


def _k(m: dict[str, Any]) -> int | None:
    value = _selection_setting(m, "k")
    return None if value is None else int(value)


def _pseudo_label_files(root: Path, m: dict[str, Any], notes: list[str]) -> dict[str, str]:
    """File name -> path (local path or URI) of a round's pseudo-label files that exist."""
    pl = m.get("pseudo_labels") or {}
    uri = str(_pseudo_label_uri(m))
    remote = "://" in uri
    base = uri.rstrip("/") if remote else str(Path(uri) if Path(uri).is_absolute()
                                              else root / uri)
    listed = pl.get("files") or []
    if not listed:
        if remote:
            raise ReportError(f"round {m['round']}: pseudo_labels.files is empty and {uri} is "
                              "remote; record the files in the manifest")
        # Hidden names are temporary files of a writer (write, then rename).
        names = sorted(p.name for p in Path(base).glob("*.parquet") if not p.name.startswith("."))
        listed = [{"name": n} for n in names]
        if not names:
            notes.append(f"round {m['round']}: no pseudo-label files under {base}")
    out, missing, mismatched = {}, [], []
    for f in listed:
        path = f"{base}/{f['name']}"
        if not remote and not Path(path).exists():
            missing.append(f["name"])
            continue
        if f.get("rows") is not None:
            rows = _num_rows(path)
            if rows != f["rows"]:
                mismatched.append(f"{f['name']} ({rows} rows, manifest says {f['rows']})")
        out[f["name"]] = path
    if missing:
        notes.append(f"round {m['round']}: {len(missing)} of {len(listed)} pseudo-label files "
                     f"missing under {base} (first: {missing[0]}); statistics leave them out")
    if mismatched:
        notes.append(f"round {m['round']}: {len(mismatched)} pseudo-label file(s) differ from the "
                     f"manifest's row counts (first: {mismatched[0]})")
    return out


def _num_rows(path: str) -> int:
    try:
        return pq.ParquetFile(path).metadata.num_rows
    except (OSError, pa.ArrowException) as e:
        raise ReportError(f"{path}: cannot read Parquet ({_first_line(e)})") from None


def _compare_rounds(files_a: dict[str, str], files_b: dict[str, str], num_classes: int,
                    pair: tuple[int, int], notes: list[str],
                    use_copies: tuple[bool, bool]) -> FlipStats:
    stats = FlipStats(matrix=np.zeros((num_classes, num_classes), dtype=np.int64))
    names = sorted(set(files_a) | set(files_b))
    unpaired = [n for n in names if (n in files_a) != (n in files_b)]
    if unpaired:
        notes.append(f"rounds {pair[0]}-{pair[1]}: {len(unpaired)} pseudo-label file(s) in only "
                     f"one round (first: {unpaired[0]}); their keys count as unmatched")
    for name in names:
        compare_files(files_a.get(name), files_b.get(name), num_classes, stats,
                      use_copies=use_copies)
    if stats.duplicate_keys:
        notes.append(f"rounds {pair[0]}-{pair[1]}: {stats.duplicate_keys} repeated keys inside "
                     "a file; the first row of each was compared")
    return stats


def _calibration(root: Path, run: str, manifests: dict[int, dict[str, Any]],
                 notes: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    rows, bins = [], []
    edges = np.linspace(0.0, 1.0, ECE_BINS + 1)
    for r in manifests:
        path = artifact_dir(root, run, r) / TEST_PREDICTIONS
        if not path.exists():
            if stage_complete(manifests[r], "evaluate"):
                notes.append(f"round {r}: evaluate is complete but {path} is missing: "
                             "no calibration")
            continue
        (count, conf_sum, correct_sum), skipped = calibration_from_file(path)
        if skipped:
            notes.append(f"round {r}: {skipped} test predictions skipped (NaN confidence or "
                         "negative label)")
        n = int(count.sum())
        rows.append({
            "round": r, "teaches_round": r + 1, "rows": n,
            "top1": float(correct_sum.sum() / n) if n else math.nan,
            "mean_confidence": float(conf_sum.sum() / n) if n else math.nan,
            "ece": expected_calibration_error(sums=(count, conf_sum, correct_sum)),
        })
        with np.errstate(divide="ignore", invalid="ignore"):
            bins.append(pd.DataFrame({
                "round": r, "bin": np.arange(ECE_BINS), "lower": edges[:-1], "upper": edges[1:],
                "count": count,
                "mean_confidence": np.where(count > 0, conf_sum / np.maximum(count, 1), np.nan),
                "accuracy": np.where(count > 0, correct_sum / np.maximum(count, 1), np.nan),
            }))
    calib = pd.DataFrame(rows, columns=["round", "teaches_round", "rows", "top1",
                                        "mean_confidence", "ece"])
    rel = (pd.concat(bins, ignore_index=True) if bins else pd.DataFrame(
        columns=["round", "bin", "lower", "upper", "count", "mean_confidence", "accuracy"]))
    return calib, rel


# ============================================================================ tables


def _rounds_table(manifests: dict[int, dict[str, Any]], stats: dict[int, PseudoLabelStats],
                  flips: dict[tuple[int, int], FlipStats], calib: pd.DataFrame) -> pd.DataFrame:
    top1 = {r: (m.get("metrics") or {}).get("top1") for r, m in manifests.items()}
    stages = sorted({s for m in manifests.values() for s in m.get("stages", {})},
                    key=lambda s: (STAGE_ORDER.index(s) if s in STAGE_ORDER else len(STAGE_ORDER),
                                   s))
    ece = dict(zip(calib["round"], calib["ece"], strict=True))
    flip_rate = {b: (f.flipped / f.common if f.common else math.nan)
                 for (_, b), f in flips.items()}
    rows = []
    for r, m in manifests.items():
        model = m.get("model") or {}
        metrics = m.get("metrics") or {}
        pl = m.get("pseudo_labels") or {}
        teacher_round = (m.get("teacher") or {}).get("round", r - 1) if r >= 1 else None
        teacher_top1 = metrics.get("teacher_top1")
        if teacher_top1 is None and teacher_round is not None:
            teacher_top1 = top1.get(teacher_round)  # older manifests: read it from the teacher
        row: dict[str, Any] = {
            "round": r, "role": m.get("role"), "status": m.get("status"),
            "model": model.get("name"), "params": model.get("params"),
            "train_resolution": model.get("train_resolution"),
            "test_resolution": model.get("test_resolution"),
            "top1": metrics.get("top1"), "top5": metrics.get("top5"), "loss": metrics.get("loss"),
            "teacher_top1": teacher_top1,
            "gain": (metrics["top1"] - teacher_top1
                     if metrics.get("top1") is not None and teacher_top1 is not None else None),
            "pseudo_labels": pl.get("rows"), "kept": pl.get("kept"),
            "with_copies": pl.get("selected_with_copies"),
            "threshold": _threshold(m) if r >= 1 else None, "k": _k(m) if r >= 1 else None,
            "bad_samples": (m.get("stages", {}).get("pseudo_label", {})
                            .get("bad_samples", {}) or {}).get("count"),
            "precision": None, "precision_kept": None, "precision_copies": None,
            "truth_coverage": None,
        }
        s = stats.get(r)
        if s is not None:
            # Counted in the files, which are what the student read; the manifest may hold
            # expected values (selection's plan) or be missing them.
            row["pseudo_labels"] = int(s.rows.sum()) + s.invalid_rows
            if s.has_copies:
                row["kept"] = int(s.kept.sum())
                row["with_copies"] = int(s.copies.sum())
            row.update(s.overall_precision())
        row["flip_rate"] = flip_rate.get(r)
        row["ece"] = ece.get(r)
        seconds = [(m.get("stages", {}).get(st) or {}).get("seconds") for st in stages]
        for st, sec in zip(stages, seconds, strict=True):
            row[f"seconds_{st}"] = sec
        row["seconds_total"] = sum(x for x in seconds if x is not None) if stages else None
        rows.append(row)
    df = pd.DataFrame(rows)
    # None -> NaN so that numeric columns stay numeric in CSVs and plots.
    df = df.infer_objects().fillna(value=np.nan) if len(df) else df
    return _counts_as_int(df, ["params", "train_resolution", "test_resolution", "pseudo_labels",
                               "kept", "with_copies", "k", "bad_samples"])


def _counts_as_int(df: pd.DataFrame, cols: list[str]) -> pd.DataFrame:
    """Counts as nullable integers: a round without a value must not turn 1,234 into 1234.0."""
    for c in cols:
        if c in df:
            df[c] = pd.to_numeric(df[c], errors="coerce").round().astype("Int64")
    return df


def _per_class_table(manifests: dict[int, dict[str, Any]], stats: dict[int, PseudoLabelStats],
                     classes: list[str]) -> pd.DataFrame:
    cols = ["round", "class_index", "class", "pseudo_labeled", "above_threshold", "kept",
            "copies", "manifest_kept", "manifest_copies", "mean_confidence",
            "median_confidence", "truth_rows", "precision", "precision_kept", "precision_copies"]
    frames = []
    for r, s in stats.items():
        mk, mc = _manifest_per_class(manifests[r], classes)
        nan = np.full(len(classes), np.nan)
        frames.append(pd.DataFrame({
            "round": r, "class_index": np.arange(len(classes)), "class": classes,
            "pseudo_labeled": s.rows, "above_threshold": s.above if s.threshold is not None else nan,
            "kept": s.kept if s.has_copies else nan, "copies": s.copies if s.has_copies else nan,
            "manifest_kept": mk, "manifest_copies": mc,
            "mean_confidence": s.mean_confidence(), "median_confidence": s.median_confidence(),
            "truth_rows": s.truth_rows if s.has_truth else nan, **s.precision(),
        }))
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=cols)
    return _counts_as_int(df, ["pseudo_labeled", "above_threshold", "kept", "copies",
                               "manifest_kept", "manifest_copies", "truth_rows"])


def _manifest_per_class(m: dict[str, Any], classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The manifest's per_class kept/copies as (C,) arrays, NaN where absent.

    Keys are class names per DESIGN.md; pipeline.select writes class indices (str(c)). Names are
    matched first, so a dataset whose names are other numbers is not misread.
    """
    kept = np.full(len(classes), np.nan)
    copies = np.full(len(classes), np.nan)
    index = {c: i for i, c in enumerate(classes)}
    for key, v in ((m.get("pseudo_labels") or {}).get("per_class") or {}).items():
        i = index.get(str(key))
        if i is None and str(key).isdigit() and int(key) < len(classes):
            i = int(key)
        if i is not None and isinstance(v, dict):
            kept[i] = v.get("kept", np.nan)
            copies[i] = v.get("copies", np.nan)
    return kept, copies


def _histogram_table(stats: dict[int, PseudoLabelStats]) -> pd.DataFrame:
    frames = []
    conf_edges = np.linspace(0.0, 1.0, PLOT_BINS + 1)
    for r, s in stats.items():
        series = [("confidence", conf_edges, _coarsen(s.conf_hist.sum(axis=0)))]
        if s.has_copies:
            series.append(("confidence_kept", conf_edges, _coarsen(s.kept_conf_hist)))
        series.append(("entropy", np.linspace(0.0, s.entropy_max, PLOT_BINS + 1), s.entropy_hist))
        for metric, edges, counts in series:
            frames.append(pd.DataFrame({"round": r, "metric": metric, "lower": edges[:-1],
                                        "upper": edges[1:], "count": counts}))
    return (pd.concat(frames, ignore_index=True) if frames
            else pd.DataFrame(columns=["round", "metric", "lower", "upper", "count"]))


def _flips_table(flips: dict[tuple[int, int], FlipStats]) -> pd.DataFrame:
    rows = []
    for (a, b), f in flips.items():
        rows.append({
            "round_a": a, "round_b": b, "teacher_a": a - 1, "teacher_b": b - 1,
            "common": f.common, "flipped": f.flipped,
            "flip_rate": f.flipped / f.common if f.common else math.nan,
            "only_a": f.only_a, "only_b": f.only_b,
            "kept_both": f.kept_both if f.has_copies else math.nan,
            "kept_both_flipped": f.kept_both_flipped if f.has_copies else math.nan,
            "flip_rate_kept": (f.kept_both_flipped / f.kept_both
                               if f.has_copies and f.kept_both else math.nan),
        })
    cols = ["round_a", "round_b", "teacher_a", "teacher_b", "common", "flipped", "flip_rate",
            "only_a", "only_b", "kept_both", "kept_both_flipped", "flip_rate_kept"]
    return pd.DataFrame(rows, columns=cols)


def _flip_matrix_table(flips: dict[tuple[int, int], FlipStats],
                       classes: list[str]) -> pd.DataFrame:
    frames = []
    for (a, b), f in flips.items():
        i, j = np.nonzero(f.matrix)  # sparse: 1000 classes would make a million mostly-zero rows
        frames.append(pd.DataFrame({
            "round_a": a, "round_b": b, "class_a_index": i, "class_a": [classes[x] for x in i],
            "class_b_index": j, "class_b": [classes[x] for x in j], "count": f.matrix[i, j]}))
    cols = ["round_a", "round_b", "class_a_index", "class_a", "class_b_index", "class_b", "count"]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=cols)


def _class_changes_table(flips: dict[tuple[int, int], FlipStats], per_class: pd.DataFrame,
                         classes: list[str]) -> pd.DataFrame:
    frames = []
    for (a, b), f in flips.items():
        def col(r: int, name: str) -> np.ndarray:
            sel = per_class[per_class["round"] == r].sort_values("class_index")
            return (sel[name].to_numpy(dtype=np.float64, na_value=np.nan) if len(sel)
                    else np.full(len(classes), np.nan))

        common_a = f.matrix.sum(axis=1)
        diag = np.diag(f.matrix)
        with np.errstate(divide="ignore", invalid="ignore"):
            out_rate = np.where(common_a > 0, (common_a - diag) / np.maximum(common_a, 1), np.nan)
        frames.append(pd.DataFrame({
            "round_a": a, "round_b": b, "class_index": np.arange(len(classes)), "class": classes,
            "kept_a": col(a, "kept"), "kept_b": col(b, "kept"),
            "kept_change": col(b, "kept") - col(a, "kept"),
            "copies_a": col(a, "copies"), "copies_b": col(b, "copies"),
            "common_a": common_a, "flipped_out": common_a - diag,
            "flipped_in": f.matrix.sum(axis=0) - diag, "flip_out_rate": out_rate,
        }))
    cols = ["round_a", "round_b", "class_index", "class", "kept_a", "kept_b", "kept_change",
            "copies_a", "copies_b", "common_a", "flipped_out", "flipped_in", "flip_out_rate"]
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=cols)
    return _counts_as_int(df, ["kept_a", "kept_b", "kept_change", "copies_a", "copies_b"])


# ============================================================================ plots


def _figure(width: float = 7.0, height: float = 4.0):
    # Figure + Agg canvas directly, not pyplot: no global backend switch, so importing this
    # module in a notebook leaves its inline backend alone, and no figure is left open.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def plot_top1(report: RunReport, path: Path) -> Path:
    df = report.rounds
    fig = _figure()
    ax = fig.add_subplot()
    for col, style in (("top1", "o-"), ("top5", "s--"), ("precision", "^:")):
        if col in df and df[col].notna().any():
            label = {"precision": "pseudo-label precision"}.get(col, f"test {col.replace('top', 'top-')}")
            ax.plot(df["round"], df[col] * 100, style, label=label)
    ax.set_xlabel("round (0 = teacher)")
    ax.set_ylabel("%")
    ax.set_xticks(df["round"].tolist())
    ax.set_title(f"{report.run}: accuracy by round")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.savefig(path)
    return path


def plot_confidence(report: RunReport, round_: int, path: Path) -> Path:
    h = report.histograms[report.histograms["round"] == round_]
    fig = _figure(10, 4)
    ax_c, ax_e = fig.subplots(1, 2)
    for metric, label in (("confidence", "all pseudo-labels"), ("confidence_kept", "kept")):
        part = h[h["metric"] == metric]
        if len(part):
            ax_c.stairs(part["count"].to_numpy(), np.r_[part["lower"].to_numpy(),
                                                      part["upper"].iloc[-1]],
                        fill=metric == "confidence", alpha=0.5 if metric == "confidence" else 1,
                        label=label)
    threshold = report.rounds.set_index("round").get("threshold", pd.Series()).get(round_)
    if threshold is not None and not pd.isna(threshold):
        ax_c.axvline(threshold, color="k", ls="--", lw=1, label=f"threshold {threshold:g}")
    ax_c.set_xlabel("teacher confidence (max probability)")
    ax_c.set_ylabel("rows")
    ax_c.set_title(f"round {round_}: confidence")
    ax_c.legend()
    ent = h[h["metric"] == "entropy"]
    ax_e.stairs(ent["count"].to_numpy(), np.r_[ent["lower"].to_numpy(), ent["upper"].iloc[-1]],
                fill=True, alpha=0.6)
    ax_e.set_xlabel("entropy (nats; right edge ln C)")
    ax_e.set_ylabel("rows")
    ax_e.set_title(f"round {round_}: entropy")
    fig.savefig(path)
    return path


def plot_class_distribution(report: RunReport, round_: int, path: Path) -> Path:
    pc = report.per_class[report.per_class["round"] == round_].sort_values("class_index")
    series = [(c, lab) for c, lab in (("pseudo_labeled", "pseudo-labeled"),
                                      ("above_threshold", "above threshold"),
                                      ("kept", "kept (distinct rows)"),
                                      ("copies", "after balancing (with copies)"))
              if pc[c].notna().any()]
    few = len(pc) <= _HEATMAP_MAX_CLASSES
    fig = _figure(max(7.0, 0.35 * len(pc)) if few else 9.0, 4)
    ax = fig.add_subplot()
    if few:
        width = 0.8 / len(series)
        x = np.arange(len(pc))
        for i, (col, label) in enumerate(series):
            ax.bar(x + (i - (len(series) - 1) / 2) * width,
                   pc[col].to_numpy(dtype=np.float64, na_value=np.nan), width, label=label)
        ax.set_xticks(x, pc["class"].astype(str), rotation=90 if len(pc) > 15 else 0)
        ax.set_xlabel("class")
    else:
        # Too many classes for bars: each series sorted, so the shape of the imbalance shows.
        for col, label in series:
            ax.plot(np.sort(pc[col].to_numpy(dtype=np.float64, na_value=np.nan))[::-1],
                    label=label)
        ax.set_xlabel("class rank")
        ax.set_yscale("log")
    k = report.rounds.set_index("round").get("k", pd.Series()).get(round_)
    if k is not None and not pd.isna(k):
        ax.axhline(k, color="k", ls="--", lw=1, label=f"K = {int(k)}")
    ax.set_ylabel("rows")
    ax.set_title(f"round {round_}: classes before and after balancing")
    ax.legend(fontsize="small")
    fig.savefig(path)
    return path


def plot_reliability(report: RunReport, path: Path) -> Path:
    rel = report.reliability
    fig = _figure(6, 6)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="gray", ls="--", lw=1, label="perfect calibration")
    ece = dict(zip(report.calibration["round"], report.calibration["ece"], strict=True))
    for r, part in rel.groupby("round"):
        part = part[part["count"] > 0]
        ax.plot(part["mean_confidence"], part["accuracy"], "o-",
                label=f"round {r} (ECE {ece[r]:.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel(f"mean confidence in bin ({ECE_BINS} equal bins)")
    ax.set_ylabel("accuracy in bin")
    ax.set_title(f"{report.run}: reliability on the test split")
    ax.legend(loc="upper left")
    fig.savefig(path)
    return path


def plot_flip_matrix(report: RunReport, pair: tuple[int, int], path: Path) -> Path:
    c = len(report.classes)
    fm = report.flip_matrix
    fm = fm[(fm["round_a"] == pair[0]) & (fm["round_b"] == pair[1])]
    mat = np.zeros((c, c))
    mat[fm["class_a_index"].to_numpy(int), fm["class_b_index"].to_numpy(int)] = fm["count"]
    with np.errstate(divide="ignore", invalid="ignore"):
        share = mat / np.maximum(mat.sum(axis=1, keepdims=True), 1)
    fig = _figure(6, 5.2)
    ax = fig.add_subplot()
    im = ax.imshow(share, cmap="viridis", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, label=f"share of round {pair[0]}'s label")
    ax.set_xticks(range(c), report.classes, rotation=90 if c > 15 else 0)
    ax.set_yticks(range(c), report.classes)
    ax.set_xlabel(f"label in round {pair[1]} (teacher: round {pair[1] - 1})")
    ax.set_ylabel(f"label in round {pair[0]} (teacher: round {pair[0] - 1})")
    ax.set_title(f"pseudo-label flips, rounds {pair[0]} -> {pair[1]}")
    fig.savefig(path)
    return path


# ============================================================================ writing


def write_report(report: RunReport, out_dir: str | Path | None = None,
                 fmt: str = "md") -> Path:
    """Write CSVs, PNGs and report.md (or report.html) to ``out_dir`` (default reports/<run>/).

    Returns the report file. Every CSV is written, empty ones with their header, so that files of
    an earlier report never pass for current ones.
    """
    if fmt not in ("md", "html"):
        raise ReportError(f"format must be md or html, got {fmt!r}")
    out = Path(out_dir) if out_dir is not None else report_dir(report.root, report.run)
    out.mkdir(parents=True, exist_ok=True)
    for name, df in report.tables().items():
        df.to_csv(out / f"{name}.csv", index=False)

    plots: dict[str, Path] = {"top1": plot_top1(report, out / "top1_by_round.png")}
    for r in report.pseudo_label_rounds():
        plots[f"confidence-{r}"] = plot_confidence(report, r, out / f"confidence_round-{r}.png")
        plots[f"classes-{r}"] = plot_class_distribution(
            report, r, out / f"class_distribution_round-{r}.png")
    if len(report.reliability):
        plots["reliability"] = plot_reliability(report, out / "reliability.png")
    if len(report.classes) <= _HEATMAP_MAX_CLASSES:
        for a, b in zip(report.flips["round_a"], report.flips["round_b"], strict=True):
            plots[f"flips-{a}-{b}"] = plot_flip_matrix(
                report, (int(a), int(b)), out / f"flip_matrix_round-{a}-{b}.png")

    blocks = _document(report, {k: p.name for k, p in plots.items()})
    text = _render_md(blocks) if fmt == "md" else _render_html(blocks, report.run)
    path = out / f"report.{fmt}"
    path.write_text(text)
    return path


def summary_lines(report: RunReport) -> list[str]:
    """A few lines for the terminal: one per round."""
    lines = [f"run {report.run}: {len(report.rounds)} round(s), {len(report.classes)} classes"]
    for row in report.rounds.itertuples(index=False):
        parts = [f"round {row.round} {row.role or '?':7s} {row.status or '?':8s}"]
        if pd.notna(row.top1):
            parts.append(f"top-1 {row.top1:.2%}")
            if pd.notna(row.gain):
                parts.append(f"({row.gain * 100:+.2f} pts over teacher)")
        if pd.notna(row.pseudo_labels):
            pl = f"pseudo-labels {int(row.pseudo_labels):,}"
            if pd.notna(row.kept):
                pl += f", kept {int(row.kept):,}"
            if pd.notna(row.with_copies):
                pl += f", with copies {int(row.with_copies):,}"
            parts.append(pl)
        if pd.notna(row.precision):
            parts.append(f"precision {row.precision:.1%}")
        if pd.notna(row.flip_rate):
            parts.append(f"flips vs round {row.round - 1} {row.flip_rate:.1%}")
        if pd.notna(row.ece):
            parts.append(f"ECE {row.ece:.3f}")
        lines.append("  " + "  ".join(parts))
    return lines


# A report document as a list of blocks, rendered to Markdown or HTML by the same code.
Block = tuple[str, Any]


def _document(report: RunReport, plots: dict[str, str]) -> list[Block]:
    run = report.run
    when = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    scope = (f"pseudo-label tables of round {report.round_filter} only"
             if report.round_filter is not None else "all rounds")
    rounds = report.rounds
    b: list[Block] = [
        ("h1", f"Noisy Student report: run {run}"),
        ("p", f"Generated {when} from manifests/{run} under {report.root}; {scope}; "
              f"{len(report.classes)} classes. Every table is also a CSV in this folder."),
    ]
    if report.notes:
        b += [("h2", "Notes"), ("list", report.notes)]
    # One CSV, three narrower views: 30 columns side by side do not read.
    model_cols = ["round", "role", "status", "model", "params", "train_resolution",
                  "test_resolution", "top1", "top5", "loss", "teacher_top1", "gain", "ece"]
    pl_cols = ["round", "pseudo_labels", "kept", "with_copies", "threshold", "k", "bad_samples",
               "precision", "precision_kept", "precision_copies", "truth_coverage", "flip_rate"]
    time_cols = ["round"] + [c for c in rounds.columns if c.startswith("seconds_")]
    b += [
        ("h2", "Rounds"),
        ("img", (plots["top1"], "top-1 by round")),
        _table(rounds[model_cols], "rounds.csv"),
        ("p", "top1/top5/loss: test split, fractions. teacher_top1: the model that made this "
              "round's pseudo-labels; gain = top1 - teacher_top1. ece: expected calibration "
              "error of this round's model on the test split."),
        _table(rounds.loc[rounds["round"] >= 1, pl_cols], "rounds.csv"),
        ("p", "pseudo_labels/kept/with_copies are counted in the Parquet files when the round "
              "was scanned (else the manifest's); kept: distinct rows with copies >= 1; "
              "with_copies: sum of copies. precision: share of pseudo-labels matching the "
              "held-out truth; precision_kept: on the distinct kept rows; precision_copies: each "
              "row weighted by its copies (the labels the student trains on); micro-averaged "
              "over classes; truth_coverage: share of rows with a truth label. flip_rate: share "
              "of keys whose label differs from the previous round's pseudo-labels."),
        _table(rounds[time_cols], "rounds.csv"),
        ("p", "Wall time of each stage in seconds, from the manifests."),
    ]
    for r in report.pseudo_label_rounds():
        row = rounds.set_index("round").loc[r]
        pc = report.per_class[report.per_class["round"] == r]
        b += [
            ("h2", f"Round {r}: pseudo-labels (teacher: round {r - 1})"),
            ("p", f"threshold {_fmt(row.get('threshold'))}, K {_fmt(row.get('k'))}; "
                  f"pseudo-labels {_fmt(row.get('pseudo_labels'))}, kept "
                  f"{_fmt(row.get('kept'))}, with copies {_fmt(row.get('with_copies'))}; bad "
                  f"samples skipped {_fmt(row.get('bad_samples'))}."),
            ("img", (plots[f"confidence-{r}"], f"confidence and entropy, round {r}")),
            ("img", (plots[f"classes-{r}"], f"class distribution, round {r}")),
            _table(pc, "per_class.csv", sort_by="precision"),
            ("p", "kept/copies: counted in the files (rows with copies >= 1; sum of copies); "
                  "manifest_*: what the manifest records. median_confidence comes from a "
                  "1000-bin histogram (within 0.001 of the exact median when the class has many "
                  "rows). Histograms (50 fixed bins) are in histograms.csv."),
        ]
    if len(report.flips):
        b += [("h2", "Agreement between consecutive teachers"),
              _table(report.flips, "flips.csv"),
              ("p", "Round a's and round b's pseudo-labels (made by teachers a-1 and b-1), rows "
                    "of the same shard file joined by key. common: keys in both; flipped: of "
                    "those, labels that changed; only_a/only_b: keys in one round only; *_kept: "
                    "keys kept (copies >= 1) in both rounds. The whole flip matrix is "
                    "flip_matrix.csv (non-zero cells).")]
        changes = report.class_changes
        for a, bb in zip(report.flips["round_a"], report.flips["round_b"], strict=True):
            key = f"flips-{a}-{bb}"
            b.append(("h3", f"Per class, rounds {a} -> {bb}"))
            if key in plots:
                b.append(("img", (plots[key], f"flip matrix, rounds {a} to {bb}")))
            cc = changes[(changes["round_a"] == a) & (changes["round_b"] == bb)]
            b.append(_table(cc, "class_changes.csv", sort_by="flip_out_rate", ascending=False))
    if len(report.calibration):
        b += [("h2", "Calibration of each round's model (the next round's teacher)"),
              _table(report.calibration, "calibration.csv")]
        if "reliability" in plots:
            b.append(("img", (plots["reliability"], "reliability diagram")))
        b.append(("p", f"ECE over {ECE_BINS} equal-width confidence bins (lo, hi]: the sum over "
                       "bins of (rows in bin / rows) x |accuracy - mean confidence|; the bins are "
                       "in reliability.csv."))
    b += [("h2", "Files"), ("list", [("link", f"{name}.csv") for name in report.tables()])]
    return b


def _table(df: pd.DataFrame, csv: str, sort_by: str | None = None,
           ascending: bool = True) -> Block:
    """A table block: whole when short; else the rows worst by ``sort_by`` (the CSV has all)."""
    if len(df) <= _MAX_MD_ROWS:
        return ("table", (df, f"in [{csv}]"))
    if sort_by is not None and sort_by in df and df[sort_by].notna().any():
        shown = df.sort_values(sort_by, ascending=ascending).head(_MAX_MD_ROWS)
        how = f"by {sort_by}, {'lowest' if ascending else 'highest'} first"
    else:
        shown, how = df.head(_MAX_MD_ROWS), "the first ones"
    return ("table", (shown, f"{len(shown)} of {len(df)} rows ({how}); all in [{csv}]"))


def _fmt(v: Any) -> str:
    if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, (float, np.floating)):
        if float(v).is_integer() and abs(v) >= 1:
            return f"{int(v):,}"
        return f"{v:.4g}"
    if isinstance(v, (int, np.integer)):
        return f"{int(v):,}"
    return str(v)


def _render_md(blocks: list[Block]) -> str:
    out = []
    for kind, value in blocks:
        if kind in ("h1", "h2", "h3"):
            out.append(f"{'#' * int(kind[1])} {value}\n")
        elif kind == "p":
            out.append(f"{value}\n")
        elif kind == "list":
            out.append("\n".join(f"- {_md_item(x)}" for x in value) + "\n")
        elif kind == "img":
            out.append(f"![{value[1]}]({value[0]})\n")
        elif kind == "table":
            df, caption = value
            out.append(f"{_md_table(df)}\n\n({_link_caption(caption, html_=False)})\n")
    return "\n".join(out)


def _link_caption(caption: str, html_: bool) -> str:
    """Turn the "[file.csv]" in a table caption into a link."""
    head, _, rest = caption.partition("[")
    name, _, tail = rest.partition("]")
    if html_:
        return (f"{html.escape(head)}<a href='{html.escape(name)}'>{html.escape(name)}</a>"
                f"{html.escape(tail)}")
    return f"{head}[{name}]({name}){tail}"


def _md_item(x: Any) -> str:
    """A list item: text, or ("link", file name)."""
    return f"[{x[1]}]({x[1]})" if isinstance(x, tuple) else str(x)


def _html_item(x: Any) -> str:
    if isinstance(x, tuple):
        return f"<a href='{html.escape(x[1])}'>{html.escape(x[1])}</a>"
    return html.escape(str(x))


def _md_table(df: pd.DataFrame) -> str:
    if df.empty:
        return "(no rows)"
    def cell(v: Any) -> str:
        return _fmt(v).replace("|", "\\|")

    head = "| " + " | ".join(map(str, df.columns)) + " |"
    sep = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |"
            for row in df.itertuples(index=False, name=None)]
    return "\n".join([head, sep, *body])


def _render_html(blocks: list[Block], run: str) -> str:
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(run)} report"
           "</title><style>body{font-family:sans-serif;max-width:1200px;margin:auto}"
           "table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;"
           "padding:2px 6px;text-align:right}img{max-width:100%}</style></head><body>"]
    for kind, value in blocks:
        if kind in ("h1", "h2", "h3"):
            out.append(f"<{kind}>{html.escape(str(value))}</{kind}>")
        elif kind == "p":
            out.append(f"<p>{html.escape(str(value))}</p>")
        elif kind == "list":
            out.append("<ul>" + "".join(f"<li>{_html_item(x)}</li>" for x in value) + "</ul>")
        elif kind == "img":
            out.append(f"<p><img src='{html.escape(value[0])}' alt='{html.escape(value[1])}'></p>")
        elif kind == "table":
            df, caption = value
            out.append(df.to_html(index=False, na_rep="-", float_format=lambda v: f"{v:.4g}",
                                  border=0)
                       + f"<p>({_link_caption(caption, html_=True)})</p>")
    out.append("</body></html>")
    return "\n".join(out)

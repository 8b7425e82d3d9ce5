"""The report's pandas tables, built from manifests and the accumulated statistics (no file I/O).

What each table holds is listed on :class:`pipeline.report.load.RunReport`. The manifest fields the
tables show are read here (and the files they point to, in :mod:`pipeline.report.load`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from pipeline.manifest import STAGES, RoundRecord
from pipeline.report.flips import FlipStats
from pipeline.report.stats import (
    ECE_BINS,
    PLOT_BINS,
    CalibrationSums,
    PseudoLabelStats,
    coarsen,
    expected_calibration_error,
)

__all__ = [
    "calibration_tables",
    "class_changes_table",
    "flip_matrix_table",
    "flips_table",
    "histogram_table",
    "per_class_table",
    "rounds_table",
    "selection_k",
    "selection_threshold",
]

STAGE_ORDER = STAGES


# ============================================================================ manifest fields


def selection_setting(m: RoundRecord, name: str) -> Any:
    """A selection setting as recorded: pseudo_labels first, then the select stage, then config."""
    if m.pseudo_labels is not None and getattr(m.pseudo_labels, name, None) is not None:
        return getattr(m.pseudo_labels, name)
    select = m.stage("select")
    for source in (select.info if select else {}, m.config):
        if source.get(name) is not None:
            return source[name]
    return None


def selection_threshold(m: RoundRecord) -> float | None:
    """The confidence threshold selection used (or will use), if recorded."""
    value = selection_setting(m, "threshold")
    return None if value is None else float(value)


def selection_k(m: RoundRecord) -> int | None:
    """The per-class row count K selection balanced to (or will), if recorded."""
    value = selection_setting(m, "k")
    return None if value is None else int(value)


# ============================================================================ tables


def rounds_table(manifests: dict[int, RoundRecord], stats: dict[int, PseudoLabelStats],
                 flips: dict[tuple[int, int], FlipStats], calib: pd.DataFrame) -> pd.DataFrame:
    """One row per round: the manifest's model and metrics, the scanned counts and precision."""
    top1 = {r: m.metrics.top1 for r, m in manifests.items()}
    stages = sorted({s for m in manifests.values() for s in m.stages},
                    key=lambda s: (STAGE_ORDER.index(s) if s in STAGE_ORDER else len(STAGE_ORDER),
                                   s))
    ece = dict(zip(calib["round"], calib["ece"], strict=True))
    flip_rate = {b: (f.flipped / f.common if f.common else math.nan)
                 for (_, b), f in flips.items()}
    rows = []
    for r, m in manifests.items():
        model, metrics, pl = m.model, m.metrics, m.pseudo_labels
        teacher_round = (m.teacher.round if m.teacher else r - 1) if r >= 1 else None
        teacher_top1 = metrics.teacher_top1
        if teacher_top1 is None and teacher_round is not None:
            teacher_top1 = top1.get(teacher_round)  # older manifests: read it from the teacher
        label_stage = m.stage("pseudo_label")
        row: dict[str, Any] = {
            "round": r, "role": m.role, "status": m.status,
            "model": model.name if model else None, "params": model.params if model else None,
            "train_resolution": model.train_resolution if model else None,
            "test_resolution": model.test_resolution if model else None,
            "top1": metrics.top1, "top5": metrics.top5, "loss": metrics.loss,
            "teacher_top1": teacher_top1,
            "gain": (metrics.top1 - teacher_top1
                     if metrics.top1 is not None and teacher_top1 is not None else None),
            "pseudo_labels": pl.rows if pl else None, "kept": pl.kept if pl else None,
            "with_copies": pl.selected_with_copies if pl else None,
            "threshold": selection_threshold(m) if r >= 1 else None,
            "k": selection_k(m) if r >= 1 else None,
            "bad_samples": (label_stage.info.get("bad_samples") or {}).get("count")
            if label_stage else None,
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
        seconds = [m.stages[st].seconds if st in m.stages else None for st in stages]
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


def per_class_table(manifests: dict[int, RoundRecord], stats: dict[int, PseudoLabelStats],
                    classes: list[str]) -> pd.DataFrame:
    """One row per (scanned round, class): counts in the files beside the manifest's."""
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


def _manifest_per_class(m: RoundRecord, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The manifest's per_class kept/copies as (C,) arrays, NaN where absent.

    Keys are class names (docs/design.md); older versions wrote class indices (str(c)). Names
    are matched first, so a dataset whose names are other numbers is not misread.
    """
    kept = np.full(len(classes), np.nan)
    copies = np.full(len(classes), np.nan)
    index = {c: i for i, c in enumerate(classes)}
    for key, v in (m.pseudo_labels.per_class if m.pseudo_labels else {}).items():
        i = index.get(str(key))
        if i is None and str(key).isdigit() and int(key) < len(classes):
            i = int(key)
        if i is not None and isinstance(v, dict):
            kept[i] = v.get("kept", np.nan)
            copies[i] = v.get("copies", np.nan)
    return kept, copies


def histogram_table(stats: dict[int, PseudoLabelStats]) -> pd.DataFrame:
    """(round, metric, lower, upper, count) rows of the plotted confidence and entropy bins."""
    frames = []
    conf_edges = np.linspace(0.0, 1.0, PLOT_BINS + 1)
    for r, s in stats.items():
        series = [("confidence", conf_edges, coarsen(s.conf_hist.sum(axis=0)))]
        if s.has_copies:
            series.append(("confidence_kept", conf_edges, coarsen(s.kept_conf_hist)))
        series.append(("entropy", np.linspace(0.0, s.entropy_max, PLOT_BINS + 1), s.entropy_hist))
        for metric, edges, counts in series:
            frames.append(pd.DataFrame({"round": r, "metric": metric, "lower": edges[:-1],
                                        "upper": edges[1:], "count": counts}))
    return (pd.concat(frames, ignore_index=True) if frames
            else pd.DataFrame(columns=["round", "metric", "lower", "upper", "count"]))


def flips_table(flips: dict[tuple[int, int], FlipStats]) -> pd.DataFrame:
    """One row per pair of consecutive pseudo-labeled rounds."""
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


def flip_matrix_table(flips: dict[tuple[int, int], FlipStats],
                      classes: list[str]) -> pd.DataFrame:
    """The non-zero cells of each pair's class x class flip matrix."""
    frames = []
    for (a, b), f in flips.items():
        i, j = np.nonzero(f.matrix)  # sparse: 1000 classes would make a million mostly-zero rows
        frames.append(pd.DataFrame({
            "round_a": a, "round_b": b, "class_a_index": i, "class_a": [classes[x] for x in i],
            "class_b_index": j, "class_b": [classes[x] for x in j], "count": f.matrix[i, j]}))
    cols = ["round_a", "round_b", "class_a_index", "class_a", "class_b_index", "class_b", "count"]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=cols)


def class_changes_table(flips: dict[tuple[int, int], FlipStats], per_class: pd.DataFrame,
                        classes: list[str]) -> pd.DataFrame:
    """Per pair and class: kept counts in both rounds and the flips out of and into the class."""
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


def calibration_tables(sums: dict[int, CalibrationSums]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``calibration`` (one row per round) and ``reliability`` (its bins) from per-round sums."""
    rows, bins = [], []
    edges = np.linspace(0.0, 1.0, ECE_BINS + 1)
    for r, (count, conf_sum, correct_sum) in sums.items():
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

"""The report's matplotlib plots, each drawn from a RunReport's tables into one PNG file."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from pipeline.report.stats import ECE_BINS

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from pipeline.report.load import RunReport

__all__ = [
    "HEATMAP_MAX_CLASSES",
    "PNG_MAGIC",
    "plot_class_distribution",
    "plot_confidence",
    "plot_flip_matrix",
    "plot_reliability",
    "plot_top1",
]

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
HEATMAP_MAX_CLASSES = 50  # a flip-matrix image is unreadable beyond this


def _figure(width: float = 7.0, height: float = 4.0) -> Figure:
    # Figure + Agg canvas directly, not pyplot: no global backend switch, so importing this
    # module in a notebook leaves its inline backend alone, and no figure is left open.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def plot_top1(report: RunReport, path: Path) -> Path:
    """Test top-1/top-5 and pseudo-label precision by round."""
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
    """Histograms of the teacher's confidence (all rows and kept rows) and entropy in a round."""
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
    """Rows per class before and after selection's threshold and balancing, in a round."""
    pc = report.per_class[report.per_class["round"] == round_].sort_values("class_index")
    series = [(c, lab) for c, lab in (("pseudo_labeled", "pseudo-labeled"),
                                      ("above_threshold", "above threshold"),
                                      ("kept", "kept (distinct rows)"),
                                      ("copies", "after balancing (with copies)"))
              if pc[c].notna().any()]
    few = len(pc) <= HEATMAP_MAX_CLASSES
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
    """Reliability diagram of every round's model on the test split."""
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
    """Heatmap of where each class's pseudo-labels of round a went in round b (row shares)."""
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

"""Writing a report: every table as CSV, the plots as PNG, and report.md or report.html.

The document's text is in :mod:`pipeline.report.templates`; this module chooses what it shows
(which columns, which rows of a long table) and renders tables with pandas: ``to_markdown``
(tabulate) and ``to_html``.
"""

from __future__ import annotations

import datetime as _dt
import math
import re
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import pandas as pd
from markupsafe import Markup

from pipeline.fs import S3Path, location
from pipeline.layout import RunLayout
from pipeline.report.errors import ReportError
from pipeline.report.load import RunReport
from pipeline.report.plots import (
    HEATMAP_MAX_CLASSES,
    plot_class_distribution,
    plot_confidence,
    plot_flip_matrix,
    plot_reliability,
    plot_top1,
)
from pipeline.report.stats import ECE_BINS
from pipeline.report.templates import TEMPLATES

__all__ = ["render_document", "summary_lines", "write_report"]

_MAX_TABLE_ROWS = 30  # longer tables are excerpted in the report and given whole in their CSV


def write_report(report: RunReport, out_dir: str | Path | None = None,
                 fmt: str = "md") -> Path | S3Path:
    """Write CSVs, PNGs and report.md (or report.html) to ``out_dir`` (default reports/<run>/;
    local or s3://, where the files are made in a temporary folder and uploaded one by one).

    Returns the report file. Every CSV is written, empty ones with their header, so that files of
    an earlier report never pass for current ones.
    """
    if fmt not in ("md", "html"):
        raise ReportError(f"format must be md or html, got {fmt!r}")
    out = (location(out_dir) if out_dir is not None
           else RunLayout(report.root, report.run).report_dir)
    if not isinstance(out, S3Path):
        return _write_files(report, out, fmt)
    with tempfile.TemporaryDirectory(prefix="ns-report-") as tmp:
        local = _write_files(report, Path(tmp), fmt)
        for f in sorted(Path(tmp).iterdir()):  # the report file last: it names the others
            if f != local:
                (out / f.name).upload(f)
        (out / local.name).upload(local)
    return out / local.name


def _write_files(report: RunReport, out: Path, fmt: str) -> Path:
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
    if len(report.classes) <= HEATMAP_MAX_CLASSES:
        for a, b in zip(report.flips["round_a"], report.flips["round_b"], strict=True):
            plots[f"flips-{a}-{b}"] = plot_flip_matrix(
                report, (int(a), int(b)), out / f"flip_matrix_round-{a}-{b}.png")

    text = render_document(report, {k: p.name for k, p in plots.items()}, fmt)
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


def render_document(report: RunReport, plots: dict[str, str], fmt: str) -> str:
    """The text of report.md (``fmt`` "md") or report.html ("html").

    ``plots`` maps the keys :func:`write_report` gives its plots ("top1", "confidence-<r>",
    "classes-<r>", "reliability", "flips-<a>-<b>") to file names relative to the report.
    """
    text = _environment(fmt).get_template(f"report.{fmt}").render(
        fmt=fmt, **_context(report, plots))
    # The templates leave blank lines around every block: Markdown needs exactly one between
    # blocks, HTML none.
    blank_lines = re.compile(r"\n[ \t]*\n(?:[ \t]*\n)*")
    return blank_lines.sub("\n\n" if fmt == "md" else "\n", text).strip() + "\n"


# ============================================================================ what is shown


@dataclass(frozen=True)
class TableView:
    """The rows of a table that the document shows, and the CSV that has all of them."""

    rows: pd.DataFrame
    csv: str
    excerpt: str | None = None  # e.g. "30 of 40 rows (by precision, lowest first)"

    @property
    def lead(self) -> str:
        """The caption before the CSV's name."""
        return f"{self.excerpt}; all in " if self.excerpt else "in "


def _table(df: pd.DataFrame, csv: str, sort_by: str | None = None,
           ascending: bool = True) -> TableView:
    """Whole when short; else the rows worst by ``sort_by`` (the CSV has all)."""
    if len(df) <= _MAX_TABLE_ROWS:
        return TableView(df, csv)
    if sort_by is not None and sort_by in df and df[sort_by].notna().any():
        shown = df.sort_values(sort_by, ascending=ascending).head(_MAX_TABLE_ROWS)
        how = f"by {sort_by}, {'lowest' if ascending else 'highest'} first"
    else:
        shown, how = df.head(_MAX_TABLE_ROWS), "the first ones"
    return TableView(shown, csv, f"{len(shown)} of {len(df)} rows ({how})")


def _context(report: RunReport, plots: dict[str, str]) -> dict[str, Any]:
    """The variables of the ``document`` template."""
    rounds = report.rounds
    # One CSV, three narrower views: 30 columns side by side do not read.
    model_cols = ["round", "role", "status", "model", "params", "train_resolution",
                  "test_resolution", "top1", "top5", "loss", "teacher_top1", "gain", "ece"]
    pl_cols = ["round", "pseudo_labels", "kept", "with_copies", "threshold", "k", "bad_samples",
               "precision", "precision_kept", "precision_copies", "truth_coverage", "flip_rate"]
    time_cols = ["round"] + [c for c in rounds.columns if c.startswith("seconds_")]
    by_round = rounds.set_index("round")
    pseudo_label_rounds = []
    for r in report.pseudo_label_rounds():
        row = by_round.loc[r]
        pseudo_label_rounds.append({
            "round": r,
            "settings": {name: row.get(name) for name in (
                "threshold", "k", "pseudo_labels", "kept", "with_copies", "bad_samples")},
            "confidence_plot": plots[f"confidence-{r}"],
            "classes_plot": plots[f"classes-{r}"],
            "per_class": _table(report.per_class[report.per_class["round"] == r],
                                "per_class.csv", sort_by="precision"),
        })
    changes = report.class_changes
    flip_pairs = []
    for a, b in zip(report.flips["round_a"], report.flips["round_b"], strict=True):
        cc = changes[(changes["round_a"] == a) & (changes["round_b"] == b)]
        flip_pairs.append({
            "a": a, "b": b, "plot": plots.get(f"flips-{a}-{b}"),
            "class_changes": _table(cc, "class_changes.csv", sort_by="flip_out_rate",
                                    ascending=False),
        })
    return {
        "run": report.run,
        "root": report.root,
        "when": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "scope": (f"pseudo-label tables of round {report.round_filter} only"
                  if report.round_filter is not None else "all rounds"),
        "n_classes": len(report.classes),
        "notes": report.notes,
        "top1_plot": plots["top1"],
        "rounds_model": _table(rounds[model_cols], "rounds.csv"),
        "rounds_pseudo_labels": _table(rounds.loc[rounds["round"] >= 1, pl_cols], "rounds.csv"),
        "rounds_seconds": _table(rounds[time_cols], "rounds.csv"),
        "pseudo_label_rounds": pseudo_label_rounds,
        "flips": _table(report.flips, "flips.csv") if len(report.flips) else None,
        "flip_pairs": flip_pairs,
        "calibration": (_table(report.calibration, "calibration.csv")
                        if len(report.calibration) else None),
        "reliability_plot": plots.get("reliability"),
        "ece_bins": ECE_BINS,
        "csv_files": [f"{name}.csv" for name in report.tables()],
    }


# ============================================================================ how it is shown


@cache
def _environment(fmt: str) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.DictLoader(TEMPLATES), autoescape=fmt == "html",
        undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(fmt=_fmt, squash=_squash, markdown_table=_markdown_table,
                       html_table=_html_table)
    return env


def _fmt(v: Any) -> str:
    if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, (float, np.floating)):
        if float(v).is_integer() and abs(v) >= 1:
            return f"{int(v):,}"
        return _float(float(v))
    if isinstance(v, (int, np.integer)):
        return f"{int(v):,}"
    return str(v)


def _float(v: float) -> str:
    """Four significant digits, but never an exponent for a large number (12,345.7 seconds,
    not 1.235e+04)."""
    return f"{v:,.1f}" if abs(v) >= 1000 else f"{v:.4g}"


def _squash(text: str) -> str:
    """A paragraph on one line: the templates wrap long ones."""
    one_line = " ".join(text.split())
    return Markup(one_line) if isinstance(text, Markup) else one_line


def _markdown_table(df: pd.DataFrame) -> str:
    if df.empty:
        return "(no rows)"
    # Cells formatted as the paragraphs format numbers (thousands separators, 4 significant
    # digits below 1,000 and one decimal above, "-" for missing), then passed through as text;
    # a "|" would end the cell.
    cells = df.map(lambda v: _fmt(v).replace("|", "\\|"))
    align = ["right" if pd.api.types.is_numeric_dtype(df[c]) else "left" for c in df.columns]
    return cells.to_markdown(index=False, disable_numparse=True, colalign=align)


def _html_table(df: pd.DataFrame) -> Markup:
    return Markup(df.to_html(index=False, na_rep="-", float_format=_float,
                             border=0))

"""Reports of a run: pandas tables and matplotlib plots from the manifests and pseudo-label files.

``load_run(root, run)`` returns a :class:`RunReport` (tables only, nothing written) for a notebook;
``write_report(report)`` writes ``reports/<run>/``: one CSV per table, PNG plots and ``report.md``
(or ``report.html``). ``jobs/report.py`` is the command line.

The modules, from the files up:

* ``parquet``: Parquet read in record batches of a few columns;
* ``stats``: streaming statistics of pseudo-label and prediction files (counts, histograms,
  precision against the held-out truth, calibration), with the scale notes and definitions;
* ``flips``: agreement of two rounds' pseudo-labels, joined by key one shard at a time;
* ``tables``: the pandas tables, from manifests and statistics;
* ``load``: :class:`RunReport` and :func:`load_run`: manifests, dataset and files of a run;
* ``plots``: the matplotlib plots;
* ``render`` and ``templates``: the CSVs, PNGs and the Markdown or HTML document.
"""

from __future__ import annotations

from pipeline.report.errors import ReportError
from pipeline.report.flips import FlipStats, compare_files
from pipeline.report.load import RunReport, has_pseudo_labels, load_run
from pipeline.report.plots import (
    PNG_MAGIC,
    plot_class_distribution,
    plot_confidence,
    plot_flip_matrix,
    plot_reliability,
    plot_top1,
)
from pipeline.report.render import summary_lines, write_report
from pipeline.report.stats import (
    CONFIDENCE_BINS,
    ECE_BINS,
    PLOT_BINS,
    PseudoLabelStats,
    calibration_bins,
    calibration_from_file,
    expected_calibration_error,
    median_from_histogram,
    scan_pseudo_labels,
)

__all__ = [
    "CONFIDENCE_BINS",
    "ECE_BINS",
    "PLOT_BINS",
    "PNG_MAGIC",
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

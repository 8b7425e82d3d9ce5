"""Report on a run: pandas tables (CSV) and plots (PNG) of every round, linked from report.md.

    python jobs/report.py --run r1                      # all rounds -> reports/r1/report.md
    python jobs/report.py --run r1 --round 2            # pseudo-label tables of round 2 only
    python jobs/report.py --run r1 --format html --root /nfs/ns

Reads manifests/<run>/, the pseudo-label Parquet files and artifacts/<run>/round-<N>/
test_predictions.parquet under --root; needs no Ray and no GPU. In a notebook,
``pipeline.report.load_run(root, run)`` returns the same tables.
Exit status: 0 written, 2 the run, a round or a file cannot be reported on (one line on stderr),
130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.config import ConfigError, check_root, check_run_name, check_unknown  # noqa: E402
from pipeline.fs import StorageError  # noqa: E402
from pipeline.manifest import ManifestError  # noqa: E402
from pipeline.report import ReportError, load_run, summary_lines, write_report  # noqa: E402


@dataclass(frozen=True)
class ReportConfig:
    """Write reports/<run>/ (tables as CSV, plots as PNG, report.md or report.html)."""

    run: str
    """Name of the run: manifests/<run>/ under --root."""
    round: int | None = None
    """Only this round's pseudo-label tables (default: every round that has pseudo-labels)."""
    root: str = "."
    """Folder holding manifests/, artifacts/ and reports/ (local or s3://bucket/prefix)."""
    format: Literal["md", "html"] = "md"
    """report.md (Markdown) or report.html (tables and images in one page)."""


def parse_args(argv: list[str] | None = None) -> ReportConfig:
    import tyro

    args = list(sys.argv[1:] if argv is None else argv)
    check_unknown(ReportConfig, args)  # one line naming the options, not tyro's usage box
    cfg = tyro.cli(ReportConfig, args=args, description=__doc__)
    check_run_name(cfg.run)
    check_root(cfg.root)
    return cfg


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_args(argv)
    except ConfigError as e:
        print(f"report: {e}", file=sys.stderr)
        return 2
    try:
        report = load_run(cfg.root, cfg.run, cfg.round)
        path = write_report(report, fmt=cfg.format)
    except (ReportError, ManifestError, StorageError) as e:
        print(f"report: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the output folder: a file in its place, no permission, a full disk
        print(f"report: cannot write the report under {cfg.root}/reports/{cfg.run}: "
              f"{e.strerror or e}{f' ({e.filename})' if e.filename else ''}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the report is made from the run again in full by a rerun
        print("report: interrupted; run the same command again", file=sys.stderr)
        return 130
    for note in report.notes:
        print(f"report: note: {note}", file=sys.stderr)
    print("\n".join(summary_lines(report)))
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Loading a run: its manifests, dataset and files, scanned into the tables of a RunReport.

``load_run`` reads and writes nothing else: the statistics come from :mod:`pipeline.report.stats`
and :mod:`pipeline.report.flips`, the tables from :mod:`pipeline.report.tables`. Problems that leave
a table incomplete (a missing file, rows skipped) become ``RunReport.notes``; problems that leave
nothing to report on raise :class:`ReportError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.fs import location
from pipeline.layout import RunLayout
from pipeline.manifest import ManifestError, PseudoFile, RoundRecord, load_round
from pipeline.report.errors import ReportError
from pipeline.report.flips import FlipStats, compare_files
from pipeline.report.parquet import num_rows, schema_names
from pipeline.report.stats import (
    TRUTH_ROWS_PER_PASS,
    CalibrationSums,
    calibration_from_file,
    scan_pseudo_labels,
)
from pipeline.report.tables import (
    calibration_tables,
    class_changes_table,
    flip_matrix_table,
    flips_table,
    histogram_table,
    per_class_table,
    rounds_table,
    selection_threshold,
)

__all__ = ["RunReport", "has_pseudo_labels", "load_run"]

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
        """Table name (its CSV's stem) -> table, in the report's order."""
        return {
            "rounds": self.rounds, "per_class": self.per_class, "histograms": self.histograms,
            "flips": self.flips, "flip_matrix": self.flip_matrix,
            "class_changes": self.class_changes, "calibration": self.calibration,
            "reliability": self.reliability,
        }

    def pseudo_label_rounds(self) -> list[int]:
        """The rounds whose pseudo-labels were scanned (those of ``per_class``)."""
        return sorted(int(r) for r in self.per_class["round"].unique())


def has_pseudo_labels(m: RoundRecord) -> bool:
    """A round whose pseudo-label stage finished and recorded where its files are."""
    return m.round >= 1 and m.stage_complete("pseudo_label") and bool(_pseudo_label_uri(m))


def _pseudo_label_uri(m: RoundRecord) -> str | None:
    # ``pseudo_labels`` is filled in by the select stage; until then the pseudo_label stage's
    # entry is where the folder is recorded.
    if m.pseudo_labels is not None and m.pseudo_labels.uri:
        return m.pseudo_labels.uri
    stage = m.stage("pseudo_label")
    return stage.info.get("uri") if stage else None


def _no_pseudo_labels_reason(m: RoundRecord) -> str:
    if m.round == 0:
        return "round 0 is the teacher, trained on labeled data only; it has no pseudo-labels"
    stage = m.stage("pseudo_label")
    status = stage.status if stage else "not started"
    if status != "complete":
        return (f"its pseudo_label stage is {status}; finish it with "
                f"`python jobs/student.py --run {m.run} --round {m.round}`")
    return "its manifest records no pseudo_labels.uri (nor stages.pseudo_label.uri)"


def load_run(root: str | Path, run: str, round_: int | None = None, *,
             truth_rows_per_pass: int = TRUTH_ROWS_PER_PASS) -> RunReport:
    """The report tables of ``run`` under ``root`` (reads manifests and Parquet; writes nothing).

    ``round_`` limits the per-round pseudo-label tables to that round (and the agreement to the pair
    ending at it); the run-level and calibration tables always cover every round.
    """
    layout = RunLayout(root, run)
    root = layout.root
    manifests = _load_manifests(layout)
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
    files = {r: _pseudo_label_files(layout, manifests[r], notes) for r in labeled
             if r in scan_rounds or r + 1 in scan_rounds}
    stats = {}
    for r in scan_rounds:
        m = manifests[r]
        stats[r] = scan_pseudo_labels(
            [p for p in files[r].values()], len(classes), threshold=selection_threshold(m),
            use_copies=m.stage_complete("select"), truth=truth,
            truth_rows_per_pass=truth_rows_per_pass)
        if stats[r].invalid_rows:
            notes.append(f"round {r}: {stats[r].invalid_rows} pseudo-label rows skipped (null or "
                         f"NaN confidence, or a label outside the {len(classes)} classes)")
        if not m.stage_complete("select"):
            notes.append(f"round {r}: select stage not complete; kept and copies are not shown")
        if truth is not None and stats[r].rows.sum() and not stats[r].truth_rows.sum():
            notes.append(f"round {r}: no pseudo-label key is in the held-out truth {truth}; do "
                         "the keys of the unlabeled shards match the truth file's?")

    pairs = [(r - 1, r) for r in scan_rounds if r - 1 in labeled]
    flips = {pair: _compare_rounds(files[pair[0]], files[pair[1]], len(classes), pair, notes,
                                   tuple(manifests[r].stage_complete("select") for r in pair))
             for pair in pairs}
    calib = calibration_tables(_calibration_sums(layout, manifests, notes))

    per_class = per_class_table(manifests, stats, classes)
    return RunReport(
        run=run, root=root, classes=classes,
        rounds=rounds_table(manifests, stats, flips, calib[0]),
        per_class=per_class,
        histograms=histogram_table(stats),
        flips=flips_table(flips),
        flip_matrix=flip_matrix_table(flips, classes),
        class_changes=class_changes_table(flips, per_class, classes),
        calibration=calib[0], reliability=calib[1],
        round_filter=round_, notes=list(dict.fromkeys(notes)),
    )


def _load_manifests(layout: RunLayout) -> dict[int, RoundRecord]:
    run = layout.run
    rounds = layout.rounds()
    if not rounds:
        where = layout.manifest_dir
        runs = sorted(p.name for p in where.parent.glob("*") if p.is_dir())
        known = f"runs there: {', '.join(runs)}" if runs else "no runs there"
        raise ReportError(f"no run {run!r}: {where} has no round-<N>.json ({known}); "
                          "check --run and --root")
    try:
        return {r: load_round(layout, r) for r in rounds}
    except ManifestError as e:
        raise ReportError(str(e)) from None


def _load_dataset(root: Path, manifests: dict[int, RoundRecord]) -> tuple[Any, str | None]:
    """The run's DatasetInfo, or None and why not."""
    from pipeline.dataset import DatasetError, load_dataset

    path = next((m.data.dataset for m in reversed(manifests.values())
                 if m.data is not None and m.data.dataset), None)
    if not path:
        return None, "its manifests record no data.dataset"
    # Relative paths were written relative to the root the jobs ran from; the current folder is
    # the usual root, so it is the second guess.
    p = location(path)
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
    if not location(dataset.unlabeled_truth).exists():
        notes.append(f"held-out truth {dataset.unlabeled_truth} is missing: no precision")
        return None
    try:  # the schema only: a file that is not Parquet, or lacks the columns, is a note
        names = set(schema_names(dataset.unlabeled_truth))
    except ReportError as e:  # names the file and the reason
        notes.append(f"held-out truth unusable: {e}: no precision")
        return None
    if not {"key", "label"} <= names:
        notes.append(f"held-out truth {dataset.unlabeled_truth} has no key and label columns: "
                     "no precision")
        return None
    return location(dataset.unlabeled_truth)


def _pseudo_label_files(layout: RunLayout, m: RoundRecord, notes: list[str]) -> dict[str, str]:
    """File name -> path (local path or URI) of a round's pseudo-label files that exist."""
    uri = str(_pseudo_label_uri(m))
    base = layout.resolve(uri)  # a local folder or an s3:// prefix
    listed: list[PseudoFile] = list(m.pseudo_labels.files) if m.pseudo_labels else []
    if not listed:
        # Hidden names are temporary files of a writer (write, then rename).
        names = sorted(p.name for p in base.glob("*.parquet") if not p.name.startswith("."))
        listed = [PseudoFile(name=n) for n in names]
        if not names:
            notes.append(f"round {m.round}: no pseudo-label files under {base}")
    out, missing, mismatched = {}, [], []
    for f in listed:
        path = str(base / f.name)
        if not location(path).exists():
            missing.append(f.name)
            continue
        if f.rows is not None:
            rows = num_rows(path)
            if rows != f.rows:
                mismatched.append(f"{f.name} ({rows} rows, manifest says {f.rows})")
        out[f.name] = path
    if missing:
        notes.append(f"round {m.round}: {len(missing)} of {len(listed)} pseudo-label files "
                     f"missing under {base} (first: {missing[0]}); statistics leave them out")
    if mismatched:
        notes.append(f"round {m.round}: {len(mismatched)} pseudo-label file(s) differ from the "
                     f"manifest's row counts (first: {mismatched[0]})")
    return out


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


def _calibration_sums(layout: RunLayout, manifests: dict[int, RoundRecord],
                      notes: list[str]) -> dict[int, CalibrationSums]:
    """Per round with test predictions, the calibration bins' sums over its file."""
    sums = {}
    for r in manifests:
        path = layout.test_predictions(r)
        if not path.exists():
            if manifests[r].stage_complete("evaluate"):
                notes.append(f"round {r}: evaluate is complete but {path} is missing: "
                             "no calibration")
            continue
        sums[r], skipped = calibration_from_file(path)
        if skipped:
            notes.append(f"round {r}: {skipped} test predictions skipped (NaN confidence or "
                         "negative label)")
    return sums

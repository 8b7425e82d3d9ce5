"""write_report: the CSVs, PNGs and the Markdown or HTML document of the three-round run."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.dataset import DatasetInfo, save_dataset
from pipeline.report import PNG_MAGIC, load_run, write_report
from tests.test_report_tables import (
    ECE_0,
    RUN,
    TEST_PRED_0,
    artifact_dir,
    make_run,
    manifest,
    pseudo_labels,
    save_manifest,
    write_pseudo_labels,
    write_test_predictions,
)

WIDE_CLASSES = [f"c{i:02d}" for i in range(40)]


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    return make_run(tmp_path)


def check_png(path: Path) -> None:
    assert path.stat().st_size > 1000, path
    assert path.read_bytes()[:8] == PNG_MAGIC, path


def test_write_report_md(root: Path):
    path = write_report(load_run(root, RUN))
    out = root / "reports" / RUN
    assert path == out / "report.md"
    pngs = ["top1_by_round.png", "confidence_round-1.png", "confidence_round-2.png",
            "class_distribution_round-1.png", "class_distribution_round-2.png",
            "reliability.png", "flip_matrix_round-1-2.png"]
    for name in pngs:
        check_png(out / name)
    text = path.read_text()
    for name in pngs:
        assert f"]({name})" in text
    for name in ("rounds", "per_class", "histograms", "flips", "flip_matrix", "class_changes",
                 "calibration", "reliability"):
        assert f"({name}.csv)" in text
        assert len(pd.read_csv(out / f"{name}.csv")) > 0
    assert pd.read_csv(out / "per_class.csv").query("round == 1")["copies"].tolist() == [3, 4, 1]


def test_write_report_html(root: Path):
    path = write_report(load_run(root, RUN, 1), fmt="html")
    assert path.name == "report.html"
    text = path.read_text()
    assert text.startswith("<!doctype html>") and "<table" in text
    assert "<img src='confidence_round-1.png'" in text and "round-2.png" not in text
    check_png(path.parent / "confidence_round-1.png")


def test_teacher_only_run_needs_no_dataset(tmp_path: Path):
    save_manifest(tmp_path, manifest(0, 0.8, {"train": 1.0, "evaluate": 1.0}))
    write_test_predictions(tmp_path, 0, TEST_PRED_0)
    report = load_run(tmp_path, RUN)  # data/toy does not exist here
    assert report.per_class.empty and report.flips.empty
    assert report.calibration["ece"].tolist() == pytest.approx([ECE_0])
    path = write_report(report)
    check_png(path.parent / "top1_by_round.png")
    check_png(path.parent / "reliability.png")
    assert list(pd.read_csv(path.parent / "per_class.csv").columns)[:3] == [
        "round", "class_index", "class"]


# ----------------------------------------------------------------------------- the document's tables


def make_wide_run(folder: Path) -> Path:
    """Two student rounds of 40 classes, 4 rows each: per-class tables longer than 30 rows.

    Class i has 1 + i % 4 of its 4 rows right (precision 0.25, 0.5, 0.75 or 1, ten classes each);
    round 2 relabels row 0 of every even class as the next class (flip-out rate 1/4 for the 20 even
    classes, 0 for the odd ones).
    """
    data = folder / "data" / "toy"
    data.mkdir(parents=True)
    n = len(WIDE_CLASSES)
    rows1 = [(f"k{i:02d}-{j}", i, 0.5 + 0.1 * j, 1) for i in range(n) for j in range(4)]
    truth = [i if j < 1 + i % 4 else (i + 1) % n for i in range(n) for j in range(4)]
    pd.DataFrame({"key": [r[0] for r in rows1], "label": np.array(truth, np.int32)}
                 ).to_parquet(data / "unlabeled_truth.parquet", index=False)
    save_dataset(DatasetInfo(path=data, name="toy", classes=WIDE_CLASSES,
                             unlabeled_truth=data / "unlabeled_truth.parquet"))
    save_manifest(folder, manifest(0, 0.5, {"train": 1.0}))
    rows2 = [(key, (label + 1) % n if key.endswith("-0") and label % 2 == 0 else label, conf, cp)
             for key, label, conf, cp in rows1]
    for r, rows in ((1, rows1), (2, rows2)):
        files = write_pseudo_labels(artifact_dir(folder, RUN, r) / "pseudo_labels",
                                    {"shard-000.parquet": rows})
        save_manifest(folder, manifest(r, 0.5, {"pseudo_label": 1.0, "select": 1.0, "train": 1.0},
                                       pseudo_labels=pseudo_labels(r, files, {}, kept=160,
                                                                   copies=160)))
    return folder


def md_tables(text: str) -> list[pd.DataFrame]:
    """Every pipe table of a Markdown text as strings, header row as the columns."""
    tables: list[list[list[str]]] = []
    in_table = False
    for line in text.splitlines():
        if not line.startswith("|"):
            in_table = False
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if not in_table:
            tables.append([])
            in_table = True
        if not all(re.fullmatch(r":?-+:?", c) for c in cells):
            tables[-1].append(cells)
    return [pd.DataFrame(t[1:], columns=t[0]) for t in tables]


class _HtmlTables(HTMLParser):
    """Every <table> of a page as strings, header row as the columns."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.rows: list[list[list[str]]] = []
        self._cell: list[str] | None = None
        self.feed(text)
        self.tables = [pd.DataFrame(t[1:], columns=t[0]) for t in self.rows]

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "table":
            self.rows.append([])
        elif tag == "tr":
            self.rows[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1][-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def html_tables(text: str) -> list[pd.DataFrame]:
    return _HtmlTables(text).tables


def per_class_tables(tables: list[pd.DataFrame]) -> list[pd.DataFrame]:
    return [t for t in tables if {"class_index", "pseudo_labeled"} <= set(t.columns)]


def test_markdown_tables_show_their_values(root: Path):
    text = write_report(load_run(root, RUN)).read_text()
    tables = md_tables(text)
    models = next(t for t in tables if "model" in t).set_index("round")
    # Numbers as the paragraphs write them: thousands separators, 4 significant digits, "-".
    assert models.loc["1", ["model", "params", "top1", "gain", "ece"]].tolist() == [
        "efficientnet_b1", "4,000,001", "0.85", "0.05", "0.1"]
    assert models.loc["0", ["teacher_top1", "gain"]].tolist() == ["-", "-"]
    per_class = per_class_tables(tables)
    assert [t["round"].unique().tolist() for t in per_class] == [["1"], ["2"]]
    dog = per_class[0].set_index("class").loc["dog"]
    assert dog[["pseudo_labeled", "kept", "copies", "precision", "precision_copies"]].tolist() == [
        "3", "2", "4", "0.6667", "0.25"]
    assert per_class[1].set_index("class").loc["dog", "manifest_kept"] == "-"
    flips = next(t for t in tables if "flip_rate_kept" in t)
    assert flips[["common", "flipped", "flip_rate", "kept_both"]].values.tolist() == [
        ["8", "2", "0.25", "5"]]
    calibration = next(t for t in tables if "teaches_round" in t)
    assert calibration["ece"].tolist() == ["0.41", "0.1"]
    # Short tables are whole, each followed by the link to its CSV.
    assert "\n\n(in [per_class.csv](per_class.csv))\n" in text
    assert "of 3 rows" not in text
    assert text.startswith("# Noisy Student report: run toy\n\n") and "\n\n\n" not in text


def test_html_tables_show_their_values(root: Path):
    text = write_report(load_run(root, RUN), fmt="html").read_text()
    tables = html_tables(text)
    models = next(t for t in tables if "model" in t).set_index("round")
    assert models.loc["1", ["model", "top1", "gain", "ece"]].tolist() == [
        "efficientnet_b1", "0.85", "0.05", "0.1"]
    assert models.loc["0", ["teacher_top1", "gain"]].tolist() == ["-", "-"]
    dog = per_class_tables(tables)[0].set_index("class").loc["dog"]
    assert dog[["pseudo_labeled", "kept", "copies", "precision", "precision_copies"]].tolist() == [
        "3", "2", "4", "0.6667", "0.25"]
    assert next(t for t in tables if "teaches_round" in t)["ece"].tolist() == ["0.41", "0.1"]
    assert "<p>(in <a href='per_class.csv'>per_class.csv</a>)</p>" in text
    assert "<h2>Round 1: pseudo-labels (teacher: round 0)</h2>" in text
    assert text.rstrip().endswith("</body></html>")


@pytest.mark.parametrize("fmt", ["md", "html"])
def test_long_tables_are_excerpted_to_30_rows(tmp_path: Path, fmt: str):
    report = load_run(make_wide_run(tmp_path), RUN)
    path = write_report(report, fmt=fmt)
    text = path.read_text()
    tables = md_tables(text) if fmt == "md" else html_tables(text)
    link = ("[{0}]({0})" if fmt == "md" else "<a href='{0}'>{0}</a>").format

    # The 30 least precise classes of round 1 (i % 4 != 3: precision below 1), lowest first.
    shown = per_class_tables(tables)[0]
    assert len(shown) == 30 and shown["round"].unique().tolist() == ["1"]
    assert set(shown["class"]) == {c for i, c in enumerate(WIDE_CLASSES) if i % 4 != 3}
    precision = shown["precision"].astype(float).tolist()
    assert precision == sorted(precision) and precision[0] == 0.25
    assert f"(30 of 40 rows (by precision, lowest first); all in {link('per_class.csv')})" in text
    whole = pd.read_csv(path.parent / "per_class.csv")
    assert len(whole.query("round == 1")) == 40

    # Class changes: the 20 even classes (flip-out rate 1/4) first, highest first.
    changes = next(t for t in tables if "flip_out_rate" in t)
    rates = changes["flip_out_rate"].astype(float).tolist()
    assert len(rates) == 30 and rates[:20] == [0.25] * 20 and rates[20:] == [0.0] * 10
    assert set(changes["class"][:20]) == set(WIDE_CLASSES[::2])
    assert (f"(30 of 40 rows (by flip_out_rate, highest first); "
            f"all in {link('class_changes.csv')})") in text
    assert len(pd.read_csv(path.parent / "class_changes.csv")) == 40
    # The rounds table (3 rows) stays whole.
    assert len(next(t for t in tables if "model" in t)) == 3


def test_large_numbers_are_written_out_not_in_exponent_form():
    """Seconds of an ImageNet-scale round (tens of thousands) came out as 1.235e+04."""
    from pipeline.report.render import _fmt, _html_table

    assert _fmt(12345.67) == "12,345.7" and _fmt(3600.0) == "3,600"
    assert _fmt(0.93412) == "0.9341" and _fmt(123.456) == "123.5" and _fmt(float("nan")) == "-"
    html = _html_table(pd.DataFrame({"seconds": [12345.67, 0.5]}))
    assert "12,345.7" in html and "e+" not in html

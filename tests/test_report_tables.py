"""load_run and its tables: a hand-written three-round run whose every number is worked out in the
comments. The run (``make_run``) is shared with the other tests of the report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.dataset import DatasetInfo, save_dataset
from pipeline.layout import RunLayout
from pipeline.manifest import RoundRecord
from pipeline.report import load_run

REPO = Path(__file__).resolve().parent.parent
RUN = "toy"
CLASSES = ["cat", "dog", "fox"]

# Held-out truth of the unlabeled split (b4 has none).
TRUTH = {"a0": 0, "a1": 0, "a2": 1, "a3": 2, "b0": 1, "b1": 1, "b2": 2, "b3": 0}

# (key, label, confidence, copies) per shard file. Round 2 lists rows in another order than round 1
# and has a key (b4) that round 1 lacks: a join by position would get every number below wrong.
ROUND1 = {
    "shard-000.parquet": [("a0", 0, 0.9, 1), ("a1", 0, 0.6, 2), ("a2", 0, 0.2, 0),
                          ("a3", 2, 0.8, 1)],
    "shard-001.parquet": [("b0", 1, 0.7, 1), ("b1", 1, 0.4, 0), ("b2", 1, 0.95, 3),
                          ("b3", 0, 0.5, 0)],
}
ROUND2 = {
    "shard-000.parquet": [("a3", 2, 0.9, 1), ("a0", 0, 0.95, 1), ("a2", 1, 0.6, 2),
                          ("a1", 0, 0.85, 1)],
    "shard-001.parquet": [("b4", 0, 0.35, 0), ("b3", 0, 0.7, 1), ("b2", 2, 0.8, 2),
                          ("b1", 1, 0.75, 1), ("b0", 1, 0.9, 1)],
}
# Test-split predictions of round 0: (label, pred, confidence). 15 bins: 0.95 -> bin 14 (acc 1/2),
# 0.55 -> bin 8 (acc 2/2), 0.25 -> bin 3 (acc 0/1).
# ECE = 2/5 |0.5 - 0.95| + 2/5 |1 - 0.55| + 1/5 |0 - 0.25| = 0.18 + 0.18 + 0.05 = 0.41.
TEST_PRED_0 = [(1, 1, 0.95), (2, 0, 0.95), (0, 0, 0.55), (1, 1, 0.55), (2, 1, 0.25)]
ECE_0 = 0.41


# ----------------------------------------------------------------------------- synthetic run


def write_pseudo_labels(folder: Path, shards: dict[str, list[tuple]], copies: bool = True) -> list:
    """The pseudo-label table (docs/design.md), one file per shard; returns the files list."""
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for name, rows in shards.items():
        keys, labels, conf, cps = zip(*rows, strict=True)
        n = len(rows)
        conf32 = np.asarray(conf, dtype=np.float32)
        cols = {
            "key": pa.array(keys, pa.string()),
            "shard": pa.array([name.removesuffix(".parquet")] * n, pa.string()),
            "label": pa.array(labels, pa.int32()),
            "confidence": pa.array(conf32, pa.float32()),
            # Two-class entropy of (p, 1-p): any value in [0, ln 3] will do for the histogram.
            "entropy": pa.array(-(conf32 * np.log(conf32) + (1 - conf32) * np.log(1 - conf32)),
                                pa.float32()),
            "topk_index": pa.array([[lab] for lab in labels], pa.list_(pa.int32())),
            "topk_prob": pa.array([[np.float16(c)] for c in conf], pa.list_(pa.float16())),
        }
        if copies:
            cols["copies"] = pa.array(cps, pa.int32())
        pq.write_table(pa.table(cols), folder / name)
        files.append({"name": name, "rows": n, "sha256": "0" * 64})
    return files


def write_test_predictions(root: Path, round_: int, rows: list[tuple]) -> None:
    label, pred, conf = zip(*rows, strict=True)
    path = artifact_dir(root, RUN, round_) / "test_predictions.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({
        "key": pa.array([f"t{i}" for i in range(len(rows))], pa.string()),
        "label": pa.array(label, pa.int32()), "pred": pa.array(pred, pa.int32()),
        "confidence": pa.array(conf, pa.float32()),
    }), path)


def artifact_dir(root: Path, run: str, round_: int) -> Path:
    return RunLayout(root, run).artifact_dir(round_)


def manifest_path(root: Path, run: str, round_: int) -> Path:
    return RunLayout(root, run).manifest_path(round_)


def set_stage(m: dict, name: str, status: str, **fields) -> None:
    m["stages"].setdefault(name, {}).update(status=status, **fields)


def manifest(round_: int, top1: float, stages: dict[str, float], **extra) -> dict:
    """A round's manifest as JSON, written by hand to the schema (docs/design.md)."""
    m = {
        "schema": 1, "run": RUN, "round": round_,
        "role": "teacher" if round_ == 0 else "student", "status": "complete",
        "created_at": "2026-01-01T00:00:00+00:00", "finished_at": "2026-01-01T01:00:00+00:00",
        "code": {"git_commit": None, "dirty": None}, "config": {"threshold": 0.3, "k": None},
        "model": {"name": "efficientnet_b0" if round_ == 0 else "efficientnet_b1",
                  "params": 4_000_000 + round_, "train_resolution": 32, "test_resolution": 40},
        "data": {"dataset": "data/toy", "dataset_sha256": "0" * 64, "labeled": 10,
                 "unlabeled": 9, "test": 5},
        "stages": {}, "checkpoint": {"uri": "x.pt", "sha256": "0" * 64},
        "metrics": {"top1": top1, "top5": 0.99, "loss": 0.5}, "history": [],
        "cluster": {"num_workers": 1, "use_gpu": False, "resources": {}},
    }
    if round_:
        m["teacher"] = {"round": round_ - 1, "manifest_sha256": "0" * 64,
                        "checkpoint_sha256": "0" * 64}
        m["pseudo_labels"] = None
    for name, seconds in stages.items():
        set_stage(m, name, "complete", seconds=seconds)
    m.update(extra)
    return m


def save_manifest(folder: Path, m: dict) -> None:
    RoundRecord.from_json(m)  # only what the tool itself would accept
    path = manifest_path(folder, m["run"], m["round"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(m))


def pseudo_labels(round_: int, files: list, per_class: dict, kept: int, copies: int) -> dict:
    return {"uri": f"artifacts/{RUN}/round-{round_}/pseudo_labels", "files": files, "rows": None,
            "kept": kept, "selected_with_copies": copies, "threshold": 0.3, "k": 2,
            "per_class": per_class}


def make_run(folder: Path) -> Path:
    """A finished three-round run of 3 classes under folder (the current folder is elsewhere)."""
    data = folder / "data" / "toy"
    data.mkdir(parents=True)
    pd.DataFrame({"key": list(TRUTH), "label": np.array(list(TRUTH.values()), np.int32)}
                 ).to_parquet(data / "unlabeled_truth.parquet", index=False)
    save_dataset(DatasetInfo(path=data, name="toy", classes=CLASSES,
                             unlabeled_truth=data / "unlabeled_truth.parquet"))

    save_manifest(folder, manifest(0, 0.80, {"train": 100.0, "evaluate": 5.0}))
    write_test_predictions(folder, 0, TEST_PRED_0)

    student = {"pseudo_label": 10.0, "select": 2.0, "train": 200.0, "finetune": 20.0,
               "evaluate": 5.0}
    files1 = write_pseudo_labels(artifact_dir(folder, RUN, 1) / "pseudo_labels", ROUND1)
    # per_class keyed by class index, as pipeline.select's plan writes it.
    m1 = manifest(1, 0.85, student, pseudo_labels=pseudo_labels(
        1, files1, {"0": {"kept": 2, "copies": 2}, "1": {"kept": 2, "copies": 2},
                    "2": {"kept": 1, "copies": 2}}, kept=5, copies=6))
    m1["metrics"]["teacher_top1"] = 0.80
    set_stage(m1, "pseudo_label", "complete", rows=8, bad_samples={"count": 2, "examples": []})
    save_manifest(folder, m1)
    write_test_predictions(folder, 1, [(0, 0, 0.9), (1, 1, 0.9)])

    files2 = write_pseudo_labels(artifact_dir(folder, RUN, 2) / "pseudo_labels", ROUND2)
    # per_class keyed by class name (docs/design.md); no teacher_top1: read from round 1.
    m2 = manifest(2, 0.87, student, pseudo_labels=pseudo_labels(
        2, files2, {"cat": {"kept": 3, "copies": 3}, "fox": {"kept": 2, "copies": 3}},
        kept=8, copies=10))
    save_manifest(folder, m2)
    return folder



@pytest.fixture()
def root(tmp_path: Path) -> Path:
    return make_run(tmp_path)


# ----------------------------------------------------------------------------- load_run


def test_rounds_table(root: Path):
    rounds = load_run(root, RUN).rounds.set_index("round")
    assert rounds["role"].tolist() == ["teacher", "student", "student"]
    assert rounds["model"].tolist() == ["efficientnet_b0", "efficientnet_b1", "efficientnet_b1"]
    assert rounds["params"].tolist() == [4_000_000, 4_000_001, 4_000_002]
    assert rounds["test_resolution"].tolist() == [40, 40, 40]
    assert np.isnan(rounds.loc[0, "teacher_top1"]) and np.isnan(rounds.loc[0, "gain"])
    assert rounds.loc[1, "gain"] == pytest.approx(0.05)
    assert rounds.loc[2, "teacher_top1"] == pytest.approx(0.85)  # from round 1's manifest
    assert rounds.loc[2, "gain"] == pytest.approx(0.02)
    # Counted in the files: round 1 has 8 rows, kept 5 (copies >= 1), 1+2+1+1+3 = 8 copies.
    assert rounds.loc[1, ["pseudo_labels", "kept", "with_copies"]].tolist() == [8, 5, 8]
    assert rounds.loc[2, ["pseudo_labels", "kept", "with_copies"]].tolist() == [9, 8, 10]
    assert rounds.loc[1, "bad_samples"] == 2
    assert (rounds.loc[1, "threshold"], rounds.loc[1, "k"]) == (0.3, 2)
    # Round 1 precision: 6 of 8 right; kept rows a0 a1 a3 b0 b2: 4 of 5; copies: 5 of 8.
    assert rounds.loc[1, "precision"] == pytest.approx(6 / 8)
    assert rounds.loc[1, "precision_kept"] == pytest.approx(4 / 5)
    assert rounds.loc[1, "precision_copies"] == pytest.approx(5 / 8)
    assert rounds.loc[2, "truth_coverage"] == pytest.approx(8 / 9)  # b4 has no truth
    assert np.isnan(rounds.loc[1, "flip_rate"]) and rounds.loc[2, "flip_rate"] == 0.25
    assert rounds.loc[0, "ece"] == pytest.approx(ECE_0)
    assert rounds.loc[1, "seconds_pseudo_label"] == 10 and rounds.loc[0, "seconds_train"] == 100
    assert np.isnan(rounds.loc[0, "seconds_select"])
    assert rounds.loc[1, "seconds_total"] == 237
    stage_cols = [c for c in rounds if c.startswith("seconds_")]
    assert stage_cols == ["seconds_pseudo_label", "seconds_select", "seconds_train",
                          "seconds_finetune", "seconds_evaluate", "seconds_total"]


def test_per_class_table_round_1(root: Path):
    pc = load_run(root, RUN).per_class
    r1 = pc[pc["round"] == 1].set_index("class")
    # cat: a0 .9 (1 copy), a1 .6 (2), a2 .2 (0), b3 .5 (0); dog: b0 .7 (1), b1 .4 (0), b2 .95 (3);
    # fox: a3 .8 (1).
    assert r1["pseudo_labeled"].tolist() == [4, 3, 1]
    assert r1["above_threshold"].tolist() == [3, 3, 1]
    assert r1["kept"].tolist() == [2, 2, 1]
    assert r1["copies"].tolist() == [3, 4, 1]
    assert r1["manifest_kept"].tolist() == [2, 2, 1]  # keyed "0", "1", "2" in the manifest
    assert r1["mean_confidence"].tolist() == pytest.approx([0.55, 2.05 / 3, 0.8], abs=1e-6)
    assert r1.loc["dog", "median_confidence"] == pytest.approx(0.7, abs=1e-3)
    assert r1.loc["fox", "median_confidence"] == pytest.approx(0.8, abs=1e-3)
    # cat: a0 a1 b3 right, a2 wrong; dog: b0 b1 right, b2 wrong. Kept: cat a0 a1; dog b0 b2.
    # By copies: dog has b0 (1 copy, right) and b2 (3 copies, wrong): 1/4.
    assert r1["precision"].tolist() == pytest.approx([3 / 4, 2 / 3, 1.0])
    assert r1["precision_kept"].tolist() == pytest.approx([1.0, 1 / 2, 1.0])
    assert r1["precision_copies"].tolist() == pytest.approx([1.0, 1 / 4, 1.0])
    r2 = pc[pc["round"] == 2].set_index("class")
    assert r2["manifest_kept"].tolist()[0] == 3 and pd.isna(r2.loc["dog", "manifest_kept"])
    assert r2["truth_rows"].tolist() == [3, 3, 2]  # b4 (cat) has no truth


def test_histograms_add_up(root: Path):
    h = load_run(root, RUN).histograms
    r1 = h[h["round"] == 1].groupby("metric")["count"].sum()
    assert r1.to_dict() == {"confidence": 8, "confidence_kept": 5, "entropy": 8}
    conf = h[(h["round"] == 1) & (h["metric"] == "confidence")]
    assert len(conf) == 50 and conf["lower"].iloc[0] == 0 and conf["upper"].iloc[-1] == 1
    values = np.array([row[2] for rows in ROUND1.values() for row in rows], np.float32)
    expected, _ = np.histogram(values.astype(np.float64), bins=np.linspace(0, 1, 51))
    assert conf["count"].tolist() == expected.tolist()
    ent = h[(h["round"] == 1) & (h["metric"] == "entropy")]
    assert ent["upper"].iloc[-1] == pytest.approx(math.log(3))


def test_flips_joined_by_key(root: Path):
    report = load_run(root, RUN)
    f = report.flips.iloc[0]
    # a2 cat -> dog, b2 dog -> fox; 8 keys in both rounds, b4 only in round 2.
    assert (f["round_a"], f["round_b"], f["teacher_a"], f["teacher_b"]) == (1, 2, 0, 1)
    assert (f["common"], f["flipped"], f["only_a"], f["only_b"]) == (8, 2, 0, 1)
    assert f["flip_rate"] == 0.25
    # Kept in both: a0 a1 a3 b0 b2; of those b2 flipped.
    assert (f["kept_both"], f["kept_both_flipped"]) == (5, 1)
    cells = {(r.class_a, r.class_b): r.count for r in report.flip_matrix.itertuples()}
    assert cells == {("cat", "cat"): 3, ("cat", "dog"): 1, ("dog", "dog"): 2, ("dog", "fox"): 1,
                     ("fox", "fox"): 1}
    cc = report.class_changes.set_index("class")
    assert cc["kept_a"].tolist() == [2, 2, 1] and cc["kept_b"].tolist() == [3, 3, 2]
    assert cc["kept_change"].tolist() == [1, 1, 1]
    assert cc["flipped_out"].tolist() == [1, 1, 0] and cc["flipped_in"].tolist() == [0, 1, 1]
    assert cc["flip_out_rate"].tolist() == pytest.approx([1 / 4, 1 / 3, 0.0])


def test_calibration_per_round(root: Path):
    report = load_run(root, RUN)
    cal = report.calibration.set_index("round")
    assert cal.index.tolist() == [0, 1]
    assert cal.loc[0, "ece"] == pytest.approx(ECE_0) and cal.loc[0, "top1"] == pytest.approx(0.6)
    assert cal.loc[1, "ece"] == pytest.approx(0.1, abs=1e-6)  # all right at 0.9
    rel = report.reliability[report.reliability["round"] == 0].set_index("bin")
    assert len(rel) == 15 and rel["count"].sum() == 5
    assert rel.loc[14, "accuracy"] == 0.5 and rel.loc[8, "accuracy"] == 1.0
    # Round 2 says evaluate is complete but wrote no predictions: said, not hidden.
    assert any("round 2" in n and "test_predictions" in n for n in report.notes)


def test_truth_in_several_hash_partitions_gives_the_same_precision(root: Path):
    one = load_run(root, RUN).per_class
    many = load_run(root, RUN, truth_rows_per_pass=3).per_class  # 8 truth rows -> 3 passes
    cols = ["truth_rows", "precision", "precision_kept", "precision_copies"]
    pd.testing.assert_frame_equal(one[cols], many[cols])


def test_round_filter_limits_pseudo_label_tables(root: Path):
    report = load_run(root, RUN, 2)
    assert report.per_class["round"].unique().tolist() == [2]
    assert report.flips[["round_a", "round_b"]].values.tolist() == [[1, 2]]
    assert len(report.rounds) == 3 and report.calibration["round"].tolist() == [0, 1]


def test_round_before_select_has_no_kept_columns(root: Path):
    m = json.loads(manifest_path(root, RUN, 2).read_text())
    m["stages"]["select"]["status"] = "running"
    m["status"] = "running"
    manifest_path(root, RUN, 2).write_text(json.dumps(m))
    report = load_run(root, RUN, 2)
    pc = report.per_class
    assert pc["kept"].isna().all() and pc["pseudo_labeled"].sum() == 9
    assert pc["precision_kept"].isna().all() and pc["precision"].notna().all()
    assert any("select stage not complete" in n for n in report.notes)
    assert pd.isna(report.flips.iloc[0]["kept_both"])  # round 2's copies are not final
    assert report.flips.iloc[0]["flipped"] == 2


def test_round_labeled_but_not_selected_as_pipeline_pseudo_label_writes_it(root: Path):
    # Before select, pipeline.pseudo_label records the folder in stages.pseudo_label.uri only and
    # leaves pseudo_labels None; the files are found by listing it.
    m = json.loads(manifest_path(root, RUN, 2).read_text())
    m["stages"]["pseudo_label"]["uri"] = m["pseudo_labels"]["uri"]
    m["pseudo_labels"] = None
    del m["stages"]["select"]
    m["status"] = "running"
    manifest_path(root, RUN, 2).write_text(json.dumps(m))
    report = load_run(root, RUN, 2)
    assert report.per_class["pseudo_labeled"].tolist() == [4, 3, 2]
    assert report.per_class["kept"].isna().all()
    assert report.rounds.set_index("round").loc[2, "pseudo_labels"] == 9


def test_missing_file_and_bad_rows_are_noted(root: Path):
    (artifact_dir(root, RUN, 2) / "pseudo_labels" / "shard-001.parquet").unlink()
    folder = artifact_dir(root, RUN, 1) / "pseudo_labels"
    write_pseudo_labels(folder, {"shard-000.parquet": [("a0", 0, 0.9, 1), ("a1", 7, 0.6, 2),
                                                       ("a2", 0, float("nan"), 0),
                                                       ("a3", 2, 0.8, 1)]})
    report = load_run(root, RUN)
    rounds = report.rounds.set_index("round")
    assert rounds.loc[2, "pseudo_labels"] == 4
    assert rounds.loc[1, "pseudo_labels"] == 8  # 2 of them invalid: counted, left out of stats
    assert report.per_class.query("round == 1")["pseudo_labeled"].sum() == 6
    assert report.flips.iloc[0]["only_a"] == 4  # shard-001 of round 1 has no partner
    text = " ".join(report.notes)
    assert "1 of 2 pseudo-label files missing" in text and "2 pseudo-label rows skipped" in text


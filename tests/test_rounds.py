"""Round orchestration: the parent lookup, stages pseudo_label and select recorded and resumed."""

from __future__ import annotations

import dataclasses
import io
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from pipeline.checkpoint import CheckpointError
from pipeline.config import PseudoLabelConfig
from pipeline.dataset import load_dataset
from pipeline.layout import RunLayout
from pipeline.manifest import ManifestError, load_parent, load_round
from pipeline.pseudo_files import PSEUDO_SCHEMA
from pipeline.pseudo_label import label_shards
from pipeline.rounds import run_label_stages
from pipeline.runner import RunError
from pipeline.shards import read_samples
from tests.builders import CLASSES, make_round0, new_round1


def read_all(out_dir: Path) -> dict[str, pd.DataFrame]:
    return {p.name: pq.read_table(p).to_pandas() for p in sorted(out_dir.glob("*.parquet"))}


def test_missing_or_unfinished_teacher_round_says_what_to_run(tmp_path: Path,
                                                              digits_dir: Path) -> None:
    layout = RunLayout(tmp_path, "r1")
    # the commands name the root (pasted without it, they would look in the current folder)
    with pytest.raises(ManifestError, match=rf"python jobs/teacher.py --run r1 --data DATA "
                                            rf"--root {tmp_path}`"):
        load_parent(layout, 1)
    with pytest.raises(ManifestError, match=rf"python jobs/student.py --run r1 --round 1 --root "
                                            rf"{tmp_path}`"):
        load_parent(layout, 2)
    with pytest.raises(ManifestError, match=r"round 0 is the teacher"):
        load_parent(layout, 0)
    model = tmp_path / "m.pt"
    model.write_bytes(b"x")
    make_round0(tmp_path, "r2", digits_dir, model, sha="0" * 64, status="running")
    with pytest.raises(ManifestError, match=r"round 0 of run 'r2' is running, not complete"):
        load_parent(RunLayout(tmp_path, "r2"), 1)


def test_teacher_with_wrong_hash_is_refused(tmp_path: Path, digits_dir: Path,
                                            teacher_model: Path) -> None:
    make_round0(tmp_path, "r", digits_dir, teacher_model, sha="f" * 64)
    with pytest.raises(CheckpointError, match=r"sha256 .* but its manifest records ffffffffffff"):
        run_label_stages(RunLayout(tmp_path, "r"), 1, PseudoLabelConfig(),
                         new_round1(tmp_path, "r"))
    with pytest.raises(CheckpointError, match="sha256"):
        label_shards(teacher_model, "f" * 64, [], tmp_path / "out", PseudoLabelConfig())


def test_a_student_round_keeps_the_dataset_it_labeled(tmp_path: Path, digits_dir: Path,
                                                       teacher_model: Path) -> None:
    """A student's --data other than its teacher's: labeling used the teacher's dataset and
    training the one given, so the files did not match the shards. Now the round's dataset is
    the one given, its record says so, a rerun on another one after labeling has started is
    refused, and a dataset whose classes differ from the teacher's in name or order too."""
    import dataclasses
    import json
    import shutil

    from pipeline.rounds import check_same_dataset

    make_round0(tmp_path, "r", digits_dir, teacher_model)
    other = tmp_path / "other"
    shutil.copytree(digits_dir, other)
    spec = json.loads((other / "dataset.json").read_text())
    spec["name"] = "digits, registered again"
    (other / "dataset.json").write_text(json.dumps(spec))
    info = load_dataset(other)
    rec = new_round1(tmp_path, "r")
    assert rec.data.dataset_sha256 == load_dataset(digits_dir).sha256 != info.sha256
    check_same_dataset(rec, info)  # nothing labeled yet: the round takes the dataset given
    assert (rec.data.dataset, rec.data.dataset_sha256) == (str(other.resolve()), info.sha256)
    rec.set_stage("pseudo_label", "running")
    check_same_dataset(rec, info)  # the same one: fine
    with pytest.raises(RunError, match=(
            rf"^round 1 of run 'r' was labeled from dataset {re.escape(str(other.resolve()))} "
            rf"\(dataset.json sha256 {info.sha256[:12]}...\), and the dataset is now "
            rf"{re.escape(str(digits_dir))} .*rerun with the --data it started with .* or pass "
            "--force")):
        check_same_dataset(rec, load_dataset(digits_dir))
    # the classes the teacher was trained on, in its order, or its labels name the wrong ones
    turned = dataclasses.replace(info, classes=info.classes[::-1])
    with pytest.raises(ManifestError, match=r"the teacher's classes \(0, 1, 2, 3, \.\.\.\) are "
                                            r"not dataset .*'s \(9, 8, 7, 6, \.\.\.\), in name "
                                            "or order"):
        run_label_stages(RunLayout(tmp_path, "r"), 1, PseudoLabelConfig(),
                         new_round1(tmp_path, "r"), info=turned)
    assert not RunLayout(tmp_path, "r").pseudo_dir(1).exists()
    # and a student job given such a --data refuses before it writes anything (no manifest)
    from pipeline.config import StudentConfig
    from pipeline.rounds import plan_round

    spec["classes"] = spec["classes"][::-1]
    (other / "dataset.json").write_text(json.dumps(spec))
    with pytest.raises(ManifestError, match=r"the teacher's classes \(0, 1, 2, 3, \.\.\.\)"):
        plan_round(StudentConfig(run="r", root=str(tmp_path), round=1, data=str(other)))
    assert not RunLayout(tmp_path, "r").manifest_path(1).exists()


@pytest.mark.slow
def test_round_labels_every_image_then_selects(ray_address: str, tmp_path: Path,
                                               digits_dir: Path, teacher_model: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.checkpoint as checkpoint

    reads: list[str] = []  # the driver's reads of the model file (each actor reads its own)
    real = checkpoint.read_model_file
    monkeypatch.setattr(checkpoint, "read_model_file",
                        lambda path, sha=None: reads.append(str(path)) or real(path, sha))
    make_round0(tmp_path, "r", digits_dir, teacher_model)
    layout = RunLayout(tmp_path, "r")
    rec = run_label_stages(layout, 1, PseudoLabelConfig(), new_round1(tmp_path, "r"),
                           progress=lambda _: None)
    assert len(reads) == 1  # one read serves the class check and the stage
    unlabeled = load_dataset(digits_dir).split("unlabeled")
    out = layout.pseudo_dir(1)
    tables = read_all(out)
    assert sorted(tables) == sorted(Path(s).stem + ".parquet" for s in unlabeled.shards)
    for name in tables:
        assert pq.read_schema(out / name).remove_metadata() == PSEUDO_SCHEMA
    for shard in unlabeled.shards:  # matched by key, in the shard's own order
        df = tables[Path(shard).stem + ".parquet"]
        assert df["key"].tolist() == [s.key for s in read_samples([shard])]
        assert (df["shard"] == shard).all()
    df = pd.concat(tables.values(), ignore_index=True)
    assert len(df) == unlabeled.count and rec.pseudo_labels.rows == unlabeled.count
    probs = np.stack(df["topk_prob"].to_numpy()).astype(np.float64)  # k = 10 = all classes
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-2)
    assert (df["label"] == np.stack(df["topk_index"].to_numpy())[:, 0]).all()
    assert df["label"].nunique() > 3  # the test teacher is not constant
    saved = load_round(layout, 1)
    assert saved.stage_complete("pseudo_label")
    assert saved.stages["pseudo_label"].info["bad_samples"] == {"count": 0, "examples": []}
    assert saved.stages["pseudo_label"].info["config"]["label_batch_size"] == 512
    pl = saved.pseudo_labels
    assert pl.uri == "artifacts/r/round-1/pseudo" and pl.threshold == 0.3
    for c, name in enumerate(CLASSES):
        rows = df[df["label"] == c]
        assert pl.per_class[name] == {"kept": int((rows["copies"] > 0).sum()),
                                      "copies": int(rows["copies"].sum())}
    assert pl.selected_with_copies == int(df["copies"].sum()) > 0
    before = saved.to_json()["stages"]
    again = run_label_stages(layout, 1, PseudoLabelConfig(), saved, progress=lambda _: None)
    assert again.to_json()["stages"] == before  # complete stages are skipped
    assert len(reads) == 1  # and the teacher's file is not read again for them
    # A file deleted after labeling (damaged, as the student's error advises): its shard is
    # labeled again, to the same rows, and the selection made again comes out the same.
    from pipeline.rounds import labels_to_make

    gone = sorted(tables)[1]
    whole = read_all(out)

    def selection(rec) -> dict:  # the file hashes aside: Parquet's metadata may differ
        d = dataclasses.asdict(rec.pseudo_labels)
        return {**d, "files": [{**f, "sha256": ""} for f in d["files"]]}

    selected = selection(again)
    (out / gone).unlink()
    assert labels_to_make(again, PseudoLabelConfig(), 10, layout, unlabeled.shards)
    assert not labels_to_make(again, PseudoLabelConfig(), 10)  # without the folder: unknown
    lines: list[str] = []
    again = run_label_stages(layout, 1, PseudoLabelConfig(), again, progress=lines.append)
    assert any(f"1 labeled file(s) are gone since labeling (e.g. {gone})" in x for x in lines)
    assert [e for e in again.events if e["event"] == "relabel"][-1]["missing"] == [gone]
    pd.testing.assert_frame_equal(read_all(out)[gone], whole[gone])
    assert selection(again) == selected and len(reads) == 2
    before = again.to_json()["stages"]
    # once its student trains on them, a file gone is not made again (labels made on another
    # device could differ in the last bits and move the selection under its checkpoint)
    import copy

    trained = copy.deepcopy(again)
    trained.set_stage("train", "running")
    kept = (out / gone).read_bytes()
    (out / gone).unlink()
    with pytest.raises(RunError, match=rf"^round 1 of run 'r': 1 pseudo-label file\(s\) are gone "
                                       rf"since its student started training on them \(e.g. "
                                       rf"{gone}\); restore them, or pass --force"):
        run_label_stages(layout, 1, PseudoLabelConfig(), trained, progress=lambda _: None)
    (out / gone).write_bytes(kept)
    # a different threshold is not silently ignored: selection (cheap) runs again, labels stay
    stricter = run_label_stages(layout, 1, PseudoLabelConfig(threshold=0.9), again,
                                progress=lambda _: None)
    assert stricter.pseudo_labels.threshold == 0.9
    assert stricter.stages["pseudo_label"].to_json() == before["pseudo_label"]
    assert stricter.events[-1]["event"] == "reselect"
    kept_09 = int((pd.concat(read_all(out).values())["confidence"] >= 0.9).sum())
    assert stricter.pseudo_labels.kept <= kept_09
    assert load_round(layout, 1).pseudo_labels == stricter.pseudo_labels  # saved as it went
    # Nor another --topk once labeling is complete (it was skipped, and the manifest's config
    # then named a k the files did not have): the shards are labeled again, then selected.
    shorter = run_label_stages(layout, 1, PseudoLabelConfig(threshold=0.9, topk=3), stricter,
                               progress=lambda _: None)
    assert {e["event"] for e in shorter.events} >= {"relabel"}
    assert [e for e in shorter.events if e["event"] == "relabel"][-1]["previous"] == {"topk": 10}
    assert shorter.stage_complete("pseudo_label") and shorter.stage_complete("select")
    assert shorter.stages["pseudo_label"].info["config"]["topk"] == 3
    relabeled = pd.concat(read_all(out).values(), ignore_index=True)
    assert len(relabeled) == unlabeled.count
    assert {len(x) for x in relabeled["topk_index"]} == {3}
    assert shorter.pseudo_labels.selected_with_copies == int(relabeled["copies"].sum())
    # k above the class count is the same k as the files hold: nothing to redo
    from pipeline.rounds import check_labels_in_use, labeling_changed

    assert labeling_changed(shorter, PseudoLabelConfig(threshold=0.9, topk=3), 10) == []
    tenfold = PseudoLabelConfig(threshold=0.9, topk=10)
    assert labeling_changed(shorter, tenfold, 10) == ["--topk"]
    assert labeling_changed(shorter, PseudoLabelConfig(threshold=0.9, topk=3,
                                                       jpeg_dct_scaling=False), 10) == [
        "--jpeg-dct-scaling"]
    shorter.set_stage("train", "running")  # once its student trains on them: refused
    with pytest.raises(RunError, match=r"^round 1 of run 'r': its student has started training "
                                       r"on pseudo-labels made with --topk 3; run again with "
                                       "those values, or redo the round"):
        check_labels_in_use(shorter, tenfold, 10)
    with pytest.raises(RunError, match="made with --jpeg-dct-scaling; run again"):  # a switch
        check_labels_in_use(shorter, PseudoLabelConfig(threshold=0.9, topk=3,
                                                       jpeg_dct_scaling=False), 10)
    # the teacher runs (and the cluster is checked for its actors) on a relabel too
    from pipeline.rounds import labels_to_make

    assert labels_to_make(None, tenfold, 10) and labels_to_make(shorter, tenfold, 10)
    assert not labels_to_make(shorter, PseudoLabelConfig(threshold=0.9, topk=3), 10)




def test_preflight_counts_damage_and_stops_past_the_limit(tmp_path: Path, digits_dir: Path
                                                          ) -> None:
    import shutil

    from pipeline.rounds import preflight
    from pipeline.shards import ShardError, ShardWriter

    out = tmp_path / "d"
    shutil.copytree(digits_dir, out)
    info = load_dataset(out)
    shard = info.split("labeled").shards[0]
    samples = list(read_samples([shard]))
    Path(shard).unlink()
    with ShardWriter(Path(shard).parent, prefix="tmp") as w:
        for s in samples:
            w.write(s.key, b"garbage" if s.key == samples[3].key else s.image, s.label)
    Path(w.paths[0]).rename(shard)
    total = info.split("labeled").count
    found = preflight(info, limit=10_000, damage_limit=0.05)
    assert found["labeled"]["bad"] == 1 and found["labeled"]["samples"] == total
    assert found["labeled"]["examples"][0]["key"] == samples[3].key
    assert found["test"]["bad"] == 0
    with pytest.raises(ShardError, match=rf"labeled split: 1 of {total} .* worst shard {shard}"):
        preflight(info, limit=10_000, damage_limit=0.0)
    assert preflight(info, limit=10, damage_limit=0.0) is None  # too large: not read here
    with ShardWriter(Path(shard).parent, prefix="tmp2") as w:
        w.write("x", samples[0].image, 10)  # a class the dataset does not have
    info.splits["test"].shards.append(str(w.paths[0]))
    with pytest.raises(RunError, match=rf"^shard {w.paths[0]}, key x: label 10 is not one of "
                                       r"the dataset's 10 classes$"):
        preflight(info, limit=10_000, damage_limit=0.05)


def test_preflight_warns_when_a_shard_no_longer_holds_its_recorded_count(
        tmp_path: Path, digits_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """dataset.json's samples per shard size the epochs and the readers' runs: a shard
    rewritten after it was registered (here one sample short) is named, with the fix."""
    import shutil

    from pipeline.rounds import preflight
    from pipeline.shards import ShardWriter

    out = tmp_path / "d"
    shutil.copytree(digits_dir, out)
    info = load_dataset(out)
    assert preflight(info, limit=10_000, damage_limit=0.0) is not None
    assert "warning" not in capsys.readouterr().err  # as prepared: every count holds
    shard = info.split("labeled").shards[0]
    samples = list(read_samples([shard]))
    # a sample the reader cannot use (a label that is no integer) is not one register counts:
    # no warning (it is damage, counted as such)
    import tarfile

    with ShardWriter(tmp_path, prefix="extra") as w:
        for s in samples:
            w.write(s.key, s.image, s.label)
    with tarfile.open(w.paths[0], "a") as tar:
        info_ = tarfile.TarInfo("zz.cls")
        info_.size = 3
        tar.addfile(info_, io.BytesIO(b"abc"))
    Path(w.paths[0]).replace(shard)
    preflight(info, limit=10_000, damage_limit=0.05)
    assert "warning" not in capsys.readouterr().err
    with ShardWriter(tmp_path, prefix="tmp") as w:
        for s in samples[:-1]:
            w.write(s.key, s.image, s.label)
    Path(w.paths[0]).replace(shard)
    preflight(info, limit=10_000, damage_limit=0.0)
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"preflight: warning: labeled shard {shard} holds {len(samples) - 1} samples, "
        f"{out}/dataset.json says {len(samples)}; the shards changed after it was written: "
        "prepare them again, or register them again with the same --classes (a student round "
        "that has started labeling then needs --force)")


def test_a_labeled_split_needs_two_classes_and_names_those_without_images(
        digits_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A class folder whose every file was skipped became a class of 0 images without a word,
    and a labeled split of one class trained to a loss of 0 and a test top-1 of 1.0."""
    from pipeline.rounds import check_labeled_classes

    info = load_dataset(digits_dir)
    check_labeled_classes(info)
    assert "warning" not in capsys.readouterr().err
    counts = info.splits["labeled"].class_counts
    info.splits["labeled"].class_counts = {**counts, "3": 0, "7": 0}
    check_labeled_classes(info)
    assert capsys.readouterr().err.strip() == (
        f"warning: dataset {digits_dir}: no labeled images of class(es) 3, 7; the model cannot "
        "learn them")
    info.splits["labeled"].class_counts = {c: (9 if c == "4" else 0) for c in counts}
    with pytest.raises(RunError, match=r"^dataset .*: its labeled split holds images of 1 "
                                       r"class\(es\) \['4'\]; a classifier needs two or more"):
        check_labeled_classes(info)


def test_parameter_counts_need_no_real_model() -> None:
    """The driver records and compares model sizes by arithmetic (tests/test_models.py checks
    every registered model against a built one)."""
    from models import count_parameters, create_model
    from pipeline.rounds import parameter_count

    assert parameter_count("efficientnet_t1", 10) == count_parameters(
        create_model("efficientnet_t1", 10))
    assert 479e6 < parameter_count("efficientnet_l2", 1000) < 481e6  # allocates nothing



def test_force_starts_over_a_round_whose_manifest_cannot_be_read(tmp_path: Path,
                                                                  digits_dir: Path) -> None:
    """A torn manifest says "rerun the round with --force", and --force stopped on the same
    error: the record was read before --force was looked at."""
    from pipeline.config import TrainConfig
    from pipeline.manifest import ManifestError
    from pipeline.rounds import plan_round

    path = RunLayout(tmp_path, "r").manifest_path(0)
    path.parent.mkdir(parents=True)
    path.write_text('{"run": "r", "round": 0, "status": "compl')
    cfg = TrainConfig(run="r", root=str(tmp_path), data=str(digits_dir))
    with pytest.raises(ManifestError, match=r"not valid JSON \(Unterminated string starting "
                                            r"at line 1\); restore it .* --force"):
        plan_round(cfg)
    plan = plan_round(dataclasses.replace(cfg, force=True))
    assert plan.existing is None


def test_a_dataset_changed_since_round_n_minus_1_is_said(tmp_path: Path, digits_dir: Path,
                                                          teacher_model: Path) -> None:
    """A split prepared again after round 0: the student uses the dataset as it is now (meant),
    and said so (it was silent)."""
    import json
    import shutil

    from pipeline.rounds import existing_data_note

    data = tmp_path / "d"
    shutil.copytree(digits_dir, data)
    make_round0(tmp_path, "r", data, teacher_model)
    parent = load_parent(RunLayout(tmp_path, "r"), 1)
    assert existing_data_note(parent, load_dataset(data)) is None
    doc = json.loads((data / "dataset.json").read_text())
    (data / "dataset.json").write_text(json.dumps(doc, indent=1))  # any change of its bytes
    note = existing_data_note(parent, load_dataset(data))
    assert note is not None and note.startswith(f"note: {data}/dataset.json has changed since "
                                                "round 0 recorded it (sha256 ")
    assert note.endswith("this round uses it as it is now")
    from pipeline.fs import S3Path
    from pipeline.rounds import split_storage_note

    assert "every node must be able to read" in split_storage_note(S3Path("s3://b/r"), data)
    assert split_storage_note(tmp_path, data) is None
    assert split_storage_note(S3Path("s3://b/r"), S3Path("s3://b/d")) is None


def test_a_relative_data_reaches_the_workers_absolute(tmp_path: Path, digits_dir: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray's workers run in folders of their own: the plan hands them the dataset and its shards
    as absolute paths, resolved against the driver's working directory."""
    from pipeline.config import TrainConfig
    from pipeline.rounds import plan_round

    monkeypatch.chdir(digits_dir.parent)
    p = plan_round(TrainConfig(run="r", root=str(tmp_path), data=digits_dir.name))
    assert p.cfg.data == str(digits_dir.resolve())
    for split in ("labeled", "unlabeled", "test"):
        shards = p.info.split(split).shards
        assert shards and all(Path(s).is_absolute() and Path(s).exists() for s in shards)
    monkeypatch.chdir(tmp_path)  # where a worker would stand: the plan's paths still hold
    assert all(Path(s).exists() for s in p.info.split("labeled").shards)


@pytest.mark.slow
def test_student_defaults_follow_the_official_size_table(tmp_path: Path, digits_dir: Path,
                                                         teacher_model: Path) -> None:
    """Dropout from the compound-scaling table, unlabel_ratio 1 for B0 / 3 above and the
    schedule's length (the official ImageNet script's --train_ratio=2 for B0-B4: 700 epochs,
    decay every 4.8; 350 and 2.4 above), each overridable; BatchNorm of models trained from
    scratch: TF's, or PyTorch's with --norm."""
    from pipeline.config import StudentConfig, TrainConfig
    from pipeline.rounds import model_record, plan_round

    make_round0(tmp_path, "r", digits_dir, teacher_model)
    for model, dropout, ratio, epochs, decay in (
            ("efficientnet_b0", 0.2, 1.0, 700, 4.8), ("efficientnet_b4", 0.4, 3.0, 700, 4.8),
            ("efficientnet_b5", 0.4, 3.0, 350, 2.4), ("efficientnet_l2", 0.5, 3.0, 350, 2.4),
            ("efficientnet_t0", 0.2, 1.0, 700, 4.8), ("efficientnet_t2", 0.3, 3.0, 700, 4.8)):
        p = plan_round(StudentConfig(run="r", root=str(tmp_path), model=model))
        assert p.cfg.unlabel_ratio == ratio
        assert (p.cfg.epochs, p.cfg.decay_epochs) == (epochs, decay), model
        rec = model_record(p.cfg, 10, p.cfg.model_options())
        assert rec.dropout == dropout and rec.options == {"norm_eps": 1e-3, "norm_momentum": 0.01}
    p = plan_round(StudentConfig(run="r", root=str(tmp_path), model="efficientnet_b0",
                                 unlabel_ratio=3.0, dropout=0.5, norm="pytorch", epochs=350,
                                 decay_epochs=2.4))
    assert p.cfg.unlabel_ratio == 3.0 and model_record(p.cfg, 10).dropout == 0.5
    assert (p.cfg.epochs, p.cfg.decay_epochs) == (350, 2.4)
    assert p.cfg.model_options() == {}
    # the teacher keeps the base schedule whatever its size
    teacher = plan_round(TrainConfig(run="t", root=str(tmp_path), data=str(digits_dir),
                                     model="efficientnet_b0"))
    assert (teacher.cfg.epochs, teacher.cfg.decay_epochs) == (350, 2.4)


def test_a_student_smaller_than_its_teacher_is_warned_of(
        tmp_path: Path, digits_dir: Path, teacher_model: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    import dataclasses

    from pipeline.config import StudentConfig
    from pipeline.manifest import save_round
    from pipeline.rounds import plan_round

    rec = make_round0(tmp_path, "r", digits_dir, teacher_model)
    rec.model = dataclasses.replace(rec.model, name="efficientnet_t2")
    save_round(RunLayout(tmp_path, "r"), rec)
    capsys.readouterr()
    plan_round(StudentConfig(run="r", root=str(tmp_path), model="efficientnet_t1"))
    assert ("warning: student efficientnet_t1 is smaller than its teacher efficientnet_t2; "
            "Noisy Student expects an equal or larger student") in capsys.readouterr().err
    for model in ("efficientnet_t2", "efficientnet_t3"):
        plan_round(StudentConfig(run="r", root=str(tmp_path), model=model))
        assert "smaller" not in capsys.readouterr().err


def test_another_selection_is_refused_once_the_student_trains_on_this_one(
        tmp_path: Path, digits_dir: Path, teacher_model: Path) -> None:
    """Before training, another --threshold/--k/--seed just selects again (cheap); after the
    train stage has started, a resume would continue a checkpoint trained on the old selection,
    so it is refused with the values to use."""
    from pipeline.rounds import check_selection_in_use

    make_round0(tmp_path, "r", digits_dir, teacher_model)
    rec = new_round1(tmp_path, "r")
    rec.set_stage("select", "complete", threshold=0.3, k_requested=None, seed=0)
    check_selection_in_use(rec, PseudoLabelConfig(threshold=0.9))  # not training yet: allowed
    rec.set_stage("train", "failed")
    check_selection_in_use(rec, PseudoLabelConfig())  # the same values: allowed
    for changed in ({"threshold": 0.9}, {"k": 50}, {"seed": 1}):
        with pytest.raises(RunError, match=r"^round 1 of run 'r': its student has started "
                                           r"training on the selection made with --threshold "
                                           r"0\.3 --seed 0; run again with those values, or .*"
                                           r"--round 1 --force`$"):
            check_selection_in_use(rec, PseudoLabelConfig(**changed))
    # jobs/student.py checks it while planning, before anything is written or started
    from pipeline.config import StudentConfig
    from pipeline.manifest import save_round
    from pipeline.rounds import plan_round

    manifest = save_round(RunLayout(tmp_path, "r"), rec)
    before = manifest.read_bytes()
    with pytest.raises(RunError, match="started training on the selection"):
        plan_round(StudentConfig(run="r", root=str(tmp_path), round=1, threshold=0.9))
    assert plan_round(StudentConfig(run="r", root=str(tmp_path), round=1)).existing is not None
    assert manifest.read_bytes() == before


def test_a_round_started_with_another_teacher_is_refused_before_writing(
        tmp_path: Path, digits_dir: Path, teacher_model: Path) -> None:
    """Round 0 redone (--force) after round 1 started: round 1's labels and checkpoints came
    from the old teacher, so continuing it is refused, while planning, with the fix."""
    from pipeline.config import StudentConfig
    from pipeline.manifest import save_round
    from pipeline.rounds import plan_round

    make_round0(tmp_path, "r", digits_dir, teacher_model)
    layout = RunLayout(tmp_path, "r")
    rec = new_round1(tmp_path, "r")
    rec.set_stage("pseudo_label", "failed")
    manifest = save_round(layout, rec)
    before = manifest.read_bytes()
    # round 0 again, as --force does: a new model file (another sha256) under the same name
    other = tmp_path / "other.pt"
    other.write_bytes(teacher_model.read_bytes() + b"\0")
    make_round0(tmp_path, "r", digits_dir, other)
    message = r"round 1 was started with teacher checkpoint .* start round 1 again with --force"
    with pytest.raises(ManifestError, match=message):
        plan_round(StudentConfig(run="r", root=str(tmp_path), round=1))
    with pytest.raises(ManifestError, match=message):
        run_label_stages(layout, 1, PseudoLabelConfig(), rec)
    assert manifest.read_bytes() == before
    assert plan_round(StudentConfig(run="r", root=str(tmp_path), round=1, force=True))


def test_a_round_continues_only_as_the_network_it_started_as(
        tmp_path: Path, digits_dir: Path, teacher_model: Path) -> None:
    """Its checkpoints hold weights for one network: a rerun with another --norm (or without the
    --init-from it started from) would rebuild another and load them into it silently, and one
    with another --model failed in the workers."""
    from pipeline.config import TrainConfig
    from pipeline.manifest import save_round
    from pipeline.rounds import plan_round

    rec = make_round0(tmp_path, "r", digits_dir, teacher_model, status="running")
    rec.model.options = {"norm_eps": 1e-3, "norm_momentum": 0.01}  # --norm tf, the default
    save_round(RunLayout(tmp_path, "r"), rec)
    plain = {"run": "r", "root": str(tmp_path), "data": str(digits_dir),
             "model": "efficientnet_t0"}
    assert plan_round(TrainConfig(**plain, norm="pytorch")).existing is not None  # not trained
    rec.set_stage("train", "failed")
    save_round(RunLayout(tmp_path, "r"), rec)
    assert plan_round(TrainConfig(**plain)).existing is not None  # the same network
    with pytest.raises(RunError, match=r"^round 0 of run 'r' was started with layer options "
                                       r"\{'norm_eps': 0.001, 'norm_momentum': 0.01\} \(now \{\}\); "
                                       r"run it again with the same --init-from, --init-style and "
                                       r"--norm, or pass --force"):
        plan_round(TrainConfig(**plain, norm="pytorch"))
    assert plan_round(TrainConfig(**plain, norm="pytorch", force=True)).existing is None
    rec.init = {"file": "b0.pth", "sha256": "ab" * 32}
    save_round(RunLayout(tmp_path, "r"), rec)
    with pytest.raises(RunError, match=r"was started with --init-from b0.pth \(sha256 ababab"):
        plan_round(TrainConfig(**plain))
    # another --model: its checkpoints cannot load (it failed in the workers, every rerun)
    with pytest.raises(RunError, match=r"^round 0 of run 'r' was started with --model "
                                       r"efficientnet_t0 \(now efficientnet_t1\), and its "
                                       r"checkpoints hold that network's weights; run it again "
                                       r"with --model efficientnet_t0, or pass --force"):
        plan_round(TrainConfig(**{**plain, "model": "efficientnet_t1"}))

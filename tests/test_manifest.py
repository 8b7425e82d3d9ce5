"""The typed round record: one creator, one load-and-validate, one save, one parent lookup."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline import manifest as mf
from pipeline import storage
from pipeline.layout import RunLayout
from pipeline.manifest import (
    DataRef,
    FileRef,
    ManifestError,
    ModelRecord,
    PseudoFile,
    PseudoLabels,
    RoundRecord,
    TeacherRef,
    load_round,
    new_round,
    save_round,
)


def _teacher(run: str = "r1") -> RoundRecord:
    return new_round(run=run, round_=0, config={"lr": 0.1},
                     model=ModelRecord("efficientnet_t0", 10, 32, 32), data=DataRef("/d", "h", 5),
                     cluster={"num_workers": 1})


def _json(rec: RoundRecord) -> dict:
    return json.loads(json.dumps(rec.to_json()))


def test_create_save_load_roundtrip(tmp_path: Path) -> None:
    layout = RunLayout(tmp_path, "r1")
    rec = _teacher()
    rec.set_stage("train", "running", epoch=0)
    rec.set_stage("train", "complete", seconds=1.5)
    assert rec.stages["train"].to_json() == {"status": "complete", "seconds": 1.5, "epoch": 0}
    rec.checkpoint = FileRef("artifacts/r1/round-0/model.pt", "y")
    rec.metrics.top1 = 0.9
    rec.mark_complete()
    path = save_round(layout, rec)
    assert path == tmp_path / "manifests" / "r1" / "round-0.json"
    loaded = load_round(layout, 0)
    assert loaded == RoundRecord.from_json(_json(rec))
    assert loaded.stage_complete("train") and not loaded.stage_complete("evaluate")
    assert loaded.metrics.top1 == 0.9 and loaded.checkpoint.sha256 == "y"
    assert layout.rounds() == [0]
    raw = json.loads(path.read_text())  # the schema's keys, as documented
    assert set(mf.REQUIRED_KEYS) <= set(raw) and raw["role"] == "teacher"
    assert raw["events"][0]["event"] == "start"


def test_a_manifest_copied_to_another_run_or_round_is_refused(tmp_path: Path) -> None:
    import shutil

    path = save_round(RunLayout(tmp_path, "r1"), _teacher())
    other = RunLayout(tmp_path, "r2")
    other.manifest_path(0).parent.mkdir(parents=True)
    shutil.copy(path, other.manifest_path(0))
    with pytest.raises(ManifestError, match=r"round-0.json is the record of round 0 of run 'r1', "
                                            r"not of round 0 of run 'r2' \(copied or renamed\?\)"):
        load_round(other, 0)
    shutil.copy(path, RunLayout(tmp_path, "r1").manifest_path(1))
    with pytest.raises(ManifestError, match="not of round 1 of run 'r1'"):
        load_round(RunLayout(tmp_path, "r1"), 1)


def test_student_record_keeps_teacher_and_pseudo_labels(tmp_path: Path) -> None:
    layout = RunLayout(tmp_path, "r")
    rec = new_round(run="r", round_=1, config={}, model=None, data=DataRef("/d", "h"),
                    cluster={}, teacher=TeacherRef(0, "m" * 64, "c" * 64))
    assert rec.role == "student" and rec.pseudo_labels is None
    rec.pseudo_labels = PseudoLabels(uri="artifacts/r/round-1/pseudo",
                                     files=[PseudoFile("a.parquet", 3, "s")], rows=3, kept=2,
                                     selected_with_copies=4, threshold=0.3, k=2,
                                     per_class={"0": {"kept": 2, "copies": 4}})
    save_round(layout, rec)
    back = load_round(layout, 1)
    assert back.teacher == rec.teacher and back.pseudo_labels == rec.pseudo_labels
    assert back.model is None  # made by jobs/pseudo_label.py before training chose the model
    raw = _json(rec)
    del raw["pseudo_labels"]
    with pytest.raises(ManifestError, match="missing key.*pseudo_labels"):
        RoundRecord.from_json(raw)
    with pytest.raises(ManifestError, match="needs a teacher"):
        new_round(run="r", round_=1, config={}, model=None, data=DataRef("/d", "h"), cluster={})


def test_unknown_keys_of_other_versions_are_kept(tmp_path: Path) -> None:
    raw = _json(_teacher())
    raw["from_the_future"] = {"x": 1}
    rec = RoundRecord.from_json(raw)
    assert rec.to_json()["from_the_future"] == {"x": 1}


def test_mark_failed_records_error() -> None:
    rec = _teacher()
    rec.mark_failed("boom")
    assert rec.status == "failed" and rec.error == "boom" and rec.finished_at
    rec.mark_running()
    assert rec.status == "running" and rec.error is None and "error" not in rec.to_json()


@pytest.mark.parametrize("mutate, message", [
    (lambda m: m.pop("config"), "missing key.*config"),
    (lambda m: m.update(schema=2), "schema 2, this tool reads schema 1; upgrade"),
    (lambda m: m.pop("schema"), "missing key 'schema'"),
    (lambda m: m.update(role="boss"), "role must be one of"),
    (lambda m: m.update(status="done"), "status must be one of"),
    (lambda m: m.update(status="complete"), "no checkpoint"),
    (lambda m: m.update(round=-1), "non-negative"),
    (lambda m: m.update(round=True), "non-negative integer"),
    (lambda m: m.update(stages={"train": {"seconds": 1}}), "stage 'train' needs a status"),
    (lambda m: m.update(checkpoint={"uri": "x"}), "'checkpoint' is incomplete"),
    (lambda m: m.update(model=[1]), "'model' must be an object"),
    # wrong JSON types from a hand edit: tracebacks in report.py and student.py before
    (lambda m: m.update(history=5), "'history' must be a list, got 5"),
    (lambda m: m.update(events=5), "'events' must be a list"),
    (lambda m: m["metrics"].update(top1="high"), "'metrics.top1' must be a number or null, got "
                                                 '"high"'),
    (lambda m: m["model"].update(params="many"), "'model.params' must be an integer"),
    (lambda m: m["data"].update(dataset=5), "'data.dataset' must be a string, got 5"),
    (lambda m: m.update(stages={"train": {"status": "complete", "seconds": "long"}}),
     "stage 'train': 'seconds' must be a number"),
])
def test_validation_errors(mutate, message: str) -> None:
    raw = _json(_teacher())
    mutate(raw)
    with pytest.raises(ManifestError, match=message):
        RoundRecord.from_json(raw)


def test_wrong_types_in_a_student_record_name_the_key() -> None:
    raw = _json(_teacher())
    raw.update(round=1, role="student", teacher={"round": 0, "manifest_sha256": "a" * 64,
                                                 "checkpoint_sha256": "a" * 64},
               pseudo_labels={"uri": "p", "files": None, "rows": 1, "kept": 1,
                              "selected_with_copies": 1, "threshold": 0.3})
    with pytest.raises(ManifestError, match="'pseudo_labels.files' must be a list, got null"):
        RoundRecord.from_json(raw)
    raw["pseudo_labels"].update(files=[], threshold="x")
    with pytest.raises(ManifestError, match="'pseudo_labels.threshold' must be a number"):
        RoundRecord.from_json(raw)
    raw["pseudo_labels"].update(threshold=0.3, per_class=[1])
    with pytest.raises(ManifestError, match="'pseudo_labels.per_class' must be an object"):
        RoundRecord.from_json(raw)
    raw["pseudo_labels"].update(per_class={})
    assert RoundRecord.from_json(raw).pseudo_labels.threshold == 0.3


def test_a_round_number_that_disagrees_with_the_file_name_is_said_first(tmp_path: Path) -> None:
    """round-0.json holding "round": 3 used to fail on the keys a student round needs."""
    path = save_round(RunLayout(tmp_path, "r1"), _teacher())
    raw = json.loads(path.read_text())
    raw["round"] = 3
    path.write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match=r"is the record of round 3 of run 'r1', not of "
                                            r"round 0 of run 'r1'"):
        load_round(RunLayout(tmp_path, "r1"), 0)


def test_bad_json_and_missing_file(tmp_path: Path) -> None:
    layout = RunLayout(tmp_path, "r")
    assert load_round(layout, 0) is None
    with pytest.raises(ManifestError, match="no such manifest"):
        mf.load_round_file(layout.manifest_path(0))
    p = layout.manifest_path(0)
    p.parent.mkdir(parents=True)
    p.write_text('{"schema": 1,')
    with pytest.raises(ManifestError, match="not valid JSON.*--force"):
        load_round(layout, 0)
    p.write_bytes(b'{"schema": 1, "run": "\xff"}')  # not UTF-8: a traceback before
    with pytest.raises(ManifestError, match=r"round-0.json: not valid JSON \(not UTF-8 text: "
                                            r"byte 0xff at offset 22\); restore it"):
        load_round(layout, 0)


def test_failed_write_leaves_old_file_intact(tmp_path: Path, monkeypatch) -> None:
    layout = RunLayout(tmp_path, "r1")
    rec = _teacher()
    path = save_round(layout, rec)
    before = path.read_bytes()

    def crash(*_a, **_k):
        raise OSError("disk full")

    monkeypatch.setattr(storage.os, "fsync", crash)
    rec.config["lr"] = 0.5
    with pytest.raises(OSError, match="disk full"):
        save_round(layout, rec)
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == ["round-0.json"]  # no temp file left


def test_unserialisable_value_never_touches_disk(tmp_path: Path) -> None:
    layout = RunLayout(tmp_path, "r1")
    rec = _teacher()
    path = save_round(layout, rec)
    before = path.read_bytes()
    rec.config["bad"] = object()
    with pytest.raises(TypeError):
        save_round(layout, rec)
    assert path.read_bytes() == before


def test_parent_lookup_resolves_paths_under_the_root(tmp_path: Path) -> None:
    layout = RunLayout(tmp_path, "r")
    model = layout.model_path(0)
    model.parent.mkdir(parents=True)
    model.write_bytes(b"weights")
    rec = _teacher("r")
    rec.checkpoint = FileRef(layout.relative(model), storage.sha256_file(model))
    rec.metrics.top1 = 0.8
    rec.mark_complete()
    save_round(layout, rec)
    parent = mf.load_parent(layout, 1)
    assert parent.model_path == model and parent.dataset_path == Path("/d")
    assert parent.ref == TeacherRef(0, storage.sha256_file(layout.manifest_path(0)),
                                    rec.checkpoint.sha256, "efficientnet_t0", 0.8)
    mf.check_model_file(parent)
    model.write_bytes(b"changed")
    from pipeline.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="changed after round 0 recorded it"):
        mf.check_model_file(parent)
    model.unlink()
    with pytest.raises(CheckpointError, match="does not exist"):
        mf.check_model_file(parent)


def test_the_parent_sha256_is_of_the_record_it_parsed(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Round N-1's manifest rewritten (--force) between reading it and hashing it: the student
    recorded the new file's sha256 beside the old record's checkpoint."""
    import hashlib

    layout = RunLayout(tmp_path, "r")
    rec = _teacher("r")
    rec.checkpoint = FileRef("artifacts/r/round-0/model.pt", "a" * 64)
    rec.mark_complete()
    path = save_round(layout, rec)
    used = path.read_bytes()
    parse = mf._parse_round

    def then_rewritten(*args):
        parsed = parse(*args)
        path.write_text(path.read_text().replace("a" * 64, "b" * 64))  # another process
        return parsed

    monkeypatch.setattr(mf, "_parse_round", then_rewritten)
    parent = mf.load_parent(layout, 1)
    assert parent.record.checkpoint.sha256 == "a" * 64
    assert parent.manifest_sha256 == hashlib.sha256(used).hexdigest()


def test_git_state_shape() -> None:
    g = mf.git_state()
    assert set(g) == {"git_commit", "dirty"}

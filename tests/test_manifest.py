from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pipeline import manifest as mf


def _teacher(run: str = "r1") -> dict:
    return mf.new_manifest(run=run, round_=0, role="teacher", config={"lr": 0.1},
                           model={"name": "m", "params": 10}, data={"labeled": 5},
                           cluster={"num_workers": 1})


def test_create_save_load_roundtrip(tmp_path: Path) -> None:
    m = _teacher()
    mf.set_stage(m, "train", "running", epoch=0)
    mf.set_stage(m, "train", "complete", seconds=1.5)
    assert m["stages"]["train"] == {"epoch": 0, "seconds": 1.5, "status": "complete"}
    m["checkpoint"] = {"uri": "x", "sha256": "y"}
    mf.mark_complete(m)
    path = mf.save_manifest(tmp_path, m)
    assert path == tmp_path / "manifests" / "r1" / "round-0.json"
    loaded = mf.load_manifest(tmp_path, "r1", 0)
    assert loaded == json.loads(json.dumps(m))
    assert mf.stage_complete(loaded, "train") and not mf.stage_complete(loaded, "eval")
    assert mf.list_rounds(tmp_path, "r1") == [0]


def test_student_manifest_needs_teacher_and_pseudo_keys(tmp_path: Path) -> None:
    m = mf.new_manifest(run="r", round_=1, role="student", config={}, model={}, data={},
                        cluster={}, teacher={"round": 0})
    assert m["teacher"] == {"round": 0} and m["pseudo_labels"] is None
    del m["pseudo_labels"]
    with pytest.raises(mf.ManifestError, match="missing key.*pseudo_labels"):
        mf.validate(m)


def test_mark_failed_records_error() -> None:
    m = mf.mark_failed(_teacher(), "boom")
    assert m["status"] == "failed" and m["error"] == "boom" and m["finished_at"]


@pytest.mark.parametrize("mutate, message", [
    (lambda m: m.pop("config"), "missing key.*config"),
    (lambda m: m.update(schema=2), "schema 2, this tool reads schema 1; upgrade"),
    (lambda m: m.pop("schema"), "missing key 'schema'"),
    (lambda m: m.update(role="boss"), "role must be one of"),
    (lambda m: m.update(status="done"), "status must be one of"),
    (lambda m: m.update(status="complete"), "no checkpoint"),
    (lambda m: m.update(round=-1), "non-negative"),
])
def test_validation_errors(mutate, message: str) -> None:
    m = _teacher()
    mutate(m)
    with pytest.raises(mf.ManifestError, match=message):
        mf.validate(m)


def test_bad_json_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(mf.ManifestError, match="no such manifest"):
        mf.load_manifest(tmp_path, "r", 0)
    p = mf.manifest_path(tmp_path, "r", 0)
    p.parent.mkdir(parents=True)
    p.write_text('{"schema": 1,')
    with pytest.raises(mf.ManifestError, match="not valid JSON"):
        mf.load_manifest(tmp_path, "r", 0)


def test_failed_write_leaves_old_file_intact(tmp_path: Path, monkeypatch) -> None:
    m = _teacher()
    path = mf.save_manifest(tmp_path, m)
    before = path.read_bytes()

    def crash(*_a, **_k):
        raise OSError("disk full")

    monkeypatch.setattr(mf.os, "fsync", crash)
    m["config"]["lr"] = 0.5
    with pytest.raises(OSError, match="disk full"):
        mf.save_manifest(tmp_path, m)
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == ["round-0.json"]  # no temp file left


def test_unserialisable_value_never_touches_disk(tmp_path: Path) -> None:
    m = _teacher()
    path = mf.save_manifest(tmp_path, m)
    before = path.read_bytes()
    m["config"]["bad"] = object()
    with pytest.raises(TypeError):
        mf.save_manifest(tmp_path, m)
    assert path.read_bytes() == before


def test_sha256_file(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"abc")
    assert mf.sha256_file(p) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_atomic_write_bytes_replaces(tmp_path: Path) -> None:
    p = tmp_path / "a" / "b.bin"
    mf.atomic_write_bytes(p, b"1")
    mf.atomic_write_bytes(p, b"22")
    assert p.read_bytes() == b"22" and os.listdir(p.parent) == ["b.bin"]


def test_git_state_shape() -> None:
    g = mf.git_state()
    assert set(g) == {"git_commit", "dirty"}

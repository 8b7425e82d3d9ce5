"""Bad input the other test modules do not cover (docs/bad_input.md names every row's test):
sample keys repeated across shards of a split, splits without samples, class lists that differ
between splits, paths that do not exist, and a report on a failed round.

Each job-level case runs the job's own entry point (in-process where the job stops before Ray
starts, which is asserted) and checks what the user sees: exit code 2, one line on stderr naming
the problem and the fix, no traceback, nothing written.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from jobs._common import run_job
from jobs.prepare import main as prepare_main
from pipeline.config import PseudoLabelConfig, StudentConfig, TrainConfig, parse_config
from pipeline.dataset import load_dataset
from pipeline.shards import (
    BadSample,
    KeyIndex,
    ShardError,
    encode_png,
    read_samples,
    read_shard,
    write_shards,
)
from pipeline.storage import sha256_file
from tests.builders import fake_label_batch, make_round0

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
FAST = ["--preset", "demo", "--epochs", "1", "--loader-workers", "0"]


def one_line(err: str, job: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{job}: error: ") and "Traceback" not in err
    return lines[0]


@pytest.fixture()
def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """These jobs must stop before Ray starts; reaching it fails the test."""
    import pipeline.rounds

    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("the job reached Ray: the bad input was not caught up front")

    monkeypatch.setattr(pipeline.rounds, "ray_session", refuse)


def round_job(role: str, argv: list[str]) -> int:
    """jobs/teacher.py's or jobs/student.py's body, in this process."""
    from pipeline.rounds import run_round

    cls = StudentConfig if role == "student" else TrainConfig

    def body() -> int:
        run_round(parse_config(cls, role, argv))
        return 0

    return run_job(role, body)


def edited_dataset(src: Path, dst: Path, edit: Callable[[dict, Path], None]) -> Path:
    """A copy of dataset folder ``src`` whose dataset.json ``edit(doc, dst)`` changed."""
    shutil.copytree(src, dst)
    doc = json.loads((dst / "dataset.json").read_text())
    edit(doc, dst)
    (dst / "dataset.json").write_text(json.dumps(doc))
    return dst


def repeat_key(split: str) -> Callable[[dict, Path], None]:
    """An extra shard in ``split`` whose one sample has the key of the split's first sample."""
    def edit(doc: dict, folder: Path) -> None:
        spec = doc["splits"][split]
        first = next(read_samples([folder / spec["shards"][0]]))
        ((extra, _),) = write_shards([(first.key, first.image, first.label)], folder / split,
                                     prefix="extra")
        spec["shards"].append(str(extra.relative_to(folder)))
        spec["count"] += 1
        if spec.get("class_counts") is not None:
            spec["class_counts"][str(first.label)] += 1
    return edit


# ----------------------------------------------------------------------------- repeated keys


def test_key_index_names_a_key_two_shards_share() -> None:
    index = KeyIndex("test", expected=5)
    index.add("/d/a.tar", ["k0", "k1", "k2"])
    index.add("/d/b.tar", ["k3", "k1"])
    assert index._hashes.nbytes == 8 * 5  # 8 bytes a key, no strings kept
    with pytest.raises(ShardError) as e:
        index.check({"/d/a.tar": ["k0", "k1", "k2"], "/d/b.tar": ["k3", "k1"]}.__getitem__)
    msg = str(e.value)
    assert msg.startswith("test split: sample key 'k1' is in two shards, /d/a.tar and /d/b.tar")
    assert "remove the shard that repeats samples from dataset.json" in msg
    assert "\n" not in msg


def test_key_index_reads_nothing_again_without_equal_hashes_and_lists_a_repeated_shard() -> None:
    index = KeyIndex("labeled")  # no size given: grows
    for i in range(3):
        index.add(f"/d/{i}.tar", [f"s{i}k{j}" for j in range(1000)])

    def never(shard: str) -> list[str]:
        raise AssertionError("keys read again without a duplicate hash")

    index.check(never)
    twice = KeyIndex("unlabeled")
    twice.add("/d/0.tar", ["a", "b"])
    twice.add("/d/0.tar", ["a", "b"])
    with pytest.raises(ShardError, match=r"shard /d/0.tar is listed twice .* remove the "
                                         "repeated entry from dataset.json"):
        twice.check(lambda _: ["a", "b"])


def test_key_index_tells_a_hash_collision_from_a_repeated_key(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Every key given the same hash: the second read decides, so only a real repeat stops."""
    import pipeline.shards

    monkeypatch.setattr(pipeline.shards, "key_hashes",
                        lambda keys: np.zeros(len(keys), np.uint64))
    shards = {"/d/a.tar": ["x", "y"], "/d/b.tar": ["z"]}
    index = KeyIndex("test")
    for shard, keys in shards.items():
        index.add(shard, keys)
    index.check(shards.__getitem__)  # all hashes equal, no key repeated: passes
    shards["/d/c.tar"] = ["w", "y"]
    index.add("/d/c.tar", shards["/d/c.tar"])
    with pytest.raises(ShardError, match="key 'y' is in two shards, /d/a.tar and /d/c.tar"):
        index.check(shards.__getitem__)


def _pseudo_files(out: Path, keys: dict[str, list[str]]) -> None:
    from pipeline.inference import KIND_END
    from pipeline.pseudo_label import ShardAssembler

    names = {shard: Path(shard).stem + ".parquet" for shard in keys}
    asm = ShardAssembler(out, names, {"format": 1, "teacher_sha256": "x", "k": 3},
                         lambda *a: None)
    for i, (shard, ks) in enumerate(keys.items()):
        batch = fake_label_batch(shard, np.arange(len(ks)), np.zeros(len(ks), np.int8), seed=i)
        batch["key"] = np.array(ks, dtype=object)
        asm.add(batch)
        asm.add(fake_label_batch(shard, np.array([0]), np.array([KIND_END]), n=len(ks)))


def test_select_refuses_a_key_two_unlabeled_shards_share_before_rewriting(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.select import select_pseudo_labels

    _pseudo_files(tmp_path, {"/u/000.tar": ["a", "b", "c"], "/u/001.tar": ["d", "b"],
                             "/u/002.tar": ["e"]})
    before = {p.name: sha256_file(p) for p in tmp_path.glob("*.parquet")}

    def body() -> int:
        select_pseudo_labels(tmp_path, 10, PseudoLabelConfig(threshold=0.0),
                             progress=lambda _: None)
        return 0

    assert run_job("student", body) == 2
    line = one_line(capsys.readouterr().err, "student")
    assert "unlabeled split: sample key 'b' is in two shards, /u/000.tar and /u/001.tar" in line
    assert {p.name: sha256_file(p) for p in tmp_path.glob("*.parquet")} == before


@pytest.mark.parametrize("split", ["labeled", "test"])
def test_preflight_refuses_a_key_two_shards_share(tmp_path: Path, digits_dir: Path,
                                                   split: str) -> None:
    from pipeline.rounds import preflight

    data = edited_dataset(digits_dir, tmp_path / "d", repeat_key(split))
    info = load_dataset(data)
    first, extra = info.split(split).shards[0], info.split(split).shards[-1]
    key = next(read_samples([first])).key
    with pytest.raises(ShardError, match=rf"{split} split: sample key '{key}' is in two "
                                         rf"shards, {first} and {extra}"):
        preflight(info, limit=10_000, damage_limit=0.0)


def test_jobs_refuse_a_shard_listed_twice_before_writing(tmp_path: Path, digits_dir: Path,
                                                         capsys: pytest.CaptureFixture[str],
                                                         no_ray: None) -> None:
    """A hand-edited dataset.json listing an unlabeled shard twice: the stages that key files by
    shard would see it once while training streamed it twice; refused when the dataset is read."""
    def twice(doc: dict, _: Path) -> None:
        doc["splits"]["unlabeled"]["shards"].append(doc["splits"]["unlabeled"]["shards"][0])

    data = edited_dataset(digits_dir, tmp_path / "d", twice)
    assert round_job("teacher", ["--run", "x", "--data", str(data), "--root",
                                 str(tmp_path / "out"), *FAST]) == 2
    line = one_line(capsys.readouterr().err, "teacher")
    assert "the unlabeled split lists shard" in line and "twice; remove the repeated" in line
    assert not (tmp_path / "out").exists()


def test_student_job_refuses_a_changed_teacher_file_before_ray_and_writing(
        tmp_path: Path, digits_dir: Path, teacher_model: Path,
        capsys: pytest.CaptureFixture[str], no_ray: None) -> None:
    make_round0(tmp_path, "r", digits_dir, teacher_model)
    model = tmp_path / "artifacts" / "r" / "round-0" / "model.pt"
    assert model.is_file()
    model.write_bytes(model.read_bytes()[:-10])  # truncated after round 0 recorded it
    assert round_job("student", ["--run", "r", "--round", "1", "--root", str(tmp_path),
                                 *FAST]) == 2
    line = one_line(capsys.readouterr().err, "student")
    assert f"model file {model} changed after round 0 recorded it" in line and "--force" in line
    assert not (tmp_path / "manifests" / "r" / "round-1.json").exists()
    assert not (tmp_path / "artifacts" / "r" / "round-1").exists()


def test_student_job_refuses_too_many_teacher_actors_before_writing(
        tmp_path: Path, digits_dir: Path, teacher_model: Path,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The actor check needs the cluster's resources: a 2-CPU cluster stands in for Ray."""
    import contextlib

    import ray

    import pipeline.rounds

    monkeypatch.setattr(pipeline.rounds, "ray_session", lambda **_: contextlib.nullcontext())
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    make_round0(tmp_path, "r", digits_dir, teacher_model)
    assert round_job("student", ["--run", "r", "--round", "1", "--root", str(tmp_path), *FAST,
                                 "--label-actors", "2"]) == 2
    line = one_line(capsys.readouterr().err, "student")
    assert "2 teacher actors x 1 CPUs leave less than one of the cluster's 2 CPUs" in line
    assert "lower --label-actors or --cpus-per-actor" in line
    assert not (tmp_path / "manifests" / "r" / "round-1.json").exists()


@pytest.mark.slow
def test_teacher_job_refuses_repeated_test_keys_before_writing(tmp_path: Path,
                                                               digits_dir: Path) -> None:
    """The user's view, as a subprocess: one line, exit 2, no manifest."""
    data = edited_dataset(digits_dir, tmp_path / "d", repeat_key("test"))
    p = subprocess.run([PY, str(ROOT / "jobs" / "teacher.py"), "--run", "x", "--data",
                        str(data), "--root", str(tmp_path / "out"), *FAST],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 2, p.stderr[-2000:]
    line = one_line(p.stderr, "teacher")
    assert "test split: sample key 'digit" in line and "is in two shards" in line
    assert not (tmp_path / "out").exists()


def test_register_refuses_a_key_two_shards_share(tmp_path: Path, digits_dir: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    info = load_dataset(digits_dir)
    shard = info.split("labeled").shards[1]
    s = next(read_samples([shard]))
    write_shards([(s.key, s.image, s.label)], tmp_path / "again", prefix="again")
    unl = str(digits_dir / "unlabeled" / "*" / "*.tar")
    rc = prepare_main(["register", "--labeled", f"{{{shard},{tmp_path}/again/*.tar}}",
                       "--unlabeled", unl, "--test", str(digits_dir / "test" / "*" / "*.tar"),
                       "--out", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"labeled split: sample key '{s.key}' is in two shards, {shard} and " in err
    assert "Traceback" not in err and not (tmp_path / "o" / "dataset.json").exists()


# ----------------------------------------------------------------------------- damaged shards


def _damage(path: Path, kind: str) -> None:
    if kind == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "not a tar":
        path.write_bytes(b"this is not a tar archive\n" * 40)
    else:
        path.unlink()


@pytest.mark.parametrize("kind", ["truncated", "not a tar", "missing"])
@pytest.mark.parametrize("split", ["labeled", "test"])
def test_a_damaged_shard_in_a_labeled_or_test_split(tmp_path: Path, digits_dir: Path,
                                                    split: str, kind: str) -> None:
    """Preflight: a truncated or non-tar shard is a counted loss of every sample it no longer
    gives (the job stops past --damage-limit, naming it); a missing one stops at once, named."""
    from pipeline.rounds import preflight
    from pipeline.runner import RunError

    data = edited_dataset(digits_dir, tmp_path / "d", lambda doc, _: None)
    info = load_dataset(data)
    shard = info.split(split).shards[-1]
    _damage(Path(shard), kind)
    if kind == "missing":
        with pytest.raises(RunError, match=f"shard {shard} listed in .* does not exist; "
                                           "restore it, or describe "):
            preflight(info, limit=10_000, damage_limit=1.0)
        # also when the read is skipped (--preflight-limit below the images): the training
        # readers would count the shard as one damaged sample and go on without it
        with pytest.raises(RunError, match=f"shard {shard} listed in .* does not exist; "
                                           "restore it, or describe "):
            preflight(info, limit=0, damage_limit=1.0)
        Path(info.split(split).shards[0]).unlink()
        with pytest.raises(RunError, match=f"shard {info.split(split).shards[0]} listed in .* "
                                           "does not exist \\(and 1 more\\); restore it"):
            preflight(info, limit=0, damage_limit=1.0)
        return
    recorded = info.split(split).shard_counts[-1]
    left = sum(1 for s in read_shard(shard) if not isinstance(s, BadSample))
    assert (0 < left < recorded) if kind == "truncated" else left == 0
    found = preflight(info, limit=10_000, damage_limit=1.0)
    assert found[split]["bad"] == recorded - left  # it counted 1 for the whole tail before
    assert found[split]["examples"][0]["shard"] == shard
    assert "damaged shard" in found[split]["examples"][0]["reason"]
    with pytest.raises(ShardError, match=f"{split} split: {recorded - left} of "):
        preflight(info, limit=10_000, damage_limit=0.01)  # the default limit
    with pytest.raises(ShardError, match=f"{split} split: .* worst shard {shard}"):
        preflight(info, limit=10_000, damage_limit=0.0)


@pytest.mark.parametrize("kind", ["truncated", "not a tar", "missing"])
def test_a_damaged_shard_in_the_unlabeled_split_is_one_counted_row(tmp_path: Path,
                                                                   digits_dir: Path,
                                                                   kind: str) -> None:
    """The pseudo-label stage's reader (the Ray Data task, called here directly): the shard
    ends with one damaged row and its end row, so the stage counts it and goes on."""
    from pipeline.inference import KIND_BAD, KIND_END, KIND_OK, read_decode_shards

    data = edited_dataset(digits_dir, tmp_path / "d", lambda doc, _: None)
    good, bad = load_dataset(data).split("unlabeled").shards[:2]
    _damage(Path(bad), kind)
    blocks = list(read_decode_shards({"item": np.array([good, bad], dtype=object)}, 32, 64))
    kinds = {sh: [] for sh in (good, bad)}
    for b in blocks:
        for sh, k in zip(b["shard"], b["kind"], strict=True):
            kinds[str(sh)].append(int(k))
    assert kinds[good].count(KIND_OK) == 100 and kinds[good][-1] == KIND_END
    ok_rows = kinds[bad].count(KIND_OK)
    assert kinds[bad].count(KIND_BAD) == 1 and kinds[bad][-1] == KIND_END
    assert (0 < ok_rows < 100) if kind == "truncated" else ok_rows == 0


# ----------------------------------------------------------------------------- empty splits


def _empty_split(split: str) -> Callable[[dict, Path], None]:
    """``split`` keeps one shard, which holds no samples."""
    def edit(doc: dict, folder: Path) -> None:
        (folder / split / "empty.tar").write_bytes(b"\0" * 1024)  # an archive with no members
        spec = doc["splits"][split]
        spec.update(shards=[f"{split}/empty.tar"], count=0)
        if spec.get("class_counts") is not None:
            spec["class_counts"] = {c: 0 for c in spec["class_counts"]}
    return edit


@pytest.mark.parametrize("split", ["labeled", "test"])
def test_teacher_refuses_a_split_without_samples(tmp_path: Path, digits_dir: Path,
                                                 capsys: pytest.CaptureFixture[str], no_ray: None,
                                                 split: str) -> None:
    data = edited_dataset(digits_dir, tmp_path / "d", _empty_split(split))
    assert round_job("teacher", ["--run", "x", "--data", str(data), "--root",
                                 str(tmp_path / "out"), *FAST]) == 2
    line = one_line(capsys.readouterr().err, "teacher")
    assert f"has no {split} samples" in line and f"--split {split}" in line
    assert not (tmp_path / "out").exists()


def test_teacher_refuses_a_dataset_without_a_test_split(tmp_path: Path, digits_dir: Path,
                                                        capsys: pytest.CaptureFixture[str],
                                                        no_ray: None) -> None:
    data = edited_dataset(digits_dir, tmp_path / "d",
                          lambda doc, _: doc["splits"].pop("test"))
    assert round_job("teacher", ["--run", "x", "--data", str(data), "--root",
                                 str(tmp_path / "out"), *FAST]) == 2
    assert "has no 'test' split; add it with" in one_line(capsys.readouterr().err, "teacher")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("empty", [True, False])
def test_student_refuses_a_dataset_without_unlabeled_samples(
        tmp_path: Path, digits_dir: Path, teacher_model: Path,
        capsys: pytest.CaptureFixture[str], no_ray: None, empty: bool) -> None:
    edit = _empty_split("unlabeled") if empty else \
        (lambda doc, _: doc["splits"].pop("unlabeled"))
    data = edited_dataset(digits_dir, tmp_path / "d", edit)
    root = tmp_path / "out"
    make_round0(root, "x", data, teacher_model)
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    assert round_job("student", ["--run", "x", "--round", "1", "--root", str(root),
                                 "--preset", "demo"]) == 2
    line = one_line(capsys.readouterr().err, "student")
    assert ("has no unlabeled samples" if empty else "has no 'unlabeled' split") in line
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before


# ----------------------------------------------------------------------------- classes, paths


def test_class_lists_that_differ_between_splits_are_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = encode_png(np.zeros((8, 8, 3), np.uint8))
    for split, classes in (("labeled", ["cat", "dog"]), ("test", ["cat", "fox"])):
        for c in classes:
            (tmp_path / split / c).mkdir(parents=True)
            (tmp_path / split / c / "a.png").write_bytes(img)
    out = tmp_path / "ds"
    assert prepare_main(["imagefolder", str(tmp_path / "labeled"), "--out", str(out)]) == 0
    before = (out / "dataset.json").read_bytes()
    capsys.readouterr()
    assert prepare_main(["imagefolder", str(tmp_path / "test"), "--out", str(out), "--split",
                         "test"]) == 2
    err = capsys.readouterr().err
    assert ("classes ['fox'] are not among the dataset's ['cat', 'dog']; name the folders as the "
            "dataset's classes (its classes come from the split prepared first: prepare the "
            "labeled split first, or give another --out)") in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert (out / "dataset.json").read_bytes() == before
    # registered shards whose labels go past the class names given
    ((shard, _),) = write_shards([("k", img, 3)], tmp_path / "reg")
    rc = prepare_main(["register", "--labeled", str(shard), "--unlabeled", str(shard),
                       "--test", str(shard), "--classes", "a,b", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2 and "labels go up to 3 but only 2 class names were given" in err
    assert not (tmp_path / "r" / "dataset.json").exists()


def test_paths_that_do_not_exist(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                 no_ray: None) -> None:
    nowhere = tmp_path / "nowhere"
    assert round_job("teacher", ["--run", "x", "--data", str(nowhere), "--root",
                                 str(tmp_path / "out"), *FAST]) == 2
    assert f"{nowhere} has no dataset.json" in one_line(capsys.readouterr().err, "teacher")
    assert prepare_main(["imagefolder", str(nowhere), "--out", str(tmp_path / "o")]) == 2
    assert f"{nowhere} is not a directory" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- report


def test_report_on_a_failed_round_shows_it_failed(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """A round whose training failed is reported as failed, with what it finished (its
    pseudo-labels) and no test accuracy; the report is still written (exit 0)."""
    from jobs import report as report_job
    from tests.test_report_tables import RUN, make_run, manifest_path

    root = make_run(tmp_path)
    path = manifest_path(root, RUN, 2)
    m = json.loads(path.read_text())
    m.update(status="failed", error="training failed: worker died", checkpoint=None, metrics={})
    m["stages"]["train"]["status"] = "failed"
    for stage in ("finetune", "evaluate"):
        m["stages"].pop(stage, None)
    path.write_text(json.dumps(m))
    assert report_job.main(["--run", RUN, "--root", str(root)]) == 0
    out = capsys.readouterr().out
    (failed,) = [ln for ln in out.splitlines() if "round 2" in ln]
    assert "student failed" in failed and "top-1" not in failed and "pseudo-labels 9" in failed
    assert (root / "reports" / RUN / "report.md").stat().st_size > 0
    assert json.loads(path.read_text())["status"] == "failed"  # the report writes no manifest
    assert pq.read_table(next((root / "artifacts" / RUN / "round-2").rglob("*.parquet")))


# ----------------------------------------------------------------------------- found by trying


def test_prepare_refuses_unusable_out_seed_and_fractions_in_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Each was a traceback (sklearn's seed range, a split smaller than the classes, a file
    where the folder goes) or wrote into the working directory (--out '')."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    for argv, says in (
            (["digits", "--out", str(afile)], f"prepare: error: {afile} is a file, not a folder"),
            (["digits", "--out", str(afile / "sub")],
             f"prepare: error: {afile / 'sub'}: {afile} is a file, not a folder"),
            (["register", "--labeled", "x", "--unlabeled", "x", "--test", "x", "--out",
              str(afile)], f"prepare: error: {afile} is a file, not a folder"),
            (["digits", "--out", ""], "prepare: error: --out is empty"),
            (["digits", "--out", str(tmp_path / "d"), "--labeled-fraction", "0.001"],
             "prepare: error: --labeled-fraction 0.001 and --test-fraction 0.3 leave a split "
             "too small to hold all 10 classes")):
        assert prepare_main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith(says), err
    with pytest.raises(SystemExit) as e:
        prepare_main(["digits", "--out", str(tmp_path / "d"), "--seed", "-1"])
    assert e.value.code == 2
    assert "argument --seed: must be in 0..4294967295, got -1" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_hand_edited_dataset_json_of_wrong_types_is_one_line(tmp_path: Path,
                                                              digits_dir: Path) -> None:
    """Types a hand edit can get wrong: each a DatasetError naming dataset.json (tracebacks
    before: OverflowError, AttributeError, TypeError), and classes named twice."""
    from pipeline.dataset import DatasetError

    def set_(path: list[str], value: object) -> Callable[[dict, Path], None]:
        def edit(doc: dict, _: Path) -> None:
            target = doc
            for k in path[:-1]:
                target = target[k]
            target[path[-1]] = value
        return edit

    cases = [(["splits", "labeled", "count"], float("inf"), "count must be a whole number"),
             (["splits", "labeled", "count"], -5, "count must be a whole number >= 0"),
             (["splits"], [], "has no attribute 'items'"),
             (["unlabeled_truth"], 5, "unlabeled_truth must be a non-empty string"),
             (["splits", "labeled", "shards"], "lab.tar", "labeled shards must be a list"),
             (["classes"], "0123456789", "classes must be a list"),
             (["classes"], ["a", "b", "a", *map(str, range(7))], None)]
    for n, (path, value, says) in enumerate(cases):
        d = edited_dataset(digits_dir, tmp_path / str(n), set_(path, value))
        with pytest.raises(DatasetError) as e:
            load_dataset(d)
        text = str(e.value)
        assert "\n" not in text and str(d / "dataset.json") in text
        if says is None:
            assert "classes ['a'] are listed more than once" in text
        else:
            assert "is not a valid dataset description" in text and says in text, text
    (tmp_path / "dir" / "dataset.json").mkdir(parents=True)
    with pytest.raises(DatasetError, match="not a valid dataset description"):
        load_dataset(tmp_path / "dir")


def test_register_refuses_a_class_named_twice(tmp_path: Path, digits_dir: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    rc = prepare_main(["register", "--labeled", str(digits_dir / "labeled" / "*" / "*.tar"),
                       "--unlabeled", str(digits_dir / "unlabeled" / "*" / "*.tar"),
                       "--test", str(digits_dir / "test" / "*" / "*.tar"),
                       "--classes", "a,b,a,c,d,e,f,g,h,i", "--out", str(tmp_path / "r")])
    assert rc == 2
    assert capsys.readouterr().err.strip() == ("prepare: error: --classes names a more than "
                                               "once; give each class one name")
    assert not (tmp_path / "r").exists()
    # an empty name (a trailing comma) was written, then refused by every job reading it
    rc = prepare_main(["register", "--labeled", str(digits_dir / "labeled" / "*" / "*.tar"),
                       "--unlabeled", str(digits_dir / "unlabeled" / "*" / "*.tar"),
                       "--test", str(digits_dir / "test" / "*" / "*.tar"),
                       "--classes", "a,b,c,d,e,f,g,h,i,", "--out", str(tmp_path / "r")])
    assert rc == 2
    assert capsys.readouterr().err.strip() == (
        "prepare: error: --classes has an empty name (at position 10 of 10); give each class a "
        "name, separated by commas")
    assert not (tmp_path / "r").exists()
    # unbalanced braces in a shard pattern: one line, not braceexpand's traceback
    rc = prepare_main(["register", "--labeled", str(digits_dir / "labeled-{000..001.tar"),
                       "--unlabeled", str(digits_dir / "unlabeled" / "*" / "*.tar"),
                       "--test", str(digits_dir / "test" / "*" / "*.tar"),
                       "--out", str(tmp_path / "r")])
    assert rc == 2
    assert capsys.readouterr().err.strip() == (
        f"prepare: error: {digits_dir / 'labeled-{000..001.tar'}: its braces do not pair up; "
        "write a range as name-{000000..000009}.tar, or escape a literal brace as \\{")
    assert not (tmp_path / "r").exists()


def test_prepare_digits_leaves_a_dataset_json_it_cannot_read(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]
                                                             ) -> None:
    """It used to replace it, since only a readable one was checked for another dataset."""
    (tmp_path / "dataset.json").write_text('{"classes": ["x"], "splits": {"labeled": 5}}')
    before = (tmp_path / "dataset.json").read_bytes()
    assert prepare_main(["digits", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"prepare: error: {tmp_path / 'dataset.json'} exists but cannot be read, so prepare "
        "digits will not replace it; delete it or give an --out of its own")
    assert (tmp_path / "dataset.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset.json"]


@pytest.mark.slow
def test_job_options_out_of_range_are_one_line(tmp_path: Path) -> None:
    """pseudo_label.py --num-cpus below 1 (a Ray traceback, and 0 silently meant all CPUs) and
    a --run that is not a plain name; a --root that is a file (a traceback after Ray started)
    or empty (the run went into the current folder); demo.py --rounds -1 (ran to its report
    step, then failed)."""
    if str(ROOT / "jobs") not in sys.path:  # the jobs import their neighbours by name
        sys.path.insert(0, str(ROOT / "jobs"))
    import pseudo_label

    from pipeline.config import ConfigError
    from pipeline.fs import StorageError
    from pipeline.runner import resolve_root

    for argv, says in ((["--num-cpus", "0"], "--num-cpus must be >= 1 (or omitted for all), "
                        "got 0"),
                       (["--num-cpus", "-1"], "--num-cpus must be >= 1"),
                       (["--run", "../r"], "--run '../r': use letters, digits, '-' and '_' only"),
                       (["--root", ""], "--root is empty: give the folder (or s3:// URI) that "
                        "holds the run's manifests/ and artifacts/, e.g. --root . for the current "
                        "folder")):
        with pytest.raises(ConfigError, match=re.escape(says)):
            pseudo_label.parse_args(["--run", "r", *argv])
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    for job, data in (("teacher.py", ["--data", str(tmp_path)]), ("student.py", []),
                      ("report.py", [])):
        p = subprocess.run([PY, str(ROOT / "jobs" / job), "--run", "r", "--root", "", *data],
                           capture_output=True, text=True, timeout=60, cwd=cwd)
        assert p.returncode == 2 and p.stderr.strip().endswith("--root is empty: give the folder "
                                                               "(or s3:// URI) that holds the "
                                                               "run's manifests/ and artifacts/, "
                                                               "e.g. --root . for the current "
                                                               "folder"), (job, p.stderr)
        assert list(cwd.iterdir()) == [], job
    (tmp_path / "afile").write_text("x")
    with pytest.raises(StorageError, match=re.escape(f"{tmp_path / 'afile'} is a file, not a "
                                                     "folder; give a folder")):
        resolve_root(str(tmp_path / "afile"))
    p = subprocess.run([PY, str(ROOT / "jobs" / "demo.py"), "--root", str(tmp_path / "x"),
                        "--rounds", "-1"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "argument --rounds: must be >= 0, got -1" in p.stderr
    assert not (tmp_path / "x").exists()
    p = subprocess.run([PY, str(ROOT / "jobs" / "demo.py"), "--root", ""], capture_output=True,
                       text=True, timeout=60, cwd=cwd)
    assert p.returncode == 2 and "argument --root: is empty; give a folder" in p.stderr
    assert list(cwd.iterdir()) == []


def _error_classes() -> list[type[BaseException]]:
    from models.weights import WeightsError
    from pipeline.checkpoint import CheckpointError
    from pipeline.config import ConfigError
    from pipeline.dataset import DatasetError
    from pipeline.fs import StorageError
    from pipeline.inference import InferenceError
    from pipeline.lock import LockError
    from pipeline.manifest import ManifestError
    from pipeline.pseudo_files import PseudoFileError
    from pipeline.report import ReportError
    from pipeline.runner import RunError
    from pipeline.shards import ShardError

    return [ConfigError, DatasetError, ManifestError, RunError, ShardError, CheckpointError,
            InferenceError, PseudoFileError, WeightsError, LockError, StorageError, ReportError]


def test_every_module_error_is_one_line_and_exit_2_and_a_lost_worker_exit_1(
        capsys: pytest.CaptureFixture[str]) -> None:
    """run_job catches the errors by their base class, UserError; each keeps its old base too
    (code that catches ValueError or RuntimeError still does)."""
    from pipeline.errors import UserError
    from pipeline.runner import TrainingCrash

    for cls in _error_classes():
        assert issubclass(cls, UserError) and issubclass(cls, (ValueError, RuntimeError)), cls

        def body(cls: type[BaseException] = cls) -> int:
            raise cls(f"a {cls.__name__}; do this instead")

        assert run_job("teacher", body) == 2, cls
        assert one_line(capsys.readouterr().err, "teacher") == (
            f"teacher: error: a {cls.__name__}; do this instead")

    def crash() -> int:
        raise TrainingCrash("a worker was lost; run the same command again")

    assert run_job("student", crash) == 1
    assert capsys.readouterr().err.strip() == (
        "student: error: a worker was lost; run the same command again")

    def bug() -> int:
        raise ValueError("not ours")  # a bug is not turned into a one-line user error

    with pytest.raises(ValueError, match="not ours"):
        run_job("teacher", bug)


# Runs a job's script as `python jobs/<job>.py ARGS` does, then says which of the heavy
# packages the run imported.
_IMPORTS = """
import os, runpy, sys
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))  # as `python jobs/<job>.py` puts it first
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as e:
    print("exit", e.code, file=sys.stderr)
print("imported", *[m for m in ("torch", "torchvision") if m in sys.modules], file=sys.stderr)
"""


def test_a_job_stopped_by_a_bad_option_or_input_does_not_import_torch(tmp_path: Path) -> None:
    """--help and the checks before any work answer in well under a second; torch and
    torchvision alone took seconds to import (4.8 s on the 2-core machine of the README), which
    every such answer used to wait for."""
    missing = str(tmp_path / "nothing")
    cases = [(["teacher.py", "--help"], "exit 0"),
             (["teacher.py", "--run", "r", "--data", missing, "--root", str(tmp_path)],
              "teacher: error: "),
             (["teacher.py", "--run", "r", "--data", missing, "--model", "nope"],
              "--model 'nope' is unknown; valid: efficientnet_t0"),
             (["teacher.py", "--run", "r", "--data", missing, "--epochs", "-1"], "teacher: error"),
             (["student.py", "--run", "r", "--round", "1", "--root", str(tmp_path)],
              "round 1 needs round 0 of run 'r'"),
             (["pseudo_label.py", "--run", "r", "--round", "1", "--root", str(tmp_path)],
              "pseudo_label: error: "),
             (["report.py", "--run", "r", "--root", str(tmp_path)], "report: no run 'r'")]
    for argv, says in cases:
        p = subprocess.run([PY, "-c", _IMPORTS, str(ROOT / "jobs" / argv[0]), *argv[1:]],
                           capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert says in p.stderr + p.stdout, (argv, p.stderr[-2000:])
        assert p.stderr.strip().splitlines()[-1] == "imported", (argv, p.stderr[-2000:])
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_the_modules_a_driver_runs_leave_torchvision_to_the_workers() -> None:
    """A job's driver plans, records and starts the round; the workers build the models. The
    driver counts parameters by arithmetic and builds the workers' Job without pipeline.train, so
    torchvision (2 s of import on 2 cores, most of it torch._dynamo) is not imported there."""
    code = ("import sys\n"
            "import pipeline.job, pipeline.rounds, pipeline.runner, pipeline.train_stage\n"
            "from pipeline.rounds import parameter_count\n"
            "assert parameter_count('efficientnet_l2', 1000) > 479e6\n"
            "print(sorted(m for m in ('torchvision', 'pipeline.train') if m in sys.modules))")
    p = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert p.returncode == 0 and p.stdout.strip() == "[]", p.stdout + p.stderr[-2000:]

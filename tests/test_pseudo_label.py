"""Stage pseudo_label, the driver's side, and jobs/pseudo_label.py: files per shard, damage, resume.

The Ray tests share one local Ray (2 CPUs) per module; the job subprocesses join it through
RAY_ADDRESS instead of starting their own.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from pipeline.config import PseudoLabelConfig
from pipeline.dataset import load_dataset, prepare_digits
from pipeline.inference import KIND_BAD, KIND_END, KIND_OK
from pipeline.layout import RunLayout
from pipeline.manifest import load_round
from pipeline.pseudo_files import PSEUDO_SCHEMA
from pipeline.pseudo_label import ShardAssembler, label_shards
from pipeline.shards import ShardWriter, read_samples
from pipeline.storage import sha256_file
from tests.builders import fake_label_batch, make_round0

REPO = Path(__file__).resolve().parent.parent


def run_job(args: list[str], env: dict | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO / "jobs" / "pseudo_label.py"), *args],
                            cwd=REPO, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def read_all(out_dir: Path) -> dict[str, pd.DataFrame]:
    return {p.name: pq.read_table(p).to_pandas() for p in sorted(out_dir.glob("*.parquet"))}


def test_assembler_writes_a_shard_only_when_complete_in_tar_order(tmp_path: Path) -> None:
    done = []
    asm = ShardAssembler(tmp_path, {"/d/a.tar": "a.parquet", "/d/b.tar": "b.parquet"},
                         {"format": 1, "teacher_sha256": "x", "k": 3},
                         lambda s, rows, bad: done.append((s, rows, bad)))
    kinds = np.array([KIND_OK] * 5 + [KIND_BAD])
    # Rows arrive out of order and the end row before the last rows, as Ray Data may deliver.
    asm.add(fake_label_batch("/d/a.tar", np.array([3, 4, 5]), kinds[3:]))
    asm.add(fake_label_batch("/d/a.tar", np.array([0]), np.array([KIND_END]), n=6))
    assert not (tmp_path / "a.parquet").exists()
    asm.add(fake_label_batch("/d/b.tar", np.array([0]), np.array([KIND_END]), n=0))
    asm.add(fake_label_batch("/d/a.tar", np.array([2, 0, 1]), kinds[[2, 0, 1]]))
    assert done == [("/d/b.tar", 0, 0), ("/d/a.tar", 5, 1)] and not asm.in_flight
    table = pq.read_table(tmp_path / "a.parquet")
    assert table.schema.remove_metadata() == PSEUDO_SCHEMA
    assert table["key"].to_pylist() == [f"sak{i:04d}" for i in range(5)]
    assert pq.read_table(tmp_path / "b.parquet").num_rows == 0
    assert not list(tmp_path.glob(".*tmp"))


def test_progress_ends_with_one_summary_line_not_a_repeat() -> None:
    from pipeline.pseudo_label import _Meter

    lines: list[str] = []
    often = _Meter(1, lines.append, every=0.0)  # a periodic line after every batch
    often.rows(60)
    often.shard_done("/d/s-0.tar", 60, 0)
    often.rows(0)
    often.final()  # the last periodic line already says it all
    assert lines[-2:] == ["pseudo-label: s-0.tar done (60 rows); shards 1/1, 0 left",
                          lines[-1]] and lines[-1].startswith("pseudo-label: 60 rows, ")
    assert len(lines) == 3
    rarely = _Meter(1, lines.append, every=1e9)  # no periodic line: the summary comes at the end
    lines.clear()
    rarely.rows(60)
    rarely.shard_done("/d/s-0.tar", 60, 0)
    rarely.final()
    assert len(lines) == 2 and lines[1].endswith("shards 1/1 done, 0 left")


@pytest.mark.slow
def test_job_user_errors_are_one_line_and_exit_2(tmp_path: Path, digits_dir: Path) -> None:
    missing = run_job(["--run", "nope", "--round", "1", "--root", str(tmp_path)])
    _, err = missing.communicate(timeout=120)
    assert missing.returncode == 2, err
    assert err.strip().count("\n") == 0 and "python jobs/teacher.py --run nope" in err
    make_round0(tmp_path, "r", digits_dir, REPO / "pyproject.toml", sha="e" * 64)
    changed = run_job(["--run", "r", "--round", "1", "--root", str(tmp_path)])
    _, err = changed.communicate(timeout=120)
    assert changed.returncode == 2 and "sha256 mismatch" in err and "Traceback" not in err


@pytest.mark.slow
def test_job_refuses_another_selection_once_the_student_trains(tmp_path: Path, digits_dir: Path,
                                                                teacher_model: Path) -> None:
    from pipeline.manifest import save_round
    from tests.builders import new_round1

    make_round0(tmp_path, "r", digits_dir, teacher_model)
    layout = RunLayout(tmp_path, "r")
    rec = new_round1(tmp_path, "r")
    rec.set_stage("select", "complete", threshold=0.3, k_requested=None, seed=0)
    rec.set_stage("train", "running")
    manifest = save_round(layout, rec)
    before = manifest.read_bytes()
    job = run_job(["--run", "r", "--round", "1", "--root", str(tmp_path), "--threshold", "0.7"])
    _, err = job.communicate(timeout=120)
    assert job.returncode == 2, err
    assert err.strip().count("\n") == 0 and "Traceback" not in err
    assert "started training on the selection made with --threshold 0.3 --seed 0" in err
    assert manifest.read_bytes() == before and not layout.pseudo_dir(1).exists()


def test_job_decides_on_the_round_as_it_is_once_it_holds_the_lock(
        tmp_path: Path, digits_dir: Path, teacher_model: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Another process completes round 1 between this job's first read of it (none yet) and its
    taking the lock: the job used to go on from the first read and could save its new record
    over the complete one. Read again under the lock, it refuses and changes nothing."""
    import contextlib

    import pipeline.lock
    from pipeline.manifest import save_round
    from tests.builders import new_round1

    if str(REPO / "jobs") not in sys.path:  # the jobs import their neighbours by name
        sys.path.insert(0, str(REPO / "jobs"))
    import pseudo_label

    make_round0(tmp_path, "r", digits_dir, teacher_model)
    layout = RunLayout(tmp_path, "r")
    real_lock = pipeline.lock.round_lock

    @contextlib.contextmanager
    def lock_after_another_finished(layout_: RunLayout, round_: int):
        done = new_round1(tmp_path, "r")
        round0 = load_round(layout, 0)
        done.model, done.checkpoint = round0.model, round0.checkpoint
        done.mark_complete()
        save_round(layout, done)  # the other process, just before this one gets the lock
        with real_lock(layout_, round_) as path:
            yield path

    monkeypatch.setattr(pipeline.lock, "round_lock", lock_after_another_finished)
    manifest = layout.manifest_path(1)
    assert pseudo_label.main(["--run", "r", "--round", "1", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "round 1 of run 'r' is complete" in err
    assert load_round(layout, 1).status == "complete" and manifest.exists()
    assert not layout.pseudo_dir(1).exists()


@pytest.fixture(scope="module")
def damaged_dir(tmp_path_factory: pytest.TempPathFactory, digits_dir: Path) -> Path:
    """A copy of digits where one image does not decode and one shard is cut in half."""
    out = tmp_path_factory.mktemp("damaged")
    shutil.copytree(digits_dir, out, dirs_exist_ok=True)
    shards = load_dataset(out).split("unlabeled").shards
    samples = list(read_samples([shards[0]]))
    Path(shards[0]).unlink()
    with ShardWriter(Path(shards[0]).parent, prefix="tmp") as w:
        for s in samples:
            w.write(s.key, b"garbage" if s.key == samples[7].key else s.image)
    os.replace(w.paths[0], shards[0])
    data = Path(shards[1]).read_bytes()
    Path(shards[1]).write_bytes(data[: len(data) // 2 + 700])
    return out


@pytest.mark.slow
def test_corrupt_image_and_truncated_shard_are_skipped_and_counted(
        ray_address: str, tmp_path: Path, damaged_dir: Path, teacher_model: Path,
        digits_dir: Path) -> None:
    shards = load_dataset(damaged_dir).split("unlabeled").shards
    result = label_shards(teacher_model, sha256_file(teacher_model), shards, tmp_path,
                          PseudoLabelConfig(label_batch_size=64), progress=lambda _: None)
    bad = result["bad_samples"]
    assert bad["count"] == 2
    reasons = {Path(b["shard"]).name: b for b in bad["examples"]}
    corrupt = reasons[Path(shards[0]).name]
    assert corrupt["key"] == list(read_samples([shards[0]]))[7].key
    assert "cannot decode" in corrupt["reason"]
    assert "damaged shard" in reasons[Path(shards[1]).name]["reason"]
    cut = pq.read_table(tmp_path / (Path(shards[1]).stem + ".parquet")).num_rows
    original = load_dataset(digits_dir).split("unlabeled")
    full_cut = sum(1 for _ in read_samples([original.shards[1]]))
    assert 0 < cut < full_cut
    # Every image is accounted for: labeled, the one corrupt image, or lost with the cut tail.
    assert result["rows"] == original.count - 1 - (full_cut - cut)
    assert sum(f["rows"] for f in result["files"]) == result["rows"]


@pytest.fixture(scope="module")
def small_shards_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Digits in shards of 10, so that a kill lands between the first and the last file."""
    out = tmp_path_factory.mktemp("small")
    prepare_digits(out, shard_size=10)
    return out


@pytest.mark.slow
def test_two_actors_give_the_same_files_as_one(ray_address: str, tmp_path: Path,
                                               small_shards_dir: Path,
                                               teacher_model: Path) -> None:
    # Two actors take batches in whatever order they finish, interleaving rows of many shards:
    # the files must still be whole, in tar order, and bit for bit those of a single actor.
    shards = load_dataset(small_shards_dir).split("unlabeled").shards
    sha = sha256_file(teacher_model)
    results = {}
    for actors in (1, 2):
        cfg = PseudoLabelConfig(label_batch_size=32, label_actors=actors, cpus_per_actor=0.5)
        results[actors] = label_shards(teacher_model, sha, shards, tmp_path / str(actors), cfg,
                                       progress=lambda _: None)
    one, two = read_all(tmp_path / "1"), read_all(tmp_path / "2")
    assert len(one) == len(shards) and sorted(one) == sorted(two)
    for name, df in one.items():
        pd.testing.assert_frame_equal(two[name], df)
    assert results[1]["files"] == results[2]["files"]  # same names, rows and sha256


@pytest.mark.slow
def test_kill_9_then_rerun_equals_uninterrupted_run(ray_address: str, tmp_path: Path,
                                                    small_shards_dir: Path,
                                                    teacher_model: Path) -> None:
    for run in ("killed", "whole"):
        make_round0(tmp_path, run, small_shards_dir, teacher_model)
    env = {"RAY_ADDRESS": ray_address}
    args = ["--round", "1", "--root", str(tmp_path), "--label-batch-size", "16"]
    out = RunLayout(tmp_path, "killed").pseudo_dir(1)
    total = len(load_dataset(small_shards_dir).split("unlabeled").shards)
    job = run_job(["--run", "killed", *args], env=env)
    deadline = time.monotonic() + 150
    while job.poll() is None and time.monotonic() < deadline:
        if len(list(out.glob("*.parquet"))) >= 1:
            job.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    job.wait(timeout=30)
    done_at_kill = len(list(out.glob("*.parquet")))
    assert job.returncode == -signal.SIGKILL, job.stderr.read()
    assert 1 <= done_at_kill < total
    for path in out.glob("*.parquet"):  # a file with its final name is always whole
        assert pq.read_table(path).num_rows > 0

    rerun = run_job(["--run", "killed", *args], env=env)
    stdout, stderr = rerun.communicate(timeout=240)
    assert rerun.returncode == 0, stderr
    assert f"{done_at_kill} of {total} shards already done" in stdout

    whole = run_job(["--run", "whole", *args], env=env)
    _, stderr = whole.communicate(timeout=240)
    assert whole.returncode == 0, stderr
    killed = read_all(out)
    uninterrupted = read_all(RunLayout(tmp_path, "whole").pseudo_dir(1))
    assert sorted(killed) == sorted(uninterrupted) and len(killed) == total
    for name, df in uninterrupted.items():
        pd.testing.assert_frame_equal(killed[name], df)
    rec = load_round(RunLayout(tmp_path, "killed"), 1)
    assert rec.pseudo_labels.files == load_round(RunLayout(tmp_path, "whole"), 1).pseudo_labels.files
    assert rec.teacher.checkpoint_sha256 == sha256_file(teacher_model)
    assert [e["stage"] for e in rec.events if e["event"] == "resume"] == ["pseudo_label"]

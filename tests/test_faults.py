"""Faults a round survives: the driver killed in each stage of a student round, and a full disk.

The driver-kill test runs jobs/student.py as a subprocess in its own process group against the
module's shared local Ray (RAY_ADDRESS), SIGKILLs the group once the round's manifest (or Ray
Train's checkpoint record) shows the target stage running, and runs the same command again: five
kills, one per stage, and a Ctrl-C while training, then a run that completes. Select, the
fine-tune and the final evaluation are too short to hit reliably from outside, and training's
workers outlive a killed driver by a moment, so those kills wait at the test-only pause
``NOISY_STUDENT_TEST_PAUSE=<stage>`` (pipeline/pause.py).

The full-disk tests write on a small tmpfs (``mount -t tmpfs``; they need root, as CI has, and
fail rather than skip without it).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.layout import RunLayout
from pipeline.manifest import load_round, save_round
from pipeline.pause import ENV as PAUSE
from pipeline.storage import sha256_file
from tests import builders

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
RUN = "f"
UNLABELED_SHARDS = 8
TEST_SAMPLES = 200


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Digits in shards of 50, registered in part: 180 labeled, 400 unlabeled (8 shards), 200
    test, so that every stage is short."""
    from pipeline.dataset import prepare_digits, register_shards

    base = tmp_path_factory.mktemp("faults-data")
    prepare_digits(base / "digits", shard_size=50)
    d = base / "digits"
    unlabeled, test = (sorted((d / split).glob("*/*.tar")) for split in ("unlabeled", "test"))
    register_shards(base / "small", labeled=str(d / "labeled" / "*" / "*.tar"),
                    unlabeled=[str(p) for p in unlabeled[:8]],
                    test=[str(p) for p in test[:4]])
    return base / "small"


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory: pytest.TempPathFactory, small_data: Path) -> Path:
    from tests.builders import make_teacher

    path = tmp_path_factory.mktemp("faults-teacher") / "model.pt"
    make_teacher(path, small_data)
    return path


def make_teacher_round(root: Path, data: Path, model: Path) -> None:
    """A complete round 0 (built, not trained), with the test top-1 the student job prints."""
    from tests.builders import make_round0

    rec = make_round0(root, RUN, data, model)
    rec.metrics.top1 = 0.5
    save_round(RunLayout(root, RUN), rec)


def job_env(ray_address: str, pause: str | None = None) -> dict[str, str]:
    """The job joins the module's Ray. ``pause`` sets the test-only pause (pipeline/pause.py)
    for the driver and, through the job's runtime environment (the variable `ray job submit`
    hands its drivers), for the job's Ray workers, which do not inherit the driver's variables."""
    env = {k: v for k, v in builders.job_env(ray_address).items() if k != PAUSE}
    if pause is not None:
        env[PAUSE] = pause
        env["RAY_JOB_CONFIG_JSON_ENV_VAR"] = json.dumps(
            {"runtime_env": {"env_vars": {PAUSE: pause}}})
    return env


# ----------------------------------------------------------------------------- driver killed

# Tiny: 2 epochs over the 180 labeled images, FixRes for 1, no RandAugment, the smallest model;
# a checkpoint every epoch so that there is one to resume from; small label batches so that
# labeling takes long enough to be killed in the middle.
STUDENT = ["--preset", "demo", "--model", "efficientnet_t0", "--epochs", "2",
           "--finetune-epochs", "1", "--eval-every", "10", "--checkpoint-every", "1",
           "--loader-workers", "0", "--student-epoch", "labeled", "--no-randaugment",
           "--threshold", "0", "--label-batch-size", "16"]


class Job:
    """One run of jobs/student.py in its own process group, its output in a file."""

    def __init__(self, root: Path, env: dict[str, str], log: Path) -> None:
        self.log = log
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                [PY, str(ROOT / "jobs" / "student.py"), "--run", RUN, "--round", "1", "--root",
                 str(root), *STUDENT], stdout=out, stderr=subprocess.STDOUT, env=env,
                cwd=ROOT, start_new_session=True)

    def output(self) -> str:
        return self.log.read_text()

    def wait_for(self, ready: Callable[[], bool], what: str, timeout: float = 300) -> None:
        """Return once ``ready()``; fail if the job ends first or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while not ready():
            assert self.proc.poll() is None, \
                f"the job ended before {what}:\n{self.output()[-3000:]}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.05)

    def kill_when(self, ready: Callable[[], bool], what: str, timeout: float = 300) -> None:
        """SIGKILL the whole group as soon as ``ready()``; fail if the job ends first."""
        try:
            self.wait_for(ready, what, timeout)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=60)

    def finish(self, timeout: float = 400) -> str:
        try:
            self.proc.wait(timeout=timeout)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        assert self.proc.returncode == 0, self.output()[-3000:]
        return self.output()


def manifest(root: Path) -> dict:
    try:
        return json.loads(RunLayout(root, RUN).manifest_path(1).read_text())
    except (FileNotFoundError, ValueError):
        return {}


def stage_status(root: Path, stage: str) -> str | None:
    return manifest(root).get("stages", {}).get(stage, {}).get("status")


def registered(root: Path) -> dict:
    """The latest checkpoint Ray Train has recorded (the one a restart resumes from): its folder
    and the metrics reported with it ({} before the first)."""
    snap = RunLayout(root, RUN).artifact_dir(1) / "train" / "checkpoint_manager_snapshot.json"
    try:
        latest = json.loads(snap.read_text()).get("latest_checkpoint_result") or {}
    except (OSError, ValueError):
        return {}
    return {"dir": snap.parent / latest["checkpoint_dir_name"], **latest["metrics"]} \
        if latest else {}


def file_states(folder: Path) -> dict[str, tuple[int, str]]:
    """name -> (mtime in ns, sha256) of the finished pseudo-label files."""
    return {p.name: (p.stat().st_mtime_ns, sha256_file(p))
            for p in sorted(folder.glob("*.parquet"))}


@pytest.mark.slow
def test_driver_killed_in_each_stage_resumes_there(ray_address: str, tmp_path: Path,
                                                   small_data: Path, teacher_file: Path) -> None:
    from pipeline.checkpoint import read_state

    root = tmp_path / "root"
    make_teacher_round(root, small_data, teacher_file)
    layout = RunLayout(root, RUN)
    pseudo = layout.pseudo_dir(1)
    env = job_env(ray_address)
    started = time.monotonic()

    # 1. pseudo_label: killed once some shards have their file
    job = Job(root, env, tmp_path / "1.log")
    job.kill_when(lambda: stage_status(root, "pseudo_label") == "running"
                  and any(pseudo.glob("*.parquet")), "pseudo_label wrote a file")
    labeled_before = file_states(pseudo)
    assert 1 <= len(labeled_before) < UNLABELED_SHARDS, "killed too late to leave work undone"
    assert manifest(root)["status"] == "running"

    # 2. select: the rerun labels only the rest, then stops inside select (test pause) after
    # rewriting its first file
    job = Job(root, job_env(ray_address, pause="select"), tmp_path / "2.log")
    job.kill_when(lambda: stage_status(root, "select") == "running"
                  and "select: paused" in job.output(), "select started")
    assert (f"{len(labeled_before)} of {UNLABELED_SHARDS} shards already done"
            in job.output())
    m = manifest(root)
    label_info = m["stages"]["pseudo_label"]
    assert label_info["status"] == "complete" and label_info["files"] == UNLABELED_SHARDS
    at_select = file_states(pseudo)
    first = min(at_select)  # select rewrote this one before the pause
    for name, state in labeled_before.items():  # not labeled again
        if name != first:
            assert at_select[name] == state, name
    assert at_select[first] != labeled_before.get(first)

    # 3. train: killed once Ray Train has recorded the first epoch's checkpoint (paused there:
    # Ray ends a killed driver's workers a moment later, and under load they recorded the
    # second epoch's first)
    job = Job(root, job_env(ray_address, pause="train"), tmp_path / "3.log")
    job.kill_when(lambda: registered(root).get("phase") == "train"
                  and registered(root).get("epoch") == 1 and "train: paused" in job.output(),
                  "the first epoch's checkpoint")
    m = manifest(root)
    assert m["stages"]["pseudo_label"] == label_info
    select_info, pseudo_labels = m["stages"]["select"], m["pseudo_labels"]
    assert select_info["status"] == "complete" and m["stages"]["train"]["status"] == "running"
    selected = file_states(pseudo)
    assert selected[first] == at_select[first]  # already selected with this plan: kept
    epoch1 = read_state(registered(root)["dir"])["history"]

    # 3b. Ctrl-C in train, once the second epoch's checkpoint is recorded (paused there). Ray
    # Train handles SIGINT itself while it trains (it aborts the run and ends the driver with
    # sys.exit: the job exited 1 without a word and recorded the round's error as "1"); it is
    # a Ctrl-C like any other: one line, exit 130, and the rerun continues.
    job = Job(root, job_env(ray_address, pause="train"), tmp_path / "3b.log")
    try:
        job.wait_for(lambda: registered(root).get("epoch") == 2
                     and "train: paused" in job.output(), "the second epoch's checkpoint")
        os.kill(job.proc.pid, signal.SIGINT)  # the driver, as a terminal's Ctrl-C reaches it
        job.proc.wait(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.proc.pid, signal.SIGKILL)
    out = job.output()
    assert job.proc.returncode == 130, out[-3000:]
    assert out.strip().splitlines()[-1] == (
        "student: interrupted; run the same command again to continue")
    m = manifest(root)
    assert m["status"] == "failed" and m["error"] == "KeyboardInterrupt"

    # 4. finetune: killed in the fine-tune (paused as it starts, so that Ray Train records
    # training's last checkpoint before the fine-tune's)
    job = Job(root, job_env(ray_address, pause="finetune"), tmp_path / "4.log")
    job.kill_when(lambda: registered(root).get("epoch") == 2
                  and "finetune: paused" in job.output(), "the fine-tune started")
    trained = read_state(registered(root)["dir"])
    assert trained["phase"] == "finetune" and trained["history"][:1] == epoch1

    # 5. evaluate: killed in the final evaluation (paused likewise)
    job = Job(root, job_env(ray_address, pause="evaluate"), tmp_path / "5.log")
    job.kill_when(lambda: registered(root).get("phase") == "finetune"
                  and "evaluate: paused" in job.output(), "the final evaluation started")
    tuned = read_state(registered(root)["dir"])
    assert tuned["phase"] == "evaluate"

    # 6. the last rerun completes
    Job(root, env, tmp_path / "6.log").finish()
    elapsed = time.monotonic() - started
    m = manifest(root)
    assert m["status"] == "complete" and m["round"] == 1
    assert list(m["stages"]) == ["preflight", "pseudo_label", "select", "train", "finetune",
                                 "evaluate"]
    assert all(s["status"] == "complete" for s in m["stages"].values())
    # each rerun resumed where the previous run was killed, and recorded it
    resumes = [(e["event"], e.get("stage")) for e in m["events"]]
    assert resumes == [("start", None),
                       ("restart", None), ("resume", "pseudo_label"),
                       ("restart", None), ("resume", "select"),
                       ("restart", None), ("resume", "train"),
                       ("restart", None), ("resume", "train"),
                       ("restart", None), ("resume", "train"),
                       ("restart", None), ("resume", "train")]
    # the resumptions the final weights went through (kept in the checkpoints): 4 resumed
    # from 3b's last checkpoint and was killed before it wrote one, 5 from the same one
    assert [(r["phase"], r["epoch"]) for r in m["resumed_from"]] == [
        ("train", 1), ("finetune", 2), ("evaluate", 2)]
    # nothing complete was done again
    assert m["stages"]["pseudo_label"] == label_info
    assert m["stages"]["select"] == select_info and m["pseudo_labels"] == pseudo_labels
    assert file_states(pseudo) == selected
    assert m["history"] == trained["history"] and [h["epoch"] for h in m["history"]] == [1, 2]
    ft = {k: v for k, v in m["stages"]["finetune"].items() if k not in ("status", "seconds")}
    assert ft == tuned["finetune"]
    # and the record matches the files
    assert {f["name"]: f["sha256"] for f in m["pseudo_labels"]["files"]} == {
        name: sha for name, (_, sha) in selected.items()}
    assert sha256_file(root / m["checkpoint"]["uri"]) == m["checkpoint"]["sha256"]
    preds = pq.read_table(root / m["stages"]["evaluate"]["predictions"]).to_pandas()
    assert len(preds) == TEST_SAMPLES == m["metrics"]["n"] and preds.key.is_unique
    assert not list(layout.manifest_dir.glob("*.lock"))
    print(f"driver-kill chain: {elapsed:.0f} s for 7 runs")


# ----------------------------------------------------------------------------- full disk


@contextlib.contextmanager
def small_disk(where: Path, size_kib: int) -> Iterator[Path]:
    """A tmpfs of ``size_kib`` KiB at ``where``, unmounted afterwards."""
    where.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs",
                              str(where)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.fail(f"cannot mount a {size_kib} KiB tmpfs at {where} "
                    f"({mounted.stderr.strip()}): the full-disk tests need root and mount(8), "
                    "as in CI")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True, capture_output=True)


def fill(disk: Path, leave: int) -> Path:
    """A file that leaves about ``leave`` bytes free on ``disk`` (tmpfs counts whole pages)."""
    filler = disk / "filler"
    filler.unlink(missing_ok=True)
    st = os.statvfs(disk)
    size = max(0, st.f_bavail * st.f_frsize - leave)
    with open(filler, "wb") as f, contextlib.suppress(OSError):  # full: as intended
        f.write(b"\0" * size)
    return filler


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "filler"}


def test_full_disk_leaves_finished_files_whole_and_the_next_write_works(
        tmp_path: Path, teacher_file: Path, small_data: Path) -> None:
    """The writes later stages trust (manifest, model file, pseudo-label Parquet, the round's
    lock) on a full tmpfs: each fails with ENOSPC, the file it replaces is intact, no temporary
    or empty file is left; once space is freed the same writes succeed."""
    import errno

    import pyarrow as pa

    from pipeline.checkpoint import read_model_file, save_model_file
    from pipeline.lock import round_lock
    from pipeline.pseudo_files import PSEUDO_SCHEMA, file_meta, write_table

    with small_disk(tmp_path / "disk", 4096) as disk:
        make_teacher_round(disk, small_data, teacher_file)
        layout = RunLayout(disk, RUN)
        rec = load_round(layout, 0)
        payload = read_model_file(teacher_file)
        weights = payload.pop("state_dict")
        model = layout.model_path(0)
        table = pa.Table.from_pylist([{"key": "k", "shard": "s", "label": 1, "confidence": 0.5,
                                       "entropy": 0.1, "topk_index": [1], "topk_prob": [0.5],
                                       "copies": 0}], schema=PSEUDO_SCHEMA)
        parquet = layout.pseudo_dir(1) / "unlabeled-000000.parquet"
        write_table(parquet, table, {"format": 1, "note": "before"})
        before = snapshot(disk)

        filler = fill(disk, 0)
        rec.metrics.top1 = 0.9
        writes = {
            "manifest": lambda: save_round(layout, rec),
            "model file": lambda: save_model_file(
                model, weights, model_name=payload["model_name"], classes=payload["classes"],
                train_resolution=32, test_resolution=32, extra={"note": "after"}),
            "pseudo-label file": lambda: write_table(parquet, table, {"format": 1,
                                                                      "note": "after"}),
            "lock": lambda: round_lock(layout, 1).__enter__(),
        }
        for what, write in writes.items():
            with pytest.raises(OSError) as e:
                write()
            assert e.value.errno == errno.ENOSPC, what
            assert snapshot(disk) == before, f"{what}: a failed write changed or left a file"

        filler.unlink()
        save_round(layout, rec)
        assert load_round(layout, 0).metrics.top1 == 0.9
        save_model_file(model, weights, model_name=payload["model_name"],
                        classes=payload["classes"], train_resolution=32, test_resolution=32,
                        extra={"note": "after"})
        assert read_model_file(model)["extra"] == {"note": "after"}
        write_table(parquet, table, {"format": 1, "note": "after"})
        assert file_meta(parquet)["note"] == "after"
        with round_lock(layout, 1) as lock:
            assert json.loads(lock.read_text())["pid"] == os.getpid()


def pseudo_job(root: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, str(ROOT / "jobs" / "pseudo_label.py"), "--run", RUN, "--round",
                           "1", "--root", str(root), "--label-batch-size", "16",
                           "--threshold", "0"], capture_output=True, text=True, timeout=300,
                          env=env, cwd=ROOT)


def one_error_line(p: subprocess.CompletedProcess[str]) -> str:
    assert p.returncode == 2, p.stderr[-3000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    lines = [ln for ln in p.stderr.splitlines() if "error:" in ln]
    assert len(lines) == 1, p.stderr[-3000:]
    return lines[0]


@pytest.mark.slow
def test_disk_full_while_labeling_then_freed_continues(ray_address: str, tmp_path: Path,
                                                       small_data: Path,
                                                       teacher_file: Path) -> None:
    """jobs/pseudo_label.py with --root on a small tmpfs: full from the start (the lock is the
    first write), then full part-way through the Parquet files; each time one line and exit 2,
    round 0 untouched, every finished file whole; freed, the rerun labels only what is left."""
    env = job_env(ray_address)
    with small_disk(tmp_path / "disk", 2048) as disk:
        make_teacher_round(disk, small_data, teacher_file)
        layout = RunLayout(disk, RUN)
        round0 = {p: p.read_bytes() for p in (layout.manifest_path(0), layout.model_path(0))}

        fill(disk, 0)
        line = one_error_line(pseudo_job(disk, env))
        assert "pseudo_label: error: no space left on device" in line
        assert "run the same command again" in line
        assert not list(layout.manifest_dir.glob("*.lock"))  # an empty lock would block reruns

        # room for the lock, the record (and its temporary copy while it is saved) and about
        # three of the eight files (about 6 KB each: 2 pages of 4 KiB)
        filler = fill(disk, (4 + 3 * 2) * 4096)
        line = one_error_line(pseudo_job(disk, env))
        assert "no space left on device" in line
        done = file_states(layout.pseudo_dir(1))
        assert 1 <= len(done) < UNLABELED_SHARDS, line
        for name in done:  # a file with its final name is whole
            assert pq.read_table(layout.pseudo_dir(1) / name).num_rows > 0
        rec = load_round(layout, 1)  # the record is readable and does not claim the stage
        assert rec is not None and not rec.stage_complete("pseudo_label")
        assert not list(layout.manifest_dir.glob("*.lock"))
        assert all(p.read_bytes() == b for p, b in round0.items())

        filler.unlink()
        p = pseudo_job(disk, env)
        assert p.returncode == 0, p.stderr[-3000:]
        assert f"{len(done)} of {UNLABELED_SHARDS} shards already done" in p.stdout + p.stderr
        rec = load_round(layout, 1)
        assert rec.stage_complete("pseudo_label") and rec.stage_complete("select")
        assert [e["stage"] for e in rec.events if e["event"] == "resume"] == ["pseudo_label"]
        files = {f.name: f.sha256 for f in rec.pseudo_labels.files}
        assert len(files) == UNLABELED_SHARDS
        assert all(sha256_file(layout.pseudo_dir(1) / n) == sha for n, sha in files.items())
        assert all(p.read_bytes() == b for p, b in round0.items())


def test_disk_full_while_preparing_then_freed_continues(tmp_path: Path) -> None:
    """jobs/prepare.py imagefolder into a dataset folder on a small tmpfs that already holds
    the split: full part-way, one line and exit 2, the dataset.json it had and every shard it
    lists unchanged, no temporary file left; freed, the same command goes on after the shards
    it finished and ends with what a run with room writes."""
    import numpy as np
    from PIL import Image

    from pipeline.dataset import load_dataset

    rng = np.random.default_rng(5)
    src = tmp_path / "src"
    for i in range(24):
        path = src / ("a", "b")[i % 2] / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), np.uint8)).save(path)  # ~7 KB

    def prepare(out: Path, source: Path = src) -> subprocess.CompletedProcess[str]:
        return subprocess.run([PY, str(ROOT / "jobs" / "prepare.py"), "imagefolder",
                               str(source), "--out", str(out), "--shard-size", "4",
                               "--workers", "1"], capture_output=True, text=True, timeout=120)

    old = tmp_path / "old"
    for i in range(4):
        cls = ("a", "b")[i % 2]
        (old / cls).mkdir(parents=True, exist_ok=True)
        (old / cls / f"{i}.png").write_bytes((src / cls / f"{i}.png").read_bytes())
    with small_disk(tmp_path / "disk", 1024) as disk:
        out = disk / "ds"
        assert prepare(out, old).returncode == 0
        before = snapshot(out)
        filler = fill(disk, 24 * 4096)  # room for two or three of the six new shards
        line = one_error_line(prepare(out))
        assert "prepare: error: no space left on device" in line and "--out" in line
        assert "run the same command again" in line
        now = snapshot(out)
        assert {k: now[k] for k in before} == before  # the old split, whole
        new = sorted(k for k in now if k not in before)
        assert any(k.endswith(".progress.json") for k in new)
        assert not any(k.endswith(".tmp") for k in new), new
        finished = [k for k in new if k.endswith(".tar")]
        assert 1 <= len(finished) < 6, new
        filler.unlink()
        p = prepare(out)
        assert p.returncode == 0, p.stderr[-3000:]
        assert f"{len(finished)} shards of an interrupted run of this prepare are complete" in (
            p.stderr)
    room = prepare(tmp_path / "room")
    assert room.returncode == 0
    # (the tmpfs is gone: compare what the rerun printed and wrote before it was unmounted)
    assert "labeled: 24 images in 6 shards" in p.stderr and "labeled: 24 images in 6 shards" in (
        room.stderr)
    assert load_dataset(tmp_path / "room").splits["labeled"].count == 24


@pytest.mark.slow
def test_disk_full_while_training_then_freed_continues(ray_address: str, tmp_path: Path,
                                                       small_data: Path) -> None:
    """jobs/teacher.py with --root on a small tmpfs that has room for the round's lock and
    manifest but not for a training checkpoint: the worker's ENOSPC reaches the user as the
    one free-space line (not a Ray traceback), the record stays whole; freed, the same command
    trains the round to the end."""
    args = [PY, str(ROOT / "jobs" / "teacher.py"), "--run", RUN, "--data", str(small_data),
            "--preset", "demo", "--epochs", "2", "--eval-every", "2", "--checkpoint-every", "1",
            "--loader-workers", "0", "--no-tensorboard"]
    env = job_env(ray_address)
    with small_disk(tmp_path / "disk", 16 * 1024) as disk:
        # room for the lock and the records, not for a checkpoint (model, EMA and optimizer
        # state: about 800 pages of 4 KiB)
        filler = fill(disk, 64 * 4096)
        p = subprocess.run([*args, "--root", str(disk)], capture_output=True, text=True,
                           timeout=300, env=env, cwd=ROOT)
        assert p.returncode == 2, p.stderr[-3000:]
        # Ray forwards the worker's own traceback (lines prefixed with its process); the job's
        # own output has none, and its error is one line
        ours = [ln for ln in p.stderr.splitlines() if not ln.lstrip().startswith("\x1b[")
                and not ln.lstrip().startswith("(")]
        assert not [ln for ln in ours if "Traceback" in ln], p.stderr[-3000:]
        (line,) = [ln for ln in ours if ln.startswith("teacher: error:")]
        # the worker's error, or the driver's own when the failed record no longer fits
        # (Ray's partly copied checkpoint takes the last pages)
        assert "no space left on device" in line and "run the same command again" in line, line
        layout = RunLayout(disk, RUN)
        rec = load_round(layout, 0)  # whole, and not claiming what did not finish
        assert rec.status in ("running", "failed") and not rec.stage_complete("train")
        assert not list(layout.manifest_dir.glob("*.lock"))

        filler.unlink()
        p = subprocess.run([*args, "--root", str(disk)], capture_output=True, text=True,
                           timeout=300, env=env, cwd=ROOT)
        assert p.returncode == 0, p.stderr[-3000:]
        rec = load_round(layout, 0)
        assert rec.status == "complete" and [h["epoch"] for h in rec.history] == [1, 2]
        assert sha256_file(layout.model_path(0)) == rec.checkpoint.sha256
        assert not layout.tensorboard_dir(0).exists()  # --no-tensorboard: no event files

"""The whole loop with data and run root on a real local S3 server (moto, tests/s3server.py):
prepare to s3://, a teacher and a round-1 student with --root s3://, the report; a kill -9 during
pseudo-labeling, then the student round that resumes it, gives the rows of an uninterrupted run;
unusable buckets, refused credentials and missing objects end a job with one line and exit
code 2. The jobs join the module's Ray (the `ray_address` fixture), as on a cluster."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.fs import S3Path, read_table
from pipeline.layout import RunLayout
from pipeline.storage import sha256_file
from tests.builders import job_env

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
QUICK = ["--preset", "demo", "--loader-workers", "0", "--eval-every", "10"]
BUCKET = "ns-e2e"
DATA = f"s3://{BUCKET}/data"
RUN_ROOT = f"s3://{BUCKET}/runs"


@pytest.fixture(scope="module")
def ray_env(s3, ray_address: str) -> dict[str, str]:
    """Jobs join the module's Ray, started after the S3 server so that its workers see the
    server's variables the way a user's cluster is given its credentials."""
    return job_env(ray_address)


def _job(script: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "jobs" / script), *args],
                          capture_output=True, text=True, timeout=900, env=env)


@pytest.fixture(scope="module")
def s3_teacher(s3, ray_env: dict[str, str]) -> RunLayout:
    """Digits in 18 unlabeled shards on S3 and a 1-epoch teacher whose run root is on S3."""
    from pipeline.dataset import prepare_digits

    s3.make_bucket(BUCKET)
    prepare_digits(DATA, shard_size=60)
    p = _job("teacher.py", "--run", "t", "--data", DATA, "--root", RUN_ROOT, *QUICK,
             "--epochs", "1", env=ray_env)
    assert p.returncode == 0, p.stderr[-3000:]
    return RunLayout(RUN_ROOT, "t")


def _rows(paths: list) -> list[tuple]:
    out = []
    for path in paths:
        t = read_table(path, columns=["key", "label", "confidence", "topk_index", "topk_prob"])
        out.extend(zip(*(t.column(c).to_pylist() for c in t.column_names), strict=True))
    return out


def test_kill_during_pseudo_labeling_then_the_student_round_resumes_it(
        s3_teacher: RunLayout, ray_env: dict[str, str], tmp_path: Path) -> None:
    """kill -9 of jobs/pseudo_label.py after its first file; then jobs/student.py resumes the
    labeling (the rows equal an uninterrupted labeling of the same shards), trains with Ray
    Train's checkpoints in the bucket, and the report is written there too."""
    layout = s3_teacher
    pseudo = layout.pseudo_dir(1)
    cmd = [sys.executable, str(ROOT / "jobs" / "pseudo_label.py"), "--run", "t", "--round", "1",
           "--root", RUN_ROOT, "--threshold", "0", "--label-batch-size", "16"]
    proc = subprocess.Popen(cmd, env=ray_env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    done_at_kill = 0
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            done_at_kill = len(list(pseudo.glob("*.parquet")))
            if done_at_kill >= 1:
                break
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert 1 <= done_at_kill < 18, f"killed with {done_at_kill} of 18 files written"
    rec = json.loads(layout.manifest_path(1).read_text())
    assert rec["stages"]["pseudo_label"]["status"] == "running"

    # The rerun is the whole student round, with the labeling settings of the killed job.
    p = _job("student.py", "--run", "t", "--round", "1", "--root", RUN_ROOT, *QUICK,
             "--epochs", "1", "--finetune-epochs", "1", "--threshold", "0",
             "--label-batch-size", "16", env=ray_env)
    assert p.returncode == 0, p.stderr[-3000:]
    done = re.search(r"pseudo-label: (\d+) of 18 shards already done", p.stdout + p.stderr)
    assert done and done_at_kill <= int(done[1]) < 18, (p.stdout + p.stderr)[-3000:]
    rec = json.loads(layout.manifest_path(1).read_text())
    stage = rec["stages"]["pseudo_label"]
    assert stage["status"] == "complete" and stage["rows"] == 1077
    assert any(e["event"] == "resume" and e.get("stage") == "pseudo_label"
               for e in rec["events"])
    files = rec["pseudo_labels"]["files"]
    assert len(files) == 18
    for f in files:  # what the record says is what the bucket holds
        assert sha256_file(pseudo / f["name"]) == f["sha256"]

    # The same teacher over the same shards in one uninterrupted call, into a local folder.
    from pipeline.config import PseudoLabelConfig
    from pipeline.dataset import load_dataset
    from pipeline.manifest import load_round
    from pipeline.pseudo_label import label_shards
    from pipeline.runner import ray_session

    teacher = load_round(layout, 0)
    info = load_dataset(DATA)
    with ray_session(num_cpus=2):
        label_shards(layout.resolve(teacher.checkpoint.uri), teacher.checkpoint.sha256,
                     info.split("unlabeled").shards, tmp_path,
                     PseudoLabelConfig(label_batch_size=16))
    names = sorted(f["name"] for f in files)
    assert _rows([pseudo / n for n in names]) == _rows([tmp_path / n for n in names])

    # The student's own files, in the bucket
    assert rec["status"] == "complete"
    assert all(st["status"] == "complete" for st in rec["stages"].values())
    model = layout.resolve(rec["checkpoint"]["uri"])
    assert isinstance(model, S3Path) and sha256_file(model) == rec["checkpoint"]["sha256"]
    assert rec["checkpoint"]["uri"] == "artifacts/t/round-1/model.pt"  # relative to the root
    assert layout.test_predictions(1).exists()
    # Ray Train's run state and checkpoints live in the bucket too
    assert list((layout.artifact_dir(1) / "train").glob("checkpoint_*/state.pt"))
    assert list(layout.tensorboard_dir(1).glob("events.out.tfevents.*"))

    p = _job("report.py", "--run", "t", "--root", RUN_ROOT, env=ray_env)
    assert p.returncode == 0, p.stderr[-3000:]
    report = layout.report_dir / "report.md"
    assert "round 1" in report.read_text().lower()
    pngs = list(layout.report_dir.glob("*.png"))
    assert pngs and all(x.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for x in pngs)


def test_job_errors_on_s3_are_one_line_exit_2(s3_teacher: RunLayout,
                                              ray_env: dict[str, str]) -> None:
    cases = [
        (("teacher.py", "--run", "x", "--data", DATA, "--root", "s3://no-such-bucket/r",
          *QUICK), {}, "bucket 'no-such-bucket' does not exist"),
        (("teacher.py", "--run", "x", "--data", DATA, "--root", RUN_ROOT, *QUICK),
         {"AWS_SECRET_ACCESS_KEY": "wrong"}, "access denied"),
        (("teacher.py", "--run", "x", "--data", f"s3://{BUCKET}/missing", "--root", RUN_ROOT,
          *QUICK), {}, "has no dataset.json"),
        (("report.py", "--run", "nope", "--root", RUN_ROOT), {}, "nope"),
    ]
    for args, env, message in cases:
        p = _job(*args, env={**ray_env, **env})
        assert p.returncode == 2, (args, p.stderr[-2000:])
        assert message in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert not RunLayout(RUN_ROOT, "x").manifest_dir.exists()

"""jobs/teacher.py end to end: Ray Train with 2 CPU workers, kill -9 and resume, `ray job submit`
against a real local cluster, and every bad input the issue lists (one line, nothing written)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pipeline.dataset import prepare_digits
from pipeline.layout import RunLayout
from pipeline.shards import write_shards
from pipeline.storage import sha256_file
from tests.builders import job_env

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
# Small and quick: few epochs, evaluation only at the end.
FAST = ["--preset", "demo", "--epochs", "3", "--eval-every", "3", "--loader-workers", "0"]


def load_manifest(root: Path, run: str, round_: int) -> dict:
    """The manifest as a user reads it: the JSON file."""
    return json.loads(manifest_path(root, run, round_).read_text())


def manifest_path(root: Path, run: str, round_: int) -> Path:
    return RunLayout(root, run).manifest_path(round_)


def teacher(*args: str, timeout: int = 300, ray_address: str | None = None,
            **kw) -> subprocess.CompletedProcess[str]:
    """The job as a user runs it: it starts a Ray of its own unless given one to join."""
    return subprocess.run([PY, str(ROOT / "jobs" / "teacher.py"), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=kw.get("cwd", ROOT),
                          env=job_env(ray_address))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Digits with 60 shards' worth of small shards so 2 workers split them unevenly."""
    out = tmp_path_factory.mktemp("tiny")
    prepare_digits(out, shard_size=70)  # labeled: 180 -> 3 shards (uneven over 2 ranks)
    return out


def _error_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("teacher: error:")]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    return lines[0]


# ----------------------------------------------------------------------------- bad input (fast)


@pytest.mark.slow
def test_data_without_dataset_json(tmp_path: Path) -> None:
    p = teacher("--run", "x", "--data", str(tmp_path), "--root", str(tmp_path), *FAST)
    assert "has no dataset.json; create one with `python jobs/prepare.py digits" in \
        _error_line(p)
    assert not (tmp_path / "manifests").exists() and not (tmp_path / "artifacts").exists()


@pytest.mark.slow
def test_dataset_without_labeled_samples(tmp_path: Path, tiny: Path) -> None:
    info = json.loads((tiny / "dataset.json").read_text())
    info["splits"]["labeled"] = {"shards": [], "count": 0, "class_counts": {}}
    ds = tmp_path / "ds"
    shutil.copytree(tiny, ds)
    (ds / "dataset.json").write_text(json.dumps(info))
    p = teacher("--run", "x", "--data", str(ds), "--root", str(tmp_path), *FAST)
    line = _error_line(p)
    assert "has no 'labeled' split" in line
    assert f"`python jobs/prepare.py imagefolder SRC --out {ds} --split labeled`" in line
    assert not (tmp_path / "manifests").exists() and not (tmp_path / "artifacts").exists()


@pytest.mark.slow
def test_unknown_model_lists_valid_ones(tmp_path: Path, tiny: Path) -> None:
    p = teacher("--run", "x", "--data", str(tiny), "--root", str(tmp_path), *FAST,
                "--model", "resnet50")
    line = _error_line(p)
    assert "--model 'resnet50' is unknown; valid:" in line and "efficientnet_b0" in line


@pytest.mark.slow
def test_unknown_option_lists_allowed(tmp_path: Path, tiny: Path) -> None:
    p = teacher("--run", "x", "--data", str(tiny), "--learning-rate", "0.1")
    line = _error_line(p)
    assert "unknown option --learning-rate; allowed:" in line and "--lr" in line


@pytest.mark.slow
def test_bad_value_is_rejected(tmp_path: Path, tiny: Path) -> None:
    p = teacher("--run", "x", "--data", str(tiny), "--root", str(tmp_path), "--epochs", "0")
    assert "--epochs must be > 0" in _error_line(p)


@pytest.mark.slow
def test_undecodable_labeled_sample_past_the_damage_limit_named(tmp_path: Path,
                                                               tiny: Path) -> None:
    ds = tmp_path / "ds"
    shutil.copytree(tiny, ds)
    bad = sorted((ds / "labeled").glob("*/*.tar"))[1]
    write_shards([("broken_img", b"\x89PNG not really", 3)], tmp_path / "w", prefix="b")
    shutil.copy(tmp_path / "w" / "b-000000.tar", bad)
    p = teacher("--run", "x", "--data", str(ds), "--root", str(tmp_path), *FAST,
                "--damage-limit", "0")
    line = _error_line(p)
    assert "labeled split: 1 of 111 samples are damaged" in line
    assert f"{bad.name} (1 bad, e.g. key 'broken_img': cannot decode image" in line
    assert not (tmp_path / "manifests").exists() and not (tmp_path / "artifacts").exists()


@pytest.mark.slow
def test_help_explains_options() -> None:
    p = subprocess.run([PY, str(ROOT / "jobs" / "teacher.py"), "--help"], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0
    for text in ("--ema-decay", "exponential moving average", "--num-workers", "--preset"):
        assert text in p.stdout


# ----------------------------------------------------------------------------- with Ray (slow)


@pytest.mark.slow
def test_damage_past_the_limit_stops_training_when_the_preflight_is_skipped(
        tmp_path: Path, tiny: Path, ray_address: str) -> None:
    """--preflight-limit 0 skips the up-front read (for corpora too large to read twice): the
    training stream counts the damage itself and stops the round with the same kind of line."""
    ds = tmp_path / "ds"
    shutil.copytree(tiny, ds)
    write_shards([("broken_img", b"\x89PNG not really", 3)], tmp_path / "w", prefix="b")
    bad = sorted((ds / "labeled").glob("*/*.tar"))[1]
    shutil.copy(tmp_path / "w" / "b-000000.tar", bad)
    p = teacher("--run", "x", "--data", str(ds), "--root", str(tmp_path), *FAST,
                "--damage-limit", "0", "--preflight-limit", "0", timeout=600,
                ray_address=ray_address)
    assert p.returncode == 2, p.stderr[-3000:]
    line = p.stderr.strip().splitlines()[-1]  # after Ray's own lines about the worker's error
    assert line.startswith("teacher: error: training failed: labeled split: "), line
    assert "damaged" in line and bad.name in line and "broken_img" in line, line
    m = load_manifest(tmp_path, "x", 0)
    assert m["status"] == "failed" and m["stages"]["train"]["status"] == "failed"
    assert "preflight" not in m["stages"]


@pytest.mark.slow
def test_more_workers_than_cluster_fails_up_front(tmp_path: Path, tiny: Path,
                                                  ray_address: str) -> None:
    t0 = time.time()
    p = teacher("--run", "x", "--data", str(tiny), "--root", str(tmp_path), *FAST,
                "--num-workers", "8", ray_address=ray_address)
    assert "8 worker(s) x 1 CPU need 8 CPUs but the cluster has" in _error_line(p)
    assert time.time() - t0 < 120
    assert not (tmp_path / "manifests").exists()


@pytest.mark.slow
def test_two_workers_complete_manifest_and_refuse_rerun(tmp_path: Path, tiny: Path,
                                                        ray_address: str) -> None:
    # --data relative to the driver's working directory: the workers, which run elsewhere,
    # must still find its shards
    p = teacher("--run", "two", "--data", tiny.name, "--root", str(tmp_path), *FAST,
                "--num-workers", "2", "--cpus-per-worker", "1", timeout=600, cwd=tiny.parent,
                ray_address=ray_address)
    assert p.returncode == 0, p.stderr[-3000:]
    m = load_manifest(tmp_path, "two", 0)
    assert m["status"] == "complete" and m["role"] == "teacher"
    assert m["cluster"]["num_workers"] == 2
    assert m["data"]["dataset"] == str(tiny.resolve())  # recorded absolute, for the students
    ckpt = tmp_path / m["checkpoint"]["uri"]
    assert sha256_file(ckpt) == m["checkpoint"]["sha256"]
    assert [h["epoch"] for h in m["history"]] == [1, 2, 3]
    assert m["metrics"]["n"] == 540  # every test image once, summed over both ranks
    assert 0 <= m["metrics"]["top1"] <= 1 and m["metrics"]["top5"] >= m["metrics"]["top1"]
    assert {"train", "evaluate"} <= set(m["stages"])
    import pandas as pd

    preds = pd.read_parquet(tmp_path / m["stages"]["evaluate"]["predictions"])
    assert len(preds) == 540 and preds.key.is_unique
    assert (preds.pred == preds.label).mean() == pytest.approx(m["metrics"]["top1"])
    # a complete round is not overwritten without --force
    art = tmp_path / "artifacts" / "two" / "round-0"
    files = {p: p.read_bytes() for p in [manifest_path(tmp_path, "two", 0), *art.rglob("*")]
             if p.is_file()}
    again = teacher("--run", "two", "--data", str(tiny), "--root", str(tmp_path), *FAST,
                    ray_address=ray_address)
    assert "already has a complete round 0" in _error_line(again)
    assert "--force" in _error_line(again)
    assert {p: p.read_bytes() for p in files} == files  # manifest, model, predictions...
    assert {p for p in art.rglob("*") if p.is_file()} == set(files) - {
        manifest_path(tmp_path, "two", 0)}
    # --force trains the round again from scratch: the old artifacts go, a new record is written
    (art / "left-by-the-old-round").write_text("x")
    forced = teacher("--run", "two", "--data", str(tiny), "--root", str(tmp_path), *FAST,
                     "--force", timeout=600, ray_address=ray_address)
    assert forced.returncode == 0, forced.stderr[-3000:]
    assert not (art / "left-by-the-old-round").exists()
    m2 = load_manifest(tmp_path, "two", 0)
    assert m2["status"] == "complete" and m2["cluster"]["num_workers"] == 1
    assert [e["event"] for e in m2["events"]].count("start") == 1
    assert "restart" not in [e["event"] for e in m2["events"]]
    assert m2["events"][0]["at"] > m["events"][-1]["at"]
    assert sha256_file(tmp_path / m2["checkpoint"]["uri"]) == m2["checkpoint"]["sha256"]


@pytest.mark.slow
def test_kill_and_resume_continues_from_checkpoint(tmp_path: Path, tiny: Path) -> None:
    args = [PY, str(ROOT / "jobs" / "teacher.py"), "--run", "kr", "--data", str(tiny),
            "--root", str(tmp_path), "--preset", "demo", "--epochs", "8", "--eval-every", "8",
            "--loader-workers", "0", "--checkpoint-every", "1"]
    env = job_env(None)
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            start_new_session=True)
    train_dir = tmp_path / "artifacts" / "kr" / "round-0" / "train"
    deadline = time.time() + 300
    while time.time() < deadline and len(list(train_dir.glob("checkpoint_*/state.pt"))) < 2:
        assert proc.poll() is None, "the job ended before it could be killed"
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver, Ray and its workers: everything it started
    proc.wait()
    m = load_manifest(tmp_path, "kr", 0)
    assert m["status"] == "running"
    p = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    m = load_manifest(tmp_path, "kr", 0)
    assert m["status"] == "complete"
    assert [e["event"] for e in m["events"]] == ["start", "restart", "resume"]
    assert m["events"][1]["resumes_training"] is True
    assert m["events"][2]["stage"] == "train" and m["events"][2]["previous"] == "running"
    (resumed,) = m["resumed_from"]
    assert resumed["phase"] == "train" and 1 <= resumed["epoch"] < 8  # not from scratch
    assert [h["epoch"] for h in m["history"]] == list(range(1, 9))


def _stop_cluster(temp: Path) -> None:
    """Stop the processes of the cluster whose session lives under ``temp`` (not `ray stop`,
    which stops every Ray on the machine)."""
    import psutil

    me = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    mine = []
    for proc in psutil.process_iter(["cmdline"]):
        if proc.pid in me:
            continue
        try:
            if any(str(temp) in part for part in proc.info["cmdline"] or []):
                mine.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    for proc in mine:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.terminate()
    _, alive = psutil.wait_procs(mine, timeout=15)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    shutil.rmtree(temp, ignore_errors=True)


def _free_ports(n: int) -> list[int]:
    """``n`` distinct free ports: each socket stays bound until all are chosen (one at a time,
    the kernel could hand out the same port twice, and `ray start` failed on the clash)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@pytest.mark.slow
def test_ray_job_submit_against_local_cluster(tmp_path: Path, tiny: Path) -> None:
    """`ray start --head` on free ports, `ray job submit --working-dir .`, results under --root."""
    ray_bin = str(Path(PY).parent / "ray")
    port, dash, agent, grpc, metrics, renv, client = _free_ports(7)
    env = job_env(None)
    # This cluster's session files live in a folder of its own (short: socket paths are
    # limited), so stopping it touches no other Ray on the machine.
    temp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    env["RAY_TMPDIR"] = str(temp)
    env["PATH"] = f"{Path(PY).parent}{os.pathsep}{env.get('PATH', '')}"  # the job's `python`
    # Ray 2.60 turns token authentication on for `ray start`; the CLI sends the token only
    # when told the mode.
    env["RAY_AUTH_MODE"] = "token"
    # Every port chosen free, so another Ray on this machine cannot collide with this one.
    subprocess.run([ray_bin, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                    "--num-cpus=2", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                    f"--dashboard-agent-listen-port={agent}",
                    f"--dashboard-agent-grpc-port={grpc}", f"--metrics-export-port={metrics}",
                    f"--runtime-env-agent-port={renv}", f"--ray-client-server-port={client}",
                    "--include-dashboard=true", f"--temp-dir={temp}",
                    "--disable-usage-stats"], check=True, capture_output=True, env=env,
                   timeout=180)
    root = tmp_path / "results"
    try:
        address = f"http://127.0.0.1:{dash}"
        # a relative --root would land in the job's temporary copy: refused with a hint
        bad = subprocess.run(
            [ray_bin, "job", "submit", "--address", address, "--working-dir", str(ROOT), "--",
             "python", "jobs/teacher.py", "--run", "sub", "--data", str(tiny), *FAST],
            capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
        assert bad.returncode != 0
        assert "pass an absolute --root" in bad.stdout + bad.stderr
        ok = subprocess.run(
            [ray_bin, "job", "submit", "--address", address, "--working-dir", str(ROOT), "--",
             "python", "jobs/teacher.py", "--run", "sub", "--data", str(tiny), "--root",
             str(root), *FAST], capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
        assert ok.returncode == 0, (ok.stdout + ok.stderr)[-3000:]
        assert "round 0 of 'sub' complete" in ok.stdout + ok.stderr
    finally:
        _stop_cluster(temp)
    m = load_manifest(root, "sub", 0)
    assert m["status"] == "complete"
    assert sha256_file(root / m["checkpoint"]["uri"]) == m["checkpoint"]["sha256"]


def _kill_a_training_worker_mid_run(args: list[str], train_dir: Path, ray_address: str,
                                    after: int = 0) -> tuple[subprocess.Popen, str]:
    """Run the teacher job on the module's Ray, kill -9 its Ray Train worker once Ray Train has
    recorded more than ``after`` checkpoints, and wait for the job to end; returns the process
    and its output."""
    import psutil

    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=job_env(ray_address), start_new_session=True)
    deadline = time.time() + 300
    killed = None
    try:
        while time.time() < deadline and killed is None:
            assert proc.poll() is None, "the job ended before its worker could be killed"
            if _registered_checkpoints(train_dir) > after:  # one more Ray Train has recorded
                # the module's Ray was started by this process: its workers are ours, not
                # those of a Ray another test process runs beside it
                for child in psutil.Process().children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        if "RayTrainWorker" in " ".join(child.cmdline()):
                            child.kill()
                            killed = child.pid
                            break
            time.sleep(0.2)
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert killed is not None, "no training worker found to kill"
    return proc, out


@pytest.mark.slow
def test_a_killed_training_worker_fails_the_round_by_default_and_max_failures_restarts_it(
        tmp_path: Path, tiny: Path, ray_address: str) -> None:
    """kill -9 of the Ray Train worker mid-run. With --max-failures 0 (the default) the first
    lost worker ends the round, recorded as failed, with one line. The same command with
    --max-failures 1 continues from the last checkpoint; its worker killed too, Ray Train
    restarts it from the newest checkpoint, the round completes and the manifest records both
    resumptions."""
    train_dir = tmp_path / "artifacts" / "mf" / "round-0" / "train"
    args = [PY, str(ROOT / "jobs" / "teacher.py"), "--run", "mf", "--data", str(tiny),
            "--root", str(tmp_path), "--preset", "demo", "--epochs", "8", "--eval-every", "8",
            "--loader-workers", "0", "--checkpoint-every", "1"]
    proc, out = _kill_a_training_worker_mid_run(args, train_dir, ray_address)
    assert proc.returncode == 1, out[-3000:]  # nothing to fix: 1, not the 2 of bad input
    # Ray's controller logs the lost worker (its lines, prefixed by the process); ours is the
    # last line, and it says how to go on
    last = out.strip().splitlines()[-1]
    assert last.startswith("teacher: error: training failed: ") and len(last) < 600
    assert last.endswith("run the same command again to continue from its last checkpoint "
                         "(--max-failures N lets Ray Train restart lost workers by itself)")
    failed = load_manifest(tmp_path, "mf", 0)
    assert failed["status"] == "failed" and failed["stages"]["train"]["status"] == "failed"

    proc, out = _kill_a_training_worker_mid_run([*args, "--max-failures", "1"], train_dir,
                                                ray_address,
                                                after=_registered_checkpoints(train_dir))
    assert proc.returncode == 0, out[-3000:]
    m = load_manifest(tmp_path, "mf", 0)
    assert m["status"] == "complete"
    resume = [e for e in m["events"] if e["event"] == "resume"]
    assert resume and resume[0]["stage"] == "train" and resume[0]["from_checkpoint"] is True
    # the rerun's start, then Ray Train's restart of the killed worker, each from a checkpoint
    first, restart = m["resumed_from"]
    assert first["phase"] == restart["phase"] == "train"
    assert 1 <= first["epoch"] < restart["epoch"] < 8
    assert [h["epoch"] for h in m["history"]] == list(range(1, 9))


def _registered_checkpoints(train_dir: Path) -> int:
    """Checkpoints Ray Train's controller has recorded (its snapshot file), not just written: a
    worker killed before the controller records one restarts from scratch."""
    try:
        return len(json.loads((train_dir / "checkpoint_manager_snapshot.json").read_text())
                   .get("checkpoint_results", []))
    except (OSError, ValueError):
        return 0


@pytest.mark.slow
def test_teacher_starts_from_a_pretrained_file_at_a_new_class_count(
        tmp_path: Path, tiny: Path, ray_address: str) -> None:
    """A locally saved state dict of 7 classes starts a 10-class teacher: the classifier is new,
    every other weight is the file's (a learning rate of 1e-12 leaves them where they start).
    The job joins the module's Ray."""
    import torch
    from safetensors.torch import save_file

    from models import create_model
    from pipeline.checkpoint import read_model_file

    torch.manual_seed(3)
    src = create_model("efficientnet_t0", 7).state_dict()
    weights = tmp_path / "pretrained.safetensors"
    save_file({k: v.contiguous() for k, v in src.items()}, str(weights))
    p = teacher("--run", "init", "--data", str(tiny), "--root", str(tmp_path), *FAST,
                "--epochs", "1", "--eval-every", "1", "--lr", "1e-12", "--ema-decay", "0",
                "--init-from", str(weights), ray_address=ray_address)
    assert p.returncode == 0, p.stderr[-3000:]
    out = p.stdout + p.stderr
    assert "classifier (7 classes) is re-initialised for the dataset's 10" in out
    assert "Requesting resources" not in out and "Token authentication" not in out  # quiet
    assert "PreemptionWatcher" not in out  # a worker's known-harmless line, filtered
    assert "[teacher] epoch 1/1" in out
    m = load_manifest(tmp_path, "init", 0)
    assert m["init"]["file"] == "pretrained.safetensors"
    assert m["init"]["sha256"] == sha256_file(weights)
    assert m["init"]["classifier"] == "re-initialised" and m["init"]["source_classes"] == 7
    model = read_model_file(tmp_path / m["checkpoint"]["uri"])["state_dict"]
    conv = "features.2.0.block.0.0.weight"
    assert torch.allclose(model[conv], src[conv], atol=1e-6)
    assert model["classifier.1.weight"].shape[0] == 10
    from tests.test_events import read_scalars

    tags = read_scalars(tmp_path / "artifacts" / "init" / "round-0" / "tensorboard")
    assert {"train/loss", "train/lr", "test/top1", "final/top1"} <= set(tags)

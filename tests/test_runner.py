"""The Ray edge: root folders, checkpoints on disk, the one line shown for a failed worker, the
job surviving the trip to a worker, and the workers' environment (the one test with a cluster)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from pipeline.checkpoint import STATE_FILE
from pipeline.config import PRESETS, StudentConfig
from pipeline.runner import (
    MALLOC_ENV,
    TRAIN_DIR,
    RunError,
    _root_cause,
    check_data,
    has_checkpoint,
    in_job_working_dir,
    resolve_root,
    worker_env,
)
from pipeline.train import Job

JOB_DIR = ("tmp", "ray", "session_1", "runtime_resources", "working_dir_files", "_ray_pkg_abc")


def test_in_job_working_dir(tmp_path: Path) -> None:
    inside = tmp_path.joinpath(*JOB_DIR)
    inside.mkdir(parents=True)
    assert in_job_working_dir(inside)
    assert not in_job_working_dir(tmp_path)
    assert not in_job_working_dir(tmp_path / "runtime_resources")  # both parts are needed


def test_resolve_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_root("out") == tmp_path.resolve() / "out"
    inside = tmp_path.joinpath(*JOB_DIR)
    inside.mkdir(parents=True)
    monkeypatch.chdir(inside)
    with pytest.raises(RunError, match=r"--root 'out' is relative.*pass an absolute --root"):
        resolve_root("out")
    assert resolve_root(str(tmp_path)) == tmp_path.resolve()  # an absolute one is fine there


def test_check_data_refuses_a_relative_data_only_in_a_job_working_dir(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    check_data("data/digits")  # a plain driver: made absolute when the dataset is read
    inside = tmp_path.joinpath(*JOB_DIR)
    inside.mkdir(parents=True)
    monkeypatch.chdir(inside)
    with pytest.raises(RunError, match=r"--data 'data/digits' is relative.*"
                                       r"pass an absolute --data .*--data \$PWD/data/digits"):
        check_data("data/digits")
    check_data(str(tmp_path))
    check_data("s3://bucket/data")
    check_data("")  # a student's default: the teacher's dataset, recorded absolute


def test_has_checkpoint(tmp_path: Path) -> None:
    assert not has_checkpoint(tmp_path)
    ck = tmp_path / TRAIN_DIR / "checkpoint_000003"
    ck.mkdir(parents=True)
    assert not has_checkpoint(tmp_path)  # a folder Ray made but never filled
    (ck / STATE_FILE).write_bytes(b"x")
    assert has_checkpoint(tmp_path)


class _TaskError(Exception):
    """Stands in for ray.exceptions.RayTaskError: its text is the worker's traceback."""


RAY_TEXT = """ray::_RayTrainWorker__execute.get_next() (pid=4242, ip=10.0.0.2, actor_id=ab12)
  File "/work/pipeline/train.py", line 300, in train_worker
    run_phases(job, ctx, reporter, learner, state)
  File "/work/pipeline/data.py", line 140, in __iter__
    raise ShardError(f"{where}: not a PNG")
pipeline.shards.ShardError: shard /data/labeled/000001.tar, key k7: not a PNG
"""


def test_root_cause_finds_the_worker_error_under_rays_wrapper() -> None:
    try:
        try:
            raise _TaskError(RAY_TEXT)
        except _TaskError as inner:
            # Ray Train V1: the message says how to restore; the worker's error is the cause.
            raise RuntimeError("The Ray Train run failed. Please inspect the previous error "
                               "messages for a cause.\nTo continue this run, use restore()."
                               ) from inner
    except RuntimeError as e:
        assert _root_cause(e) == ("shard /data/labeled/000001.tar, key k7: not a PNG", True)


def test_root_cause_prefers_our_errors_and_the_innermost() -> None:
    text = ("ValueError: outer wrapper\nTraceback...\nDatasetError: first\n"
            "ValueError: not this one\nDatasetError: the last DatasetError")
    assert _root_cause(RuntimeError(text)) == ("the last DatasetError", True)
    outer = RuntimeError("CheckpointError: outer")
    outer.__cause__ = ValueError("CheckpointError: inner")
    assert _root_cause(outer) == ("inner", True)


def test_root_cause_of_worker_failures_and_plain_errors() -> None:
    class WorkerGroupError(RuntimeError):  # Ray Train V2's shape
        def __init__(self, failures: dict[int, BaseException]) -> None:
            super().__init__("Training failed due to worker errors")
            self.worker_failures = failures

    e = WorkerGroupError({1: _TaskError("Traceback\nValueError: --lr must be > 0")})
    assert _root_cause(e) == ("--lr must be > 0", True)
    # the worker's exception itself (its text has no type name): still one of ours
    from pipeline.checkpoint import CheckpointError
    from pipeline.runner import training_error

    e = WorkerGroupError({0: CheckpointError("this round's checkpoint has 4 epoch(s) trained")})
    assert _root_cause(e) == ("this round's checkpoint has 4 epoch(s) trained", True)
    assert str(training_error(e)) == (
        "training failed: this round's checkpoint has 4 epoch(s) trained")  # no "run again"
    oom = RuntimeError("The Ray Train run failed.")
    oom.__cause__ = _TaskError("Traceback (most recent call last):\n  ...\n"
                               "torch.OutOfMemoryError: CUDA out of memory\n\n")
    assert _root_cause(oom) == ("torch.OutOfMemoryError: CUDA out of memory", False)
    assert _root_cause(KeyError()) == ("KeyError", False)


def test_training_errors_say_how_to_go_on() -> None:
    from pipeline.runner import RunError, TrainingCrash, training_error

    lost = RuntimeError("The Ray Train run failed.")
    lost.__cause__ = _TaskError("The actor is dead because its worker process has died. " * 20)
    e = training_error(lost)
    assert isinstance(e, TrainingCrash) and len(str(e)) < 600  # the jobs exit 1 for it
    # said in a sentence of ours (Ray's paragraph was cut mid-sentence)
    assert str(e).startswith("training failed: a training worker's process died (killed by the "
                             "out-of-memory killer, `ray stop --force` or a signal, or crashed")
    assert str(e).endswith("run the same command again to continue from its last checkpoint "
                           "(--max-failures N lets Ray Train restart lost workers by itself)")
    ours = training_error(_TaskError("Traceback\nShardError: shard a.tar: not a tar file"))
    assert str(ours) == "training failed: shard a.tar: not a tar file"  # names its own fix
    assert type(ours) is RunError  # an input to fix: exit 2
    # a worker's full disk reaches the driver as text: said as such, with where and what to do
    full = RuntimeError("Training failed due to worker errors")
    full.__cause__ = _TaskError("Traceback (most recent call last):\n  ...\nOSError: [Errno 28] "
                                "No space left on device: '/r/artifacts/x/round-0/train/c/s.pt'")
    assert str(training_error(full)).startswith(
        "training failed: no space left on device writing /r/artifacts/x/round-0/train/c/s.pt on "
        "a training worker")
    # out of memory: said plainly, with what to lower (Ray's own text ends in a link and
    # advice on its settings, and "run the same command again" would fail the same way)
    host = RuntimeError("Training failed due to worker errors")
    host.__cause__ = _TaskError(
        "ray.exceptions.OutOfMemoryError: Task was killed due to the node running low on "
        "memory.\nMemory on the node was 22.1GB / 23.2GB (0.95).\nRefer to the documentation on "
        "how to address the out of memory issue: https://docs.ray.io/en/latest/ray-core/"
        "scheduling/ray-oom-prevention.html. Set max_restarts and max_task_retries to enable "
        "retry when the task crashes due to OOM.")
    assert str(training_error(host)).startswith(
        "training failed: a training worker ran out of memory and Ray's memory monitor ended "
        "it; lower --batch-size")
    gpu = _TaskError("Traceback\ntorch.OutOfMemoryError: CUDA out of memory. Tried to allocate "
                     "2.00 GiB")
    assert str(training_error(gpu)).startswith(
        "training failed: a training worker ran out of GPU memory; lower --batch-size")
    quota = str(training_error(_TaskError("OSError: [Errno 122] Disk quota exceeded")))
    assert quota.startswith("training failed: disk quota exceeded on a training worker")
    assert quota.endswith("free space there and run the same command again: finished stages and "
                          "files are kept")


def test_job_survives_pickling_with_its_config_dataclass() -> None:
    """fit() hands Ray Job.__dict__ as train_loop_config; Ray pickles it (cloudpickle, which
    pickles importable classes by reference as pickle does) and _ray_entry rebuilds the Job."""
    cfg = StudentConfig(**PRESETS["student"]["demo"], run="r", data="d")
    job = Job(config=cfg, role="student", classes=["a"], labeled={"shards": [], "count": 0},
              test={"shards": [], "count": 0}, model={"name": "efficientnet_t0"},
              predictions_dir="/p", pseudo={"shards": [], "dir": "/q", "count": 1})
    dumps = pickle.dumps
    try:
        from ray import cloudpickle

        dumps = cloudpickle.dumps
    except ImportError:
        pass
    again = Job(**pickle.loads(dumps(dict(job.__dict__))))
    assert isinstance(again.config, StudentConfig) and again.config == cfg
    assert again.config.unlabel_ratio == cfg.unlabel_ratio and again == job


@pytest.mark.parametrize("where", ["local", "bucket"])
def test_resume_checkpoint_is_read_in_place_or_from_a_copy_that_is_deleted(
        where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    """A restarted worker reads Ray Train's checkpoint where it is (local storage) or from a
    temporary download (a bucket) that is gone after the block: nothing is left in the temporary
    folder, where a copy per worker start would pile up."""
    import tempfile

    import ray.train

    from pipeline.fs import S3Path, arrow_fs
    from pipeline.runner import RayReporter

    payload = b"state of epoch 3"
    if where == "local":
        folder = tmp_path / "checkpoint_000003"
        folder.mkdir()
        (folder / STATE_FILE).write_bytes(payload)
        fs, path = arrow_fs(folder)
    else:
        bucket = request.getfixturevalue("s3").make_bucket("resume-tests")
        folder = S3Path(f"s3://{bucket}/run/train/checkpoint_000003")
        (folder / STATE_FILE).write_bytes(payload)
        fs, path = arrow_fs(folder)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    checkpoint = ray.train.Checkpoint(path, filesystem=fs)
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: checkpoint)

    with RayReporter().resume_dir() as local:
        assert local is not None and (Path(local) / STATE_FILE).read_bytes() == payload
        if where == "local":
            assert Path(local) == folder  # no copy
    assert list(scratch.iterdir()) == []
    if where == "local":
        assert (folder / STATE_FILE).read_bytes() == payload  # the checkpoint itself is kept


def test_no_checkpoint_to_resume_from(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray.train

    from pipeline.runner import RayReporter

    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: None)
    with RayReporter().resume_dir() as local:
        assert local is None


def test_worker_env_has_the_allocator_settings_unless_set_here_or_by_the_job(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    for k in MALLOC_ENV:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    for secret in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.setenv(secret, "not-for-the-runtime-env")
    env = worker_env()
    assert {k: env[k] for k in MALLOC_ENV} == MALLOC_ENV
    assert env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9"
    # the endpoint only: credentials stay out of Ray's runtime environment (which Ray records)
    assert "not-for-the-runtime-env" not in env.values()
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")  # the user's own value wins
    assert worker_env()["MALLOC_ARENA_MAX"] == "4"
    # A submitted job's runtime environment already hands these to the workers, and Ray refuses
    # a driver's runtime environment that names one of them again.
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(
        {"runtime_env": {"env_vars": {"MALLOC_ARENA_MAX": "2", "AWS_ENDPOINT_URL": "x"}}}))
    env = worker_env()
    assert "MALLOC_ARENA_MAX" not in env and "AWS_ENDPOINT_URL" not in env
    assert env["MALLOC_MMAP_THRESHOLD_"] == MALLOC_ENV["MALLOC_MMAP_THRESHOLD_"]


def _forward_page_faults() -> int:
    """Minor page faults of a warm eval-mode forward pass of a batch of 256 at 32 px (the
    fewest of four passes after two: the heap may still grow in the first ones)."""
    import resource

    import torch

    from models import create_model

    torch.set_num_threads(1)
    model = create_model("efficientnet_t0", 10).eval()
    x = torch.randn(256, 3, 32, 32)
    faults = []
    with torch.inference_mode():
        for _ in range(6):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            model(x)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return min(faults[2:])


@pytest.mark.slow
def test_workers_with_worker_env_do_not_fault_their_memory_in_again(ray_address: str) -> None:
    """What MALLOC_ENV is for: with glibc's defaults a worker hands the activations' memory back
    to the kernel after each layer and faults it in again in the next pass (tens of thousands of
    faults a pass); with the settings ray_session gives every job's workers, a warm pass reuses
    its memory. A new worker process each (the settings act when a process starts)."""
    import ray

    probe = ray.remote(num_cpus=1)(_forward_page_faults)
    tuned = ray.get(probe.options(runtime_env={"env_vars": worker_env()}).remote())
    default = ray.get(probe.options(
        runtime_env={"env_vars": {"NS_TEST_PLAIN_WORKER": "1"}}).remote())
    assert default > 10_000, default
    assert tuned < 1_000, tuned


def test_ray_session_gives_the_jobs_workers_worker_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The settings reach a job's workers through the runtime environment of ray.init, in a
    cluster it starts and in one it joins."""
    import ray

    from pipeline.runner import ray_session

    calls: list[dict] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    for address in (None, "auto"):
        if address is None:
            monkeypatch.delenv("RAY_ADDRESS", raising=False)
        else:
            monkeypatch.setenv("RAY_ADDRESS", address)
        with ray_session(num_cpus=2):
            pass
    assert [c["runtime_env"] for c in calls] == [{"env_vars": worker_env()}] * 2
    # a local Ray of its own, even where `ray start` left a cluster that ray.init() would join
    assert calls[0]["address"] == "local" and "address" not in calls[1]


@pytest.mark.parametrize("address,error,message", [
    ("auto", ConnectionError("Could not find any running Ray instance. Please specify\nmore"),
     r"^cannot join the Ray cluster RAY_ADDRESS=auto names \(Could not find any running Ray "
     r"instance. Please specify\); start it \(ray start --head\), correct RAY_ADDRESS, or "
     r"unset it"),
    (None, RuntimeError("Failed to start GCS."),
     r"^cannot start a local Ray \(Failed to start GCS.\); see `ray status`"),
])
def test_a_ray_that_cannot_start_or_be_joined_is_one_line(monkeypatch: pytest.MonkeyPatch,
                                                           address, error, message) -> None:
    """ray.init's ConnectionError (RAY_ADDRESS=auto with no cluster is an OSError) escaped the
    jobs' one-line handling as a traceback."""
    import ray

    from pipeline.runner import RunError, ray_session

    def fail(**kw):
        raise error

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fail)
    if address is None:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    else:
        monkeypatch.setenv("RAY_ADDRESS", address)
    with pytest.raises(RunError, match=message), ray_session(num_cpus=2):
        pass


@pytest.mark.parametrize("cluster,use_gpu,expected", [
    ({"CPU": 8.0}, None, False),               # no GPUs: CPU workers
    ({"CPU": 8.0, "GPU": 2.0}, None, True),    # GPUs there: taken without the flag
    ({"CPU": 8.0, "GPU": 2.0}, False, False),  # --use-gpu False keeps them on CPUs
    ({"CPU": 8.0, "GPU": 2.0}, True, True),
])
def test_training_takes_gpus_when_the_cluster_has_them(monkeypatch: pytest.MonkeyPatch,
                                                       cluster: dict, use_gpu: bool | None,
                                                       expected: bool) -> None:
    import ray

    from pipeline.runner import check_resources

    monkeypatch.setattr(ray, "cluster_resources", lambda: cluster)
    assert check_resources(2, 1.0, use_gpu) is expected


def test_training_short_of_gpus_or_cpus_stops_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/cluster.md: --use-gpu True on a cluster with fewer GPUs than workers stops with one
    line instead of waiting for GPUs that never come; so do too few CPUs."""
    import ray

    from pipeline.runner import check_resources

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0, "GPU": 1.0})
    with pytest.raises(RunError, match=r"^2 worker\(s\) need 2 GPU\(s\) but the cluster has 1; "
                                       r"lower --num-workers or pass --use-gpu False$"):
        check_resources(2, 1.0, True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0})
    with pytest.raises(RunError, match=r"^2 worker\(s\) need 2 GPU\(s\) but the cluster has 0;"):
        check_resources(2, 1.0, True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 3.0})
    with pytest.raises(RunError, match=r"need 4 CPUs but the cluster has 3; lower --num-workers"):
        check_resources(2, 2.0, False)


def test_a_model_that_predicts_one_class_for_every_test_image_is_named() -> None:
    from pipeline.train_stage import one_class_warning

    classes = ["red", "green", "blue"]
    assert one_class_warning([0, 1, 2, 1], [0, 1, 2, 2], classes) is None
    assert one_class_warning([1, 1], [1, 1], classes) is None  # a one-class test split
    assert one_class_warning([0, 1, 2, 1], [2, 2, 2, 2], classes) == (
        "warning: the model predicts 'blue' for every one of the 4 test images; in a short run "
        "its BatchNorm statistics may not have settled: train longer, or add --finetune-epochs "
        "1 --finetune-norm all, which re-estimates them")

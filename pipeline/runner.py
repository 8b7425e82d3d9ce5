"""Ray at the edge: starting or joining a cluster, checking it can run the job, TorchTrainer.

The worker function is :func:`pipeline.train.train_worker`; this module only adapts Ray Train's
context and checkpoint API to it.
"""

from __future__ import annotations

import os
import re
import signal
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import UserError
from pipeline.fs import S3Path, arrow_fs, check_location, location

if TYPE_CHECKING:
    from pipeline.job import Job

# Nothing here imports torch at module level (pipeline.train and pipeline.checkpoint are imported
# where they are used): a job's driver that stops on a bad option or input answers in about a
# second instead of after torch's and torchvision's imports.

TRAIN_DIR = "train"  # Ray Train's run folder inside artifacts/<run>/round-<N>/


class RunError(UserError, RuntimeError):
    """A job cannot start or failed; the message is the one line to show the user."""


class TrainingCrash(RunError):
    """Training failed for no fault of the input or options (a worker lost or crashed): the same
    command continues from the last checkpoint. The jobs exit 1 for it, not 2, so that a
    script can tell a failure to retry from an input to fix."""


# ----------------------------------------------------------------------------- cluster


def in_job_working_dir(path: Path | None = None) -> bool:
    """True inside ``ray job submit --working-dir``'s temporary copy of the project."""
    here = str((path or Path.cwd()).resolve())
    return "runtime_resources" in here and "working_dir_files" in here


def check_data(data: str) -> None:
    """Refuse a relative ``--data`` inside a Ray job's temporary working dir: it would name a
    folder in that copy of the project (usually absent: the copy skips ignored files)."""
    if data and not isinstance(location(data), S3Path) and not Path(data).is_absolute() \
            and in_job_working_dir():
        raise RunError(
            f"--data {data!r} is relative, and this job runs in Ray's temporary copy of the "
            "working dir: pass an absolute --data (a folder every node can read, or s3://), "
            "e.g. --data $PWD/" + data)


def resolve_root(root: str) -> Path | S3Path:
    """The absolute root (local or ``s3://``, whose bucket is checked now); refuses a relative
    one inside a Ray job's temporary working dir, where results would vanish with the job."""
    loc = location(root)
    check_location(loc)  # a missing bucket, or a file where the folder should be
    if isinstance(loc, S3Path):
        return loc
    if not Path(root).is_absolute() and in_job_working_dir():
        raise RunError(
            f"--root {root!r} is relative, and this job runs in Ray's temporary copy of the "
            "working dir, which is deleted after the job: pass an absolute --root that outlives "
            "it (shared storage on a multi-node cluster), e.g. --root $PWD"
        )
    return Path(root).resolve()


# Where the object store is, as the driver sees it: passed on to this job's workers, so that they
# read and write the same bucket. Credentials are not passed: each node has its own.
STORAGE_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")


def storage_env() -> dict[str, str]:
    return {k: os.environ[k] for k in STORAGE_ENV if os.environ.get(k)}


# glibc's malloc gives every large freed block back to the kernel (mmap'd blocks at once, the
# heap's top past a threshold), so the next batch's activations of the same size are faulted in
# again page by page: tens of thousands of page faults per forward pass of a batch. Keeping
# freed memory in the process (one arena, so that the training thread Ray Train runs our loop
# in uses the main heap too) removes them; the arithmetic is the same, so are the results
# (docs/ray_notes.md has the measurements). glibc reads these when a process starts, hence
# environment variables for the workers; other allocators ignore them.
MALLOC_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": str(2**30),
              "MALLOC_TRIM_THRESHOLD_": str(2**30)}


def worker_env() -> dict[str, str]:
    """Environment of this job's Ray workers: the allocator settings of MALLOC_ENV (a value
    set in this environment wins) and where the object store is. Variables that the job's own
    runtime environment (``ray job submit --runtime-env-json``) already sets are left out: they
    reach the workers anyway, and Ray refuses a driver's runtime environment naming them again."""
    env = {**{k: os.environ.get(k, v) for k, v in MALLOC_ENV.items()}, **storage_env()}
    return {k: v for k, v in env.items() if k not in _job_env_vars()}


def _job_env_vars() -> set[str]:
    import json

    text = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")  # set by Ray for a submitted job
    if not text:
        return set()
    try:
        return set((json.loads(text).get("runtime_env") or {}).get("env_vars") or {})
    except (ValueError, AttributeError):
        return set()


@contextmanager
def ray_session(num_cpus: int | None = None, *, verbose: bool = False) -> Iterator[bool]:
    """Join the cluster named by RAY_ADDRESS (set for ``ray job submit`` drivers; set it to
    ``auto`` to use a cluster from ``ray start``), else start a local one with explicit CPUs.
    Shuts down only a cluster it started (from a joined one it disconnects). Yields whether it
    started one. Ray's chatter is hidden unless ``verbose`` (:mod:`pipeline.logs`)."""
    import ray

    from pipeline.logs import quiet_ray

    if ray.is_initialized():
        yield False
        return
    address = os.environ.get("RAY_ADDRESS")
    started = not address
    runtime_env = {"env_vars": worker_env()}
    with quiet_ray(verbose):
        try:
            if started:
                # address="local": a new local Ray even where `ray start` left a cluster (or
                # the file naming one), which ray.init() would otherwise join, and then refuse
                # the num_cpus given. The dashboard serves the state API, which Ray Train's
                # placement-group cleaner polls (without it, it warns every few seconds).
                ray.init(address="local", num_cpus=num_cpus or os.cpu_count(),
                         include_dashboard=True, dashboard_host="127.0.0.1",
                         logging_level="warning", runtime_env=runtime_env)
            else:
                ray.init(logging_level="warning", runtime_env=runtime_env)
        except (ConnectionError, ValueError, RuntimeError) as e:
            raise ray_init_error(address, e) from e
        try:
            yield started
        finally:
            # On a joined cluster this only disconnects the driver (the cluster runs on). It
            # must happen here, not at exit: disconnecting prints the worker lines Ray held back
            # to fold repeats ("[repeated 2x across cluster]"), which would otherwise follow
            # the job's last line, its error.
            ray.shutdown()


def ray_init_error(address: str | None, e: BaseException) -> RunError:
    """One line for a Ray that could not be started or joined (ray.init raises ConnectionError,
    ValueError or RuntimeError, with paragraphs of text)."""
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    if address:
        return RunError(f"cannot join the Ray cluster RAY_ADDRESS={address} names ({first}); "
                        "start it (ray start --head), correct RAY_ADDRESS, or unset it to run "
                        "on a local Ray of this machine")
    return RunError(f"cannot start a local Ray ({first}); see `ray status` and /tmp/ray/, or "
                    "set RAY_ADDRESS to a running cluster")


def check_resources(num_workers: int, cpus_per_worker: float, use_gpu: bool | None) -> bool:
    """Fail at once, rather than wait forever, when the cluster cannot place the workers.
    Returns whether to use GPUs."""
    import ray

    total = ray.cluster_resources()
    cpus, gpus = total.get("CPU", 0.0), total.get("GPU", 0.0)
    if use_gpu is None:
        use_gpu = gpus >= 1
    if use_gpu and gpus < num_workers:
        raise RunError(f"{num_workers} worker(s) need {num_workers} GPU(s) but the cluster has "
                       f"{gpus:g}; lower --num-workers or pass --use-gpu False")
    need = num_workers * cpus_per_worker
    if need > cpus:
        raise RunError(f"{num_workers} worker(s) x {cpus_per_worker:g} CPU need {need:g} CPUs but "
                       f"the cluster has {cpus:g}; lower --num-workers or --cpus-per-worker")
    return use_gpu


def cluster_summary(num_workers: int, use_gpu: bool) -> dict[str, Any]:
    import ray

    res = ray.cluster_resources()
    return {"num_workers": num_workers, "use_gpu": use_gpu,
            "resources": {k: v for k, v in res.items() if k in ("CPU", "GPU", "memory")},
            "nodes": len([n for n in ray.nodes() if n.get("Alive")])}


# ----------------------------------------------------------------------------- Ray Train


class RayReporter:
    def __init__(self) -> None:
        import ray.train

        self._checkpoint = ray.train.get_checkpoint()

    @contextmanager
    def resume_dir(self) -> Iterator[str | None]:
        """Ray Train's latest checkpoint, in place when it is on a local filesystem; from a
        bucket, downloaded to a temporary folder that is deleted after the block (a plain
        ``to_directory()`` would leave a whole checkpoint in /tmp at every start of every
        worker)."""
        if self._checkpoint is None:
            yield None
            return
        with self._checkpoint.as_directory() as folder:
            yield folder

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        import ray.train

        ckpt = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=ckpt)


def _ray_entry(config: dict[str, Any]) -> None:
    import logging

    import ray.train
    import ray.train.torch

    from pipeline.data import release_loader_files, start_loader_server

    if config["config"].loader_workers > 0:
        start_loader_server()  # its imports overlap the ones below and the model's set-up
    from pipeline.job import Job
    from pipeline.train import WorkerContext, train_worker

    # Ray Train logs every report and checkpoint at INFO; our own epoch lines say it better.
    # (Some of its loggers are named by file path, hence the search.)
    for name in ["ray.train", *logging.root.manager.loggerDict]:
        if name.startswith("ray.train") or "ray/train" in name:
            logging.getLogger(name).setLevel(logging.WARNING)

    ctx = ray.train.get_context()
    wctx = WorkerContext(rank=ctx.get_world_rank(), world_size=ctx.get_world_size(),
                         device=ray.train.torch.get_device())
    # The fields as fit() passed them: Job.config is still the frozen config dataclass (Ray
    # pickles train_loop_config whole; it does not turn values into dicts).
    try:
        train_worker(Job(**config), wctx, RayReporter())
    finally:  # Ray ends this process without its exit hooks
        release_loader_files()


def has_checkpoint(storage: Path | S3Path) -> bool:
    from pipeline.checkpoint import STATE_FILE

    return any((storage / TRAIN_DIR).glob("checkpoint_*/" + STATE_FILE))


def fit(job: Job, storage: Path | S3Path, *, use_gpu: bool) -> Path:
    """Run (or resume) the round's TorchTrainer; returns the final checkpoint folder."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.process_group import TorchProcessGroup

    cfg = job.config
    # Ray Train keeps its run state and checkpoints under storage/train on the same filesystem
    # as the root: a local folder, or the bucket (every node must be able to reach it).
    filesystem, storage_path = arrow_fs(storage)

    class Trainer(TorchTrainer):
        """Ray Train's own Ctrl-C handling, told apart: on SIGINT it aborts the run and ends the
        driver with ``sys.exit`` (or returns the last checkpoint as if training had finished),
        which skipped the jobs' "interrupted" line and recorded the round's error as "1"."""

        interrupted = False

        def _register_sigint_handler(self, controller: Any) -> None:
            super()._register_sigint_handler(controller)  # type: ignore[misc]
            rays = signal.getsignal(signal.SIGINT)

            def handler(signum: int, frame: Any) -> None:
                Trainer.interrupted = True
                if callable(rays):
                    rays(signum, frame)

            signal.signal(signal.SIGINT, handler)

    trainer = Trainer(
        _ray_entry,
        # A shallow copy: dataclasses.asdict(job) would turn the config into a dict too.
        train_loop_config=dict(job.__dict__),
        # Not Ray's TorchConfig: that made the controller import torch (see the module).
        torch_config=TorchProcessGroup(),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=RunConfig(
            name=TRAIN_DIR, storage_path=storage_path, storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    previous = signal.getsignal(signal.SIGINT)
    try:
        result = trainer.fit()
    except BaseException as e:
        if Trainer.interrupted:  # Ray's handler aborted the run: say it as any Ctrl-C is said
            raise KeyboardInterrupt from None
        if isinstance(e, Exception):  # Ray wraps the worker's exception; show its last line
            raise training_error(e) from e
        raise
    finally:
        if previous is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, previous)  # Ray's handler would outlive its run
    if Trainer.interrupted:
        raise KeyboardInterrupt
    if result.checkpoint is None:
        raise RunError("training finished without a checkpoint; see the log above")
    return Path(result.checkpoint.to_directory(tempfile.mkdtemp(prefix="ns-final-")))


def training_error(e: BaseException) -> RunError:
    """What ``fit`` raises for an exception out of Ray Train: RunError with the worker's line and,
    unless that line is one of our user errors (which name their fix), how to go on."""
    text = "\n".join(str(x) for x in _chain(e))
    full = re.search(r"\[Errno (28|122)\] [^:\n]*(?:: '([^'\n]*)')?", text)
    if full:  # ENOSPC, EDQUOT: raised in a worker, crossed Ray's process boundary as text
        what = "no space left on device" if full.group(1) == "28" else "disk quota exceeded"
        where = f" writing {full.group(2)}" if full.group(2) else ""
        return RunError(f"training failed: {what}{where} on a training worker (Ray Train writes "
                        "checkpoints to a local temporary folder, then under --root); free space "
                        "there and run the same command again: finished stages and files are "
                        "kept")
    if re.search(r"CUDA out of memory|OutOfMemoryError: CUDA", text):
        return RunError("training failed: a training worker ran out of GPU memory; lower "
                        "--batch-size (or --train-resolution), or use GPUs with more memory: "
                        "run as it is, it fails the same way (finished stages are kept)")
    if re.search(r"running low on memory|address the out of memory issue", text):
        return RunError("training failed: a training worker ran out of memory and Ray's memory "
                        "monitor ended it; lower --batch-size, --train-resolution or "
                        "--loader-workers, or use nodes with more memory: run as it is, it fails "
                        "the same way (finished stages are kept)")
    cause, ours = _root_cause(e)
    if ours:
        return RunError(f"training failed: {cause}")
    # A lost worker, a crash: no fix of the input to name, so say how to go on.
    if re.search(r"actor is dead|worker process has died|unexpectedly exit", text):
        cause = ("a training worker's process died (killed by the out-of-memory killer, `ray "
                 "stop --force` or a signal, or crashed; Ray's lines above say which)")
    elif len(cause) > MAX_CAUSE_CHARS:
        cause = cause[: MAX_CAUSE_CHARS - 3].rstrip() + "..."
    return TrainingCrash(f"training failed: {cause}; the round is recorded as failed: run the "
                         "same command again to continue from its last checkpoint "
                         "(--max-failures N lets Ray Train restart lost workers by itself)")


_USER_ERRORS = ("ShardError", "DatasetError", "ValueError", "CheckpointError", "PseudoFileError")
MAX_CAUSE_CHARS = 300  # Ray's worker-death text runs to several hundred characters


def _root_cause(e: BaseException) -> tuple[str, bool]:
    """The most useful single line of a (possibly Ray-wrapped) worker exception, and whether it
    is one of our user errors (whose message names its own fix).

    Ray Train raises its own error *from* the worker's (whose text, a RayTaskError's, holds the
    worker's traceback), or one with ``worker_failures``; the whole cause chain is searched for
    our user errors, the innermost last, so that its message wins.
    """
    chain = _chain(e)
    for x in reversed(chain):  # the worker's own exception, as Ray Train V2 hands it back
        if type(x).__name__ in _USER_ERRORS and type(x).__module__.startswith("pipeline."):
            return (str(x).strip().splitlines() or [type(x).__name__])[-1], True
    texts = [str(x) for x in chain]
    text = "\n".join(texts)
    for name in _USER_ERRORS:
        m = re.findall(rf"{name}: (.+)", text)
        if m:
            return m[-1].strip(), True
    lines = [ln.strip() for ln in texts[-1].splitlines() if ln.strip()]
    return (lines[-1] if lines else type(chain[-1]).__name__), False


def _chain(e: BaseException) -> list[BaseException]:
    """``e`` and its causes, into Ray Train V2's ``worker_failures``; bounded (chains can loop)."""
    out: list[BaseException] = []
    cur: BaseException | None = e
    while cur is not None and len(out) < 8:
        failures = getattr(cur, "worker_failures", None)
        if failures:
            cur = next(iter(failures.values()))
        out.append(cur)
        cur = cur.__cause__
    return out

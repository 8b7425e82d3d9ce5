"""The per-worker training loop: plain PyTorch, shared by the teacher and the students.

Ray appears only through two small objects passed in: a :class:`WorkerContext` (rank, world size,
device, all-reduce) and a reporter (resume checkpoint in, metrics + checkpoint out). Tests call
:func:`train_worker` directly with :class:`LocalReporter`; ``pipeline.runner`` calls it inside
Ray Train workers.

A run has three phases, recorded in every checkpoint (:class:`RunState`) so that a restarted job
continues where it stopped: ``train`` (:func:`train_phase`, epochs of noisy training, each one
:func:`train_epoch`), ``finetune`` (:func:`finetune_phase`: FixRes, :mod:`pipeline.fixres`) and
``evaluate`` (:func:`final_evaluate`: top-1/top-5/loss on the test split, per-sample predictions
written to Parquet). :func:`run_phases` runs the ones not done yet.

Random state: the data streams reseed torch's global generator when they start (augmentation and
dropout draw from it), so the order in which streams are started and models are built below is
part of what makes a seeded run repeat its numbers; keep it when changing the loop.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from pipeline import fixres
from pipeline.batches import Batch, _student, pseudo_batch_size, test_loader, train_batches
from pipeline.checkpoint import (  # noqa: F401 - read_state, read_weights: callers import them here
    STATE_FILE,
    CheckpointError,
    load_training_state,
    read_state,
    read_weights,
    save_training_state,
)
from pipeline.config import TrainConfig
from pipeline.data import steps_per_epoch
from pipeline.events import Events
from pipeline.job import Job  # noqa: F401 - defined apart so a driver needs no torch to build it
from pipeline.optim import EMA, lr_factor, make_optimizer
from pipeline.pause import pause_point

PHASES = ("train", "finetune", "evaluate", "done")


# ----------------------------------------------------------------------------- context


@dataclass
class WorkerContext:
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    events: Events = field(default_factory=lambda: Events(None))  # rank 0's TensorBoard files

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        if self.world_size == 1:
            return values
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def ddp(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` wrapped in DistributedDataParallel when there are several ranks."""
        if self.world_size == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def log(self, msg: str) -> None:
        if self.rank == 0:
            # Not print(): Ray Train patches print in workers and the line would appear twice.
            sys.stdout.write(msg + "\n")
            sys.stdout.flush()

    def scalars(self, step: int, values: dict[str, float | int | None]) -> None:
        if self.rank == 0:
            self.events.scalars(step, values)


class Reporter(Protocol):
    def resume_dir(self) -> AbstractContextManager[str | None]:
        """The checkpoint to resume from as a local folder, readable inside the block (None
        when there is none)."""
        ...

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None: ...


class LocalReporter:
    """Keeps the latest checkpoint in ``folder`` (tests and single-process use)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.reports: list[dict[str, Any]] = []

    @contextmanager
    def resume_dir(self) -> Iterator[str | None]:
        yield str(self.folder) if (self.folder / STATE_FILE).exists() else None

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        self.reports.append(metrics)
        if checkpoint_dir is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            os.replace(Path(checkpoint_dir) / STATE_FILE, self.folder / STATE_FILE)


# ----------------------------------------------------------------------------- pieces


def topk_hits(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """How many rows have their label among the top ``k`` logits, as a 0-d tensor on the logits'
    device: summing these and reading the sum once keeps the GPU from waiting on the host."""
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices  # (B, k)
    return (top == labels[:, None]).any(dim=1).sum()


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> int:
    return int(topk_hits(logits, labels, k))


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: Any, ctx: WorkerContext,
             collect: bool = False) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Top-1 / top-5 / loss summed over every rank's share of the test split."""
    model.eval()
    # loss, top1, top5 summed on the device and read once at the end (not per batch: each read
    # waits for the GPU to finish); the image count is known on the host.
    acc = torch.zeros(3, dtype=torch.float64, device=ctx.device)
    n = 0
    rows: list[dict[str, Any]] = []
    for images, labels, keys in loader:
        images = images.to(ctx.device, non_blocking=True)  # (B, 3, R, R)
        labels = labels.to(ctx.device)  # (B,)
        with _autocast(ctx.device):
            logits = model(_channels_last(images)).float()  # (B, C)
        acc += torch.stack([F.cross_entropy(logits, labels, reduction="sum"),
                            topk_hits(logits, labels, 1), topk_hits(logits, labels, 5)])
        n += len(labels)
        if collect:
            prob = logits.softmax(dim=1)
            conf, pred = prob.max(dim=1)  # (B,), (B,)
            rows += [{"key": k, "label": int(y), "pred": int(p), "confidence": float(c)}
                     for k, y, p, c in zip(keys, labels.tolist(), pred.tolist(), conf.tolist(),
                                           strict=True)]
    loss, top1, top5, n = ctx.all_reduce_sum([*acc.tolist(), float(n)])
    _check_unevaluated(getattr(loader, "dataset", None), int(n))
    n = max(n, 1.0)
    return {"top1": top1 / n, "top5": top5 / n, "loss": loss / n, "n": int(n)}, rows


def _check_unevaluated(stream: Any, evaluated: int) -> None:
    """Every rank, from the images all ranks evaluated: the test split's damage limit. Each
    rank's reader judges only the damage it met (against the whole split), so damage spread
    over the ranks is seen here, at the first evaluation, on one worker or many."""
    total = getattr(stream, "split_count", None)
    limit = getattr(stream, "damage_limit", None)
    if not total or limit is None or total - evaluated <= limit * total:
        return
    from pipeline.shards import ShardError

    missed = total - evaluated
    raise ShardError(f"test split: {missed} of the {total} samples dataset.json lists were not "
                     f"evaluated, damaged or gone ({missed / total:.1%} > --damage-limit "
                     f"{limit:g}); the preflight (or a run on one worker) names the shards: "
                     "repair or remove them from dataset.json, or raise --damage-limit")


def _autocast(device: torch.device) -> Any:
    # bf16 autocast only on GPU: on CPU it is slower for these small convolutions.
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" \
        else torch.autocast("cpu", enabled=False)


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    # channels_last on CPU too: the depthwise-conv backward is about 2x faster in that layout.
    return x.contiguous(memory_format=torch.channels_last)


# ----------------------------------------------------------------------------- job and state


@dataclass
class RunState:
    """Where a run stands; a plain dict of it is in every checkpoint (:func:`read_state`)."""

    phase: str = "train"
    epoch: int = 0  # epochs done
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    finetune: dict[str, Any] = field(default_factory=dict)
    resumed_from: list[dict[str, Any]] = field(default_factory=list)
    train_metrics: dict[str, Any] | None = None
    final_metrics: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        # The metrics keys appear once set, as readers of older checkpoints know them.
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class Learner:
    """The model, its EMA and its optimizer: what a checkpoint holds besides the RunState."""

    model: torch.nn.Module
    ema: EMA | None
    optimizer: torch.optim.Optimizer


def peak_lr(cfg: TrainConfig, world_size: int) -> float:
    # The ranks actually running, not cfg.num_workers (TrainConfig.peak_lr): the lr follows the
    # global batch, and an in-process run has one rank whatever the config says.
    return cfg.lr if cfg.lr is not None else cfg.lr_per_256 * cfg.batch_size * world_size / 256


def pseudo_weight(cfg: TrainConfig) -> float:
    s = _student(cfg)
    return float(s.unlabel_ratio if s.pseudo_loss_weight is None else s.pseudo_loss_weight)


def train_steps(job: Job, world_size: int) -> int:
    """Steps per epoch: one pass over the labeled split, for a student too, as the official code
    counts (its warm-up and decay are in those epochs); ``--student-epoch pseudo`` makes a
    student's epoch one pass over its pseudo-labeled copies instead."""
    cfg = job.config
    if job.pseudo is not None and _student(cfg).student_epoch == "pseudo":
        return steps_per_epoch(job.pseudo["count"], pseudo_batch_size(cfg), world_size)
    return steps_per_epoch(job.labeled["count"], cfg.batch_size, world_size)


def build_learner(job: Job, ctx: WorkerContext, *, init: bool = True) -> Learner:
    """Model (from ``job.init`` when ``init`` and the job has one), EMA and optimizer."""
    from models import create_model

    cfg = job.config
    torch.manual_seed(cfg.seed)
    model = create_model(job.model["name"], job.num_classes, dropout=job.model["dropout"],
                         drop_path=job.model["drop_path"], **job.model.get("options", {}))
    if init and job.init is not None:  # before the EMA copies the weights
        from models.weights import InitPlan, load_init

        load_init(model, InitPlan(**job.init))
    model = model.to(ctx.device).to(memory_format=torch.channels_last)
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    optimizer = make_optimizer(model.parameters(), cfg.optimizer, peak_lr(cfg, ctx.world_size),
                               cfg.weight_decay)
    return Learner(model, ema, optimizer)


# ----------------------------------------------------------------------------- phases


def step_on_device(model: torch.nn.Module, optimizer: torch.optim.Optimizer, labeled: Batch,
                   pseudo: Batch | None, *, cfg: TrainConfig,
                   device: torch.device) -> dict[str, Any]:
    """One optimizer step on a labeled batch (B) and, for a student, a pseudo-labeled one (U).

    Returns the step's metrics without reading anything back from the device: ``loss``,
    ``labeled_loss``, ``pseudo_loss`` (0 for a teacher) and ``correct`` (labeled top-1 hits) as
    detached 0-d tensors, ``n`` (labeled images) and ``images`` (all of them) as ints. A read of a
    GPU value (.item(), int(), float()) makes the host wait for every queued kernel, which
    stalls the step after it; :func:`train_epoch` sums these on the device instead."""
    from pipeline.losses import noisy_student_loss

    images, labels = labeled[0].to(device), labeled[1].to(device)  # (B, 3, R, R), (B,)
    if pseudo is not None:
        p_images, p_targets = pseudo[0].to(device), pseudo[1].to(device)  # (U, 3, R, R), (U, C)
        batch = torch.cat([images, p_images])  # (B + U, 3, R, R): one forward, BatchNorm sees both
        with _autocast(device):
            logits = model(_channels_last(batch)).float()  # (B + U, C)
        loss, labeled_loss, pseudo_loss = noisy_student_loss(
            logits[: len(images)], labels, logits[len(images):], p_targets,
            unlabel_ratio=pseudo_weight(cfg), label_smoothing=cfg.label_smoothing)
    else:
        with _autocast(device):
            logits = model(_channels_last(images)).float()  # (B, C)
        loss = labeled_loss = F.cross_entropy(logits, labels, label_smoothing=cfg.label_smoothing)
        pseudo_loss = torch.zeros((), device=logits.device)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    correct = topk_hits(logits[: len(images)].detach(), labels, 1)
    return {"loss": loss.detach(), "labeled_loss": labeled_loss.detach(),
            "pseudo_loss": pseudo_loss.detach(), "correct": correct, "n": len(images),
            "images": len(logits)}


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, labeled: Batch,
               pseudo: Batch | None, *, cfg: TrainConfig, device: torch.device) -> dict[str, float]:
    """:func:`step_on_device` with its metrics read as Python numbers (one step on its own, as
    tests take it; the epoch loop reads its sums once per epoch instead)."""
    out = step_on_device(model, optimizer, labeled, pseudo, cfg=cfg, device=device)
    return {k: v.item() if isinstance(v, torch.Tensor) else v for k, v in out.items()}


# The metrics train_epoch sums, in the order it returns them.
EPOCH_SUMS = ("loss", "correct", "n", "images", "pseudo_loss")


def train_epoch(learner: Learner, net: torch.nn.Module, batches: Iterator[tuple[Batch, Any]], *,
                cfg: TrainConfig, ctx: WorkerContext, epoch: int, steps: int,
                base_lr: float) -> tuple[list[float], float]:
    """Epoch ``epoch`` (0-based): ``steps`` steps of ``net`` (the model, DDP-wrapped on several
    ranks), each setting the scheduled lr and updating the EMA. Returns the sums over all ranks
    of :data:`EPOCH_SUMS` (loss, labeled correct, labeled images, images, pseudo loss), and the
    last lr.

    The loop logs once per epoch, so its metrics are read from the device once per epoch: the
    losses and hit counts are summed on the device (float64, exact for counts) and copied to
    the host in one transfer after the last step; nothing in a step waits for the GPU."""
    net.train()
    acc = torch.zeros(3, dtype=torch.float64, device=ctx.device)  # loss, correct, pseudo loss
    n = images = 0
    lr = base_lr
    for i in range(steps):
        f = lr_factor(epoch * steps + i, steps_per_epoch=steps, warmup_epochs=cfg.warmup_epochs,
                      total_epochs=cfg.epochs, schedule=cfg.schedule, decay_rate=cfg.decay_rate,
                      decay_epochs=cfg.decay_epochs)
        lr = base_lr * f
        for g in learner.optimizer.param_groups:
            g["lr"] = lr
        labeled, pseudo = next(batches)
        out = step_on_device(net, learner.optimizer, labeled, pseudo, cfg=cfg, device=ctx.device)
        if learner.ema is not None:
            learner.ema.update(learner.model)
        acc += torch.stack([out["loss"], out["correct"], out["pseudo_loss"]])
        n += out["n"]
        images += out["images"]
    loss, correct, pseudo_loss = acc.tolist()  # the epoch's one read from the device
    return ctx.all_reduce_sum([loss, correct, float(n), float(images), pseudo_loss]), lr


def train_phase(job: Job, ctx: WorkerContext, reporter: Reporter, learner: Learner,
                state: RunState) -> None:
    """The epochs not done yet; the last one hands the EMA weights on to the fine-tune."""
    cfg = job.config
    net = ctx.ddp(learner.model)
    steps = train_steps(job, ctx.world_size)
    batches = train_batches(job, ctx, state.epoch)
    base_lr = peak_lr(cfg, ctx.world_size)
    tests = test_loader(job, ctx)
    eval_model = learner.ema.module if learner.ema is not None else learner.model
    while state.epoch < cfg.epochs:
        epoch = state.epoch
        t0 = time.time()
        sums, lr = train_epoch(learner, net, batches, cfg=cfg, ctx=ctx, epoch=epoch,
                               steps=steps, base_lr=base_lr)
        loss, correct, n, images, pseudo_loss = sums
        seconds = time.time() - t0
        last = epoch + 1 == cfg.epochs
        if last or (epoch + 1) % cfg.eval_every == 0:
            metrics, _ = evaluate(eval_model, tests, ctx)
        else:
            metrics = {"top1": None, "top5": None, "loss": None}
        state.epoch = epoch + 1
        state.seconds["train"] = state.seconds.get("train", 0.0) + seconds
        row = {"epoch": epoch + 1, "train_loss": loss / (steps * ctx.world_size),
               "train_top1": correct / max(n, 1), "lr": lr, "images_per_s": images / seconds,
               "seconds": seconds, "test_top1": metrics["top1"], "test_top5": metrics["top5"],
               "test_loss": metrics["loss"]}
        if job.pseudo is not None:
            row["pseudo_loss"] = pseudo_loss / (steps * ctx.world_size)
        state.history.append(row)
        left = (cfg.epochs - epoch - 1) * (time.time() - t0)  # training and evaluation
        test = f" test top-1 {metrics['top1']:.4f}" if metrics["top1"] is not None else ""
        ctx.scalars(epoch + 1, {
            "train/loss": row["train_loss"], "train/pseudo_loss": row.get("pseudo_loss"),
            "train/top1": row["train_top1"], "train/lr": lr, "train/images_per_s":
            row["images_per_s"], "test/top1": metrics["top1"], "test/top5": metrics["top5"],
            "test/loss": metrics["loss"]})
        ctx.log(f"[{job.role}] epoch {epoch + 1}/{cfg.epochs} loss {row['train_loss']:.4f} "
                f"train top-1 {row['train_top1']:.3f}{test} "
                f"({images / seconds:.0f} img/s, {seconds:.1f}s, ~{left / 60:.1f} min left)")
        if last:
            if learner.ema is not None:  # from here on the EMA weights are the model
                learner.model.load_state_dict(learner.ema.module.state_dict())
            state.train_metrics = metrics
            state.phase = "finetune" if (cfg.finetune_epochs or 0) > 0 else "evaluate"
        if last or (epoch + 1) % cfg.checkpoint_every == 0:
            checkpoint_and_report(reporter, ctx, {"phase": "train", **row}, learner, state)
            pause_point("train")  # tests only (tests/test_faults.py)


def finetune_phase(job: Job, ctx: WorkerContext, reporter: Reporter, learner: Learner,
                   state: RunState) -> None:
    """FixRes (:func:`pipeline.fixres.finetune`), with the test top-1 before and after."""
    pause_point("finetune")  # tests only (tests/test_faults.py)
    t0 = time.time()
    tests = test_loader(job, ctx)
    before = state.train_metrics or evaluate(learner.model, tests, ctx)[0]
    done = fixres.finetune(learner.model, job, ctx, peak_lr=peak_lr(job.config, ctx.world_size))
    after, _ = evaluate(learner.model, tests, ctx)
    state.finetune = {"top1_before": before["top1"], "top1_after": after["top1"], **done}
    ctx.scalars(state.epoch, {"fixres/top1_before": before["top1"],
                              "fixres/top1_after": after["top1"]})
    state.seconds["finetune"] = time.time() - t0
    ctx.log(f"[{job.role}] FixRes fine-tune at {done['resolution']} px, {done['steps']} "
            f"steps: test top-1 {before['top1']:.4f} -> {after['top1']:.4f}")
    state.phase = "evaluate"
    checkpoint_and_report(reporter, ctx, {"phase": "finetune", **state.finetune}, learner, state)


def write_predictions(rows: list[dict[str, Any]], folder: str | Path, rank: int) -> Any:
    """This rank's predictions as ``folder/rank-<rank>.parquet`` (local or s3://), written
    atomically; returns its path."""
    import pandas as pd

    from pipeline.fs import location
    from pipeline.storage import atomic_write_bytes

    part = location(folder) / f"rank-{rank:05d}.parquet"
    df = pd.DataFrame(rows, columns=["key", "label", "pred", "confidence"]).astype(
        {"key": "string", "label": "int32", "pred": "int32", "confidence": "float32"})
    atomic_write_bytes(part, df.to_parquet(index=False))
    return part


def final_evaluate(job: Job, ctx: WorkerContext, reporter: Reporter, learner: Learner,
                   state: RunState) -> None:
    pause_point("evaluate")  # tests only (tests/test_faults.py)
    t0 = time.time()
    metrics, rows = evaluate(learner.model, test_loader(job, ctx), ctx, collect=True)
    if ctx.rank == 0:  # an earlier attempt's ranks beyond this one's: the driver merges them all
        from pipeline.storage import remove_numbered_beyond

        remove_numbered_beyond(job.predictions_dir, "rank-", ".parquet", ctx.world_size)
    write_predictions(rows, job.predictions_dir, ctx.rank)
    state.final_metrics = metrics
    ctx.scalars(state.epoch, {"final/top1": metrics["top1"], "final/top5": metrics["top5"]})
    state.seconds["evaluate"] = time.time() - t0
    state.phase = "done"
    ctx.log(f"[{job.role}] test top-1 {metrics['top1']:.4f} top-5 "
            f"{metrics['top5']:.4f} loss {metrics['loss']:.4f} ({metrics['n']} images)")
    checkpoint_and_report(reporter, ctx, {"phase": "evaluate", **metrics}, learner, state)


def checkpoint_and_report(reporter: Reporter, ctx: WorkerContext, metrics: dict[str, Any],
                          learner: Learner, state: RunState) -> None:
    """Every rank reports (Ray requires it); rank 0 attaches the checkpoint."""
    if ctx.rank != 0:
        reporter.report(metrics, None)
        return
    ema = learner.ema
    with tempfile.TemporaryDirectory() as d:
        save_training_state(d, model=learner.model.state_dict(),
                            ema=ema.module.state_dict() if ema is not None else None,
                            ema_updates=ema.updates if ema is not None else 0,
                            optimizer=learner.optimizer.state_dict(), state=state.to_dict())
        reporter.report(metrics, d)


def resume(learner: Learner, folder: str | Path, ctx: WorkerContext) -> RunState:
    """Load a checkpoint into ``learner``; returns its state, with this restart recorded."""
    saved = load_training_state(folder, ctx.device)
    learner.model.load_state_dict(saved.model)
    if learner.ema is not None and saved.ema is not None:
        learner.ema.module.load_state_dict(saved.ema)
        learner.ema.updates = saved.ema_updates
    if saved.state["phase"] == "train":  # later phases do not use the training optimizer
        learner.optimizer.load_state_dict(saved.optimizer)
    state = RunState(**saved.state)
    state.resumed_from.append({"phase": state.phase, "epoch": state.epoch})
    ctx.log(f"resumed from checkpoint: phase {state.phase}, {state.epoch} epoch(s) done")
    return state


def run_phases(job: Job, ctx: WorkerContext, reporter: Reporter, learner: Learner,
               state: RunState) -> RunState:
    """The phase machine: each phase moves ``state.phase`` on and checkpoints."""
    if state.phase == "train" and state.epoch >= job.config.epochs:
        # The loop would not run, and nothing would move the round on: no EMA hand-over, no
        # fine-tune, no final checkpoint. Its schedule was laid out for more epochs, too.
        raise CheckpointError(
            f"this round's checkpoint has {state.epoch} epoch(s) trained, and --epochs is now "
            f"{job.config.epochs}: give --epochs above {state.epoch} to go on (the schedule "
            "then follows the new length), or --force to start the round over")
    if state.phase == "train":
        train_phase(job, ctx, reporter, learner, state)
    if state.phase == "finetune":
        finetune_phase(job, ctx, reporter, learner, state)
    if state.phase == "evaluate":
        final_evaluate(job, ctx, reporter, learner, state)
    return state


def train_worker(job: Job, ctx: WorkerContext, reporter: Reporter) -> RunState:
    """Run (or continue) every phase of one round on this worker."""
    if not isinstance(job.config, TrainConfig):
        raise TypeError(f"Job.config must be a TrainConfig or StudentConfig, not "
                        f"{type(job.config).__name__}; pass the dataclass itself")
    torch.set_num_threads(max(1, int(job.config.cpus_per_worker)))
    with reporter.resume_dir() as folder:
        learner = build_learner(job, ctx, init=folder is None)  # a checkpoint has its own weights
        state = resume(learner, folder, ctx) if folder is not None else RunState()
    if ctx.rank == 0 and job.tensorboard_dir is not None:
        ctx.events = Events(job.tensorboard_dir)
    try:
        return run_phases(job, ctx, reporter, learner, state)
    finally:
        ctx.events.close()

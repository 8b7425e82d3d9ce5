"""FixRes: a short fine-tune at the test resolution after noisy training (Touvron et al. 2019).

Random-resized training crops make objects look larger than the test-time centre crop does, so
a model can train at a lower resolution than it is tested at (cheaper: the saving is measured and
recorded) and then be adapted to the test-time view: un-augmented labeled images at the test
resolution, shallow stages frozen (``models.freeze_shallow``), dropout and stochastic depth off.

BatchNorm statistics (``--finetune-norm``): when the training resolution differs from the test
one, the statistics of the trainable BatchNorms are re-estimated after the fine-tune, with its
final weights, as a plain average over up to ``--finetune-norm-images`` un-augmented images at
the test resolution, labeled ones first, then the unlabeled split (no labels are needed). The
official code gets there with BatchNorm's moving average over its 1.5 epochs (about 470 steps at
ImageNet scale, momentum 0.99 in TF's terms); a fine-tune of a few steps on a small labeled set
cannot, and an average taken while the weights still move describes none of them. At equal
resolutions they are kept, as the official code's frozen layers keep theirs: re-estimating them
on the clean labeled images cost 2-4 points of top-1 on a digits student (README).

Everything :func:`fixres_mode` changes on the model other than its learned weights (requires_grad,
train/eval modes, the freeze hook) is put back when it exits, and :func:`reestimate_norms`
restores modes and momenta, so the model that leaves the fine-tune behaves like any other.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from pipeline.data import LabeledStream, assign_shards, make_loader, steps_per_epoch
from pipeline.transforms import eval_min_side, eval_transform

if TYPE_CHECKING:
    from pipeline.train import Job, WorkerContext


def norm_scope(job: Job) -> str:
    """Which BatchNorms the fine-tune re-estimates: "trainable", "all" or "keep" (none);
    ``--finetune-norm auto`` is "trainable" when the resolutions differ, else "keep"."""
    mode = getattr(job.config, "finetune_norm", "auto")
    if mode != "auto":
        return mode
    return "trainable" if job.model["test_resolution"] != job.model["train_resolution"] else "keep"


def needs_recalibration(job: Job) -> bool:
    """Whether the fine-tune re-estimates BatchNorm statistics (see the module docstring)."""
    return norm_scope(job) != "keep"


def finetune_steps(job: Job, world_size: int) -> int:
    cfg = job.config
    per_epoch = steps_per_epoch(job.labeled["count"], cfg.batch_size, world_size)
    return max(1, round((cfg.finetune_epochs or 0) * per_epoch))


def finetune_batches(job: Job, ctx: WorkerContext) -> Iterator[tuple[torch.Tensor, Any, Any]]:
    """Endless un-augmented labeled batches at the test resolution: (B, 3, R, R), (B,), keys."""
    cfg, res = job.config, job.model["test_resolution"]
    stream = LabeledStream(job.labeled["shards"], eval_transform(res, cfg.eval_crop_fraction),
                           rank=ctx.rank, world_size=ctx.world_size,
                           shuffle_buffer=cfg.shuffle_buffer, seed=cfg.seed + 17,
                           num_classes=job.num_classes, damage_limit=cfg.damage_limit,
                           decode_min_side=eval_min_side(res, cfg.eval_crop_fraction,
                                                         cfg.jpeg_dct_scaling),
                           weights=job.labeled.get("weights"),
                           split_count=job.labeled.get("count"))
    return iter(make_loader(stream, cfg.batch_size, cfg.loader_workers))


def norm_batches(job: Job, ctx: WorkerContext) -> Iterator[torch.Tensor]:
    """This rank's share of the images that re-estimate BatchNorm: labeled shards first, then
    ``job.norm_shards`` (the unlabeled split), un-augmented at the test resolution, one pass, at
    most ``--finetune-norm-images`` over all ranks, in batches of ``--eval-batch-size``.
    Damaged samples are skipped (training met and counted them already)."""
    from pipeline.data import _decoded, _samples
    from pipeline.shards import Damage

    cfg = job.config
    limit = math.ceil(getattr(cfg, "finetune_norm_images", 10000) / ctx.world_size)
    res = job.model["test_resolution"]
    tf = eval_transform(res, cfg.eval_crop_fraction)
    min_side = eval_min_side(res, cfg.eval_crop_fraction, cfg.jpeg_dct_scaling)
    shards = [*job.labeled["shards"], *(job.norm_shards or [])]
    mine = assign_shards(shards, ctx.rank, ctx.world_size, exhaustive=False)
    batch: list[torch.Tensor] = []
    seen = 0
    damage = Damage()
    for s in _samples(mine, damage):
        image = _decoded(s, damage, min_side)
        if image is None:
            continue
        batch.append(tf(image))
        seen += 1
        if len(batch) == cfg.eval_batch_size or seen == limit:
            yield torch.stack(batch)  # (B, 3, R, R)
            batch = []
        if seen == limit:
            return
    if batch:
        yield torch.stack(batch)


def quiet_for_finetune(model: nn.Module, *, keep_norm_statistics: bool) -> None:
    """After ``model.train()``: dropout and stochastic depth off (the fine-tune is un-noised),
    and, when asked, every BatchNorm in eval mode so that its running statistics stay as they are
    (its affine weights still train)."""
    from torchvision.ops import StochasticDepth

    quiet: tuple[type[nn.Module], ...] = (nn.Dropout, StochasticDepth)
    if keep_norm_statistics:
        quiet += (nn.BatchNorm2d,)
    for m in model.modules():
        if isinstance(m, quiet):
            m.eval()


@torch.no_grad()
def reestimate_norms(model: nn.Module, norms: list[nn.BatchNorm2d],
                     batches: Iterator[torch.Tensor], ctx: WorkerContext) -> int:
    """Replace the running statistics of ``norms`` by their plain average over ``batches`` (the
    model's weights fixed, every other module in eval mode, so no dropout); averaged over ranks,
    each weighted by the images it used.
    Modes and momenta are restored. Returns the images this rank used (0: statistics kept)."""
    if not norms:
        return 0
    modes = [(m, m.training) for m in model.modules()]
    saved = [(n, n.momentum, n.running_mean.clone(), n.running_var.clone(),
              n.num_batches_tracked.clone()) for n in norms]
    seen = 0
    try:
        model.eval()
        for n in norms:
            n.reset_running_stats()
            n.momentum = None  # cumulative average: every batch counts the same
            n.train()
        for images in batches:
            x = images.to(ctx.device).contiguous(memory_format=torch.channels_last)
            model(x)
            seen += len(images)
    finally:
        for m, training in modes:
            m.training = training
        for n, momentum, *_ in saved:
            n.momentum = momentum
    if seen == 0:  # nothing to estimate from on this rank: keep what there was
        for n, _, mean, var, count in saved:
            n.running_mean.copy_(mean)
            n.running_var.copy_(var)
            n.num_batches_tracked.copy_(count)
    if ctx.world_size > 1:
        import torch.distributed as dist

        # Weighted by the images each rank used: a rank that saw none (it kept its old
        # statistics) adds nothing, and uneven shares count as one pool of images would.
        flat = torch.cat([torch.cat([n.running_mean, n.running_var]) for n in norms]) * seen
        flat = torch.cat([flat, flat.new_tensor([float(seen)])])
        dist.all_reduce(flat)
        total = float(flat[-1])
        if total > 0:  # else no rank saw an image: each kept the same (DDP-synced) statistics
            flat = flat[:-1] / total
            i = 0
            for n in norms:
                c = n.num_features
                n.running_mean.copy_(flat[i:i + c])
                n.running_var.copy_(flat[i + c:i + 2 * c])
                i += 2 * c
    return seen


@contextmanager
def fixres_mode(model: nn.Module, *, freeze: float, recalibrate: bool) -> Iterator[int]:
    """Put ``model`` in fine-tune mode; yields the number of frozen parameters.

    Inside: shallow stages frozen, training mode with dropout and stochastic depth off, and
    either every BatchNorm in eval mode (``recalibrate`` False: statistics kept) or the trainable
    ones normalising with batch statistics (their running statistics are re-estimated after the
    fine-tune, :func:`reestimate_norms`). On exit, also on an exception, requires_grad and every
    module's mode are restored and the freeze hook is removed.
    """
    from models import freeze_shallow

    grads = [(p, p.requires_grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    hooks: list[RemovableHandle] = []
    try:
        frozen = freeze_shallow(model, freeze, hooks=hooks)
        model.train()
        quiet_for_finetune(model, keep_norm_statistics=not recalibrate)
        yield frozen
    finally:
        for hook in hooks:
            hook.remove()
        for p, requires_grad in grads:
            p.requires_grad_(requires_grad)
        for m, training in modes:  # per module: model.train(flag) would flatten them
            m.training = training


def _trainable_norms(model: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)
            and m.weight is not None and m.weight.requires_grad]


def step_seconds(model: nn.Module, job: Job, ctx: WorkerContext,
                 resolutions: tuple[int, int], steps: int) -> dict[int, float] | None:
    """Median seconds of one training step (forward, backward, SGD update; the job's labeled plus
    pseudo-labeled batch of random images) at each resolution, on a copy of ``model``: the
    resolutions alternate step by step, so a machine shared with other work slows both alike.
    None when a step does not fit in memory at one of them. Data loading is not included: it
    does not depend on the model's resolution."""
    from pipeline.batches import pseudo_batch_size

    cfg = job.config
    batch = cfg.batch_size + (pseudo_batch_size(cfg) if job.pseudo is not None else 0)
    net = copy.deepcopy(model).train()
    for p in net.parameters():
        p.requires_grad_(True)
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    times: dict[int, list[float]] = {r: [] for r in resolutions}
    sync = torch.cuda.synchronize if ctx.device.type == "cuda" else (lambda: None)
    try:
        for i in range(steps + 1):  # the first round warms up (allocations, kernel choice)
            for r in resolutions:
                x = torch.randn(batch, 3, r, r, device=ctx.device).contiguous(
                    memory_format=torch.channels_last)
                sync()
                t0 = time.perf_counter()
                loss = net(x).float().logsumexp(dim=1).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sync()
                if i > 0:
                    times[r].append(time.perf_counter() - t0)
    except torch.cuda.OutOfMemoryError:
        return None
    finally:
        del net, opt
    return {r: statistics.median(t) for r, t in times.items()}


def training_time(model: nn.Module, job: Job, ctx: WorkerContext) -> dict[str, Any]:
    """What training at the lower resolution saved: the per-step time at each resolution
    (:func:`step_seconds`) and the seconds the training steps run would have taken more at the
    test resolution (steps x difference). Empty when the resolutions are equal or timing is off."""
    from pipeline.train import train_steps

    cfg = job.config
    low, high = job.model["train_resolution"], job.model["test_resolution"]
    steps = getattr(cfg, "finetune_timing_steps", 5)
    if low == high or steps == 0:
        return {}
    measured = step_seconds(model, job, ctx, (low, high), steps)
    if measured is None:
        return {"step_seconds": None, "note": "a step at the test resolution ran out of memory"}
    trained = cfg.epochs * train_steps(job, ctx.world_size)
    return {"step_seconds": {"train_resolution": round(measured[low], 5),
                             "test_resolution": round(measured[high], 5)},
            "step_time_ratio": round(measured[low] / measured[high], 4),
            "train_steps": trained,
            "train_seconds_saved": round(trained * (measured[high] - measured[low]), 2)}


def finetune(model: nn.Module, job: Job, ctx: WorkerContext, *, peak_lr: float) -> dict[str, Any]:
    """Fine-tune ``model`` in place at the test resolution; returns what the round records
    (steps, frozen_params, resolution, batchnorm, norm_images, and the training time the lower
    resolution saved: :func:`training_time`)."""
    cfg = job.config
    scope = norm_scope(job)
    recalibrate = scope != "keep"
    total = finetune_steps(job, ctx.world_size)
    lr = peak_lr * cfg.finetune_lr_scale
    with fixres_mode(model, freeze=cfg.finetune_freeze, recalibrate=recalibrate) as frozen:
        trainable_norms = _trainable_norms(model)
        net = ctx.ddp(model)  # after freezing: DDP only syncs what requires grad when it is built
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr,
                              momentum=0.9)
        batches = finetune_batches(job, ctx)
        for i in range(total):
            images, labels, _ = next(batches)  # (B, 3, R, R) float, (B,) int
            for g in opt.param_groups:
                g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * i / total))
            # No autocast, unlike training: the fine-tune has always run in float32, and the
            # accuracies measured for it (README) are from that.
            x = images.to(ctx.device).contiguous(memory_format=torch.channels_last)
            loss = F.cross_entropy(net(x), labels.to(ctx.device),
                                   label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    norms = {"keep": [], "trainable": trainable_norms,
             "all": [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]}[scope]
    seen = reestimate_norms(model, norms, norm_batches(job, ctx), ctx)
    used = int(ctx.all_reduce_sum([float(seen)])[0])
    return {"steps": total, "frozen_params": frozen, "resolution": job.model["test_resolution"],
            "train_resolution": job.model["train_resolution"],
            "batchnorm": "kept" if not used else f"re-estimated ({scope})",
            "norm_images": used, **training_time(model, job, ctx)}

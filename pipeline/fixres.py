"""FixRes: a short fine-tune at the test resolution after noisy training (Touvron et al. 2019).

Training crops make objects look larger than the test-time centre crop does, so a network trained
on them sees different activation statistics at test time. The fine-tune adapts the deep stages
and the classifier to the test-time view: un-augmented labeled images at the test resolution,
shallow stages frozen (``models.freeze_shallow``), dropout and stochastic depth off.

BatchNorm statistics are re-estimated only when the test resolution differs from the training one
(FixRes's point: the apparent object size changes the activations). At equal resolutions they are
kept: re-estimating them on the clean labeled images cost 2-4 points of top-1 on a digits student
(t1 on 180 labeled digits and 1,077 with their true labels: 97.2% before the fine-tune,
93.3-94.8% after with re-estimation, 97.4-97.6% with the statistics kept).

Everything :func:`fixres_mode` changes on the model other than its learned weights and the
re-estimated statistics (requires_grad, train/eval modes, BatchNorm momentum, the freeze hook) is
put back when it exits, so the model that leaves the fine-tune behaves like any other.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from pipeline.data import LabeledStream, make_loader, steps_per_epoch
from pipeline.transforms import eval_transform

if TYPE_CHECKING:
    from pipeline.train import Job, WorkerContext


def needs_recalibration(job: Job) -> bool:
    """Whether the fine-tune re-estimates BatchNorm statistics (see the module docstring)."""
    return job.model["test_resolution"] != job.model["train_resolution"]


def finetune_steps(job: Job, world_size: int) -> int:
    cfg = job.config
    per_epoch = steps_per_epoch(job.labeled["count"], cfg.batch_size, world_size)
    return max(1, round(cfg.finetune_epochs * per_epoch))


def finetune_batches(job: Job, ctx: WorkerContext) -> Iterator[tuple[torch.Tensor, Any, Any]]:
    """Endless un-augmented labeled batches at the test resolution: (B, 3, R, R), (B,), keys."""
    cfg = job.config
    stream = LabeledStream(job.labeled["shards"], eval_transform(job.model["test_resolution"],
                                                                 cfg.eval_crop_fraction),
                           rank=ctx.rank, world_size=ctx.world_size,
                           shuffle_buffer=cfg.shuffle_buffer, seed=cfg.seed + 17,
                           num_classes=job.num_classes, damage_limit=cfg.damage_limit)
    return iter(make_loader(stream, cfg.batch_size, cfg.loader_workers))


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


def restart_norm_statistics(model: nn.Module) -> None:
    """Restart the running statistics of the trainable BatchNorms as a plain average over the
    fine-tune batches (momentum None). The statistics of noisy training do not describe clean
    test-resolution images; with an exponential average over a dozen short steps the result
    depended on the last few batches (measured: +-1.5 points of top-1 on the digits demo)."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d) and m.weight is not None and m.weight.requires_grad:
            m.reset_running_stats()
            m.momentum = None


@contextmanager
def fixres_mode(model: nn.Module, *, freeze: float, recalibrate: bool) -> Iterator[int]:
    """Put ``model`` in fine-tune mode; yields the number of frozen parameters.

    Inside: shallow stages frozen, training mode with dropout and stochastic depth off, and
    either every BatchNorm in eval mode (statistics kept) or the trainable ones re-estimating
    theirs from scratch. On exit, also on an exception, requires_grad, every module's mode and
    every BatchNorm's momentum are restored and the freeze hook is removed.
    """
    from models import freeze_shallow

    grads = [(p, p.requires_grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    momenta = [(m, m.momentum) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    hooks: list[RemovableHandle] = []
    try:
        frozen = freeze_shallow(model, freeze, hooks=hooks)
        if recalibrate:
            restart_norm_statistics(model)  # after freezing: only the trainable norms
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
        for m, momentum in momenta:
            m.momentum = momentum


def finetune(model: nn.Module, job: Job, ctx: WorkerContext, *, peak_lr: float) -> dict[str, Any]:
    """Fine-tune ``model`` in place at the test resolution; returns what the round records
    (steps, frozen_params, resolution, batchnorm)."""
    cfg = job.config
    recalibrate = needs_recalibration(job)
    total = finetune_steps(job, ctx.world_size)
    lr = peak_lr * cfg.finetune_lr_scale
    with fixres_mode(model, freeze=cfg.finetune_freeze, recalibrate=recalibrate) as frozen:
        net = ctx.ddp(model)  # after freezing: DDP only syncs what requires grad when it is built
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr,
                              momentum=0.9)
        batches = finetune_batches(job, ctx)
        for i in range(total):
            images, labels, _ = next(batches)  # (B, 3, R, R) float, (B,) int
            for g in opt.param_groups:
                g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * i / total))
            # No autocast, unlike training: the fine-tune has always run in float32, and the
            # accuracies measured for it (module docstring) are from that.
            x = images.to(ctx.device).contiguous(memory_format=torch.channels_last)
            loss = F.cross_entropy(net(x), labels.to(ctx.device),
                                   label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return {"steps": total, "frozen_params": frozen, "resolution": job.model["test_resolution"],
            "batchnorm": "re-estimated" if recalibrate else "kept"}

"""Optimisation pieces of the training loop: the optimizers, the learning-rate schedule and the
exponential moving average of weights (docs/recipe.md gives the official values)."""

from __future__ import annotations

import copy
import math
from typing import Any

import torch


class EMA:
    """Exponential moving average of weights, with the official code's warm-up of the decay
    (min(decay, (1 + n) / (10 + n))) so short runs are not dominated by the initial weights."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay, self.updates = decay, 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """One step towards ``model``'s weights and buffers: a single fused lerp over every
        floating-point tensor (one kernel launch per dtype and device rather than one per
        tensor, which is what a per-step update costs on a GPU); counters are copied."""
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        ema, now = [], []
        for e, v in zip(self.module.state_dict().values(), model.state_dict().values(),
                        strict=True):
            if e.dtype.is_floating_point:
                ema.append(e)
                now.append(v)
            else:
                e.copy_(v)
        torch._foreach_lerp_(ema, now, 1 - d)


def make_optimizer(params: Any, name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "rmsprop":
        # TensorFlow's RMSProp, as the official code trains with it: eps inside the square root,
        # the mean square starting at 1 and the learning rate inside the momentum buffer.
        # torch.optim.RMSprop differs in all three (its first step on a small gradient is about
        # 1000x larger); timm's RMSpropTF is a maintained implementation of TF's update.
        from timm.optim import RMSpropTF

        return RMSpropTF(params, lr=lr, alpha=0.9, momentum=0.9, eps=1e-3,
                         weight_decay=weight_decay)
    # foreach=True: one multi-tensor update instead of a Python loop over the parameters.
    # PyTorch picks it by itself on a GPU but not on a CPU, where the loop cost about twice as
    # long per step for a tiny EfficientNet; the updates are identical bit for bit
    # (tests/test_optim.py), so no measured number moves.
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True,
                               weight_decay=weight_decay, foreach=True)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)
    raise ValueError(f"optimizer {name!r} is not supported; use rmsprop, sgd or adamw")


def lr_factor(step: int, *, steps_per_epoch: int, warmup_epochs: float, total_epochs: float,
              schedule: str, decay_rate: float = 0.97, decay_epochs: float = 2.4) -> float:
    """Multiplier of the peak learning rate at ``step``: linear warm-up, then decay."""
    epoch = step / steps_per_epoch
    if warmup_epochs > 0 and epoch < warmup_epochs:
        # capped: when warm-up does not end on a whole step, its last step would overshoot
        return min(1.0, (step + 1) / (warmup_epochs * steps_per_epoch))
    if schedule == "exponential":  # staircase, as the official code
        return decay_rate ** math.floor(epoch / decay_epochs)
    span = max(total_epochs - warmup_epochs, 1e-8)
    progress = min(max((epoch - warmup_epochs) / span, 0.0), 1.0)
    return 0.5 * (1 + math.cos(math.pi * progress))

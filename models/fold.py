"""Fold each BatchNorm into the convolution before it, for inference.

In eval mode a BatchNorm is a fixed per-channel affine map, ``y = (x - mean) / sqrt(var + eps)
* gamma + beta``, and the convolution before it is linear, so the two collapse into one
convolution with scaled weights and a bias: one pass over each activation map instead of two.
The teacher's labeling forward runs it (``pipeline.inference``); the outputs agree with the
unfolded model's to float rounding (the scale is applied to the weights instead of the output),
not bit for bit, and a folded model is the same every time it is folded from the same weights,
so labeling stays reproducible. Training never sees a folded model: it has no BatchNorm left to
update, and its state dict has biases the checkpoints do not.
"""

from __future__ import annotations

import torch
from torch import nn


def fold_batchnorm(model: nn.Module) -> int:
    """Fold every ``BatchNorm2d`` that directly follows an ``nn.Conv2d`` in an ``nn.Sequential``
    (torchvision's ``Conv2dNormActivation``: every BatchNorm of an EfficientNet) into that
    convolution, in place, and replace it with ``nn.Identity``. Returns how many were folded;
    any other BatchNorm is left as it is (still correct, only not folded).

    The model must be in eval mode (a BatchNorm in training mode normalises with the batch's
    statistics, which no fixed weights can reproduce).
    """
    if model.training:
        raise ValueError("fold_batchnorm needs a model in eval mode (call model.eval() first)")
    folded = 0
    for seq in model.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        names = list(seq._modules)
        for conv_name, bn_name in zip(names, names[1:], strict=False):
            conv, bn = seq._modules[conv_name], seq._modules[bn_name]
            if not (isinstance(conv, nn.Conv2d) and type(bn) is nn.BatchNorm2d
                    and bn.running_mean is not None and bn.running_var is not None):
                continue
            with torch.no_grad():
                scale = torch.rsqrt(bn.running_var + bn.eps)
                shift = -bn.running_mean * scale
                if bn.affine:
                    scale, shift = scale * bn.weight, shift * bn.weight + bn.bias
                if conv.bias is not None:
                    shift = shift + conv.bias * scale
                conv.weight.mul_(scale.view(-1, 1, 1, 1).to(conv.weight.dtype))
                conv.bias = nn.Parameter(shift.to(conv.weight.dtype), requires_grad=False)
            seq._modules[bn_name] = nn.Identity()
            folded += 1
    return folded

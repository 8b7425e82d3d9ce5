"""Depthwise convolution whose weight gradient on small CPU feature maps is a batched matmul.

Why: on a CPU, PyTorch computes a depthwise convolution's weight gradient with oneDNN, which is
fast while the feature map is large against the kernel and 4 to 11 times slower than it needs
to be once the map is no larger than the kernel's area (a 5x5 kernel on 4x4 or 2x2 maps, a 3x3
on 2x2; ``bench/depthwise.py`` measures it). The tiny family at 32 px runs its last three stages
at exactly those sizes, where these gradients took about a third of a training step.

For a depthwise convolution (one filter per channel, stride s, zero padding p)::

    grad_w[c, i, j] = sum over n, output position o of  g[n, c, o] * x_pad[n, c, o*s - p + (i, j)]

With ``M[c] = g[:, c]^T x[:, c]``, a (output positions x input positions) matrix per channel
summed over the batch (one ``torch.bmm``), each weight tap (i, j) is the sum of the entries of
``M[c]`` where input position = output position * s - p + (i, j): a fixed 0/1 matrix ``S`` of
shape (taps, output x input positions) that depends on the shapes only, so
``grad_w = M @ S^T``. When the input map has at most as many positions as the kernel has taps,
this does no more multiply-adds than the direct sum, in two dense matrix products. The input
gradient, fast in PyTorch at these sizes, stays PyTorch's.

:class:`DepthwiseConv2d` is an ``nn.Conv2d`` (same parameters, state-dict keys and
initialisation) that takes this path only where it applies (CPU, gradients wanted for the
weight, map no larger than the kernel, no dilation, zero padding) and PyTorch's everywhere else,
GPUs included. The choice depends on shapes alone, so a run is as reproducible as before; the
gradients agree with PyTorch's to float rounding (summation order), not bit for bit.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable


def uses_matmul_grad(x: torch.Tensor, conv: nn.Conv2d) -> bool:
    """Whether ``conv``'s forward on ``x`` takes the batched-matmul weight gradient."""
    kh, kw = conv.kernel_size
    return (x.device.type == "cpu" and x.dim() == 4 and torch.is_grad_enabled()
            and not torch.is_autocast_enabled("cpu")  # its forward would not be float32
            and conv.weight.requires_grad and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str) and conv.dilation == (1, 1)
            and conv.groups == conv.in_channels == conv.out_channels
            and x.dtype in (torch.float32, torch.float64)
            and x.shape[-2] * x.shape[-1] <= kh * kw)


@lru_cache(maxsize=64)
def tap_matrix(height: int, width: int, kernel: tuple[int, int], stride: tuple[int, int],
               padding: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """``S`` (taps, output x input positions): 1 where the tap links the two positions.

    Cached per shape (a few kB for the maps this path takes); callers must not modify it.
    """
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    out_h, out_w = (height + 2 * ph - kh) // sh + 1, (width + 2 * pw - kw) // sw + 1
    i = torch.arange(kh).view(kh, 1, 1, 1)
    j = torch.arange(kw).view(1, kw, 1, 1)
    oy = torch.arange(out_h).view(1, 1, out_h, 1)
    ox = torch.arange(out_w).view(1, 1, 1, out_w)
    y, x = oy * sh - ph + i, ox * sw - pw + j  # input row / column of each (tap, output position)
    y, x = torch.broadcast_tensors(y, x)  # (kh, kw, out_h, out_w)
    valid = (y >= 0) & (y < height) & (x >= 0) & (x < width)
    taps = torch.zeros(kh * kw, out_h * out_w, height * width, dtype=dtype)
    tap = (i * kw + j).expand_as(y)
    out_pos = (oy * out_w + ox).expand_as(y)
    taps[tap[valid], out_pos[valid], (y * width + x)[valid]] = 1
    return taps.view(kh * kw, -1)


class _MatmulGradDepthwise(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                stride: tuple[int, int], padding: tuple[int, int]) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding, ctx.has_bias = stride, padding, bias is not None
        return F.conv2d(x, weight, bias, stride, padding, 1, weight.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        channels, _, kh, kw = weight.shape
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                grad, x, weight, None, list(ctx.stride), list(ctx.padding), [1, 1], False,
                [0, 0], channels, [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            n, _, h, w = x.shape
            out_positions = grad.shape[-2] * grad.shape[-1]
            g = grad.permute(1, 2, 3, 0).reshape(channels, out_positions, n)
            xs = x.permute(1, 0, 2, 3).reshape(channels, n, h * w)
            pairs = torch.bmm(g, xs).view(channels, -1)  # (C, output x input positions)
            taps = tap_matrix(h, w, (kh, kw), tuple(ctx.stride), tuple(ctx.padding), x.dtype)
            grad_w = (pairs @ taps.t()).view_as(weight)  # CPU only (uses_matmul_grad)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None, None


class DepthwiseConv2d(nn.Conv2d):
    """``nn.Conv2d`` with ``groups == in_channels == out_channels``; see the module docstring."""

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor,
                      bias: torch.Tensor | None) -> torch.Tensor:
        if uses_matmul_grad(input, self):
            return _MatmulGradDepthwise.apply(input, weight, bias, self.stride, self.padding)
        return super()._conv_forward(input, weight, bias)

    @classmethod
    def replacing(cls, conv: nn.Conv2d) -> DepthwiseConv2d:
        """The same layer, sharing ``conv``'s parameters (no copy, no new initialisation)."""
        if not (conv.groups == conv.in_channels == conv.out_channels):
            raise ValueError(f"not a depthwise convolution: {conv}")
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                  conv.padding, conv.dilation, conv.groups, conv.bias is not None,
                  conv.padding_mode, device="meta")
        new.weight, new.bias = conv.weight, conv.bias
        return new


def use_matmul_depthwise(model: nn.Module) -> int:
    """Replace every depthwise ``nn.Conv2d`` of ``model`` in place; returns how many."""
    found = [(parent, name, child) for parent in model.modules()
             for name, child in parent.named_children()
             if type(child) is nn.Conv2d and child.groups > 1
             and child.groups == child.in_channels == child.out_channels]
    for parent, name, child in found:
        setattr(parent, name, DepthwiseConv2d.replacing(child))
    return len(found)

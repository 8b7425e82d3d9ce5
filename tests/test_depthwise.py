"""models/depthwise.py: the batched-matmul weight gradient of depthwise convolutions on small
CPU maps equals PyTorch's, and is taken exactly where it applies."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bench.depthwise import with_pytorch_depthwise
from models import create_model
from models.depthwise import DepthwiseConv2d, tap_matrix, use_matmul_depthwise

MATMUL = "_MatmulGradDepthwiseBackward"


def pair(channels: int, kernel: int, stride: int = 1, padding: int | None = None,
         bias: bool = False, dtype: torch.dtype = torch.float32
         ) -> tuple[nn.Conv2d, DepthwiseConv2d]:
    torch.manual_seed(0)
    padding = kernel // 2 if padding is None else padding
    plain = nn.Conv2d(channels, channels, kernel, stride, padding, groups=channels, bias=bias,
                      dtype=dtype)
    return plain, DepthwiseConv2d.replacing(copy.deepcopy(plain))


def grads(conv: nn.Conv2d, x: torch.Tensor) -> list[torch.Tensor]:
    x = x.detach().clone().requires_grad_()
    out = conv(x)
    torch.manual_seed(1)
    (out * torch.randn_like(out)).sum().backward()
    result = [x.grad, conv.weight.grad] + ([conv.bias.grad] if conv.bias is not None else [])
    conv.zero_grad(set_to_none=True)
    return result


def close(a: torch.Tensor, b: torch.Tensor, what: str = "") -> None:
    """Equal up to float32 rounding of sums in another order, relative to the tensor's scale
    (a single element that nearly cancels can differ relatively more)."""
    assert a.shape == b.shape, what
    assert (a - b).abs().max() <= 1e-5 * b.abs().max(), what


@pytest.mark.parametrize(("size", "kernel", "stride", "padding", "bias"), [
    (2, 5, 1, None, False),  # the tiny family's last stages
    (4, 5, 1, None, False),
    (2, 3, 1, None, True),
    (5, 5, 2, 0, False),  # a strided layer with TF's padding done outside (padding 0)
    (3, 3, 2, 1, True),
    (1, 3, 1, None, False),
])
@pytest.mark.parametrize("channels_last", [False, True])
def test_gradients_equal_pytorchs_where_the_matmul_path_is_taken(
        size: int, kernel: int, stride: int, padding: int | None, bias: bool,
        channels_last: bool) -> None:
    plain, ours = pair(6, kernel, stride, padding, bias)
    x = torch.randn(4, 6, size, size)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    assert type(ours(x.requires_grad_()).grad_fn).__name__ == MATMUL
    for a, b in zip(grads(ours, x), grads(plain, x), strict=True):
        close(a, b)
    torch.testing.assert_close(ours(x), plain(x), rtol=0, atol=0)  # the forward is PyTorch's


def test_gradcheck_in_double_precision() -> None:
    _, ours = pair(3, 5, bias=True, dtype=torch.float64)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: ours._conv_forward(x, w, b),
                                    (x, ours.weight, ours.bias))


def test_pytorchs_path_is_taken_everywhere_else() -> None:
    _, ours = pair(4, 3)
    small, large = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 4, 4)  # 9 and 16 positions, 9 taps
    assert type(ours(small.requires_grad_()).grad_fn).__name__ == MATMUL
    assert type(ours(large.requires_grad_()).grad_fn).__name__ != MATMUL  # map above the kernel
    with torch.no_grad():
        assert ours(small).grad_fn is None
    ours.weight.requires_grad_(False)  # frozen (FixRes): only the input gradient is wanted
    assert type(ours(small.requires_grad_()).grad_fn).__name__ != MATMUL
    ours.weight.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # PyTorch's, in bfloat16
        out = ours(small.requires_grad_())
    assert out.dtype == torch.bfloat16 and type(out.grad_fn).__name__ != MATMUL
    out.float().sum().backward()
    assert ours.weight.grad is not None
    dilated = DepthwiseConv2d(4, 4, 3, padding=2, dilation=2, groups=4, bias=False)
    assert type(dilated(small.requires_grad_()).grad_fn).__name__ != MATMUL
    with pytest.raises(ValueError, match="not a depthwise convolution"):
        DepthwiseConv2d.replacing(nn.Conv2d(4, 8, 3, groups=4))


def test_tap_matrix_links_each_tap_to_the_input_position_it_reads() -> None:
    # 1x1 input, 3x3 kernel, padding 1: only the centre tap reads a real pixel
    taps = tap_matrix(1, 1, (3, 3), (1, 1), (1, 1), torch.float32)
    assert taps.shape == (9, 1) and taps.flatten().tolist() == [0, 0, 0, 0, 1, 0, 0, 0, 0]
    # 2x2 input, 3x3 kernel, padding 1: the output position (0, 0) reads input (1, 1) with the
    # bottom-right tap, and every tap pairs as many positions as the padding leaves it
    taps = tap_matrix(2, 2, (3, 3), (1, 1), (1, 1), torch.float32).view(3, 3, 4, 4)
    assert taps[2, 2, 0, 3] == 1 and taps[2, 2, 0].sum() == 1
    assert taps.sum((2, 3)).tolist() == [[1, 2, 1], [2, 4, 2], [1, 2, 1]]


def test_models_use_it_for_every_depthwise_layer_with_torchvisions_keys() -> None:
    model = create_model("efficientnet_t0", 10)
    depthwise = [m for m in model.modules() if isinstance(m, DepthwiseConv2d)]
    plain = [m for m in model.modules() if type(m) is nn.Conv2d
             and m.groups == m.in_channels == m.out_channels > 1]
    assert depthwise and not plain
    assert all(m.groups == m.in_channels == m.out_channels for m in depthwise)
    from torchvision.models.efficientnet import EfficientNet

    from models.efficientnet import _stage_configs

    torchvision_built = EfficientNet(_stage_configs(model.spec), dropout=0.2, num_classes=10)
    assert list(model.state_dict()) == list(torchvision_built.state_dict())
    assert use_matmul_depthwise(model) == 0  # nothing left to replace


def test_a_whole_model_gets_pytorchs_gradients() -> None:
    torch.manual_seed(0)
    ours = create_model("efficientnet_t0", 10, dropout=0.0, drop_path=0.0)
    plain = with_pytorch_depthwise(ours)  # the benchmark's baseline: the same weights
    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.tensor([0, 1, 2, 3])
    for model in (ours, plain):
        model.to(memory_format=torch.channels_last)
        F.cross_entropy(model(x), y).backward()
    for (name, a), b in zip(ours.named_parameters(), plain.parameters(), strict=True):
        close(a.grad, b.grad, name)

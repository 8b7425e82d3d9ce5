"""models.fold: BatchNorm folded into the convolution before it, for the teacher's labeling."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from models import create_model
from models.fold import fold_batchnorm


def _with_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """BatchNorms with running statistics and affine weights far from the identity, as after
    training (fresh ones are the identity map, which would hide a wrong formula)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in model.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.running_mean.copy_(torch.rand(bn.num_features, generator=g) - 0.5)
                bn.running_var.copy_(torch.rand(bn.num_features, generator=g) * 2 + 0.2)
                bn.weight.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
                bn.bias.copy_(torch.rand(bn.num_features, generator=g) * 0.4 - 0.2)
    return model.eval()


@pytest.mark.parametrize(("name", "res", "same_padding"), [
    ("efficientnet_t0", 32, False), ("efficientnet_t2", 32, False),
    ("efficientnet_b0", 64, True),  # TF's same padding: a pre-hook on the strided convolutions
])
def test_folded_model_gives_the_same_outputs_with_no_batchnorm_left(
        name: str, res: int, same_padding: bool) -> None:
    torch.manual_seed(0)
    model = _with_statistics(create_model(name, 10, same_padding=same_padding))
    norms = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    folded = copy.deepcopy(model)
    assert fold_batchnorm(folded) == norms > 0
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(4, 3, res, res)
    with torch.inference_mode():
        want, got = model(x), folded(x)
        got_cl = folded.to(memory_format=torch.channels_last)(
            x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_cl, want, rtol=1e-4, atol=1e-4)


def test_folding_keeps_a_convolution_bias_and_a_non_affine_norm() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, padding=1, bias=True)
    plain = nn.BatchNorm2d(5, affine=False)
    plain.running_mean.uniform_(-1, 1)
    plain.running_var.uniform_(0.5, 2)
    model = nn.Sequential(conv, plain, nn.ReLU()).eval()
    folded = copy.deepcopy(model)
    assert fold_batchnorm(folded) == 1
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


def test_a_model_in_training_mode_is_refused_and_a_lone_norm_left_alone() -> None:
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 3, 1))  # norm before, not after
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(model)
    assert fold_batchnorm(model.eval()) == 0
    assert isinstance(model[0], nn.BatchNorm2d)

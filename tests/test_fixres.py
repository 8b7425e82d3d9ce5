"""FixRes: the fine-tune is un-noised, keeps or re-estimates BatchNorm statistics by resolution,
and leaves no trace on the model other than its weights and statistics."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.ops import StochasticDepth

from models import create_model
from pipeline.dataset import DatasetInfo
from pipeline.fixres import finetune, fixres_mode, quiet_for_finetune
from pipeline.train import WorkerContext
from tests.test_train import tiny_job


def _norms(model: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


def _hooks(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules()
            if m._forward_pre_hooks or m._forward_hooks]


def test_finetune_is_unnoised_and_keeps_norm_statistics_at_equal_resolution() -> None:
    torch.manual_seed(0)
    model = create_model("efficientnet_t0", 10, dropout=0.5, drop_path=0.5).train()
    quiet_for_finetune(model, keep_norm_statistics=True)
    noise = [m for m in model.modules() if isinstance(m, torch.nn.Dropout | StochasticDepth)]
    norms = _norms(model)
    assert noise and not any(m.training for m in noise)
    assert norms and not any(m.training for m in norms)
    before = [n.running_mean.clone() for n in norms]
    x = torch.randn(4, 3, 32, 32)
    out = model(x)
    assert all(torch.equal(a, n.running_mean) for a, n in zip(before, norms, strict=True))
    assert torch.equal(out, model(x))  # deterministic: no dropout, no dropped blocks
    out.sum().backward()  # BatchNorm's affine weights still learn
    assert norms[-1].weight.grad is not None

    # re-estimating: the norms train (batch statistics), the noise stays off
    model.train()
    quiet_for_finetune(model, keep_norm_statistics=False)
    assert all(m.training for m in norms) and not any(m.training for m in noise)


@pytest.mark.parametrize("recalibrate", [False, True])
def test_fixres_mode_undoes_every_change(recalibrate: bool) -> None:
    torch.manual_seed(0)
    model = create_model("efficientnet_t0", 10, dropout=0.5, drop_path=0.5).eval()
    model.classifier.train()  # a mixed state, to see that each module gets its own mode back
    model.classifier[1].bias.requires_grad_(False)  # frozen by someone else: stays frozen
    grads = [p.requires_grad for p in model.parameters()]
    modes = [m.training for m in model.modules()]
    momenta = [n.momentum for n in _norms(model)]
    assert _hooks(model) == []
    with fixres_mode(model, freeze=0.5, recalibrate=recalibrate) as frozen:
        assert frozen == sum(p.numel() for p in model.features[:4].parameters())
        assert not any(p.requires_grad for p in model.features[:4].parameters())
        assert _hooks(model) == ["features"]  # freeze_shallow's pre-hook
        deep = model.features[-1][1]
        assert (deep.momentum is None) == recalibrate
        assert deep.training == recalibrate
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        model(torch.randn(4, 3, 32, 32)).sum().backward()
        opt.step()
        assert not model.features[0][1].training  # the hook keeps frozen norms in eval mode
    assert _hooks(model) == []
    assert [p.requires_grad for p in model.parameters()] == grads
    assert [m.training for m in model.modules()] == modes
    assert [n.momentum for n in _norms(model)] == momenta
    model.train()
    model(torch.randn(4, 3, 32, 32))
    assert all(n.training for n in _norms(model))  # nothing forces the shallow norms any more


def test_fixres_mode_undoes_on_an_exception() -> None:
    model = create_model("efficientnet_t0", 10).eval()
    momenta = [n.momentum for n in _norms(model)]
    with pytest.raises(RuntimeError, match="boom"), \
            fixres_mode(model, freeze=1.0, recalibrate=True):
        raise RuntimeError("boom")
    assert _hooks(model) == []
    assert all(p.requires_grad for p in model.parameters())
    assert not any(m.training for m in model.modules())
    assert [n.momentum for n in _norms(model)] == momenta


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(("test_resolution", "batchnorm"), [(32, "kept"), (40, "re-estimated")])
def test_finetune_trains_the_deep_stages_only(digits_info: DatasetInfo, tmp_path: Path,
                                              test_resolution: int, batchnorm: str) -> None:
    job = tiny_job(digits_info, tmp_path, finetune_epochs=0.5)
    job.model["test_resolution"] = test_resolution
    torch.manual_seed(0)
    model = create_model("efficientnet_t0", 10).to(memory_format=torch.channels_last).eval()
    before = _snapshot(model)
    done = finetune(model, job, WorkerContext(), peak_lr=0.1)
    assert done["batchnorm"] == batchnorm and done["resolution"] == test_resolution
    assert done["steps"] == 3 and done["frozen_params"] > 0  # half of 180 images / 32 a batch
    after = model.state_dict()
    shallow = [k for k in before if k.startswith(("features.0.", "features.1.", "features.2.",
                                                  "features.3."))]
    assert shallow and all(torch.equal(before[k], after[k]) for k in shallow)
    assert not torch.equal(before["classifier.1.weight"], after["classifier.1.weight"])
    deep_mean = "features.8.1.running_mean"  # the head conv's BatchNorm, trainable
    assert torch.equal(before[deep_mean], after[deep_mean]) == (batchnorm == "kept")
    assert _hooks(model) == [] and all(p.requires_grad for p in model.parameters())
    assert [n.momentum for n in _norms(model)] == [n.momentum for n in _norms(
        create_model("efficientnet_t0", 10))]

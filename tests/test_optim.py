"""The learning-rate schedule, the EMA of weights and the optimizer choices."""

from __future__ import annotations

import pytest
import torch

from pipeline.optim import EMA, lr_factor, make_optimizer


def test_lr_schedule_warmup_then_decay() -> None:
    kw = dict(steps_per_epoch=10, warmup_epochs=2, total_epochs=10)
    assert lr_factor(0, schedule="cosine", **kw) == pytest.approx(1 / 20)
    assert lr_factor(19, schedule="cosine", **kw) == pytest.approx(1.0)
    assert lr_factor(20, schedule="cosine", **kw) == pytest.approx(1.0)
    assert lr_factor(60, schedule="cosine", **kw) == pytest.approx(0.5)
    assert lr_factor(100, schedule="cosine", **kw) == pytest.approx(0.0, abs=1e-9)
    # exponential: staircase 0.97 every 2.4 epochs, as the official code
    assert lr_factor(23, schedule="exponential", **kw) == pytest.approx(1.0)
    assert lr_factor(24, schedule="exponential", **kw) == pytest.approx(0.97)
    assert lr_factor(50, schedule="exponential", **kw) == pytest.approx(0.97 ** 2)


@pytest.mark.parametrize("warmup_epochs, steps_per_epoch", [(0.5, 5), (0.05, 10), (1.5, 3),
                                                            (2, 10)])
def test_warmup_never_passes_the_peak(warmup_epochs: float, steps_per_epoch: int) -> None:
    """A warm-up that does not end on a whole step (0.5 epoch of 5 steps) must not give its
    last step more than the peak learning rate."""
    for schedule in ("cosine", "exponential"):
        factors = [lr_factor(s, steps_per_epoch=steps_per_epoch, warmup_epochs=warmup_epochs,
                             total_epochs=10, schedule=schedule) for s in range(40)]
        assert max(factors) == pytest.approx(1.0)
        warm = [f for s, f in enumerate(factors) if s / steps_per_epoch < warmup_epochs]
        assert warm == sorted(warm) and warm[0] > 0


def test_ema_tracks_weights_with_warmup() -> None:
    m = torch.nn.Linear(2, 1, bias=False)
    torch.nn.init.zeros_(m.weight)
    ema = EMA(m, decay=0.9)
    with torch.no_grad():
        m.weight.fill_(1.0)
    ema.update(m)  # decay min(0.9, 2/11)
    assert float(ema.module.weight[0, 0]) == pytest.approx(1 - 2 / 11)
    for _ in range(200):
        ema.update(m)
    assert float(ema.module.weight[0, 0]) == pytest.approx(1.0, abs=1e-6)
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_unknown_optimizer_names_the_valid_ones() -> None:
    params = [torch.nn.Parameter(torch.zeros(2))]
    assert isinstance(make_optimizer(params, "sgd", 0.1, 0.0), torch.optim.SGD)
    with pytest.raises(ValueError, match="use rmsprop, sgd or adamw"):
        make_optimizer(params, "lamb", 0.1, 0.0)


def test_fused_ema_update_equals_one_lerp_per_tensor() -> None:
    from models import create_model

    torch.manual_seed(0)
    model = create_model("efficientnet_t0", 10)
    ema = EMA(model, decay=0.99)
    reference = {k: v.clone() for k, v in ema.module.state_dict().items()}
    for step in range(1, 4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        model.features[0][1].num_batches_tracked += 1
        ema.update(model)
        d = min(0.99, (1 + step) / (10 + step))
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                reference[k].lerp_(v, 1 - d)
            else:
                reference[k].copy_(v)
    for k, v in ema.module.state_dict().items():
        assert torch.equal(v, reference[k]), k


def test_rmsprop_is_tensorflows_update() -> None:
    """One step on one parameter, from TF's RMSProp equations (training_ops.cc ApplyRMSProp):
    ms = rho*ms + (1-rho)*g^2 with ms starting at 1; mom = momentum*mom + lr*g/sqrt(ms + eps);
    w -= mom. torch.optim.RMSprop (eps outside the root, ms from 0, lr outside) is far off."""
    import math

    g, lr, rho, mom, eps = 1e-4, 0.1, 0.9, 0.9, 1e-3
    w = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = make_optimizer([w], "rmsprop", lr, 0.0)
    ms_tf, mom_tf, w_tf = 1.0, 0.0, 0.0
    for step in range(3):
        w.grad = torch.full_like(w, g)
        opt.step()
        ms_tf = rho * ms_tf + (1 - rho) * g * g
        mom_tf = mom * mom_tf + lr * g / math.sqrt(ms_tf + eps)
        w_tf -= mom_tf
        got = float(w.detach())
        assert got == pytest.approx(w_tf, rel=1e-6)
        if step == 0:
            assert got == pytest.approx(-1.05e-5, rel=5e-3)
    torch_w = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    torch_w.grad = torch.full_like(torch_w, g)
    torch.optim.RMSprop([torch_w], lr=lr, alpha=rho, momentum=mom, eps=eps).step()
    assert float(torch_w.detach()) < -9e-3  # the step the official code never takes


@pytest.mark.parametrize("name, cls", [("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD)])
def test_multi_tensor_updates_equal_the_per_parameter_loop(name: str, cls: type) -> None:
    """make_optimizer asks for the foreach (multi-tensor) update, which PyTorch does not choose
    on a CPU by itself; it must train exactly as the per-parameter loop does."""
    import copy

    from models import create_model

    torch.manual_seed(0)
    base = create_model("efficientnet_t0", 10)
    ours, loop = copy.deepcopy(base), copy.deepcopy(base)
    opt = make_optimizer(ours.parameters(), name, 3e-3, 0.05)
    assert opt.defaults["foreach"] is True
    kw = {"momentum": 0.9, "nesterov": True} if name == "sgd" else {}
    ref = cls(loop.parameters(), lr=3e-3, weight_decay=0.05, foreach=False, **kw)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)
        for model, o in ((ours, opt), (loop, ref)):
            torch.manual_seed(2)  # the same dropout draws in both
            o.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            o.step()
    a, b = ours.state_dict(), loop.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["classifier.1.weight"], base.state_dict()["classifier.1.weight"])

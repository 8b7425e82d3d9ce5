"""FixRes: the fine-tune is un-noised, keeps or re-estimates BatchNorm statistics by resolution
(re-estimated ones are the test resolution's), leaves no trace on the model other than its
weights and statistics, and a round records top-1 before and after it and the time saved."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.ops import StochasticDepth

from models import create_model
from pipeline.dataset import DatasetInfo
from pipeline.fixres import finetune, fixres_mode, quiet_for_finetune, reestimate_norms
from pipeline.train import LocalReporter, WorkerContext, read_state, train_worker
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
        assert deep.training == recalibrate  # batch statistics while the weights move
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


@pytest.mark.parametrize(("test_resolution", "batchnorm"),
                         [(32, "kept"), (40, "re-estimated (trainable)")])
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
    # re-estimated on every labeled image (this job names no unlabeled shards)
    assert done["norm_images"] == (180 if test_resolution != 32 else 0)
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


def _inputs_stats(model: nn.Module, norms: list[nn.BatchNorm2d],
                  batches: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per norm, the average over ``batches`` of its input's per-channel mean and unbiased
    variance, seen in the mode re-estimation runs in (everything eval, ``norms`` on batch
    statistics), on a copy: what the running statistics must be afterwards."""
    import copy

    ref = copy.deepcopy(model).eval()
    ref_norms = [dict(ref.named_modules())[n] for n in _names(model, norms)]
    seen: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {i: [] for i in range(len(norms))}

    def hook(i: int):  # noqa: ANN202 - a hook factory
        def record(_m: nn.Module, args: tuple) -> None:
            x = args[0].double()  # (B, C, H, W)
            seen[i].append((x.mean(dim=(0, 2, 3)), x.transpose(0, 1).flatten(1).var(dim=1)))
        return record

    handles = [n.register_forward_pre_hook(hook(i)) for i, n in enumerate(ref_norms)]
    for n in ref_norms:
        n.train()
    with torch.no_grad():
        for x in batches:
            ref(x)
    for h in handles:
        h.remove()
    return [(torch.stack([m for m, _ in seen[i]]).mean(0),
             torch.stack([v for _, v in seen[i]]).mean(0)) for i in range(len(norms))]


def _names(model: nn.Module, modules: list[nn.Module]) -> list[str]:
    by_id = {id(m): name for name, m in model.named_modules()}
    return [by_id[id(m)] for m in modules]


def test_reestimated_statistics_are_those_of_the_test_resolution() -> None:
    """After re-estimation every chosen BatchNorm holds the mean and variance of its inputs at the
    test resolution (averaged over the batches), not the ones it had; the others are untouched."""
    torch.manual_seed(0)
    model = create_model("efficientnet_t0", 10)
    model.train()  # statistics of "training-resolution" images: 24 px, brighter
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 3, 24, 24) + 1.0)
    model.eval()
    norms = _norms(model)
    deep, shallow = norms[len(norms) // 2:], norms[: len(norms) // 2]
    before = {id(n): (n.running_mean.clone(), n.running_var.clone()) for n in norms}
    batches = [torch.randn(24, 3, 32, 32) for _ in range(2)]
    expected = _inputs_stats(model, deep, batches)
    used = reestimate_norms(model, deep, iter(batches), WorkerContext())
    assert used == 48
    for n, (mean, var) in zip(deep, expected, strict=True):
        # BatchNorm sums in float32, the reference in float64; how the float32 sums round
        # depends on torch's thread count (up to ~2e-4 relative with one thread).
        assert torch.allclose(n.running_mean.double(), mean, atol=1e-5, rtol=1e-3)
        assert torch.allclose(n.running_var.double(), var, atol=1e-5, rtol=1e-3)
        old_mean, old_var = before[id(n)]
        assert not (torch.allclose(n.running_mean, old_mean, atol=1e-3)
                    and torch.allclose(n.running_var, old_var, rtol=1e-2))
    for n in shallow:
        assert torch.equal(n.running_mean, before[id(n)][0])
        assert torch.equal(n.running_var, before[id(n)][1])
    # modes and momenta as they were; an empty stream keeps the statistics
    assert not any(m.training for m in model.modules())
    assert all(n.momentum == 0.1 for n in norms)
    kept = [n.running_mean.clone() for n in deep]
    assert reestimate_norms(model, deep, iter([]), WorkerContext()) == 0
    assert all(torch.equal(a, n.running_mean) for a, n in zip(kept, deep, strict=True))


def _two_rank_reestimate(rank: int, init: str, out: str, second_rank_batches: int) -> None:
    """One of 2 gloo ranks: rank 0 re-estimates from 2 batches, rank 1 from the number given."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        model, batches = _tiny_bn_model_and_batches()
        mine = batches[:2] if rank == 0 else batches[2:2 + second_rank_batches]
        reestimate_norms(model, [model[1]], iter(mine), WorkerContext(rank=rank, world_size=2))
        torch.save({"mean": model[1].running_mean, "var": model[1].running_var},
                   f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _tiny_bn_model_and_batches() -> tuple[nn.Sequential, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).eval()
    model[1].running_mean.fill_(5.0)  # "training-resolution" statistics, far from the batches'
    return model, [torch.randn(8, 3, 4, 4) + i for i in range(3)]


@pytest.mark.slow
@pytest.mark.parametrize("second_rank_batches", [0, 1])
def test_reestimation_over_ranks_weighs_each_by_its_images(tmp_path: Path,
                                                           second_rank_batches: int) -> None:
    """Two ranks: the statistics are those of all their images together. A rank with none used
    to average its old statistics in with the same weight as the others' new ones."""
    import torch.multiprocessing as mp

    mp.spawn(_two_rank_reestimate, nprocs=2, args=(
        f"file://{tmp_path / 'rendezvous'}", str(tmp_path), second_rank_batches))
    model, batches = _tiny_bn_model_and_batches()
    reestimate_norms(model, [model[1]], iter(batches[:2 + second_rank_batches]), WorkerContext())
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert torch.allclose(got["mean"], model[1].running_mean, atol=1e-6)
        assert torch.allclose(got["var"], model[1].running_var, atol=1e-6)


@pytest.mark.parametrize("scope", ["trainable", "all"])
def test_finetune_reestimates_the_chosen_norms_on_labeled_and_unlabeled_images(
        digits_info: DatasetInfo, tmp_path: Path, scope: str) -> None:
    job = tiny_job(digits_info, tmp_path, finetune_epochs=0.5, finetune_norm=scope,
                   finetune_timing_steps=0)
    job.norm_shards = digits_info.splits["unlabeled"].shards
    torch.manual_seed(0)
    model = create_model("efficientnet_t0", 10).to(memory_format=torch.channels_last).eval()
    stem = model.features[0][1].running_mean.clone()
    done = finetune(model, job, WorkerContext(), peak_lr=0.1)
    unlabeled = digits_info.splits["unlabeled"].count
    assert done["batchnorm"] == f"re-estimated ({scope})"
    assert done["norm_images"] == 180 + unlabeled  # every labeled image, then the unlabeled ones
    assert torch.equal(stem, model.features[0][1].running_mean) == (scope == "trainable")
    assert "step_seconds" not in done  # equal resolutions: nothing was saved, nothing timed


@pytest.mark.slow
def test_a_round_below_its_test_resolution_records_fixres(digits_info: DatasetInfo,
                                                          tmp_path: Path) -> None:
    """End to end through every phase: trained at 24 px, tested at 32; the record has top-1 at
    32 px before and after the fine-tune (different: the statistics were re-estimated) and the
    measured per-step times with the seconds they saved."""
    job = tiny_job(digits_info, tmp_path, epochs=4, eval_every=4, finetune_epochs=1.0,
                   finetune_timing_steps=3)
    job.model["train_resolution"] = 24
    state = train_worker(job, WorkerContext(), LocalReporter(tmp_path / "ck"))
    ft = read_state(tmp_path / "ck")["finetune"]
    assert ft == state.finetune
    assert ft["resolution"] == 32 and ft["train_resolution"] == 24
    assert ft["top1_before"] == state.train_metrics["top1"]
    assert ft["top1_after"] == state.final_metrics["top1"]
    assert ft["top1_before"] != ft["top1_after"]
    assert ft["batchnorm"] == "re-estimated (trainable)" and ft["norm_images"] == 180
    steps = ft["step_seconds"]  # their order is not asserted: on a shared machine it can flip
    assert steps["train_resolution"] > 0 and steps["test_resolution"] > 0
    assert ft["step_time_ratio"] == pytest.approx(
        steps["train_resolution"] / steps["test_resolution"], abs=1e-3)
    assert ft["train_steps"] == 4 * 6  # 180 labeled images, 32 a step
    assert ft["train_seconds_saved"] == pytest.approx(
        24 * (steps["test_resolution"] - steps["train_resolution"]), abs=0.02)

"""The per-worker loop without Ray: schedule, EMA, shard assignment, a tiny run and its resume."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from pipeline.config import PRESETS, TrainConfig
from pipeline.data import assign_shards, steps_per_epoch
from pipeline.dataset import DatasetInfo
from pipeline.train import (
    EMA,
    Job,
    LocalReporter,
    WorkerContext,
    lr_factor,
    read_state,
    topk_correct,
    train_worker,
)


def test_assign_shards_partition_and_wrap() -> None:
    shards = [f"s{i}" for i in range(5)]
    parts = [assign_shards(shards, r, 2, exhaustive=True) for r in range(2)]
    assert parts == [["s0", "s2", "s4"], ["s1", "s3"]]
    # more readers than shards: evaluation leaves some empty, training wraps around
    assert assign_shards(shards[:2], 3, 4, exhaustive=True) == []
    assert assign_shards(shards[:2], 3, 4, exhaustive=False) == ["s1"]
    assert all(assign_shards(shards[:1], r, 8, exhaustive=False) for r in range(8))
    with pytest.raises(ValueError, match="no shards"):
        assign_shards([], 0, 1, exhaustive=False)


def test_steps_per_epoch_equal_for_all_ranks() -> None:
    assert steps_per_epoch(180, 32, 1) == 6
    assert steps_per_epoch(180, 32, 2) == 3
    assert steps_per_epoch(5, 32, 4) == 1


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


def test_topk_correct() -> None:
    logits = torch.tensor([[0.1, 0.5, 0.4], [0.9, 0.05, 0.05]])
    labels = torch.tensor([2, 0])
    assert topk_correct(logits, labels, 1) == 1
    assert topk_correct(logits, labels, 2) == 2
    assert topk_correct(logits, labels, 5) == 2  # k larger than classes


def tiny_job(info: DatasetInfo, tmp: Path, **overrides) -> Job:
    from models import get_model_spec

    cfg = dataclasses.replace(TrainConfig(**PRESETS["teacher"]["demo"]), run="t", data="x",
                              cpus_per_worker=1,
                              **{"loader_workers": 0, "checkpoint_every": 1, **overrides})
    spec = get_model_spec(cfg.model)
    split = {s: {"shards": info.splits[s].shards, "count": info.splits[s].count}
             for s in ("labeled", "test")}
    return Job(config=dataclasses.asdict(cfg), role="teacher", classes=info.classes,
               labeled=split["labeled"], test=split["test"],
               model={"name": cfg.model, "train_resolution": spec.train_resolution,
                      "test_resolution": spec.test_resolution, "dropout": spec.dropout,
                      "drop_path": cfg.drop_path},
               predictions_dir=str(tmp / "pred"))


def test_train_worker_runs_all_phases_and_learns(digits_info: DatasetInfo,
                                                 tmp_path: Path) -> None:
    # no noise and no EMA: with them, eval-mode BatchNorm needs more steps than a unit test has
    job = tiny_job(digits_info, tmp_path, epochs=12, finetune_epochs=1, eval_every=6,
                   ema_decay=0.0, drop_path=0.0, dropout=0.0)
    rep = LocalReporter(tmp_path / "ck")
    train_worker(job, WorkerContext(), rep)
    state = read_state(tmp_path / "ck")
    assert state["phase"] == "done" and state["epoch"] == 12
    assert [h["epoch"] for h in state["history"]] == list(range(1, 13))
    assert state["history"][0]["test_top1"] is None and state["history"][5]["test_top1"] > 0
    assert state["history"][-1]["train_loss"] < state["history"][0]["train_loss"]
    assert state["final_metrics"]["n"] == 540
    assert state["final_metrics"]["top1"] > 0.3  # well above chance (0.1) after 12 short epochs
    assert set(state["finetune"]) >= {"top1_before", "top1_after", "frozen_params"}
    assert state["finetune"]["batchnorm"] == "kept"  # t0 trains and tests at 32 px
    import pandas as pd

    preds = pd.read_parquet(tmp_path / "pred" / "rank-00000.parquet")
    assert len(preds) == 540 and preds.key.is_unique
    assert (preds.pred == preds.label).mean() == pytest.approx(state["final_metrics"]["top1"])
    # one report per epoch, one after the fine-tune, one after evaluation
    assert [r["phase"] for r in rep.reports] == ["train"] * 12 + ["finetune", "evaluate"]


def test_checkpoint_every_n_epochs_and_after_the_last(digits_info: DatasetInfo,
                                                      tmp_path: Path) -> None:
    job = tiny_job(digits_info, tmp_path, epochs=5, checkpoint_every=2, eval_every=10)
    rep = LocalReporter(tmp_path / "ck")
    train_worker(job, WorkerContext(), rep)
    assert [(r["phase"], r.get("epoch")) for r in rep.reports] == [
        ("train", 2), ("train", 4), ("train", 5), ("evaluate", None)]
    assert len(read_state(tmp_path / "ck")["history"]) == 5  # every epoch is still recorded


def test_train_worker_resumes_from_checkpoint(digits_info: DatasetInfo, tmp_path: Path) -> None:
    rep = LocalReporter(tmp_path / "ck")
    train_worker(tiny_job(digits_info, tmp_path, epochs=2, eval_every=5), WorkerContext(), rep)
    assert read_state(tmp_path / "ck")["phase"] == "done"
    # a longer run with the same checkpoint folder: pretend the first stopped after epoch 2
    import torch as _t

    saved = _t.load(tmp_path / "ck" / "state.pt", weights_only=True)
    saved["state"].update(phase="train", epoch=2)
    _t.save(saved, tmp_path / "ck" / "state.pt")
    rep2 = LocalReporter(tmp_path / "ck")
    train_worker(tiny_job(digits_info, tmp_path, epochs=3, eval_every=5), WorkerContext(), rep2)
    state = read_state(tmp_path / "ck")
    assert [r.get("epoch") for r in rep2.reports if r["phase"] == "train"] == [3]
    assert state["resumed_from"] == [{"phase": "train", "epoch": 2}]
    assert [h["epoch"] for h in state["history"]] == [1, 2, 3]


def test_finetune_is_unnoised_and_keeps_norm_statistics_at_equal_resolution() -> None:
    from torchvision.ops import StochasticDepth

    from models import create_model
    from pipeline.train import _quiet_for_finetune

    torch.manual_seed(0)
    model = create_model("efficientnet_t0", 10, dropout=0.5, drop_path=0.5).train()
    _quiet_for_finetune(model, keep_norm_statistics=True)
    noise = [m for m in model.modules() if isinstance(m, torch.nn.Dropout | StochasticDepth)]
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
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
    _quiet_for_finetune(model, keep_norm_statistics=False)
    assert all(m.training for m in norms) and not any(m.training for m in noise)

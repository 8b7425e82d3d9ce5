"""The per-worker loop without Ray: a tiny run of every phase, checkpoint cadence and resume."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from pipeline.config import PRESETS, TrainConfig
from pipeline.dataset import DatasetInfo
from pipeline.train import (
    Job,
    LocalReporter,
    WorkerContext,
    read_state,
    topk_correct,
    train_worker,
)


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
    return Job(config=cfg, role="teacher", classes=info.classes,
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


def test_resume_restores_model_ema_and_optimizer_exactly(digits_info: DatasetInfo,
                                                         tmp_path: Path) -> None:
    from pipeline.train import (
        RunState,
        build_learner,
        checkpoint_and_report,
        resume,
        train_batches,
        train_epoch,
    )

    job = tiny_job(digits_info, tmp_path, epochs=2, ema_decay=0.9)
    ctx, rep = WorkerContext(), LocalReporter(tmp_path / "ck")
    learner = build_learner(job, ctx)
    state = RunState(epoch=1, history=[{"epoch": 1}])
    sums, lr = train_epoch(learner, learner.model, train_batches(job, ctx, 0), cfg=job.config,
                           ctx=ctx, epoch=0, steps=2, base_lr=1e-3)
    assert len(sums) == 5 and sums[2] == 2 * job.config.batch_size and lr > 0
    checkpoint_and_report(rep, ctx, {"phase": "train"}, learner, state)
    again = build_learner(job, ctx)
    restored = resume(again, rep.resume_dir(), ctx)
    assert restored.epoch == 1 and restored.resumed_from == [{"phase": "train", "epoch": 1}]
    assert again.ema is not None and learner.ema is not None
    assert again.ema.updates == learner.ema.updates == 2
    for a, b in ((again.model, learner.model), (again.ema.module, learner.ema.module)):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(),
                                                      b.state_dict().values(), strict=True))
    saved, loaded = learner.optimizer.state_dict(), again.optimizer.state_dict()
    assert saved["param_groups"] == loaded["param_groups"]
    assert all(torch.equal(saved["state"][k]["exp_avg"], loaded["state"][k]["exp_avg"])
               for k in saved["state"])


def test_train_worker_refuses_a_config_dict(digits_info: DatasetInfo, tmp_path: Path) -> None:
    job = tiny_job(digits_info, tmp_path)
    job.config = dataclasses.asdict(job.config)  # type: ignore[assignment]
    with pytest.raises(TypeError, match="Job.config must be a TrainConfig"):
        train_worker(job, WorkerContext(), LocalReporter(tmp_path / "ck"))


def test_a_student_epoch_is_a_pass_over_the_labeled_split_by_default() -> None:
    from pipeline.config import StudentConfig
    from pipeline.train import train_steps

    def job(**cfg) -> Job:
        config = StudentConfig(run="r", data="d", model="efficientnet_t0", batch_size=32,
                               unlabel_ratio=3.0, **cfg)
        return Job(config=config, role="student", classes=[str(i) for i in range(10)],
                   labeled={"shards": ["l"], "count": 90}, test={"shards": ["t"], "count": 9},
                   model={}, predictions_dir="p",
                   pseudo={"shards": ["u"], "dir": "x", "count": 1000})

    assert train_steps(job(), 1) == 3  # ceil(90 / 32): the official steps_per_epoch
    assert train_steps(job(), 2) == 2  # the global batch: 64
    assert train_steps(job(student_epoch="pseudo"), 1) == 11  # ceil(1000 / 96)

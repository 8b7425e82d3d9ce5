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


@pytest.mark.slow
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


@pytest.mark.slow
def test_the_same_seed_gives_the_same_weights_and_numbers(digits_info: DatasetInfo,
                                                           tmp_path: Path) -> None:
    """README: a run is deterministic on one installation. Two runs of the loop with one seed
    (noise on: dropout, stochastic depth, EMA) end with identical weights and metrics; another
    seed does not."""
    def run(name: str, seed: int) -> dict:
        job = tiny_job(digits_info, tmp_path / name, epochs=2, eval_every=5, seed=seed,
                       finetune_epochs=0)
        train_worker(job, WorkerContext(), LocalReporter(tmp_path / name / "ck"))
        return torch.load(tmp_path / name / "ck" / "state.pt", weights_only=True)

    a, b, other = run("a", 3), run("b", 3), run("c", 4)
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
        assert not all(torch.equal(a[key][k], other[key][k]) for k in a[key]), key
    assert a["state"]["final_metrics"] == b["state"]["final_metrics"]
    losses = [[h["train_loss"] for h in s["state"]["history"]] for s in (a, b, other)]
    assert losses[0] == losses[1] != losses[2]


@pytest.mark.slow
def test_checkpoint_every_n_epochs_and_after_the_last(digits_info: DatasetInfo,
                                                      tmp_path: Path) -> None:
    job = tiny_job(digits_info, tmp_path, epochs=5, checkpoint_every=2, eval_every=10)
    rep = LocalReporter(tmp_path / "ck")
    # an earlier attempt on 3 ranks left rank 2's predictions; the driver merges every file
    (tmp_path / "pred").mkdir()
    (tmp_path / "pred" / "rank-00002.parquet").write_bytes(b"stale")
    train_worker(job, WorkerContext(), rep)
    assert [(r["phase"], r.get("epoch")) for r in rep.reports] == [
        ("train", 2), ("train", 4), ("train", 5), ("evaluate", None)]
    assert len(read_state(tmp_path / "ck")["history"]) == 5  # every epoch is still recorded
    assert [p.name for p in (tmp_path / "pred").iterdir()] == ["rank-00000.parquet"]


@pytest.mark.slow
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


def test_resume_with_fewer_epochs_than_trained_is_refused(digits_info: DatasetInfo,
                                                          tmp_path: Path) -> None:
    """A checkpoint 2 epochs into training, rerun with --epochs 2 or 1: the loop would not run,
    so nothing moved the round on (no EMA hand-over, fine-tune or final checkpoint), and the
    driver then wrote the raw weights as model.pt and failed on a missing key."""
    from pipeline.checkpoint import CheckpointError

    rep = LocalReporter(tmp_path / "ck")
    train_worker(tiny_job(digits_info, tmp_path, epochs=2, eval_every=5), WorkerContext(), rep)
    saved = torch.load(tmp_path / "ck" / "state.pt", weights_only=True)
    saved["state"].update(phase="train", epoch=2)
    torch.save(saved, tmp_path / "ck" / "state.pt")
    before = (tmp_path / "ck" / "state.pt").read_bytes()
    for epochs in (2, 1):
        with pytest.raises(CheckpointError, match=(
                rf"^this round's checkpoint has 2 epoch\(s\) trained, and --epochs is now "
                rf"{epochs}: give --epochs above 2 to go on")):
            train_worker(tiny_job(digits_info, tmp_path, epochs=epochs), WorkerContext(),
                         LocalReporter(tmp_path / "ck"))
        assert (tmp_path / "ck" / "state.pt").read_bytes() == before  # nothing written


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
    with rep.resume_dir() as folder:
        restored = resume(again, folder, ctx)
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


# ----------------------------------------------------------------------------- the hot path


@pytest.mark.parametrize("student,optimizer,grad_clip", [
    (False, "adamw", 0.0), (True, "rmsprop", 1.0), (True, "sgd", 0.0)])
def test_an_epoch_reads_the_device_once_whatever_its_length(student: bool, optimizer: str,
                                                            grad_clip: float) -> None:
    """No per-step host reads (each one waits for the GPU): the metrics are summed on the device
    and read once per epoch. Before, a teacher step read 3 values and a student step 4."""
    from bench.host_syncs import count_host_reads, host_scalars, synthetic_batches, tiny_job
    from pipeline.train import build_learner, train_epoch

    job = tiny_job(student)
    job.config = dataclasses.replace(job.config, optimizer=optimizer, grad_clip=grad_clip)
    ctx = WorkerContext()
    totals = []
    for steps in (1, 3):
        learner = build_learner(job, ctx)
        batches = synthetic_batches(steps, 8, 16 if student else 0, 10)
        with count_host_reads(host_scalars(learner.optimizer)) as counter:
            train_epoch(learner, learner.model, counter.pause(iter(batches)), cfg=job.config,
                        ctx=ctx, epoch=0, steps=steps, base_lr=1e-3)
        totals.append(counter.counts)
    assert totals == [{"tolist": 1}, {"tolist": 1}]


def test_the_read_counter_sees_every_kind_of_read() -> None:
    from bench.host_syncs import READS, count_host_reads

    t = torch.tensor(2.0)
    before = {name: getattr(torch.Tensor, name) for name in READS}
    with count_host_reads(ignore=lambda x: x is t) as counter:
        x = torch.tensor(3.0)
        float(x), int(x), x.item(), x.tolist(), x.cpu(), x.numpy(), bool(x)
        [0, 1, 2, 3][torch.tensor(1)]  # __index__
        float(t)  # ignored
    assert set(counter.counts) == set(READS) and counter.total == len(READS)
    assert all(getattr(torch.Tensor, name) is fn for name, fn in before.items())  # restored


def _record_steps(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Patch the step so that each call records its labeled labels, pseudo targets and the
    logits of the forward pass that made its loss."""
    import pipeline.train as train

    steps: list[dict] = []
    original = train.step_on_device

    def recording(model, optimizer, labeled, pseudo, **kw):
        rec = {"labels": labeled[1].clone(), "targets": None if pseudo is None else
               pseudo[1].clone()}
        hook = model.register_forward_hook(
            lambda _m, _i, out: rec.__setitem__("logits", out.detach().float().clone()))
        try:
            out = original(model, optimizer, labeled, pseudo, **kw)
        finally:
            hook.remove()
        steps.append(rec)
        return out

    monkeypatch.setattr(train, "step_on_device", recording)
    return steps


def test_logged_epoch_metrics_equal_the_per_step_computation(
        digits_info: DatasetInfo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The epoch's train_loss / train_top1 (summed on the device, read once) are the mean of
    each step's loss and the top-1 of each step's logits, computed step by step on the host."""
    import torch.nn.functional as F

    steps = _record_steps(monkeypatch)
    job = tiny_job(digits_info, tmp_path, epochs=2, eval_every=10, finetune_epochs=0,
                   ema_decay=0.9)
    train_worker(job, WorkerContext(), LocalReporter(tmp_path / "ck"))
    history = read_state(tmp_path / "ck")["history"]
    per_epoch = len(steps) // 2
    assert per_epoch >= 2 and len(steps) == 2 * per_epoch
    for epoch, row in enumerate(history):
        mine = steps[epoch * per_epoch:(epoch + 1) * per_epoch]
        losses = [F.cross_entropy(s["logits"], s["labels"],
                                  label_smoothing=job.config.label_smoothing).item()
                  for s in mine]
        correct = sum(topk_correct(s["logits"], s["labels"], 1) for s in mine)
        n = sum(len(s["labels"]) for s in mine)
        assert row["train_loss"] == pytest.approx(sum(losses) / per_epoch, rel=1e-6)
        assert row["train_top1"] == correct / n


def test_student_epoch_sums_equal_the_per_step_computation(monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    from bench.host_syncs import synthetic_batches, tiny_job
    from pipeline.losses import soft_cross_entropy
    from pipeline.train import EPOCH_SUMS, build_learner, pseudo_weight, train_epoch

    steps = _record_steps(monkeypatch)
    job = tiny_job(student=True)
    learner, ctx = build_learner(job, WorkerContext()), WorkerContext()
    sums, _ = train_epoch(learner, learner.model, iter(synthetic_batches(3, 8, 16, 10)),
                          cfg=job.config, ctx=ctx, epoch=0, steps=3, base_lr=1e-3)
    got = dict(zip(EPOCH_SUMS, sums, strict=True))
    w, ls = pseudo_weight(job.config), job.config.label_smoothing
    labeled = [torch.nn.functional.cross_entropy(s["logits"][:8], s["labels"],
                                                 label_smoothing=ls).item() for s in steps]
    pseudo = [soft_cross_entropy(s["logits"][8:], s["targets"]).item() for s in steps]
    total = sum(a + w * b for a, b in zip(labeled, pseudo, strict=True))
    assert got["loss"] == pytest.approx(total, rel=1e-6)
    assert got["pseudo_loss"] == pytest.approx(sum(pseudo), rel=1e-6)
    assert got["correct"] == sum(topk_correct(s["logits"][:8], s["labels"], 1) for s in steps)
    assert (got["n"], got["images"]) == (24, 72)


def test_test_damage_spread_over_ranks_stops_at_the_first_evaluation(tmp_path: Path) -> None:
    """Each rank's test reader judges only the damage it met (against the whole split); damage
    spread over the ranks is past the limit only together, which the ranks' summed image count
    shows at every evaluation (it was found only after training, by the driver)."""
    import numpy as np

    from pipeline.data import LabeledStream, make_loader
    from pipeline.shards import ShardError, encode_png, write_shards
    from pipeline.train import evaluate

    img = encode_png(np.zeros((8, 8, 3), np.uint8))
    bad = {0, 1, 100, 101, 200, 201, 300, 301}  # 2 in each of 4 shards: 8 of 400, 2%
    samples = [(f"k{i:04d}", b"not an image" if i in bad else img, i % 2) for i in range(400)]
    shards = [str(p) for p, _ in write_shards(samples, tmp_path, prefix="t", maxcount=100)]

    class FourRanks(WorkerContext):
        """Rank 3 of 4 whose peers read as it did: the sums are 4 times its own."""

        def all_reduce_sum(self, values: list[float]) -> list[float]:
            return [4 * v for v in values]

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))
    for limit, stops in ((0.015, True), (0.025, False)):
        stream = LabeledStream(shards, lambda x: x.float(), rank=3, world_size=4, train=False,
                               num_classes=2, damage_limit=limit, split="test",
                               split_count=400)
        loader = make_loader(stream, 50, 0)
        if stops:  # its own 2 of 400 are within the limit; the 8 of all ranks are not
            with pytest.raises(ShardError, match=r"^test split: 8 of the 400 samples "
                                                 r"dataset.json lists were not evaluated, "
                                                 r"damaged or gone \(2.0% > --damage-limit "
                                                 r"0.015\)"):
                evaluate(model, loader, FourRanks())
        else:
            assert evaluate(model, loader, FourRanks())[0]["n"] == 392

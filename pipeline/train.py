"""The per-worker training loop: plain PyTorch, shared by the teacher and the students.

Ray appears only through two small objects passed in: a :class:`WorkerContext` (rank, world size,
device, all-reduce) and a reporter (resume checkpoint in, metrics + checkpoint out). Tests call
:func:`train_worker` directly with :class:`LocalReporter`; ``pipeline.runner`` calls it inside
Ray Train workers.

A run has three phases, recorded in every checkpoint so that a restarted job continues where it
stopped: ``train`` (epochs of noisy training, a checkpoint each epoch), ``finetune`` (FixRes: a
short pass at the test resolution on un-augmented labeled images, shallow stages frozen) and
``evaluate`` (final top-1/top-5/loss on the test split, per-sample predictions written to Parquet).
"""

from __future__ import annotations

import copy
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from pipeline.data import LabeledStream, PseudoStream, make_loader, steps_per_epoch
from pipeline.transforms import eval_transform, train_transform

STATE_FILE = "state.pt"
PHASES = ("train", "finetune", "evaluate", "done")


# ----------------------------------------------------------------------------- context


@dataclass
class WorkerContext:
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        if self.world_size == 1:
            return values
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def log(self, msg: str) -> None:
        if self.rank == 0:
            # Not print(): Ray Train patches print in workers and the line would appear twice.
            sys.stdout.write(msg + "\n")
            sys.stdout.flush()


class Reporter(Protocol):
    def resume_dir(self) -> str | None: ...
    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None: ...


class LocalReporter:
    """Keeps the latest checkpoint in ``folder`` (tests and single-process use)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.reports: list[dict[str, Any]] = []

    def resume_dir(self) -> str | None:
        return str(self.folder) if (self.folder / STATE_FILE).exists() else None

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        self.reports.append(metrics)
        if checkpoint_dir is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            os.replace(Path(checkpoint_dir) / STATE_FILE, self.folder / STATE_FILE)


# ----------------------------------------------------------------------------- pieces


class EMA:
    """Exponential moving average of weights, with the official code's warm-up of the decay
    (min(decay, (1 + n) / (10 + n))) so short runs are not dominated by the initial weights."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay, self.updates = decay, 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for e, v in zip(self.module.state_dict().values(), model.state_dict().values(),
                        strict=True):
            if e.dtype.is_floating_point:
                e.lerp_(v, 1 - d)
            else:
                e.copy_(v)


def make_optimizer(params: Any, name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "rmsprop":
        # The paper's settings; note TF's RMSProp puts eps inside the square root, PyTorch outside.
        return torch.optim.RMSprop(params, lr=lr, alpha=0.9, momentum=0.9, eps=1e-3,
                                   weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True,
                               weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer {name!r} is not supported; use rmsprop, sgd or adamw")


def lr_factor(step: int, *, steps_per_epoch: int, warmup_epochs: float, total_epochs: float,
              schedule: str, decay_rate: float = 0.97, decay_epochs: float = 2.4) -> float:
    """Multiplier of the peak learning rate at ``step``: linear warm-up, then decay."""
    epoch = step / steps_per_epoch
    if warmup_epochs > 0 and epoch < warmup_epochs:
        return (step + 1) / (warmup_epochs * steps_per_epoch)
    if schedule == "exponential":  # staircase, as the official code
        return decay_rate ** math.floor(epoch / decay_epochs)
    span = max(total_epochs - warmup_epochs, 1e-8)
    progress = min(max((epoch - warmup_epochs) / span, 0.0), 1.0)
    return 0.5 * (1 + math.cos(math.pi * progress))


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> int:
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices  # (B, k)
    return int((top == labels[:, None]).any(dim=1).sum())


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: Any, ctx: WorkerContext,
             collect: bool = False) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Top-1 / top-5 / loss summed over every rank's share of the test split."""
    model.eval()
    sums = [0.0, 0.0, 0.0, 0.0]  # loss, top1, top5, n
    rows: list[dict[str, Any]] = []
    for images, labels, keys in loader:
        images = images.to(ctx.device, non_blocking=True)
        labels = labels.to(ctx.device)
        with _autocast(ctx.device):
            logits = model(_channels_last(images, ctx.device)).float()
        sums[0] += float(F.cross_entropy(logits, labels, reduction="sum"))
        sums[1] += topk_correct(logits, labels, 1)
        sums[2] += topk_correct(logits, labels, 5)
        sums[3] += len(labels)
        if collect:
            prob = logits.softmax(dim=1)
            conf, pred = prob.max(dim=1)
            rows += [{"key": k, "label": int(y), "pred": int(p), "confidence": float(c)}
                     for k, y, p, c in zip(keys, labels.tolist(), pred.tolist(), conf.tolist(),
                                           strict=True)]
    loss, top1, top5, n = ctx.all_reduce_sum(sums)
    n = max(n, 1.0)
    return {"top1": top1 / n, "top5": top5 / n, "loss": loss / n, "n": int(n)}, rows


def _autocast(device: torch.device) -> Any:
    # bf16 autocast only on GPU: on CPU it is slower for these small convolutions.
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" \
        else torch.autocast("cpu", enabled=False)


def _channels_last(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    # channels_last on CPU too: the depthwise-conv backward is about 2x faster in that layout.
    return x.contiguous(memory_format=torch.channels_last)


# ----------------------------------------------------------------------------- the loop


@dataclass
class Job:
    """Everything a worker needs, as plain data (it travels to Ray workers)."""

    config: dict[str, Any]
    role: str
    classes: list[str]
    labeled: dict[str, Any]  # {"shards": [...], "count": n}
    test: dict[str, Any]
    model: dict[str, Any]  # {"name", "train_resolution", "test_resolution", "dropout", "drop_path"}
    predictions_dir: str
    pseudo: dict[str, Any] | None = None  # {"shards", "dir", "count" (sum of copies)}
    randaugment: dict[str, Any] | None = None  # {"num_ops", "magnitude"}

    @property
    def num_classes(self) -> int:
        return len(self.classes)


class _Trainer:
    """State of one worker's run; methods are the phases."""

    def __init__(self, job: Job, ctx: WorkerContext, reporter: Reporter) -> None:
        from models import create_model

        self.job, self.ctx, self.reporter = job, ctx, reporter
        self.cfg = job.config
        torch.manual_seed(self.cfg["seed"])
        self.model = create_model(job.model["name"], job.num_classes,
                                  dropout=job.model["dropout"],
                                  drop_path=job.model["drop_path"]).to(ctx.device)
        self.model = self.model.to(memory_format=torch.channels_last)
        self.ema = EMA(self.model, self.cfg["ema_decay"]) if self.cfg["ema_decay"] > 0 else None
        self.steps = steps_per_epoch(
            job.pseudo["count"] if job.pseudo else job.labeled["count"],
            self._pseudo_batch() if job.pseudo else self.cfg["batch_size"], ctx.world_size)
        self.optimizer = make_optimizer(self.model.parameters(), self.cfg["optimizer"],
                                        self._peak_lr(), self.cfg["weight_decay"])
        self.state: dict[str, Any] = {"phase": "train", "epoch": 0, "history": [],
                                      "seconds": {}, "finetune": {}, "resumed_from": []}
        self._resume()

    # -- helpers
    def _peak_lr(self) -> float:
        c = self.cfg
        return c["lr"] if c["lr"] is not None else \
            c["lr_per_256"] * c["batch_size"] * self.ctx.world_size / 256

    def _pseudo_batch(self) -> int:
        return max(1, round(self.cfg["batch_size"] * self.cfg["unlabel_ratio"]))

    def _pseudo_weight(self) -> float:
        w = self.cfg.get("pseudo_loss_weight")
        return float(self.cfg["unlabel_ratio"] if w is None else w)

    def _ddp(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.ctx.world_size == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.ctx.device.index] if self.ctx.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def _eval_model(self) -> torch.nn.Module:
        return self.ema.module if self.ema is not None and self.state["phase"] == "train" \
            else self.model

    def _test_loader(self) -> Any:
        job = self.job
        ds = LabeledStream(job.test["shards"], eval_transform(job.model["test_resolution"]),
                           rank=self.ctx.rank, world_size=self.ctx.world_size, train=False)
        return make_loader(ds, self.cfg["eval_batch_size"], self.cfg["loader_workers"])

    def _resume(self) -> None:
        folder = self.reporter.resume_dir()
        if folder is None:
            return
        saved = torch.load(Path(folder) / STATE_FILE, map_location=self.ctx.device,
                           weights_only=True)
        self.model.load_state_dict(saved["model"])
        if self.ema is not None and saved.get("ema") is not None:
            self.ema.module.load_state_dict(saved["ema"])
            self.ema.updates = saved["ema_updates"]
        if saved["state"]["phase"] == "train":
            self.optimizer.load_state_dict(saved["optimizer"])
        self.state = saved["state"]
        self.state["resumed_from"].append(
            {"phase": self.state["phase"], "epoch": self.state["epoch"]})
        self.ctx.log(f"resumed from checkpoint: phase {self.state['phase']}, "
                     f"{self.state['epoch']} epoch(s) done")

    def _checkpoint(self, metrics: dict[str, Any]) -> None:
        """Every rank reports (Ray requires it); rank 0 attaches the checkpoint."""
        if self.ctx.rank != 0:
            self.reporter.report(metrics, None)
            return
        with tempfile.TemporaryDirectory() as d:
            torch.save({
                "model": self.model.state_dict(),
                "ema": self.ema.module.state_dict() if self.ema is not None else None,
                "ema_updates": self.ema.updates if self.ema is not None else 0,
                "optimizer": self.optimizer.state_dict(),
                "state": self.state,
            }, Path(d) / STATE_FILE)
            self.reporter.report(metrics, d)

    # -- phases
    def run(self) -> None:
        if self.state["phase"] == "train":
            self.train()
        if self.state["phase"] == "finetune":
            self.finetune()
        if self.state["phase"] == "evaluate":
            self.final_evaluate()

    def _batches(self) -> Iterator[tuple[Any, Any]]:
        job, cfg, ctx = self.job, self.cfg, self.ctx
        ra = None
        if job.randaugment:
            from pipeline.augment import RandAugment

            ra = RandAugment(num_ops=job.randaugment["num_ops"],
                             magnitude=job.randaugment["magnitude"])
        res = job.model["train_resolution"]
        tf = train_transform(res, crop_scale=(cfg["crop_scale_min"], 1.0), flip=cfg["flip"],
                             randaugment=ra)
        seed = cfg["seed"] * 1000 + self.state["epoch"]  # a resumed run gets a fresh order
        labeled = iter(make_loader(
            LabeledStream(job.labeled["shards"], tf, rank=ctx.rank, world_size=ctx.world_size,
                          shuffle_buffer=cfg["shuffle_buffer"], seed=seed),
            cfg["batch_size"], cfg["loader_workers"]))
        if job.pseudo is None:
            for images, labels, _ in labeled:
                yield (images, labels), None
            return
        pseudo = iter(make_loader(
            PseudoStream(job.pseudo["shards"], job.pseudo["dir"], tf,
                         num_classes=job.num_classes,
                         temperature=cfg["temperature"] if cfg["soft_labels"] else -1.0,
                         rank=ctx.rank, world_size=ctx.world_size,
                         shuffle_buffer=cfg["shuffle_buffer"], seed=seed),
            self._pseudo_batch(), cfg["loader_workers"]))
        for (images, labels, _), pseudo_batch in zip(labeled, pseudo, strict=False):
            yield (images, labels), pseudo_batch

    def _step(self, model: torch.nn.Module, labeled: Any, pseudo: Any) -> dict[str, float]:
        from pipeline.losses import noisy_student_loss

        dev = self.ctx.device
        images, labels = labeled[0].to(dev), labeled[1].to(dev)
        if pseudo is not None:
            p_images, p_targets = pseudo[0].to(dev), pseudo[1].to(dev)
            batch = torch.cat([images, p_images])  # one forward: BatchNorm sees both
            with _autocast(dev):
                logits = model(_channels_last(batch, dev)).float()
            loss, parts = noisy_student_loss(
                logits[: len(images)], labels, logits[len(images):], p_targets,
                unlabel_ratio=self._pseudo_weight(), label_smoothing=self.cfg["label_smoothing"])
        else:
            with _autocast(dev):
                logits = model(_channels_last(images, dev)).float()
            loss = F.cross_entropy(logits, labels, label_smoothing=self.cfg["label_smoothing"])
            parts = {"labeled_loss": loss.item()}
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg["grad_clip"])
        self.optimizer.step()
        correct = topk_correct(logits[: len(images)].detach(), labels, 1)
        return {"loss": loss.item(), "correct": correct, "n": len(images),
                "images": len(logits), **parts}

    def train(self) -> None:
        cfg, ctx = self.cfg, self.ctx
        model = self._ddp(self.model)
        epochs = cfg["epochs"]
        batches = self._batches()
        base_lr = self._peak_lr()
        test_loader = self._test_loader()
        while self.state["epoch"] < epochs:
            epoch = self.state["epoch"]
            model.train()
            t0 = time.time()
            sums = [0.0, 0.0, 0.0, 0.0, 0.0]  # loss, correct, n, images, pseudo loss
            for i in range(self.steps):
                step = epoch * self.steps + i
                f = lr_factor(step, steps_per_epoch=self.steps,
                              warmup_epochs=cfg["warmup_epochs"], total_epochs=epochs,
                              schedule=cfg["schedule"], decay_rate=cfg["decay_rate"],
                              decay_epochs=cfg["decay_epochs"])
                for g in self.optimizer.param_groups:
                    g["lr"] = base_lr * f
                labeled, pseudo = next(batches)
                out = self._step(model, labeled, pseudo)
                if self.ema is not None:
                    self.ema.update(self.model)
                sums = [a + b for a, b in zip(sums, (out["loss"], out["correct"], out["n"],
                                                     out["images"], out.get("pseudo_loss", 0.0)),
                                              strict=True)]
            loss, correct, n, images, pseudo_loss = ctx.all_reduce_sum(sums)
            seconds = time.time() - t0
            last = epoch + 1 == epochs
            if last or (epoch + 1) % cfg["eval_every"] == 0:
                metrics, _ = evaluate(self._eval_model(), test_loader, ctx)
            else:
                metrics = {"top1": None, "top5": None, "loss": None}
            self.state["epoch"] = epoch + 1
            self.state["seconds"]["train"] = self.state["seconds"].get("train", 0.0) + seconds
            row = {"epoch": epoch + 1, "train_loss": loss / (self.steps * ctx.world_size),
                   "train_top1": correct / max(n, 1), "lr": base_lr * f,
                   "images_per_s": images / seconds, "seconds": seconds,
                   "test_top1": metrics["top1"], "test_top5": metrics["top5"],
                   "test_loss": metrics["loss"]}
            if self.job.pseudo is not None:
                row["pseudo_loss"] = pseudo_loss / (self.steps * ctx.world_size)
            self.state["history"].append(row)
            left = (epochs - epoch - 1) * (time.time() - t0)  # training and evaluation
            test = f" test top-1 {metrics['top1']:.4f}" if metrics["top1"] is not None else ""
            ctx.log(f"[{self.job.role}] epoch {epoch + 1}/{epochs} loss {row['train_loss']:.4f} "
                    f"train top-1 {row['train_top1']:.3f}{test} "
                    f"({images / seconds:.0f} img/s, {seconds:.1f}s, ~{left / 60:.1f} min left)")
            if last:
                self._finish_train(metrics)
            if last or (epoch + 1) % cfg["checkpoint_every"] == 0:
                self._checkpoint({"phase": "train", **row})

    def _finish_train(self, metrics: dict[str, float]) -> None:
        if self.ema is not None:  # from here on the EMA weights are the model
            self.model.load_state_dict(self.ema.module.state_dict())
        self.state["train_metrics"] = metrics
        self.state["phase"] = "finetune" if self.cfg["finetune_epochs"] > 0 else "evaluate"

    def finetune(self) -> None:
        """FixRes: adapt to the test resolution's apparent object size, shallow stages frozen.

        Un-augmented labeled images at the test resolution, dropout and stochastic depth off.
        BatchNorm statistics are re-estimated only when the test resolution differs from the
        training one (FixRes's point: the apparent object size changes the activations). At equal
        resolutions they are kept: re-estimating them on the clean labeled images cost 2-4 points
        of top-1 on a digits student (t1 on 180 labeled digits and 1,077 with their true labels:
        97.2% before the fine-tune, 93.3-94.8% after with re-estimation, 97.4-97.6% with the
        statistics kept).
        """
        from models import freeze_shallow

        cfg, ctx, job = self.cfg, self.ctx, self.job
        t0 = time.time()
        test_loader = self._test_loader()
        before = self.state.get("train_metrics") or evaluate(self.model, test_loader, ctx)[0]
        frozen = freeze_shallow(self.model, cfg["finetune_freeze"])
        model = self._ddp(self.model)
        params = [p for p in self.model.parameters() if p.requires_grad]
        lr = self._peak_lr() * cfg["finetune_lr_scale"]
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
        loader = iter(make_loader(
            LabeledStream(job.labeled["shards"], eval_transform(job.model["test_resolution"]),
                          rank=ctx.rank, world_size=ctx.world_size,
                          shuffle_buffer=cfg["shuffle_buffer"], seed=cfg["seed"] + 17),
            cfg["batch_size"], cfg["loader_workers"]))
        per_epoch = steps_per_epoch(job.labeled["count"], cfg["batch_size"], ctx.world_size)
        total = max(1, round(cfg["finetune_epochs"] * per_epoch))
        recalibrate = job.model["test_resolution"] != job.model["train_resolution"]
        norms = _recalibrate_batchnorm(self.model) if recalibrate else []
        model.train()
        _quiet_for_finetune(self.model, keep_norm_statistics=not recalibrate)
        for i in range(total):
            images, labels, _ = next(loader)
            for g in opt.param_groups:
                g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * i / total))
            logits = model(_channels_last(images.to(ctx.device), ctx.device))
            loss = F.cross_entropy(logits, labels.to(ctx.device),
                                   label_smoothing=cfg["label_smoothing"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        for p in self.model.parameters():
            p.requires_grad_(True)
        for norm, momentum in norms:
            norm.momentum = momentum
        after, _ = evaluate(self.model, test_loader, ctx)
        self.state["finetune"] = {"top1_before": before["top1"], "top1_after": after["top1"],
                                  "steps": total, "frozen_params": frozen,
                                  "resolution": job.model["test_resolution"],
                                  "batchnorm": "re-estimated" if recalibrate else "kept"}
        self.state["seconds"]["finetune"] = time.time() - t0
        ctx.log(f"[{job.role}] FixRes fine-tune at {job.model['test_resolution']} px, {total} "
                f"steps: test top-1 {before['top1']:.4f} -> {after['top1']:.4f}")
        self.state["phase"] = "evaluate"
        self._checkpoint({"phase": "finetune", **self.state["finetune"]})

    def final_evaluate(self) -> None:
        import pandas as pd

        t0 = time.time()
        metrics, rows = evaluate(self.model, self._test_loader(), self.ctx, collect=True)
        out = Path(self.job.predictions_dir)
        out.mkdir(parents=True, exist_ok=True)
        part = out / f"rank-{self.ctx.rank:05d}.parquet"
        df = pd.DataFrame(rows, columns=["key", "label", "pred", "confidence"]).astype(
            {"key": "string", "label": "int32", "pred": "int32", "confidence": "float32"})
        df.to_parquet(part.with_suffix(".tmp"), index=False)
        os.replace(part.with_suffix(".tmp"), part)
        self.state["final_metrics"] = metrics
        self.state["seconds"]["evaluate"] = time.time() - t0
        self.state["phase"] = "done"
        self.ctx.log(f"[{self.job.role}] test top-1 {metrics['top1']:.4f} top-5 "
                     f"{metrics['top5']:.4f} loss {metrics['loss']:.4f} ({metrics['n']} images)")
        self._checkpoint({"phase": "evaluate", **metrics})


def _quiet_for_finetune(model: torch.nn.Module, *, keep_norm_statistics: bool) -> None:
    """After ``model.train()``: dropout and stochastic depth off (the fine-tune is un-noised),
    and, when asked, every BatchNorm in eval mode so that its running statistics stay as they are
    (its affine weights still train)."""
    from torchvision.ops import StochasticDepth

    quiet: tuple[type[torch.nn.Module], ...] = (torch.nn.Dropout, StochasticDepth)
    if keep_norm_statistics:
        quiet += (torch.nn.BatchNorm2d,)
    for m in model.modules():
        if isinstance(m, quiet):
            m.eval()


def _recalibrate_batchnorm(model: torch.nn.Module) -> list[tuple[torch.nn.Module, Any]]:
    """Restart the running statistics of the trainable BatchNorms as a plain average over the
    fine-tune batches (momentum None). The statistics of noisy training do not describe clean
    test-resolution images; with an exponential average over a dozen short steps the result
    depended on the last few batches (measured: +-1.5 points of top-1 on the digits demo).
    Returns (norm, old momentum) pairs to restore afterwards."""
    changed = []
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d) and m.weight is not None and m.weight.requires_grad:
            changed.append((m, m.momentum))
            m.reset_running_stats()
            m.momentum = None
    return changed


def train_worker(job: Job, ctx: WorkerContext, reporter: Reporter) -> None:
    """Run (or continue) every phase of one round on this worker."""
    threads = max(1, int(job.config["cpus_per_worker"]))
    torch.set_num_threads(threads)
    _Trainer(job, ctx, reporter).run()


def read_state(folder: str | Path) -> dict[str, Any]:
    """The ``state`` part of a checkpoint folder (history, phase, metrics)."""
    return torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)["state"]


def read_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """The weights to hand on: after training these already are the EMA weights."""
    return torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)["model"]



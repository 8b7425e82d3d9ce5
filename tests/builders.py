"""Test data shared by several test modules: a quick teacher, finished rounds, label batches."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import torch

from pipeline.checkpoint import save_model_file
from pipeline.dataset import load_dataset
from pipeline.inference import KIND_BAD
from pipeline.layout import RunLayout
from pipeline.manifest import (
    DataRef,
    FileRef,
    ModelRecord,
    RoundRecord,
    TeacherRef,
    load_round,
    new_round,
    save_round,
)
from pipeline.storage import sha256_file

CLASSES = [str(i) for i in range(10)]


def job_env(ray_address: str | None, **extra: str) -> dict[str, str]:
    """The environment for a job subprocess: it joins the Ray at ``ray_address`` (the module's,
    from the ``ray_address`` fixture) or, given None, starts one of its own, as a user's
    ``python jobs/...`` does."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    if ray_address is not None:
        env["RAY_ADDRESS"] = ray_address
    env["PYTHONUNBUFFERED"] = "1"
    return {**env, **extra}


def make_teacher(path: Path, digits_dir: Path) -> str:
    """An untrained t0 made to give varied, confident predictions (no training: seconds, not
    minutes): batch-norm statistics from real images, a random classifier centred on them."""
    from models import create_model
    from pipeline.images import decode_image
    from pipeline.shards import read_samples
    from pipeline.transforms import eval_transform

    torch.manual_seed(0)
    model = create_model("efficientnet_t0", 10)
    shards = load_dataset(digits_dir).split("labeled").shards
    x = torch.stack([eval_transform(32)(decode_image(s.image))
                     for s in list(read_samples(shards))[:64]])
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average: one pass gives the batch statistics
    model.train()
    with torch.no_grad():
        model(x)
        model.eval()
        feats = model.avgpool(model.features(x)).flatten(1)  # (64, F)
        lin = model.classifier[1]
        w = torch.randn_like(lin.weight) * 3 / feats.std(0).mean() / feats.shape[1] ** 0.5
        lin.weight.copy_(w)
        lin.bias.copy_(-(feats.mean(0) @ w.T))
    return save_model_file(path, model.state_dict(), model_name="efficientnet_t0",
                           classes=CLASSES, train_resolution=32, test_resolution=32)


def make_round0(root: Path, run: str, dataset: Path, model_src: Path,
                sha: str | None = None, status: str = "complete") -> RoundRecord:
    """A finished round 0 written directly (no teacher job needed): model under artifacts/,
    its uri relative to root."""
    layout = RunLayout(root, run)
    model = layout.model_path(0)
    model.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model_src, model)
    rec = new_round(run=run, round_=0, config={},
                    model=ModelRecord("efficientnet_t0", 0, 32, 32), cluster={},
                    data=DataRef(dataset=str(dataset), dataset_sha256=sha256_file(
                        dataset / "dataset.json") if (dataset / "dataset.json").exists() else ""))
    rec.checkpoint = FileRef(uri=layout.relative(model), sha256=sha or sha256_file(model))
    if status == "complete":
        rec.mark_complete()
    save_round(layout, rec)
    return rec


def new_round1(root: Path, run: str) -> RoundRecord:
    layout = RunLayout(root, run)
    prev = load_round(layout, 0)
    return new_round(run=run, round_=1, config={}, model=None, data=prev.data, cluster={},
                     teacher=TeacherRef(round=0, manifest_sha256="",
                                        checkpoint_sha256=prev.checkpoint.sha256))


def fake_label_batch(shard: str, index: np.ndarray, kind: np.ndarray, n: int = 0,
                     k: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    """What the teacher stage hands the driver, for testing the driver side without Ray."""
    rng = np.random.default_rng(seed)
    m = len(index)
    p = rng.dirichlet(np.ones(k), size=m).astype(np.float32)
    order = np.argsort(-p, axis=1)
    return {
        "shard": np.array([shard] * m, dtype=object), "index": index.astype(np.int64),
        "key": np.array([f"s{os.path.basename(shard)[:-4]}k{i:04d}" for i in index], dtype=object),
        "kind": kind.astype(np.int8),
        "error": np.array(["broken" if x == KIND_BAD else "" for x in kind], dtype=object),
        "n": np.full(m, n, np.int64), "label": order[:, 0].astype(np.int32),
        "confidence": p.max(1), "entropy": -(p * np.log(p)).sum(1).astype(np.float32),
        "topk_index": order.astype(np.int32),
        "topk_prob": np.take_along_axis(p, order, 1).astype(np.float16),
    }

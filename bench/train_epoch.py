"""Our training epoch against a plain PyTorch loop: same model, batch, optimizer, transforms, images.

    python bench/train_epoch.py                   # about 2 minutes on 2 CPU cores
    python bench/train_epoch.py --epochs 3 --repeat 2

Ours: :func:`pipeline.train.train_epoch` fed by the job's streams (:func:`pipeline.batches.
train_batches`): shards read and decoded by the stage's reader and decoder, shuffled, augmented,
batched by a DataLoader, EMA updated every step. The baseline: the same images decoded once into
memory, the same transform per image, ``torch.utils.data.DataLoader`` over a list, the same model,
optimizer, loss and EMA, written the way a PyTorch user would. Both in this process, one after the
other, repeated and interleaved; the figure is our images/s over the baseline's (steady state: the
first epoch of each is warm-up and not counted). No Ray: this measures the loop, not the cluster.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from models import create_model  # noqa: E402
from pipeline.batches import train_batches  # noqa: E402
from pipeline.config import PRESETS, TrainConfig  # noqa: E402
from pipeline.dataset import load_dataset, prepare_digits  # noqa: E402
from pipeline.images import decode_image  # noqa: E402
from pipeline.optim import EMA, make_optimizer  # noqa: E402
from pipeline.shards import read_samples  # noqa: E402
from pipeline.train import Job, WorkerContext, build_learner, train_epoch, train_steps  # noqa: E402
from pipeline.transforms import train_transform  # noqa: E402


def make_job(data: Path, batch: int) -> Job:
    info = load_dataset(data)
    cfg = dataclasses.replace(TrainConfig(**PRESETS["teacher"]["demo"]), run="b", data=str(data),
                              batch_size=batch, loader_workers=0, ema_decay=0.99)
    split = {s: {"shards": info.split(s).shards, "count": info.split(s).count}
             for s in ("labeled", "test")}
    model = {"name": cfg.model, "train_resolution": 32, "test_resolution": 32, "dropout": 0.2,
             "drop_path": 0.2, "options": cfg.model_options()}
    return Job(config=cfg, role="teacher", classes=info.classes, labeled=split["labeled"],
               test=split["test"], model=model, predictions_dir=tempfile.mkdtemp())


def ours(job: Job, epochs: int) -> list[float]:
    """images/s of each epoch of our loop."""
    ctx = WorkerContext()
    learner = build_learner(job, ctx)
    batches = train_batches(job, ctx, 0)
    steps = train_steps(job, 1)
    rates = []
    for epoch in range(epochs):
        t0 = time.perf_counter()
        sums, _ = train_epoch(learner, learner.model, batches, cfg=job.config, ctx=ctx,
                              epoch=epoch, steps=steps, base_lr=1e-3)
        rates.append(sums[3] / (time.perf_counter() - t0))
    return rates


def plain(job: Job, epochs: int) -> list[float]:
    """images/s of each epoch of a plain PyTorch loop over the same images, decoded in memory."""
    cfg = job.config
    images = [(decode_image(s.image), s.label) for s in read_samples(job.labeled["shards"])]
    tf = train_transform(32, crop_scale=(cfg.crop_scale_min, 1.0), flip=cfg.flip)
    data = [(img, label) for img, label in images]

    class Plain(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(data)

        def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
            return tf(data[i][0]), data[i][1]

    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, len(job.classes), **cfg.model_options())
    model = model.to(memory_format=torch.channels_last)
    ema = EMA(model, cfg.ema_decay)
    opt = make_optimizer(model.parameters(), cfg.optimizer, 1e-3, cfg.weight_decay)
    loader = torch.utils.data.DataLoader(Plain(), batch_size=cfg.batch_size, shuffle=True,
                                         drop_last=False)
    steps = train_steps(job, 1)
    rates = []
    it = iter(loader)
    for _ in range(epochs):
        model.train()
        t0, n = time.perf_counter(), 0
        for _ in range(steps):
            try:
                x, y = next(it)
            except StopIteration:
                it = iter(loader)
                x, y = next(it)
            loss = F.cross_entropy(model(x.contiguous(memory_format=torch.channels_last)), y,
                                   label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ema.update(model)
            loss.item()  # a plain loop logs its loss each step too
            n += len(x)
        rates.append(n / (time.perf_counter() - t0))
    return rates


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=4, help="epochs per measurement (1 warm-up)")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved measurements of each")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--json", type=Path, default=None, help="merge the figures into this file")
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        data = Path(d) / "digits"
        prepare_digits(data, labeled_fraction=0.5, shard_size=100)
        job = make_job(data, args.batch_size)
        ratios = []
        for r in range(args.repeat):
            a = statistics.mean(ours(job, args.epochs)[1:])
            b = statistics.mean(plain(job, args.epochs)[1:])
            ratios.append(a / b)
            print(f"round {r + 1}: ours {a:.0f} img/s, plain PyTorch {b:.0f} img/s, "
                  f"ratio {a / b:.3f}", flush=True)
    figure = statistics.median(ratios)
    print(f"\ntrain_epoch_teacher_steady (ours / plain PyTorch, median of {args.repeat}): "
          f"{figure:.3f}")
    if args.json is not None:
        old = json.loads(args.json.read_text()) if args.json.exists() else {}
        args.json.write_text(json.dumps({**old, "train_epoch_teacher_steady": round(figure, 4)},
                                        indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

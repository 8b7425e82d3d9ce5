"""Our training epochs against a plain PyTorch loop: same model, batch, optimizer, transforms, images.

    python bench/train_epoch.py                   # about 9 minutes on 2 idle CPU cores
    python bench/train_epoch.py --epochs 3 --repeat 1 --json bench/latest.json
    python bench/train_epoch.py --device cuda     # both loops on a GPU, bf16 (gpu_check.sh)

Ours: :func:`pipeline.train.train_epoch` fed by the job's streams (:func:`pipeline.batches.
train_batches`): shards read and decoded by the stage's reader and decoder in the first epoch,
replayed from the streams' decoded cache after it (``--decoded-cache-mb 0``: read and decoded
every epoch), shuffled, augmented, batched by a DataLoader, EMA updated every step, metrics
summed on the device. The baseline: the
same images decoded once into memory by the same decoder, the same transform per image,
``torch.utils.data.DataLoader`` over a list, the same model, optimizer, loss and EMA, written the
way a PyTorch user would (logging its loss each step; full batches only, as ours are). Both in
this process, one after the other, repeated and interleaved (which goes first alternates); the
figures are our images/s over the baseline's, median of the repeats, timed in CPU seconds of
this process by default (``--clock``; wall time on a GPU):

    train_epoch_<role>_steady         warm epochs only (the first epoch of each is not counted)
    train_epoch_<role>_with_startup   from nothing built (no model, no decoded image) to the
                                      end of the last epoch: our streams' and the baseline's
                                      in-memory decoding both count

for a teacher (the labeled split) and a student (labeled batch + 3x as many pseudo-labeled
images per step, RandAugment, soft targets from top-k files written here). No Ray: this measures
the loop, not the cluster.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from models import create_model  # noqa: E402
from pipeline.augment import RandAugment  # noqa: E402
from pipeline.batches import pseudo_batch_size, train_batches  # noqa: E402
from pipeline.config import PRESETS, StudentConfig, TrainConfig  # noqa: E402
from pipeline.dataset import load_dataset, prepare_digits  # noqa: E402
from pipeline.images import decode_image  # noqa: E402
from pipeline.losses import dense_targets  # noqa: E402
from pipeline.optim import EMA, make_optimizer  # noqa: E402
from pipeline.pseudo_files import pseudo_file_names, write_table  # noqa: E402
from pipeline.shards import read_samples  # noqa: E402
from pipeline.train import (  # noqa: E402
    Job,
    WorkerContext,
    build_learner,
    pseudo_weight,
    train_epoch,
    train_steps,
)
from pipeline.transforms import train_transform  # noqa: E402

MODEL = "efficientnet_t0"
TOPK = 3

# Both loops run in this process on one thread (loader_workers=0), so the CPU time of the process
# is the time they took on an idle machine; on a shared one, wall time also measures the other
# jobs (--clock wall when the machine is idle).
clock = time.process_time


def write_pseudo_files(shards: list[str], out: Path, classes: int) -> None:
    """Top-k soft labels (random, fixed seed) for every sample, one copy each, as the select
    stage leaves them: the stream reads ``copies`` and the top-k columns."""
    rng = np.random.default_rng(0)
    out.mkdir(parents=True, exist_ok=True)
    for shard, name in pseudo_file_names(shards).items():
        keys = [s.key for s in read_samples([shard])]
        prob = rng.dirichlet(np.ones(classes), size=len(keys))
        index = np.argsort(-prob, axis=1)[:, :TOPK]
        top = np.take_along_axis(prob, index, axis=1)
        write_table(out / name, pa.table({
            "key": keys, "copies": pa.array(np.ones(len(keys), np.int32)),
            "topk_index": pa.array(list(index.astype(np.int32)), pa.list_(pa.int32())),
            "topk_prob": pa.array(list(top.astype(np.float16)), pa.list_(pa.float16()))}),
            {"format": "bench"})


def make_job(data: Path, batch: int, student: bool, cache_mb: float | None = None) -> Job:
    info = load_dataset(data)
    cfg: TrainConfig = dataclasses.replace(TrainConfig(**PRESETS["teacher"]["demo"]), run="b",
                                           data=str(data), batch_size=batch, loader_workers=0,
                                           ema_decay=0.99, model=MODEL)
    if cache_mb is not None:
        cfg = dataclasses.replace(cfg, decoded_cache_mb=cache_mb)
    split = {s: {"shards": info.split(s).shards, "count": info.split(s).count}
             for s in ("labeled", "test")}
    model = {"name": MODEL, "train_resolution": 32, "test_resolution": 32, "dropout": 0.2,
             "drop_path": 0.2, "options": cfg.model_options()}
    pseudo = randaugment = None
    if student:
        demo = PRESETS["student"]["demo"]
        cfg = StudentConfig(**{**dataclasses.asdict(cfg), "unlabel_ratio": demo["unlabel_ratio"],
                               "pseudo_loss_weight": demo["pseudo_loss_weight"]})
        unl = info.split("unlabeled")
        write_pseudo_files(unl.shards, data / "pseudo", len(info.classes))
        pseudo = {"shards": unl.shards, "dir": str(data / "pseudo"), "count": unl.count}
        randaugment = {"num_ops": 2, "magnitude": demo["randaugment_m"],
                       "pixels": demo["randaugment_pixels"]}
    return Job(config=cfg, role="student" if student else "teacher", classes=info.classes,
               labeled=split["labeled"], test=split["test"], model=model,
               predictions_dir=tempfile.mkdtemp(), pseudo=pseudo, randaugment=randaugment)


def ours(job: Job, epochs: int, device: torch.device) -> tuple[list[float], float]:
    """images/s of each epoch of our loop, and of the whole run from nothing built."""
    start = clock()
    ctx = WorkerContext(device=device)
    learner = build_learner(job, ctx)
    batches = train_batches(job, ctx, 0)
    steps = train_steps(job, 1)
    rates, total = [], 0.0
    for epoch in range(epochs):
        t0 = clock()
        sums, _ = train_epoch(learner, learner.model, batches, cfg=job.config, ctx=ctx,
                              epoch=epoch, steps=steps, base_lr=1e-3)
        rates.append(sums[3] / (clock() - t0))
        total += sums[3]
    return rates, total / (clock() - start)


def plain(job: Job, epochs: int, device: torch.device) -> tuple[list[float], float]:
    """images/s of each epoch of a plain PyTorch loop over the same images, decoded in memory,
    and of the whole run from nothing built."""
    start = clock()
    cfg = job.config
    ra = None
    if job.randaugment:
        ra = RandAugment(num_ops=job.randaugment["num_ops"],
                         magnitude=job.randaugment["magnitude"],
                         pixels=job.randaugment["pixels"])
    tf = train_transform(32, crop_scale=(cfg.crop_scale_min, 1.0), flip=cfg.flip, randaugment=ra)

    class InMemory(torch.utils.data.Dataset):
        def __init__(self, items: list) -> None:
            self.items = items

        def __len__(self) -> int:
            return len(self.items)

        def __getitem__(self, i: int) -> tuple[torch.Tensor, object]:
            return tf(self.items[i][0]), self.items[i][1]

    def endless(items: list, batch_size: int, what: str):
        # drop_last: our streams never end, so every one of our batches is full; a plain loop's
        # last partial batch would spread a step's fixed cost (optimizer, EMA) over fewer
        # images. With fewer items than a batch it would loop for ever on no batch.
        if len(items) < batch_size:
            raise SystemExit(f"train_epoch: {len(items)} {what} images, fewer than one batch "
                             f"of {batch_size}; lower --batch-size")
        loader = torch.utils.data.DataLoader(InMemory(items), batch_size=batch_size,
                                             shuffle=True, drop_last=True)
        while True:
            yield from loader

    labeled = [(decode_image(s.image), s.label) for s in read_samples(job.labeled["shards"])]
    loaders = [endless(labeled, cfg.batch_size, "labeled")]
    if job.pseudo is not None:
        import pyarrow.parquet as pq

        targets = {}
        for name in pseudo_file_names(job.pseudo["shards"]).values():
            t = pq.read_table(Path(job.pseudo["dir"]) / name).to_pydict()
            dense = dense_targets(torch.tensor(t["topk_index"]),
                                  torch.tensor(np.array(t["topk_prob"], np.float32)),
                                  len(job.classes), cfg.temperature)
            targets.update(zip(t["key"], dense, strict=True))
        unl = [(decode_image(s.image), targets[s.key]) for s in read_samples(job.pseudo["shards"])]
        loaders.append(endless(unl, pseudo_batch_size(cfg), "pseudo-labeled"))
        weight = pseudo_weight(cfg)
    torch.manual_seed(cfg.seed)
    model = create_model(MODEL, len(job.classes), dropout=0.2, drop_path=0.2,
                         **cfg.model_options())
    model = model.to(device, memory_format=torch.channels_last)
    # The precision our loop trains in on this device (pipeline.train._autocast): bf16 on a GPU.
    cast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
            else contextlib.nullcontext())
    ema = EMA(model, cfg.ema_decay)
    opt = make_optimizer(model.parameters(), cfg.optimizer, 1e-3, cfg.weight_decay)
    steps = train_steps(job, 1)
    rates, total = [], 0
    for _ in range(epochs):
        model.train()
        t0, n = clock(), 0
        for _ in range(steps):
            x, y = next(loaders[0])
            x, y = x.to(device), y.to(device)
            if len(loaders) == 1:
                with cast:
                    out = model(x.contiguous(memory_format=torch.channels_last)).float()
                loss = F.cross_entropy(out, y, label_smoothing=cfg.label_smoothing)
            else:
                xu, tu = next(loaders[1])
                with cast:
                    out = model(torch.cat([x, xu.to(device)]).contiguous(
                        memory_format=torch.channels_last)).float()
                tu = tu.to(device)
                soft = -(tu * F.log_softmax(out[len(x):], dim=1)).sum(dim=1).mean()
                loss = F.cross_entropy(out[: len(x)], y, label_smoothing=cfg.label_smoothing) \
                    + weight * soft
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ema.update(model)
            loss.item()  # a plain loop logs its loss each step
            n += len(out)
        rates.append(n / (clock() - t0))
        total += n
    return rates, total / (clock() - start)


def measure(job: Job, epochs: int, repeat: int, device: torch.device) -> dict[str, float]:
    steady, startup = [], []
    for r in range(repeat):
        # Alternate which loop goes first: the first pays one-time costs (lazy imports, the
        # first calls of a kernel, on a GPU its context) that the second finds done.
        if r % 2 == 0:
            a, a_all = ours(job, epochs, device)
            b, b_all = plain(job, epochs, device)
        else:
            b, b_all = plain(job, epochs, device)
            a, a_all = ours(job, epochs, device)
        a_warm, b_warm = statistics.mean(a[1:]), statistics.mean(b[1:])
        steady.append(a_warm / b_warm)
        startup.append(a_all / b_all)
        print(f"{job.role} round {r + 1}: warm epochs ours {a_warm:.0f} img/s, plain "
              f"{b_warm:.0f} img/s ({steady[-1]:.3f}); with start-up ours {a_all:.0f}, plain "
              f"{b_all:.0f} ({startup[-1]:.3f})", flush=True)
    return {f"train_epoch_{job.role}_steady": statistics.median(steady),
            f"train_epoch_{job.role}_with_startup": statistics.median(startup)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=4, help="epochs per measurement (1 warm-up)")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved measurements of each")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--roles", nargs="+", default=["teacher", "student"],
                    choices=["teacher", "student"])
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                    help="time by this process's CPU time (default: robust to other jobs) or by "
                         "wall time")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="train on this device (cuda: wall time, whatever --clock says)")
    ap.add_argument("--decoded-cache-mb", type=float, default=None,
                    help="our streams' decoded cache (default: the job's own, which holds the "
                         "digits; 0 streams and decodes every epoch, as before the cache)")
    ap.add_argument("--json", type=Path, default=None, help="merge the figures into this file")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is visible to torch")
    global clock
    # GPU work runs beside the process, so only wall time measures it.
    wall = args.clock == "wall" or args.device == "cuda"
    clock = time.perf_counter if wall else time.process_time
    if args.epochs < 2 or args.repeat < 1:
        ap.error("--epochs must be >= 2 (the first is warm-up) and --repeat >= 1")
    torch.set_num_threads(1)
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as d:
        data = Path(d) / "digits"
        prepare_digits(data, labeled_fraction=0.5, shard_size=100)
        for role in args.roles:
            figures.update(measure(make_job(data, args.batch_size, role == "student",
                                            args.decoded_cache_mb),
                                   args.epochs, args.repeat, torch.device(args.device)))
    print()
    for name, value in figures.items():
        print(f"{name} (ours / plain PyTorch, median of {args.repeat}): {value:.3f}")
    if args.json is not None:
        from bench.results import merge

        merge(figures, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

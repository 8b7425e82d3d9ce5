"""The GPU checks of the training and labeling code (bench/gpu_check.sh runs this, then the ratios).

    python bench/gpu_check.py --device cuda [--json bench/latest_gpu.json]
    python bench/gpu_check.py --device cpu --quick     # the same code paths, small, on a CPU

1. Teacher steps in bf16 autocast and channels_last: that the training step really runs that way
   (the model's input and weights are channels_last, its convolutions' outputs bfloat16; on a CPU
   autocast is off by design, pipeline.train._autocast), its images/s against the same steps in
   float32 with contiguous tensors, and the host reads of an epoch (on a GPU every one is a
   wait): ``torch.cuda.set_sync_debug_mode`` on a GPU, :mod:`bench.host_syncs`' counter on a CPU.
   The epoch must read the device once, whatever its length.
2. Pseudo-labeling throughput: the teacher actor's callable (``TeacherPredictor``: uint8 batches
   in, padded to the batch size, normalised on the device, top-k out) against the bare forward
   pass on device-resident, normalised tensors, same network (BatchNorm folded, channels_last),
   batch and precision.
3. Bit-exactness across batch mates: pipeline/inference.py promises that an image's soft labels
   do not depend on the other rows of its batch, because every forward pass is padded to one
   shape. The same image is labeled at different positions among different mates, and alone in
   a partial batch; every output must be identical bit for bit. For contrast, the bare model
   with batches of different sizes, which is what the padding guards against, is reported too.

Exit status 1 when a check fails, 2 on bad arguments or a missing device.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Sizes:
    model: str
    resolution: int
    batch: int
    steps: int
    label_batches: int


FULL = Sizes("efficientnet_b0", 224, 64, 30, 8)
QUICK = Sizes("efficientnet_t0", 32, 8, 3, 2)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- 1. teacher steps


def teacher_job(sizes: Sizes) -> Any:
    from pipeline.config import PRESETS, TrainConfig
    from pipeline.train import Job

    cfg = dataclasses.replace(TrainConfig(**PRESETS["teacher"]["demo"]), run="g", data="x",
                              model=sizes.model, batch_size=sizes.batch, ema_decay=0.999)
    empty = {"shards": [], "count": sizes.batch * sizes.steps}
    return Job(config=cfg, role="teacher", classes=[str(i) for i in range(1000)],
               labeled=empty, test=empty, predictions_dir="unused",
               model={"name": sizes.model, "train_resolution": sizes.resolution,
                      "test_resolution": sizes.resolution, "dropout": 0.2, "drop_path": 0.2})


def _batches(sizes: Sizes, classes: int, device: torch.device, n: int) -> list[tuple[Any, None]]:
    g = torch.Generator().manual_seed(0)
    r = sizes.resolution
    return [((torch.randn(sizes.batch, 3, r, r, generator=g).to(device),
              torch.randint(0, classes, (sizes.batch,), generator=g).to(device)), None)
            for _ in range(n)]


def check_precision_and_layout(job: Any, device: torch.device, sizes: Sizes) -> dict[str, Any]:
    """What the training step's model actually sees: input layout, weight layout, conv dtype."""
    from pipeline.train import WorkerContext, build_learner, step_on_device

    learner = build_learner(job, WorkerContext(device=device))
    seen: dict[str, Any] = {}
    conv = next(m for m in learner.model.modules() if isinstance(m, torch.nn.Conv2d))

    def on_input(_m: Any, args: tuple) -> None:  # a hook's return value would replace the input
        seen.setdefault("input_channels_last",
                        args[0].is_contiguous(memory_format=torch.channels_last))

    def on_conv(_m: Any, _i: Any, out: torch.Tensor) -> None:
        seen.setdefault("conv_dtype", str(out.dtype).replace("torch.", ""))

    hooks = [learner.model.register_forward_pre_hook(on_input),
             conv.register_forward_hook(on_conv)]
    (labeled, _), = _batches(sizes, job.num_classes, device, 1)
    step_on_device(learner.model, learner.optimizer, labeled, None, cfg=job.config, device=device)
    for h in hooks:
        h.remove()
    seen["weights_channels_last"] = all(
        p.is_contiguous(memory_format=torch.channels_last)
        for p in learner.model.parameters() if p.ndim == 4)
    want_dtype = "bfloat16" if device.type == "cuda" else "float32"
    seen["ok"] = bool(seen["input_channels_last"] and seen["weights_channels_last"]
                      and seen["conv_dtype"] == want_dtype)
    seen["expected_conv_dtype"] = want_dtype
    return seen


def epoch_reads(job: Any, device: torch.device, sizes: Sizes, steps: int) -> tuple[int, list[str]]:
    """Host reads (GPU: synchronising calls) of one train_epoch of ``steps`` steps, and where
    they were made (file:line of each synchronising call, on a GPU)."""
    from pipeline.train import WorkerContext, build_learner, train_epoch

    ctx = WorkerContext(device=device)
    learner = build_learner(job, ctx)
    batches = _batches(sizes, job.num_classes, device, steps)
    # Outside the count: the optimizer's state, made at its first step, and a read that torch
    # makes once per process in the first epoch of two or more steps (seen on an H200 with
    # torch 2.11: the first counted epoch of a process read twice, the second
    # epoch once, the extra read at torch's own __init__.py, not in our code).
    train_epoch(learner, learner.model, iter(batches[:2]), cfg=job.config, ctx=ctx, epoch=0,
                steps=2, base_lr=1e-3)
    _sync(device)
    if device.type == "cuda":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                train_epoch(learner, learner.model, iter(batches), cfg=job.config, ctx=ctx,
                            epoch=0, steps=steps, base_lr=1e-3)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        sites = [f"{Path(w.filename).name}:{w.lineno}" for w in caught
                 if "synchroniz" in str(w.message)]
        return len(sites), sites
    from bench.host_syncs import count_host_reads, host_scalars

    with count_host_reads(host_scalars(learner.optimizer)) as counter:
        train_epoch(learner, learner.model, iter(batches), cfg=job.config, ctx=ctx, epoch=0,
                    steps=steps, base_lr=1e-3)
    return counter.total, []


def step_rates(job: Any, device: torch.device, sizes: Sizes) -> dict[str, float]:
    """images/s of our epoch (bf16 autocast + channels_last on a GPU) and of the same steps in
    float32 with contiguous tensors (a plain loop, same model, optimizer and batches)."""
    from models import create_model
    from pipeline.optim import EMA, make_optimizer
    from pipeline.train import WorkerContext, build_learner, peak_lr, train_epoch

    ctx = WorkerContext(device=device)
    batches = _batches(sizes, job.num_classes, device, sizes.steps)
    learner = build_learner(job, ctx)
    train_epoch(learner, learner.model, iter(batches[:2]), cfg=job.config, ctx=ctx, epoch=0,
                steps=2, base_lr=1e-3)  # warm-up: kernels chosen, memory allocated
    _sync(device)
    t0 = time.perf_counter()
    train_epoch(learner, learner.model, iter(batches), cfg=job.config, ctx=ctx, epoch=0,
                steps=sizes.steps, base_lr=1e-3)
    _sync(device)
    ours = sizes.batch * sizes.steps / (time.perf_counter() - t0)

    cfg = job.config
    torch.manual_seed(cfg.seed)
    model = create_model(sizes.model, job.num_classes, dropout=0.2, drop_path=0.2).to(device)
    ema = EMA(model, cfg.ema_decay)
    opt = make_optimizer(model.parameters(), cfg.optimizer, peak_lr(cfg, 1), cfg.weight_decay)
    model.train()

    def run(items: list) -> None:
        for (x, y), _ in items:
            loss = F.cross_entropy(model(x), y, label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ema.update(model)

    run(batches[:2])
    _sync(device)
    t0 = time.perf_counter()
    run(batches)
    _sync(device)
    fp32 = sizes.batch * sizes.steps / (time.perf_counter() - t0)
    return {"ours_images_per_s": ours, "fp32_contiguous_images_per_s": fp32}


# ----------------------------------------------------------------------------- 2, 3. labeling


def make_predictor(work: Path, sizes: Sizes, device: torch.device, batch: int) -> Any:
    from models import create_model
    from pipeline.checkpoint import save_model_file
    from pipeline.inference import TeacherPredictor

    torch.manual_seed(0)
    model = create_model(sizes.model, 1000).eval()
    path = work / "teacher.pt"
    sha = save_model_file(path, model.state_dict(), model_name=sizes.model,
                          classes=[str(i) for i in range(1000)],
                          train_resolution=sizes.resolution, test_resolution=sizes.resolution)
    return TeacherPredictor(str(path), sha, topk=10, batch_size=batch,
                            use_gpu=device.type == "cuda", threads=torch.get_num_threads())


def _images(n: int, r: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3, r, r), dtype=np.uint8)


def labeling_rates(pred: Any, sizes: Sizes, batch: int) -> dict[str, float]:
    """images/s of the actor's callable against the bare forward on normalised device tensors."""
    images = _images(batch * sizes.label_batches, sizes.resolution, 1)
    pred.forward(images[:batch])  # warm-up
    _sync(pred.device)
    t0 = time.perf_counter()
    pred.forward(images)
    actor = len(images) / (time.perf_counter() - t0)
    x = torch.stack([pred.normalize(torch.from_numpy(images[i:i + batch]))
                     for i in range(0, len(images), batch)]).to(pred.device)
    cast = (torch.autocast("cuda", dtype=torch.bfloat16) if pred.device.type == "cuda"
            else torch.autocast("cpu", enabled=False))

    def bare() -> None:  # the actor's network (pipeline.inference.inference_model) and layout
        with torch.inference_mode(), cast:
            for b in x:
                pred.model(b.contiguous(memory_format=torch.channels_last))

    bare()
    _sync(pred.device)
    t0 = time.perf_counter()
    bare()
    _sync(pred.device)
    forward = len(images) / (time.perf_counter() - t0)
    return {"actor_images_per_s": actor, "bare_forward_images_per_s": forward}


def rows_identical(pred: Any, sizes: Sizes, batch: int) -> bool:
    """Whether the same image gets the same outputs, bit for bit, among two different sets of
    mates at two positions, and alone in a partial batch."""
    r = sizes.resolution
    target = _images(1, r, 7)
    a = np.concatenate([target, _images(batch - 1, r, 8)])
    b = np.concatenate([_images(batch // 2, r, 9), target, _images(batch - batch // 2 - 1, r, 10)])
    outs = [pred.forward(a), pred.forward(b), pred.forward(target)]
    rows = [{k: v[0] for k, v in outs[0].items()}, {k: v[batch // 2] for k, v in outs[1].items()},
            {k: v[0] for k, v in outs[2].items()}]
    return all(np.array_equal(rows[0][k], other[k]) for other in rows[1:] for k in rows[0])


def unpadded_difference(pred: Any, sizes: Sizes, batch: int) -> float:
    """Max |logit difference| of one image through the bare model in a batch of 1 and of
    ``batch``: what the padding guards against (0 where the kernels do not depend on the size)."""
    a = np.concatenate([_images(1, sizes.resolution, 7), _images(batch - 1, sizes.resolution, 8)])
    logits = []
    with torch.inference_mode():
        for n in (1, batch):
            x = pred.normalize(torch.from_numpy(a[:n])).to(pred.device)
            x = x.contiguous(memory_format=torch.channels_last)
            if pred.device.type == "cuda":
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    logits.append(pred.model(x)[0].float().cpu())
            else:
                logits.append(pred.model(x)[0])
    return float((logits[0] - logits[1]).abs().max())


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--quick", action="store_true",
                    help=f"small sizes ({QUICK.model} at {QUICK.resolution} px): checks the code "
                         "paths run, measures little")
    ap.add_argument("--json", type=Path, default=None, help="merge the figures into this file")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device visible to torch {torch.__version__} (CUDA build: "
              f"{torch.version.cuda or 'none'}); run on a GPU machine, or pass --device cpu "
              "--quick to check the code paths", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    sizes = QUICK if args.quick else FULL
    if device.type == "cpu":
        torch.set_num_threads(1)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"gpu_check on {name}: {sizes.model} at {sizes.resolution} px, batch {sizes.batch}")
    job = teacher_job(sizes)
    failed = []

    layout = check_precision_and_layout(job, device, sizes)
    print(f"1. teacher step: input channels_last {layout['input_channels_last']}, weights "
          f"channels_last {layout['weights_channels_last']}, conv output {layout['conv_dtype']} "
          f"(expected {layout['expected_conv_dtype']})")
    if not layout["ok"]:
        failed.append("precision/layout")
    counted = {n: epoch_reads(job, device, sizes, n) for n in (2, 4)}
    reads = {n: c[0] for n, c in counted.items()}
    print(f"   host reads of an epoch: {reads[2]} for 2 steps, {reads[4]} for 4 steps "
          "(expected 1 and 1)")
    for n, (_, sites) in counted.items():
        if sites:
            print(f"   where, {n} steps: {', '.join(sites)}")
    if reads != {2: 1, 4: 1}:
        failed.append("host reads")
    rates = step_rates(job, device, sizes)
    print(f"   images/s: ours {rates['ours_images_per_s']:,.0f}, float32 contiguous "
          f"{rates['fp32_contiguous_images_per_s']:,.0f} "
          f"({rates['ours_images_per_s'] / rates['fp32_contiguous_images_per_s']:.2f}x)")
    big = None
    if device.type == "cuda":  # a small batch is bound by kernel launches, not arithmetic
        wide = dataclasses.replace(sizes, batch=4 * sizes.batch, steps=max(sizes.steps // 3, 4))
        big = step_rates(teacher_job(wide), device, wide)
        print(f"   batch {wide.batch}: ours {big['ours_images_per_s']:,.0f}, float32 contiguous "
              f"{big['fp32_contiguous_images_per_s']:,.0f} "
              f"({big['ours_images_per_s'] / big['fp32_contiguous_images_per_s']:.2f}x)")

    label_batch = 256 if not args.quick else 4
    with tempfile.TemporaryDirectory() as d:
        pred = make_predictor(Path(d), sizes, device, label_batch)
        label = labeling_rates(pred, sizes, label_batch)
        mates = {"ok": rows_identical(pred, sizes, label_batch),
                 "unpadded_max_abs_diff": unpadded_difference(pred, sizes, label_batch)}
    print(f"2. pseudo-labeling, batch {label_batch}: actor {label['actor_images_per_s']:,.0f} "
          f"images/s, bare forward {label['bare_forward_images_per_s']:,.0f} images/s "
          f"({label['actor_images_per_s'] / label['bare_forward_images_per_s']:.2f}x)")
    print(f"3. batch mates: padded rows identical bit for bit: {mates['ok']}; "
          f"unpadded bare model, batch 1 vs {label_batch}: max |logit diff| "
          f"{mates['unpadded_max_abs_diff']:.3g}")
    if not mates["ok"]:
        failed.append("batch mates")

    if args.json is not None:
        from bench.results import merge

        # On a CPU (--quick) the keys say so: they are a check that the code runs, not figures.
        p = "gpu" if device.type == "cuda" else "cpu_quick"
        merge({f"{p}_teacher_step_bf16_cl_over_fp32":
               rates["ours_images_per_s"] / rates["fp32_contiguous_images_per_s"],
               f"{p}_teacher_step_images_per_s": rates["ours_images_per_s"],
               f"{p}_label_actor_over_bare_forward":
               label["actor_images_per_s"] / label["bare_forward_images_per_s"],
               f"{p}_label_images_per_s": label["actor_images_per_s"],
               f"{p}_batch_mates_bit_exact": float(mates["ok"]),
               f"{p}_epoch_host_reads": float(reads[4]),
               **({} if big is None else {
                   f"{p}_teacher_step_bf16_cl_over_fp32_batch4x":
                   big["ours_images_per_s"] / big["fp32_contiguous_images_per_s"],
                   f"{p}_teacher_step_images_per_s_batch4x": big["ours_images_per_s"]})},
              args.json)
    if failed:
        print(f"gpu_check: FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    print("gpu_check: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Decode + train-time noise, images/s: ours against a plain PIL + torchvision v2 loop.

    python bench/augment.py                    # about a minute on 2 CPU cores
    python bench/augment.py --rounds 1 --min-seconds 0.2 --json bench/latest.json

Ours, per image, as a training stream does it: ``pipeline.images.decode_image`` (PIL, every image
mode, contiguous uint8) then ``pipeline.transforms.train_transform`` with our RandAugment
(random-resized crop, flip, 2 ops at magnitude 9 out of 10, the official pixel constants; the
small-image path adds its Cutout), normalised to float32. The plain loop: ``PIL.Image.open`` +
``convert("RGB")``, then torchvision v2's ``RandomResizedCrop``, ``RandomHorizontalFlip``,
``RandAugment(num_ops=2, magnitude=9)`` (torchvision's own ops, M a bin out of 31), ``ToImage``,
``ToDtype``, ``Normalize``: what a PyTorch user writes. The two RandAugments are not the same
augmentation (pipeline/augment.py says why ours follows the paper's code), so this measures
what the paper's noise costs against the common one, decode included.

Workloads: the bundled digits (32x32 PNG, cropped to 32 px) and JPEG photos (scikit-learn's two
sample photos and their mirror images at 640x480, quality 90, cropped to 224 px as ImageNet
training does). Rates are images per CPU-second of the thread (``time.thread_time``), one torch
thread, interleaved rounds, median. ``augment_vs_plain`` in latest.json is the photo workload
(the recipe's case); ``augment_vs_plain_digits`` the digits.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torchvision.transforms import v2  # noqa: E402

from bench.timing import per_cpu_second  # noqa: E402
from pipeline.augment import RandAugment  # noqa: E402
from pipeline.images import decode_image  # noqa: E402
from pipeline.transforms import MEAN, STD, train_transform  # noqa: E402

NUM_OPS, MAGNITUDE = 2, 9


def ours(resolution: int) -> Callable[[bytes], torch.Tensor]:
    tf = train_transform(resolution, randaugment=RandAugment(NUM_OPS, MAGNITUDE))
    return lambda data: tf(decode_image(data))


def plain(resolution: int) -> Callable[[bytes], torch.Tensor]:
    tf = v2.Compose([v2.RandomResizedCrop(resolution, antialias=True),
                     v2.RandomHorizontalFlip(), v2.RandAugment(NUM_OPS, MAGNITUDE), v2.ToImage(),
                     v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])

    def run(data: bytes) -> torch.Tensor:
        with Image.open(io.BytesIO(data)) as img:
            return tf(img.convert("RGB"))
    return run


def workloads() -> dict[str, tuple[list[bytes], int]]:
    from sklearn.datasets import load_sample_images

    from pipeline.dataset import digits_images
    from pipeline.shards import encode_png

    digits, _ = digits_images()
    photos = [Image.fromarray(a) for a in load_sample_images().images]
    photos += [p.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for p in photos]
    jpgs = []
    for p in photos:
        buf = io.BytesIO()
        p.resize((640, 480), Image.Resampling.BICUBIC).save(buf, format="JPEG", quality=90)
        jpgs.append(buf.getvalue())
    return {"digits": ([encode_png(a) for a in digits[:400]], 32), "photo": (jpgs, 224)}


def rate(fn: Callable[[bytes], torch.Tensor], data: list[bytes], min_s: float) -> float:
    out = fn(data[0])
    assert out.dtype == torch.float32 and out.ndim == 3  # both give the model's input
    return per_cpu_second(fn, data, min_s)


def measure(rounds: int, min_s: float) -> dict[str, dict[str, float]]:
    torch.set_num_threads(1)
    out = {}
    for name, (data, res) in workloads().items():
        fns = {"ours": ours(res), "plain": plain(res)}
        for fn in fns.values():
            fn(data[0])  # lazy imports, first-call set-up
        rates: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(rounds):
            for k, fn in fns.items():
                rates[k].append(rate(fn, data, min_s))
        out[name] = {k: statistics.median(v) for k, v in rates.items()}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--min-seconds", type=float, default=1.0,
                    help="minimum CPU time of one pass in a round")
    ap.add_argument("--json", type=Path, default=None, help="merge the figures into this file")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.min_seconds <= 0:
        ap.error("--rounds must be >= 1 and --min-seconds > 0")
    m = measure(args.rounds, args.min_seconds)
    print(f"decode + augment, images per CPU-second, 1 thread, median of {args.rounds} rounds")
    for name, r in m.items():
        print(f"  {name:<7} ours {r['ours']:7.0f}  plain {r['plain']:7.0f}  "
              f"ratio {r['ours'] / r['plain']:.3f}")
    if args.json is not None:
        from bench.results import merge

        merge({"augment_vs_plain": m["photo"]["ours"] / m["photo"]["plain"],
               "augment_vs_plain_digits": m["digits"]["ours"] / m["digits"]["plain"]}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

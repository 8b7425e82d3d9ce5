"""``prepare imagefolder`` of large photos: worker processes against one process, and what
``--max-short-side`` costs and saves.

    python bench/prepare.py                          # about two minutes on 2 CPU cores
    python bench/prepare.py --json bench/latest.json # what make bench runs

Workload: a class-per-folder tree of 4000x3000 JPEGs (12-megapixel phone photos, quality 90),
made from scikit-learn's two bundled photographs, mirrored and cropped into 8 different pictures
copied to ``--files`` files. Every file is decoded in full to check it (the cost being shared
out). Figures, each against a baseline of the same run:

* files per second of wall time with one process per CPU over one process (the shards come
  out identical, which the test suite checks), median of ``--repeat`` interleaved runs;
* with ``--max-short-side 915`` (what training at 224 px uses, ``train_min_side``) over
  without, both with one process per CPU: files per second, and bytes stored;
* the training path at 224 px (decode with the reduction training asks for, random-resized
  crop, flip), images per CPU-second of one thread on the shrunk files over the originals.
"""

from __future__ import annotations

import argparse
import io
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Nothing here imports torch at the top: the worker processes (spawned) import this module
# again, as they import jobs/prepare.py in real use, which does not import it either.
from PIL import Image  # noqa: E402

from pipeline.dataset import default_workers, load_dataset, prepare_imagefolder  # noqa: E402
from pipeline.shards import read_samples  # noqa: E402

SIDE = 915  # train_min_side(224, 0.08): the most that training at 224 px uses


def photo_tree(root: Path, files: int) -> int:
    """``files`` 12-MP JPEGs under root/a and root/b; returns their total bytes."""
    from sklearn.datasets import load_sample_images

    pictures = []
    for a in load_sample_images().images:
        pic = Image.fromarray(a)
        w, h = pic.size
        for img in (pic, pic.transpose(Image.Transpose.FLIP_LEFT_RIGHT)):
            for box in ((0, 0, w, h), (w // 8, h // 8, w - w // 8, h - h // 8)):
                if len(pictures) < files:
                    buf = io.BytesIO()
                    img.crop(box).resize((4000, 3000), Image.Resampling.BICUBIC).save(
                        buf, "JPEG", quality=90)
                    pictures.append(buf.getvalue())
    total = 0
    for i in range(files):
        folder = root / ("a", "b")[i % 2]
        folder.mkdir(parents=True, exist_ok=True)
        data = pictures[i % len(pictures)]
        (folder / f"{i:05d}.jpg").write_bytes(data)
        total += len(data)
    return total


def run(src: Path, out: Path, workers: int, max_short_side: int | None = None) -> float:
    """Seconds of wall time of one prepare into a new folder."""
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    prepare_imagefolder(src, out, split="labeled", shard_size=1000, workers=workers,
                        max_short_side=max_short_side)
    return time.perf_counter() - t0


def stored(out: Path) -> list[bytes]:
    return [s.image for s in read_samples(load_dataset(out).splits["labeled"].shards)]


def train_rate(images: list[bytes], min_s: float) -> float:
    """Images per CPU-second of this thread through the training path at 224 px."""
    from bench.timing import per_cpu_second
    from pipeline.images import decode_image
    from pipeline.transforms import train_min_side, train_transform

    tf, side = train_transform(224, crop_scale=(0.08, 1.0)), train_min_side(224, 0.08, True)
    return per_cpu_second(lambda d: tf(decode_image(d, min_side=side)), images, min_s)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=256)
    ap.add_argument("--min-seconds", type=float, default=3.0,
                    help="CPU seconds of each training-path timing")
    ap.add_argument("--repeat", type=int, default=3,
                    help="interleaved runs of each prepare, median taken (default 3)")
    ap.add_argument("--json", type=Path, default=None, help="merge the figures into this file")
    args = ap.parse_args(argv)
    import pipeline.dataset as dataset
    from pipeline.transforms import train_min_side

    assert train_min_side(224, 0.08, True) == SIDE
    workers = default_workers()
    dataset.FILES_PER_WORKER = 1  # every worker even for a small tree: the figure is the sharing
    figures = {}
    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp:
        src, tmp = Path(tmp) / "src", Path(tmp)
        total = photo_tree(src, args.files)
        print(f"{args.files} photo JPEGs 4000x3000, {total / 1e6:.0f} MB; files/s of wall time")
        # Interleaved, and the order turns each round: this machine's speed drifts over
        # minutes, and the first run in the process pays its lazy imports.
        sides = [("one", 1, None), ("many", workers, None), ("small", workers, SIDE)]
        rates: dict[str, list[float]] = {name: [] for name, _, _ in sides}
        for r in range(args.repeat):
            for name, n, side in sides[r % 3:] + sides[: r % 3]:
                rates[name].append(args.files / run(src, tmp / name, n, side))
        one, many, small = (statistics.median(rates[name]) for name, _, _ in sides)
        print(f"{'1 process':<34}{one:>8.1f}")
        print(f"{f'{workers} processes (one per CPU)':<34}{many:>8.1f}{many / one:>8.2f}x")
        kept, shrunk = stored(tmp / "many"), stored(tmp / "small")
        size = sum(map(len, shrunk)) / sum(map(len, kept))
        print(f"{f'the same, --max-short-side {SIDE}':<34}{small:>8.1f}{small / many:>8.2f}x"
              f"   stored {sum(map(len, shrunk)) / 1e6:.1f} MB ({size:.3f} of the originals)")
        # The distinct pictures (the rest are copies; prepare wrote them in a random order),
        # each as kept and as shrunk: the two lists are in the same order (same --seed).
        distinct = list({k: (k, s) for k, s in zip(kept, shrunk, strict=True)}.values())
        full = train_rate([k for k, _ in distinct], args.min_seconds)
        reduced = train_rate([s for _, s in distinct], args.min_seconds)
        print(f"training path at 224 px, images/CPU-s: originals {full:.1f}, shrunk "
              f"{reduced:.1f} ({reduced / full:.2f}x)")
        figures["prepare_workers_over_one"] = round(many / one, 4)
        figures[f"prepare_max_short_side_{SIDE}_over_kept"] = round(small / many, 4)
        figures[f"prepare_max_short_side_{SIDE}_bytes_over_kept"] = round(size, 4)
        figures[f"train_decode_max_short_side_{SIDE}_over_kept_12mp_224"] = round(
            reduced / full, 4)
    if args.json is not None:
        from bench.results import merge

        merge(figures, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

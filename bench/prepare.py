"""``prepare imagefolder`` of large photos: worker processes against one process.

    python bench/prepare.py                          # about a minute on 2 CPU cores
    python bench/prepare.py --json bench/latest.json # what make bench runs

Workload: a class-per-folder tree of 4000x3000 JPEGs (12-megapixel phone photos, quality 90),
made from scikit-learn's two bundled photographs, mirrored and cropped into 8 different pictures
copied to ``--files`` files. Every file is decoded in full to check it (the cost being shared
out). Figures: files per second of wall time with one process per CPU over one process, in the
same run (the shards come out identical, which the test suite checks).
"""

from __future__ import annotations

import argparse
import io
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from PIL import Image  # noqa: E402

from pipeline.dataset import default_workers, prepare_imagefolder  # noqa: E402


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


def run(src: Path, out: Path, workers: int) -> float:
    """Seconds of wall time of one prepare into a new folder."""
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    prepare_imagefolder(src, out, split="labeled", shard_size=1000, workers=workers)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=256)
    ap.add_argument("--json", type=Path, default=None, help="merge the figures into this file")
    args = ap.parse_args(argv)
    import pipeline.dataset as dataset

    workers = default_workers()
    dataset.FILES_PER_WORKER = 1  # every worker even for a small tree: the figure is the sharing
    figures = {}
    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp:
        src = Path(tmp) / "src"
        total = photo_tree(src, args.files)
        print(f"{args.files} photo JPEGs 4000x3000, {total / 1e6:.0f} MB; files/s of wall time")
        one = args.files / run(src, Path(tmp) / "one", 1)
        many = args.files / run(src, Path(tmp) / "many", workers)
        print(f"{'1 process':<28}{one:>8.1f}")
        print(f"{f'{workers} processes (one per CPU)':<28}{many:>8.1f}{many / one:>8.2f}x")
        figures["prepare_workers_over_one"] = round(many / one, 4)
    if args.json is not None:
        from bench.results import merge

        merge(figures, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

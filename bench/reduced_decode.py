"""Decode + evaluation crop of large JPEGs: reduced decoding (libjpeg's DCT scaling) against
the full decode, the teacher's input path in evaluation and pseudo-labeling.

    python bench/reduced_decode.py                   # about a minute on 2 CPU cores
    python bench/reduced_decode.py --json bench/latest.json   # what make bench runs

Workloads: scikit-learn's two bundled photographs (china, flower) and their mirror images,
resized to 4000x3000 (a 12-megapixel phone photo) and 1600x1200, JPEG quality 90. Paths:
``pipeline.transforms.eval_crop`` at 224 px (shorter side resized to 256, then the centre) and
at 600 px (632), after ``pipeline.images.decode_image`` with ``min_side`` as the stages pass it
(reduced) and without (full, what ``--no-jpeg-dct-scaling`` does). Rates are images per
CPU-second of this thread (``time.thread_time``), one torch thread as in a reader task; each
round times both paths once, interleaved; each path's median over the rounds is taken, and the
ratio is of those medians, reduced over full in the same run. Also printed: the mean and
99th-percentile absolute difference of
the two paths' uint8 pixels (levels of 255). Then the training path at 224 px: random-resized
crop (8-100% of the area), flip and normalise, the decoder reduced down to 915 px
(``pipeline.transforms.train_min_side``) against the full decode.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from bench.timing import per_cpu_second as rate  # noqa: E402
from pipeline.images import decode_image  # noqa: E402
from pipeline.transforms import (  # noqa: E402
    eval_crop,
    eval_decode_side,
    train_min_side,
    train_transform,
)


def photos(w: int, h: int) -> list[bytes]:
    from sklearn.datasets import load_sample_images

    out = []
    for a in load_sample_images().images:
        pic = Image.fromarray(a)
        for img in (pic, pic.transpose(Image.Transpose.FLIP_LEFT_RIGHT)):
            buf = io.BytesIO()
            img.resize((w, h), Image.Resampling.BICUBIC).save(buf, "JPEG", quality=90)
            out.append(buf.getvalue())
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--min-seconds", type=float, default=0.5)
    ap.add_argument("--json", type=Path, default=None, help="merge the figures into this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    figures = {}
    print(f"decode + eval crop, images per CPU-second, 1 thread, median of {args.rounds} rounds")
    print(f"{'workload':<22}{'size':>6}{'full':>9}{'reduced':>9}{'ratio':>7}"
          f"{'decoded at':>13}{'mean|d|':>9}{'p99|d|':>8}")
    for (w, h), tag in (((4000, 3000), "12mp"), ((1600, 1200), "2mp")):
        data = photos(w, h)
        for res in (224, 600):
            crop, side = eval_crop(res), eval_decode_side(res)

            def full(d: bytes, crop=crop) -> torch.Tensor:  # noqa: ANN001
                return crop(decode_image(d)[None])[0]

            def reduced(d: bytes, crop=crop, side: int = side) -> torch.Tensor:  # noqa: ANN001
                return crop(decode_image(d, min_side=side)[None])[0]

            diff = torch.cat([(full(d).float() - reduced(d).float()).abs().flatten()
                              for d in data])
            at = tuple(decode_image(data[0], min_side=side).shape[1:])
            rates: dict[str, list[float]] = {"full": [], "reduced": []}
            for _ in range(args.rounds):
                rates["full"].append(rate(full, data, args.min_seconds))
                rates["reduced"].append(rate(reduced, data, args.min_seconds))
            f, r = (statistics.median(rates[k]) for k in ("full", "reduced"))
            print(f"{f'photo jpg {w}x{h}':<22}{res:>6}{f:>9.1f}{r:>9.1f}{r / f:>7.2f}"
                  f"{f'{at[1]}x{at[0]}':>13}{diff.mean():>9.2f}"
                  f"{diff.kthvalue(int(0.99 * len(diff))).values:>8.0f}")
            figures[f"eval_decode_reduced_over_full_{tag}_{res}"] = round(r / f, 4)
    # Training: random-resized crop (8-100% of the area) + flip + normalise at 224 px, the
    # decoder reduced down to the side at which the smallest crop keeps 224 px.
    side = train_min_side(224, 0.08, True)
    tf = train_transform(224, crop_scale=(0.08, 1.0))
    for (w, h), tag in (((4000, 3000), "12mp"), ((1600, 1200), "2mp")):
        data = photos(w, h)
        at = tuple(decode_image(data[0], min_side=side).shape[1:])
        rates = {"full": [], "reduced": []}
        for _ in range(args.rounds):
            rates["full"].append(rate(lambda d: tf(decode_image(d)), data, args.min_seconds))
            rates["reduced"].append(rate(lambda d: tf(decode_image(d, min_side=side)), data,
                                         args.min_seconds))
        f, r = (statistics.median(rates[k]) for k in ("full", "reduced"))
        print(f"{f'train photo {w}x{h}':<22}{224:>6}{f:>9.1f}{r:>9.1f}{r / f:>7.2f}"
              f"{f'{at[1]}x{at[0]}':>13}{'(random crops)':>17}")
        figures[f"train_decode_reduced_over_full_{tag}_224"] = round(r / f, 4)
    if args.json is not None:
        from bench.results import merge

        merge(figures, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Images/s of ``pipeline.images.decode_image`` against the torchvision decoder it replaces.

    python bench/decode.py                # about a minute on 2 CPU cores
    python bench/decode.py --rounds 3     # quicker, noisier

Workloads (all plain 8-bit RGB, the case every stage sees most):
    digits png 32x32      the bundled 1,797 digits (8x8 scaled to 32x32), ``encode_png``
    photo jpg 640x480     JPEGs, quality 90, made with PIL from scikit-learn's two sample photos
                          (china, flower) and their mirror images: real-photo content
    photo jpg 1600x1200   the same, larger
    photo png 640x480     the 640x480 photos as PNG
    noise jpg 640x480     synthetic gradients plus noise, quality 90: high entropy
    noise jpg 1600x1200   the same, larger

Decoders, one thread (``torch.set_num_threads(1)``, as in a decode worker):
    baseline      ``pipeline.shards.decode_image`` as it was before ``pipeline/images.py``
                  (torchvision ``decode_image(mode=RGB)``; copied here so this script keeps
                  measuring it after shards.py switches over). Its tensors are (3, H, W) views
                  of an (H, W, 3) buffer: NOT contiguous.
    base+contig   the baseline made contiguous the cheapest way found (a numpy copy; torch's
                  .contiguous() is ~2x slower on this layout): same output as ``images``.
    tv fastpath   the fast path considered for ``images`` and not adopted: PIL parses the header
                  (format, mode, transparency, orientation, size limit: the checks it needs),
                  torchvision decodes the pixels, then the numpy copy.
    images        ``pipeline.images.decode_image`` (PIL; contiguous output)

Rates are images per CPU-second of the decoding thread (``time.thread_time``), so other work
on a shared machine slows the figures less than wall time would. Each round times every decoder
once over the workload, interleaved; each decoder's median over the rounds is taken, and the
ratios are of those medians against the baseline's, in the same run. The script also checks
that all give identical pixels on every image.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
from PIL import Image  # noqa: E402

from bench.timing import per_cpu_second as rate  # noqa: E402
from pipeline import images  # noqa: E402
from pipeline.shards import ShardError  # noqa: E402


def baseline_decode(data: bytes, where: str = "") -> torch.Tensor:
    """Verbatim the former ``pipeline.shards.decode_image``."""
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_image as _decode

    try:
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        return _decode(buf, mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError) as e:
        raise ShardError(f"{where or 'image'}: cannot decode image ({str(e).splitlines()[0]})") \
            from None


def _contiguous(t: torch.Tensor) -> torch.Tensor:
    if t.is_contiguous():
        return t
    out = np.empty(tuple(t.shape), np.uint8)
    out[...] = t.numpy()
    return torch.from_numpy(out)


def baseline_contiguous(data: bytes) -> torch.Tensor:
    return _contiguous(baseline_decode(data))


def tv_fastpath(data: bytes) -> torch.Tensor:
    """torchvision pixels after PIL's header checks; anything unusual goes to ``images``."""
    with Image.open(io.BytesIO(data)) as img:
        images._check_header(img, img.size)
        plain = (img.format in ("JPEG", "PNG") and img.mode in ("RGB", "L")
                 and "transparency" not in img.info
                 and not any(k in img.info for k in images._ORIENTATION_KEYS))
    if not plain:
        return images.decode_image(data)
    return _contiguous(baseline_decode(data))


DECODERS: dict[str, Callable[[bytes], torch.Tensor]] = {
    "baseline": baseline_decode,
    "base+contig": baseline_contiguous,
    "tv fastpath": tv_fastpath,
    "images": images.decode_image,
}


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def workloads() -> dict[str, list[bytes]]:
    from sklearn.datasets import load_sample_images

    from pipeline.dataset import digits_images
    from pipeline.shards import encode_png

    digits, _ = digits_images()
    photos = [Image.fromarray(a) for a in load_sample_images().images]
    photos += [p.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for p in photos]
    small = [p.resize((640, 480), Image.Resampling.BICUBIC) for p in photos]
    big = [p.resize((1600, 1200), Image.Resampling.BICUBIC) for p in photos]
    rng = np.random.default_rng(0)

    def noise(w: int, h: int) -> bytes:
        y, x = np.mgrid[0:h, 0:w]
        a = np.stack([x * 255 // w, y * 255 // h, (x + y) % 256], axis=-1)
        a = (a + rng.integers(0, 40, a.shape)).clip(0, 255).astype(np.uint8)
        return _encode(Image.fromarray(a), "JPEG", quality=90)

    return {
        "digits png 32x32": [encode_png(a) for a in digits],
        "photo jpg 640x480": [_encode(p, "JPEG", quality=90) for p in small],
        "photo jpg 1600x1200": [_encode(p, "JPEG", quality=90) for p in big],
        "photo png 640x480": [_encode(p, "PNG") for p in small],
        "noise jpg 640x480": [noise(640, 480) for _ in range(4)],
        "noise jpg 1600x1200": [noise(1600, 1200) for _ in range(2)],
    }


def check_identical(data: list[bytes]) -> bool:
    for d in data:
        ref = baseline_decode(d)
        for name, decode in DECODERS.items():
            out = decode(d)
            if not torch.equal(out, ref):
                print(f"  MISMATCH: {name} differs from the baseline", file=sys.stderr)
                return False
            if name != "baseline" and not out.is_contiguous():  # the baseline's never are
                print(f"  {name} returned a non-contiguous tensor", file=sys.stderr)
                return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--min-seconds", type=float, default=0.4,
                    help="minimum time of one decoder's pass in a round")
    args = ap.parse_args()
    torch.set_num_threads(1)

    loads = workloads()
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, "
          f"PIL {Image.__version__}; images per CPU-second, 1 thread, "
          f"median of {args.rounds} rounds")
    header = f"{'workload':<21}" + "".join(f"{n:>13}" for n in DECODERS)
    print(header + f"{'images/base':>13}{'/contig':>9}{'fast/images':>13}  identical")
    for name, data in loads.items():
        same = check_identical(data)
        for decode in DECODERS.values():  # warm up caches and lazy imports
            decode(data[0])
        rates: dict[str, list[float]] = {n: [] for n in DECODERS}
        for _ in range(args.rounds):
            for n, decode in DECODERS.items():
                rates[n].append(rate(decode, data, args.min_seconds))
        med = {n: statistics.median(r) for n, r in rates.items()}
        base = med["baseline"]
        print(f"{name:<21}" + "".join(f"{med[n]:>13.0f}" for n in DECODERS)
              + f"{med['images'] / base:>13.2f}{med['images'] / med['base+contig']:>9.2f}"
              + f"{med['tv fastpath'] / med['images']:>13.2f}  " + ("yes" if same else "NO"))


if __name__ == "__main__":
    main()

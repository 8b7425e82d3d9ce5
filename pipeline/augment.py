"""The paper's RandAugment, with the semantics of the official code, on torchvision v2 ops.

Reference: ``randaugment.py`` in google-research/noisystudent (the same ops as ``autoaugment.py`` in
tensorflow/tpu, ``distort_image_with_randaugment``). torchvision's ``RandAugment`` is a different
augmentation (M is a bin index out of 31, no Cutout), so it is not used here.

Semantics, as in the official code:

* Every call picks ``num_ops`` ops uniformly at random *with replacement* and always applies each
  (the official loop draws a ``prob`` and never uses it).
* Magnitude M is a level out of 10 for each op's maximum, with no clipping: Rotate 30*M/10 degrees,
  Shear 0.3*M/10, enhance factor (M/10)*1.8 + 0.1, Posterize int(4*M/10) bits, Solarize
  threshold int(256*M/10), SolarizeAdd int(110*M/10). So M=27 rotates by 81 degrees and shears by
  0.81.
* Translate and Cutout are in pixels that do not scale with the image (``pixels="official"``,
  the default). The ImageNet path (every EfficientNet resolution): Translate 100*M/10 px, Cutout
  half-side int(40*M/10) px. The small-image path (the official code's CIFAR-10/SVHN path; here
  any image whose shorter side is at most ``SMALL_IMAGE_MAX`` px): both constants are
  image_size // 8, and after RandAugment one more Cutout of half-side image_size // 4 is always
  applied (a 16x16 grey square on 32 px). ``pixels="scaled"`` instead scales the ImageNet
  constants by image size / 224, so that they cover the same fraction of any image (the demo
  preset's measured choice; README).
* Rotate, Shear and Translate get a random sign; the others do not.
* Pixels uncovered by geometric ops and the Cutout square are filled with grey (128).
* Interpolation is nearest-neighbour (the default of the official ``contrib.image`` ops).

Which ops are the identity at M=0 (relevant to ``magnitude=0``): Rotate, ShearX, ShearY,
TranslateX, TranslateY, SolarizeAdd and Cutout. The others are not: AutoContrast, Equalize and
Invert ignore M; Posterize (1 bit), Solarize (threshold 0 = invert) and the enhance ops
(factor 0.1) are at their *strongest* at M=0, because the official level-to-argument functions run
in that direction. A literal M=0 in the official code is therefore heavy noise, not "none";
:class:`RandAugment` treats ``magnitude=0`` as "RandAugment off" (the recipe's "B0-B1: none").

Deviations from the official code are each noted where they happen (``_contrast``,
``_posterize_arg``, ``_solarize_arg``, ``_autocontrast``, ``_luma``, the warps) and listed in
docs/recipe.md (D4, D4b): Contrast blends towards the image's mean grey as PIL does (the official
op's "mean" is a constant set by the image size, a bug); Posterize bits and the Solarize
threshold are clamped into the op's range at large M; AutoContrast, Color and Contrast match PIL
exactly where torchvision's kernels do not; which RandAugment path applies is decided by image
size (``SMALL_IMAGE_MAX``), where the official code decides by data set; geometry matches TF up
to rounding ties at half pixels.
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import torchvision.transforms.v2.functional as F
from torch.utils.data import get_worker_info
from torchvision import tv_tensors

__all__ = [
    "FILL",
    "MAX_LEVEL",
    "PIXELS",
    "SMALL_IMAGE_MAX",
    "RANDAUGMENT_OPS",
    "REFERENCE_SIZE",
    "OpSpec",
    "RandAugment",
    "apply_op",
    "op_argument",
]

MAX_LEVEL = 10.0  # M is a level out of this; M above it is allowed and extrapolates (no clipping)
FILL = 128  # grey, the official `replace` value for uncovered pixels
REFERENCE_SIZE = 224  # image side at which the official pixel constants are defined
_TRANSLATE_CONST = 100.0  # px, official translate_const (ImageNet path, every resolution)
_CUTOUT_CONST = 40.0  # half-side px, official cutout_const (ImageNet path)
SMALL_IMAGE_MAX = 64  # images up to this side take the official small-image (32 px) path
PIXELS = ("official", "scaled")

LevelToArg = Callable[[float, int, int, str], Any]
"""(magnitude, height, width, pixels) -> the op's argument (None for ops without one)."""
ApplyFn = Callable[[torch.Tensor, Any, torch.Generator | None], torch.Tensor]
"""(uint8 image (..., C, H, W), argument, generator) -> image of the same shape and dtype."""


class OpSpec(NamedTuple):
    """One row of the op table."""

    level_to_arg: LevelToArg
    apply: ApplyFn
    signed: bool  # the official code negates the argument with probability 1/2


# --------------------------------------------------------------------------- level -> argument


def _level(m: float) -> float:
    # Written exactly as the official `(level / _MAX_LEVEL) * const` so that the float results (and
    # the int() truncations below) are bit-identical to it.
    return m / MAX_LEVEL


def _no_arg(m: float, h: int, w: int, pixels: str = "official") -> None:
    return None


def _rotate_arg(m: float, h: int, w: int, pixels: str = "official") -> float:
    return _level(m) * 30.0


def _shear_arg(m: float, h: int, w: int, pixels: str = "official") -> float:
    return _level(m) * 0.3


def small_image(h: int, w: int) -> bool:
    """Whether an image takes the official small-image (CIFAR/SVHN, 32 px) path."""
    return min(h, w) <= SMALL_IMAGE_MAX


def _pixel_const(official: float, side: int, h: int, w: int, pixels: str) -> float:
    """Translate/Cutout constant in px for an image of ``side`` (the axis it acts on)."""
    if pixels == "scaled":  # the same fraction of any image as at 224 px
        return official * side / REFERENCE_SIZE
    if small_image(h, w):  # official 32 px path: image_size // 8 for both constants
        return float(min(h, w) // 8)
    return official  # official ImageNet path: fixed pixels at every resolution


def _translate_x_arg(m: float, h: int, w: int, pixels: str = "official") -> float:
    return _level(m) * _pixel_const(_TRANSLATE_CONST, w, h, w, pixels)


def _translate_y_arg(m: float, h: int, w: int, pixels: str = "official") -> float:
    return _level(m) * _pixel_const(_TRANSLATE_CONST, h, h, w, pixels)


def _cutout_arg(m: float, h: int, w: int, pixels: str = "official") -> int:
    # Half-side of the square; official int() truncation kept. The square uses the shorter side so
    # that it stays a square on non-square images.
    return int(_level(m) * _pixel_const(_CUTOUT_CONST, min(h, w), h, w, pixels))


def _posterize_arg(m: float, h: int, w: int, pixels: str = "official") -> int:
    # Official: bits = int(4*M/10), then x >> (8 - bits) << (8 - bits) with tf.bitwise. For M >= 20,
    # bits > 8 and the shift is negative; for M < 2.5, bits = 0 and the shift is 8. tf.bitwise calls
    # both "implementation defined"; TF's CPU/GPU kernels clamp the shift into [0, 7], so bits > 8
    # leaves the image unchanged and bits = 0 keeps the top bit (= 1 bit). Clamping bits to [1, 8]
    # reproduces that (XLA/TPU kernels may behave differently; not verifiable here).
    return min(max(int(_level(m) * 4), 1), 8)


def _solarize_arg(m: float, h: int, w: int, pixels: str = "official") -> int:
    # Official: threshold = int(256*M/10), pixels >= threshold are inverted. For M >= 10 it is >= 256
    # and is compared with a uint8 image; TF1 turns the Python int into a uint8 constant, which (via
    # numpy of that era) most likely wraps modulo 256 rather than saturating, so the official op's
    # strength oscillates with M above 10. We saturate: 256 = invert nothing (the level/10 intent).
    return min(int(_level(m) * 256), 256)


def _solarize_add_arg(m: float, h: int, w: int, pixels: str = "official") -> int:
    # No clamp needed: the addition is done in a wider type and the result clipped to [0, 255], as
    # the official op does, so any addition >= 255 just saturates (M=27 -> 297).
    return int(_level(m) * 110)


def _enhance_arg(m: float, h: int, w: int, pixels: str = "official") -> float:
    # Factor 1.0 (identity) is at M = 5; M=0 gives 0.1, M=27 gives 4.96 (unbounded above, fine for
    # blend-with-clip).
    return _level(m) * 1.8 + 0.1


# --------------------------------------------------------------------------- apply functions


def _autocontrast(img: torch.Tensor, arg: None, gen: torch.Generator | None) -> torch.Tensor:
    # Official/PIL: per channel x * scale + offset with scale = 255 / (hi - lo), clipped, truncated.
    # Not F.autocontrast: it divides by (hi - lo) / 255 and so maps the brightest pixel to 254 (and
    # other exact multiples 1 low). float64, as PIL builds its lookup table in double precision.
    x = img.to(torch.float64)
    lo = x.amin(dim=(-2, -1), keepdim=True)
    hi = x.amax(dim=(-2, -1), keepdim=True)
    flat = hi <= lo  # a constant channel is left alone
    scale = 255.0 / torch.where(flat, 1.0, hi - lo)
    out = (x * scale - lo * scale).clamp_(0.0, 255.0).to(torch.uint8)
    return torch.where(flat, img, out)


def _equalize(img: torch.Tensor, arg: None, gen: torch.Generator | None) -> torch.Tensor:
    return F.equalize(img)


def _invert(img: torch.Tensor, arg: None, gen: torch.Generator | None) -> torch.Tensor:
    return F.invert(img)


def _posterize(img: torch.Tensor, bits: int, gen: torch.Generator | None) -> torch.Tensor:
    return F.posterize(img, bits)


def _solarize(img: torch.Tensor, threshold: int, gen: torch.Generator | None) -> torch.Tensor:
    if threshold > 255:  # torchvision refuses thresholds above the dtype's max; nothing is inverted
        return img.clone()
    return F.solarize(img, threshold)


def _solarize_add(img: torch.Tensor, addition: int, gen: torch.Generator | None) -> torch.Tensor:
    # No torchvision op: add to pixels below 128 with saturation, as the official solarize_add.
    added = (img.to(torch.int16) + addition).clamp_(0, 255).to(torch.uint8)
    return torch.where(img < 128, added, img)


# Color and Contrast blend towards a grey image. torchvision's kernels floor a luma whose weights
# sum to 0.9999, so a neutral grey pixel x becomes x - 1 and, blended with factor f > 1, comes out
# brighter by up to |1 - f| levels (+4 at M=27): Color would tint-shift a colourless image. PIL
# (the reference of the official ops) and TF both keep grey pixels fixed, so these two use PIL's
# integer luma and the official truncating blend instead.


def _luma(img: torch.Tensor) -> torch.Tensor:
    # PIL's RGB -> "L" (ITU-R 601-2 luma in 16-bit fixed point; the weights sum to exactly 1.0).
    if img.shape[-3] == 1:
        return img.to(torch.int32)
    r, g, b = img.to(torch.int32).unbind(-3)
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).unsqueeze(-3)


def _blend(degenerate: torch.Tensor, img: torch.Tensor, factor: float) -> torch.Tensor:
    # Official blend: degenerate + factor * (img - degenerate), clipped to [0, 255], truncated.
    base = degenerate.to(torch.float32)
    out = base + factor * (img.to(torch.float32) - base)
    return out.clamp_(0.0, 255.0).to(torch.uint8)


def _color(img: torch.Tensor, factor: float, gen: torch.Generator | None) -> torch.Tensor:
    return _blend(_luma(img), img, factor)  # PIL ImageEnhance.Color


def _contrast(img: torch.Tensor, factor: float, gen: torch.Generator | None) -> torch.Tensor:
    # PIL ImageEnhance.Contrast: blend towards the image's mean grey level, rounded to an integer.
    # Deviation: the official op computes that mean as sum(histogram) / 256 = pixel count / 256, a
    # bug that blends towards a constant set by the image size (196 at 224 px, 4 at 32 px).
    mean = _luma(img).to(torch.float32).mean(dim=(-3, -2, -1), keepdim=True)
    return _blend(torch.floor(mean + 0.5), img, factor)


def _brightness(img: torch.Tensor, factor: float, gen: torch.Generator | None) -> torch.Tensor:
    return F.adjust_brightness(img, factor)


def _sharpness(img: torch.Tensor, factor: float, gen: torch.Generator | None) -> torch.Tensor:
    return F.adjust_sharpness(img, factor)  # PIL SMOOTH kernel, borders kept, as the official op


# Geometric ops. torchvision defines the geometry (the `_tv_*` functions below are the whole
# definition); executing it as grid_sample costs ~200 us on a 32 px image, mostly building the
# grid. Nearest-neighbour warps only pick source pixels, so the pick is computed once per
# (op, argument, size) by warping an image of pixel indices with the same torchvision call, and
# then applied as a gather (~10 us). The result is identical to calling torchvision directly.

# torchvision's `center` is in continuous pixel coordinates (the top-left pixel spans [0, 1)), so
# 0.5 is the centre of pixel (0, 0): the origin of tf.contrib.image.transform's matrices.
_TOP_LEFT_PIXEL = [0.5, 0.5]


def _tv_rotate(img: torch.Tensor, degrees: float, fill: float) -> torch.Tensor:
    # Positive = counter-clockwise about the image centre, as tf.contrib.image.rotate.
    return F.rotate(img, degrees, fill=fill)


def _tv_shear_x(img: torch.Tensor, level: float, fill: float) -> torch.Tensor:
    # Official: projective matrix [1, level; 0, 1] mapping output to input, i.e.
    # out(x, y) = in(x + level*y, y). torchvision takes the shear as an angle with tan = level.
    return F.affine(
        img, angle=0.0, translate=[0.0, 0.0], scale=1.0,
        shear=[math.degrees(math.atan(level)), 0.0], fill=fill, center=_TOP_LEFT_PIXEL,
    )


def _tv_shear_y(img: torch.Tensor, level: float, fill: float) -> torch.Tensor:
    # out(x, y) = in(x, y + level*x)
    return F.affine(
        img, angle=0.0, translate=[0.0, 0.0], scale=1.0,
        shear=[0.0, math.degrees(math.atan(level))], fill=fill, center=_TOP_LEFT_PIXEL,
    )


def _tv_translate_x(img: torch.Tensor, pixels: float, fill: float) -> torch.Tensor:
    # Official (PIL convention): out(x, y) = in(x + pixels, y), i.e. positive moves content left.
    # torchvision's translate moves content right, hence the minus.
    return F.affine(
        img, angle=0.0, translate=[-pixels, 0.0], scale=1.0, shear=[0.0, 0.0], fill=fill
    )


def _tv_translate_y(img: torch.Tensor, pixels: float, fill: float) -> torch.Tensor:
    # out(x, y) = in(x, y + pixels): positive moves content up.
    return F.affine(
        img, angle=0.0, translate=[0.0, -pixels], scale=1.0, shear=[0.0, 0.0], fill=fill
    )


TvWarp = Callable[[torch.Tensor, float, float], torch.Tensor]


@functools.lru_cache(maxsize=32)  # RandAugment uses one M: 5 ops x 2 signs per image size
def _pick_map(warp: TvWarp, arg: float, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    # float32 as torchvision uses for uint8 images, so the grid and its rounding are the same;
    # indices are exact in float32 below 2**24 pixels (checked by the caller).
    index = torch.arange(h * w, dtype=torch.float32).reshape(1, h, w)
    picked = warp(index, arg, -1.0).round().to(torch.int32).reshape(h * w)
    outside = picked < 0
    return picked.clamp_(min=0), outside


def _warp(warp: TvWarp, img: torch.Tensor, arg: float) -> torch.Tensor:
    h, w = img.shape[-2:]
    if h * w >= 2**24 or img.device.type != "cpu":
        return warp(img, arg, float(FILL))  # the plain torchvision call
    picked, outside = _pick_map(warp, float(arg), h, w)
    out = img.reshape(*img.shape[:-2], h * w).index_select(-1, picked)
    return out.masked_fill_(outside, FILL).reshape(img.shape)


def _rotate(img: torch.Tensor, degrees: float, gen: torch.Generator | None) -> torch.Tensor:
    return _warp(_tv_rotate, img, degrees)


def _shear_x(img: torch.Tensor, level: float, gen: torch.Generator | None) -> torch.Tensor:
    return _warp(_tv_shear_x, img, level)


def _shear_y(img: torch.Tensor, level: float, gen: torch.Generator | None) -> torch.Tensor:
    return _warp(_tv_shear_y, img, level)


def _translate_x(img: torch.Tensor, pixels: float, gen: torch.Generator | None) -> torch.Tensor:
    return _warp(_tv_translate_x, img, pixels)


def _translate_y(img: torch.Tensor, pixels: float, gen: torch.Generator | None) -> torch.Tensor:
    return _warp(_tv_translate_y, img, pixels)


def _cutout(img: torch.Tensor, pad: int, gen: torch.Generator | None) -> torch.Tensor:
    # Official: centre uniform over all pixels (so the square is often clipped by the border),
    # rows [cy - pad, cy + pad) and columns [cx - pad, cx + pad), filled with grey.
    h, w = img.shape[-2:]
    cy = int(torch.randint(0, h, (), generator=gen))
    cx = int(torch.randint(0, w, (), generator=gen))
    top, left = max(0, cy - pad), max(0, cx - pad)
    bottom, right = min(h, cy + pad), min(w, cx + pad)
    if bottom <= top or right <= left:  # pad 0 (M=0): official pads a 0x0 mask -> unchanged
        return img.clone()
    return F.erase(
        img, top, left, bottom - top, right - left, torch.tensor(FILL, dtype=img.dtype)
    )


# --------------------------------------------------------------------------- the table

RANDAUGMENT_OPS: dict[str, OpSpec] = {
    # name:          (level -> argument,   apply,          random sign)
    "AutoContrast": OpSpec(_no_arg, _autocontrast, False),
    "Equalize": OpSpec(_no_arg, _equalize, False),
    "Invert": OpSpec(_no_arg, _invert, False),
    "Rotate": OpSpec(_rotate_arg, _rotate, True),
    "Posterize": OpSpec(_posterize_arg, _posterize, False),
    "Solarize": OpSpec(_solarize_arg, _solarize, False),
    "SolarizeAdd": OpSpec(_solarize_add_arg, _solarize_add, False),
    "Color": OpSpec(_enhance_arg, _color, False),
    "Contrast": OpSpec(_enhance_arg, _contrast, False),
    "Brightness": OpSpec(_enhance_arg, _brightness, False),
    "Sharpness": OpSpec(_enhance_arg, _sharpness, False),
    "ShearX": OpSpec(_shear_arg, _shear_x, True),
    "ShearY": OpSpec(_shear_arg, _shear_y, True),
    "TranslateX": OpSpec(_translate_x_arg, _translate_x, True),
    "TranslateY": OpSpec(_translate_y_arg, _translate_y, True),
    "Cutout": OpSpec(_cutout_arg, _cutout, False),
}
"""The official op table, in the official order (Cutout is behind a flag there, on in Noisy Student)."""


def _spec(name: str) -> OpSpec:
    try:
        return RANDAUGMENT_OPS[name]
    except KeyError:
        raise ValueError(
            f"unknown RandAugment op {name!r}; valid ops: {', '.join(RANDAUGMENT_OPS)}"
        ) from None


def _check_magnitude(magnitude: float) -> float:
    m = float(magnitude)
    if not math.isfinite(m) or m < 0:
        raise ValueError(f"magnitude must be a finite number >= 0, got {magnitude!r}")
    return m


def _check_image(img: torch.Tensor) -> None:
    if not isinstance(img, torch.Tensor) or img.dtype != torch.uint8:
        raise TypeError(
            f"RandAugment works on uint8 tensors (..., C, H, W) as the official code does; got "
            f"{getattr(img, 'dtype', type(img).__name__)}"
        )
    if img.ndim < 3 or img.shape[-3] not in (1, 3):
        raise ValueError(f"expected an image (..., C, H, W) with C in (1, 3), got {tuple(img.shape)}")


def op_argument(
    name: str, magnitude: float, height: int = REFERENCE_SIZE, width: int | None = None,
    *, sign: int = 1, pixels: str = "official",
) -> Any:
    """The argument ``apply_op`` passes to op ``name`` at ``magnitude`` on an image of that size."""
    spec = _spec(name)
    if sign not in (1, -1):
        raise ValueError(f"sign must be 1 or -1, got {sign!r}")
    _check_pixels(pixels)
    arg = spec.level_to_arg(_check_magnitude(magnitude), height,
                            height if width is None else width, pixels)
    return -arg if spec.signed and sign < 0 else arg


def _check_pixels(pixels: str) -> None:
    if pixels not in PIXELS:
        raise ValueError(f"pixels must be one of {', '.join(PIXELS)}, got {pixels!r}")


def apply_op(
    img: torch.Tensor,
    name: str,
    magnitude: float,
    *,
    sign: int = 1,
    generator: torch.Generator | None = None,
    pixels: str = "official",
) -> torch.Tensor:
    """Apply one RandAugment op at magnitude M to a uint8 image (..., C, H, W).

    ``sign`` (1 or -1) negates the argument of the signed ops (Rotate, Shear*, Translate*) and is
    ignored by the others. Deterministic except for Cutout's position, drawn from ``generator``
    (torch's global generator when None). A batch gets the same op, argument and position.
    """
    _check_image(img)
    h, w = img.shape[-2:]
    arg = op_argument(name, magnitude, h, w, sign=sign, pixels=pixels)
    return RANDAUGMENT_OPS[name].apply(img, arg, generator)


class RandAugment:
    """RandAugment(N, M) as in the official Noisy Student code.

    Each call draws ``num_ops`` ops uniformly with replacement from ``ops`` (default: all 16,
    Cutout included) and a random sign for each, then always applies them in order.
    ``num_ops=0`` or ``magnitude=0`` returns the input unchanged: M=0 means "no RandAugment"
    (see the module docstring for why a literal official M=0 is not a no-op).

    Input: uint8 (C, H, W), or (B, C, H, W) where every image gets its own draw. Output: same
    shape and dtype.

    Randomness: with ``seed=None`` the draws come from torch's global generator, which PyTorch
    seeds differently in each DataLoader worker and each epoch (reproducible when the DataLoader's
    generator is seeded). With a seed, a private generator is used; inside a DataLoader worker it
    is re-seeded from (seed, the worker's torch.initial_seed()), so workers and epochs do not
    repeat each other's stream while a seeded DataLoader stays reproducible. Pickling (or
    deepcopy) drops the private generator, so a copy restarts from its seed. Outside DataLoader
    workers (e.g. one copy per Ray worker), give each process its own seed.
    """

    def __init__(
        self,
        num_ops: int = 2,
        magnitude: float = 9,
        ops: Sequence[str] | None = None,
        seed: int | None = None,
        pixels: str = "official",
    ) -> None:
        if isinstance(num_ops, bool) or not isinstance(num_ops, int) or num_ops < 0:
            raise ValueError(f"num_ops must be an int >= 0, got {num_ops!r}")
        self.num_ops = num_ops
        self.magnitude = _check_magnitude(magnitude)
        names = tuple(RANDAUGMENT_OPS) if ops is None else tuple(ops)
        unknown = [n for n in names if n not in RANDAUGMENT_OPS]
        if unknown:
            raise ValueError(
                f"unknown RandAugment op(s) {unknown}; valid ops: {', '.join(RANDAUGMENT_OPS)}"
            )
        if not names and num_ops > 0:
            raise ValueError("ops is empty; pass num_ops=0 to disable RandAugment")
        self.ops: tuple[str, ...] = names
        _check_pixels(pixels)
        self.pixels = pixels
        self.seed = seed
        self._gen: torch.Generator | None = None
        self._gen_owner: int | None = None  # torch.initial_seed() of the worker that seeded it

    # Draws ------------------------------------------------------------------------------------

    def _generator(self) -> torch.Generator | None:
        if self.seed is None:
            return None
        worker = get_worker_info()
        owner = None if worker is None else torch.initial_seed()
        if self._gen is None or owner != self._gen_owner:
            # A forked or unpickled copy in a worker must not replay the parent's stream.
            seed = self.seed if owner is None else random.Random(f"{self.seed}:{owner}").getrandbits(63)
            self._gen = torch.Generator().manual_seed(seed)
            self._gen_owner = owner
        return self._gen

    def sample(self, generator: torch.Generator | None = None) -> list[tuple[str, int]]:
        """Draw one call's ops: ``num_ops`` (name, sign) pairs."""
        idx = torch.randint(len(self.ops), (self.num_ops,), generator=generator).tolist()
        signs = torch.randint(2, (self.num_ops,), generator=generator).tolist()
        return [(self.ops[i], 1 if s else -1) for i, s in zip(idx, signs, strict=True)]

    def _augment_one(self, img: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        for name, sign in self.sample(gen):
            img = apply_op(img, name, self.magnitude, sign=sign, generator=gen,
                           pixels=self.pixels)
        h, w = img.shape[-2:]
        if self.pixels == "official" and small_image(h, w):
            # The official small-image path always adds one more Cutout (half-side size // 4).
            img = _cutout(img, min(h, w) // 4, gen)
        return img

    # Call -------------------------------------------------------------------------------------

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        _check_image(img)
        if self.num_ops == 0 or self.magnitude == 0:
            return img
        gen = self._generator()
        if img.ndim == 3:
            out = self._augment_one(img, gen)
        else:
            flat = img.reshape(-1, *img.shape[-3:])
            out = torch.stack([self._augment_one(x, gen) for x in flat]).reshape(img.shape)
        # Keep tv_tensors.Image inputs wrapped for the v2 transforms that follow in a Compose.
        return tv_tensors.wrap(out, like=img) if isinstance(img, tv_tensors.Image) else out

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_gen"] = None
        state["_gen_owner"] = None
        return state

    def __repr__(self) -> str:
        ops = "all" if self.ops == tuple(RANDAUGMENT_OPS) else list(self.ops)
        return (
            f"RandAugment(num_ops={self.num_ops}, magnitude={self.magnitude:g}, ops={ops}, "
            f"pixels={self.pixels}, seed={self.seed})"
        )

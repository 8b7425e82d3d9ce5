"""Image preprocessing shared by training, evaluation and pseudo-labeling.

Everything works on decoded uint8 tensors (3, H, W) and returns float32 (3, R, R) normalised with
the ImageNet statistics (what EfficientNet expects). Training noise (RandAugment) is applied on the
uint8 image, as the official code does, before normalisation.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torchvision.transforms import v2

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
CROP_PADDING = 32  # official eval crop: size / (size + 32) of the shorter side (0.875 at 224)
SMALL_IMAGE_MAX = 64  # up to this size the official small-image path: no eval crop


def default_crop_fraction(resolution: int) -> float:
    """The official evaluation crop: the centre size / (size + 32) of the shorter side on the
    ImageNet path (``preprocessing.py``, CROP_PADDING 32), the whole image on the small-image
    path (its CIFAR/SVHN evaluation does not crop)."""
    return 1.0 if resolution <= SMALL_IMAGE_MAX else resolution / (resolution + CROP_PADDING)


def _to_float() -> list[v2.Transform]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)]


def eval_transform(resolution: int,
                   crop_fraction: float | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """No noise: center-crop ``crop_fraction`` of the shorter side (None: the official
    :func:`default_crop_fraction`), resized to ``resolution``, normalise.

    The teacher labels with this at its own test resolution (in two halves: :func:`eval_crop` in
    the readers, :func:`normalize` in the teacher's process); evaluation and the FixRes fine-tune
    use it too.
    """
    return v2.Compose([eval_crop(resolution, crop_fraction), normalize()])


def eval_crop(resolution: int,
              crop_fraction: float | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The geometric half of :func:`eval_transform`: uint8 in, uint8 (3, R, R) out.

    A crop fraction below 1 resizes the shorter side to ``resolution / fraction`` with bicubic
    interpolation (the official resize) and takes the centre; the whole image (fraction 1)
    resizes the shorter side to ``resolution``, bilinear, as the small-image path always has."""
    f = default_crop_fraction(resolution) if crop_fraction is None else crop_fraction
    if not 0 < f <= 1:
        raise ValueError(f"crop fraction must be in (0, 1], got {f}")
    side = eval_decode_side(resolution, f)  # one rule for the resize and the decoder's limit
    if f == 1.0:
        return v2.Compose([v2.Resize(side, antialias=True), v2.CenterCrop(resolution)])
    return v2.Compose([v2.Resize(side, antialias=True,
                                 interpolation=v2.InterpolationMode.BICUBIC),
                       v2.CenterCrop(resolution)])


def eval_decode_side(resolution: int, crop_fraction: float | None = None) -> int:
    """The shorter side :func:`eval_crop` resizes an image to before its centre crop: what the
    decoder may reduce a large JPEG to (``pipeline.images.decode_image(min_side=...)``)."""
    f = default_crop_fraction(resolution) if crop_fraction is None else crop_fraction
    return resolution if f == 1.0 else round(resolution / f)


def eval_min_side(resolution: int, crop_fraction: float | None, scaling: bool) -> int | None:
    """``min_side`` for the decoder of an evaluation stream (:func:`eval_decode_side`), or
    None for a full decode (``--no-jpeg-dct-scaling``)."""
    return eval_decode_side(resolution, crop_fraction) if scaling else None


def train_min_side(resolution: int, crop_scale_min: float, scaling: bool) -> int | None:
    """``min_side`` for the decoder of a training stream, or None for a full decode: the
    shorter side at which the smallest random-resized crop (``crop_scale_min`` of the area,
    aspect 3/4) still has ``resolution`` pixels a side, so the reduction never makes a crop
    smaller than the size it is resized to (915 px at 224 with the default 0.08)."""
    if not scaling:
        return None
    return math.ceil(resolution / math.sqrt(crop_scale_min * 3 / 4))


def normalize() -> Callable[[torch.Tensor], torch.Tensor]:
    """The other half: uint8 -> float32 normalised (elementwise, so batches give the same)."""
    return v2.Compose(_to_float())


def train_transform(
    resolution: int,
    *,
    crop_scale: tuple[float, float] = (0.08, 1.0),
    flip: bool = True,
    randaugment: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Random-resized crop, optional horizontal flip, optional RandAugment, normalise."""
    ops: list[Callable[[torch.Tensor], torch.Tensor]] = [
        v2.RandomResizedCrop(resolution, scale=crop_scale, antialias=True)
    ]
    if flip:
        ops.append(v2.RandomHorizontalFlip())
    if randaugment is not None:
        ops.append(randaugment)
    return v2.Compose([*ops, *_to_float()])

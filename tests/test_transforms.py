"""Evaluation and labeling crops: the official size / (size + 32) on the ImageNet path, the whole
image on the small-image path; training transforms keep shapes and dtypes."""

from __future__ import annotations

import pytest
import torch
import torchvision.transforms.v2.functional as F
from torchvision.transforms import v2

from pipeline.transforms import (
    default_crop_fraction,
    eval_crop,
    eval_transform,
    normalize,
    train_transform,
)


def _img(h: int, w: int) -> torch.Tensor:
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(h * w))


def test_official_crop_fractions() -> None:
    assert default_crop_fraction(224) == pytest.approx(0.875)  # 224 / 256
    assert default_crop_fraction(600) == pytest.approx(600 / 632)
    assert default_crop_fraction(800) == pytest.approx(800 / 832)
    assert default_crop_fraction(32) == 1.0  # the small-image path does not crop


def test_imagenet_path_resizes_bicubic_to_size_plus_32_then_takes_the_centre() -> None:
    img = _img(300, 400)
    got = eval_crop(224)(img)
    resized = F.resize(img, 256, interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
    assert torch.equal(got, F.center_crop(resized, 224)) and got.shape == (3, 224, 224)


def test_small_path_and_fraction_one_keep_the_whole_shorter_side() -> None:
    img = _img(32, 40)
    got = eval_crop(32)(img)
    assert torch.equal(got, F.center_crop(F.resize(img, 32, antialias=True), 32))
    assert torch.equal(eval_crop(224, 1.0)(_img(224, 224)), _img(224, 224))
    with pytest.raises(ValueError, match=r"crop fraction must be in \(0, 1\]"):
        eval_crop(224, 0.0)


def test_eval_transform_is_the_crop_then_normalize() -> None:
    img = _img(250, 250)
    assert torch.equal(eval_transform(224)(img), normalize()(eval_crop(224)(img)))
    assert eval_transform(224, 0.5)(img).shape == (3, 224, 224)


def test_train_transform_gives_normalised_float_at_the_resolution() -> None:
    out = train_transform(48, crop_scale=(0.5, 1.0))(_img(60, 70))
    assert out.shape == (3, 48, 48) and out.dtype == torch.float32

"""RandAugment, op by op, against the official (TF) semantics, PIL, or values worked out by hand."""

from __future__ import annotations

import math
import pickle
import time
from collections.abc import Iterator

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as F
from PIL import Image, ImageEnhance, ImageOps
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors

import pipeline.augment as augment
from pipeline.augment import RANDAUGMENT_OPS, RandAugment, apply_op, op_argument

OFFICIAL_ORDER = [
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd",
    "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX",
    "TranslateY", "Cutout",
]
GEOMETRIC = {"Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY"}
ENHANCE = {"Color", "Contrast", "Brightness", "Sharpness"}
# Identity at M=0 (every argument is 0 there). The rest are not: AutoContrast/Equalize/Invert
# ignore M, and Posterize (1 bit), Solarize (threshold 0) and the enhance ops (factor 0.1) are at
# their strongest at M=0 in the official level-to-argument functions.
IDENTITY_AT_ZERO = GEOMETRIC | {"SolarizeAdd", "Cutout"}


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # The ops run in DataLoader workers, which use one thread each. On a busy machine, torch's
    # intra-op threads on these tiny tensors also cost 10-100x more than they save.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rand_img(c: int = 3, h: int = 32, w: int | None = None, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (c, h, h if w is None else w), dtype=torch.uint8, generator=g)


def to_pil(img: torch.Tensor) -> Image.Image:
    return Image.fromarray(img.permute(1, 2, 0).numpy())


def from_pil(p: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(p).copy()).permute(2, 0, 1)


def tf_transform(img: torch.Tensor, m: list[float]) -> torch.Tensor:
    """tf.contrib.image.transform + unwrap: out(x, y) = in(m0 x + m1 y + m2, m3 x + m4 y + m5),
    nearest (std::round, half away from zero), uncovered pixels grey 128."""
    c, h, w = img.shape
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    xi, yi = m[0] * xs + m[1] * ys + m[2], m[3] * xs + m[4] * ys + m[5]
    xr = (np.sign(xi) * np.floor(np.abs(xi) + 0.5)).astype(int)
    yr = (np.sign(yi) * np.floor(np.abs(yi) + 0.5)).astype(int)
    ok = (xr >= 0) & (xr < w) & (yr >= 0) & (yr < h)
    out = np.full((c, h, w), 128, np.uint8)
    out[:, ok] = img.numpy()[:, yr[ok], xr[ok]]
    return torch.from_numpy(out)


def tf_rotate(img: torch.Tensor, degrees: float) -> torch.Tensor:
    """tf.contrib.image.rotate: counter-clockwise about ((w-1)/2, (h-1)/2)."""
    _, h, w = img.shape
    a = math.radians(degrees)
    cos, sin = math.cos(a), math.sin(a)
    xo = ((w - 1) - (cos * (w - 1) - sin * (h - 1))) / 2
    yo = ((h - 1) - (sin * (w - 1) + cos * (h - 1))) / 2
    return tf_transform(img, [cos, -sin, xo, sin, cos, yo])


def mismatch(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a != b).any(0).float().mean().item()


# --------------------------------------------------------------------------- the table


def test_table_is_the_official_op_list() -> None:
    assert list(RANDAUGMENT_OPS) == OFFICIAL_ORDER
    assert {n for n, spec in RANDAUGMENT_OPS.items() if spec.signed} == GEOMETRIC


ARGS_224 = [
    # (op, M, argument at 224 px): level/10 of the official maximum, no clipping of M
    ("Rotate", 9, 27.0), ("Rotate", 27, 81.0),
    ("ShearX", 9, 0.27), ("ShearX", 27, 0.81),
    ("ShearY", 27, 0.81),
    ("TranslateX", 9, 90.0), ("TranslateX", 10, 100.0), ("TranslateX", 27, 270.0),
    ("TranslateY", 27, 270.0),
    ("Cutout", 9, 36), ("Cutout", 27, 108),
    ("Color", 9, 1.72), ("Contrast", 27, 4.96), ("Brightness", 0, 0.1), ("Sharpness", 5, 1.0),
    ("Posterize", 9, 3), ("Posterize", 27, 8), ("Posterize", 1, 1),  # 10 -> 8, 0 -> 1: clamped
    ("Solarize", 9, 230), ("Solarize", 27, 256), ("Solarize", 0, 0),  # 691 -> 256: clamped
    ("SolarizeAdd", 9, 99), ("SolarizeAdd", 27, 297),
    ("AutoContrast", 27, None), ("Equalize", 9, None), ("Invert", 9, None),
]


@pytest.mark.parametrize(("name", "m", "expected"), ARGS_224)
def test_argument_at_224(name: str, m: float, expected: float | None) -> None:
    got = op_argument(name, m, 224)
    assert got == (expected if expected is None else pytest.approx(expected))
    if RANDAUGMENT_OPS[name].signed:
        assert op_argument(name, m, 224, sign=-1) == pytest.approx(-expected)


@pytest.mark.parametrize("size", [224, 260, 380, 600, 800])
def test_official_pixels_are_fixed_at_every_imagenet_size(size: int) -> None:
    # randaugment.py: translate_const 100, cutout_const 40, whatever the image size.
    assert op_argument("TranslateX", 27, size) == pytest.approx(270.0)
    assert op_argument("TranslateY", 27, size) == pytest.approx(270.0)
    assert op_argument("Cutout", 27, size) == 108  # int(2.7 * 40)
    assert op_argument("Cutout", 5, size) == 20


@pytest.mark.parametrize("size", [32, 40, 64])
def test_official_small_image_path_uses_size_over_8(size: int) -> None:
    # _cifar10_preprocess_for_train: translate_const = cutout_const = image_size // 8.
    assert op_argument("TranslateX", 5, size) == pytest.approx(0.5 * (size // 8))
    assert op_argument("Cutout", 27, size) == int(2.7 * (size // 8))
    assert op_argument("TranslateX", 5, 65) == pytest.approx(50.0)  # past 64 px: ImageNet path


def test_official_small_image_path_always_adds_a_16x16_cutout() -> None:
    # After RandAugment the official 32 px path cuts one more square of half-side size // 4.
    img = torch.zeros(3, 32, 32, dtype=torch.uint8)
    ra = RandAugment(num_ops=1, magnitude=5, ops=["Invert"], seed=0)  # Invert: 0 -> 255
    out = ra(img)
    grey = (out == 128).all(0)
    assert grey.any()
    top, bottom, left, right = square_of(out)
    assert bottom - top <= 16 and right - left <= 16
    assert ((out == 255).all(0) | grey).all()  # everything else inverted
    big = RandAugment(num_ops=1, magnitude=5, ops=["Invert"], seed=0)(
        torch.zeros(3, 224, 224, dtype=torch.uint8))
    assert (big == 255).all()  # the ImageNet path has no extra Cutout
    scaled = RandAugment(num_ops=1, magnitude=5, ops=["Invert"], seed=0, pixels="scaled")(img)
    assert (scaled == 255).all()


def test_scaled_pixels_cover_the_same_fraction_of_any_image() -> None:
    # The demo preset's measured choice (README): 100 and 40 px at 224, scaled by size / 224.
    kw = {"pixels": "scaled"}
    assert op_argument("TranslateX", 10, 32, **kw) == pytest.approx(100 * 32 / 224)  # ~14.3 px
    assert op_argument("TranslateY", 10, 32, 64, **kw) == pytest.approx(100 * 32 / 224)  # height
    assert op_argument("TranslateX", 10, 32, 64, **kw) == pytest.approx(100 * 64 / 224)  # width
    assert op_argument("Cutout", 27, 32, **kw) == 15  # int(2.7 * 40 * 32/224) = int(15.43)
    assert op_argument("TranslateX", 27, 600, **kw) == pytest.approx(270 * 600 / 224)
    assert op_argument("Rotate", 27, 32, **kw) == pytest.approx(81.0)  # angles do not scale
    with pytest.raises(ValueError, match="pixels must be one of official, scaled"):
        op_argument("TranslateX", 10, 32, pixels="tf")


# --------------------------------------------------------------------------- geometric ops


@pytest.mark.parametrize("size", [32, 37])
@pytest.mark.parametrize("m", [9, 27])
@pytest.mark.parametrize("sign", [1, -1])
def test_geometric_ops_match_tf_exactly_on_small_images(size: int, m: float, sign: int) -> None:
    img = rand_img(h=size, seed=size)
    deg = 30 * m / 10 * sign
    shear = 0.3 * m / 10 * sign
    px = m / 10 * (size // 8) * sign  # the official small-image path
    assert torch.equal(apply_op(img, "Rotate", m, sign=sign), tf_rotate(img, deg))
    assert torch.equal(apply_op(img, "ShearX", m, sign=sign), tf_transform(img, [1, shear, 0, 0, 1, 0]))
    assert torch.equal(apply_op(img, "ShearY", m, sign=sign), tf_transform(img, [1, 0, 0, shear, 1, 0]))
    assert torch.equal(apply_op(img, "TranslateX", m, sign=sign), tf_transform(img, [1, 0, px, 0, 1, 0]))
    assert torch.equal(apply_op(img, "TranslateY", m, sign=sign), tf_transform(img, [1, 0, 0, 0, 1, px]))


def test_geometric_ops_match_tf_at_224_up_to_rounding_ties() -> None:
    # At 224 px some sample points fall exactly on half pixels (e.g. 0.81 * 50 = 40.5), where
    # grid_sample rounds half to even and TF half away from zero.
    img = rand_img(h=224, seed=1)
    assert mismatch(apply_op(img, "Rotate", 27), tf_rotate(img, 81)) < 1e-3
    assert mismatch(apply_op(img, "ShearX", 27), tf_transform(img, [1, 0.81, 0, 0, 1, 0])) < 1e-2


def test_rotate_81_degrees_and_sign_flips_direction() -> None:
    img = rand_img(h=33, seed=2)
    assert torch.equal(apply_op(img, "Rotate", 27), F.rotate(img, 81.0, fill=128))
    assert torch.equal(apply_op(img, "Rotate", 27, sign=-1), F.rotate(img, -81.0, fill=128))
    # A white blob 10 px right of the centre goes up (counter-clockwise) for +, down for -.
    dot = torch.zeros(3, 33, 33, dtype=torch.uint8)
    dot[:, 15:18, 25:28] = 255
    for sign, expect_y in ((1, 16 - 10 * math.sin(math.radians(81))),
                           (-1, 16 + 10 * math.sin(math.radians(81)))):
        ys, xs = torch.nonzero(apply_op(dot, "Rotate", 27, sign=sign)[0] == 255, as_tuple=True)
        assert abs(ys.float().mean().item() - expect_y) < 1.0
        assert abs(xs.float().mean().item() - (16 + 10 * math.cos(math.radians(81)))) < 1.0


def coordinate_image(h: int, w: int) -> torch.Tensor:
    """Channel 0: column, channel 1: row, channel 2: 255 (the fill turns it into 128)."""
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([xs, ys, torch.full_like(xs, 255)]).to(torch.uint8)


@pytest.mark.parametrize("sign", [1, -1])
def test_shear_x_at_m27_shears_by_0_81(sign: int) -> None:
    img = coordinate_image(32, 32)
    out = apply_op(img, "ShearX", 27, sign=sign)
    for y in range(32):
        for x in range(32):
            src = math.floor(x + sign * 0.81 * y + 0.5)
            if 0 <= src < 32:
                assert out[:, y, x].tolist() == [src, y, 255]
            else:
                assert out[:, y, x].tolist() == [128, 128, 128]


def test_shear_y_at_m27_shears_by_0_81() -> None:
    out = apply_op(coordinate_image(32, 32), "ShearY", 27)
    assert out[:, 4, 10].tolist() == [10, round(4 + 8.1), 255]  # out(x, y) = in(x, y + 0.81 x)
    assert out[:, 20, 10].tolist() == [10, 28, 255]
    assert out[:, 25, 10].tolist() == [128, 128, 128]  # 25 + 8.1 is off the image


def test_translate_x_at_m10_moves_100_px_at_224() -> None:
    img = coordinate_image(224, 224)
    out = apply_op(img, "TranslateX", 10)  # official: out(x) = in(x + 100): content moves left
    assert torch.equal(out[:, :, :124], img[:, :, 100:])
    assert (out[:, :, 124:] == 128).all()
    back = apply_op(img, "TranslateX", 10, sign=-1)
    assert torch.equal(back[:, :, 100:], img[:, :, :124])
    assert (back[:, :, :100] == 128).all()


def test_translate_at_m10_moves_about_14_px_at_32_when_scaled() -> None:
    img = coordinate_image(32, 32)
    out = apply_op(img, "TranslateX", 10, pixels="scaled")  # 100 * 32/224 = 14.3 px -> 14
    assert torch.equal(out[:, :, :18], img[:, :, 14:])
    assert (out[:, :, 18:] == 128).all()
    down = apply_op(img, "TranslateY", 10, sign=-1, pixels="scaled")  # content moves down 14
    assert torch.equal(down[:, 14:, :], img[:, :18, :])
    assert (down[:, :14, :] == 128).all()


def test_large_translation_leaves_only_grey() -> None:
    assert (apply_op(rand_img(h=224), "TranslateX", 27) == 128).all()  # 270 px > 224 px


@pytest.mark.parametrize("name", sorted(GEOMETRIC))
def test_cached_warp_equals_direct_torchvision_call(name: str) -> None:
    warp = {"Rotate": augment._tv_rotate, "ShearX": augment._tv_shear_x,
            "ShearY": augment._tv_shear_y, "TranslateX": augment._tv_translate_x,
            "TranslateY": augment._tv_translate_y}[name]
    for img in (rand_img(h=32, w=40, seed=3), rand_img(c=1, h=24, seed=4),
                torch.stack([rand_img(seed=5), rand_img(seed=6)])):
        for m, sign in ((9, 1), (27, -1), (3.5, 1)):
            h, w = img.shape[-2:]
            arg = op_argument(name, m, h, w, sign=sign)
            assert torch.equal(apply_op(img, name, m, sign=sign), warp(img, arg, 128.0))


# --------------------------------------------------------------------------- Cutout


def square_of(out: torch.Tensor) -> tuple[int, int, int, int]:
    """Bounding box (top, bottom, left, right) of grey pixels; asserts they form a rectangle."""
    grey = (out == 128).all(0)
    ys, xs = torch.nonzero(grey, as_tuple=True)
    box = (ys.min().item(), ys.max().item() + 1, xs.min().item(), xs.max().item() + 1)
    assert grey.sum().item() == (box[1] - box[0]) * (box[3] - box[2])
    return box


@pytest.mark.parametrize(("size", "pad"), [(224, 108), (32, 10)])
def test_cutout_at_m27_cuts_a_grey_square_of_side_2_pad(size: int, pad: int) -> None:
    img = torch.zeros(3, size, size, dtype=torch.uint8)
    for seed in range(20):
        out = apply_op(img, "Cutout", 27, generator=torch.Generator().manual_seed(seed))
        g = torch.Generator().manual_seed(seed)  # same draws: centre row, then column
        cy, cx = (int(torch.randint(0, size, (), generator=g)) for _ in range(2))
        expected = (max(0, cy - pad), min(size, cy + pad), max(0, cx - pad), min(size, cx + pad))
        assert square_of(out) == expected
    # Centre far enough from every border: nothing clipped, exactly 2 * pad on each side.
    g = torch.Generator().manual_seed(0)
    for _ in range(20000):
        state = g.get_state()
        cy, cx = (int(torch.randint(0, size, (), generator=g)) for _ in range(2))
        if pad <= cy <= size - pad and pad <= cx <= size - pad:
            replay = torch.Generator()
            replay.set_state(state)
            top, bottom, left, right = square_of(apply_op(img, "Cutout", 27, generator=replay))
            assert (bottom - top, right - left) == (2 * pad, 2 * pad)
            break
    else:
        pytest.fail("no unclipped centre drawn")


def test_cutout_is_reproducible_with_a_generator_and_identity_at_m0() -> None:
    img = rand_img()
    a = apply_op(img, "Cutout", 9, generator=torch.Generator().manual_seed(7))
    b = apply_op(img, "Cutout", 9, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert torch.equal(apply_op(img, "Cutout", 0), img)


# --------------------------------------------------------------------------- colour ops


TINY = torch.tensor([[[0, 50, 127], [128, 200, 255]]], dtype=torch.uint8).repeat(3, 1, 1)


def test_solarize_values() -> None:
    # M=9: threshold int(230.4) = 230, pixels >= 230 inverted
    assert apply_op(TINY, "Solarize", 9)[0].tolist() == [[0, 50, 127], [128, 200, 0]]
    assert torch.equal(apply_op(TINY, "Solarize", 0), 255 - TINY)  # threshold 0: invert all
    assert torch.equal(apply_op(TINY, "Solarize", 27), TINY)  # 691 clamped to 256: none


def test_solarize_add_values() -> None:
    # M=9: +99 to pixels < 128, saturating; M=27: +297 -> 255
    assert apply_op(TINY, "SolarizeAdd", 9)[0].tolist() == [[99, 149, 226], [128, 200, 255]]
    assert apply_op(TINY, "SolarizeAdd", 27)[0].tolist() == [[255, 255, 255], [128, 200, 255]]


def test_posterize_values() -> None:
    # M=9: 3 bits (mask 0b11100000)
    assert apply_op(TINY, "Posterize", 9)[0].tolist() == [[0, 32, 96], [128, 192, 224]]
    assert torch.equal(apply_op(TINY, "Posterize", 27), TINY)  # 10 bits -> 8: unchanged
    # M<2.5: 0 bits -> 1 bit, what TF's clamped shift does (not a black image)
    assert apply_op(TINY, "Posterize", 1)[0].tolist() == [[0, 0, 0], [128, 128, 128]]


def test_invert_autocontrast_equalize_values() -> None:
    assert apply_op(TINY, "Invert", 9)[0].tolist() == [[255, 205, 128], [127, 55, 0]]
    low = torch.tensor([[[10, 20], [30, 60]]], dtype=torch.uint8).repeat(3, 1, 1)
    # official/PIL: int(x * 255/50 - 10 * 255/50), per channel (torchvision's kernel gives 254)
    assert apply_op(low, "AutoContrast", 9)[0].tolist() == [[0, 51], [102, 255]]
    chans = torch.stack([low[0], low[0] // 2, low[0] * 4])  # ranges 10..60, 5..30, 40..240
    assert apply_op(chans, "AutoContrast", 9)[:, 1, 1].tolist() == [255, 255, 255]
    flat = torch.full((3, 4, 4), 77, dtype=torch.uint8)
    assert torch.equal(apply_op(flat, "AutoContrast", 9), flat)  # no range: unchanged
    # 4 values, 4 pixels each: PIL's step = (16 - 4) // 255 = 0 -> unchanged; use 2 x 255 + 2 px
    ramp = torch.tensor([0] * 255 + [100] * 255 + [200] * 2, dtype=torch.uint8)
    eq = apply_op(ramp.reshape(1, 16, 32).repeat(3, 1, 1), "Equalize", 9)
    assert sorted(set(eq[0].flatten().tolist())) == [0, 128, 255]


@pytest.mark.parametrize("name", ["AutoContrast", "Equalize", "Invert", "Posterize", "Solarize"])
@pytest.mark.parametrize("m", [0, 3, 9, 27])
def test_pil_ops_match_pil(name: str, m: float) -> None:
    img = rand_img(h=16, seed=11)
    p = to_pil(img)
    arg = op_argument(name, m)
    ref = {
        "AutoContrast": lambda: ImageOps.autocontrast(p),
        "Equalize": lambda: ImageOps.equalize(p),
        "Invert": lambda: ImageOps.invert(p),
        "Posterize": lambda: ImageOps.posterize(p, arg),
        "Solarize": lambda: p if arg > 255 else ImageOps.solarize(p, arg),
    }[name]()
    diff = (apply_op(img, name, m).int() - from_pil(ref).int()).abs().max().item()
    assert diff == 0


@pytest.mark.parametrize("name", sorted(ENHANCE))
@pytest.mark.parametrize("m", [0, 3, 5, 9, 27])
def test_enhance_ops_match_pil(name: str, m: float) -> None:
    img = rand_img(h=16, seed=12)
    factor = op_argument(name, m)
    assert factor == pytest.approx(m / 10 * 1.8 + 0.1)
    ref = from_pil(getattr(ImageEnhance, name)(to_pil(img)).enhance(factor))
    # Color/Contrast reimplement PIL's; Brightness/Sharpness are torchvision's (Sharpness rounds
    # its blurred image where PIL truncates: +-1).
    tol = 1 if name == "Sharpness" else 0
    assert (apply_op(img, name, m).int() - ref.int()).abs().max().item() <= tol
    if m == 5:  # factor 1.0
        assert torch.equal(apply_op(img, name, m), img)


def test_contrast_uses_the_true_mean_not_the_official_pixel_count_bug() -> None:
    # Official contrast blends towards sum(histogram)/256 = (number of pixels)/256, i.e. 4 on a
    # 32x32 image whatever its content. With the true mean, a uniform image is a fixed point.
    flat = torch.full((3, 32, 32), 150, dtype=torch.uint8)
    for m in (0, 9, 27):
        assert torch.equal(apply_op(flat, "Contrast", m), flat)


def test_brightness_and_color_values() -> None:
    # Brightness at M=0: factor 0.1, x * 0.1 truncated
    assert apply_op(TINY, "Brightness", 0)[0].tolist() == [[0, 5, 12], [12, 20, 25]]
    # A colourless image is a fixed point of Color at any factor (it is not with torchvision's
    # adjust_saturation, whose luma maps grey x to x - 1).
    grey = torch.arange(256, dtype=torch.uint8).reshape(1, 16, 16).repeat(3, 1, 1)
    for m in (0, 9, 27):
        assert torch.equal(apply_op(grey, "Color", m), grey)


# --------------------------------------------------------------------------- M=0, determinism, errors


@pytest.mark.parametrize("name", OFFICIAL_ORDER)
def test_identity_at_m0_exactly_for_the_documented_subset(name: str) -> None:
    # Not the full 0..255 range, or AutoContrast would have nothing to do.
    img = (rand_img(seed=13) // 2 + 40).to(torch.uint8)
    outs = [apply_op(img, name, 0, sign=s) for s in (1, -1)]
    if name in IDENTITY_AT_ZERO:
        assert all(torch.equal(o, img) for o in outs)
    else:
        assert not torch.equal(outs[0], img)


@pytest.mark.parametrize("name", [n for n in OFFICIAL_ORDER if n != "Cutout"])
def test_apply_op_is_deterministic_and_keeps_shape_and_dtype(name: str) -> None:
    img = rand_img(h=20, w=24, seed=14)
    a, b = apply_op(img, name, 9, sign=-1), apply_op(img, name, 9, sign=-1)
    assert torch.equal(a, b)
    assert a.shape == img.shape and a.dtype == torch.uint8
    gray = rand_img(c=1, h=20, seed=15)
    assert apply_op(gray, name, 9).shape == gray.shape


def test_apply_op_errors() -> None:
    img = rand_img()
    with pytest.raises(ValueError, match="valid ops: AutoContrast, Equalize"):
        apply_op(img, "Rotat", 9)
    with pytest.raises(ValueError, match="sign"):
        apply_op(img, "Rotate", 9, sign=0)
    with pytest.raises(ValueError, match="magnitude"):
        apply_op(img, "Rotate", -1)
    with pytest.raises(TypeError, match="uint8"):
        apply_op(img.float(), "Rotate", 9)


# --------------------------------------------------------------------------- RandAugment


@pytest.mark.parametrize("n", [1, 2, 3])
def test_randaugment_applies_exactly_n_ops_each_call(n: int, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real = augment.apply_op

    def spy(img: torch.Tensor, name: str, magnitude: float, **kw: object) -> torch.Tensor:
        calls.append(name)
        assert magnitude == 9
        return real(img, name, magnitude, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(augment, "apply_op", spy)
    ra = RandAugment(num_ops=n, magnitude=9, seed=0)
    seen: set[str] = set()
    for i in range(60):
        ra(rand_img(seed=i))
        assert len(calls) == n * (i + 1)
        seen.update(calls[-n:])
    assert len(seen) >= 12  # uniform over the 16 ops


# The sampling tests run without the small-image path's extra Cutout (pixels="scaled"), which
# would cover part of every small test image.
def test_randaugment_always_applies_and_draws_with_replacement() -> None:
    img = rand_img()
    once = RandAugment(num_ops=1, magnitude=9, ops=["Invert"], seed=0, pixels="scaled")
    assert all(torch.equal(once(img), 255 - img) for _ in range(20))  # never skipped
    twice = RandAugment(num_ops=2, magnitude=9, ops=["Invert"], seed=0, pixels="scaled")
    assert torch.equal(twice(img), img)  # the same op twice in one call


def test_randaugment_randomises_the_sign_of_geometric_ops() -> None:
    img = rand_img(h=33)
    left, right = F.rotate(img, 27.0, fill=128), F.rotate(img, -27.0, fill=128)
    ra = RandAugment(num_ops=1, magnitude=9, ops=["Rotate"], seed=0, pixels="scaled")
    outs = [ra(img) for _ in range(40)]
    n_left = sum(torch.equal(o, left) for o in outs)
    n_right = sum(torch.equal(o, right) for o in outs)
    assert n_left + n_right == 40 and n_left >= 5 and n_right >= 5


def test_randaugment_is_reproducible_with_a_seed() -> None:
    img = rand_img()
    a, b, c = RandAugment(seed=123), RandAugment(seed=123), RandAugment(seed=124)
    seq_a = [a(img) for _ in range(10)]
    assert all(torch.equal(x, b(img)) for x in seq_a)
    assert not all(torch.equal(x, c(img)) for x in seq_a)


def test_randaugment_off_at_m0_or_n0() -> None:
    img = rand_img()
    for ra in (RandAugment(magnitude=0, seed=0), RandAugment(num_ops=0, magnitude=27, seed=0)):
        assert all(torch.equal(ra(img), img) for _ in range(10))
    # The identity subset stays the identity at M=0 even applied through the sampler.
    ra = RandAugment(num_ops=3, magnitude=0, ops=sorted(IDENTITY_AT_ZERO), seed=0,
                     pixels="scaled")
    assert torch.equal(ra._augment_one(img, ra._generator()), img)


def test_randaugment_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="valid ops: AutoContrast"):
        RandAugment(ops=["Rotate", "Blur"])
    with pytest.raises(ValueError, match="num_ops"):
        RandAugment(num_ops=-1)
    with pytest.raises(ValueError, match="magnitude"):
        RandAugment(magnitude=float("nan"))
    with pytest.raises(TypeError, match="uint8"):
        RandAugment()(torch.rand(3, 8, 8))


def test_randaugment_batches_draw_per_image_and_keep_type() -> None:
    batch = rand_img(seed=1).expand(8, 3, 32, 32).contiguous()
    out = RandAugment(num_ops=2, magnitude=9, seed=0)(batch)
    assert out.shape == batch.shape and out.dtype == torch.uint8
    assert len({tuple(o.flatten().tolist()) for o in out}) > 1
    wrapped = RandAugment(seed=0)(tv_tensors.Image(rand_img()))
    assert isinstance(wrapped, tv_tensors.Image)


def test_randaugment_pickles_and_a_copy_restarts_from_its_seed() -> None:
    img = rand_img()
    ra = RandAugment(num_ops=2, magnitude=27, ops=["Rotate", "Cutout", "Color"], seed=5)
    first = ra(img)
    clone = pickle.loads(pickle.dumps(ra))
    assert (clone.num_ops, clone.magnitude, clone.ops, clone.seed) == (2, 27, ra.ops, 5)
    assert torch.equal(clone(img), first)
    assert "magnitude=27" in repr(ra)


class _Repeat(Dataset):
    def __init__(self, img: torch.Tensor, n: int, transform: RandAugment) -> None:
        self.img, self.n, self.transform = img, n, transform

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(self.img)


def _epoch(loader: DataLoader) -> list[torch.Tensor]:
    return list(loader)


def test_dataloader_workers_get_distinct_reproducible_streams() -> None:
    img = rand_img()
    ds = _Repeat(img, 8, RandAugment(num_ops=2, magnitude=9, seed=0))

    def loader() -> DataLoader:
        return DataLoader(ds, batch_size=None, num_workers=2,
                          generator=torch.Generator().manual_seed(0))

    run1 = loader()
    e1, e2 = _epoch(run1), _epoch(run1)
    # Workers take samples round-robin; a copied seed must not make them repeat each other.
    assert not all(torch.equal(a, b) for a, b in zip(e1[0::2], e1[1::2], strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(e1, e2, strict=True))  # nor each epoch
    assert all(torch.equal(a, b) for a, b in zip(e1, _epoch(loader()), strict=True))


def test_randaugment_speed_on_32px(capsys: pytest.CaptureFixture[str]) -> None:
    img = rand_img()
    ra = RandAugment(num_ops=2, magnitude=9, seed=0)
    for _ in range(50):
        ra(img)
    n = 1000
    t0 = time.perf_counter()
    for _ in range(n):
        ra(img)
    us = (time.perf_counter() - t0) / n * 1e6
    with capsys.disabled():
        print(f"\nRandAugment(2, 9) on 3x32x32 uint8, 1 thread: {us:.0f} us/image")
    assert us < 5000  # generous for a loaded CI machine; typically 150-250 us

"""pipeline.images: every mode PIL opens -> the same (3, H, W) uint8 RGB tensor, by fixed rules.

Expected values are computed here from the rules in the module docstring (white background for
alpha, high byte for 16-bit, clip for float, ...), never by calling the decoder's own helpers.
"""

from __future__ import annotations

import io
import math
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.images import ALPHA_BACKGROUND, decode_image, decode_pil, pil_to_rgb
from pipeline.shards import ShardError


def enc(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def dec(data: bytes, where: str = "test") -> np.ndarray:
    """Decode, check the tensor contract, return (H, W, 3) for easy comparison. decode_pil
    (prepare's resize) must give the same pixels as an RGB image, so every test checks it."""
    t = decode_image(data, where)
    assert isinstance(t, torch.Tensor)
    assert t.dtype == torch.uint8 and t.ndim == 3 and t.shape[0] == 3
    assert t.is_contiguous()
    pic = decode_pil(data, where)
    assert pic.mode == "RGB" and np.array_equal(np.asarray(pic), t.permute(1, 2, 0).numpy())
    return t.permute(1, 2, 0).numpy()


def grey3(values) -> np.ndarray:
    v = np.asarray(values, np.uint8)
    return np.repeat(v[..., None], 3, axis=-1)


def over_white(c: int, a: int) -> int:
    """The documented alpha rule: round((c * a + 255 * (255 - a)) / 255)."""
    return round((c * a + 255 * (255 - a)) / 255)


def row(values, dtype) -> np.ndarray:
    return np.asarray([values], dtype)


def chunk(tag: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + tag + payload + struct.pack(
        ">I", zlib.crc32(tag + payload))


def png_by_hand(w: int, h: int, depth: int, color: int, raw_rows: bytes) -> bytes:
    ihdr = struct.pack(">IIBBBBB", w, h, depth, color, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw_rows))
            + chunk(b"IEND", b""))


def test_background_is_white():
    assert ALPHA_BACKGROUND == (255, 255, 255)


# ----------------------------------------------------------------------------- modes


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF", "GIF"])
def test_mode_1(fmt):
    img = Image.new("1", (5, 2))
    for x, y in [(0, 0), (2, 0), (4, 1), (1, 1)]:
        img.putpixel((x, y), 1)
    expected = grey3([[255, 0, 255, 0, 0], [0, 255, 0, 0, 255]])
    np.testing.assert_array_equal(dec(enc(img, fmt)), expected)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF", "BMP", "GIF"])
def test_mode_l(fmt):
    values = row([0, 1, 127, 128, 200, 254, 255], np.uint8)
    np.testing.assert_array_equal(dec(enc(Image.fromarray(values, "L"), fmt)), grey3(values))


def test_mode_l_jpeg_flat_blocks_exact():
    for v in (0, 1, 77, 128, 255):
        out = dec(enc(Image.new("L", (16, 16), v), "JPEG", quality=100))
        assert (out == v).all(), v


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_mode_la_composited_onto_white(fmt):
    pixels = [(200, 0), (200, 128), (200, 255), (10, 77), (0, 1), (255, 254)]
    img = Image.new("LA", (len(pixels), 1))
    for x, p in enumerate(pixels):
        img.putpixel((x, 0), p)
    expected = grey3([[over_white(v, a) for v, a in pixels]])
    np.testing.assert_array_equal(dec(enc(img, fmt)), expected)
    assert expected[0, 0, 0] == 255 and expected[0, 2, 0] == 200  # transparent -> bg; opaque


PALETTE = [(10, 20, 30), (40, 50, 60), (200, 100, 0), (255, 255, 255)]


def palette_image(mode: str = "P") -> Image.Image:
    img = Image.new(mode, (4, 2))
    img.putpalette([c for rgb in PALETTE for c in rgb])
    return img


@pytest.mark.parametrize("fmt", ["PNG", "GIF", "BMP", "TIFF"])
def test_mode_p_without_transparency(fmt):
    img = palette_image()
    idx = [[0, 1, 2, 3], [3, 2, 1, 0]]
    for y in range(2):
        for x in range(4):
            img.putpixel((x, y), idx[y][x])
    expected = np.array([[PALETTE[i] for i in r] for r in idx], np.uint8)
    np.testing.assert_array_equal(dec(enc(img, fmt)), expected)


def test_mode_p_png_with_alpha_per_palette_entry():
    img = palette_image()
    for x in range(4):
        img.putpixel((x, 0), x)
        img.putpixel((x, 1), 3 - x)
    alphas = [255, 128, 0, 7]
    data = enc(img, "PNG", transparency=bytes(alphas))
    assert Image.open(io.BytesIO(data)).mode == "P"
    expected = np.array([[[over_white(c, alphas[i]) for c in PALETTE[i]] for i in r]
                         for r in ([0, 1, 2, 3], [3, 2, 1, 0])], np.uint8)
    np.testing.assert_array_equal(dec(data), expected)
    assert tuple(expected[0, 2]) == (255, 255, 255)


def test_mode_p_gif_with_transparent_index():
    img = palette_image()
    for x in range(4):
        img.putpixel((x, 0), x)
        img.putpixel((x, 1), x)
    out = dec(enc(img, "GIF", transparency=1))
    expected = np.array([PALETTE[0], (255, 255, 255), PALETTE[2], PALETTE[3]], np.uint8)
    np.testing.assert_array_equal(out, np.stack([expected, expected]))


def test_mode_pa_tiff():
    img = palette_image("PA")
    pixels = [(0, 255), (1, 128), (2, 0), (3, 50)]
    for x, p in enumerate(pixels):
        img.putpixel((x, 0), p)
        img.putpixel((x, 1), p)
    data = enc(img, "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "PA"
    expected = np.array([[over_white(c, a) for c in PALETTE[i]] for i, a in pixels], np.uint8)
    np.testing.assert_array_equal(dec(data), np.stack([expected, expected]))


def rgb_sample(h: int = 5, w: int = 7, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("fmt,kw", [("PNG", {}), ("BMP", {}), ("TIFF", {}),
                                    ("WEBP", {"lossless": True})])
def test_mode_rgb_lossless(fmt, kw):
    a = rgb_sample()
    np.testing.assert_array_equal(dec(enc(Image.fromarray(a), fmt, **kw)), a)


def test_mode_rgb_jpeg():
    a = np.zeros((16, 32, 3), np.uint8)
    a[:, :16] = (10, 200, 30)
    a[:, 16:] = (128, 128, 128)
    data = enc(Image.fromarray(a), "JPEG", quality=100, subsampling=0)
    out = dec(data)
    # RGB passes through unchanged: exactly libjpeg's pixels as PIL's decoder gives them...
    np.testing.assert_array_equal(out, np.asarray(Image.open(io.BytesIO(data))))
    # ...which for flat blocks at quality 100 are the colours that were encoded
    np.testing.assert_array_equal(out, a)


def test_mode_rgb_png_with_transparent_colour():
    a = np.array([[[1, 2, 3], [4, 5, 6], [1, 2, 3]]], np.uint8)
    out = dec(enc(Image.fromarray(a), "PNG", transparency=(1, 2, 3)))
    np.testing.assert_array_equal(out, [[[255, 255, 255], [4, 5, 6], [255, 255, 255]]])


def test_mode_l_png_with_transparent_value():
    out = dec(enc(Image.fromarray(row([0, 100, 200], np.uint8), "L"), "PNG", transparency=100))
    np.testing.assert_array_equal(out, grey3([[0, 255, 200]]))


@pytest.mark.parametrize("fmt,kw", [("PNG", {}), ("TIFF", {}), ("WEBP", {"lossless": True})])
def test_mode_rgba_composited_onto_white(fmt, kw):
    pixels = [(255, 0, 0, 255), (255, 0, 0, 0), (0, 0, 255, 128), (10, 200, 30, 77),
              (0, 0, 0, 1), (90, 80, 70, 254)]
    img = Image.new("RGBA", (len(pixels), 1))
    for x, p in enumerate(pixels):
        img.putpixel((x, 0), p)
    expected = np.array([[[over_white(c, p[3]) for c in p[:3]] for p in pixels]], np.uint8)
    np.testing.assert_array_equal(dec(enc(img, fmt, **kw)), expected)
    assert tuple(expected[0, 1]) == (255, 255, 255)  # fully transparent -> the background


def test_mode_rgba_fully_opaque_is_unchanged():
    a = rgb_sample()
    rgba = np.concatenate([a, np.full(a.shape[:2] + (1,), 255, np.uint8)], axis=-1)
    np.testing.assert_array_equal(dec(enc(Image.fromarray(rgba, "RGBA"), "PNG")), a)


def cmyk_rule(c: int, m: int, y: int, k: int) -> tuple[int, int, int]:
    return tuple(round((255 - v) * (255 - k) / 255) for v in (c, m, y))


CMYK_PIXELS = [(0, 0, 0, 0), (255, 0, 0, 0), (100, 50, 25, 10), (200, 200, 200, 200),
               (10, 20, 30, 128), (0, 0, 0, 255)]


def test_mode_cmyk_tiff():
    img = Image.new("CMYK", (len(CMYK_PIXELS), 1))
    for x, p in enumerate(CMYK_PIXELS):
        img.putpixel((x, 0), p)
    expected = np.array([[cmyk_rule(*p) for p in CMYK_PIXELS]], np.uint8)
    np.testing.assert_array_equal(dec(enc(img, "TIFF")), expected)
    assert tuple(expected[0, 0]) == (255, 255, 255) and tuple(expected[0, 5]) == (0, 0, 0)


def test_mode_cmyk_jpeg():
    img = Image.new("CMYK", (16 * len(CMYK_PIXELS), 16))
    for i, p in enumerate(CMYK_PIXELS):
        img.paste(p, (16 * i, 0, 16 * i + 16, 16))
    data = enc(img, "JPEG", quality=100)
    raw = np.asarray(Image.open(io.BytesIO(data)))  # the CMYK samples libjpeg decodes
    assert raw.shape[-1] == 4
    expected = np.array([[cmyk_rule(*map(int, p)) for p in r] for r in raw], np.uint8)
    out = dec(data)
    np.testing.assert_array_equal(out, expected)
    for i, p in enumerate(CMYK_PIXELS):  # flat blocks: the colours that were encoded
        assert tuple(out[8, 16 * i + 8]) == cmyk_rule(*p)


def ycbcr_rule(y: int, cb: int, cr: int) -> tuple[int, int, int]:
    def fix(v: float) -> int:
        return math.floor(min(max(v, 0.0), 255.0) + 0.5)

    cb, cr = cb - 128, cr - 128
    return fix(y + 1.402 * cr), fix(y - 0.344136 * cb - 0.714136 * cr), fix(y + 1.772 * cb)


YCC_PIXELS = [(128, 128, 128), (100, 50, 200), (200, 90, 30), (16, 240, 240), (235, 16, 16),
              (60, 160, 110), (255, 0, 0)]


def test_mode_ycbcr_tiff():
    img = Image.new("YCbCr", (len(YCC_PIXELS), 1))
    for x, p in enumerate(YCC_PIXELS):
        img.putpixel((x, 0), p)
    data = enc(img, "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "YCbCr"
    expected = np.array([[ycbcr_rule(*p) for p in YCC_PIXELS]], np.uint8)
    np.testing.assert_array_equal(dec(data), expected)
    assert tuple(expected[0, 1]) == (201, 75, 0)  # PIL's own convert() truncates: (200, 75, 0)


def test_mode_ycbcr_jpeg_matches_the_same_rule():
    img = Image.new("YCbCr", (16 * len(YCC_PIXELS), 16))
    for i, p in enumerate(YCC_PIXELS):
        img.paste(p, (16 * i, 0, 16 * i + 16, 16))
    out = dec(enc(img, "JPEG", quality=100, subsampling=0))  # libjpeg converts on decode
    for i, p in enumerate(YCC_PIXELS):
        assert tuple(out[8, 16 * i + 8]) == ycbcr_rule(*p), p


SIXTEEN = [0, 1, 255, 256, 257, 32767, 32768, 65280, 65535]


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_mode_i16_scaled_by_high_byte(fmt):
    data = enc(Image.fromarray(row(SIXTEEN, np.uint16)), fmt)
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    np.testing.assert_array_equal(dec(data), grey3([[v >> 8 for v in SIXTEEN]]))
    assert dec(data)[0, -1, 0] == 255 and dec(data)[0, 3, 0] == 1  # scaled, not clipped


def test_mode_i16b_tiff():
    img = Image.fromarray(row(SIXTEEN, ">u2"))
    assert img.mode == "I;16B"
    data = enc(img, "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "I;16B"
    np.testing.assert_array_equal(dec(data), grey3([[v >> 8 for v in SIXTEEN]]))


def test_16_bit_rgb_png_gets_the_same_high_byte_rule():
    samples = [(0x12FF, 0x8000, 0xFFFF), (0x00FF, 0x0100, 0x7FFF)]
    rows = b"".join(b"\x00" + struct.pack(">HHH", *s) for s in samples)  # 1 px wide, 2 rows
    out = dec(png_by_hand(1, 2, 16, 2, rows))
    np.testing.assert_array_equal(out[:, 0], [[v >> 8 for v in s] for s in samples])


def test_mode_i16_png_with_transparent_value():
    data = enc(Image.fromarray(row([0, 1000, 65535], np.uint16)), "PNG", transparency=1000)
    np.testing.assert_array_equal(dec(data), grey3([[0, 255, 255]]))
    data = enc(Image.fromarray(row([0, 1000, 40000], np.uint16)), "PNG", transparency=1000)
    np.testing.assert_array_equal(dec(data), grey3([[0, 255, 40000 >> 8]]))


def test_mode_i_tiff_clipped_to_16_bit_then_high_byte():
    values = [-5, 0, 255, 256, 4096, 65535, 70000, 2**31 - 1]
    data = enc(Image.fromarray(row(values, np.int32)), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "I"
    expected = [min(max(v, 0), 65535) >> 8 for v in values]
    np.testing.assert_array_equal(dec(data), grey3([expected]))


def test_mode_i_from_16_bit_pgm():
    values = [0, 256, 32768, 65535]
    data = b"P5\n4 1\n65535\n" + np.array(values, ">u2").tobytes()
    assert Image.open(io.BytesIO(data)).mode == "I"
    np.testing.assert_array_equal(dec(data), grey3([[v >> 8 for v in values]]))


def test_mode_f_tiff_clipped_and_rounded():
    values = [-1.0, 0.0, 0.49, 0.5, 1.5, 127.4, 254.5, 255.0, 300.0, np.nan, np.inf, -np.inf]
    data = enc(Image.fromarray(row(values, np.float32)), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "F"
    expected = [0, 0, 0, 1, 2, 127, 255, 255, 255, 0, 255, 0]
    np.testing.assert_array_equal(dec(data), grey3([expected]))


# ----------------------------------------------------------------------------- orientation


def exif_orientation(value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif.tobytes()


def quadrant_image() -> np.ndarray:
    """48 wide x 32 high, 16x16 flat blocks; the top-left one red."""
    a = np.full((32, 48, 3), 128, np.uint8)
    a[:16, :16] = (255, 0, 0)
    a[16:, 32:] = (0, 0, 255)
    return a


def test_jpeg_exif_orientation_6_rotated_upright():
    data = enc(Image.fromarray(quadrant_image()), "JPEG", quality=95,
               exif=exif_orientation(6))
    out = dec(data)
    assert out.shape == (48, 32, 3)  # H and W swapped
    # orientation 6: the stored image must be turned 90 degrees clockwise, which takes the
    # stored top-left corner to the top-right and the bottom-right to the bottom-left
    top_right, bottom_left = out[8, 24].astype(int), out[40, 8].astype(int)
    assert top_right[0] > 230 and top_right[1:].max() < 30  # red
    assert bottom_left[2] > 230 and bottom_left[:2].max() < 30  # blue
    assert abs(out[8, 8].astype(int) - 128).max() < 10  # grey: the top-left is not red


@pytest.mark.parametrize("fmt,kw", [("PNG", {"exif": exif_orientation(6)}),
                                    ("TIFF", {"tiffinfo": {274: 6}}),
                                    ("WEBP", {"lossless": True, "exif": exif_orientation(6)})])
def test_orientation_in_other_formats(fmt, kw):
    out = dec(enc(Image.fromarray(quadrant_image()), fmt, **kw))
    np.testing.assert_array_equal(out, np.rot90(quadrant_image(), k=-1))


def test_orientation_1_and_broken_exif_leave_pixels_as_stored():
    a = quadrant_image()
    np.testing.assert_array_equal(dec(enc(Image.fromarray(a), "PNG", exif=exif_orientation(1))),
                                  a)
    broken = b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff garbage"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's "Corrupt EXIF data" warning must not escape
        out = dec(enc(Image.fromarray(a), "JPEG", quality=95, exif=broken))
    assert out.shape == a.shape


# ----------------------------------------------------------------------------- errors


def assert_rejected(data: bytes, where: str = "shard-000001.tar:key42",
                    min_side: int | None = None) -> str:
    with pytest.raises(ShardError) as pil_info:
        decode_pil(data, where, min_side)
    with pytest.raises(ShardError) as info:
        decode_image(data, where, min_side)
    msg = str(info.value)
    assert str(pil_info.value) == msg
    assert msg.startswith(f"{where}: cannot decode image (") and msg.endswith(")"), msg
    assert "\n" not in msg
    return msg


def test_truncated_png_rejected():
    data = enc(Image.fromarray(rgb_sample(64, 64)), "PNG")
    for cut in (len(data) // 2, 60, 20):
        assert_rejected(data[:cut])


def test_truncated_jpeg_rejected():
    data = enc(Image.fromarray(rgb_sample(64, 64)), "JPEG", quality=90)
    for cut in (len(data) - 2, len(data) // 2, 300, 30):
        assert_rejected(data[:cut])
        assert_rejected(data[:cut], min_side=8)  # decoded at 1/8 scale: still reads it all


def test_random_bytes_rejected():
    msg = assert_rejected(np.random.default_rng(0).bytes(1000))
    assert "not an image format PIL reads" in msg and "0x" not in msg  # no BytesIO address
    assert_rejected(b"<!DOCTYPE html><html>not found</html>")


def test_empty_data_rejected():
    assert "empty data" in assert_rejected(b"")
    with pytest.raises(ShardError, match=r"^image: cannot decode image \(empty data"):
        decode_image(b"")


def test_zero_size_images_rejected():
    assert_rejected(png_by_hand(0, 5, 8, 2, b""))
    assert_rejected(png_by_hand(5, 0, 8, 2, b""))
    assert_rejected(b"P5\n0 5\n255\n")


def test_eps_refused_without_running_ghostscript():
    assert "EPS" in assert_rejected(enc(Image.new("RGB", (4, 4)), "EPS"))


def test_decompression_bomb_rejected_without_warnings(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    ok = enc(Image.new("RGB", (10, 10)), "PNG")
    warned = enc(Image.new("RGB", (11, 10)), "PNG")  # PIL itself only warns up to 2x
    refused = enc(Image.new("RGB", (30, 10)), "PNG")  # PIL raises DecompressionBombError
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # would show any warning that got through
        assert dec(ok).shape == (10, 10, 3)
        assert "exceeds limit" in assert_rejected(warned)
        assert "exceeds limit" in assert_rejected(refused)
        assert "exceeds limit" in assert_rejected(enc(Image.new("RGB", (11, 10)), "JPEG"))
    assert not caught, [str(w.message) for w in caught]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # None: no limit
    assert dec(refused).shape == (10, 30, 3)


def test_a_jpeg_above_the_limit_is_read_reduced_only_where_prepare_asks(monkeypatch):
    """prepare --max-short-side reads a JPEG above the pixel limit when its reduced decode is
    within it; the stages (decode_image, with or without min_side) still refuse it."""
    from pipeline.images import header

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    big = enc(Image.new("RGB", (48, 40), (200, 30, 30)), "JPEG")  # 1,920 px: PIL raises
    near = enc(Image.new("RGB", (20, 10), (200, 30, 30)), "JPEG")  # 200 px: PIL only warns
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for data in (big, near):
            assert "exceeds limit" in assert_rejected(data)
            with pytest.raises(ShardError, match="exceeds limit"):
                decode_image(data, min_side=5)
            with pytest.raises(ShardError, match="exceeds limit"):  # only with min_side
                decode_pil(data, large_jpeg=True)
        pic = decode_pil(big, min_side=5, large_jpeg=True)  # 1/8: 6x5
        assert pic.size == (6, 5) and pic.getpixel((3, 2))[0] > 150
        assert decode_pil(near, min_side=5, large_jpeg=True).size == (10, 5)  # 1/2
        # a reduction that still leaves too many pixels: refused, the sizes named
        with pytest.raises(ShardError, match=r"48x40 = 1920 pixels, 24x20 decoded at reduced "
                                             r"scale\) exceeds limit of 100"):
            decode_pil(big, min_side=20, large_jpeg=True)
        png = enc(Image.new("RGB", (48, 40)), "PNG")  # no reduced decode for other formats
        with pytest.raises(ShardError, match="exceeds limit"):
            decode_pil(png, min_side=5, large_jpeg=True)
        assert header(big, large_jpeg=True) == ("JPEG", (48, 40))
        with pytest.raises(Image.DecompressionBombError):
            header(big)
    assert not caught, [str(w.message) for w in caught]


# ----------------------------------------------------------------------------- frames, sizes


def frames() -> list[Image.Image]:
    return [Image.new("RGB", (6, 4), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]


@pytest.mark.parametrize("fmt,kw", [("GIF", {}), ("PNG", {}), ("WEBP", {"lossless": True}),
                                    ("TIFF", {})])
def test_animated_first_frame(fmt, kw):
    first, *rest = frames()
    data = enc(first, fmt, save_all=True, append_images=rest, duration=100, **kw)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
    out = dec(data)
    assert out.shape == (4, 6, 3)
    assert (out == (255, 0, 0)).all()


@pytest.mark.parametrize("h,w", [(1, 1), (3, 4000), (4000, 3)])
def test_extreme_sizes(h, w):
    a = rgb_sample(h, w, seed=h)
    np.testing.assert_array_equal(dec(enc(Image.fromarray(a), "PNG")), a)
    assert dec(enc(Image.fromarray(a[..., 0]), "PNG")).shape == (h, w, 3)


def test_bytes_like_inputs():
    data = enc(Image.fromarray(rgb_sample()), "PNG")
    ref = dec(data)
    np.testing.assert_array_equal(decode_image(bytearray(data)).permute(1, 2, 0).numpy(), ref)
    np.testing.assert_array_equal(decode_image(memoryview(data)).permute(1, 2, 0).numpy(), ref)


def test_output_is_writable_and_not_shared():
    data = enc(Image.fromarray(rgb_sample(1, 1)), "PNG")
    a, b = decode_image(data), decode_image(data)
    a[0, 0, 0] += 1  # no warning, no effect on the other result
    assert not torch.equal(a, b)


# ----------------------------------------------------------------------------- pil_to_rgb


def test_pil_to_rgb_applies_the_same_rules():
    rgba = Image.new("RGBA", (2, 1))
    rgba.putpixel((0, 0), (255, 0, 0, 0))
    rgba.putpixel((1, 0), (0, 0, 255, 128))
    out = pil_to_rgb(rgba)
    assert out.mode == "RGB"
    assert list(out.getpixel((x, 0)) for x in range(2)) == [
        (255, 255, 255), (over_white(0, 128), over_white(0, 128), 255)]
    i16 = pil_to_rgb(Image.fromarray(row([0, 256, 65535], np.uint16)))
    assert i16.mode == "RGB" and [i16.getpixel((x, 0)) for x in range(3)] == [
        (0, 0, 0), (1, 1, 1), (255, 255, 255)]
    plain = Image.new("RGB", (2, 2), (1, 2, 3))
    assert pil_to_rgb(plain) is plain
    for img in (Image.new("L", (2, 2), 9), Image.new("CMYK", (2, 2), (0, 0, 0, 255)),
                Image.new("F", (2, 2), 3.6)):
        out = pil_to_rgb(img)
        assert out.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(out), dec(enc(img, "TIFF")))


# ----------------------------------------------------------------------------- torchvision


def photo_like(h: int, w: int, seed: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    a = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x * y) % 256], axis=-1)
    noise = np.random.default_rng(seed).integers(0, 40, a.shape)
    return (a + noise).clip(0, 255).astype(np.uint8)


def plain_images() -> list[tuple[str, bytes]]:
    a, b = photo_like(37, 53, 1), photo_like(64, 48, 2)
    out = [("png rgb", enc(Image.fromarray(a), "PNG")),
           ("png grey", enc(Image.fromarray(b[..., 0]), "PNG")),
           ("png palette", enc(Image.fromarray(a).quantize(64), "PNG")),
           ("jpg grey", enc(Image.fromarray(b[..., 1]), "JPEG", quality=90))]
    for q, sub, prog in [(90, 2, False), (75, 2, True), (95, 0, False), (90, 1, True)]:
        for name, img in (("a", a), ("b", b)):
            out.append((f"jpg {name} q{q} sub{sub} prog{prog}",
                        enc(Image.fromarray(img), "JPEG", quality=q, subsampling=sub,
                            progressive=prog)))
    out.append(("jpg exif orientation 1", enc(Image.fromarray(a), "JPEG",
                                              exif=exif_orientation(1))))
    return out


def test_same_pixels_as_torchvision_on_plain_jpeg_and_png():
    """The decoder this replaces: switching must not change the pixels of ordinary files."""
    import torchvision.io as tv

    for name, data in plain_images():
        ref = tv.decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                              mode=tv.ImageReadMode.RGB)
        assert torch.equal(decode_image(data, name), ref), name


def test_damaged_files_give_an_image_or_shard_error_and_no_warnings():
    """Bytes flipped or cut anywhere: never another exception type, never a warning."""
    a = rgb_sample(12, 15, seed=3)
    seeds = [enc(Image.fromarray(a), "PNG"), enc(Image.fromarray(a), "JPEG",
                                                  exif=exif_orientation(6)),
             enc(Image.fromarray(a).convert("CMYK"), "JPEG"), enc(Image.fromarray(a), "GIF"),
             enc(Image.fromarray(a), "TIFF"), enc(Image.fromarray(a), "WEBP"),
             enc(Image.fromarray(a[..., 0].astype(np.uint16) * 257), "PNG")]
    rng = np.random.default_rng(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for data in seeds:
            for i in range(25):
                b = bytearray(data)
                for pos in rng.integers(0, len(b), size=rng.integers(1, 4)):
                    b[pos] = rng.integers(0, 256)
                if i % 4 == 0:
                    b = b[:rng.integers(1, len(b))]
                try:
                    t = decode_image(bytes(b), "damaged")
                except ShardError as e:
                    assert str(e).startswith("damaged: cannot decode image (")
                else:
                    assert t.dtype == torch.uint8 and t.shape[0] == 3 and t.is_contiguous()
    assert not caught, [str(w.message) for w in caught]


# ----------------------------------------------------------------------------- reduced decoding


def photo(w: int, h: int) -> Image.Image:
    """A real photograph (scikit-learn's bundled china.jpg), resized to w x h."""
    from sklearn.datasets import load_sample_image

    return Image.fromarray(load_sample_image("china.jpg")).resize((w, h), Image.BICUBIC)


@pytest.mark.parametrize("min_side,size", [(80, (125, 88)), (100, (250, 175)),
                                           (300, (500, 350)), (350, (500, 350)),
                                           (351, (1000, 700)), (400, (1000, 700))])
def test_large_jpeg_decoded_at_the_smallest_scale_keeping_the_shorter_side(min_side, size):
    """1000 x 700: 1/8 while the shorter side stays >= min_side (88 >= 80), 1/4 for 100 (1/8
    would give 88), 1/2 for 300 and 350 (exactly 350); in full once 700 < 2 x min_side."""
    data = enc(photo(1000, 700), "JPEG", quality=90)
    t = decode_image(data, "test", min_side=min_side)
    assert t.dtype == torch.uint8 and t.is_contiguous()
    w, h = size
    assert tuple(t.shape) == (3, h, w) and min(h, w) >= min_side


def test_reduced_decode_after_the_eval_crop_is_within_a_few_levels_of_the_full_one():
    from pipeline.transforms import eval_crop, eval_decode_side

    data = enc(photo(2000, 1400), "JPEG", quality=90)
    for resolution in (224, 380):
        side = eval_decode_side(resolution)  # 256 and 412: 1/4 and 1/2 scale
        crop = eval_crop(resolution)
        full = crop(decode_image(data)[None])[0].float()
        reduced = crop(decode_image(data, min_side=side)[None])[0].float()
        assert full.shape == reduced.shape == (3, resolution, resolution)
        diff = (full - reduced).abs()
        assert 0 < diff.mean() < 3, diff.mean()  # reduced, and close: a level or two of 255
        assert diff.quantile(0.99) < 20


def test_reduced_decode_keeps_the_rules_orientation_grey_cmyk_and_rejection():
    base = photo(800, 600)
    # EXIF orientation 6 is applied after the reduction: 1/4 of 800 x 600, turned upright
    turned = decode_image(enc(base, "JPEG", quality=90, exif=exif_orientation(6)), min_side=150)
    assert tuple(turned.shape) == (3, 200, 150)
    upright = decode_image(enc(base, "JPEG", quality=90), min_side=150)
    np.testing.assert_allclose(turned.float().mean(), upright.float().mean(), atol=1)
    grey = decode_image(enc(base.convert("L"), "JPEG", quality=90), min_side=150)
    assert tuple(grey.shape) == (3, 150, 200) and (grey[0] == grey[1]).all()
    cmyk = enc(base.convert("CMYK"), "JPEG", quality=90)
    small = decode_image(cmyk, min_side=150)
    full = decode_image(cmyk)
    assert tuple(small.shape) == (3, 150, 200)
    shrunk = torch.nn.functional.avg_pool2d(full[None].float(), 4)[0]  # 4x4 block means
    assert (small.float() - shrunk).abs().mean() < 4  # the same CMYK rule at 1/4 scale
    truncated = enc(base, "JPEG", quality=90)
    with pytest.raises(ShardError, match="cannot decode image"):
        decode_image(truncated[: len(truncated) // 2], min_side=150)


def test_min_side_leaves_other_formats_and_small_jpegs_untouched():
    img = photo(800, 600)
    for data in (enc(img, "PNG"), enc(img, "WEBP", quality=90), enc(img, "JPEG", quality=90)):
        min_side = 301 if data[:2] == b"\xff\xd8" else 100  # the JPEG: 600 < 2 x 301
        assert torch.equal(decode_image(data, min_side=min_side), decode_image(data))

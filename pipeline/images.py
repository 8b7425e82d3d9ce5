"""The one image decoder every stage uses: encoded bytes -> ``(3, H, W)`` ``torch.uint8`` RGB.

Users bring ordinary mixed collections: 16-bit PNGs, CMYK JPEGs, palette images with
transparency, EXIF-rotated phone photos, float TIFFs. Every stage (prepare, training, teacher,
pseudo-labeling) must turn the same bytes into the same tensor, or reject them the same way, so
all of them call :func:`decode_image` and nothing else.

Rules (the same for every format; the numbers are what the tests check):

* **Orientation.** The EXIF orientation (JPEG/PNG/WebP EXIF, TIFF tags, or XMP
  ``tiff:Orientation``, exactly what :func:`PIL.ImageOps.exif_transpose` reads) is applied, so
  phone photos come out upright. Unreadable orientation metadata is ignored: the pixels are
  still good.
* **Alpha** (RGBA, LA, PA, P or L/RGB/1 with a transparency entry, premultiplied RGBa/La) is
  composited onto a fixed white background, :data:`ALPHA_BACKGROUND`:
  ``out = round((c * a + 255 * (255 - a)) / 255)`` per channel (exact integer arithmetic; the
  quotient is never a tie). Why: dropping alpha exposes whatever colour happens to be stored
  under transparent pixels (black in most files, leftover garbage in some), so the same kind of
  picture would reach the classifier on random backgrounds, and black makes dark logos and
  text vanish. Transparent images in real collections are mostly product shots, logos, icons
  and stickers made to be shown on white pages (which is also how they look to the person who
  labels them), so white is the background that matches how they are meant to be seen and how
  similar opaque photos look. Grey (e.g. the ImageNet mean) is neutral after normalisation but
  is not how anyone sees these images, and black hides dark content. The background is a
  constant, not a per-call option: consistency across stages matters more than the choice.
* **High bit depth.** ``I;16`` (and ``I;16B``/``I;16L``/``I;16N``) keep the high byte,
  ``v >> 8``: 0..65535 is *scaled* to 0..255 (floor of v/256), never clipped. This is the same
  rule PIL applies to 16-bit RGB and RGBA PNGs (it keeps the high byte of each sample) and
  torchvision's ``to_dtype(uint8, scale=True)``, so a 16-bit grey PNG and the same picture saved
  as 16-bit colour decode alike. ``I`` (32-bit signed) is treated as 16-bit data, because that
  is what it holds when PIL opens real files (16-bit PGM/PPM, which PIL rescales to 0..65535;
  older Pillow also opened 16-bit PNGs as ``I``): clipped to 0..65535, then ``v >> 8``. ``F`` (32-bit
  float) is on PIL's 0..255 scale (the scale of ``convert("F")`` from ``L``, so 8-bit data that
  went through float comes back unchanged): NaN -> 0, clipped to 0..255, rounded half up. Both
  are fixed per-value rules, deliberately not stretched by each image's own range: the same
  stored value always gives the same pixel, whatever else is in the image. Float images on a
  0..1 scale therefore come out nearly black; convert such collections before preparing them.
* **Other modes.** ``1`` -> 0/255; ``L`` replicated to three channels; ``P`` through its
  palette; ``CMYK`` -> ``round((255 - C) * (255 - K) / 255)`` per channel, PIL's conversion
  without colour management (Adobe-inverted CMYK JPEGs are un-inverted by PIL first); ``YCbCr``
  with the JFIF (full-range BT.601) formula ``R = Y + 1.402 (Cr-128)``,
  ``G = Y - 0.344136 (Cb-128) - 0.714136 (Cr-128)``, ``B = Y + 1.772 (Cb-128)``, rounded half up
  and clipped (as libjpeg does for YCbCr JPEGs; PIL's own conversion truncates instead);
  anything else PIL can convert (RGBX, LAB, HSV) through ``convert("RGB")``. ICC profiles are
  ignored, as the torchvision decoder this replaces ignored them.
* **Animated images** (GIF, APNG, WebP, multi-page TIFF, MPO): the first frame.
* **Errors.** Truncated or corrupt data, something that is not an image, an image without
  pixels, and EPS (PIL would run Ghostscript on it) raise :class:`pipeline.shards.ShardError`
  with one line, ``"<where or 'image'>: cannot decode image (<first line of the reason>)"``.
  ``img.load()`` runs inside the guarded block, so a truncated file fails here, not later
  (this relies on PIL's default ``ImageFile.LOAD_TRUNCATED_IMAGES = False``: never set it).
* **Decompression bombs.** Images with more than ``PIL.Image.MAX_IMAGE_PIXELS`` pixels (PIL's
  default, 89,478,485, about 9,459 x 9,459: plenty for a classifier that sees a few hundred
  pixels a side; read at each call, so a deployment can change it, ``None`` disables the
  limit) are rejected with ShardError before any pixel is decoded. One exception, for
  ``prepare --max-short-side`` alone (``decode_pil(..., large_jpeg=True)``): a JPEG above the
  limit is read when libjpeg's reduced decode (below) brings the pixels it decodes within it,
  so a large scan is shrunk instead of skipped; the pixels held are bounded all the same.
* **Warnings.** PIL only *warns* between 1x and 2x its pixel limit, and it warns about every
  malformed EXIF/TIFF tag it skips (phone photos with broken EXIF are common); one warning per
  file would flood the logs of a stage that reads millions. So this module keeps two filters at
  the front of the ``warnings`` filter list: :class:`PIL.Image.DecompressionBombWarning` ->
  error (the recipe PIL documents; the size check above is the backstop) and ``UserWarning``
  from ``PIL.TiffImagePlugin`` -> ignored (the image still decodes; the orientation of a broken
  EXIF block is ignored). They are re-added when something has put filters in front or reset
  them. They are process-wide: other code in the same process that opens an oversized image
  with PIL gets the exception instead of the warning (so ``prepare`` and the stages reject the
  same files). Setting filters around each call instead (``warnings.catch_warnings``) is not
  thread-safe and resets every module's "already shown" registry, which would make unrelated
  warnings repeat on every image.

* **Reduced decoding.** Where the caller will shrink the image anyway (evaluation,
  pseudo-labeling and the FixRes fine-tune resize the shorter side to ``size / crop fraction``
  and take the centre), it passes that length as ``min_side`` and a JPEG whose shorter side is
  at least twice as long is decoded at 1/2, 1/4 or 1/8 scale by libjpeg's DCT scaling (PIL's
  ``draft``): the largest reduction that keeps the shorter side at least ``min_side``. Why:
  decoding all of a 12-megapixel photo and then resizing it costs several times more than
  the reduced decode and the smaller resize (``bench/reduced_decode.py`` measures both), and the
  pixels differ from the full decode's by a level or two of 255 on average after the resize.
  Every caller at the same ``min_side`` gets the same tensor (the teacher's test top-1 and its
  pseudo-labels come from the same pixels); training passes the side at which its smallest
  random crop still has the training resolution. Other formats, and JPEGs smaller than twice
  ``min_side``, decode in full whatever ``min_side``.

Speed: ``bench/decode.py`` measures it against the torchvision decoder it replaces (figures in
the README). A fast path through torchvision's decoder for plain 8-bit JPEGs and PNGs gave the
same pixels but measured no faster, so there is none, which also keeps this module off
torchvision's image ops (deprecated since torchvision 0.29).
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps

if TYPE_CHECKING:
    import torch

__all__ = ["ALPHA_BACKGROUND", "decode_image", "decode_pil", "pil_to_rgb"]

#: RGB background that transparent pixels are composited onto (see the module docstring).
ALPHA_BACKGROUND: tuple[int, int, int] = (255, 255, 255)

_PLANAR_MIN_PIXELS = 128 * 128
_HIGH_BIT_16 = ("I;16", "I;16L", "I;16B", "I;16N")
_REFUSED_FORMATS = {"EPS": "EPS is not decoded: PIL would run Ghostscript on untrusted data"}
# Modes whose transparency PIL resolves itself with convert("RGBA"); I;16/I keys are ours.
_PIL_ALPHA_MODES = ("1", "L", "P", "PA", "LA", "La", "RGB", "RGBa", "RGBA")


class _Reject(Exception):
    """A reason to refuse an image; turned into ShardError (imported lazily: no import cycle)."""


# ----------------------------------------------------------------------------- public API


def decode_image(data: bytes, where: str = "", min_side: int | None = None) -> torch.Tensor:
    """Encoded image bytes -> contiguous ``(3, H, W)`` ``torch.uint8`` RGB tensor.

    Any format and mode PIL opens; EXIF orientation applied; alpha composited onto white;
    16-bit data scaled by its high byte; first frame of animations (rules and reasons in the
    module docstring). Raises :class:`pipeline.shards.ShardError`
    ``"<where or 'image'>: cannot decode image (<reason>)"`` for anything that is not a whole,
    decodable image of at most ``PIL.Image.MAX_IMAGE_PIXELS`` pixels.

    ``min_side``: the caller will shrink the image until its shorter side is this long, so a
    JPEG at least twice that size is decoded at 1/2, 1/4 or 1/8 scale, the smallest that keeps
    the shorter side at least ``min_side`` (see "Reduced decoding" in the module docstring).
    """
    return _chw(_decode(data, where, min_side))


def decode_pil(data: bytes, where: str = "", min_side: int | None = None,
               large_jpeg: bool = False) -> Image.Image:
    """:func:`decode_image`'s pixels as an ``RGB`` PIL image (``H x W``), for code that goes on
    in PIL (``prepare``'s resize): the same rules and errors, without the planar copy.

    ``large_jpeg`` (with ``min_side``): a JPEG above the pixel limit is read all the same when
    its reduced decode is within it, as ``prepare --max-short-side`` shrinks it anyway (see
    "Decompression bombs" in the module docstring). The stages never pass it: what they read
    is limited by its full size, so that the preflight and every stage reject the same files.
    """
    return _rgb_image(_decode(data, where, min_side, large_jpeg))


def header(data: bytes, large_jpeg: bool = False) -> tuple[str, tuple[int, int]]:
    """The image's format (PIL's name, e.g. ``"JPEG"``) and full size, from its header alone;
    ``large_jpeg`` as in :func:`decode_pil`. Raises what PIL raises."""
    _ensure_warning_filters()
    img = _open(data, large_jpeg)
    return img.format or "", img.size


def _open(data: bytes, large_jpeg: bool) -> Image.Image:
    """``Image.open`` (which refuses images above the pixel limit), except that with
    ``large_jpeg`` a JPEG it refuses for its size is opened by the JPEG reader alone, which
    does not check it: the caller checks the size it will decode (:func:`_check_header`)."""
    try:
        # No ``with``: closing costs ~10% of a small PNG's decode and frees nothing that the
        # garbage collector would not (the file is a BytesIO, the pixels die with ``img``).
        return Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        if not (large_jpeg and data[:3] == b"\xff\xd8\xff"):
            raise
    from PIL import JpegImagePlugin

    return JpegImagePlugin.JpegImageFile(io.BytesIO(data))


def _decode(data: bytes, where: str, min_side: int | None,
            large_jpeg: bool = False) -> Image.Image | np.ndarray:
    """Bytes -> what :func:`_rgb` returns (an RGB or L image or array), errors as ShardError."""
    name = where or "image"
    if not isinstance(data, bytes | bytearray):
        data = bytes(data)  # memoryview, numpy buffer, ...
    try:
        if not data:
            raise _Reject("empty data: 0 bytes")
        _ensure_warning_filters()
        img = _open(data, large_jpeg and bool(min_side))
        full = img.size
        if min_side:
            _reduce_jpeg(img, min_side)
        # After the reduction (which decodes nothing): the limit is on the pixels decoded.
        _check_header(img, full)
        img.load()  # decodes every pixel: truncated or corrupt data fails here
        _apply_orientation(img)
        return _rgb(img)
    except MemoryError:
        raise
    except Exception as e:  # decoders of untrusted data raise anything: OSError, SyntaxError...
        from pipeline.shards import ShardError  # here: importing this module needs no shards.py

        raise ShardError(f"{name}: cannot decode image ({_reason(e, data)})") from e


def pil_to_rgb(img: Image.Image) -> Image.Image:
    """The mode conversion of :func:`decode_image` alone: any PIL image -> an ``RGB`` image.

    Same rules (alpha onto white, ``I;16``/``I`` high byte, ``F`` clipped, CMYK, YCbCr, ...).
    Does not apply EXIF orientation (call ``ImageOps.exif_transpose`` first if wanted) and
    returns ``img`` itself when it is already plain RGB without a transparency entry.
    """
    return _rgb_image(_rgb(img))


def _rgb_image(out: Image.Image | np.ndarray) -> Image.Image:
    """What :func:`_rgb` returns (RGB or L, image or array) -> an ``RGB`` PIL image."""
    if isinstance(out, np.ndarray):
        out = Image.fromarray(out, "L" if out.ndim == 2 else "RGB")
    return out if out.mode == "RGB" else out.convert("RGB")


# ----------------------------------------------------------------------------- decoding


def _reason(e: BaseException, data: bytes) -> str:
    if isinstance(e, Image.UnidentifiedImageError):  # its text names a BytesIO at an address
        return f"not an image format PIL reads; data starts with {bytes(data[:8])!r}"
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


_FRONT_FILTER: tuple | None = None


def _ensure_warning_filters() -> None:
    """Keep our two filters first in the warning filters (see the module docstring).

    Costs an identity check per call; the filters are only touched again when someone has
    put another filter in front (pytest does, per test) or reset them.
    """
    global _FRONT_FILTER
    filters = warnings.filters
    if not filters or filters[0] is not _FRONT_FILTER:
        warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.TiffImagePlugin")
        warnings.filterwarnings("error", category=Image.DecompressionBombWarning)
        _FRONT_FILTER = warnings.filters[0]


def _check_header(img: Image.Image, full: tuple[int, int]) -> None:
    """``img``: opened, maybe set to a reduced decode; ``full``: its size in the file."""
    if img.format in _REFUSED_FORMATS:
        raise _Reject(_REFUSED_FORMATS[img.format])
    w, h = img.size
    if w <= 0 or h <= 0:
        raise _Reject(f"image has no pixels: {w}x{h}")
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and w * h > limit:  # PIL only warns up to 2x its limit
        reduced = f", {w}x{h} decoded at reduced scale" if (w, h) != full else ""
        raise _Reject(f"image size ({full[0]}x{full[1]} = {full[0] * full[1]} pixels{reduced}) "
                      f"exceeds limit of {limit} pixels (PIL.Image.MAX_IMAGE_PIXELS), could be "
                      "a decompression bomb")


# Everything Image.getexif() reads orientation from (besides TIFF tags): without any of these
# exif_transpose is a no-op, skipped to save its cost on the millions of images without EXIF.
_ORIENTATION_KEYS = ("exif", "Raw profile type exif", "XML:com.adobe.xmp", "xmp")


def _reduce_jpeg(img: Image.Image, min_side: int) -> None:
    """Ask libjpeg for 1/2, 1/4 or 1/8 scale (PIL's ``draft``), the smallest that keeps the
    shorter side at least ``min_side``. Colour mode unchanged; other formats untouched."""
    if img.format != "JPEG":  # MPO (multi-picture JPEG) and the rest: full size
        return
    w, h = img.size
    short = min(w, h)
    if short < 2 * min_side:
        return
    # draft picks the largest scale s in (8, 4, 2) with w // s and h // s at least these
    img.draft(None, (math.ceil(w * min_side / short), math.ceil(h * min_side / short)))


def _apply_orientation(img: Image.Image) -> None:
    if not hasattr(img, "tag_v2") and not any(k in img.info for k in _ORIENTATION_KEYS):
        return
    with contextlib.suppress(Exception):  # broken orientation metadata: keep pixels as stored
        ImageOps.exif_transpose(img, in_place=True)


# ----------------------------------------------------------------------------- mode rules


def _chw(x: Image.Image | np.ndarray) -> torch.Tensor:
    """An RGB or L PIL image, or an (H, W) / (H, W, 3) uint8 array -> fresh (3, H, W) tensor."""
    # Imported here, not at the top: prepare's worker processes decode with PIL alone
    # (decode_pil) and would otherwise spend a second importing torch each.
    import torch

    if isinstance(x, Image.Image):
        w, h = x.size
        out = np.empty((3, h, w), np.uint8)
        if x.mode == "L":
            out[...] = np.asarray(x)
        elif w * h >= _PLANAR_MIN_PIXELS:
            # One pass per band out of PIL's pixel storage: 2-3x faster on photos than
            # np.asarray(img) and an (H, W, 3) -> (3, H, W) transposing copy, but the three
            # tobytes() calls cost ~15 us of Python, more than they save below ~100x100 px.
            for i, band in enumerate("RGB"):
                out[i] = np.frombuffer(x.tobytes("raw", band), np.uint8).reshape(h, w)
        else:
            out[...] = np.asarray(x).transpose(2, 0, 1)
        return torch.from_numpy(out)
    h, w = x.shape[:2]
    out = np.empty((3, h, w), np.uint8)
    out[...] = x if x.ndim == 2 else x.transpose(2, 0, 1)
    return torch.from_numpy(out)


def _rgb(img: Image.Image) -> Image.Image | np.ndarray:
    """A loaded PIL image -> an RGB or L PIL image, or an (H, W) / (H, W, 3) uint8 array.

    L and (H, W) mean grey, to be replicated to three channels; the rules are the module's.
    """
    mode = img.mode
    if mode in ("RGB", "L") and "transparency" not in img.info:
        return img
    if mode in _PIL_ALPHA_MODES:
        if img.has_transparency_data:
            rgba = np.asarray(img if mode == "RGBA" else img.convert("RGBA"))
            return _composite(rgba[..., :3], rgba[..., 3])
        return img.convert("L" if mode == "1" else "RGB")
    if mode in _HIGH_BIT_16 or mode == "I":
        raw = np.asarray(img)
        if mode == "I":
            raw = np.clip(raw, 0, 65535)
        grey = (raw >> 8).astype(np.uint8)
        key = img.info.get("transparency")
        if isinstance(key, int):  # a 16-bit grey PNG's tRNS: that exact value is transparent
            return _composite(grey, np.where(raw == key, 0, 255).astype(np.uint8))
        return grey
    if mode == "F":
        raw = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0)
        return np.floor(np.clip(raw, 0.0, 255.0) + 0.5).astype(np.uint8)
    if mode == "YCbCr":
        return _ycbcr_to_rgb(np.asarray(img))
    return img.convert("RGB")  # CMYK, RGBX, LAB, HSV, ...


def _composite(color: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """round((c * a + bg * (255 - a)) / 255); color (H, W) or (H, W, 3), alpha (H, W)."""
    if alpha.size and alpha.min() == 255:  # opaque everywhere: the formula gives c
        return color
    a = alpha.astype(np.uint16)[..., None]
    c = color.astype(np.uint16)
    if c.ndim == 2:
        c = c[..., None]
    bg = np.asarray(ALPHA_BACKGROUND, np.uint16)
    # <= 255 * 255 + 127 < 2**16: exact in uint16; n / 255 is never a tie, so // rounds right
    return ((c * a + bg * (255 - a) + 127) // 255).astype(np.uint8)


def _ycbcr_to_rgb(ycc: np.ndarray) -> np.ndarray:
    y = ycc[..., 0].astype(np.float64)
    cb = ycc[..., 1].astype(np.float64) - 128.0
    cr = ycc[..., 2].astype(np.float64) - 128.0
    rgb = np.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], axis=-1)
    return np.floor(np.clip(rgb, 0.0, 255.0) + 0.5).astype(np.uint8)

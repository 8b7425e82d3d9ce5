"""WebDataset shards: writing (key, encoded image, optional label) and reading them back.

A sample in a shard is a group of tar members sharing a key: ``<key>.png`` (or jpg/jpeg/webp) and,
when labeled, ``<key>.cls`` holding the class index as text. Reading also accepts ``<key>.json``
with ``{"label": int}``, the other convention people use. Shards written here are byte-identical
for the same input (fixed mtime, sorted members) and read back with both ``webdataset`` and
``ray.data.read_webdataset``.
"""

from __future__ import annotations

import glob
import io
import json
import os
import re
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

import numpy as np

IMAGE_SUFFIXES = ("png", "jpg", "jpeg", "webp")
LABEL_SUFFIXES = ("cls", "json")
FIXED_MTIME = 946684800.0  # 2000-01-01: any constant makes the output reproducible


class ShardError(ValueError):
    """A shard or a sample in it cannot be used; the message names the shard and key."""


@dataclass(frozen=True)
class Sample:
    key: str
    image: bytes  # encoded (png/jpeg/webp)
    label: int | None = None
    shard: str = ""
    image_format: str = "png"


# ----------------------------------------------------------------------------- writing


def check_key(key: str) -> None:
    """WebDataset splits a member name at its first dot, so a dotted key would break the sample."""
    if not key or "." in key or "/" in key:
        raise ShardError(
            f"sample key {key!r} cannot be used: keys must be non-empty and contain no '.' or '/' "
            "(WebDataset takes everything after the first dot as the file suffix); rename it, "
            "e.g. replace dots with '_'"
        )


def encode_png(image: np.ndarray) -> bytes:
    """(H, W, 3) or (H, W) uint8 array -> PNG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


class ShardWriter:
    """Writes samples into ``<out_dir>/<prefix>-000000.tar`` ... with at most ``maxcount`` each.

    Files are written as ``*.tar.tmp`` and renamed when closed, so an interrupted write never
    leaves a shard that looks complete.
    """

    def __init__(self, out_dir: str | Path, prefix: str = "shard", maxcount: int = 1000) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.maxcount = maxcount
        self.paths: list[Path] = []
        self.counts: list[int] = []
        self._tar: tarfile.TarFile | None = None
        self._tmp: Path | None = None
        self._seen: set[str] = set()

    def _open_next(self) -> None:
        self._close_current()
        path = self.out_dir / f"{self.prefix}-{len(self.paths):06d}.tar"
        self._tmp = path.with_suffix(".tar.tmp")
        self._tar = tarfile.open(  # noqa: SIM115 (closed in _close_current)
            self._tmp, "w", format=tarfile.USTAR_FORMAT)
        self.paths.append(path)
        self.counts.append(0)

    def _close_current(self) -> None:
        if self._tar is not None:
            self._tar.close()
            os.replace(self._tmp, self.paths[-1])
            self._tar = None

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = int(FIXED_MTIME)
        info.mode = 0o444
        info.uname = info.gname = "bigdata"
        self._tar.addfile(info, io.BytesIO(data))

    def write(self, key: str, image: bytes, label: int | None = None, fmt: str = "png") -> None:
        check_key(key)
        if fmt not in IMAGE_SUFFIXES:
            raise ShardError(f"image format {fmt!r} not supported; use one of {IMAGE_SUFFIXES}")
        if key in self._seen:
            raise ShardError(f"duplicate sample key {key!r}; keys must be unique in a split")
        self._seen.add(key)
        if self._tar is None or self.counts[-1] >= self.maxcount:
            self._open_next()
        # Members of one sample stay adjacent and in a fixed order (readers group by key).
        if label is not None:
            self._add(f"{key}.cls", str(int(label)).encode())
        self._add(f"{key}.{fmt}", image)
        self.counts[-1] += 1

    def close(self) -> None:
        self._close_current()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.close()
        elif self._tar is not None:  # leave no half-written shard behind
            self._tar.close()
            self._tmp.unlink(missing_ok=True)
            self.paths.pop()
            self.counts.pop()
            self._tar = None


def write_shards(
    samples: Iterable[tuple[str, bytes, int | None]],
    out_dir: str | Path,
    prefix: str = "shard",
    maxcount: int = 1000,
) -> list[tuple[Path, int]]:
    """Write ``(key, png_bytes, label_or_None)`` samples; returns [(shard path, sample count)]."""
    with ShardWriter(out_dir, prefix, maxcount) as w:
        for key, image, label in samples:
            w.write(key, image, label)
    return list(zip(w.paths, w.counts, strict=True))


# ----------------------------------------------------------------------------- reading


def expand_shards(spec: str | Path | Iterable[str | Path]) -> list[str]:
    """Paths, globs and brace patterns (``data/train-{000000..000009}.tar``) -> sorted paths."""
    specs = [str(spec)] if isinstance(spec, str | Path) else [str(s) for s in spec]
    out: list[str] = []
    for s in specs:
        for expanded in _expand_braces(s):
            matches = sorted(glob.glob(expanded)) if glob.has_magic(expanded) else [expanded]
            out.extend(matches)
    return out


def _expand_braces(pattern: str) -> list[str]:
    m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if m:
        lo, hi = m.group(1), m.group(2)
        width = len(lo)
        head, tail = pattern[: m.start()], pattern[m.end() :]
        return [
            p
            for i in range(int(lo), int(hi) + 1)
            for p in _expand_braces(f"{head}{i:0{width}d}{tail}")
        ]
    m = re.search(r"\{([^{}]*,[^{}]*)\}", pattern)
    if m:
        head, tail = pattern[: m.start()], pattern[m.end() :]
        return [p for alt in m.group(1).split(",") for p in _expand_braces(head + alt + tail)]
    return [pattern]


def parse_label(sample: dict[str, Any], where: str) -> int | None:
    """The label of a raw WebDataset sample (bytes values), or None when it has none."""
    if "cls" in sample and sample["cls"] is not None:
        raw = sample["cls"]
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        try:
            return int(text.strip())
        except ValueError:
            raise ShardError(f"{where}: label in .cls is not an integer: {text[:20]!r}") from None
    if "json" in sample and sample["json"] is not None:
        raw = sample["json"]
        try:
            meta = json.loads(raw) if isinstance(raw, bytes | str) else raw
            return int(meta["label"])
        except (ValueError, KeyError, TypeError):
            raise ShardError(f'{where}: .json must hold {{"label": <int>}}') from None
    return None


def to_sample(raw: dict[str, Any]) -> Sample:
    """Normalise a raw WebDataset/Ray Data row (``__key__``, ``__url__``, suffix -> bytes)."""
    key = raw.get("__key__", "?")
    shard = str(raw.get("__url__", "?"))
    where = f"shard {shard}, key {key}"
    for fmt in IMAGE_SUFFIXES:
        if raw.get(fmt) is not None:
            image = raw[fmt]
            break
    else:
        present = sorted(k for k in raw if not k.startswith("__"))
        raise ShardError(
            f"{where}: sample has no image (found {present or 'nothing'}; expected one of "
            f"{', '.join(IMAGE_SUFFIXES)})"
        )
    return Sample(key=key, image=bytes(image), label=parse_label(raw, where), shard=shard,
                  image_format=fmt)


def iter_tar(path: str | Path) -> Iterator[dict[str, Any]]:
    """Raw samples of one tar, grouped by key, without the webdataset machinery (used by tools)."""
    current: dict[str, Any] | None = None
    with tarfile.open(path, "r") as tar:
        for member in tar:
            if not member.isfile():
                continue
            base = os.path.basename(member.name)
            if "." not in base:
                continue
            key, suffix = base.split(".", 1)
            key = os.path.join(os.path.dirname(member.name), key)
            if current is None or current["__key__"] != key:
                if current is not None:
                    yield current
                current = {"__key__": key, "__url__": str(path)}
            current[suffix.lower()] = tar.extractfile(member).read()
    if current is not None:
        yield current


def read_samples(paths: Iterable[str | Path]) -> Iterator[Sample]:
    """All samples of the given shards, in order (single process; for tools and tests)."""
    for path in paths:
        for raw in iter_tar(path):
            yield to_sample(raw)


def wds_samples(urls: list[str], *, shuffle: int = 0, split: bool = False,
                seed: int = 0) -> Any:
    """A ``webdataset`` pipeline yielding :class:`Sample` (raw bytes, decoded later).

    ``split=True`` splits shards by node and by DataLoader worker (for training inside Ray).
    """
    import webdataset as wds

    stages: list[Any] = [wds.SimpleShardList(urls)]
    if shuffle:
        stages.append(wds.shuffle(len(urls), seed=seed))
    if split:
        stages += [wds.split_by_node, wds.split_by_worker]
    stages += [wds.tarfile_to_samples()]
    if shuffle:
        stages.append(wds.shuffle(shuffle, seed=seed))
    stages.append(wds.map(to_sample))
    return wds.DataPipeline(*stages)


# ----------------------------------------------------------------------------- decoding


def decode_image(data: bytes, where: str = "") -> torch.Tensor:
    """Encoded bytes -> uint8 tensor (3, H, W), RGB. Raises ShardError naming ``where``."""
    import torch
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_image as _decode

    try:
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        return _decode(buf, mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError) as e:
        raise ShardError(f"{where or 'image'}: cannot decode image ({str(e).splitlines()[0]})") \
            from None

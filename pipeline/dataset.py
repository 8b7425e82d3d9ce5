"""Datasets: ``DIR/dataset.json`` describing the labeled, unlabeled and test shards.

Three ways to make one (``jobs/prepare.py`` is the command line for them):

* :func:`prepare_digits` converts scikit-learn's bundled handwritten digits (no download);
* :func:`prepare_imagefolder` converts a class-per-subfolder tree (or a flat folder of unlabeled
  images), local or under an ``s3://`` prefix, into shards;
* :func:`register_shards` describes existing shards in place, scanning them for counts.

Shard paths inside ``DIR`` are stored relative to it, so a dataset folder can be moved. ``DIR``
and the shards may be local or on object storage (``s3://bucket/prefix``, :mod:`pipeline.fs`).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import random
import re
import stat
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import UserError
from pipeline.fs import SCHEME, S3Path, StorageError, location
from pipeline.shards import (
    Damage,
    KeyIndex,
    Sample,
    ShardError,
    encode_png,
    expand_shards,
    read_samples,
    read_shard,
    write_shards,
)
from pipeline.storage import atomic_write_bytes, atomic_write_json, sha256_file

SPLITS = ("labeled", "unlabeled", "test")
DATASET_FILE = "dataset.json"
TRUTH_STEM = "unlabeled_truth"  # + "-<hash>.parquet": see prepare_digits


class DatasetError(UserError, ValueError):
    """The dataset folder or its description cannot be used."""


@dataclass
class SplitInfo:
    shards: list[str]  # absolute paths or s3:// URIs
    count: int
    class_counts: dict[str, int] | None = None  # None for unlabeled splits
    # prepare --max-short-side: {max_short_side, jpeg_quality, images (how many it shrank)}
    resized: dict[str, int] | None = None
    # samples per shard, in the order of ``shards`` (training deals shards balanced by them);
    # None when dataset.json lacks one (written before they were recorded, or a shard added by
    # hand). In the file: shard as listed -> samples.
    shard_counts: list[int] | None = None

    @property
    def labeled(self) -> bool:
        return self.class_counts is not None


@dataclass
class DatasetInfo:
    path: Path | S3Path  # the dataset folder
    name: str
    classes: list[str]
    splits: dict[str, SplitInfo] = field(default_factory=dict)
    unlabeled_truth: Path | S3Path | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits or not self.splits[name].shards:
            raise DatasetError(
                f"dataset {self.path} has no {name!r} split; add it with "
                f"`python jobs/prepare.py imagefolder SRC --out {self.path} --split {name}`"
            )
        return self.splits[name]

    @property
    def sha256(self) -> str:
        return sha256_file(self.path / DATASET_FILE)

    def counts(self) -> dict[str, int]:
        return {s: self.splits[s].count if s in self.splits else 0 for s in SPLITS}


# ----------------------------------------------------------------------------- dataset.json


def load_dataset(path: str | Path | S3Path) -> DatasetInfo:
    """Read ``path/dataset.json`` (``path`` may also be the file itself). A relative local path
    is made absolute against the working directory now, and so are the shards under it: Ray's
    workers run in directories of their own, where a relative path would name nothing."""
    path = location(path).resolve()
    if path.name == DATASET_FILE:
        path = path.parent
    file = path / DATASET_FILE
    if not file.exists():
        if isinstance(path, S3Path):  # a missing bucket, said as such: prepare there would fail
            path.check_bucket()
        raise DatasetError(
            f"{path} has no {DATASET_FILE}; create one with `python jobs/prepare.py digits --out "
            f"{path}` (bundled corpus), `imagefolder` or `register`"
        )
    try:
        if file.is_dir():
            raise ValueError("a folder, not a file")
        raw = json.loads(file.read_text())
        classes = [_text(str(c) if type(c) is int else c, "a class")
                   for c in _listed(raw["classes"], "classes")]
        splits = {
            name: SplitInfo(
                shards=[str(_under(path, _text(s, "a shard")))
                        for s in _listed(spec["shards"], f"{name} shards")],
                count=_count(spec["count"]),
                class_counts=spec.get("class_counts"),
                resized=spec.get("resized"),
                shard_counts=_counts_of(spec["shards"], spec.get("shard_counts")),
            )
            for name, spec in raw["splits"].items()
        }
        truth = raw.get("unlabeled_truth")
        if truth is not None:
            _text(truth, "unlabeled_truth")
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError,
            OverflowError) as e:
        raise DatasetError(f"{file} is not a valid dataset description ({e!r}); recreate it "
                           "with jobs/prepare.py") from None
    if twice := _named_twice(classes):
        raise DatasetError(f"{file}: classes {twice} are listed more than once; each class "
                           "needs one name")
    _check_shard_lists(file, splits)
    return DatasetInfo(path=path, name=raw.get("name", path.name), classes=classes,
                       splits=splits, unlabeled_truth=(path / truth) if truth else None)


def _named_twice(names: list[str]) -> list[str]:
    return sorted(n for n, c in Counter(names).items() if c > 1)


def _listed(value: Any, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise TypeError(f"{what} must be a list, got {type(value).__name__}")
    return value


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise TypeError(f"{what} must be a non-empty string, got {value!r}")
    return value


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"a split's count must be a whole number >= 0, got {value!r}")
    return value


def _counts_of(shards: list[str], counts: Any) -> list[int] | None:
    """``shard_counts`` (shard as listed -> samples) in the order of ``shards``, or None when a
    listed shard has none. Keyed by shard, not a list beside it, so that a shard list edited by
    hand (a broken shard removed, as our errors suggest) keeps the others' counts."""
    if not isinstance(counts, dict):
        return None
    out = [counts.get(s) for s in shards]
    return None if any(c is None for c in out) else [int(c) for c in out]


def _check_shard_lists(file: Path | S3Path, splits: dict[str, SplitInfo]) -> None:
    """A shard listed twice in a split would be trained on (or labeled) twice while the stages
    that key files by shard see it once; a test shard in another split puts test images into
    training. Both are mistakes of a hand-edited dataset.json, refused before any stage runs."""
    where: dict[str, str] = {}
    for name, split in splits.items():
        for shard in split.shards:
            if shard in where:
                if where[shard] == name:
                    raise DatasetError(f"{file}: the {name} split lists shard {shard} twice; "
                                       "remove the repeated entry")
                if "test" in (name, where[shard]):
                    raise DatasetError(f"{file}: shard {shard} is in both the {where[shard]} and "
                                       f"the {name} split, so test images would be trained on; "
                                       "list it in one of them")
            where.setdefault(shard, name)


def _under(folder: Path | S3Path, shard: str) -> Path | S3Path:
    p = location(shard)
    return p if p.is_absolute() else folder / shard


def save_dataset(info: DatasetInfo) -> Path | S3Path:
    def rel(p: str) -> str:
        loc = location(p).resolve()
        try:
            return loc.relative_to(info.path.resolve()).as_posix()
        except (ValueError, TypeError):  # outside the folder (TypeError: local vs s3)
            return str(loc)

    doc: dict[str, Any] = {
        "name": info.name,
        "classes": info.classes,
        "splits": {
            name: {"shards": [rel(s) for s in split.shards], "count": split.count,
                   **({"class_counts": split.class_counts} if split.labeled else {}),
                   **({"resized": split.resized} if split.resized is not None else {}),
                   **({"shard_counts": {rel(s): c for s, c in zip(split.shards,
                                                                 split.shard_counts,
                                                                 strict=True)}}
                      if split.shard_counts is not None else {})}
            for name, split in info.splits.items()
        },
    }
    if info.unlabeled_truth is not None:
        doc["unlabeled_truth"] = rel(str(info.unlabeled_truth))
    out = info.path / DATASET_FILE
    atomic_write_json(out, doc)
    return out


def _few(names: list[str], n: int = 10) -> str:
    return str(names[:n])[:-1] + (f", ... ({len(names)} in all)]" if len(names) > n else "]")


def _class_counts(labels: Iterable[int], classes: list[str]) -> dict[str, int]:
    c = Counter(labels)
    return {name: int(c.get(i, 0)) for i, name in enumerate(classes)}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- digits


def digits_images() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 8x8 digits as (N, 32, 32, 3) uint8 RGB images and int labels."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    small = (d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)  # values are 0..16
    big = np.stack([np.asarray(Image.fromarray(im).resize((32, 32), Image.BILINEAR))
                    for im in small])
    return np.repeat(big[..., None], 3, axis=-1), d.target.astype(np.int64)


def prepare_digits(out: str | Path, *, labeled_fraction: float = 0.1, test_fraction: float = 0.3,
                   seed: int = 0, shard_size: int = 100) -> DatasetInfo:
    """Bundled digits -> stratified labeled / unlabeled / test shards under ``out``.

    Fractions are of the whole corpus (1,797 images). The unlabeled shards carry no label; their
    true labels go to ``unlabeled_truth-<hash>.parquet``, which training never reads.

    The shards go into a folder named by a hash of the options
    (``labeled/<hash>/labeled-000000.tar``), so a rerun with other options writes beside what
    ``dataset.json`` lists and replaces nothing it lists until ``dataset.json`` itself is
    replaced; the files it no longer lists are named and left. The hash is in the folder, not
    the file name, because selection's per-row draws hash the shard's file name: the names stay
    those of earlier versions, and so do the demo's results.
    """
    import pandas as pd
    from sklearn.model_selection import train_test_split

    if not (0 < test_fraction < 1 and 0 < labeled_fraction < 1
            and labeled_fraction + test_fraction < 1):
        raise DatasetError("--labeled-fraction and --test-fraction must be in (0, 1) and sum to "
                           f"less than 1, got {labeled_fraction} and {test_fraction}")
    out = location(out)
    before = _existing_dataset(out)
    # Only the bundled corpus's own description may be replaced: it has held-out labels, which
    # an image folder's or registered shards' never have.
    if before is not None and (before.name != "digits" or before.unlabeled_truth is None):
        raise DatasetError(f"{out} holds the dataset {before.name!r}, which prepare digits would "
                           "replace; give it an --out of its own")
    images, labels = digits_images()
    idx = np.arange(len(labels))
    try:  # stratified: each split needs at least one image of each of the 10 classes
        rest, test = train_test_split(idx, test_size=test_fraction, stratify=labels,
                                      random_state=seed)
        lab_share = labeled_fraction / (1 - test_fraction)
        unlab, lab = train_test_split(rest, test_size=lab_share, stratify=labels[rest],
                                      random_state=seed)
    except ValueError as e:
        raise DatasetError(f"--labeled-fraction {labeled_fraction} and --test-fraction "
                           f"{test_fraction} leave a split too small to hold all 10 classes "
                           f"({str(e).splitlines()[0]}); raise the smaller one") from None
    recipe = {"format": 1, "corpus": "digits", "labeled_fraction": labeled_fraction,
              "test_fraction": test_fraction, "seed": seed, "shard_size": shard_size}
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]
    classes = [str(i) for i in range(10)]
    info = DatasetInfo(path=out, name="digits", classes=classes)
    for split, ids in (("labeled", lab), ("unlabeled", unlab), ("test", test)):
        ids = np.sort(ids)
        keep_label = split != "unlabeled"
        samples = ((f"digit{i:05d}", encode_png(images[i]),
                    int(labels[i]) if keep_label else None) for i in ids)
        written = write_shards(samples, out / split / digest, prefix=split,
                               maxcount=shard_size)
        info.splits[split] = SplitInfo(
            shards=[str(p) for p, _ in written], count=len(ids),
            class_counts=_class_counts(labels[ids], classes) if keep_label else None,
            shard_counts=[n for _, n in written])
        _log(f"prepare: {split}: {len(ids)} images in {len(written)} shards under "
             f"{out / split / digest}")
    truth = pd.DataFrame({"key": [f"digit{i:05d}" for i in np.sort(unlab)],
                          "label": labels[np.sort(unlab)].astype(np.int32)})
    info.unlabeled_truth = out / f"{TRUTH_STEM}-{digest}.parquet"
    atomic_write_bytes(info.unlabeled_truth, truth.to_parquet(index=False))
    save_dataset(info)
    if before is not None:
        def files(d: DatasetInfo) -> list[str | Path | S3Path]:
            return [*(p for s in d.splits.values() for p in s.shards),
                    *([d.unlabeled_truth] if d.unlabeled_truth is not None else [])]

        if old := _unlisted(files(before), files(info)):
            _log(f"prepare: the {len(old)} files dataset.json listed before (e.g. {old[0]}) "
                 "are no longer in it and were left where they are; delete them when no run "
                 "needs them")
    return info


def _existing_dataset(out: Path | S3Path) -> DatasetInfo | None:
    """The dataset ``out`` describes now, or None when it has no ``dataset.json``; one that
    cannot be read is refused (what it describes is unknown, so it is not replaced)."""
    if not (out / DATASET_FILE).exists():
        return None
    try:
        return load_dataset(out)
    except DatasetError:
        raise DatasetError(f"{out / DATASET_FILE} exists but cannot be read, so prepare digits "
                           "will not replace it; delete it or give an --out of its own") from None


def _unlisted(before: Iterable[str | Path | S3Path], now: Iterable[str | Path | S3Path]
              ) -> list[str]:
    """The files of ``before`` that ``now`` does not name (relative or absolute alike)."""
    def same(p: str | Path | S3Path) -> str:
        return str(location(str(p)).resolve())

    listed = {same(p) for p in now}
    return [str(p) for p in before if same(p) not in listed]


# ----------------------------------------------------------------------------- image folders


def _key_for(rel: Path, used: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9_-]", "_", str(rel.with_suffix("")))
    if len(base) > 70:  # tar member names are short (MAX_KEY_LENGTH): keep the end, add a hash
        base = f"{hashlib.sha1(base.encode()).hexdigest()[:12]}_{base[-56:]}"
    key, n = base, 1
    while key in used:
        key, n = f"{base}_{n}", n + 1
    used.add(key)
    return key


def _natural(name: str) -> list[Any]:
    """Sort key: runs of digits compare as numbers ("class2" before "class10")."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part)
            for part in re.split(r"(\d+)", name) if part]


def _files_under(src: Path | S3Path) -> list[tuple[Path | S3Path, int, int]]:
    """Every file under ``src`` as (path, size, mtime in ns), sorted, following linked folders
    (a class folder is often a link to where the images live; Path.rglob does not follow them)
    but never into a loop. Hidden files and folders (.git, .ipynb_checkpoints, .DS_Store) are
    never data. Under an ``s3://`` prefix: every object below it (one listing), with the same
    rule for hidden names."""
    if isinstance(src, S3Path):
        import pyarrow.fs as pafs

        base = len(src.arrow_path) + 1
        return sorted(((S3Path(SCHEME + i.path, endpoint=src.endpoint or False), i.size or 0,
                        i.mtime_ns or 0)
                       for i in src._list(recursive=True) if i.type == pafs.FileType.File
                       and not any(part.startswith(".") for part in i.path[base:].split("/"))),
                      key=lambda f: f[0])
    files, seen = [], set()
    for folder, dirs, names in os.walk(src, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a link back up the tree
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for n in names:
            if n.startswith("."):
                continue
            try:
                st = os.stat(os.path.join(folder, n))  # follows links, as the read will
            except OSError:  # a dangling link
                continue
            if stat.S_ISREG(st.st_mode):
                files.append((Path(folder) / n, st.st_size, st.st_mtime_ns))
    return sorted(files)


def _image_extensions() -> set[str]:
    """File suffixes of the image formats PIL reads (``.jpg``, ``.png``, ``.tif``, ``.webp``...)."""
    from PIL import Image

    Image.init()
    return {ext.lower() for ext, fmt in Image.registered_extensions().items()
            if fmt in Image.OPEN}


# Formats prepare stores as they are; the rest (TIFF, BMP, GIF: large, multi-page, or
# palette-animated) are re-encoded to PNG, which every WebDataset tool reads.
KEPT_FORMATS = ("png", "jpg", "jpeg", "webp")


def _read_image_file(path: Path | S3Path, max_short_side: int | None = None,
                     jpeg_quality: int = 90) -> tuple[bytes, str, bool, int]:
    """Bytes ready for a shard, their format, whether they were resized and the size of the
    file read (no second request for it on S3). The bytes are kept as they are
    for jpg/png/webp, re-encoded to PNG otherwise, or, when the shorter side is longer than
    ``max_short_side``, shrunk to it and encoded as JPEG at ``jpeg_quality``.

    Decoded with the decoder of every stage (:mod:`pipeline.images`), so a file is accepted
    here exactly when the stages can read it; a re-encoded file is already upright and in RGB,
    since PNG and our JPEG would not carry its orientation tag. A file to be shrunk is decoded
    as the stages decode what they will shrink (a large JPEG at 1/2, 1/4 or 1/8 scale, no
    smaller than ``max_short_side``), which reads all of its data as the full decode does; a
    JPEG above PIL's pixel limit is then read too when that scale brings it within."""
    from pipeline.images import decode_pil, header

    data = path.read_bytes()
    # A JPEG above PIL's pixel limit is read when its reduced decode is within it: it is
    # shrunk below the limit here, and the stages then read it like any other.
    large = max_short_side is not None
    pic = decode_pil(data, str(path), min_side=max_short_side,
                     large_jpeg=large)  # ShardError naming the file
    fmt, size = header(data, large_jpeg=large)  # the header only: its format and full size
    fmt, short = fmt.lower(), min(size)
    if max_short_side is not None and short > max_short_side:
        return _shrunk_jpeg(pic, max_short_side, jpeg_quality), "jpg", True, len(data)
    fmt = {"jpeg": "jpg", "mpo": "jpg"}.get(fmt, fmt)  # MPO: its first frame is a JPEG
    if fmt in KEPT_FORMATS:
        return data, fmt, False, len(data)
    return encode_png(np.asarray(pic)), "png", False, len(data)


def _shrunk_jpeg(pic: Any, side: int, quality: int) -> bytes:
    """An RGB PIL image -> JPEG bytes of it resized (Lanczos, aspect kept) to a shorter side of
    ``side`` (already that long: encoded as it is)."""
    import io

    from PIL import Image

    w, h = pic.size
    size = (side, max(1, round(h * side / w))) if w <= h else (max(1, round(w * side / h)), side)
    if size != pic.size:
        pic = pic.resize(size, Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    pic.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _read_job(path: str, max_short_side: int | None = None,
              jpeg_quality: int = 90) -> tuple[bytes, str, bool, int] | str:
    """One file for a shard, in a worker: ``(bytes, format, resized, bytes read)``, or the line
    saying why it is skipped (an error object would need to pickle back; a line is all the
    parent prints)."""
    p = location(path)
    try:
        return _read_image_file(p, max_short_side, jpeg_quality)
    except ShardError as e:  # names the file and why
        return str(e)
    except OSError as e:
        return f"{p}: cannot be read ({e.strerror or e})"
    except StorageError as e:  # an object store's refusal, already one line naming the object
        return f"{p}: cannot be read ({e})"


def default_workers() -> int:
    """One per CPU this process may use (a container's or ``taskset``'s share, not the host's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)


# Below this many files per worker, starting the pool (each worker imports torch and PIL, about
# a second) costs more than the decoding it shares out.
FILES_PER_WORKER = 64
#: Seconds between prepare's progress lines.
PROGRESS_SECONDS = 10.0


def _die_with_parent(parent: int) -> None:
    """A pool worker's start (Linux): killed when its parent dies. A prepare killed with
    SIGKILL left its workers blocked for ever writing results no one would read."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the workers end when their pipe does
        return
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(1)


def _ordered_map(fn: Callable[[str], Any], items: list[str], workers: int) -> Iterator[Any]:
    """``map(fn, items)`` in order; with ``workers > 1`` in that many processes, at most four
    items per worker in flight, so results do not pile up while the caller is slow (a shard
    uploading to S3) and a million-file folder is not queued all at once."""
    if workers <= 1:
        yield from map(fn, items)
        return
    import multiprocessing
    from concurrent.futures import Future, ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    # spawn, not fork: the parent has imported torch, whose thread pools do not survive a fork.
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_die_with_parent, initargs=(os.getpid(),))
    todo = iter(items)
    pending: deque[Future[Any]] = deque(pool.submit(fn, x)
                                        for x in itertools.islice(todo, 4 * workers))
    try:
        while pending:
            try:
                result = pending.popleft().result()
            except BrokenProcessPool:
                raise DatasetError(f"a prepare worker process died (out of memory?); run again "
                                   f"with fewer --workers than {workers}") from None
            for x in itertools.islice(todo, 1):
                pending.append(pool.submit(fn, x))
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class _Rate:
    """For a progress line every :data:`PROGRESS_SECONDS` during long work: :meth:`due` gives
    the rate since the start and the time left, or None when no line is due."""

    def __init__(self, total: int, done: int = 0) -> None:
        self.total, self.first = total, done  # ``done``: what an earlier run had finished
        self.start = self.last = time.monotonic()

    def due(self, done: int) -> tuple[float, str] | None:
        now = time.monotonic()
        if now - self.last < PROGRESS_SECONDS or done >= self.total or done <= self.first:
            return None
        self.last, rate = now, (done - self.first) / (now - self.start)
        return rate, _duration((self.total - done) / rate)


def prepare_imagefolder(src: str | Path | S3Path, out: str | Path | S3Path, *,
                        split: str = "labeled",
                        shard_size: int = 1000, workers: int | None = None,
                        max_short_side: int | None = None,
                        jpeg_quality: int | None = None, seed: int = 0) -> DatasetInfo:
    """Image tree -> shards of one split, added to ``out/dataset.json`` (created if missing).

    ``src`` is a local folder or an ``s3://`` prefix. Labeled and test splits need one
    subfolder per class; an unlabeled split may be flat.
    Unreadable files are reported by path and skipped. Every file is decoded in full to check
    it (the slow part with large photos), by ``workers`` processes (default: one per CPU, at
    most one per :data:`FILES_PER_WORKER` files); the shards are the same whatever their number.

    The samples go into the shards in a random order (``seed``), not folder by folder: the
    training streams read a shard at a time through a bounded shuffle buffer, so shards that
    each hold one class would make batches of one or two classes.

    Files keep their bytes, unless ``max_short_side`` is given: then images whose shorter side
    is longer are shrunk to it (aspect kept) and stored as JPEG at ``jpeg_quality`` (default
    90), and ``dataset.json`` records it for the split (``resized``).
    """
    import functools

    from pipeline.shards import ShardWriter

    if split not in SPLITS:
        raise DatasetError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    if jpeg_quality is not None and max_short_side is None:
        raise DatasetError("--jpeg-quality applies to images shrunk by --max-short-side; give "
                           "--max-short-side too, or drop --jpeg-quality")
    quality = 90 if jpeg_quality is None else jpeg_quality
    if not 1 <= quality <= 95:
        raise DatasetError(f"--jpeg-quality must be 1..95 (above 95 Pillow's JPEG files grow "
                           f"with no visible gain), got {quality}")
    if max_short_side is not None and max_short_side < 1:
        raise DatasetError(f"--max-short-side must be >= 1 pixel, got {max_short_side}")
    src, out = location(src), location(out)
    if not isinstance(src, S3Path) and not src.is_dir():
        raise DatasetError(f"{src} is not a directory")
    listed = _files_under(src)
    if not listed:
        raise DatasetError(f"{src} contains no files; point it at a folder of images")
    files = [p for p, _, _ in listed]
    info = load_dataset(out) if (out / DATASET_FILE).exists() else DatasetInfo(
        path=out, name=out.name, classes=[])
    labeled = split != "unlabeled"
    if labeled:
        # A class is a top folder holding an image file: a docs/ folder of notes is not one.
        images = _image_extensions()
        tops = {p.relative_to(src).parts[0] for p in files if p.parent != src}
        found = sorted({p.relative_to(src).parts[0] for p in files
                        if p.parent != src and p.suffix.lower() in images})
        for name in sorted(tops - set(found)):
            _log(f"prepare: {src / name} holds no image files; not a class")
        if not found:
            raise DatasetError(f"{src}: a {split} split needs one subfolder of images per class")
        if info.classes:  # a split of a dataset that has its classes: a subset, their indices
            extra = [c for c in found if c not in info.classes]
            if extra:
                raise DatasetError(f"{src}: classes {extra} are not among the dataset's "
                                   f"{info.classes}; name the folders as the dataset's classes "
                                   "(its classes come from the split prepared first: prepare "
                                   "the labeled split first, or give another --out)")
        else:  # numbers in numeric order ("2" before "10"), as register numbers its classes
            info.classes = sorted(found, key=_natural)
    index = {c: i for i, c in enumerate(info.classes)}
    outside: list[str] = []
    # What decides the shards' bytes: the options and each file taken (path, size, mtime,
    # label). Their names carry its hash, so a rerun never overwrites the shards that
    # dataset.json lists now (they stay valid until it lists the new ones) and a rerun of the
    # same prepare finds the shards it had finished and goes on after them.
    recipe = {"format": 1, "split": split, "shard_size": shard_size, "seed": seed,
              "max_short_side": max_short_side, "jpeg_quality": quality}
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode())
    todo: list[tuple[Path | S3Path, int | None]] = []
    for p, size, mtime in listed:
        rel = p.relative_to(src)
        label = index.get(rel.parts[0]) if labeled and len(rel.parts) > 1 else None
        if labeled and label is None:
            outside.append(f"{p} (not inside a class folder)")
        else:
            todo.append((p, label))
            # surrogateescape: a file name that is not UTF-8 keeps its bytes
            digest.update(f"{rel}\0{size}\0{mtime}\0{label}\n".encode("utf-8",
                                                                     "surrogateescape"))
    random.Random(seed).shuffle(todo)  # the seed is in the recipe
    prefix = f"{split}-{digest.hexdigest()[:10]}"
    folder = out / split
    record = folder / f"{prefix}{PROGRESS_SUFFIX}"
    done = _finished_part(record, folder, prefix, len(todo))
    for other in (folder.glob(f"*{PROGRESS_SUFFIX}") if folder.exists() else []):
        if other.name != record.name:
            _log(f"prepare: {other} is left from an unfinished prepare of other files or "
                 f"options; its shards ({other.name[:-len(PROGRESS_SUFFIX)]}-*.tar) are not "
                 "used: delete them and it")
    workers = max(1, min(workers or default_workers(), (len(todo) - done["consumed"])
                         // FILES_PER_WORKER))
    bad: list[tuple[int, str]] = [(int(i), line) for i, line in done["bad"]]
    labels: list[int] = []
    used: set[str] = set()
    skipped = {i for i, _ in bad}
    for i, (p, label) in enumerate(todo[:done["consumed"]]):  # what the finished shards hold
        if i not in skipped:
            _key_for(p.relative_to(src), used)
            if label is not None:
                labels.append(label)
    if done["shards"]:
        _log(f"prepare: {split}: {len(done['shards'])} shards of an interrupted run of this "
             f"prepare are complete ({done['consumed']} of {len(todo)} files); going on after "
             "them")
    _log(f"prepare: {split}: checking {len(todo) - done['consumed']} files with {workers} "
         f"process{'es' if workers > 1 else ''}")
    progress = _Rate(len(todo), done["consumed"])
    job = functools.partial(_read_job, max_short_side=max_short_side, jpeg_quality=quality)
    totals = {k: done[k] for k in ("resized", "read", "written")}
    at = [done["consumed"]]  # the file being written when a shard closes: files before it are in

    def shard_closed() -> None:
        atomic_write_json(record, {
            "recipe": recipe, "shards": w.counts, "consumed": at[0],
            "bad": [[i, line] for i, line in bad if i < at[0]], **totals})

    rest = todo[done["consumed"]:]
    with ShardWriter(folder, prefix=prefix, maxcount=shard_size, on_close=shard_closed) as w:
        if done["shards"]:
            w.resume(done["shards"], used)
        results = _ordered_map(job, [str(p) for p, _ in rest], workers)
        for n, ((p, label), result) in enumerate(zip(rest, results, strict=True),
                                                 done["consumed"]):
            at[0] = n
            if isinstance(result, str):
                bad.append((n, result))
            else:
                data, fmt, shrunk, size = result
                w.write(_key_for(p.relative_to(src), used), data, label, fmt)
                totals["resized"] += shrunk
                totals["read"] += size
                totals["written"] += len(data)
                if label is not None:
                    labels.append(label)
            if due := progress.due(n + 1):
                _log(f"prepare: {split}: {n + 1}/{len(todo)} files, {due[0]:.1f} files/s, about "
                     f"{due[1]} left")
        at[0] = len(todo)
    for line in outside + [line for _, line in bad]:
        _log(f"prepare: skipped unreadable file {line}")
    count = sum(w.counts)
    if count == 0:
        raise DatasetError(f"{src}: none of the {len(files)} files is a readable image")
    _log(f"prepare: {split}: {count} images in {len(w.paths)} shards, "
         f"{len(outside) + len(bad)} files skipped")
    note = (f"; {totals['resized']} resized to a shorter side of {max_short_side} px"
            if max_short_side is not None else "")
    _log(f"prepare: {split}: read {totals['read'] / 1e6:,.1f} MB of images, stored "
         f"{totals['written'] / 1e6:,.1f} MB{note}")
    before = info.splits.get(split)
    class_counts = _class_counts(labels, info.classes) if labeled else None
    if class_counts and (absent := [c for c, n in class_counts.items() if n == 0]):
        # a folder of the dataset's classes missing here, or one whose every file was skipped
        _log(f"prepare: {split}: no images of class(es) {_few(absent)}"
             + ("; a model cannot learn a class it never sees" if split == "labeled" else ""))
    info.splits[split] = SplitInfo(
        shards=[str(p) for p in w.paths], count=count, shard_counts=list(w.counts),
        class_counts=class_counts,
        resized=None if max_short_side is None else {
            "max_short_side": max_short_side, "jpeg_quality": quality,
            "images": totals["resized"]})
    if split == "unlabeled" and info.unlabeled_truth is not None:
        _log(f"prepare: {info.unlabeled_truth.name} described the replaced unlabeled split; "
             "dropped from dataset.json")
        info.unlabeled_truth = None
    out.mkdir(parents=True, exist_ok=True)
    save_dataset(info)
    record.unlink(missing_ok=True)  # after dataset.json: a kill in between redoes the last shard
    if before is not None and (old := _unlisted(before.shards, info.splits[split].shards)):
        _log(f"prepare: {split}: the {len(old)} shards it listed before (e.g. {old[0]}) are "
             "no longer in dataset.json and were left where they are; delete them when no "
             "run needs them")
    return info


PROGRESS_SUFFIX = ".progress.json"


def _finished_part(record: Path | S3Path, folder: Path | S3Path, prefix: str,
                   files: int) -> dict[str, Any]:
    """What an interrupted run of the same prepare finished: its progress record, when it is
    readable and every shard it names is there; otherwise nothing (start from the beginning)."""
    nothing = {"shards": [], "consumed": 0, "bad": [], "resized": 0, "read": 0, "written": 0}
    if not record.exists():
        return nothing
    try:
        done = json.loads(record.read_text())
        shards = [int(c) for c in done["shards"]]
        consumed = int(done["consumed"])
        complete = all((folder / f"{prefix}-{i:06d}.tar").exists() for i in range(len(shards)))
        if complete and 0 <= consumed <= files:
            return {**nothing, **{k: done[k] for k in nothing}, "shards": shards,
                    "consumed": consumed}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        pass
    _log(f"prepare: {record} cannot be used (damaged, or its shards are gone); starting over")
    return nothing


# ----------------------------------------------------------------------------- registering


def _scan_job(path: str) -> tuple[int, Counter[int], int, np.ndarray, Damage]:
    """One shard for :func:`scan_shards`, in a worker: samples, labels, unlabeled samples, the
    keys' hashes (8 bytes each, not the keys) and the damage."""
    from pipeline.shards import key_hashes

    damage, labels, unlabeled, keys = Damage(), Counter(), 0, []
    for s in read_samples([path], damage):
        keys.append(s.key)
        if s.label is None:
            unlabeled += 1
        else:
            labels[s.label] += 1
    return len(keys), labels, unlabeled, key_hashes(keys), damage


# Shards per worker below which scanning in this process is quicker than starting a pool.
SHARDS_PER_WORKER = 8


def scan_shards(paths: list[str], split: str = "", workers: int | None = None
                ) -> tuple[int, Counter[int] | None, Damage, list[int]]:
    """Count samples (and labels, when every sample has one) in existing shards, read by
    ``workers`` processes (default one per CPU, at most one per :data:`SHARDS_PER_WORKER`
    shards). Damaged samples are counted, not fatal (the stages skip them too); a split that
    mixes labeled and unlabeled samples, or in which two shards share a key, is refused.
    Returns samples, labels, damage and the usable samples of each shard."""
    total, labels, unlabeled, damage = 0, Counter(), 0, Damage()
    per_shard: list[int] = []
    keys = KeyIndex(split)  # a key that two shards share is refused
    purity: list[float] = []  # per labeled shard: the share of its most common label
    workers = max(1, min(workers or default_workers(), len(paths) // SHARDS_PER_WORKER))
    if workers > 1:
        _log(f"register: {split}: reading {len(paths)} shards with {workers} processes")
    progress = _Rate(len(paths))
    results = _ordered_map(_scan_job, list(paths), workers)
    for n, (path, (count, shard_labels, shard_unlabeled, hashes, shard_damage)) in enumerate(
            zip(paths, results, strict=True), 1):
        total += count
        per_shard.append(count)
        unlabeled += shard_unlabeled
        keys.add_hashes(path, hashes)
        damage.merge(shard_damage)
        labels.update(shard_labels)
        if shard_labels:
            purity.append(max(shard_labels.values()) / shard_labels.total())
        if due := progress.due(n):
            _log(f"register: {split}: {n}/{len(paths)} shards read ({total} samples), "
                 f"{due[0]:.2f} shards/s, about {due[1]} left")
    keys.check(lambda shard: (s.key for s in read_shard(shard) if isinstance(s, Sample)))
    if labels and unlabeled and split != "unlabeled":  # an unlabeled pool may hold some labels
        raise DatasetError(f"{unlabeled} of {total} samples in {paths[0]}... have no label; a "
                           "labeled split needs a .cls or .json label on every sample")
    _warn_sorted(split, purity, labels)
    if damage.count:
        e = damage.examples[0]
        _log(f"register: {split}: {damage.count} damaged samples will be skipped (e.g. "
             f"{e['shard']}, key {e['key']!r}: {e['reason']})")
    return total, (labels if labels else None), damage, per_shard


def _warn_sorted(split: str, purity: list[float], labels: Counter[int]) -> None:
    """Shards written class by class: the typical shard holds far more of one class than the
    split does. Training streams read a shard at a time through a bounded shuffle buffer, so
    such shards give batches of one or two classes (a test split is read in order anyway)."""
    if split != "labeled" or len(purity) < 2 or len(labels) < 2:
        return
    typical = sorted(purity)[len(purity) // 2]
    overall = max(labels.values()) / labels.total()
    if typical - overall >= 0.3:
        _log(f"register: warning: {split}: its shards each hold mostly one class (the median "
             f"shard {typical:.0%} of one, the split {overall:.0%} of its largest); training "
             "reads a shard at a time through a bounded shuffle buffer, so batches would hold "
             "few classes: write the shards with the samples in a random order (`prepare "
             "imagefolder` does)")


def register_shards(out: str | Path | S3Path, *, labeled: str | list[str],
                    unlabeled: str | list[str], test: str | list[str],
                    classes: list[str] | None = None, workers: int | None = None) -> DatasetInfo:
    """Describe existing shards (paths, globs or brace patterns; local or s3://, globs on S3
    resolved by listing) without copying them. Every shard is read once to count it, by
    ``workers`` processes (:func:`scan_shards`)."""
    if classes and any(not c.strip() for c in classes):  # "a,,b" or "a,": load would refuse it
        raise DatasetError(f"--classes has an empty name (at position "
                           f"{[c.strip() for c in classes].index('') + 1} of {len(classes)}); "
                           "give each class a name, separated by commas")
    if classes and (twice := _named_twice(classes)):  # before reading any shard
        raise DatasetError(f"--classes names {', '.join(twice)} more than once; give each "
                           "class one name")
    out = location(out)
    info = DatasetInfo(path=out, name=out.name, classes=[])
    seen: dict[str, Counter[int] | None] = {}
    for split, spec in (("labeled", labeled), ("unlabeled", unlabeled), ("test", test)):
        if isinstance(spec, str) and not spec.strip():  # "" would name the working directory
            raise DatasetError(f"--{split} is empty; give shard paths, a glob or a brace "
                               "pattern")
        paths = [str(location(p).resolve()) for p in expand_shards(spec)]
        missing = [p for p in paths if not location(p).is_file()]
        if not paths:  # a glob that matched nothing (it said "no such shard ;")
            raise DatasetError(f"--{split} {spec!r}: the pattern matches no file; check the path "
                               "or pattern")
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise DatasetError(f"--{split} {spec!r}: no such shard {missing[0]}{more}; check the "
                               "path or pattern")
        count, labels, damage, per_shard = scan_shards(paths, split, workers)
        if count == 0:  # nothing a stage could use (damaged samples are not counted)
            why = (f"; e.g. {damage.examples[0]['shard']}, key {damage.examples[0]['key']!r}: "
                   f"{damage.examples[0]['reason']}" if damage.examples else "")
            raise DatasetError(f"--{split} {spec!r}: no usable sample in {len(paths)} shard(s)"
                               f"{why}")
        if split != "unlabeled" and labels is None:
            raise DatasetError(f"--{split} {spec!r}: samples carry no labels (.cls or .json)")
        seen[split] = labels if split != "unlabeled" else None
        info.splits[split] = SplitInfo(shards=paths, count=count, shard_counts=per_shard)
        _log(f"register: {split}: {count} samples in {len(paths)} shards")
    top = max(max(c) for c in seen.values() if c) + 1
    info.classes = classes or [str(i) for i in range(top)]
    if len(info.classes) < top:
        raise DatasetError(f"labels go up to {top - 1} but only {len(info.classes)} class names "
                           "were given")
    for split, labels in seen.items():
        if labels is not None:
            info.splits[split].class_counts = {name: int(labels.get(i, 0))
                                               for i, name in enumerate(info.classes)}
    _check_shard_lists(out / DATASET_FILE, info.splits)  # what load_dataset would refuse
    out.mkdir(parents=True, exist_ok=True)
    before = None
    with contextlib.suppress(DatasetError):  # what it replaces, to say so (unreadable: nothing)
        before = load_dataset(out) if (out / DATASET_FILE).exists() else None
    save_dataset(info)
    if before is not None and (before.splits != info.splits
                               or before.unlabeled_truth is not None):
        was = ", ".join(f"{k} {before.counts().get(k, 0)} -> {v}" for k, v in info.counts().items())
        lost = "; its held-out labels of the unlabeled split are dropped" \
            if before.unlabeled_truth is not None else ""
        _log(f"register: replaced the dataset.json that was in {out} ({was}){lost}")
    return info


__all__ = [
    "DATASET_FILE", "SPLITS", "DatasetError", "DatasetInfo", "ShardError", "SplitInfo",
    "default_workers", "load_dataset", "prepare_digits", "prepare_imagefolder", "register_shards",
]

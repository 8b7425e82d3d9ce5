"""WebDataset shards: writing (key, encoded image, optional label) and reading them back.

A sample in a shard is a group of tar members sharing a key: ``<key>.png`` (or jpg/jpeg/webp, and
when reading tif/tiff/bmp/gif too) and, when labeled, ``<key>.cls`` holding the class index as
text. Reading also accepts ``<key>.json`` with ``{"label": int}``, the other convention people
use; a ``.json`` without ``"label"`` is metadata (img2dataset writes url, caption, size) and the
sample is unlabeled. Shards written here are byte-identical
for the same input (fixed mtime, sorted members) and read back with both ``webdataset`` and
``ray.data.read_webdataset``.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import lzma
import os
import shutil
import tarfile
import tempfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import UserError
from pipeline.fs import S3Path, StorageError, is_remote, location

# What a sample's image member may be called; any of them is decoded by pipeline.images (PIL).
IMAGE_SUFFIXES = ("png", "jpg", "jpeg", "webp", "tif", "tiff", "bmp", "gif")
MAX_KEY_LENGTH = 90  # a plain (ustar) tar member name holds 100 bytes: the key, a dot, a suffix
LABEL_SUFFIXES = ("cls", "json")
FIXED_MTIME = 946684800.0  # 2000-01-01: any constant makes the output reproducible
MAX_BAD_EXAMPLES = 20  # per tally: enough to find the problem, bounded in size
TAIL_REASON = "damaged shard"  # how the reason of a shard's unreadable tail begins


class ShardError(UserError, ValueError):
    """A shard or a sample in it cannot be used; the message names the shard and key."""


@dataclass(frozen=True)
class Sample:
    key: str
    image: bytes  # encoded (png/jpeg/webp)
    label: int | None = None
    shard: str = ""
    image_format: str = "png"
    index: int = 0  # position in the shard

    @property
    def where(self) -> str:
        return f"shard {self.shard}, key {self.key}"

    def damaged(self, reason: str | BaseException) -> BadSample:
        """This sample as a BadSample; an error message that starts with :attr:`where` (as the
        decoder's do) loses that prefix, since a BadSample names shard and key itself."""
        text = str(reason)
        return BadSample(self.shard, self.key, self.index,
                         text.removeprefix(f"{self.where}: "))


@dataclass(frozen=True)
class BadSample:
    """A sample (or a shard's unreadable tail) that cannot be used, and why. ``lost``: how many
    samples it stands for in a tally; a tail stands for every sample from ``index`` on that
    ``dataset.json`` records (:func:`tail_loss`), one when that count is not known."""

    shard: str
    key: str
    index: int
    reason: str
    lost: int = 1

    @property
    def is_tail(self) -> bool:
        """Whether this stands for the unreadable rest of a shard (missing, truncated...)."""
        return self.reason.startswith(TAIL_REASON)

    @property
    def message(self) -> str:
        return f"shard {self.shard}, key {self.key}: {self.reason}"


# ----------------------------------------------------------------------------- writing


def check_key(key: str) -> None:
    """WebDataset splits a member name at its first dot, so a dotted key would break the sample."""
    if not key or "." in key or "/" in key:
        raise ShardError(
            f"sample key {key!r} cannot be used: keys must be non-empty and contain no '.' or '/' "
            "(WebDataset takes everything after the first dot as the file suffix); rename it, "
            "e.g. replace dots with '_'"
        )
    if len(key.encode()) > MAX_KEY_LENGTH:
        raise ShardError(f"sample key {key[:40]!r}... is {len(key.encode())} bytes long; keys "
                         f"may have at most {MAX_KEY_LENGTH} (tar member names)")


def encode_png(image: np.ndarray) -> bytes:
    """(H, W, 3) or (H, W) uint8 array -> PNG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


class ShardWriter:
    """Writes samples into ``<out_dir>/<prefix>-000000.tar`` ... with at most ``maxcount`` each.

    Files are written as ``*.tar.tmp`` and renamed when closed, so an interrupted write never
    leaves a shard that looks complete. To an ``s3://`` folder, each shard is written to a local
    temporary file and uploaded whole when closed (an object appears only once complete).
    """

    def __init__(self, out_dir: str | Path | S3Path, prefix: str = "shard",
                 maxcount: int = 1000, on_close: Callable[[], None] | None = None) -> None:
        """``on_close``: called each time a shard is complete and in place (to record progress)."""
        self.out_dir = location(out_dir)
        self.on_close = on_close
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._staging = (Path(tempfile.mkdtemp(prefix="ns-shards-"))
                         if isinstance(self.out_dir, S3Path) else None)
        self.prefix = prefix
        self.maxcount = maxcount
        self.paths: list[Path | S3Path] = []
        self.counts: list[int] = []
        self._tar: tarfile.TarFile | None = None
        self._tmp: Path | None = None
        self._seen: set[str] = set()

    def _open_next(self) -> None:
        self._close_current()
        path = self.out_dir / f"{self.prefix}-{len(self.paths):06d}.tar"
        self._tmp = (self._staging / (path.name + ".tmp") if self._staging is not None
                     else path.with_suffix(".tar.tmp"))
        self._tar = tarfile.open(  # noqa: SIM115 (closed in _close_current)
            self._tmp, "w", format=tarfile.USTAR_FORMAT)
        self.paths.append(path)
        self.counts.append(0)

    def _close_current(self) -> None:
        if self._tar is None:
            return
        tar, self._tar = self._tar, None
        try:
            tar.close()  # its last blocks: a full disk can fail here
            dest = self.paths[-1]
            if isinstance(dest, S3Path):
                dest.upload(self._tmp)
                self._tmp.unlink()
            else:
                os.replace(self._tmp, dest)
        except BaseException:  # leave no half-written shard behind, and do not count it
            self._tmp.unlink(missing_ok=True)
            self.paths.pop()
            self.counts.pop()
            raise
        if self.on_close is not None:
            self.on_close()

    def resume(self, counts: list[int], keys: set[str]) -> None:
        """Continue after ``len(counts)`` complete shards of this prefix, written before with
        these sample counts and keys: the next sample opens the shard after them."""
        if self.paths:
            raise ShardError("resume() must come before the first write")
        self.paths = [self.out_dir / f"{self.prefix}-{i:06d}.tar" for i in range(len(counts))]
        self.counts = list(counts)
        self._seen = set(keys)

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
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.close()
        elif self._tar is not None:  # leave no half-written shard behind
            try:
                with contextlib.suppress(OSError):  # a full disk fails the closing write too
                    self._tar.close()
            finally:
                self._tmp.unlink(missing_ok=True)
                self.paths.pop()
                self.counts.pop()
                self._tar = None
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)


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
    """Paths, globs and brace patterns (``data/train-{000000..000009}.tar``) -> paths, in order.

    Brace expansion is webdataset's own (the ``braceexpand`` package it depends on), so a pattern
    means the same here as in any WebDataset tool.
    """
    from braceexpand import UnbalancedBracesError, braceexpand

    specs = [str(spec)] if isinstance(spec, str | Path | S3Path) else [str(s) for s in spec]
    out: list[str] = []
    for s in specs:
        try:
            patterns = list(braceexpand(s))
        except UnbalancedBracesError:
            raise ShardError(f"{s}: its braces do not pair up; write a range as "
                             "name-{000000..000009}.tar, or escape a literal brace as \\{"
                             ) from None
        for expanded in patterns:
            if not glob.has_magic(expanded) or (not is_remote(expanded)
                                                and os.path.exists(expanded)):
                out.append(expanded)  # a path that exists is itself, brackets and all
            elif is_remote(expanded):
                out.extend(_glob_remote(expanded))
            else:  # ** spans folders, as it does on S3
                out.extend(sorted(glob.glob(expanded, recursive=True)))
    return out


def _glob_remote(pattern: str) -> list[str]:
    """An s3:// glob, resolved by listing the prefix before its first wildcard."""
    parts = pattern[len("s3://"):].split("/")
    fixed = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    if fixed == 0:
        raise ShardError(f"{pattern}: a bucket name cannot hold wildcards")
    base = S3Path("s3://" + "/".join(parts[:fixed]))
    return [str(p) for p in base.glob("/".join(parts[fixed:]))]


def read_shard(path: str | Path) -> Iterator[Sample | BadSample]:
    """Every sample of one tar, in order, as a :class:`Sample` or a :class:`BadSample`; never raises.

    The one place where tar members become samples, for every stage. Members are grouped by key
    (the member name up to the first dot of its base name, as WebDataset does), suffixes
    lowercased. A sample without an image, with an unreadable label, or with a key already seen in
    the shard is a BadSample. A damaged tar (unreadable, truncated data or header, no
    end-of-archive marker) ends with one BadSample for its unreadable tail, keyed by the sample
    being read (empty when none); that sample is dropped, since its members may be incomplete.
    Python's ``tarfile`` would end quietly at a truncated header, and webdataset's reader raises
    or drops the rest of the shard silently; here the loss is always reported.
    """
    shard = str(path)
    index, seen = 0, set()
    current: dict[str, bytes] | None = None
    current_key = ""

    def emit() -> Sample | BadSample:
        nonlocal index
        sample = _sample(shard, index, current_key, current, seen)
        seen.add(current_key)
        index += 1
        return sample

    try:
        with location(path).open("rb") as f, tarfile.open(fileobj=f, mode="r:*") as tar:
            for member in tar:
                key, suffix = _split_member(member)
                if key is None:
                    continue
                data = tar.extractfile(member).read()
                if len(data) != member.size:
                    raise tarfile.ReadError("unexpected end of data")
                if current is not None and current_key != key:
                    yield emit()
                    current = None
                if current is None:
                    current, current_key = {}, key
                current[suffix] = data
            _check_end_marker(tar)
    except StorageError:
        raise  # credentials or endpoint: not the shard's fault, and no sample can be read
    except (OSError, EOFError, tarfile.TarError, ValueError, zlib.error, lzma.LZMAError) as e:
        # (a damaged .tar.gz / .tar.xz, which tarfile's "r:*" opens, fails in its decompressor)
        lost = current_key if current is not None else ""
        detail = " ".join(str(e).split())  # tarfile's messages span lines
        yield BadSample(shard, lost, index, f"{TAIL_REASON} ({type(e).__name__}: {detail}); "
                        f"the samples after the first {index} could not be read")
        return
    if current is not None:
        yield emit()


def tail_loss(s: BadSample, recorded: int | None, first: int = 0,
              end: int | None = None) -> BadSample:
    """``s`` as a tally counts it: a shard's unreadable tail stands for the samples of the run
    ``[first, end)`` (``end`` None: to the shard's ``recorded`` count) from ``s.index`` on,
    so that a shard torn after 10 of its 100 samples counts 90 against the damage limit, not 1.
    Another sample, or a tail whose run's end is not known, counts one."""
    stop = recorded if end is None else end
    if not s.is_tail or stop is None:
        return s
    return replace(s, lost=max(1, stop - max(s.index, first)))


def _split_member(member: tarfile.TarInfo) -> tuple[str | None, str]:
    if not member.isfile():
        return None, ""
    base = os.path.basename(member.name)
    if "." not in base:
        return None, ""
    key, suffix = base.split(".", 1)
    return os.path.join(os.path.dirname(member.name), key), suffix.lower()


def _check_end_marker(tar: tarfile.TarFile) -> None:
    """tarfile ends quietly at a truncated header; a complete archive ends with a zero block."""
    tar.fileobj.seek(tar.offset)
    block = tar.fileobj.read(tarfile.BLOCKSIZE)
    if len(block) < tarfile.BLOCKSIZE or block.strip(b"\0"):
        raise tarfile.ReadError("truncated: no end-of-archive marker")


def _sample(shard: str, index: int, key: str, members: Mapping[str, Any],
            seen: set[str] | frozenset[str] = frozenset()) -> Sample | BadSample:
    if key in seen:
        return BadSample(shard, key, index, "duplicate key in shard (members of a sample not "
                         "adjacent?)")
    fmt = next((f for f in IMAGE_SUFFIXES if members.get(f)), None)
    if fmt is None:
        found = sorted(k for k in members if not k.startswith("__")) or "nothing"
        return BadSample(shard, key, index,
                         f"sample has no image (found {found}; expected one of "
                         f"{', '.join(IMAGE_SUFFIXES)})")
    try:
        label = _label(members)
    except ValueError as e:
        return BadSample(shard, key, index, str(e))
    return Sample(key=key, image=bytes(members[fmt]), label=label, shard=shard,
                  image_format=fmt, index=index)


def _label(members: Mapping[str, Any]) -> int | None:
    """The label of a sample's members (``.cls`` text or ``.json`` {"label": int}), or None.
    A class index is never negative."""
    label = _raw_label(members)
    if label is not None and label < 0:
        raise ValueError(f"label {label} is negative; class indices start at 0")
    return label


def _raw_label(members: Mapping[str, Any]) -> int | None:
    if members.get("cls") is not None:
        raw = members["cls"]
        text = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
        try:
            return int(text.strip())
        except ValueError:
            raise ValueError(f"label in .cls is not an integer: {text[:20]!r}") from None
    if members.get("json") is not None:
        raw = members["json"]
        try:
            meta = json.loads(raw) if isinstance(raw, bytes | str) else raw
        except ValueError:
            raise ValueError(".json is not valid JSON") from None
        # Metadata without a label (img2dataset writes url, caption, size...): an unlabeled sample
        label = meta.get("label") if isinstance(meta, dict) else None
        if label is None:
            return None
        if isinstance(label, str) and label.strip().lstrip("-").isdigit():
            return int(label)  # "3": some writers store every field as text
        if isinstance(label, bool) or not isinstance(label, int):
            raise ValueError(f'"label" in .json is not an integer: {str(label)[:20]!r}')
        return label
    return None


def to_sample(raw: Mapping[str, Any]) -> Sample:
    """A row of ``ray.data.read_webdataset`` or ``webdataset`` (``__key__``, ``__url__``, suffix
    -> bytes) as a Sample, with the same rules as :func:`read_shard`; raises ShardError."""
    members = {k.lower(): v for k, v in raw.items() if not k.startswith("__")}
    s = _sample(str(raw.get("__url__", "?")), 0, str(raw.get("__key__", "?")), members)
    if isinstance(s, BadSample):
        raise ShardError(s.message)
    return s


def read_samples(paths: Iterable[str | Path], damage: Damage | None = None) -> Iterator[Sample]:
    """The samples of ``paths`` in order. Bad samples are counted in ``damage`` and skipped, or,
    without a tally, raise ShardError (tools and tests that want the first problem)."""
    for path in paths:
        for s in read_shard(path):
            if isinstance(s, Sample):
                if damage is not None:
                    damage.ok()
                yield s
            elif damage is None:
                raise ShardError(s.message)
            else:
                damage.bad(s)


# ----------------------------------------------------------------------------- damage


class Damage:
    """A tally of good and skipped samples, per shard, with a bounded list of examples.

    Every stage follows one policy: a damaged sample (or a shard's unreadable tail) is skipped and
    counted here; the count goes into the stage's manifest entry, and :meth:`check` stops a labeled
    or test split whose damaged share exceeds the limit, naming the worst shard.
    """

    def __init__(self) -> None:
        self.good = 0
        self.by_shard: Counter[str] = Counter()
        self.examples: list[dict[str, str]] = []

    @property
    def count(self) -> int:
        return sum(self.by_shard.values())

    def ok(self, n: int = 1) -> None:
        self.good += n

    def bad(self, sample: BadSample) -> None:
        self.by_shard[sample.shard] += sample.lost
        if len(self.examples) < MAX_BAD_EXAMPLES:
            self.examples.append({"shard": sample.shard, "key": sample.key,
                                  "reason": sample.reason})

    def fraction(self) -> float:
        return self.count / max(1, self.count + self.good)

    def check(self, split: str, limit: float, total: int | None = None) -> None:
        """Raise ShardError when more than ``limit`` of the samples seen were damaged. With
        ``total`` (the whole split's samples, for a tally of part of it: one reader's share), when
        these damaged samples alone are more than ``limit`` of the split: a share is not
        judged as if it were the split (damage in one shard would stop many readers' rounds)."""
        whole = self.count + self.good if total is None else max(total, self.count)
        if not self.count or self.count / max(1, whole) <= limit:
            return
        shard, n = self.by_shard.most_common(1)[0]
        first = next((e for e in self.examples if e["shard"] == shard), self.examples[0])
        raise ShardError(
            f"{split} split: {self.count} of {whole} samples are damaged "
            f"({self.count / whole:.1%} > --damage-limit {limit:g}); worst shard {shard} "
            f"({n} bad, e.g. key {first['key']!r}: {first['reason']}); repair or remove it "
            "from dataset.json, or raise --damage-limit")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Damage:
        """A tally as :meth:`to_dict` (with ``by_shard``) wrote it."""
        out = cls()
        out.by_shard.update(d.get("by_shard") or {})
        out.good = int(d["samples"]) - out.count
        out.examples = list(d.get("examples") or [])
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"samples": self.good + self.count, "bad": self.count,
                "examples": list(self.examples)}

    def merge(self, other: Damage) -> None:
        """Add another tally (of other shards, e.g. counted in another process)."""
        self.good += other.good
        self.by_shard.update(other.by_shard)
        self.examples += other.examples[: MAX_BAD_EXAMPLES - len(self.examples)]


# ----------------------------------------------------------------------------- keys across shards


def key_hashes(keys: Sequence[str] | np.ndarray) -> np.ndarray:
    """(N,) uint64 hashes of sample keys: pandas' SipHash of the text with its fixed key, so the
    same key has the same hash in every process."""
    import pandas as pd

    return pd.util.hash_array(np.asarray(keys, dtype=object), categorize=False)


class KeyIndex:
    """Finds a sample key that two shards of one split share, at 8 bytes a key.

    Pseudo-labels, test predictions and the report join rows on the key, so a split's keys must be
    unique (a shard's own duplicates are already damaged samples, :func:`read_shard`). Callers
    :meth:`add` every shard's keys during a pass that reads them anyway; :meth:`check` sorts the
    64-bit hashes in place (numpy) and only when two are equal reads the keys of the shards again
    (``keys_of``) to name the key and both shards. Two different keys with one hash (odds about
    n^2 / 2^65: 3e-4 at 1e8 keys) are told apart by that second read and pass. Memory is the hash
    array, 8 bytes a key (``expected`` sizes it once; without it, it grows by doubling).
    """

    def __init__(self, split: str, expected: int = 0) -> None:
        self.split = split
        self._hashes = np.empty(max(0, int(expected)), np.uint64)
        self._n = 0
        self.shards: list[str] = []

    def add(self, shard: str, keys: Sequence[str] | np.ndarray) -> None:
        """The keys of one shard (each shard once)."""
        self.add_hashes(shard, key_hashes(keys))

    def add_hashes(self, shard: str, h: np.ndarray) -> None:
        """:meth:`add` with the keys' :func:`key_hashes` computed elsewhere (another process)."""
        end = self._n + len(h)
        if end > len(self._hashes):
            grown = np.empty(max(end, 2 * len(self._hashes), 1024), np.uint64)
            grown[: self._n] = self._hashes[: self._n]
            self._hashes = grown
        self._hashes[self._n : end] = h
        self._n = end
        self.shards.append(shard)

    def check(self, keys_of: Callable[[str], Iterable[str]]) -> None:
        """Raise ShardError naming a key found in two shards; ``keys_of(shard)`` reads a shard's
        keys again, and is called only when two hashes are equal."""
        h = self._hashes[: self._n]
        h.sort()
        same = h[1:] == h[:-1]
        if not same.any():
            return
        suspects = set(np.unique(h[1:][same]).tolist())
        first: dict[str, str] = {}  # key -> the shard it was first seen in
        for shard in self.shards:
            keys = list(keys_of(shard))
            hit = np.isin(key_hashes(keys), list(suspects)) if keys else []
            for key, suspect in zip(keys, hit, strict=True):
                if not suspect:
                    continue
                if key in first:
                    raise ShardError(duplicate_key_message(self.split, key, first[key], shard))
                first[key] = shard
        # only hash collisions of different keys: nothing to report


def duplicate_key_message(split: str, key: str, a: str, b: str) -> str:
    if a == b:
        return (f"{split} split: shard {a} is listed twice (key {key!r} is in both copies); "
                "remove the repeated entry from dataset.json")
    return (f"{split} split: sample key {key!r} is in two shards, {a} and {b}; keys must be "
            "unique within a split (pseudo-labels, predictions and reports are joined on them): "
            "remove the shard that repeats samples from dataset.json, or give its samples other "
            "keys (e.g. prefixed with the shard name) and register the shards again")

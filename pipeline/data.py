"""Data streams for training workers: WebDataset shards -> (image, target) batches.

Why streams look the way they do:

* DDP hangs when ranks run different numbers of steps. Training streams are endless (they cycle
  through their shards, reshuffled each pass) and the loop takes exactly ``steps_per_epoch``
  batches from each, so every rank steps the same number of times however shards divide.
* Every rank and every DataLoader worker gets a non-empty share of the shards
  (:func:`assign_shards`); with fewer shards than readers, shares wrap around rather than leaving
  a reader with nothing (which would block forever on an endless stream). For the same reason
  the pseudo-labeled stream is dealt only shards with a selected row
  (:func:`pipeline.pseudo_files.shards_with_selection`), and a labeled reader whose shards give
  no usable sample in a whole pass stops with a ShardError naming them.
* Readers take samples at the same rate, so the pseudo-labeled shards are dealt balanced by
  their copies (:func:`balanced`), not round-robin: otherwise a reader dealt lightly selected
  shards repeats its few samples more often than the others. Labeled shards are dealt by their
  sample counts when ``dataset.json`` records them (``shard_counts``). Whole shards cannot
  always be split evenly (3 shards over 2 readers, 10 over 16): where they cannot (a spread of
  :data:`EVEN_ENOUGH` or more), a training stream whose counts are known cuts the split into
  equal runs of samples instead (:func:`sample_ranges`; the pseudo-labeled stream's samples
  are its selected copies): readers share a shard, each reading it and keeping its own run.
  :func:`sampling_spread` measures what is left, which the driver reports.
* Evaluation streams are finite and disjoint (each sample is seen exactly once across ranks);
  metrics are summed across ranks afterwards.
* Pseudo-labels are joined to images by key, one shard at a time: a worker holds at most one
  shard's labels in memory.
* Damage: shards are read by :func:`pipeline.shards.read_shard` and images decoded by
  :func:`pipeline.images.decode_image`, as in every other stage. A damaged sample is skipped and
  counted; after a stream's first pass over its shards, damage past ``damage_limit`` of the
  whole labeled or test split (``split_count``) stops the job, naming the worst shard. A
  reader's part is not judged as if it were the split: a training reader adds the tallies the
  others have recorded so far (the last to finish sees them all), and without ``split_count``
  (tests, in-process use) its own part is the split.
* Decoded cache: a training stream whose share of the split fits in ``cache_bytes`` keeps its
  images decoded after the first pass (:class:`DecodedCache`) and replays them from memory, so
  a small labeled set (or a small pseudo-labeled one) is read and decoded once per job, not once
  per epoch. The replay yields the same samples in the same order as reading again would (the
  shuffles draw the same numbers), so a run gives the same result with or without it. A share
  that does not fit is streamed as before, and the memory is given back at once.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.fs import S3Path, location
from pipeline.images import decode_image
from pipeline.pseudo_files import PseudoFileError, pseudo_file_names, read_selected
from pipeline.shards import BadSample, Damage, Sample, ShardError, read_shard, tail_loss

Transform = Callable[[torch.Tensor], torch.Tensor]
T = TypeVar("T")

_END_OF_PASS = object()  # marks where a training stream's pass over its shards ends


def assign_shards(shards: list[str], reader: int, num_readers: int, *,
                  exhaustive: bool, weights: list[int] | None = None) -> list[str]:
    """Shards of reader ``reader`` out of ``num_readers`` (rank x loader worker).

    ``exhaustive`` (evaluation): a strict partition; a reader may get nothing. Otherwise
    (training): round-robin, wrapping so that no reader is left without a shard. With
    ``weights`` (samples per shard), a partition balanced by weight instead (:func:`balanced`).
    """
    if not shards:
        raise ValueError("no shards to read")
    if weights is not None:
        mine = balanced(shards, weights, num_readers)[reader]
    else:
        mine = shards[reader::num_readers]
    if mine or exhaustive:
        return mine
    return [shards[reader % len(shards)]]


def balanced(shards: Sequence[T], weights: list[int], num_readers: int) -> list[list[T]]:
    """``shards`` split into ``num_readers`` parts of near-equal total weight, each in the
    shards' order; the same on every reader (it depends on nothing else).

    Why: every reader of a training stream gives the same number of samples per step, so a
    sample's share of the steps is inversely proportional to its reader's total. Round-robin
    by position evens out the number of shards, not what they hold: selection keeps from 0 to
    every row of a shard, and a reader dealt light shards would repeat its samples more often.
    Heaviest first onto the lightest part (within 4/3 of the best split; ties by index).
    """
    import heapq

    if len(weights) != len(shards):
        raise ValueError(f"{len(weights)} weights for {len(shards)} shards")
    parts: list[list[int]] = [[] for _ in range(num_readers)]
    loads = [(0, r) for r in range(num_readers)]
    for i in sorted(range(len(shards)), key=lambda i: (-weights[i], i)):
        load, r = heapq.heappop(loads)
        parts[r].append(i)
        heapq.heappush(loads, (load + weights[i], r))
    return [[shards[i] for i in sorted(part)] for part in parts]


def sampling_spread(weights: list[int], readers: int, cut: bool = False) -> float:
    """How unevenly a training stream draws its samples: the rate at which the most often drawn
    sample comes up over that of the least often drawn one (1.0: all alike), for shards of
    ``weights`` samples dealt to ``readers`` readers as :func:`assign_shards` deals them, each
    reader giving the same number of samples a step. Shards of weight 0 are left out.
    ``cut``: the stream cuts the shards into runs of samples where :func:`cuts_shards` says
    so (both training streams do)."""
    if not weights or readers < 1:
        return 1.0
    if cut and cuts_shards(weights, readers):
        runs = [sum((weights[i] if end is None else end) - first for i, first, end in part)
                for part in sample_ranges(range(len(weights)), weights, readers)]
        return max(runs) / min(runs)
    return _whole_shard_spread(weights, readers)


def _whole_shard_spread(weights: list[int], readers: int) -> float:
    rate = [0.0] * len(weights)
    for r, part in enumerate(balanced(range(len(weights)), weights, readers)):
        mine = part or [r % len(weights)]  # the wrap of assign_shards
        total = sum(weights[i] for i in mine)
        for i in mine:
            rate[i] += 1 / total if total else 0.0
    drawn = [x for x, w in zip(rate, weights, strict=True) if w > 0]
    return max(drawn) / min(drawn) if drawn else 1.0


#: The spread (:func:`sampling_spread`) from which whole shards count as unevenly dealt: 3
#: shards over 2 readers give 2.0, 65 over 16 give 1.25 (one reader holds 5, the rest 4).
EVEN_ENOUGH = 1.25


def cuts_shards(weights: list[int] | None, readers: int) -> bool:
    """Whether a training stream reads runs of samples (:func:`sample_ranges`) rather than
    whole shards: the samples (the pseudo-labeled stream: selected copies) per shard are known,
    whole shards deal unevenly, and there are at least as many samples as readers (each gets
    one)."""
    return (weights is not None and readers > 1 and sum(weights) >= readers
            and _whole_shard_spread(weights, readers) >= EVEN_ENOUGH)


def sample_ranges(shards: Sequence[T], weights: list[int], num_readers: int
                  ) -> list[list[tuple[T, int, int | None]]]:
    """The split as one line of samples (shards in order, ``weights`` samples each) cut into
    ``num_readers`` runs of equal length (within one): per reader, ``(shard, first, end)``
    with sample positions in the shard, ``end`` None for "to the shard's end" on the run that
    holds a shard's last counted sample (so samples past a stale count are still read)."""
    if len(weights) != len(shards):
        raise ValueError(f"{len(weights)} weights for {len(shards)} shards")
    total = sum(weights)
    bounds = [round(r * total / num_readers) for r in range(num_readers + 1)]
    parts: list[list[tuple[T, int, int | None]]] = [[] for _ in range(num_readers)]
    start = 0
    for shard, w in zip(shards, weights, strict=True):
        for r in range(num_readers):
            lo, hi = max(start, bounds[r]), min(start + w, bounds[r + 1])
            if lo < hi:
                parts[r].append((shard, lo - start, None if hi == start + w else hi - start))
        start += w
    return parts


def _reader_index(rank: int, world_size: int) -> tuple[int, int]:
    info = get_worker_info()
    workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
    return rank * workers + worker, world_size * workers


@dataclass(frozen=True)
class Decoded(Sample):
    """A sample as the decoded cache keeps it: the image decoded (``pixels``), or why it did not
    decode (``error``); the encoded bytes are dropped."""

    pixels: torch.Tensor | None = None
    error: str = ""


def decode_sample(s: Sample, min_side: int | None = None) -> Decoded:
    """``s`` decoded once, as the cache keeps it (a decode error is kept, not raised);
    ``min_side`` as in :func:`pipeline.images.decode_image`."""
    try:
        pixels, error = decode_image(s.image, s.where, min_side), ""
    except ShardError as e:
        pixels, error = None, str(e)
    return Decoded(s.key, b"", s.label, s.shard, s.image_format, s.index, pixels, error)


class DecodedCache:
    """One training stream's shards, decoded, kept for the passes after the first (module doc).

    Each shard's entries are what reading it yields, in order: damaged samples and decoded ones.
    All or nothing: the first shard that would take the stream past ``budget`` bytes ends the
    caching for good and drops what was kept, since a share that only partly fits would hold
    the memory for a small saving.
    """

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.used = 0
        self.shards: dict[str, list[Any]] = {}
        self.full = budget <= 0

    def add(self, shard: str, entries: list[Any], nbytes: int) -> None:
        if self.full:
            return
        if self.used + nbytes > self.budget:
            self.full, self.shards, self.used = True, {}, 0
            return
        self.shards[shard] = entries
        self.used += nbytes


def _nbytes(entry: Any) -> int:
    pixels = getattr(entry, "pixels", None)
    return 200 + (pixels.nbytes if pixels is not None else 0)  # + the record's own overhead


Part = tuple[str, int, "int | None"]  # a shard's samples from first to end (None: all the rest)


def _samples(shards: Sequence[str | Part], damage: Damage, cache: DecodedCache | None = None,
             min_side: int | None = None, counts: Mapping[str, int] | None = None
             ) -> Iterator[Sample]:
    """The readable samples of ``shards`` (paths, or :data:`Part` runs of their samples) in
    order; the rest counted in ``damage``. With a cache that has room, the samples come decoded
    and each shard read whole is kept; a shard it holds is replayed from memory. ``counts``
    (each shard's samples, as dataset.json records them) size an unreadable tail's loss: each
    reader counts the samples of its own run that the tear took (:func:`tail_loss`)."""
    for item in shards:
        shard, first, end = (item, 0, None) if isinstance(item, str) else item
        kept = cache.shards.get(shard) if cache is not None else None
        if kept is not None:
            for s in kept:
                if isinstance(s, BadSample):
                    damage.bad(s)
                else:
                    yield s
            continue
        entries: list[Any] | None = [] if cache is not None and not cache.full else None
        for s in read_shard(shard):
            if end is not None and s.index >= end:
                break  # the rest of the shard is another reader's run
            tail = isinstance(s, BadSample) and s.is_tail
            if s.index < first and not tail:
                continue  # another reader's; a tear before this run takes this run too
            if tail:
                s = tail_loss(s, counts.get(shard) if counts else None, first, end)
            if entries is not None and not isinstance(s, BadSample):
                s = decode_sample(s, min_side)
            if entries is not None:
                entries.append(s)
            if isinstance(s, BadSample):
                damage.bad(s)
            else:
                yield s
        if cache is not None and entries is not None:
            cache.add(shard, entries, sum(_nbytes(e) for e in entries))


def _decoded(s: Sample, damage: Damage, min_side: int | None = None) -> torch.Tensor | None:
    """The sample's image as a (3, H, W) uint8 tensor, or None (counted) when it does not decode."""
    # a cached sample is decoded already (with the min_side of the stream that cached it)
    d = s if isinstance(s, Decoded) else decode_sample(s, min_side)
    if d.pixels is None:
        damage.bad(d.damaged(d.error))
        return None
    damage.ok()
    return d.pixels


def _shuffled(items: Iterator[Any], buffer: int, rng: random.Random) -> Iterator[Any]:
    """Reservoir-style shuffle buffer (bounded memory)."""
    if buffer <= 1:
        yield from items
        return
    buf: list[Any] = []
    for item in items:
        if len(buf) < buffer:
            buf.append(item)
            continue
        i = rng.randrange(len(buf))
        yield buf[i]
        buf[i] = item
    rng.shuffle(buf)
    yield from buf


class LabeledStream(IterableDataset):
    """Endless (train) or single-pass (eval) stream of ``(image, label, key)`` from shards.

    Samples without a label, or with one outside ``[0, num_classes)`` when ``num_classes`` is
    given, count as damaged like undecodable ones. ``decode_min_side``: how small the transform
    lets the shorter side be (:func:`pipeline.transforms.eval_min_side`,
    :func:`pipeline.transforms.train_min_side`); large JPEGs are then decoded reduced
    (:func:`pipeline.images.decode_image`); None decodes in full.
    """

    def __init__(self, shards: list[str], transform: Transform, *, rank: int = 0,
                 world_size: int = 1, train: bool = True, shuffle_buffer: int = 1000,
                 seed: int = 0, num_classes: int | None = None, damage_limit: float = 1.0,
                 split: str = "labeled", damage_dir: str | None = None,
                 cache_bytes: int = 0, decode_min_side: int | None = None,
                 weights: list[int] | None = None, split_count: int | None = None) -> None:
        self.shards, self.transform = list(shards), transform
        # the whole split's samples (dataset.json): the damage limit is a share of the split,
        # not of one reader's part of it
        self.split_count = split_count
        # samples per shard (dataset.json's shard_counts): training deals the shards balanced
        # by them, as the pseudo-labeled stream deals its shards by copies, and every stream
        # counts a torn shard's lost samples from them
        self.weights = list(weights) if weights is not None else None
        self.decode_min_side = decode_min_side
        self.rank, self.world_size, self.train = rank, world_size, train
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self.num_classes, self.damage_limit, self.split = num_classes, damage_limit, split
        self.damage_dir = damage_dir  # where a training stream records its first pass's tally
        self.cache_bytes = cache_bytes  # a training stream's decoded cache (module doc); 0 = off

    def _raw(self, mine: list[str] | list[Part], rng: random.Random
             ) -> Iterator[Sample | object]:
        counts = dict(zip(self.shards, self.weights, strict=True)) if self.weights else None
        if not self.train:
            yield from _samples(mine, self._damage, min_side=self.decode_min_side, counts=counts)
            return
        cache = DecodedCache(self.cache_bytes) if self.cache_bytes > 0 else None
        while True:  # endless: the training loop decides where an epoch ends
            order = mine[:]
            rng.shuffle(order)
            yield from _shuffled(_samples(order, self._damage, cache, self.decode_min_side,
                                          counts), self.shuffle_buffer, rng)
            yield _END_OF_PASS

    def _label_problem(self, label: int | None) -> str:
        if label is None:
            return f"sample of the {self.split} split has no label"
        if self.num_classes is not None and not 0 <= label < self.num_classes:
            return f"label {label} is not one of the dataset's {self.num_classes} classes"
        return ""

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int, str]]:
        reader, readers = _reader_index(self.rank, self.world_size)
        mine: list[str] | list[Part]
        if self.train and cuts_shards(self.weights, readers):  # whole shards deal unevenly
            mine = sample_ranges(self.shards, self.weights, readers)[reader]
        else:
            mine = assign_shards(self.shards, reader, readers, exhaustive=not self.train,
                                 weights=self.weights if self.train else None)
        named = [p if isinstance(p, str) else _part_name(p) for p in mine]
        rng = random.Random(self.seed * 1_000_003 + reader)
        if self.train:  # augmentation randomness; an evaluation stream has none to seed, and
            # reseeding there would replay the trainer's dropout draws after every evaluation
            # when it runs in the training process (loader_workers 0)
            torch.manual_seed(self.seed * 1_000_003 + reader)
        self._damage = Damage()
        first_pass, produced = True, 0
        for s in self._raw(mine, rng):
            if s is _END_OF_PASS:  # each pass meets the same damage: check the first's
                if first_pass:
                    if self.damage_dir is not None:
                        _record_damage(self.damage_dir, reader, readers, named, self._damage)
                    self._split_damage(readers).check(self.split, self.damage_limit,
                                                      self.split_count)
                first_pass = False
                if produced == 0:  # an endless stream with nothing in it would hang its rank
                    raise ShardError(
                        f"{self.split} split: shard(s) {', '.join(named[:3])} gave this reader "
                        f"no usable sample ({self._damage.count} damaged); remove empty or "
                        "broken shards from dataset.json")
                self._damage, produced = Damage(), 0
                continue
            problem = self._label_problem(s.label)
            if problem:
                self._damage.bad(s.damaged(problem))
                continue
            image = _decoded(s, self._damage, self.decode_min_side)
            if image is not None:
                produced += 1
                yield self.transform(image), s.label, s.key
        self._damage.check(self.split, self.damage_limit, self.split_count)

    def _split_damage(self, readers: int) -> Damage:
        """What is known of the split's damage after this reader's first pass: the tallies this
        attempt's readers have recorded so far, or its own. Only a reader that met damage reads
        them: the last such reader to finish (each records before it reads) sees every damaged
        sample there is, and the limit counts damaged samples against the split's size, so the
        others would add nothing (and every reader reading every tally is R^2 reads)."""
        if self.damage_dir is None or self.split_count is None or not self._damage.count:
            return self._damage
        return merged_tally(self.damage_dir, readers) or self._damage


def _part_name(part: Part) -> str:
    """``shard[first:end]``, as a reader's share is named in messages and damage records."""
    shard, first, end = part
    return f"{shard}[{first}:{'' if end is None else end}]"


def _record_damage(folder: str, reader: int, readers: int, shards: list[str],
                   damage: Damage) -> None:
    """One reader's first-pass tally, for the driver to merge (:func:`merge_damage`). Reader 0
    removes those of readers an earlier attempt had beyond this one's ``readers``."""
    from pipeline.storage import atomic_write_json, remove_numbered_beyond

    if reader == 0:
        remove_numbered_beyond(folder, "reader-", ".json", readers)
    atomic_write_json(location(folder) / f"reader-{reader:05d}.json",
                      {"shards": shards, "readers": readers, **damage.to_dict(),
                       "by_shard": dict(damage.by_shard)})


def merge_damage(folder: str | Path | S3Path, readers: int | None = None
                 ) -> dict[str, Any] | None:
    """The training streams' tallies of one split: samples, bad and examples, each reader's share
    counted once (readers that wrapped around onto the same shards report them twice). None when
    no reader finished a pass over its shards. ``readers``: only tallies recorded by an attempt
    with that many readers (an earlier one's dealt other shares)."""
    merged = merged_tally(folder, readers)
    return None if merged is None else merged.to_dict()


def merged_tally(folder: str | Path | S3Path, readers: int | None = None) -> Damage | None:
    """:func:`merge_damage` as a :class:`~pipeline.shards.Damage` (counts per shard kept)."""
    tallies = {}
    for path in sorted(location(folder).glob("reader-*.json")):
        try:
            t = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):  # removed since it was listed
            continue
        if readers is None or t.get("readers") == readers:
            tallies[tuple(t["shards"])] = t
    if not tallies:
        return None
    merged = Damage()
    for t in tallies.values():
        merged.merge(Damage.from_dict(t))
    return merged


class PseudoStream(IterableDataset):
    """Endless stream of ``(image, soft target)`` from unlabeled shards and their pseudo-labels.

    Each unlabeled shard ``<stem>.tar`` has ``<pseudo_dir>/<stem>.parquet`` with a ``copies``
    column; a sample appears ``copies`` times per pass (0 = not selected), each time freshly
    augmented, and its target is built from the stored top-k probabilities. ``names``: each
    shard's file name as labeling gave it, from the whole split
    (:func:`pipeline.pseudo_files.pseudo_file_names`); by default made from ``shards``.
    """

    def __init__(self, shards: list[str], pseudo_dir: str, transform: Transform, *,
                 num_classes: int, temperature: float, rank: int = 0, world_size: int = 1,
                 shuffle_buffer: int = 1000, seed: int = 0, cache_bytes: int = 0,
                 weights: list[int] | None = None, decode_min_side: int | None = None,
                 names: dict[str, str] | None = None) -> None:
        self.shards, self.pseudo_dir, self.transform = list(shards), pseudo_dir, transform
        self.decode_min_side = decode_min_side  # as LabeledStream's
        self.weights = list(weights) if weights is not None else None  # copies per shard
        self.num_classes, self.temperature = num_classes, temperature
        self.rank, self.world_size = rank, world_size
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self.cache_bytes = cache_bytes
        # File names come from the whole unlabeled split (pseudo_file_names hashes stems that
        # collide there); ``shards`` may be a subset, where they no longer collide.
        self._names = dict(names) if names is not None else pseudo_file_names(self.shards)

    def _labels_of(self, shard: str) -> dict[str, tuple[int, np.ndarray, np.ndarray]]:
        path = location(self.pseudo_dir) / self._names[shard]
        import pyarrow as pa

        try:
            return read_selected(path)
        # The student trains on these files: one gone or damaged since cannot be made again
        # here (labels made again could differ in the last bits on other devices, and move the
        # selection under the checkpoint). A storage error (refused, unreachable) or a disk's
        # own error passes as it is: the file may be fine.
        except FileNotFoundError:
            raise PseudoFileError(f"pseudo-label file {path} is gone since the student started "
                                  "training on it; restore it, or pass --force to start the "
                                  "round over") from None
        except (pa.ArrowException, KeyError) as e:  # damaged: rerunning would fail the same way
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise PseudoFileError(
                f"pseudo-label file {path} cannot be read ({first}); it changed after the "
                "student started training on it: restore it, or pass --force to start the "
                "round over") from None

    def _repeated(self, shards: Sequence[str | Part], cache: DecodedCache | None = None
                  ) -> Iterator[tuple[Sample, np.ndarray, np.ndarray]]:
        """Each selected sample ``copies`` times, shard by shard; with a cache that has room, the
        selected samples of a shard read whole are kept decoded with their labels. A
        :data:`Part` counts positions in the shard's line of copies (each selected sample's
        copies in turn, in the shard's order) and keeps those from ``first`` to ``end``."""
        damage = Damage()  # pseudo-labeling skipped (and recorded) these samples already
        for item in shards:
            shard, first, end = (item, 0, None) if isinstance(item, str) else item
            kept = cache.shards.get(shard) if cache is not None else None
            if kept is not None:
                for s, copies, idx, prob in kept:
                    for _ in range(copies):
                        yield s, idx, prob
                continue
            entries: list[Any] | None = [] if cache is not None and not cache.full else None
            labels = self._labels_of(shard)
            position = 0  # copies of this shard before the current sample
            for s in _samples([shard], damage):
                hit = labels.get(s.key)  # by key, never by position
                if hit is None or hit[0] == 0:
                    continue
                lo, hi = max(position, first), position + hit[0]
                if end is not None:
                    hi = min(hi, end)
                position += hit[0]
                if hi > lo:  # some of its copies are in this reader's run
                    if entries is not None:
                        s = decode_sample(s, self.decode_min_side)
                        entries.append((s, hi - lo, hit[1], hit[2]))
                    for _ in range(hi - lo):
                        yield s, hit[1], hit[2]
                if end is not None and position >= end:
                    break  # the rest of the shard is another reader's run
            if entries is not None and cache is not None:
                cache.add(shard, entries, sum(_nbytes(e[0]) + e[2].nbytes + e[3].nbytes
                                              for e in entries))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from pipeline.losses import dense_targets

        reader, readers = _reader_index(self.rank, self.world_size)
        mine: list[str] | list[Part]
        if cuts_shards(self.weights, readers):  # whole shards deal unevenly: runs of copies
            mine = sample_ranges(self.shards, self.weights, readers)[reader]
        else:
            mine = assign_shards(self.shards, reader, readers, exhaustive=False,
                                 weights=self.weights)
        rng = random.Random(self.seed * 1_000_003 + 7919 + reader)
        torch.manual_seed(self.seed * 1_000_003 + 7919 + reader)
        cache = DecodedCache(self.cache_bytes) if self.cache_bytes > 0 else None
        while True:
            order = mine[:]
            rng.shuffle(order)
            produced = 0
            for s, idx, prob in _shuffled(self._repeated(order, cache), self.shuffle_buffer, rng):
                # the decoder the teacher's readers used: what they found damaged, it skipped
                image = _decoded(s, Damage(), self.decode_min_side)
                if image is None:
                    continue
                target = dense_targets(torch.from_numpy(idx)[None], torch.from_numpy(prob)[None],
                                       self.num_classes, self.temperature)[0]
                yield self.transform(image), target
                produced += 1
            if produced == 0:
                named = [p if isinstance(p, str) else _part_name(p) for p in mine[:3]]
                raise ValueError(f"no selected pseudo-labels in shards {named}...; rerun the "
                                 "select stage or lower --threshold")


# What a DataLoader worker imports to unpickle our streams and their transforms. The forkserver
# imports these once and forks each loader worker from itself already loaded; without them every
# worker imports torch, torchvision and PIL on its own, seconds each on a small CPU, and a
# student round starts about six (two training streams, the test stream of each phase, the
# fine-tune's).
LOADER_PRELOAD = ("pipeline.data", "pipeline.transforms", "pipeline.augment")


def make_loader(dataset: IterableDataset, batch_size: int, loader_workers: int) -> DataLoader:
    kwargs: dict[str, Any] = {}
    if loader_workers > 0:
        kwargs = dict(multiprocessing_context=_loader_context(), persistent_workers=True,
                      prefetch_factor=4)
    return DataLoader(dataset, batch_size=batch_size, num_workers=loader_workers, **kwargs)


def _loader_context() -> Any:
    # fork inside Ray actors can deadlock (docs/ray_notes.md)
    context = torch.multiprocessing.get_context("forkserver")
    # Takes effect when this process starts its forkserver: at its first loader, or earlier by
    # start_loader_server.
    context.set_forkserver_preload(list(LOADER_PRELOAD))
    return context


def start_loader_server() -> None:
    """Start this process's loader forkserver now rather than at the first ``make_loader``.

    The forkserver is a new process that imports :data:`LOADER_PRELOAD` (torch and torchvision:
    seconds on a small CPU) before it forks a worker, and the first batch of a round waited for
    it. Started as a training worker begins, those imports overlap the worker's own set-up
    (importing the training code, building the model, loading a checkpoint). Returns at once;
    calling it again, or before a loader, is harmless (the server starts only once).
    """
    from multiprocessing import forkserver

    _loader_context()
    forkserver.ensure_running()


def release_loader_files() -> None:
    """Remove the folder of this process's loader forkserver socket (``/tmp/pymp-*``).

    multiprocessing removes it in an exit hook, but Ray ends a finished training worker without
    running exit hooks, which left one such folder in the temp directory per round and worker.
    Call it only when this process will start no more loaders (its forkserver keeps running
    until the process ends, and a new loader would look for the socket here).
    """
    import multiprocessing.util
    import shutil

    shutil.rmtree(multiprocessing.util.get_temp_dir(), ignore_errors=True)


def steps_per_epoch(samples: int, batch_size: int, world_size: int) -> int:
    """Steps for every rank to see the split about once per epoch together (at least 1)."""
    return max(1, math.ceil(samples / (batch_size * world_size)))

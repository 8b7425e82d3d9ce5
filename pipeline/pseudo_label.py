"""Stages 1 and 2 of a student round: the teacher pseudo-labels every unlabeled shard, then selection.

Stage ``pseudo_label`` (Ray Data batch inference)::

    from_items(pending shards, a run of consecutive shards per block)
      -> map_batches(read_decode_shards)           CPU tasks: read the tars, decode, resize, crop
         -> repartition(batch_size rows)           fused into the read tasks: full batches
      -> map_batches(TeacherPredictor, ActorPool)  the teacher, loaded once per actor
      -> driver: iter_batches -> ShardAssembler    one Parquet file per shard, written atomically

Why the shards are read by our own task rather than ``ray.data.read_webdataset``: a damaged shard
must be skipped and counted, never fatal. ``read_webdataset`` raises on a truncated tar and the
whole dataset fails (checked with Ray 2.60); ``DataContext.max_errored_blocks`` would drop the
block instead, silently, with no record of which samples were lost. Python's ``tarfile`` in its
random-access mode, for its part, ends quietly at a truncated header. :func:`read_shard` reads the
tar itself, checks the end-of-archive marker, and turns every problem into a "bad sample" row that
flows through the pipeline like any other, so bad data is reported by shard and key and the
readable samples of a damaged shard are still labeled.

Why the teacher always runs full batches: CPU (and GPU) kernels take other code paths for other
batch sizes, so an image's probabilities can differ in the last bits depending on how many rows
share its batch, and which rows do depends on scheduling. The teacher pads every forward pass to
``batch_size`` rows, which makes each row's output a function of the image alone: a resumed run
reproduces an uninterrupted one bit for bit. Padding costs compute, so the readers hand over full
batches: a read task takes a run of consecutive shards and cuts their samples into blocks of
exactly ``batch_size`` rows across shard boundaries, which leaves one partial batch per read task
(:func:`read_tasks` keeps the tasks few), whatever the size of the shards. No separate repartition
stage: Ray Data fuses the non-strict repartition into the read tasks, and it keeps the readers a
stage of their own, where Ray Data would otherwise fuse them into the actors and make decoding and
inference take turns. (An earlier design read one shard per task and used a strict repartition,
which runs as tasks of its own: on 2 CPUs the teacher then waited 50-100 ms for every batch.)

Images travel as uint8, resized and cropped by the readers; the teacher normalises them (on the
GPU when it has one): a quarter of the bytes of float32 through the object store and over PCIe.
The readers run ahead of the teacher within a fixed object-store budget (:func:`_data_settings`),
so a fast reader never fills memory with decoded images, however large the corpus.

Why the driver writes the files, and how it knows a shard is finished: a reader follows each
shard's last sample with an end-of-shard row carrying the number of rows it emitted. The driver
keeps the (small) label rows of the shards in flight and writes a shard's file when it holds all
of them, sorted by position in the tar. Ray Data may interleave and reorder rows of different
shards (it does with several actors, and ``preserve_order`` would stall the pool behind the
slowest block), so neither order nor ``__url__`` changes are relied on: completeness is counted,
and order is restored by the row's index. Only label rows (about 100 bytes each) reach the
driver, never images, and only for the shards in flight, so its memory does not grow with the
corpus.

Files appear atomically (temp file + rename), so a job killed at any moment and run again labels
exactly the shards without a finished file, and the result equals an uninterrupted run row for row.
The label stage writes ``copies`` as 0; stage ``select`` rewrites each file with the real counts.
Each file's Parquet metadata records the teacher's sha256, k and the shard's bad samples, so a
resumed run can report them and never mixes files from another teacher.

Stage ``select`` runs :mod:`pipeline.select` in two passes over the files: per-class statistics
(label and confidence columns only), merged into one plan, then each file rewritten with ``copies``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import io
import json
import os
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline import manifest as mf
from pipeline.shards import IMAGE_SUFFIXES, ShardError, decode_image

__all__ = [
    "PSEUDO_SCHEMA",
    "PseudoLabelConfig",
    "PseudoLabelError",
    "TeacherPredictor",
    "TeacherRound",
    "check_teacher_file",
    "label_shards",
    "load_teacher_round",
    "pseudo_file_names",
    "read_shard",
    "run_pseudo_label_stages",
    "select_pseudo_labels",
    "soft_labels",
]

PSEUDO_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("shard", pa.string()),
    ("label", pa.int32()),
    ("confidence", pa.float32()),
    ("entropy", pa.float32()),
    ("topk_index", pa.list_(pa.int32())),
    ("topk_prob", pa.list_(pa.float16())),
    ("copies", pa.int32()),
])
META_KEY = b"noisy_student.pseudo_label"
FILE_FORMAT = 1
MAX_BAD_EXAMPLES = 20  # per file and per summary: enough to find the problem, bounded in size
READ_TASKS_PER_CPU = 4  # read tasks per reader CPU, so the readers' load stays balanced ...
MAX_SHARDS_PER_TASK = 64  # ... and no one task holds much of a large corpus
READ_AHEAD_BATCHES = 8  # decoded batches buffered per reader and per actor (the memory bound)

# Row kinds in the stream between the stages.
KIND_OK, KIND_BAD, KIND_END = 0, 1, 2

Progress = Callable[[str], Any]


class PseudoLabelError(ValueError):
    """A user-facing problem with the round, the teacher or the files (one clear sentence)."""


@dataclass(frozen=True)
class PseudoLabelConfig:
    """Settings of the pseudo-label and select stages."""

    batch_size: int = 256
    """Images per teacher forward pass."""
    num_actors: int = 1
    """Teacher actors (model replicas); each gets ``gpus_per_actor`` GPUs."""
    gpus_per_actor: float | None = None
    """None: 1 when the cluster has GPUs, else 0."""
    cpus_per_actor: float = 1
    """CPUs reserved per actor (also its torch thread count); leave the rest to the readers."""
    topk: int = 10
    """Soft-label entries kept per image (all classes when there are fewer)."""
    threshold: float = 0.3
    """Selection: pseudo-labels below this confidence are not used."""
    k: int | None = None
    """Selection: images per class after balancing; None = median per-class count."""
    seed: int = 0
    """Selection: seed of the per-row random decisions (hashed with shard and key)."""

    def validate(self) -> None:
        if self.batch_size < 1 or self.num_actors < 1 or self.topk < 1:
            raise PseudoLabelError(
                f"batch_size, num_actors and topk must be >= 1, got {self.batch_size}, "
                f"{self.num_actors} and {self.topk}")
        if self.cpus_per_actor < 0 or (self.gpus_per_actor or 0) < 0:
            raise PseudoLabelError("cpus_per_actor and gpus_per_actor must be >= 0")
        if not 0 <= self.threshold < 1:
            raise PseudoLabelError(f"threshold must be in [0, 1), got {self.threshold}")
        if self.k is not None and self.k < 1:
            raise PseudoLabelError(f"k must be >= 1 (or None for the default), got {self.k}")


# ============================================================================ reading shards


def read_shard(path: str) -> Iterator[tuple[int, int, str, bytes | str]]:
    """Samples of one tar as ``(kind, index, key, image bytes | reason)``, never raising.

    ``index`` is the sample's position in the shard. A sample without an image, or a repeated key,
    is a KIND_BAD row. A damaged tar (unreadable, truncated data, truncated header, or no
    end-of-archive marker) ends with one KIND_BAD row for its unreadable tail, keyed by the sample
    that was being read (empty when none); the sample being assembled at that point is dropped,
    since its members may be incomplete.
    """
    index, seen = 0, set()
    current: dict[str, Any] | None = None

    def emit(sample: dict[str, Any]) -> tuple[int, int, str, bytes | str]:
        nonlocal index
        row = _sample_row(index, sample, seen)
        seen.add(sample["__key__"])
        index += 1
        return row

    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                key, suffix = _split_member(member)
                if key is None:
                    continue
                data = tar.extractfile(member).read()
                if len(data) != member.size:
                    raise tarfile.ReadError("unexpected end of data")
                if current is not None and current["__key__"] != key:
                    yield emit(current)
                    current = None
                current = current or {"__key__": key}
                current[suffix] = data
            _check_end_marker(tar)
    except (OSError, EOFError, tarfile.TarError, ValueError) as e:
        lost = current["__key__"] if current else ""
        detail = " ".join(str(e).split())  # tarfile's messages span lines
        yield KIND_BAD, index, lost, f"damaged shard ({type(e).__name__}: {detail}); the " \
            f"samples after the first {index} could not be read"
        return
    if current is not None:
        yield emit(current)


def _split_member(member: tarfile.TarInfo) -> tuple[str | None, str]:
    # Same grouping as pipeline.shards.iter_tar: the key is the name up to the first dot.
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


def _sample_row(index: int, sample: dict[str, Any],
                seen: set[str]) -> tuple[int, int, str, bytes | str]:
    key = sample["__key__"]
    if key in seen:
        return KIND_BAD, index, key, "duplicate key in shard (members of a sample not adjacent?)"
    for fmt in IMAGE_SUFFIXES:
        if sample.get(fmt):
            return KIND_OK, index, key, sample[fmt]
    found = sorted(k for k in sample if not k.startswith("__")) or "nothing"
    return KIND_BAD, index, key, f"no image (found {found}; expected one of {IMAGE_SUFFIXES})"


def decode_images(images: list[bytes], resolution: int,
                  where: list[str]) -> tuple[np.ndarray, list[str]]:
    """Encoded images -> (N, 3, R, R) uint8 resized and center-cropped, and a reason per image
    ('' = ok). The teacher normalises (:func:`pipeline.transforms.normalize`): uint8 is a quarter
    of float32 through the object store and over PCIe.

    Images of the same size are transformed as one batch: per-image calls of the v2 transforms
    cost about 10x more than the decode itself on small images.
    """
    from pipeline.transforms import eval_crop

    transform = eval_crop(resolution)
    out = np.zeros((len(images), 3, resolution, resolution), dtype=np.uint8)
    reasons = [""] * len(images)
    by_shape: dict[tuple[int, ...], list[tuple[int, torch.Tensor]]] = {}
    for i, data in enumerate(images):
        try:
            img = decode_image(data, where[i])  # (3, H, W) uint8
        except ShardError as e:
            reasons[i] = str(e)
            continue
        by_shape.setdefault(tuple(img.shape), []).append((i, img))
    for group in by_shape.values():
        idx = [i for i, _ in group]
        out[idx] = transform(torch.stack([img for _, img in group])).numpy()  # (n, 3, R, R)
    return out, reasons


def read_decode_shards(batch: dict[str, np.ndarray], resolution: int,
                       rows: int) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data stage (CPU task): a group of shard paths in, decoded blocks of ``rows`` rows out.

    The shards' samples are read in order and cut into blocks of exactly ``rows`` rows (the last
    one excepted), crossing shard boundaries, so the teacher's batches come out full whatever the
    shard size. After a shard's last sample comes its end row (KIND_END), which carries in ``n``
    the number of sample rows of that shard: how the driver knows a shard is complete whatever
    order rows arrive in.
    """
    torch.set_num_threads(1)  # one task per CPU slot; torch's own threads would oversubscribe
    pending: list[_Row] = []
    for path in batch["item"]:
        path, emitted = str(path), 0
        for kind, index, key, payload in read_shard(path):
            pending.append(_Row(path, kind, index, key, payload))
            emitted += 1
            if len(pending) == rows:
                yield _decode_rows(pending, resolution)
                pending = []
        pending.append(_Row(path, KIND_END, -1, "", "", emitted))
        if len(pending) == rows:
            yield _decode_rows(pending, resolution)
            pending = []
    if pending:
        yield _decode_rows(pending, resolution)


@dataclass(frozen=True)
class _Row:
    shard: str
    kind: int
    index: int
    key: str
    payload: bytes | str  # image bytes (KIND_OK) or the reason (KIND_BAD)
    n: int = 0  # KIND_END: sample rows of the shard


def _decode_rows(rows: list[_Row], resolution: int) -> dict[str, np.ndarray]:
    kinds = [r.kind for r in rows]
    errors = [r.payload if r.kind == KIND_BAD else "" for r in rows]
    ok = [i for i, k in enumerate(kinds) if k == KIND_OK]
    images = np.zeros((len(rows), 3, resolution, resolution), dtype=np.uint8)
    decoded, reasons = decode_images([rows[i].payload for i in ok], resolution,
                                     [f"shard {rows[i].shard}, key {rows[i].key}" for i in ok])
    images[ok] = decoded
    for i, reason in zip(ok, reasons, strict=True):
        if reason:
            kinds[i], errors[i] = KIND_BAD, reason
    return {
        "shard": np.array([r.shard for r in rows], dtype=object),
        "index": np.array([r.index for r in rows], dtype=np.int64),
        "key": np.array([r.key for r in rows], dtype=object),
        "kind": np.array(kinds, dtype=np.int8),
        "error": np.array(errors, dtype=object),
        "n": np.array([r.n for r in rows], dtype=np.int64),
        "image": images,  # (N, 3, R, R) uint8, zeros where kind != KIND_OK
    }


# ============================================================================ the teacher


def soft_labels(logits: torch.Tensor, topk: int) -> dict[str, np.ndarray]:
    """Teacher outputs (N, C) -> label, confidence, entropy (nats), top-k indices and probs."""
    logp = torch.log_softmax(logits.float(), dim=1)  # (N, C); finite, so 0 * logp stays 0
    p = logp.exp()
    entropy = -(p * logp).sum(dim=1)  # (N,)
    prob, index = p.topk(min(topk, p.shape[1]), dim=1)  # (N, k), sorted high to low
    return {
        "label": index[:, 0].to(torch.int32).numpy(),
        "confidence": prob[:, 0].numpy().astype(np.float32),
        "entropy": entropy.numpy().astype(np.float32),
        "topk_index": index.to(torch.int32).numpy(),
        "topk_prob": prob.numpy().astype(np.float16),
    }


class TeacherPredictor:
    """Ray Data actor: the teacher, not noised (eval mode, no augmentation), loaded once."""

    def __init__(self, model_path: str, model_sha256: str, topk: int, batch_size: int,
                 use_gpu: bool, threads: int) -> None:
        from pipeline.checkpoint import load_model
        from pipeline.transforms import normalize

        torch.set_num_threads(max(1, threads))
        self.batch_size = batch_size
        self.normalize = normalize()
        model, payload = load_model(model_path, model_sha256)  # refuses a changed file
        self.k = min(topk, int(payload["num_classes"]))
        if use_gpu and not torch.cuda.is_available():
            raise RuntimeError("the teacher actor was given a GPU but CUDA is not available in it;"
                               " check the node's drivers or set gpus_per_actor=0")
        self.device = torch.device("cuda" if use_gpu else "cpu")
        if self.device.type == "cuda":  # channels_last + bf16 pay off on tensor cores only
            model = model.to(self.device, memory_format=torch.channels_last)
        self.model = model.eval()

    def forward(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """(N, 3, R, R) uint8 (resized, cropped) -> soft labels, in batches of ``batch_size``."""
        outs = [self._forward_padded(images[i : i + self.batch_size])
                for i in range(0, len(images), self.batch_size)]
        return {name: np.concatenate([o[name] for o in outs]) for name in outs[0]}

    def _forward_padded(self, images: np.ndarray) -> dict[str, np.ndarray]:
        # One input shape for every call: outputs of a row then never depend on its batch mates.
        n = len(images)
        x = torch.zeros((self.batch_size, *images.shape[1:]), dtype=torch.uint8)
        x[:n] = torch.from_numpy(images)
        return {name: v[:n] for name, v in self._forward(x).items()}

    def _forward(self, x: torch.Tensor) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            if self.device.type == "cuda":  # uint8 over PCIe, normalised on the GPU
                x = self.normalize(x.to(self.device)).contiguous(memory_format=torch.channels_last)
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    logits = self.model(x)
                return soft_labels(logits.float().cpu(), self.k)
            return soft_labels(self.model(self.normalize(x)), self.k)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["kind"])
        ok = batch["kind"] == KIND_OK
        out = {c: batch[c] for c in ("shard", "index", "key", "kind", "error", "n")}
        out.update({
            "label": np.full(n, -1, np.int32), "confidence": np.zeros(n, np.float32),
            "entropy": np.zeros(n, np.float32), "topk_index": np.zeros((n, self.k), np.int32),
            "topk_prob": np.zeros((n, self.k), np.float16),
        })
        if ok.any():
            for name, values in self.forward(batch["image"][ok]).items():
                out[name][ok] = values
        return out


# ============================================================================ writing files


def pseudo_file_names(shards: list[str]) -> dict[str, str]:
    """Shard path -> its Parquet file name: ``<stem>.parquet``, plus a hash when stems collide."""
    stems = {s: _stem(s) for s in shards}
    counts: dict[str, int] = {}
    for stem in stems.values():
        counts[stem] = counts.get(stem, 0) + 1
    names = {}
    for s, stem in stems.items():
        if counts[stem] > 1:  # e.g. a/000.tar and b/000.tar registered together
            stem = f"{stem}-{hashlib.sha1(s.encode()).hexdigest()[:8]}"
        names[s] = f"{stem}.parquet"
    return names


def _stem(path: str) -> str:
    # Up to the first dot, as WebDataset splits names (and as the student's reader looks files up).
    return os.path.basename(path).split(".", 1)[0]


def _file_meta(path: Path) -> dict[str, Any] | None:
    """Our metadata of a finished file, or None when it is not a readable file of this stage."""
    try:
        raw = pq.read_schema(path).metadata or {}
        meta = json.loads(raw[META_KEY])
    except (OSError, KeyError, ValueError, pa.ArrowException):
        return None
    return meta if meta.get("format") == FILE_FORMAT else None


def _write_table(path: Path, table: pa.Table, meta: dict[str, Any]) -> str:
    """Write atomically (readers see no file or the whole file); returns the sha256."""
    table = table.replace_schema_metadata({META_KEY: json.dumps(meta).encode()})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    data = buf.getvalue()
    mf.atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def _build_table(rows: dict[str, np.ndarray]) -> pa.Table:
    """Label rows of one shard (KIND_OK only, in shard order) -> the DESIGN.md table."""
    n, k = rows["topk_index"].shape  # (N, k)
    offsets = pa.array(np.arange(n + 1) * k, pa.int32())
    return pa.Table.from_arrays([
        pa.array(rows["key"].astype(str), pa.string()),
        pa.array(rows["shard"].astype(str), pa.string()),
        pa.array(rows["label"], pa.int32()),
        pa.array(rows["confidence"], pa.float32()),
        pa.array(rows["entropy"], pa.float32()),
        pa.ListArray.from_arrays(offsets, pa.array(rows["topk_index"].reshape(-1), pa.int32())),
        pa.ListArray.from_arrays(offsets, pa.array(rows["topk_prob"].reshape(-1), pa.float16())),
        pa.array(np.zeros(n, np.int32), pa.int32()),  # set by the select stage
    ], schema=PSEUDO_SCHEMA)


class ShardAssembler:
    """Driver side: gathers label rows per shard and writes a shard's file once it is complete."""

    COLUMNS = ("shard", "index", "key", "kind", "error", "label", "confidence", "entropy",
               "topk_index", "topk_prob")

    def __init__(self, out_dir: Path, names: dict[str, str], meta: dict[str, Any],
                 on_done: Callable[[str, int, int], None]) -> None:
        self.out_dir, self.names, self.meta, self.on_done = out_dir, names, meta, on_done
        self.parts: dict[str, list[dict[str, np.ndarray]]] = {}
        self.received: dict[str, int] = {}
        self.expected: dict[str, int] = {}

    def add(self, batch: dict[str, np.ndarray]) -> None:
        shards = batch["shard"].astype(str)
        for shard in np.unique(shards):
            mask = shards == shard
            ends = mask & (batch["kind"] == KIND_END)
            if ends.any():
                self.expected[shard] = int(batch["n"][ends][0])
            rows = mask & (batch["kind"] != KIND_END)
            if rows.any():
                self.parts.setdefault(shard, []).append(
                    {c: batch[c][rows] for c in self.COLUMNS})
                self.received[shard] = self.received.get(shard, 0) + int(rows.sum())
            if self.received.get(shard, 0) == self.expected.get(shard, -1):
                self._finish(shard)

    @property
    def in_flight(self) -> list[str]:
        return sorted(set(self.parts) | set(self.expected))

    def _finish(self, shard: str) -> None:
        parts = self.parts.pop(shard, []) or [self._empty()]
        self.expected.pop(shard)
        self.received.pop(shard, None)
        rows = {c: np.concatenate([p[c] for p in parts]) for c in self.COLUMNS}
        order = np.argsort(rows["index"], kind="stable")  # back to the order inside the tar
        rows = {c: v[order] for c, v in rows.items()}
        ok = rows["kind"] == KIND_OK
        bad = [{"shard": shard, "key": str(key), "reason": str(reason)}
               for key, reason in zip(rows["key"][~ok], rows["error"][~ok], strict=True)]
        meta = {**self.meta, "bad_count": len(bad), "bad_examples": bad[:MAX_BAD_EXAMPLES]}
        table = _build_table({c: v[ok] for c, v in rows.items()})
        _write_table(self.out_dir / self.names[shard], table, meta)
        self.on_done(shard, int(ok.sum()), len(bad))

    def _empty(self) -> dict[str, np.ndarray]:
        """No rows at all (an empty tar): the shard still gets its empty file."""
        k = self.meta["k"]
        empty = {c: np.zeros(0, dtype=object) for c in ("shard", "key", "error")}
        return {**empty, "index": np.zeros(0, np.int64), "kind": np.zeros(0, np.int8),
                "label": np.zeros(0, np.int32), "confidence": np.zeros(0, np.float32),
                "entropy": np.zeros(0, np.float32), "topk_index": np.zeros((0, k), np.int32),
                "topk_prob": np.zeros((0, k), np.float16)}


# ============================================================================ stage: label


def label_shards(model_path: str | Path, model_sha256: str, shards: list[str],
                 out_dir: str | Path, cfg: PseudoLabelConfig, *,
                 progress: Progress = print) -> dict[str, Any]:
    """Pseudo-label ``shards`` into ``out_dir/<stem>.parquet``; resumable by shard.

    Needs a running Ray (``ray.init`` before). Shards that already have a finished file from the
    same teacher and k are skipped. Returns files, rows, bad samples and seconds of this call.
    """
    from pipeline.checkpoint import read_model_file

    cfg.validate()
    start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = read_model_file(model_path, model_sha256)  # refuse a changed teacher up front
    k = min(cfg.topk, int(payload["num_classes"]))
    meta = {"format": FILE_FORMAT, "teacher_sha256": model_sha256, "k": k}
    names = pseudo_file_names(list(shards))
    _remove_stale_temps(out_dir)
    pending = _pending_shards(out_dir, names, meta, progress)
    progress(f"pseudo-label: {len(shards) - len(pending)} of {len(shards)} shards already done, "
             f"{len(pending)} to label with {payload['model_name']} at "
             f"{payload['test_resolution']} px")
    if pending:
        _run_inference(str(model_path), model_sha256, pending, out_dir, names, meta,
                       int(payload["test_resolution"]), cfg, progress)
    summary = summarize_files(out_dir, [names[s] for s in shards])
    summary["seconds"] = round(time.perf_counter() - start, 3)
    return summary


def _remove_stale_temps(out_dir: Path) -> None:
    # Left by a killed run (atomic_write_bytes names them ".<name>.<random>.tmp").
    for tmp in out_dir.glob(".*.parquet.*.tmp"):
        tmp.unlink(missing_ok=True)


def _pending_shards(out_dir: Path, names: dict[str, str], meta: dict[str, Any],
                    progress: Progress) -> list[str]:
    pending = []
    for shard, name in names.items():
        path = out_dir / name
        if not path.exists():
            pending.append(shard)
            continue
        found = _file_meta(path)
        if found is None or any(found.get(f) != meta[f] for f in ("teacher_sha256", "k")):
            progress(f"pseudo-label: {path} comes from another teacher or k; labeling it again")
            pending.append(shard)
    return pending


def _run_inference(model_path: str, model_sha256: str, pending: list[str], out_dir: Path,
                   names: dict[str, str], meta: dict[str, Any], resolution: int,
                   cfg: PseudoLabelConfig, progress: Progress) -> None:
    meter = _Meter(len(pending), progress)
    assembler = ShardAssembler(out_dir, names, meta, meter.shard_done)
    with _data_context(**_data_settings(resolution, cfg)):
        ds = inference_dataset(model_path, model_sha256, pending, resolution, cfg)
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            assembler.add(batch)
            meter.rows(int((batch["kind"] != KIND_END).sum()))
    if assembler.in_flight:  # every reader ends its shard, so this is a bug, not bad data
        raise RuntimeError(f"pseudo-label: shards left incomplete: {assembler.in_flight[:5]}")
    meter.final()


def _data_settings(resolution: int, cfg: PseudoLabelConfig) -> dict[str, Any]:
    """DataContext settings of the inference dataset.

    A reader's output becomes a block per batch rather than per 128 MiB (Ray Data's default), so
    the teacher starts on the first batch. The object store budget holds READ_AHEAD_BATCHES
    batches per process of the pipeline: enough that the teacher never waits, and a bound that
    does not grow with the corpus (by default Ray Data lets fast readers run ahead until its
    share of the object store, 30% of RAM, is full).
    """
    import ray
    from ray.data import DataContext

    batch_bytes = cfg.batch_size * 3 * resolution * resolution  # uint8 images
    processes = cfg.num_actors + _reader_cpus(cfg, ray.cluster_resources())
    budget = READ_AHEAD_BATCHES * processes * batch_bytes
    options = copy.copy(DataContext.get_current().execution_options)
    limits = options.resource_limits  # a smaller limit set by the user is kept
    options.resource_limits = limits.copy(object_store_memory=min(limits.object_store_memory,
                                                                  budget))
    # Our own progress lines replace Ray Data's bars, which flood job logs.
    return {"enable_progress_bars": False, "target_max_block_size": batch_bytes,
            "execution_options": options}


def _reader_cpus(cfg: PseudoLabelConfig, cluster: dict[str, float]) -> int:
    return max(1, int(cluster.get("CPU", 0) - cfg.cpus_per_actor * cfg.num_actors))


def read_tasks(num_shards: int, reader_cpus: int) -> int:
    """How many read tasks share ``num_shards`` shards (consecutive runs of them).

    Few and long: each task ends with at most one partial batch (which the teacher pads), so the
    waste is bounded by the number of tasks, not by the number or size of shards. Enough of them
    for every reader CPU to have several, and none with more than MAX_SHARDS_PER_TASK shards.
    """
    wanted = max(READ_TASKS_PER_CPU * max(1, reader_cpus), -(-num_shards // MAX_SHARDS_PER_TASK))
    return max(1, min(num_shards, wanted))


def decoded_dataset(shards: list[str], resolution: int, cfg: PseudoLabelConfig,
                    reader_cpus: int) -> Any:
    """The readers' half: shards -> blocks of ``cfg.batch_size`` decoded rows (Ray Data tasks)."""
    import ray

    tasks = read_tasks(len(shards), reader_cpus)
    ds = ray.data.from_items(shards, override_num_blocks=tasks)  # consecutive shards per block
    ds = ds.map_batches(read_decode_shards, batch_size=None, num_cpus=1,
                        fn_kwargs={"resolution": resolution, "rows": cfg.batch_size})
    # Blocks of exactly batch_size rows. A non-strict repartition right after a map is fused into
    # the read tasks (no tasks of its own, no copy) and is not fused further, so the readers stay
    # a stage of their own instead of taking turns with the teacher inside its actor.
    return ds.repartition(target_num_rows_per_block=cfg.batch_size)


def inference_dataset(model_path: str, model_sha256: str, shards: list[str], resolution: int,
                      cfg: PseudoLabelConfig) -> Any:
    """The lazy Ray Data pipeline: shards -> read + decode (tasks) -> teacher (actor pool)."""
    import ray

    cluster = ray.cluster_resources()
    gpus = _check_resources(cfg, cluster)
    ds = decoded_dataset(shards, resolution, cfg, _reader_cpus(cfg, cluster))
    return ds.map_batches(
        TeacherPredictor, compute=ray.data.ActorPoolStrategy(size=cfg.num_actors),
        batch_size=cfg.batch_size, num_gpus=gpus, num_cpus=cfg.cpus_per_actor,
        fn_constructor_kwargs={"model_path": model_path, "model_sha256": model_sha256,
                               "topk": cfg.topk, "batch_size": cfg.batch_size,
                               "use_gpu": gpus > 0,
                               "threads": max(1, int(cfg.cpus_per_actor))})


def _check_resources(cfg: PseudoLabelConfig, cluster: dict[str, float]) -> float:
    """GPUs per actor; refuses requests that would leave Ray Data waiting forever."""
    gpus = cfg.gpus_per_actor
    if gpus is None:
        gpus = 1.0 if cluster.get("GPU", 0) > 0 else 0.0
    if gpus * cfg.num_actors > cluster.get("GPU", 0):
        raise PseudoLabelError(
            f"{cfg.num_actors} teacher actors x {gpus} GPUs do not fit the cluster's "
            f"{cluster.get('GPU', 0):g} GPUs; lower --num-actors or --gpus-per-actor")
    # Readers need CPUs of their own, or the actors wait for input that is never decoded.
    if cluster.get("CPU", 0) - cfg.cpus_per_actor * cfg.num_actors < 1:
        raise PseudoLabelError(
            f"{cfg.num_actors} teacher actors x {cfg.cpus_per_actor:g} CPUs leave less than one of "
            f"the cluster's {cluster.get('CPU', 0):g} CPUs to read and decode shards; lower "
            "--num-actors or --cpus-per-actor")
    return gpus


@contextlib.contextmanager
def _data_context(**settings: Any) -> Iterator[None]:
    """Ray Data settings for the datasets made inside (each copies the context it starts with)."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    old = {name: getattr(ctx, name) for name in settings}
    for name, value in settings.items():
        setattr(ctx, name, value)
    try:
        yield
    finally:
        for name, value in old.items():
            setattr(ctx, name, value)


class _Meter:
    """rows/s and shards done/left, every ``every`` seconds and per finished shard."""

    def __init__(self, total_shards: int, progress: Progress, every: float = 5.0) -> None:
        self.total, self.progress, self.every = total_shards, progress, every
        self.start = self.last = time.perf_counter()
        self.done = self.n = 0

    def rows(self, n: int) -> None:
        self.n += n
        if time.perf_counter() - self.last >= self.every:
            self._line()

    def shard_done(self, shard: str, rows: int, bad: int) -> None:
        self.done += 1
        bad_note = f", {bad} bad" if bad else ""
        self.progress(f"pseudo-label: {os.path.basename(shard)} done ({rows} rows{bad_note}); "
                      f"shards {self.done}/{self.total}, {self.total - self.done} left")

    def _line(self) -> None:
        self.last = time.perf_counter()
        rate = self.n / max(self.last - self.start, 1e-9)
        self.progress(f"pseudo-label: {self.n} rows, {rate:.0f} rows/s; shards {self.done}/"
                      f"{self.total} done, {self.total - self.done} left")

    def final(self) -> None:
        self._line()


def summarize_files(out_dir: Path, names: list[str]) -> dict[str, Any]:
    """files [{name, rows, sha256}], rows and bad samples, from the files and their metadata."""
    files, rows, bad_count, examples = [], 0, 0, []
    for name in names:
        path = out_dir / name
        meta = _file_meta(path)
        if meta is None:
            raise PseudoLabelError(f"{path} is missing or not a pseudo-label file; rerun the "
                                   "pseudo_label stage")
        n = pq.ParquetFile(path).metadata.num_rows
        files.append({"name": name, "rows": n, "sha256": mf.sha256_file(path)})
        rows += n
        bad_count += meta.get("bad_count", 0)
        examples.extend(meta.get("bad_examples", [])[: MAX_BAD_EXAMPLES - len(examples)])
    return {"files": files, "rows": rows,
            "bad_samples": {"count": bad_count, "examples": examples}}


# ============================================================================ stage: select


def select_pseudo_labels(out_dir: str | Path, num_classes: int, cfg: PseudoLabelConfig, *,
                         classes: list[str] | None = None, names: list[str] | None = None,
                         progress: Progress = print) -> dict[str, Any]:
    """Threshold + per-class balancing over all files in ``out_dir``; rewrites ``copies``.

    Pass 1 reads only label and confidence; pass 2 rewrites one file at a time (atomically), so
    memory is one shard's table. Idempotent: running it again gives the same files, and a file
    already written with the same plan is not rewritten (resume after a kill).
    ``names`` limits it to these files (default: every pseudo-label file in ``out_dir``).
    Returns the manifest's ``pseudo_labels`` dict, with per-class counts taken from the files.
    """
    from pipeline.select import class_stats, merge_stats, plan_selection

    cfg.validate()
    out_dir = Path(out_dir)
    classes = classes or [str(i) for i in range(num_classes)]
    paths = _selection_files(out_dir, names)
    stats = merge_stats(  # pass 1
        class_stats(pq.read_table(p, columns=["label", "confidence"]).to_pandas(), num_classes,
                    cfg.threshold) for p in paths)
    plan = plan_selection(stats, k=cfg.k, seed=cfg.seed)
    kept = np.zeros(num_classes, np.int64)
    copies = np.zeros(num_classes, np.int64)
    files = []
    for path in paths:  # pass 2
        labels, file_copies = _apply_plan(path, plan)
        kept += np.bincount(labels[file_copies > 0], minlength=num_classes)
        copies += np.bincount(labels, weights=file_copies, minlength=num_classes).astype(np.int64)
        files.append({"name": path.name, "rows": len(labels), "sha256": mf.sha256_file(path)})
    progress(f"select: threshold {cfg.threshold}, K {plan.k}: {int(kept.sum())} of "
             f"{stats.rows} images kept, {int(copies.sum())} with copies")
    return {
        "uri": str(out_dir), "files": files, "rows": stats.rows, "kept": int(kept.sum()),
        "selected_with_copies": int(copies.sum()), "threshold": cfg.threshold,
        "k": plan.k, "seed": cfg.seed, "rows_above_threshold": int(stats.counts.sum()),
        "per_class": {classes[c]: {"kept": int(kept[c]), "copies": int(copies[c])}
                      for c in range(num_classes)},
    }


def _selection_files(out_dir: Path, names: list[str] | None) -> list[Path]:
    if names is None:
        paths = sorted(p for p in out_dir.glob("*.parquet") if _file_meta(p) is not None)
    else:
        paths = sorted(out_dir / n for n in names)
        missing = [p for p in paths if _file_meta(p) is None]
        if missing:
            raise PseudoLabelError(f"{missing[0]} is missing or not a pseudo-label file; run the "
                                   "pseudo_label stage again")
    if not paths:
        raise PseudoLabelError(f"no pseudo-label files in {out_dir}; run the pseudo_label stage")
    return paths


def _apply_plan(path: Path, plan: Any) -> tuple[np.ndarray, np.ndarray]:
    """Rewrite one file's ``copies`` (unless it already holds this plan's); (labels, copies)."""
    from pipeline.select import apply_selection

    fingerprint = _plan_fingerprint(plan)
    meta = _file_meta(path)
    if meta.get("selection") == fingerprint:
        done = pq.read_table(path, columns=["label", "copies"])
        return done["label"].to_numpy(), done["copies"].to_numpy()
    table = pq.read_table(path)
    copies = apply_selection(table.select(["key", "shard", "label", "confidence"]).to_pandas(),
                             plan)
    table = table.set_column(table.schema.get_field_index("copies"), "copies",
                             pa.array(copies, pa.int32()))
    _write_table(path, table, {**meta, "selection": fingerprint})
    return table["label"].to_numpy(), copies


def _plan_fingerprint(plan: Any) -> str:
    h = hashlib.sha256(json.dumps(plan.to_dict(), sort_keys=True).encode())
    for arr in (plan.cut_bin, plan.keep_frac, plan.copy_factor):
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()[:16]


# ============================================================================ the round


@dataclass(frozen=True)
class TeacherRound:
    """What a student round needs from round N-1."""

    manifest: dict[str, Any]
    manifest_sha256: str
    checkpoint_path: Path
    checkpoint_sha256: str
    dataset_path: Path


def load_teacher_round(root: str | Path, run: str, round_: int) -> TeacherRound:
    """Round ``round_ - 1``'s manifest, checked complete, with its paths resolved against root."""
    if round_ < 1:
        raise PseudoLabelError(f"round must be >= 1 to pseudo-label, got {round_}; round 0 is "
                               f"the teacher: `python jobs/teacher.py --run {run} --data DATA`")
    prev = round_ - 1
    make = (f"python jobs/teacher.py --run {run} --data DATA" if prev == 0
            else f"python jobs/student.py --run {run} --round {prev}")
    path = mf.manifest_path(root, run, prev)
    if not path.exists():
        raise PseudoLabelError(f"round {prev} of run {run!r} does not exist ({path}); run "
                               f"`{make}` first")
    m = mf.load_manifest_file(path)
    if m["status"] != "complete":
        raise PseudoLabelError(f"round {prev} of run {run!r} is {m['status']}, not complete; "
                               f"run `{make}` first")
    ckpt = m.get("checkpoint") or {}
    dataset = (m.get("data") or {}).get("dataset")
    if not ckpt.get("uri") or not ckpt.get("sha256") or not dataset:
        raise PseudoLabelError(f"{path} records no checkpoint uri/sha256 or data.dataset; rerun "
                               f"`{make} --force`")
    return TeacherRound(manifest=m, manifest_sha256=mf.sha256_file(path),
                        checkpoint_path=_under_root(root, ckpt["uri"]),
                        checkpoint_sha256=ckpt["sha256"], dataset_path=_under_root(root, dataset))


def check_teacher_file(teacher: TeacherRound) -> None:
    """Refuse a missing or changed teacher checkpoint before anything starts (cheap: one hash)."""
    from pipeline.checkpoint import CheckpointError

    path = teacher.checkpoint_path
    if not path.is_file():
        raise CheckpointError(f"model file {path} of round {teacher.manifest['round']} does not "
                              "exist; restore it or rerun that round with --force")
    if mf.sha256_file(path) != teacher.checkpoint_sha256:
        raise CheckpointError(f"model file {path} changed after round {teacher.manifest['round']}"
                              " recorded it (sha256 mismatch); restore it or rerun that round "
                              "with --force")


def _under_root(root: str | Path, uri: str) -> Path:
    p = Path(uri)
    return p if p.is_absolute() else Path(root) / p


def _relative_to_root(root: str | Path, path: Path) -> str:
    try:
        return path.resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return str(path.resolve())


def run_pseudo_label_stages(root: str | Path, run: str, round_: int, cfg: PseudoLabelConfig,
                            manifest: dict[str, Any], *,
                            progress: Progress = print) -> dict[str, Any]:
    """Stages pseudo_label and select of round ``round_`` (skipping complete ones); saves after
    each. Needs Ray running for the label stage. Returns the updated manifest."""
    from pipeline.checkpoint import read_model_file
    from pipeline.dataset import load_dataset

    cfg.validate()
    teacher = load_teacher_round(root, run, round_)
    recorded = (manifest.get("teacher") or {}).get("checkpoint_sha256")
    if recorded and recorded != teacher.checkpoint_sha256:
        raise PseudoLabelError(
            f"round {round_} was started with teacher checkpoint {recorded[:12]}..., but round "
            f"{round_ - 1} now records {teacher.checkpoint_sha256[:12]}...; start round {round_} "
            "again with --force")
    payload = read_model_file(teacher.checkpoint_path, teacher.checkpoint_sha256)
    payload.pop("state_dict", None)
    info = load_dataset(teacher.dataset_path)
    if int(payload["num_classes"]) != info.num_classes:
        raise PseudoLabelError(
            f"the teacher has {payload['num_classes']} classes but dataset {info.path} has "
            f"{info.num_classes}; pseudo-label with the dataset the teacher was trained on")
    out_dir = mf.artifact_dir(root, run, round_) / "pseudo"
    shards = info.split("unlabeled").shards
    if not mf.stage_complete(manifest, "pseudo_label"):
        _label_stage(root, manifest, teacher, shards, out_dir, cfg, progress)
    if mf.stage_complete(manifest, "select") and _selection_changed(manifest, cfg):
        progress("select: --threshold, --k or --seed differ from the completed selection; "
                 "selecting again")
        mf.add_event(manifest, "reselect", previous={
            k: manifest["stages"]["select"].get(k) for k in ("threshold", "k_requested", "seed")})
        manifest["stages"]["select"]["status"] = "running"
    if not mf.stage_complete(manifest, "select"):
        names = sorted(pseudo_file_names(shards).values())
        _select_stage(root, manifest, out_dir, info.classes, names, cfg, progress)
    return manifest


def _label_stage(root: str | Path, m: dict[str, Any], teacher: TeacherRound, shards: list[str],
                 out_dir: Path, cfg: PseudoLabelConfig, progress: Progress) -> None:
    if "pseudo_label" in m["stages"]:  # killed or failed before: finished shards are kept
        mf.add_event(m, "resume", stage="pseudo_label",
                     previous=m["stages"]["pseudo_label"].get("status"))
    mf.set_stage(m, "pseudo_label", "running", config=dataclasses.asdict(cfg))
    mf.save_manifest(root, m)
    with _fail_stage(root, m, "pseudo_label"):
        result = label_shards(teacher.checkpoint_path, teacher.checkpoint_sha256, shards, out_dir,
                              cfg, progress=progress)
    mf.set_stage(m, "pseudo_label", "complete", seconds=result["seconds"], rows=result["rows"],
                 files=len(result["files"]), bad_samples=result["bad_samples"],
                 uri=_relative_to_root(root, out_dir))
    mf.save_manifest(root, m)


def _select_stage(root: str | Path, m: dict[str, Any], out_dir: Path, classes: list[str],
                  names: list[str], cfg: PseudoLabelConfig, progress: Progress) -> None:
    start = time.perf_counter()
    mf.set_stage(m, "select", "running")
    mf.save_manifest(root, m)
    with _fail_stage(root, m, "select"):
        result = select_pseudo_labels(out_dir, len(classes), cfg, classes=classes, names=names,
                                      progress=progress)
    result["uri"] = _relative_to_root(root, out_dir)
    m["pseudo_labels"] = result
    mf.set_stage(m, "select", "complete", seconds=round(time.perf_counter() - start, 3),
                 rows=result["rows"], kept=result["kept"],
                 selected_with_copies=result["selected_with_copies"], k=result["k"],
                 threshold=result["threshold"], k_requested=cfg.k, seed=cfg.seed)
    mf.save_manifest(root, m)


def _selection_changed(m: dict[str, Any], cfg: PseudoLabelConfig) -> bool:
    """Whether the complete select stage used other settings than ``cfg`` (it is cheap to redo,
    and a user who changes --threshold expects it to take effect)."""
    sel = m["stages"]["select"]
    if "k_requested" not in sel:  # recorded by an older version: trust it
        return False
    return (sel.get("threshold") != cfg.threshold or sel.get("k_requested") != cfg.k
            or sel.get("seed") != cfg.seed)


@contextlib.contextmanager
def _fail_stage(root: str | Path, m: dict[str, Any], stage: str) -> Iterator[None]:
    """Record a failure in the manifest (so the record says where it stopped), then re-raise."""
    try:
        yield
    except BaseException as e:
        mf.set_stage(m, stage, "failed", error=f"{type(e).__name__}: {e}"[:500])
        with contextlib.suppress(Exception):
            mf.save_manifest(root, m)
        raise

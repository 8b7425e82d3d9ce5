"""The pseudo-label file format: one Parquet file per unlabeled shard, and what reads and writes it.

Every stage that touches pseudo-labels goes through here: labeling writes them, selection rewrites
their ``copies`` column, student training joins them to images by key, the report reads them.

Table (one row per readable sample of the shard, in the order of the tar)::

    key: string            the WebDataset __key__
    shard: string          the shard it came from
    label: int32           the teacher's argmax
    confidence: float32    its max probability
    entropy: float32       in nats
    topk_index: list<int32>, topk_prob: list<float16>   the soft label, top-k only
    copies: int32          how many times selection uses the row (0 = not used); 0 until select

Only the top k probabilities are kept (10 by default, all classes when there are fewer): full
float32 vectors of 1000 classes for 300M images would take 1.2 TB.

The file's Parquet metadata (``META_KEY``) records what decides its bytes: the teacher's sha256,
k, the inference batch size (an image's probabilities can differ in the last bits with the batch
it is computed in), the crop the teacher saw (None: the default) and the shard's damaged samples; a resumed stage relabels any file whose
settings differ. Files are written whole and atomically (temp file + rename).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import UserError
from pipeline.fs import StorageError, parquet_file, read_table
from pipeline.shards import MAX_BAD_EXAMPLES  # the damage policy's bound, per file and summary
from pipeline.storage import atomic_write_bytes, sha256_file

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
# Settings that decide a file's bytes; a file made with others is labeled again on resume.
BYTE_SETTINGS = ("teacher_sha256", "k", "batch_size", "crop_fraction", "jpeg_dct_scaling")
# What a file written before a setting existed was made with.
_BEFORE_SETTING = {"jpeg_dct_scaling": False}

Progress = Callable[[str], Any]


class PseudoFileError(UserError, ValueError):
    """A pseudo-label file is missing or not one of ours; the message says which stage to rerun."""


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


def file_meta(path: Path) -> dict[str, Any] | None:
    """Our metadata of a finished file, or None when it is not a readable file of this stage."""
    return file_footer(path)[0]


def file_footer(path: Path) -> tuple[dict[str, Any] | None, int]:
    """(our metadata or None, row count) from one read of the file's footer."""
    try:
        footer = parquet_file(path).metadata
        meta = json.loads((footer.metadata or {})[META_KEY])
    except StorageError:
        raise  # refused or unreachable is not "missing": relabeling would not help
    except (OSError, KeyError, ValueError, pa.ArrowException):
        return None, 0
    return (meta, footer.num_rows) if meta.get("format") == FILE_FORMAT else (None, 0)


def write_table(path: Path, table: pa.Table, meta: dict[str, Any]) -> str:
    """Write atomically (readers see no file or the whole file); returns the sha256."""
    table = table.replace_schema_metadata({META_KEY: json.dumps(meta).encode()})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    data = buf.getvalue()
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def build_table(rows: dict[str, np.ndarray]) -> pa.Table:
    """Label rows of one shard (KIND_OK only, in shard order) -> the table above."""
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


def remove_stale_temps(out_dir: Path) -> None:
    # Left by a killed run (atomic_write_bytes names them ".<name>.<random>.tmp").
    for tmp in out_dir.glob(".*.parquet.*.tmp"):
        tmp.unlink(missing_ok=True)


def pending_shards(out_dir: Path, names: dict[str, str], meta: dict[str, Any],
                    progress: Progress) -> list[str]:
    pending = []
    for shard, name in names.items():
        path = out_dir / name
        if not path.exists():
            pending.append(shard)
            continue
        found = file_meta(path)
        if found is None or any(found.get(f, _BEFORE_SETTING.get(f)) != meta[f]
                                for f in BYTE_SETTINGS):
            progress(f"pseudo-label: {path} was made with another teacher, k, batch size, crop "
                     "or decoding; labeling it again")
            pending.append(shard)
    return pending



def summarize_files(out_dir: Path, names: list[str]) -> dict[str, Any]:
    """files [{name, rows, sha256}], rows and bad samples, from the files and their metadata."""
    files, rows, bad_count, examples = [], 0, 0, []
    for name in names:
        path = out_dir / name
        meta = file_meta(path)
        if meta is None:
            raise PseudoFileError(f"{path} is missing or not a pseudo-label file; rerun the "
                                   "pseudo_label stage")
        n = parquet_file(path).metadata.num_rows
        files.append({"name": name, "rows": n, "sha256": sha256_file(path)})
        rows += n
        bad_count += meta.get("bad_count", 0)
        examples.extend(meta.get("bad_examples", [])[: MAX_BAD_EXAMPLES - len(examples)])
    return {"files": files, "rows": rows,
            "bad_samples": {"count": bad_count, "examples": examples}}


def read_selected(path: str | Path) -> dict[str, tuple[int, np.ndarray, np.ndarray]]:
    """Key -> (copies, top-k indices, top-k probabilities) of the rows selection kept (copies > 0).

    One shard's file at a time: a training worker never holds more than one shard's labels."""
    table = read_table(path, columns=["key", "copies", "topk_index", "topk_prob"])
    table = table.filter(table.column("copies").to_numpy() > 0)
    keys = table.column("key").to_pylist()
    copies = table.column("copies").to_numpy()
    idx = table.column("topk_index").to_pylist()
    prob = table.column("topk_prob").to_pylist()
    return {k: (int(c), np.asarray(i, np.int64), np.asarray(p, np.float32))
            for k, c, i, p in zip(keys, copies, idx, prob, strict=True)}


def shards_with_selection(shards: list[str], pseudo_dir: str | Path,
                          recorded: dict[str, int | None] | None = None
                          ) -> tuple[list[str], list[int]]:
    """The shards (in their order) whose pseudo-label file has a row that selection kept, and
    each one's copies summed (how many samples it gives a pass of training). ``shards``: the
    whole unlabeled split, whose stems name the files (:func:`pseudo_file_names`); the stream
    reading the subset must be given those names, as a subset's stems may no longer collide.

    The student's pseudo-labeled stream deals these out to its readers (ranks x loader
    workers), balanced by copies: a reader dealt only shards without a selected row would have
    nothing to give. ``recorded`` (file name -> copies, from the manifest's
    ``pseudo_labels.files``) answers without reading; a file it lacks (a manifest from before
    the count was recorded, or truth-label files) has its ``copies`` column read, a few files
    at a time (object storage answers each read in tens of milliseconds).
    """
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.fs import location

    names = pseudo_file_names(shards)
    folder = location(pseudo_dir)
    recorded = recorded or {}

    def copies(shard: str) -> int:
        known = recorded.get(names[shard])
        if known is not None:
            return int(known)
        column = read_table(folder / names[shard], columns=["copies"]).column("copies")
        return int(column.to_numpy().sum()) if len(column) else 0

    with ThreadPoolExecutor(max_workers=8) as pool:
        counted = list(pool.map(copies, shards))
    kept = [(s, c) for s, c in zip(shards, counted, strict=True) if c > 0]
    return [s for s, _ in kept], [c for _, c in kept]


def write_truth_files(keys_by_file: dict[str, list[str]], labels: dict[str, int],
                      out_dir: Path) -> int:
    """An ablation's ceiling: files with the same names and keys as the real pseudo-labels, one copy
    of every image and a one-hot soft label from the held-out truth. Returns the rows written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = 0
    for name, keys in keys_by_file.items():
        missing = [k for k in keys if k not in labels]
        if missing:
            raise PseudoFileError(f"{name}: {len(missing)} keys have no held-out label "
                                  f"(e.g. {missing[0]!r})")
        table = pa.table({
            "key": pa.array(keys, pa.string()),
            "copies": pa.array([1] * len(keys), pa.int32()),
            "topk_index": pa.array([[labels[k]] for k in keys], pa.list_(pa.int32())),
            "topk_prob": pa.array([[1.0] for _ in keys], pa.list_(pa.float16())),
        })
        buf = io.BytesIO()
        pq.write_table(table, buf)
        atomic_write_bytes(out_dir / name, buf.getvalue())
        rows += len(keys)
    return rows


def confidence_summary(paths: list[Path], bins: int = 1000) -> dict[str, float | None]:
    """Mean and median teacher confidence over the files, one column of one file at a time (the
    median from a histogram of ``bins`` equal bins on [0, 1], so within 1/bins of the exact one)."""
    total, n = 0.0, 0
    hist = np.zeros(bins, np.int64)
    for path in paths:
        conf = read_table(path, columns=["confidence"]).column("confidence").to_numpy()
        conf = conf[np.isfinite(conf)]
        total += float(conf.sum(dtype=np.float64))
        n += len(conf)
        hist += np.bincount(np.clip((conf * bins).astype(np.int64), 0, bins - 1),
                            minlength=bins)
    if n == 0:
        return {"mean": None, "median": None}
    # the middle value, or the mean of the two middle ones when n is even (ranks from 1)
    cs = np.cumsum(hist)
    lo, hi = np.searchsorted(cs, (n + 1) // 2), np.searchsorted(cs, n // 2 + 1)
    return {"mean": total / n, "median": (int(lo) + int(hi) + 1) / (2 * bins)}

"""Stage ``pseudo_label``, the driver's side: which shards still need labels, the inference run,
and one Parquet file per shard as each one completes.

:mod:`pipeline.inference` builds the Ray Data pipeline; :mod:`pipeline.pseudo_files` owns the file
format. Only label rows (about 100 bytes each) reach the driver, never images.

Why the driver writes the files, and how it knows a shard is finished: a reader follows each
shard's last sample with an end-of-shard row carrying the number of rows it emitted. The driver
keeps the (small) label rows of the shards in flight and writes a shard's file when it holds all
of them, sorted by position in the tar. Ray Data may interleave and reorder rows of different
shards (it does with several actors, and ``preserve_order`` would stall the pool behind the
slowest block), so neither order nor ``__url__`` changes are relied on: completeness is counted,
and order is restored by the row's index. Memory holds only the shards in flight, so it does not
grow with the corpus.

Files appear atomically, so a job killed at any moment and run again labels exactly the shards
without a finished file (or with one made by another teacher, k or batch size), and the result
equals an uninterrupted run row for row. The label stage writes ``copies`` as 0; stage ``select``
(:func:`pipeline.select.select_pseudo_labels`) rewrites each file with the real counts.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import PseudoLabelConfig
from pipeline.fs import location
from pipeline.inference import KIND_END, KIND_OK, data_context, data_settings, inference_dataset
from pipeline.pseudo_files import (
    FILE_FORMAT,
    MAX_BAD_EXAMPLES,
    build_table,
    pending_shards,
    pseudo_file_names,
    remove_stale_temps,
    summarize_files,
    write_table,
)

Progress = Callable[[str], Any]


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
        table = build_table({c: v[ok] for c, v in rows.items()})
        write_table(self.out_dir / self.names[shard], table, meta)
        self.on_done(shard, int(ok.sum()), len(bad))

    def _empty(self) -> dict[str, np.ndarray]:
        """No rows at all (an empty tar): the shard still gets its empty file."""
        k = self.meta["k"]
        empty = {c: np.zeros(0, dtype=object) for c in ("shard", "key", "error")}
        return {**empty, "index": np.zeros(0, np.int64), "kind": np.zeros(0, np.int8),
                "label": np.zeros(0, np.int32), "confidence": np.zeros(0, np.float32),
                "entropy": np.zeros(0, np.float32), "topk_index": np.zeros((0, k), np.int32),
                "topk_prob": np.zeros((0, k), np.float16)}



def label_shards(model_path: str | Path, model_sha256: str, shards: list[str],
                 out_dir: str | Path, cfg: PseudoLabelConfig, *,
                 progress: Progress = print, teacher: dict[str, Any] | None = None
                 ) -> dict[str, Any]:
    """Pseudo-label ``shards`` into ``out_dir/<stem>.parquet``; resumable by shard.

    Needs a running Ray (``ray.init`` before). Shards that already have a finished file from the
    same teacher, k and batch size are skipped. Returns files, rows, bad samples and seconds of this call.
    ``teacher``: the model file's payload (weights not needed) when the caller has just read it
    and checked its sha256; otherwise it is read here. Each teacher actor reads and checks the
    file again in any case.
    """
    from pipeline.checkpoint import read_model_file

    cfg.validate()
    start = time.perf_counter()
    out_dir = location(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # refuse a changed teacher up front, before Ray Data starts
    payload = teacher if teacher is not None else read_model_file(model_path, model_sha256)
    k = min(cfg.topk, int(payload["num_classes"]))
    meta = {"format": FILE_FORMAT, "teacher_sha256": model_sha256, "k": k,
            "batch_size": cfg.label_batch_size, "crop_fraction": cfg.label_crop_fraction,
            "jpeg_dct_scaling": cfg.jpeg_dct_scaling}
    names = pseudo_file_names(list(shards))
    remove_stale_temps(out_dir)
    pending = pending_shards(out_dir, names, meta, progress)
    progress(f"pseudo-label: {len(shards) - len(pending)} of {len(shards)} shards already done, "
             f"{len(pending)} to label with {payload['model_name']} at "
             f"{payload['test_resolution']} px")
    if pending:
        _run_inference(str(model_path), model_sha256, pending, out_dir, names, meta,
                       int(payload["test_resolution"]), cfg, progress)
    summary = summarize_files(out_dir, [names[s] for s in shards])
    summary["seconds"] = round(time.perf_counter() - start, 3)
    return summary


def _run_inference(model_path: str, model_sha256: str, pending: list[str], out_dir: Path,
                   names: dict[str, str], meta: dict[str, Any], resolution: int,
                   cfg: PseudoLabelConfig, progress: Progress) -> None:
    meter = _Meter(len(pending), progress)
    assembler = ShardAssembler(out_dir, names, meta, meter.shard_done)
    with data_context(**data_settings(resolution, cfg)):
        ds = inference_dataset(model_path, model_sha256, pending, resolution, cfg)
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            assembler.add(batch)
            meter.rows(int((batch["kind"] != KIND_END).sum()))
    if assembler.in_flight:  # every reader ends its shard, so this is a bug, not bad data
        raise RuntimeError(f"pseudo-label: shards left incomplete: {assembler.in_flight[:5]}")
    meter.final()


class _Meter:
    """rows/s and shards done/left, every ``every`` seconds and per finished shard."""

    def __init__(self, total_shards: int, progress: Progress, every: float = 5.0) -> None:
        self.total, self.progress, self.every = total_shards, progress, every
        self.start = self.last = time.perf_counter()
        self.done = self.n = 0
        self.shown: tuple[int, int] | None = None  # (rows, shards) of the last line printed

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
        self.last, self.shown = time.perf_counter(), (self.n, self.done)
        rate = self.n / max(self.last - self.start, 1e-9)
        self.progress(f"pseudo-label: {self.n} rows, {rate:.0f} rows/s; shards {self.done}/"
                      f"{self.total} done, {self.total - self.done} left")

    def final(self) -> None:
        if self.shown != (self.n, self.done):  # not the line just printed, again
            self._line()

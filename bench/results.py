"""``bench/latest.json``: every benchmark's figures in one flat file (figure name -> number).

Each bench script measures its own figures and merges them with :func:`merge`, a read-modify-
write under an exclusive lock with an atomic replace: scripts may run one after the other or at
once, and a figure written by one script is never lost or half-written by another. A figure is
a ratio against a baseline measured in the same run unless :data:`FIGURES` says otherwise.
:func:`table` prints whatever the file holds: the known figures with their baseline and target,
then any others (a new script's keys show up without a change here), sorted by name.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from pipeline.storage import atomic_write_json, flocked

LATEST = Path(__file__).resolve().parent / "latest.json"


@dataclass(frozen=True)
class Figure:
    what: str  # what is measured, against which baseline
    target: str = ""  # e.g. ">= 0.9"; empty when there is none
    script: str = ""


FIGURES: dict[str, Figure] = {
    "pseudo_label_end_to_end_40x": Figure(
        "pseudo-label stage, 40x digits, wall time incl. start-up / teacher's bare forward",
        ">= 0.9", "pseudo_label.py"),
    "pseudo_label_steady_40x": Figure(
        "pseudo-label stage, 40x digits, first to last shard / teacher's bare forward",
        "", "pseudo_label.py"),
    "pseudo_label_teacher_forward_over_plain": Figure(
        "teacher actor's network (BatchNorm folded, channels_last) / the model as loaded "
        "(contiguous), bare forward, t0 at 32 px, batch 512, 1 thread, images/s",
        "", "pseudo_label.py"),
    "memory_40x_over_1x": Figure(
        "peak PSS of the whole process tree, labeling 40x digits / 1x", "<= 1.1",
        "pseudo_label.py"),
    "bytes_per_pseudo_label_row": Figure(
        "bytes on disk per pseudo-label row (Parquet, top-10 of 10 classes; bytes, no baseline)",
        "", "pseudo_label.py"),
    "train_epoch_teacher_steady": Figure(
        "teacher epoch (our streams, EMA) / plain PyTorch loop, warm epochs", ">= 0.95",
        "train_epoch.py"),
    "train_epoch_teacher_with_startup": Figure(
        "the same, timed from nothing built to the last epoch's end", ">= 0.95",
        "train_epoch.py"),
    "train_epoch_student_steady": Figure(
        "student epoch (labeled + pseudo-labeled streams) / plain PyTorch loop, warm epochs",
        ">= 0.95", "train_epoch.py"),
    "train_epoch_student_with_startup": Figure(
        "the same, timed from nothing built to the last epoch's end", ">= 0.95",
        "train_epoch.py"),
    "augment_vs_plain": Figure(
        "decode + crop + flip + RandAugment, 640x480 JPEG -> 224 px, images per CPU-second / "
        "plain PIL + torchvision v2 loop", "", "augment.py"),
    "augment_vs_plain_digits": Figure(
        "the same on the 32x32 PNG digits -> 32 px", "", "augment.py"),
    "pseudo_label_s3_over_local_10x": Figure(
        "pseudo-label stage from and to a local S3 server (moto) / the same on local disk, end "
        "to end, 10x digits", "", "s3.py"),
    "pseudo_label_s3_over_local_40x": Figure("the same at 40x digits", "", "s3.py"),
    "eval_decode_reduced_over_full_12mp_224": Figure(
        "decode + eval crop to 224 px of 4000x3000 photo JPEGs, images/CPU-s: reduced decoding "
        "(DCT scaling, the default) / full decode", "", "reduced_decode.py"),
    "eval_decode_reduced_over_full_12mp_600": Figure(
        "the same to 600 px", "", "reduced_decode.py"),
    "eval_decode_reduced_over_full_2mp_224": Figure(
        "the same, 1600x1200 photo JPEGs to 224 px", "", "reduced_decode.py"),
    "eval_decode_reduced_over_full_2mp_600": Figure(
        "the same to 600 px (not reduced: 1200 < 2 x 632)", "", "reduced_decode.py"),
    "train_decode_reduced_over_full_12mp_224": Figure(
        "decode + random-resized crop + flip to 224 px of 4000x3000 photo JPEGs: reduced to "
        "the smallest crop's need (915 px) / full decode", "", "reduced_decode.py"),
    "train_decode_reduced_over_full_2mp_224": Figure(
        "the same, 1600x1200 (not reduced: 1200 < 2 x 915)", "", "reduced_decode.py"),
    "prepare_workers_over_one": Figure(
        "prepare imagefolder of 4000x3000 photo JPEGs (each decoded in full to check it), "
        "files/s: one process per CPU / one process", "", "prepare.py"),
    "prepare_max_short_side_915_over_kept": Figure(
        "the same with --max-short-side 915 (shrunk, stored as JPEG 90) / files kept as they "
        "are, files/s, one process per CPU", "", "prepare.py"),
    "prepare_max_short_side_915_bytes_over_kept": Figure(
        "bytes stored with --max-short-side 915 / without (bytes ratio)", "", "prepare.py"),
    "train_decode_max_short_side_915_over_kept_12mp_224": Figure(
        "training path at 224 px (reduced decode, random-resized crop, flip), images/CPU-s: "
        "files shrunk to 915 px / the 4000x3000 originals", "", "prepare.py"),
    "depthwise_train_step_t0": Figure(
        "CPU training step of efficientnet_t0, batch 128 at 32 px, 1 thread, images/CPU-s: our "
        "depthwise layers (matmul weight gradient on small maps) / PyTorch's nn.Conv2d", "",
        "depthwise.py"),
    "depthwise_train_step_t1": Figure("the same, efficientnet_t1", "", "depthwise.py"),
    "depthwise_train_step_t2": Figure("the same, efficientnet_t2", "", "depthwise.py"),
    "fit_startup_ray_config_over_ours": Figure(
        "Ray Train fit of a one-worker function that returns at once, wall s, with Ray's "
        "TorchConfig / with TorchProcessGroup (torch not imported in the controller)", "",
        "fit_startup.py"),
    # bench/gpu_check.py on a GPU (bench/latest_gpu.json); with --device cpu --quick the same
    # keys start with cpu_quick_ and only show that the code runs.
    "gpu_teacher_step_bf16_cl_over_fp32": Figure(
        "B0 224 px teacher steps, batch 64: our loop (bf16 autocast, channels_last) / float32 "
        "contiguous plain loop", "", "gpu_check.py"),
    "gpu_teacher_step_bf16_cl_over_fp32_batch4x": Figure(
        "the same at batch 256", "", "gpu_check.py"),
    "gpu_teacher_step_images_per_s": Figure(
        "our teacher steps, batch 64, images/s (no baseline)", "", "gpu_check.py"),
    "gpu_teacher_step_images_per_s_batch4x": Figure(
        "the same at batch 256, images/s (no baseline)", "", "gpu_check.py"),
    "gpu_epoch_host_reads": Figure(
        "synchronising calls in a warm 4-step training epoch (count, no baseline)", "<= 1",
        "gpu_check.py"),
    "gpu_label_actor_over_bare_forward": Figure(
        "teacher actor's callable (uint8 in, top-k out), B0 224 px, batch 256 / bare forward "
        "on normalised device tensors", "", "gpu_check.py"),
    "gpu_label_images_per_s": Figure(
        "the actor's callable, images/s (no baseline)", "", "gpu_check.py"),
    "gpu_batch_mates_bit_exact": Figure(
        "1 when an image's outputs are bit-identical whatever its batch mates", ">= 1",
        "gpu_check.py"),
}


def read(path: Path = LATEST) -> dict[str, float]:
    """The figures in ``path`` ({} when there is no file yet)."""
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object of figure name -> number")
    return data


def merge(figures: dict[str, float], path: Path = LATEST) -> dict[str, float]:
    """Add or replace ``figures`` in ``path``, keeping every other key; returns the whole file."""
    bad = [k for k, v in figures.items() if not isinstance(v, int | float) or isinstance(v, bool)
           or not math.isfinite(v)]
    if bad:
        raise ValueError(f"figures must be finite numbers; not so: {bad}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with flocked(path.with_name(path.name + ".lock")):
        data = {**read(path), **{k: round(float(v), 4) for k, v in figures.items()}}
        atomic_write_json(path, dict(sorted(data.items())))
    return data


def _meets(value: float, target: str) -> str:
    if not target:
        return ""
    op, bound = target.split()
    ok = value >= float(bound) if op == ">=" else value <= float(bound)
    return "yes" if ok else "no"


def table(data: dict[str, float]) -> str:
    """One Markdown table of every figure in ``data``: the known ones first, in FIGURES' order."""
    rows = ["| figure | value | target | met | what (baseline measured in the same run) |",
            "|---|---|---|---|---|"]
    known = [k for k in FIGURES if k in data]
    for name in known + sorted(k for k in data if k not in FIGURES):
        fig = FIGURES.get(name, Figure("(no description in bench/results.py)"))
        value = data[name]
        shown = f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3f}"
        rows.append(f"| `{name}` | {shown} | {fig.target} | {_meets(value, fig.target)} | "
                    f"{fig.what} |")
    return "\n".join(rows)

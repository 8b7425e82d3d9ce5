"""Ray Data batch inference: the teacher labels decoded shards (stage ``pseudo_label``)::

    from_items(pending shards, a run of consecutive shards per block)
      -> map_batches(read_decode_shards)           CPU tasks: read the tars, decode, resize, crop
         -> repartition(batch rows)                fused into the read tasks: full batches
      -> map_batches(TeacherPredictor, ActorPool)  the teacher, loaded once per actor
      -> the driver (pipeline.pseudo_label)        one Parquet file per shard

This module builds the Dataset and holds the callable class for the model, nothing else; the
driver side (resume, files, progress) is :mod:`pipeline.pseudo_label`.

Why the shards are read by our own task rather than ``ray.data.read_webdataset``: a damaged shard
must be skipped and counted, never fatal. ``read_webdataset`` raises on a truncated tar and the
whole dataset fails (checked with Ray 2.60); ``DataContext.max_errored_blocks`` would drop the
block instead, silently, with no record of which samples were lost. The read tasks use
:func:`pipeline.shards.read_shard`, the reader of every stage, and turn each damaged sample into a
"bad" row that flows through the pipeline like any other, so bad data is reported by shard and key
and the readable samples of a damaged shard are still labeled.

Why the teacher always runs full batches: CPU (and GPU) kernels take other code paths for other
batch sizes, so an image's probabilities can differ in the last bits depending on how many rows
share its batch, and which rows do depends on scheduling. The teacher pads every forward pass to
``batch`` rows, which makes each row's output a function of the image alone: a resumed run
reproduces an uninterrupted one bit for bit. Padding costs compute, so the readers hand over full
batches: a read task takes a run of consecutive shards and cuts their samples into blocks of
exactly ``batch`` rows across shard boundaries, which leaves one partial batch per read task
(:func:`read_tasks` keeps the tasks few), whatever the size of the shards. No separate repartition
stage: Ray Data fuses the non-strict repartition into the read tasks, and it keeps the readers a
stage of their own, where Ray Data would otherwise fuse them into the actors and make decoding and
inference take turns. (An earlier design read one shard per task and used a strict repartition,
which runs as tasks of its own: on 2 CPUs the teacher then waited 50-100 ms for every batch.)

Images travel as uint8, resized and cropped by the readers; the teacher normalises them (on the
GPU when it has one): a quarter of the bytes of float32 through the object store and over PCIe.
The readers run ahead of the teacher within a fixed object-store budget (:func:`data_settings`),
so a fast reader never fills memory with decoded images, however large the corpus.

Each shard's last sample is followed by an end-of-shard row (KIND_END) carrying the number of rows
the shard produced: how the driver knows a shard is complete whatever order rows arrive in.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.config import PseudoLabelConfig
from pipeline.errors import UserError
from pipeline.images import decode_image
from pipeline.shards import BadSample, ShardError, read_shard

READ_TASKS_PER_CPU = 4  # read tasks per reader CPU, so the readers' load stays balanced ...
MAX_SHARDS_PER_TASK = 64  # ... and no one task holds much of a large corpus
READ_AHEAD_BATCHES = 8  # decoded batches buffered per reader and per actor (the memory bound)

# Row kinds in the stream between the stages.
KIND_OK, KIND_BAD, KIND_END = 0, 1, 2


class InferenceError(UserError, ValueError):
    """The cluster cannot run the requested actors; the message says what to change."""


# ============================================================================ readers


def decode_images(images: list[bytes], resolution: int, where: list[str],
                  crop_fraction: float | None = None, jpeg_dct_scaling: bool = True
                  ) -> tuple[np.ndarray, list[str]]:
    """Encoded images -> (N, 3, R, R) uint8 resized and center-cropped, and a reason per image
    ('' = ok). The teacher normalises (:func:`pipeline.transforms.normalize`): uint8 is a quarter
    of float32 through the object store and over PCIe. Large JPEGs are decoded reduced unless
    ``jpeg_dct_scaling`` is False, exactly as the evaluation streams decode them.

    Images of the same size are transformed as one batch: per-image calls of the v2 transforms
    cost about 10x more than the decode itself on small images.
    """
    from pipeline.transforms import eval_crop, eval_min_side

    transform = eval_crop(resolution, crop_fraction)
    min_side = eval_min_side(resolution, crop_fraction, jpeg_dct_scaling)
    out = np.zeros((len(images), 3, resolution, resolution), dtype=np.uint8)
    reasons = [""] * len(images)
    by_shape: dict[tuple[int, ...], list[tuple[int, torch.Tensor]]] = {}
    for i, data in enumerate(images):
        try:
            img = decode_image(data, where[i], min_side)  # (3, H, W) uint8
        except ShardError as e:
            reasons[i] = str(e)
            continue
        by_shape.setdefault(tuple(img.shape), []).append((i, img))
    for group in by_shape.values():
        idx = [i for i, _ in group]
        out[idx] = transform(torch.stack([img for _, img in group])).numpy()  # (n, 3, R, R)
    return out, reasons


def read_decode_shards(batch: dict[str, np.ndarray], resolution: int, rows: int,
                       crop_fraction: float | None = None, jpeg_dct_scaling: bool = True
                       ) -> Iterator[dict[str, np.ndarray]]:
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
        for s in read_shard(path):
            pending.append(_Row(path, KIND_BAD, s.index, s.key, s.reason) if isinstance(s, BadSample)
                           else _Row(path, KIND_OK, s.index, s.key, s.image))
            emitted += 1
            if len(pending) == rows:
                yield _decode_rows(pending, resolution, crop_fraction, jpeg_dct_scaling)
                pending = []
        pending.append(_Row(path, KIND_END, -1, "", "", emitted))
        if len(pending) == rows:
            yield _decode_rows(pending, resolution, crop_fraction, jpeg_dct_scaling)
            pending = []
    if pending:
        yield _decode_rows(pending, resolution, crop_fraction, jpeg_dct_scaling)


@dataclass(frozen=True)
class _Row:
    shard: str
    kind: int
    index: int
    key: str
    payload: bytes | str  # image bytes (KIND_OK) or the reason (KIND_BAD)
    n: int = 0  # KIND_END: sample rows of the shard


def _decode_rows(rows: list[_Row], resolution: int, crop_fraction: float | None = None,
                 jpeg_dct_scaling: bool = True) -> dict[str, np.ndarray]:
    kinds = [r.kind for r in rows]
    errors = [r.payload if r.kind == KIND_BAD else "" for r in rows]
    ok = [i for i, k in enumerate(kinds) if k == KIND_OK]
    images = np.zeros((len(rows), 3, resolution, resolution), dtype=np.uint8)
    decoded, reasons = decode_images([rows[i].payload for i in ok], resolution,
                                     [f"shard {rows[i].shard}, key {rows[i].key}" for i in ok],
                                     crop_fraction, jpeg_dct_scaling)
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


def inference_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The network the teacher labels with: eval mode, each BatchNorm folded into the convolution
    before it (:mod:`models.fold`: one pass over each activation map instead of two), in
    channels_last on ``device``. Both pay on a CPU too, not only on a GPU's tensor cores:
    bench/pseudo_label.py measures this network against the model as loaded
    (``pseudo_label_teacher_forward_over_plain``). The outputs equal the plain model's to
    float rounding."""
    from models.fold import fold_batchnorm

    model = model.eval()
    fold_batchnorm(model)
    return model.to(device, memory_format=torch.channels_last)


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
        self.model = inference_model(model, self.device)

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
            # uint8 to the device (to a GPU: a quarter of float32's bytes), normalised there
            x = self.normalize(x.to(self.device)).contiguous(memory_format=torch.channels_last)
            if self.device.type == "cuda":  # bf16 pays off on tensor cores only
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    logits = self.model(x)
                return soft_labels(logits.float().cpu(), self.k)
            return soft_labels(self.model(x), self.k)

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


# ============================================================================ Ray Data


def data_settings(resolution: int, cfg: PseudoLabelConfig) -> dict[str, Any]:
    """DataContext settings of the inference dataset.

    A reader's output becomes a block per batch rather than per 128 MiB (Ray Data's default), so
    the teacher starts on the first batch. The object store budget holds READ_AHEAD_BATCHES
    batches per process of the pipeline: enough that the teacher never waits, and a bound that
    does not grow with the corpus (by default Ray Data lets fast readers run ahead until its
    share of the object store, 30% of RAM, is full).
    """
    import ray
    from ray.data import DataContext

    batch_bytes = cfg.label_batch_size * 3 * resolution * resolution  # uint8 images
    processes = cfg.label_actors + _reader_cpus(cfg, ray.cluster_resources())
    budget = READ_AHEAD_BATCHES * processes * batch_bytes
    options = copy.copy(DataContext.get_current().execution_options)
    limits = options.resource_limits  # a smaller limit set by the user is kept
    options.resource_limits = limits.copy(object_store_memory=min(limits.object_store_memory,
                                                                  budget))
    # Our own progress lines replace Ray Data's bars, which flood job logs.
    return {"enable_progress_bars": False, "target_max_block_size": batch_bytes,
            "execution_options": options}


def _reader_cpus(cfg: PseudoLabelConfig, cluster: dict[str, float]) -> int:
    return max(1, int(cluster.get("CPU", 0) - cfg.cpus_per_actor * cfg.label_actors))


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
    """The readers' half: shards -> blocks of ``cfg.label_batch_size`` decoded rows (Ray Data tasks)."""
    import ray

    tasks = read_tasks(len(shards), reader_cpus)
    ds = ray.data.from_items(shards, override_num_blocks=tasks)  # consecutive shards per block
    ds = ds.map_batches(read_decode_shards, batch_size=None, num_cpus=1,
                        fn_kwargs={"resolution": resolution, "rows": cfg.label_batch_size,
                                   "crop_fraction": cfg.label_crop_fraction,
                                   "jpeg_dct_scaling": cfg.jpeg_dct_scaling})
    # Blocks of exactly batch_size rows. A non-strict repartition right after a map is fused into
    # the read tasks (no tasks of its own, no copy) and is not fused further, so the readers stay
    # a stage of their own instead of taking turns with the teacher inside its actor.
    return ds.repartition(target_num_rows_per_block=cfg.label_batch_size)


def inference_dataset(model_path: str, model_sha256: str, shards: list[str], resolution: int,
                      cfg: PseudoLabelConfig) -> Any:
    """The lazy Ray Data pipeline: shards -> read + decode (tasks) -> teacher (actor pool)."""
    import ray

    cluster = ray.cluster_resources()
    gpus = check_resources(cfg, cluster)
    ds = decoded_dataset(shards, resolution, cfg, _reader_cpus(cfg, cluster))
    return ds.map_batches(
        TeacherPredictor, compute=ray.data.ActorPoolStrategy(size=cfg.label_actors),
        batch_size=cfg.label_batch_size, num_gpus=gpus, num_cpus=cfg.cpus_per_actor,
        fn_constructor_kwargs={"model_path": model_path, "model_sha256": model_sha256,
                               "topk": cfg.topk, "batch_size": cfg.label_batch_size,
                               "use_gpu": gpus > 0,
                               "threads": max(1, int(cfg.cpus_per_actor))})


def check_resources(cfg: PseudoLabelConfig, cluster: dict[str, float]) -> float:
    """GPUs per actor; refuses requests that would leave Ray Data waiting forever."""
    gpus = cfg.gpus_per_actor
    if gpus is None:
        gpus = 1.0 if cluster.get("GPU", 0) > 0 else 0.0
    if gpus * cfg.label_actors > cluster.get("GPU", 0):
        raise InferenceError(
            f"{cfg.label_actors} teacher actors x {gpus} GPUs do not fit the cluster's "
            f"{cluster.get('GPU', 0):g} GPUs; lower --label-actors or --gpus-per-actor")
    # Readers need CPUs of their own, or the actors wait for input that is never decoded.
    if cluster.get("CPU", 0) - cfg.cpus_per_actor * cfg.label_actors < 1:
        raise InferenceError(
            f"{cfg.label_actors} teacher actors x {cfg.cpus_per_actor:g} CPUs leave less than one of "
            f"the cluster's {cluster.get('CPU', 0):g} CPUs to read and decode shards; lower "
            "--label-actors or --cpus-per-actor")
    return gpus


@contextlib.contextmanager
def data_context(**settings: Any) -> Iterator[None]:
    """Ray Data settings for the datasets made inside (each copies the context it starts with)."""
    from ray.data import DataContext

    from pipeline.logs import quiet_console

    quiet_console("ray.data")  # its execution plans at INFO, unless --verbose
    ctx = DataContext.get_current()
    old = {name: getattr(ctx, name) for name in settings}
    for name, value in settings.items():
        setattr(ctx, name, value)
    try:
        yield
    finally:
        for name, value in old.items():
            setattr(ctx, name, value)



"""The batches a training worker consumes, built from its :class:`~pipeline.train.Job`: the
noised labeled and pseudo-labeled training batches and the test split. The streams themselves
(shard shares, shuffling, damage) are :mod:`pipeline.data`; this module picks the transforms and
batch sizes the job asks for.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from pipeline.config import StudentConfig, TrainConfig
from pipeline.data import LabeledStream, PseudoStream, make_loader
from pipeline.transforms import eval_min_side, eval_transform, train_min_side, train_transform

if TYPE_CHECKING:
    from pipeline.train import Job, WorkerContext

Batch = tuple[torch.Tensor, torch.Tensor]  # images (B, 3, R, R), labels (B,) or targets (B, C)


def _student(cfg: TrainConfig) -> StudentConfig:
    if not isinstance(cfg, StudentConfig):
        raise TypeError(f"a job with pseudo-labels needs a StudentConfig, not {type(cfg).__name__}")
    return cfg


def cache_bytes(cfg: TrainConfig) -> int:
    """Each training stream's decoded-cache budget (:class:`pipeline.data.DecodedCache`)."""
    return int(cfg.decoded_cache_mb * 2**20)


def pseudo_batch_size(cfg: TrainConfig) -> int:
    return max(1, round(cfg.batch_size * _student(cfg).unlabel_ratio))


def labeled_batches(job: Job, ctx: WorkerContext, transform: Any,
                    seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
    cfg = job.config
    stream = LabeledStream(job.labeled["shards"], transform, rank=ctx.rank,
                           world_size=ctx.world_size, shuffle_buffer=cfg.shuffle_buffer, seed=seed,
                           num_classes=job.num_classes, damage_limit=cfg.damage_limit,
                           damage_dir=job.damage_dir, cache_bytes=cache_bytes(cfg),
                           decode_min_side=_train_side(job), weights=job.labeled.get("weights"),
                           split_count=job.labeled.get("count"))
    return iter(make_loader(stream, cfg.batch_size, cfg.loader_workers))


def _train_side(job: Job) -> int | None:
    cfg = job.config
    return train_min_side(job.model["train_resolution"], cfg.crop_scale_min, cfg.jpeg_dct_scaling)


def pseudo_batches(job: Job, ctx: WorkerContext, transform: Any, seed: int) -> Iterator[Batch]:
    assert job.pseudo is not None
    cfg = _student(job.config)
    stream = PseudoStream(job.pseudo["shards"], job.pseudo["dir"], transform,
                          num_classes=job.num_classes,
                          temperature=cfg.temperature if cfg.soft_labels else -1.0,
                          rank=ctx.rank, world_size=ctx.world_size,
                          shuffle_buffer=cfg.shuffle_buffer, seed=seed,
                          cache_bytes=cache_bytes(cfg), weights=job.pseudo.get("weights"),
                          decode_min_side=_train_side(job), names=job.pseudo.get("names"))
    return iter(make_loader(stream, pseudo_batch_size(cfg), cfg.loader_workers))


def train_batches(job: Job, ctx: WorkerContext, epoch: int) -> Iterator[tuple[Batch, Batch | None]]:
    """Endless (labeled batch, pseudo-labeled batch or None) pairs, noised. A generator: the
    streams start at the first ``next``, which keeps the random state's order (module doc)."""
    cfg = job.config
    ra = None
    if job.randaugment:
        from pipeline.augment import RandAugment

        ra = RandAugment(num_ops=job.randaugment["num_ops"], magnitude=job.randaugment["magnitude"],
                         pixels=job.randaugment.get("pixels", "official"))
    tf = train_transform(job.model["train_resolution"], crop_scale=(cfg.crop_scale_min, 1.0),
                         flip=cfg.flip, randaugment=ra)
    seed = cfg.seed * 1000 + epoch  # a resumed run gets a fresh order
    labeled = labeled_batches(job, ctx, tf, seed)
    if job.pseudo is None:
        for images, labels, _ in labeled:
            yield (images, labels), None
        return
    pseudo = pseudo_batches(job, ctx, tf, seed)
    for (images, labels, _), pseudo_batch in zip(labeled, pseudo, strict=False):
        yield (images, labels), pseudo_batch


def test_loader(job: Job, ctx: WorkerContext) -> Any:
    """This rank's disjoint share of the test split, un-noised at the test resolution."""
    cfg, res = job.config, job.model["test_resolution"]
    ds = LabeledStream(job.test["shards"], eval_transform(res, cfg.eval_crop_fraction),
                       rank=ctx.rank, world_size=ctx.world_size, train=False,
                       num_classes=job.num_classes, damage_limit=cfg.damage_limit,
                       split="test", split_count=job.test.get("count"),
                       weights=job.test.get("weights"),
                       decode_min_side=eval_min_side(res, cfg.eval_crop_fraction,
                                                     cfg.jpeg_dct_scaling))
    return make_loader(ds, job.config.eval_batch_size, job.config.loader_workers)

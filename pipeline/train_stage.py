"""Stages train, finetune and evaluate of a round, from the driver: the job the workers run, and
what their final checkpoint says, into the round's record.

The workers' loop is :mod:`pipeline.train`; Ray Train is :mod:`pipeline.runner`.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
import time
from typing import TYPE_CHECKING, Any

from pipeline.config import StudentConfig
from pipeline.fs import read_pandas, read_table
from pipeline.job import Job
from pipeline.manifest import FileRef, Metrics, RoundRecord, save_round
from pipeline.pseudo_files import pseudo_file_names, shards_with_selection
from pipeline.runner import RunError, TrainingCrash, fit
from pipeline.storage import atomic_write_bytes

if TYPE_CHECKING:
    from pipeline.rounds import Plan


def spread_warning(what: str, weights: list[int] | None, readers: int, workers: int,
                   loader_workers: int) -> str | None:
    """One line when a training stream's samples cannot be dealt evenly to its readers, so that
    some come up markedly more often than others (:func:`pipeline.data.sampling_spread`). Both
    streams cut their shards into equal runs of samples where whole shards deal unevenly, so
    this is left only with a handful of samples per reader (``weights``: samples, or selected
    copies, per shard). None when they deal evenly, or when the samples per shard are not
    known (an older ``dataset.json``)."""
    from pipeline.data import EVEN_ENOUGH, sampling_spread

    if not weights:
        return None
    spread = sampling_spread(weights, readers, cut=True)
    if spread < EVEN_ENOUGH:
        return None
    loaders = max(1, loader_workers)
    samples = "images" if what == "labeled" else "selected copies"
    return (f"warning: the {what} split's {sum(weights)} {samples} do not divide evenly among "
            f"the {readers} training readers ({workers} workers x {loaders} loader "
            f"process{'es' if loaders > 1 else ''}): some samples come up {spread:.1f}x as "
            "often as others; fewer readers (--num-workers, --loader-workers) even this out")


def one_class_warning(labels: list[int], preds: list[int], classes: list[str]) -> str | None:
    """One line when the model gave every test image the same class while the test split holds
    several: its weights may be fine while its BatchNorm statistics are not, as after a short
    run, and re-estimating them can recover it."""
    if len(set(labels)) < 2 or len(set(preds)) != 1:
        return None
    return (f"warning: the model predicts {classes[preds[0]]!r} for every one of the {len(preds)} "
            "test images; in a short run its BatchNorm statistics may not have settled: train "
            "longer, or add --finetune-epochs 1 --finetune-norm all, which re-estimates them")


def dealt_pseudo_shards(unlabeled: list[str], pseudo_dir: str,
                        recorded: dict[str, int | None] | None) -> dict[str, Any]:
    """What the student's pseudo-labeled stream is dealt: the unlabeled shards with a selected
    row, their copies, and each one's file name, named from the whole split as labeling named
    them (two shards that share a stem have hashed names; a subset may hold only one of them)."""
    names = pseudo_file_names(unlabeled)
    shards, weights = shards_with_selection(unlabeled, pseudo_dir, recorded)
    return {"shards": shards, "weights": weights, "names": {s: names[s] for s in shards}}


def make_job(p: Plan, rec: RoundRecord) -> Job:
    """Everything the workers need, as plain data (the config travels as its dataclass)."""
    cfg, info, layout = p.cfg, p.info, p.layout
    pseudo = randaugment = None
    if isinstance(cfg, StudentConfig):
        pl = rec.pseudo_labels
        pseudo = {"shards": info.split("unlabeled").shards, "dir": str(layout.resolve(pl.uri)),
                  "count": pl.selected_with_copies}
        if cfg.truth_labels:
            pseudo.update(dir=str(layout.truth_dir(p.round_)),
                          count=_truth_files(p, rec))
        if pseudo["count"] == 0:
            raise RunError("selection kept no pseudo-labels; lower --threshold or check the "
                           "teacher")
        recorded = None if cfg.truth_labels else {f.name: f.copies for f in pl.files}
        pseudo.update(dealt_pseudo_shards(pseudo["shards"], pseudo["dir"], recorded))
        if cfg.randaugment and cfg.randaugment_n > 0 and cfg.randaugment_m:
            randaugment = {"num_ops": cfg.randaugment_n, "magnitude": cfg.randaugment_m,
                           "pixels": cfg.randaugment_pixels}
    # weights: samples per shard, for dealing the shards and sizing a torn shard's loss
    split = {s: {"shards": info.split(s).shards, "count": info.split(s).count,
                 "weights": info.split(s).shard_counts} for s in ("labeled", "test")}
    readers = cfg.num_workers * max(1, cfg.loader_workers)
    for what, weights in (("labeled", split["labeled"]["weights"]),
                          ("pseudo-labeled", pseudo["weights"] if pseudo else None)):
        line = spread_warning(what, weights, readers, cfg.num_workers, cfg.loader_workers)
        if line:
            print(line, file=sys.stderr, flush=True)
    m = rec.model
    model = {"name": m.name, "train_resolution": m.train_resolution,
             "test_resolution": m.test_resolution, "dropout": m.dropout, "drop_path": m.drop_path,
             "options": dict(m.options)}
    return Job(config=cfg, role=p.role, classes=info.classes, labeled=split["labeled"],
               test=split["test"], model=model,
               predictions_dir=str(layout.predictions_dir(p.round_)), pseudo=pseudo,
               randaugment=randaugment, init=dataclasses.asdict(p.init) if p.init else None,
               tensorboard_dir=str(layout.tensorboard_dir(p.round_)) if cfg.tensorboard
               else None, damage_dir=str(layout.damage_dir(p.round_)),
               norm_shards=list(info.splits["unlabeled"].shards) if "unlabeled" in info.splits
               else None)


def train_stage(p: Plan, rec: RoundRecord, use_gpu: bool) -> None:
    """Train (or resume), then record train, finetune and evaluate from the final checkpoint."""
    import pandas as pd

    from pipeline.checkpoint import read_state, read_weights, save_model_file

    cfg, layout, art = p.cfg, p.layout, p.layout.artifact_dir(p.round_)
    # Before the stage is recorded: a job that cannot start (a selection that kept nothing)
    # has not "started training", so another --threshold is still taken, not refused.
    job = make_job(p, rec)
    rec.set_stage("train", "running")
    save_round(layout, rec)
    t0 = time.time()
    final = fit(job, art, use_gpu=use_gpu)
    try:
        state = read_state(final)
        if state.get("phase") != "done":  # never a half-trained model as the round's model.pt
            raise TrainingCrash(f"training ended in phase {state.get('phase')!r}, not done; "
                                "the round is recorded as failed: run the same command again")
        model_path = layout.model_path(p.round_)
        sha = save_model_file(model_path, read_weights(final), model_name=cfg.model,
                              classes=p.info.classes,
                              train_resolution=rec.model.train_resolution,
                              test_resolution=rec.model.test_resolution,
                              model_options=rec.model.options,
                              extra={"run": cfg.run, "round": p.round_})
    finally:
        shutil.rmtree(final, ignore_errors=True)
    parts = sorted(layout.predictions_dir(p.round_).glob("rank-*.parquet"))
    preds = pd.concat([read_pandas(x) for x in parts], ignore_index=True)
    atomic_write_bytes(layout.test_predictions(p.round_),
                       preds.sort_values("key").to_parquet(index=False))
    line = one_class_warning(preds["label"].tolist(), preds["pred"].tolist(), p.info.classes)
    if line:
        print(line, file=sys.stderr, flush=True)
    seconds = state["seconds"]
    from pipeline.data import merge_damage

    rec.set_stage("train", "complete", seconds=round(seconds.get("train", 0.0), 2),
                  epochs=state["epoch"], wall_seconds=round(time.time() - t0, 2),
                  damage=merge_damage(layout.damage_dir(p.round_),
                                      readers=cfg.num_workers * max(1, cfg.loader_workers)))
    if state["finetune"]:
        rec.set_stage("finetune", "complete", seconds=round(seconds.get("finetune", 0.0), 2),
                      **state["finetune"])
    final_metrics = dict(state["final_metrics"])
    skipped = p.info.split("test").count - int(final_metrics.get("n", 0))
    rec.set_stage("evaluate", "complete", seconds=round(seconds.get("evaluate", 0.0), 2),
                  predictions=layout.relative(layout.test_predictions(p.round_)),
                  damaged_skipped=max(0, skipped))
    rec.metrics = Metrics(**{k: v for k, v in final_metrics.items()
                             if k in ("top1", "top5", "loss", "n")})
    if p.parent is not None:
        rec.metrics.teacher_top1 = p.parent.record.metrics.top1
    rec.history = state["history"]
    rec.resumed_from = state["resumed_from"]
    rec.checkpoint = FileRef(uri=layout.relative(model_path), sha256=sha)


def _truth_files(p: Plan, rec: RoundRecord) -> int:
    """The ceiling of an ablation: pseudo-label files whose labels are the held-out truth."""

    from pipeline.pseudo_files import PseudoFileError, write_truth_files

    info = p.info
    if info.unlabeled_truth is None or not info.unlabeled_truth.exists():
        raise RunError(f"--truth-labels needs the held-out labels of the unlabeled split "
                       f"(unlabeled_truth in {info.path}/dataset.json), which this dataset "
                       "does not have")
    truth = read_pandas(info.unlabeled_truth)
    labels = dict(zip(truth["key"].astype(str), truth["label"].astype(int), strict=True))
    src = p.layout.resolve(rec.pseudo_labels.uri)
    keys = {f.name: read_table(f, columns=["key"]).column("key").to_pylist()
            for f in sorted(src.glob("*.parquet"))}
    try:
        rows = write_truth_files(keys, labels, p.layout.truth_dir(p.round_))
    except PseudoFileError as e:
        raise RunError(str(e)) from None
    print(f"truth labels: {rows} unlabeled images with their held-out labels "
          f"({p.layout.truth_dir(p.round_)})", flush=True)
    return rows

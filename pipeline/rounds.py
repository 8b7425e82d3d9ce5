"""One round of Noisy Student, from the checks to the manifest: shared by teacher and student.

    round 0 (teacher):  train -> [finetune] -> evaluate
    round N (student):  pseudo_label -> select -> train -> finetune -> evaluate

Every stage is recorded in ``manifests/<run>/round-<N>.json``; running the same command again
continues at the first stage that is not complete (training resumes from its last epoch
checkpoint). Every user mistake is found before anything is written.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from pipeline import manifest as mf
from pipeline.config import StudentConfig, TrainConfig, to_dict
from pipeline.dataset import DatasetInfo, load_dataset
from pipeline.runner import (
    RunError,
    check_resources,
    cluster_summary,
    fit,
    has_checkpoint,
    ray_session,
    resolve_root,
)
from pipeline.train import Job, read_state, read_weights

# RandAugment magnitude by student size (RECIPE.md); the tiny family mirrors B0..B3.
RANDAUGMENT_M = {"0": 0, "1": 0, "2": 6, "3": 12, "4": 15, "5": 18, "6": 24, "7": 27, "2l": 27}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def default_magnitude(model: str) -> float:
    suffix = model.rsplit("_", 1)[-1]
    return float(RANDAUGMENT_M.get(suffix[1:] if suffix != "l2" else "2l", 0))


def next_model(name: str) -> str:
    """The next larger model of the same family (t0 -> t1, b3 -> b4); the largest stays."""
    from models import list_models

    family = [m for m in list_models() if m.rsplit("_", 1)[-1][0] == name.rsplit("_", 1)[-1][0]]
    i = family.index(name)
    return family[min(i + 1, len(family) - 1)]


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root))
    except ValueError:
        return str(path.resolve())


def _preflight(info: DatasetInfo, limit: int) -> None:
    """Decode every labeled and test image when the splits are small enough to do it quickly."""
    from pipeline.shards import decode_image, read_samples

    shards = info.split("labeled").shards + info.split("test").shards
    total = info.split("labeled").count + info.split("test").count
    if total > limit:
        log(f"preflight: {total} labeled+test images > --preflight-limit {limit}; a bad image "
            "will stop training when it is reached")
        return
    for path in shards:
        if not Path(path).is_file():
            raise RunError(f"shard {path} listed in {info.path}/dataset.json does not exist")
        for s in read_samples([path]):
            decode_image(s.image, f"shard {s.shard}, key {s.key}")
            if s.label is None or not 0 <= s.label < info.num_classes:
                raise RunError(f"shard {s.shard}, key {s.key}: label {s.label} is not one of the "
                               f"dataset's {info.num_classes} classes")


# ----------------------------------------------------------------------------- teacher lookup


def parent_round(root: Path, run: str, round_: int) -> dict[str, Any]:
    """Round N-1's manifest, complete, or a message saying which command makes it."""
    cmd = (f"python jobs/teacher.py --run {run} --data DATA" if round_ - 1 == 0
           else f"python jobs/student.py --run {run} --round {round_ - 1}")
    m = mf.load_round_if_exists(root, run, round_ - 1)
    if m is None:
        raise RunError(f"round {round_} needs round {round_ - 1} of run {run!r}, which does not "
                       f"exist under {root}/manifests; run `{cmd}` first")
    if m["status"] != "complete":
        raise RunError(f"round {round_ - 1} of run {run!r} is {m['status']}, not complete; "
                       f"finish it with `{cmd}` first")
    return m


# ----------------------------------------------------------------------------- the round


@dataclasses.dataclass
class Plan:
    """What a round will do, resolved and checked before anything is written."""

    cfg: TrainConfig
    role: str
    round_: int
    root: Path
    info: DatasetInfo
    parent: dict[str, Any] | None
    existing: dict[str, Any] | None


def plan_round(cfg: TrainConfig) -> Plan:
    from models import count_parameters, create_model, get_model_spec

    role = "student" if isinstance(cfg, StudentConfig) else "teacher"
    round_ = cfg.round if isinstance(cfg, StudentConfig) else 0
    root = resolve_root(cfg.root)
    parent = parent_round(root, cfg.run, round_) if round_ >= 1 else None
    if parent is not None:
        teacher_model = parent["model"]["name"]
        model = {"": teacher_model, "next": next_model(teacher_model)}.get(cfg.model, cfg.model)
        data = cfg.data or parent["data"]["dataset"]
        magnitude = cfg.randaugment_m if cfg.randaugment_m is not None \
            else default_magnitude(model)
        cfg = dataclasses.replace(cfg, model=model, data=data, randaugment_m=magnitude)
    cfg.validate()
    if parent is not None:
        mine = count_parameters(create_model(cfg.model, 10))
        theirs = count_parameters(create_model(parent["model"]["name"], 10))
        if mine < theirs:
            log(f"warning: student {cfg.model} is smaller than its teacher "
                f"{parent['model']['name']}; Noisy Student expects an equal or larger student")
    info = load_dataset(cfg.data)
    if info.split("labeled").count == 0:
        raise RunError(f"dataset {info.path} has no labeled samples; the teacher needs some")
    info.split("test")
    if parent is not None:
        info.split("unlabeled")
    get_model_spec(cfg.model)
    existing = mf.load_round_if_exists(root, cfg.run, round_)
    if existing is not None and existing["status"] == "complete" and not cfg.force:
        raise RunError(
            f"run {cfg.run!r} already has a complete round {round_} "
            f"({mf.manifest_path(root, cfg.run, round_)}); pass --force to train it again or "
            "choose another --run")
    return Plan(cfg=cfg, role=role, round_=round_, root=root, info=info, parent=parent,
                existing=None if cfg.force else existing)


def _model_record(cfg: TrainConfig) -> dict[str, Any]:
    from models import count_parameters, create_model, get_model_spec

    spec = get_model_spec(cfg.model)
    return {"name": cfg.model, "params": count_parameters(create_model(cfg.model, 10)),
            "train_resolution": spec.train_resolution, "test_resolution": spec.test_resolution,
            "dropout": spec.dropout if cfg.dropout is None else cfg.dropout,
            "drop_path": cfg.drop_path}


def _start_manifest(p: Plan, use_gpu: bool) -> dict[str, Any]:
    cfg, info = p.cfg, p.info
    if p.existing is not None:
        m = p.existing
        m["status"], m["finished_at"], m["config"] = "running", None, to_dict(cfg)
        m["model"] = _model_record(cfg)  # empty when jobs/pseudo_label.py made the manifest
        m.pop("error", None)
        mf.add_event(m, "restart", resumes_training=has_checkpoint(
            mf.artifact_dir(p.root, cfg.run, p.round_)))
        return m
    teacher = None
    if p.parent is not None:
        teacher = {"round": p.round_ - 1,
                   "manifest_sha256": mf.sha256_file(mf.manifest_path(p.root, cfg.run,
                                                                      p.round_ - 1)),
                   "checkpoint_sha256": p.parent["checkpoint"]["sha256"],
                   "model": p.parent["model"]["name"], "top1": p.parent["metrics"]["top1"]}
    m = mf.new_manifest(
        run=cfg.run, round_=p.round_, role=p.role, config=to_dict(cfg), model=_model_record(cfg),
        data={"dataset": str(info.path.resolve()), "dataset_sha256": info.sha256,
              **info.counts()},
        cluster=cluster_summary(cfg.num_workers, use_gpu), teacher=teacher)
    mf.add_event(m, "start")
    return m


def run_round(cfg: TrainConfig) -> dict[str, Any]:
    """Check, then run every stage of the round that is not complete; returns the manifest."""
    p = plan_round(cfg)
    cfg = p.cfg
    art = mf.artifact_dir(p.root, cfg.run, p.round_)
    if cfg.force and art.exists():
        log(f"--force: removing {art} (checkpoints and pseudo-labels of the old round)")
    _preflight(p.info, cfg.preflight_limit)
    with ray_session(num_cpus=None):
        use_gpu = check_resources(cfg.num_workers, cfg.cpus_per_worker, cfg.use_gpu)
        if cfg.force and art.exists():
            shutil.rmtree(art)
        m = _start_manifest(p, use_gpu)
        path = mf.save_manifest(p.root, m)
        log(f"{p.role} round {p.round_} of run {cfg.run!r}: manifest {path}, "
            f"artifacts {art}")
        try:
            if p.parent is not None:
                m = _pseudo_label(p, m)
            if not mf.stage_complete(m, "evaluate"):
                _train(p, m, art, use_gpu)
        except BaseException as e:
            mf.mark_failed(m, str(e).splitlines()[0] if str(e) else type(e).__name__)
            mf.save_manifest(p.root, m)
            raise
    mf.mark_complete(m)
    mf.save_manifest(p.root, m)
    return m


def _pseudo_label(p: Plan, m: dict[str, Any]) -> dict[str, Any]:
    from pipeline.pseudo_label import PseudoLabelConfig, run_pseudo_label_stages

    cfg = p.cfg
    assert isinstance(cfg, StudentConfig)
    plc = PseudoLabelConfig(batch_size=cfg.label_batch_size, num_actors=cfg.label_actors,
                            topk=cfg.topk, threshold=cfg.threshold, k=cfg.k, seed=cfg.seed)
    return run_pseudo_label_stages(p.root, cfg.run, p.round_, plc, m)


def _job(p: Plan, art: Path, m: dict[str, Any]) -> Job:
    cfg, info = p.cfg, p.info
    pseudo = randaugment = None
    if isinstance(cfg, StudentConfig):
        pl = m["pseudo_labels"]
        uri = Path(pl["uri"]) if Path(pl["uri"]).is_absolute() else p.root / pl["uri"]
        pseudo = {"shards": info.split("unlabeled").shards, "dir": str(uri),
                  "count": pl["selected_with_copies"]}
        if cfg.truth_labels:
            pseudo.update(dir=str(art / "truth"),
                          count=_truth_tables(info, art / "truth", pl["uri"], p.root))
        if pseudo["count"] == 0:
            raise RunError("selection kept no pseudo-labels; lower --threshold or check the "
                           "teacher")
        if cfg.randaugment and cfg.randaugment_n > 0 and cfg.randaugment_m:
            randaugment = {"num_ops": cfg.randaugment_n, "magnitude": cfg.randaugment_m}
    split = {s: {"shards": info.split(s).shards, "count": info.split(s).count}
             for s in ("labeled", "test")}
    model = dict(m["model"])
    return Job(config=to_dict(cfg), role=p.role, classes=info.classes, labeled=split["labeled"],
               test=split["test"], model=model, predictions_dir=str(art / "predictions"),
               pseudo=pseudo, randaugment=randaugment)


def _train(p: Plan, m: dict[str, Any], art: Path, use_gpu: bool) -> None:
    import pandas as pd

    from pipeline.checkpoint import save_model_file

    cfg = p.cfg
    mf.set_stage(m, "train", "running")
    mf.save_manifest(p.root, m)
    t0 = time.time()
    final = fit(_job(p, art, m), art, use_gpu=use_gpu)
    try:
        state = read_state(final)
        model_path = art / "model.pt"
        sha = save_model_file(model_path, read_weights(final), model_name=cfg.model,
                              classes=p.info.classes,
                              train_resolution=m["model"]["train_resolution"],
                              test_resolution=m["model"]["test_resolution"],
                              extra={"run": cfg.run, "round": p.round_})
    finally:
        shutil.rmtree(final, ignore_errors=True)
    parts = sorted((art / "predictions").glob("rank-*.parquet"))
    preds = pd.concat([pd.read_parquet(x) for x in parts], ignore_index=True)
    preds.sort_values("key").to_parquet(art / "test_predictions.parquet", index=False)
    seconds = state["seconds"]
    mf.set_stage(m, "train", "complete", seconds=round(seconds.get("train", 0.0), 2),
                 epochs=state["epoch"], wall_seconds=round(time.time() - t0, 2))
    if state["finetune"]:
        mf.set_stage(m, "finetune", "complete", seconds=round(seconds.get("finetune", 0.0), 2),
                     **state["finetune"])
    mf.set_stage(m, "evaluate", "complete", seconds=round(seconds.get("evaluate", 0.0), 2),
                 predictions=_rel(art / "test_predictions.parquet", p.root))
    metrics = dict(state["final_metrics"])
    if p.parent is not None:
        metrics["teacher_top1"] = p.parent["metrics"]["top1"]
    m["metrics"] = metrics
    m["history"] = state["history"]
    m["resumed_from"] = state["resumed_from"]
    m["checkpoint"] = {"uri": _rel(model_path, p.root), "sha256": sha}


def _truth_tables(info: DatasetInfo, out: Path, pseudo_uri: str, root: Path) -> int:
    """The ceiling of an ablation: pseudo-label files whose labels are the held-out truth.

    Same file names and keys as the real pseudo-labels, one copy of every image, a one-hot soft
    label. Returns the number of rows."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    if info.unlabeled_truth is None or not Path(info.unlabeled_truth).exists():
        raise RunError(f"--truth-labels needs {info.path}/unlabeled_truth.parquet (the held-out "
                       "labels of the unlabeled split), which this dataset does not have")
    truth = pd.read_parquet(info.unlabeled_truth).set_index("key")["label"]
    src = Path(pseudo_uri) if Path(pseudo_uri).is_absolute() else root / pseudo_uri
    out.mkdir(parents=True, exist_ok=True)
    rows = 0
    for f in sorted(src.glob("*.parquet")):
        keys = pq.read_table(f, columns=["key"]).column("key").to_pylist()
        labels = truth.reindex(keys)
        if labels.isna().any():
            raise RunError(f"{f.name}: {int(labels.isna().sum())} keys have no held-out label")
        table = pa.table({
            "key": pa.array(keys, pa.string()),
            "copies": pa.array([1] * len(keys), pa.int32()),
            "topk_index": pa.array([[int(x)] for x in labels], pa.list_(pa.int32())),
            "topk_prob": pa.array([[1.0] for _ in keys], pa.list_(pa.float16())),
        })
        pq.write_table(table, out / f.name)
        rows += len(keys)
    log(f"truth labels: {rows} unlabeled images with their held-out labels ({out})")
    return rows

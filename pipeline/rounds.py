"""One round of Noisy Student, from the checks to the record: shared by teacher and student.

    round 0 (teacher):  preflight -> train -> [finetune] -> evaluate
    round N (student):  preflight -> pseudo_label -> select -> train -> finetune -> evaluate

Every stage is recorded in the round's :class:`~pipeline.manifest.RoundRecord`, saved after each
one; running the same command again continues at the first stage that is not complete (training
resumes from its last epoch checkpoint). Every user mistake is found before anything is written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.config import (
    BASE_DECAY_EPOCHS,
    BASE_EPOCHS,
    PseudoLabelConfig,
    StudentConfig,
    TrainConfig,
    check_root,
    to_dict,
)
from pipeline.dataset import DatasetError, DatasetInfo, load_dataset
from pipeline.fs import S3Path, location, rmtree
from pipeline.layout import RunLayout
from pipeline.lock import round_lock
from pipeline.manifest import (
    DataRef,
    ManifestError,
    ModelRecord,
    Parent,
    PseudoFile,
    PseudoLabels,
    RoundRecord,
    check_model_file,
    load_parent,
    load_round,
    new_round,
    save_round,
)
from pipeline.runner import (
    RunError,
    check_data,
    check_resources,
    cluster_summary,
    ray_session,
    resolve_root,
)

if TYPE_CHECKING:
    from models.weights import InitPlan

Progress = Callable[[str], Any]

# RandAugment magnitude by student size (docs/recipe.md); the tiny family mirrors B0..B3.
RANDAUGMENT_M = {"0": 0, "1": 0, "2": 6, "3": 12, "4": 15, "5": 18, "6": 24, "7": 27, "2l": 27}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def default_magnitude(model: str) -> float:
    suffix = model.rsplit("_", 1)[-1]
    return float(RANDAUGMENT_M.get(suffix[1:] if suffix != "l2" else "2l", 0))


def default_unlabel_ratio(model: str) -> float:
    """Pseudo-labeled images per labeled one, by student size: 1 for B0 (the official code, which
    trains B0 longer instead), 3 above; the tiny family mirrors B0..B3."""
    return 1.0 if model.rsplit("_", 1)[-1] in ("b0", "t0") else 3.0


def default_train_ratio(model: str) -> float:
    """How much longer a student trains than the base schedule (350 epochs, decay every 2.4), by
    student size: 2 for B0-B4, as the official code's ImageNet script (``--train_ratio=2``
    multiplies its steps and decay interval), 1 above; the tiny family mirrors B0..B3."""
    suffix = model.rsplit("_", 1)[-1]
    return 2.0 if suffix[0] == "t" or suffix in ("b0", "b1", "b2", "b3", "b4") else 1.0


def next_model(name: str) -> str:
    """The next larger model of the same family (t0 -> t1, b3 -> b4); the largest stays."""
    from models import list_models

    family = [m for m in list_models() if m.rsplit("_", 1)[-1][0] == name.rsplit("_", 1)[-1][0]]
    i = family.index(name)
    return family[min(i + 1, len(family) - 1)]


def parameter_count(name: str, num_classes: int = 10) -> int:
    """Parameters of a registered model, by arithmetic (:func:`models.registry.parameter_count`):
    no model built, no torch imported (an L2 has 480M of them)."""
    from models.registry import parameter_count as count

    return count(name, num_classes)


# ----------------------------------------------------------------------------- preflight


def missing_shards(paths: list[str]) -> list[str]:
    """The shards among ``paths`` that are not there, in order: one listing per folder, as a
    check per shard would be one request each on object storage."""
    present: dict[str, set[str]] = {}
    missing = []
    for p in paths:
        loc = location(p)
        folder = str(loc.parent)
        if folder not in present:
            if isinstance(loc, Path):
                try:  # scandir: the entries' types come with the listing, no stat per file
                    with os.scandir(folder) as entries:
                        present[folder] = {e.name for e in entries if e.is_file()}
                except (FileNotFoundError, NotADirectoryError):
                    present[folder] = set()
            else:  # one listing; a prefix with no objects lists as empty
                import pyarrow.fs as pafs

                present[folder] = {i.path.rsplit("/", 1)[-1] for i in loc.parent._list(False)
                                   if i.type == pafs.FileType.File}
        if loc.name not in present[folder]:
            missing.append(p)
    return missing


def preflight(info: DatasetInfo, limit: int, damage_limit: float) -> dict[str, Any] | None:
    """Read and decode every labeled and test image when the splits are small enough, so that
    damage and bad labels are found before anything is written. Damaged samples are counted (the
    split stops past ``damage_limit``); a label outside the class list, or a key that two shards
    of the split share, stops at once."""
    from pipeline.images import decode_image
    from pipeline.shards import BadSample, Damage, KeyIndex, ShardError, read_shard, tail_loss

    # Checked even when the read below is skipped: the readers would count a missing shard as
    # one damaged sample, and a run would go on without a thousand images.
    missing = missing_shards([*info.split("labeled").shards, *info.split("test").shards])
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise RunError(f"shard {missing[0]} listed in {info.path}/dataset.json does not "
                       f"exist{more}; restore it, or describe the shards there are again "
                       "(jobs/prepare.py register, or prepare the dataset again)")
    total = info.split("labeled").count + info.split("test").count
    if total > limit:
        log(f"preflight: {total} labeled+test images > --preflight-limit {limit}; damaged samples "
            "are counted as training meets them")
        return None
    found = {}
    for split in ("labeled", "test"):
        damage = Damage()
        keys = KeyIndex(split, expected=info.split(split).count)  # a key in two shards
        stale: list[tuple[str, int, int]] = []  # (shard, recorded, found)
        shards, recorded = info.split(split).shards, info.split(split).shard_counts
        if recorded is None or len(recorded) != len(shards):  # not recorded (older files)
            recorded = [None] * len(shards)
        for path, count in zip(shards, recorded, strict=True):
            shard_keys, read, torn = [], 0, False
            for s in read_shard(path):
                if isinstance(s, BadSample):
                    torn = torn or s.is_tail
                    damage.bad(tail_loss(s, count))  # a tear loses the rest of the shard
                    continue
                read += 1  # samples as register counts them: read, decodable or not
                shard_keys.append(s.key)
                if s.label is None or not 0 <= s.label < info.num_classes:
                    raise RunError(f"{s.where}: label {s.label} is not one of the dataset's "
                                   f"{info.num_classes} classes")
                try:
                    decode_image(s.image, s.where)
                except ShardError as e:
                    damage.bad(s.damaged(e))
                    continue
                damage.ok()
            keys.add(path, shard_keys)
            if count is not None and not torn and read != count:  # a torn tail is damage
                stale.append((path, count, read))
        keys.check(lambda shard: (s.key for s in read_shard(shard) if not isinstance(s, BadSample)))
        damage.check(split, damage_limit)
        if stale:  # epochs and the readers' runs are sized by the recorded counts
            path, count, read = stale[0]
            more = f" (and {len(stale) - 1} more shards)" if len(stale) > 1 else ""
            log(f"preflight: warning: {split} shard {path} holds {read} samples, "
                f"{info.path}/dataset.json says {count}{more}; the shards changed after it was "
                "written: prepare them again, or register them again with the same --classes "
                "(a student round that has started labeling then needs --force)")
        found[split] = damage.to_dict()
        if damage.count:
            log(f"preflight: {split}: {damage.count} of {damage.count + damage.good} samples "
                f"damaged and skipped (e.g. {damage.examples[0]['shard']}, key "
                f"{damage.examples[0]['key']!r}: {damage.examples[0]['reason']})")
    return found


# ----------------------------------------------------------------------------- the plan


@dataclasses.dataclass
class Plan:
    """What a round will do, resolved and checked before anything is written."""

    cfg: TrainConfig
    layout: RunLayout
    round_: int
    info: DatasetInfo
    parent: Parent | None
    existing: RoundRecord | None
    init: InitPlan | None = None  # --init-from, checked

    @property
    def role(self) -> str:
        return "student" if self.parent is not None else "teacher"


def plan_round(cfg: TrainConfig) -> Plan:
    from models import get_model_spec

    round_ = cfg.round if isinstance(cfg, StudentConfig) else 0
    check_root(cfg.root)  # before anything is read under it
    layout = RunLayout(resolve_root(cfg.root), cfg.run) if cfg.run else None
    if layout is None:
        cfg.validate()  # names the missing --run
    parent = load_parent(layout, round_) if round_ >= 1 else None
    if parent is not None:
        teacher_model = parent.record.model.name
        from models import list_models

        if teacher_model not in list_models():  # a hand edit: nothing could load its weights
            raise ManifestError(f"{layout.manifest_path(round_ - 1)}: model.name "
                                f"{teacher_model!r} is not a registered model; put the right "
                                "manifest back")
        model = {"": teacher_model, "next": next_model(teacher_model)}.get(cfg.model, cfg.model)
        magnitude = cfg.randaugment_m if cfg.randaugment_m is not None \
            else default_magnitude(model)
        ratio = cfg.unlabel_ratio if cfg.unlabel_ratio is not None \
            else default_unlabel_ratio(model)
        longer = default_train_ratio(model)
        epochs = cfg.epochs if cfg.epochs is not None else round(BASE_EPOCHS * longer)
        decay = cfg.decay_epochs if cfg.decay_epochs is not None else BASE_DECAY_EPOCHS * longer
        cfg = dataclasses.replace(cfg, model=model, data=cfg.data or str(parent.dataset_path),
                                  randaugment_m=magnitude, unlabel_ratio=ratio, epochs=epochs,
                                  decay_epochs=decay)
    cfg.validate()
    cfg = cfg.with_model_defaults()  # resolutions and the teacher's FixRes length, recorded
    if parent is not None and parameter_count(cfg.model) < parameter_count(
            parent.record.model.name):
        log(f"warning: student {cfg.model} is smaller than its teacher "
            f"{parent.record.model.name}; Noisy Student expects an equal or larger student")
    check_data(cfg.data)
    info = load_dataset(cfg.data)
    cfg = dataclasses.replace(cfg, data=str(info.path))  # absolute: the workers' cwd differs
    needed = {"labeled": "the teacher needs some", "test": "every round is evaluated on it"}
    if parent is not None:
        needed["unlabeled"] = "a student round pseudo-labels it"
    for split, why in needed.items():  # a split without shards is refused by info.split
        if info.split(split).count == 0:
            raise RunError(f"dataset {info.path} has no {split} samples ({why}); its "
                           f"dataset.json lists {len(info.split(split).shards)} shard(s) "
                           f"holding none: add some with `python jobs/prepare.py imagefolder "
                           f"SRC --out {info.path} --split {split}` or register other shards")
    check_labeled_classes(info)
    for note in (existing_data_note(parent, info) if parent is not None else None,
                 split_storage_note(layout.root, info.path)):
        if note:
            log(note)
    if parent is not None and str(parent.dataset_path) != str(info.path):
        try:  # another --data: the teacher's classes, checked before anything is written
            teacher_classes = load_dataset(parent.dataset_path).classes
        except DatasetError:  # gone since: the model file's classes are checked when labeling
            teacher_classes = None
        if teacher_classes is not None:
            check_teacher_classes(teacher_classes, info)
    get_model_spec(cfg.model)
    try:
        existing = load_round(layout, round_)
    except ManifestError:  # torn or edited: --force, which its message advises, replaces it
        if not cfg.force:
            raise
        log(f"--force: {layout.manifest_path(round_)} cannot be read; the round starts over and "
            "a new record replaces it")
        existing = None
    if existing is not None and existing.status == "complete" and not cfg.force:
        raise RunError(
            f"run {cfg.run!r} already has a complete round {round_} "
            f"({layout.manifest_path(round_)}); pass --force to train it again or choose "
            "another --run")
    if existing is not None and not cfg.force and isinstance(cfg, StudentConfig):
        check_selection_in_use(existing, cfg.label_settings())
        check_labels_in_use(existing, cfg.label_settings(), info.num_classes)
        if parent is not None:
            check_teacher_unchanged(existing, parent)
            check_same_dataset(existing, info)
    if parent is not None:  # a changed teacher file is refused now, not after Ray's start-up
        check_model_file(parent)
    init = _init_plan(cfg, info)
    if existing is not None and not cfg.force:
        check_same_start(existing, cfg, init)
    return Plan(cfg=cfg, layout=layout, round_=round_, info=info, parent=parent,
                existing=None if cfg.force else existing, init=init)


def split_storage_note(root: Path | S3Path, data: Path | S3Path) -> str | None:
    """A line when the dataset is on local disk and the run on object storage: fine on one
    machine, but on a cluster the other nodes must see that path too."""
    if isinstance(root, S3Path) and not isinstance(data, S3Path):
        return (f"note: --data {data} is on this machine's disk and --root on object storage: "
                "on a cluster every node must be able to read the dataset at that path")
    return None


def existing_data_note(parent: Parent, info: DatasetInfo) -> str | None:
    """A line when round N-1's dataset.json has changed since it was recorded there (a split
    prepared again): the new round uses it as it is now, which is meant, but said."""
    recorded = parent.record.data
    if recorded is None or str(parent.dataset_path) != str(info.path) or \
            recorded.dataset_sha256 == info.sha256:
        return None
    return (f"note: {info.path}/dataset.json has changed since round {parent.record.round} "
            f"recorded it (sha256 {recorded.dataset_sha256[:12]}... -> {info.sha256[:12]}...); "
            "this round uses it as it is now")


def check_labeled_classes(info: DatasetInfo) -> None:
    """A classifier needs labeled images of two classes or more; a class without any gets a
    warning (a folder whose every file was skipped, a --classes name no label uses)."""
    counts = info.split("labeled").class_counts
    if counts is None:
        return
    present = [c for c, n in counts.items() if n > 0]
    if len(present) < 2:
        raise RunError(f"dataset {info.path}: its labeled split holds images of "
                       f"{len(present)} class(es) {present}; a classifier needs two or more: "
                       "add labeled images of the other classes")
    absent = [c for c, n in counts.items() if n == 0]
    if absent:
        more = f", ... ({len(absent)} in all)" if len(absent) > 10 else ""
        log(f"warning: dataset {info.path}: no labeled images of class(es) "
            f"{', '.join(absent[:10])}{more}; the model cannot learn them")


def check_same_start(rec: RoundRecord, cfg: TrainConfig, init: InitPlan | None) -> None:
    """A round continues only as the network it started as: its checkpoints hold weights for
    that network (its --model; BatchNorm settings, padding) and its record names the weights it
    started from. Another --init-from, --init-style or --norm on a rerun would rebuild another
    network and load them into it without a complaint (the shapes agree); another --model
    failed inside the workers with a size mismatch, and every rerun again. Before training has
    started (labeling stages only) nothing depends on them yet."""
    if rec.stage("train") is None:
        return
    options = init.options if init is not None else cfg.model_options()
    before_sha = (rec.init or {}).get("sha256")
    now_sha = init.sha256 if init is not None else None
    if rec.model is not None and rec.model.name != cfg.model:
        raise RunError(f"round {rec.round} of run {rec.run!r} was started with --model "
                       f"{rec.model.name} (now {cfg.model}), and its checkpoints hold that "
                       f"network's weights; run it again with --model {rec.model.name}, or pass "
                       "--force to start it over")
    if rec.model is not None and dict(rec.model.options) != dict(options):
        what = f"layer options {dict(rec.model.options)} (now {dict(options)})"
    elif before_sha != now_sha:
        what = (f"--init-from {(rec.init or {}).get('file', 'none')}"
                f"{f' (sha256 {before_sha[:12]}...)' if before_sha else ''}")
    else:
        return
    raise RunError(f"round {rec.round} of run {rec.run!r} was started with {what}; run it again "
                   "with the same --init-from, --init-style and --norm, or pass --force to "
                   "start it over")


def _init_plan(cfg: TrainConfig, info: DatasetInfo) -> InitPlan | None:
    """``--init-from`` checked against the model and the dataset's classes (one line if not)."""
    if cfg.init_from is None:
        return None
    from models.weights import inspect_init

    plan = inspect_init(Path(cfg.init_from).expanduser(), cfg.model, info.num_classes,
                        style=cfg.init_style, classes=info.classes)
    what = (f"{plan.source_classes} classes" if plan.source_classes != info.num_classes
            else "other class names")
    note = (f"; its classifier ({what}) is re-initialised for the dataset's "
            f"{info.num_classes}" if plan.reinit_classifier else "")
    log(f"init: {cfg.model} starts from {plan.path} ({plan.style} weights, sha256 "
        f"{plan.sha256[:12]}...){note}")
    return plan


def model_record(cfg: TrainConfig, num_classes: int,
                 options: dict[str, Any] | None = None) -> ModelRecord:
    from models import get_model_spec

    spec = get_model_spec(cfg.model)
    return ModelRecord(name=cfg.model, params=parameter_count(cfg.model, num_classes),
                       train_resolution=cfg.train_resolution or spec.train_resolution,
                       test_resolution=cfg.test_resolution or spec.test_resolution,
                       dropout=spec.dropout if cfg.dropout is None else cfg.dropout,
                       drop_path=cfg.drop_path, options=dict(options or {}))


def data_ref(info: DatasetInfo) -> DataRef:
    return DataRef(dataset=str(info.path.resolve()), dataset_sha256=info.sha256, **info.counts())


def _start_record(p: Plan, use_gpu: bool) -> RoundRecord:
    from pipeline.runner import has_checkpoint

    cfg = p.cfg
    options = p.init.options if p.init is not None else cfg.model_options()
    if p.existing is not None:
        rec = p.existing
        rec.mark_running()
        rec.config = to_dict(cfg)
        rec.model = model_record(cfg, p.info.num_classes, options)  # None when made by
        rec.cluster = cluster_summary(cfg.num_workers, use_gpu)  # jobs/pseudo_label.py
        rec.add_event("restart", resumes_training=has_checkpoint(
            p.layout.artifact_dir(p.round_)))
    else:
        rec = new_round(run=cfg.run, round_=p.round_, config=to_dict(cfg),
                        model=model_record(cfg, p.info.num_classes, options),
                        data=data_ref(p.info), cluster=cluster_summary(cfg.num_workers, use_gpu),
                        teacher=p.parent.ref if p.parent is not None else None)
    rec.init = p.init.record() if p.init is not None else None
    return rec


def run_round(cfg: TrainConfig) -> RoundRecord:
    """Check, then run every stage of the round that is not complete; returns the record."""
    p = plan_round(cfg)
    cfg, layout = p.cfg, p.layout
    damage = preflight(p.info, cfg.preflight_limit, cfg.damage_limit)
    with ray_session(num_cpus=None, verbose=cfg.verbose):
        use_gpu = check_resources(cfg.num_workers, cfg.cpus_per_worker, cfg.use_gpu)
        if isinstance(cfg, StudentConfig) and labels_to_make(
                p.existing, cfg.label_settings(), p.info.num_classes, layout,
                p.info.split("unlabeled").shards):
            check_label_resources(cfg.label_settings())
        with round_lock(layout, p.round_):  # the last check; from here on the round writes
            return _run_locked(p, damage, use_gpu)


def _run_locked(p: Plan, damage: dict[str, Any] | None, use_gpu: bool) -> RoundRecord:
    """The stages, holding the round's lock; returns the complete record."""
    cfg, layout = p.cfg, p.layout
    art = layout.artifact_dir(p.round_)
    if not cfg.force:  # another process may have moved the round on since plan_round read it
        p.existing = load_round(layout, p.round_)
        if p.existing is not None and p.existing.status == "complete":
            raise RunError(f"run {cfg.run!r} already has a complete round {p.round_} "
                           f"({layout.manifest_path(p.round_)}); pass --force to train it again")
    if p.existing is not None and p.parent is not None and not cfg.force:
        check_same_dataset(p.existing, p.info)  # before the record says "running" again
    if cfg.force and art.exists():
        log(f"--force: removing {art} (checkpoints and pseudo-labels of the old round)")
        rmtree(art)
    rec = _start_record(p, use_gpu)
    if damage is not None:
        rec.set_stage("preflight", "complete", **damage)
    path = save_round(layout, rec)
    log(f"{p.role} round {p.round_} of run {cfg.run!r}: manifest {path}, artifacts {art}")
    try:
        if p.parent is not None:
            assert isinstance(cfg, StudentConfig)
            run_label_stages(layout, p.round_, cfg.label_settings(), rec, parent=p.parent,
                             progress=log, info=p.info)
        if not rec.stage_complete("evaluate"):
            from pipeline.runner import has_checkpoint
            from pipeline.train_stage import train_stage

            train = rec.stage("train")
            if train is not None:  # killed or failed before: Ray Train resumes its checkpoint
                rec.add_event("resume", stage="train", previous=train.status,
                              from_checkpoint=has_checkpoint(art))
            train_stage(p, rec, use_gpu)
    except BaseException as e:
        for stage in rec.stages.values():  # the stage it stopped in says so too (train: a
            if stage.status == "running":  # lost worker, a full disk, ...), not "running"
                stage.status = "failed"
        rec.mark_failed(str(e).splitlines()[0] if str(e) else type(e).__name__)
        save_round(layout, rec)
        raise
    rec.mark_complete()
    save_round(layout, rec)
    return rec


# ----------------------------------------------------------------------------- stages 1-2


def check_same_dataset(rec: RoundRecord, info: DatasetInfo) -> None:
    """A student round labels, selects and trains on one dataset: the one its record names.
    Once labeling has started, its files belong to that dataset's unlabeled shards, so a rerun
    with another ``--data`` (or a ``dataset.json`` changed since) is refused; before, the record
    takes the dataset given now."""
    if rec.data is None or rec.data.dataset_sha256 == info.sha256:
        return
    if rec.stage("pseudo_label") is not None:
        raise RunError(
            f"round {rec.round} of run {rec.run!r} was labeled from dataset {rec.data.dataset} "
            f"(dataset.json sha256 {rec.data.dataset_sha256[:12]}...), and the dataset is now "
            f"{info.path} (sha256 {info.sha256[:12]}...); rerun with the --data it started with "
            "and its dataset.json unchanged, or pass --force to start the round over")
    rec.data = data_ref(info)


def run_label_stages(layout: RunLayout, round_: int, cfg: PseudoLabelConfig, rec: RoundRecord, *,
                     parent: Parent | None = None, progress: Progress = print,
                     info: DatasetInfo | None = None) -> RoundRecord:
    """Stages pseudo_label and select of round ``round_`` (skipping complete ones), saving the
    record after each. Needs Ray running for the label stage. Returns the record. ``info``: the
    round's dataset (the student's ``--data``); by default the teacher's."""
    from pipeline.checkpoint import read_model_file

    cfg.validate()
    parent = parent or load_parent(layout, round_)
    check_teacher_unchanged(rec, parent)
    info = info if info is not None else load_dataset(parent.dataset_path)
    check_same_dataset(rec, info)
    shards = info.split("unlabeled").shards
    changed = labeling_changed(rec, cfg, info.num_classes)
    if changed:  # cheap to check, and a user who changes --topk expects it to take effect
        check_labels_in_use(rec, cfg, info.num_classes)  # the callers check first, too
        progress(f"pseudo-label: {', '.join(changed)} differ from the completed labeling; "
                 "labeling the shards again, then selecting again")
        done = rec.stages["pseudo_label"].info["config"]
        rec.add_event("relabel", previous={f[2:].replace("-", "_"): done[f[2:].replace("-", "_")]
                                           for f in changed})
        rec.stages["pseudo_label"].status = "running"
        if rec.stage("select") is not None:  # its counts describe the old files
            rec.stages["select"].status = "running"
    elif rec.stage_complete("pseudo_label"):
        gone = _missing_pseudo_files(layout, rec.round, shards)
        if gone and rec.stage("train") is not None:  # labels made again could differ in the
            # last bits (another device), and move the selection under the student's checkpoint
            raise RunError(f"round {rec.round} of run {rec.run!r}: {len(gone)} pseudo-label "
                           f"file(s) are gone since its student started training on them (e.g. "
                           f"{gone[0]}); restore them, or pass --force to start the round over")
        if gone:  # removed before the student trained: labeled again, to the same rows
            progress(f"pseudo-label: {len(gone)} labeled file(s) are gone since labeling (e.g. "
                     f"{gone[0]}); labeling their shards again, then selecting again")
            rec.add_event("relabel", missing=gone[:MAX_NAMED], missing_count=len(gone))
            rec.stages["pseudo_label"].status = "running"
            if rec.stage("select") is not None:
                rec.stages["select"].status = "running"
    if not rec.stage_complete("pseudo_label"):
        # One read of the model file (it may be gigabytes, on S3) serves this check and the
        # stage; a round past labeling does not read it at all.
        payload = read_model_file(parent.model_path, parent.record.checkpoint.sha256)
        payload.pop("state_dict", None)
        if int(payload["num_classes"]) != info.num_classes:
            raise ManifestError(
                f"the teacher has {payload['num_classes']} classes but dataset {info.path} has "
                f"{info.num_classes}; pseudo-label with the dataset the teacher was trained on")
        check_teacher_classes(list(payload.get("classes") or info.classes), info)
        _label_stage(layout, rec, parent, shards, cfg, progress, payload)
    select = rec.stage("select")
    if select is not None and select.status != "complete":  # killed or failed: files already
        rec.add_event("resume", stage="select", previous=select.status)  # rewritten are kept
    if select is not None and select.status == "complete" and _selection_changed(select.info,
                                                                                 cfg):
        check_selection_in_use(rec, cfg)  # the callers check first; this guards the lock's wait
        progress("select: --threshold, --k or --seed differ from the completed selection; "
                 "selecting again")
        rec.add_event("reselect", previous={k: select.info.get(k)
                                            for k in ("threshold", "k_requested", "seed")})
        select.status = "running"
    if not rec.stage_complete("select"):
        _select_stage(layout, rec, shards, info.classes, cfg, progress)
    return rec


MAX_NAMED = 20  # file names an event lists


def _missing_pseudo_files(layout: RunLayout, round_: int, shards: list[str]) -> list[str]:
    """The pseudo-label files of ``shards`` that are not in the round's folder (one listing)."""
    from pipeline.pseudo_files import pseudo_file_names

    folder = layout.pseudo_dir(round_)
    present = {p.name for p in folder.glob("*.parquet")} if folder.exists() else set()
    return sorted(n for n in pseudo_file_names(shards).values() if n not in present)


def check_teacher_classes(teacher: list[str], info: DatasetInfo) -> None:
    """The dataset a student labels and trains on has its teacher's classes, in its order: the
    teacher's label i must name the dataset's class i."""
    if list(teacher) != list(info.classes):
        raise ManifestError(
            f"the teacher's classes ({_first(teacher)}) are not dataset {info.path}'s "
            f"({_first(info.classes)}), in name or order; its labels would name the wrong "
            "classes: pseudo-label with a dataset of the teacher's classes")


def _first(names: list[str], n: int = 4) -> str:
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")


def _label_stage(layout: RunLayout, rec: RoundRecord, parent: Parent, shards: list[str],
                 cfg: PseudoLabelConfig, progress: Progress, teacher: dict[str, Any]) -> None:
    from pipeline.pseudo_label import label_shards

    if "pseudo_label" in rec.stages:  # killed or failed before: finished shards are kept
        rec.add_event("resume", stage="pseudo_label", previous=rec.stages["pseudo_label"].status)
    out_dir = layout.pseudo_dir(rec.round)
    rec.set_stage("pseudo_label", "running", config=dataclasses.asdict(cfg))
    save_round(layout, rec)
    with _fail_stage(layout, rec, "pseudo_label"):
        result = label_shards(parent.model_path, parent.record.checkpoint.sha256, shards, out_dir,
                              cfg, progress=progress, teacher=teacher)
    rec.set_stage("pseudo_label", "complete", seconds=result["seconds"], rows=result["rows"],
                  files=len(result["files"]), bad_samples=result["bad_samples"],
                  uri=layout.relative(out_dir))
    save_round(layout, rec)


def _select_stage(layout: RunLayout, rec: RoundRecord, shards: list[str], classes: list[str],
                  cfg: PseudoLabelConfig, progress: Progress) -> None:
    from pipeline.pseudo_files import pseudo_file_names
    from pipeline.select import select_pseudo_labels

    start = time.perf_counter()
    out_dir = layout.pseudo_dir(rec.round)
    rec.set_stage("select", "running")
    save_round(layout, rec)
    with _fail_stage(layout, rec, "select"):
        result = select_pseudo_labels(out_dir, len(classes), cfg, classes=classes,
                                      names=sorted(pseudo_file_names(shards).values()),
                                      progress=progress)
    result["uri"] = layout.relative(out_dir)
    result["files"] = [PseudoFile(**f) for f in result["files"]]
    rec.pseudo_labels = PseudoLabels(**result)
    rec.set_stage("select", "complete", seconds=time.perf_counter() - start, rows=result["rows"],
                  kept=result["kept"], selected_with_copies=result["selected_with_copies"],
                  k=result["k"], threshold=result["threshold"], k_requested=cfg.k, seed=cfg.seed)
    save_round(layout, rec)
    _label_events(layout, rec, out_dir)


def _label_events(layout: RunLayout, rec: RoundRecord, out_dir: Path) -> None:
    """The round's pseudo-label counts and confidence, as TensorBoard scalars at step 0."""
    from pipeline.events import Events
    from pipeline.pseudo_files import confidence_summary

    if not rec.config.get("tensorboard", True):
        return
    pl = rec.pseudo_labels
    conf = confidence_summary([out_dir / f.name for f in pl.files])
    bad = (rec.stages["pseudo_label"].info.get("bad_samples") or {}).get("count")
    events = Events(layout.tensorboard_dir(rec.round))
    events.scalars(0, {"pseudo/rows": pl.rows, "pseudo/kept": pl.kept,
                       "pseudo/with_copies": pl.selected_with_copies, "pseudo/bad_samples": bad,
                       "pseudo/confidence_mean": conf["mean"],
                       "pseudo/confidence_median": conf["median"]})
    events.close()


def check_teacher_unchanged(rec: RoundRecord, parent: Parent) -> None:
    """A round started with one teacher is not continued with another (round N-1 redone with
    --force since): its pseudo-labels and checkpoints came from the old one."""
    recorded = rec.teacher.checkpoint_sha256 if rec.teacher else None
    if recorded and recorded != parent.record.checkpoint.sha256:
        raise ManifestError(
            f"round {rec.round} was started with teacher checkpoint {recorded[:12]}..., but round "
            f"{rec.round - 1} now records {parent.record.checkpoint.sha256[:12]}...; start round "
            f"{rec.round} again with --force")


def check_label_resources(cfg: PseudoLabelConfig) -> None:
    """The teacher actors fit the running cluster (one line if not), checked before the round
    writes anything rather than when the label stage builds its dataset."""
    import ray

    from pipeline.inference import check_resources as check_actors

    check_actors(cfg, ray.cluster_resources())


# The options that decide a pseudo-label file's contents (pipeline.pseudo_files.BYTE_SETTINGS
# besides the teacher): a labeling resumed with other values labels its shards again.
_LABEL_OPTIONS = ("topk", "label_batch_size", "label_crop_fraction", "jpeg_dct_scaling")


def labeling_changed(rec: RoundRecord, cfg: PseudoLabelConfig, num_classes: int) -> list[str]:
    """The labeling options (as flags) that differ from those of the round's complete
    pseudo_label stage; [] when it is not complete or recorded no settings (an older
    version). k counts as the files hold it: at most the number of classes."""
    label = rec.stage("pseudo_label")
    if label is None or label.status != "complete" or not label.info.get("config"):
        return []
    done = label.info["config"]

    def value(cfg_values: dict[str, Any], name: str) -> Any:
        v = cfg_values.get(name)
        return min(v, num_classes) if name == "topk" and v is not None else v

    now = dataclasses.asdict(cfg)
    return [f"--{n.replace('_', '-')}" for n in _LABEL_OPTIONS
            if n in done and value(done, n) != value(now, n)]


def labels_to_make(rec: RoundRecord | None, cfg: PseudoLabelConfig, num_classes: int,
                   layout: RunLayout | None = None, shards: list[str] | None = None) -> bool:
    """Whether the round will run the teacher: its labeling is not complete, was made with
    other options, or (given ``layout`` and the unlabeled ``shards``) some of its files are
    gone (then the cluster must have the actors, checked before anything starts)."""
    if rec is None or not rec.stage_complete("pseudo_label") or labeling_changed(
            rec, cfg, num_classes):
        return True
    return layout is not None and shards is not None and bool(
        _missing_pseudo_files(layout, rec.round, shards))


def _as_flag(name: str, value: Any) -> str:
    """An option as it is typed: ``--topk 3``; a switch as ``--jpeg-dct-scaling`` or
    ``--no-jpeg-dct-scaling``."""
    flag = name.replace("_", "-")
    if isinstance(value, bool):
        return f"--{flag}" if value else f"--no-{flag}"
    return f"--{flag} {value}"


def check_labels_in_use(rec: RoundRecord, cfg: PseudoLabelConfig, num_classes: int) -> None:
    """Refuse other labeling options once the round's student has started training on the
    complete labeling (as :func:`check_selection_in_use` does for the selection); before that,
    :func:`run_label_stages` labels again with them."""
    changed = labeling_changed(rec, cfg, num_classes)
    if not changed or rec.stage("train") is None:
        return
    done = rec.stages["pseudo_label"].info["config"]
    used = " ".join(_as_flag(flag[2:].replace("-", "_"), done[flag[2:].replace("-", "_")])
                    for flag in changed)
    raise RunError(
        f"round {rec.round} of run {rec.run!r}: its student has started training on "
        f"pseudo-labels made with {used}; run again with those values, or redo the round with "
        f"`python jobs/student.py --run {rec.run} --round {rec.round} --force`")


def check_selection_in_use(rec: RoundRecord, cfg: PseudoLabelConfig) -> None:
    """Refuse another --threshold, --k or --seed once the round's student has started training
    on the completed selection: its checkpoint would resume on other pseudo-labels, and the
    model would have learned from two selections while the manifest records the second."""
    select = rec.stage("select")
    if select is None or select.status != "complete" or rec.stage("train") is None:
        return
    if not _selection_changed(select.info, cfg):
        return
    done = select.info
    used = f"--threshold {done.get('threshold')} --seed {done.get('seed')}" + (
        f" --k {done['k_requested']}" if done.get("k_requested") is not None else "")
    raise RunError(
        f"round {rec.round} of run {rec.run!r}: its student has started training on the "
        f"selection made with {used}; run again with those values, or redo the round with "
        f"`python jobs/student.py --run {rec.run} --round {rec.round} --force`")


def _selection_changed(done: dict[str, Any], cfg: PseudoLabelConfig) -> bool:
    """Whether the complete select stage used other settings than ``cfg`` (it is cheap to redo,
    and a user who changes --threshold expects it to take effect)."""
    if "k_requested" not in done:  # recorded by an older version: trust it
        return False
    return (done.get("threshold") != cfg.threshold or done.get("k_requested") != cfg.k
            or done.get("seed") != cfg.seed)


@contextlib.contextmanager
def _fail_stage(layout: RunLayout, rec: RoundRecord, stage: str) -> Iterator[None]:
    """Record a failure in the record (so it says where it stopped), then re-raise."""
    try:
        yield
    except BaseException as e:
        rec.set_stage(stage, "failed", error=f"{type(e).__name__}: {e}"[:500])
        with contextlib.suppress(Exception):
            save_round(layout, rec)
        raise

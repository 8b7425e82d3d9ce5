"""Stages 1-2 of a student round on their own: the teacher pseudo-labels the unlabeled shards, then
threshold + class balancing. ``jobs/student.py`` runs the same stages, with the same options, before
training; this job is for running (or re-running, or resuming) them alone.

    python jobs/pseudo_label.py --run r1 --round 1                     # local Ray, or RAY_ADDRESS
    ray job submit --working-dir . -- python jobs/pseudo_label.py --run r1 --round 1 \
        --root $PWD --label-actors 4   # an absolute root: the job runs in a copy of the folder

Writes ``<root>/artifacts/<run>/round-<N>/pseudo/<shard>.parquet`` and records stages
``pseudo_label`` and ``select`` in ``<root>/manifests/<run>/round-<N>.json``. Killed and run again,
it labels only the shards without a finished file. On the bundled digits (about 1,100 unlabeled
images, 2 CPU cores) it takes well under a minute.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass

from _common import run_job  # puts the repository on sys.path

from pipeline.config import (  # noqa: E402
    ConfigError,
    PseudoLabelConfig,
    check_root,
    check_run_name,
    check_unknown,
)
from pipeline.dataset import DatasetInfo  # noqa: E402
from pipeline.layout import RunLayout  # noqa: E402
from pipeline.manifest import Parent, RoundRecord  # noqa: E402


@dataclass(frozen=True)
class PseudoLabelJob(PseudoLabelConfig):
    """Pseudo-label the unlabeled shards with round N-1's model, then select (stages 1-2).

    The labeling and selection options are PseudoLabelConfig's, shared with jobs/student.py; this
    adds where and which round.
    """

    run: str = ""
    """Name of the run (manifests/<run>/ under --root)."""
    round: int = 1
    """Student round whose pseudo-labels to make; its teacher is round - 1."""
    root: str = "."
    """Folder holding manifests/ and artifacts/ (shared storage on a multi-node cluster)."""
    num_cpus: int | None = None
    """CPUs of the local Ray started when no cluster is running (default: all)."""
    verbose: bool = False
    """Show Ray's own INFO lines and known-harmless warnings (hidden by default)."""


def parse_args(argv: list[str] | None) -> PseudoLabelJob:
    import tyro

    args = list(sys.argv[1:] if argv is None else argv)
    check_unknown(PseudoLabelJob, args)
    # Booleans are switches (--verbose, --no-jpeg-dct-scaling), as in teacher.py and student.py.
    job = tyro.cli(PseudoLabelJob, args=args, description=__doc__)
    check_run_name(job.run)
    check_root(job.root)
    if job.num_cpus is not None and job.num_cpus < 1:
        raise ConfigError(f"--num-cpus must be >= 1 (or omitted for all), got {job.num_cpus}")
    job.validate()
    return job


def existing_round(layout: RunLayout, job: PseudoLabelJob) -> RoundRecord | None:
    """Round N's record when it exists; a complete one is refused (its student was trained on
    these files: changing them now would make the record lie), and so is another selection
    once its student has started training."""
    from pipeline.manifest import ManifestError, load_round
    from pipeline.rounds import check_selection_in_use

    existing = load_round(layout, job.round)
    if existing is not None and existing.status == "complete":
        raise ManifestError(
            f"round {job.round} of run {job.run!r} is complete and its student was trained on "
            f"these pseudo-labels; to label or select again, rerun the round with `python "
            f"jobs/student.py --run {job.run} --round {job.round} --force`")
    if existing is not None:
        check_selection_in_use(existing, job.label_settings())
    return existing


def new_record(layout: RunLayout, job: PseudoLabelJob, parent: Parent,
               info: DatasetInfo) -> RoundRecord:
    """Round N's record, started from round N-1's (the student job fills in the model)."""
    import ray

    from pipeline.manifest import new_round, save_round
    from pipeline.rounds import data_ref

    resources = {k: v for k, v in ray.cluster_resources().items()
                 if k in ("CPU", "GPU", "memory", "object_store_memory")}
    rec = new_round(
        run=job.run, round_=job.round, config=dataclasses.asdict(job), model=None,
        data=data_ref(info),  # the dataset labeled, as it is now
        cluster={"num_workers": job.label_actors, "use_gpu": resources.get("GPU", 0) > 0,
                 "resources": resources},
        teacher=parent.ref)
    save_round(layout, rec)
    return rec


def main(argv: list[str] | None = None) -> int:
    def body() -> int:
        from pipeline.lock import round_lock
        from pipeline.manifest import check_model_file, load_parent
        from pipeline.rounds import check_teacher_unchanged
        from pipeline.runner import ray_session, resolve_root

        job = parse_args(argv)
        layout = RunLayout(resolve_root(job.root), job.run)
        # What can be checked without Ray is checked first: a mistake costs no start-up.
        parent = load_parent(layout, job.round)
        check_model_file(parent)
        existing = existing_round(layout, job)
        if existing is not None:
            check_teacher_unchanged(existing, parent)
        with round_lock(layout, job.round):
            # Read again under the lock: another process may have moved the round on (or
            # completed it) since; deciding on the first read could save an older record over it.
            existing = existing_round(layout, job)
            if existing is not None:
                check_teacher_unchanged(existing, parent)
            with ray_session(job.num_cpus, verbose=job.verbose):
                rec = _label(layout, job, parent, existing)
        summary(layout, rec)
        return 0

    return run_job("pseudo_label", body)


def _label(layout: RunLayout, job: PseudoLabelJob, parent: Parent,
           existing: RoundRecord | None) -> RoundRecord:
    from pipeline.dataset import load_dataset
    from pipeline.rounds import check_label_resources, labels_to_make, run_label_stages

    info = load_dataset(parent.dataset_path)  # read once: run_label_stages takes it too
    if labels_to_make(existing, job.label_settings(), info.num_classes, layout,
                      info.split("unlabeled").shards):
        check_label_resources(job.label_settings())
    rec = existing or new_record(layout, job, parent, info)
    return run_label_stages(layout, job.round, job.label_settings(), rec, parent=parent,
                            info=info)


def summary(layout: RunLayout, rec: RoundRecord) -> None:
    """The job's last line: what was labeled and selected, and where."""
    pl = rec.pseudo_labels
    bad = rec.stages["pseudo_label"].info.get("bad_samples", {})
    print(f"pseudo_label: round {rec.round} of {rec.run!r}: {pl.rows} images labeled "
          f"({bad.get('count', 0)} damaged skipped), {pl.kept} selected ({pl.selected_with_copies}"
          f" with copies; threshold {pl.threshold}, K {pl.k}) in {layout.resolve(pl.uri)}; "
          f"manifest {layout.manifest_path(rec.round)}")


if __name__ == "__main__":
    sys.exit(main())

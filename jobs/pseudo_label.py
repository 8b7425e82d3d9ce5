"""Stages 1-2 of a student round on their own: the teacher pseudo-labels the unlabeled shards, then
threshold + class balancing. ``jobs/student.py`` runs the same stages before training; this job is
for running (or re-running, or resuming) them alone.

    python jobs/pseudo_label.py --run r1 --round 1                     # local Ray, or RAY_ADDRESS
    ray job submit --working-dir . -- python jobs/pseudo_label.py --run r1 --round 1 --num-actors 4

Writes ``<root>/artifacts/<run>/round-<N>/pseudo/<shard>.parquet`` and records stages
``pseudo_label`` and ``select`` in ``<root>/manifests/<run>/round-<N>.json``. Killed and run again,
it labels only the shards without a finished file. On the bundled digits (about 1,100 unlabeled
images, 2 CPU cores) it takes well under a minute.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import run_job  # puts the repository on sys.path

from pipeline import manifest as mf  # noqa: E402
from pipeline.pseudo_label import (  # noqa: E402
    PseudoLabelConfig,
    PseudoLabelError,
    TeacherRound,
    check_teacher_file,
    load_teacher_round,
    run_pseudo_label_stages,
)


@dataclass(frozen=True)
class PseudoLabelJob(PseudoLabelConfig):
    """Pseudo-label the unlabeled shards with round N-1's model, then select (stages 1-2).

    The labeling and selection options are PseudoLabelConfig's; this adds where and which round.
    """

    run: str = ""
    """Name of the run (manifests/<run>/ under --root)."""
    round: int = 1
    """Student round whose pseudo-labels to make; its teacher is round - 1."""
    root: str = "."
    """Folder holding manifests/ and artifacts/ (shared storage on a multi-node cluster)."""
    num_cpus: int | None = None
    """CPUs of the local Ray started when no cluster is running (default: all)."""

    def label_config(self) -> PseudoLabelConfig:
        names = {f.name for f in dataclasses.fields(PseudoLabelConfig)}
        return PseudoLabelConfig(**{n: getattr(self, n) for n in names})


def parse_args(argv: list[str] | None) -> PseudoLabelJob:
    import tyro

    job = tyro.cli(PseudoLabelJob, args=argv, description=__doc__,
                   config=(tyro.conf.FlagConversionOff,))
    if not job.run:
        raise PseudoLabelError("--run is required: name the run, e.g. --run r1")
    job.validate()
    return job


def round_manifest(job: PseudoLabelJob, teacher: TeacherRound) -> dict[str, Any]:
    """The round-N manifest: loaded when it exists, else created from round N-1's."""
    existing = mf.load_round_if_exists(job.root, job.run, job.round)
    if existing is not None:
        return existing
    import ray

    cfg = job.label_config()
    resources = {k: v for k, v in ray.cluster_resources().items()
                 if k in ("CPU", "GPU", "memory", "object_store_memory")}
    m = mf.new_manifest(
        run=job.run, round_=job.round, role="student", config=dataclasses.asdict(job),
        model={}, data=teacher.manifest["data"],
        cluster={"num_workers": cfg.num_actors, "use_gpu": resources.get("GPU", 0) > 0,
                 "resources": resources},
        teacher={"round": job.round - 1, "manifest_sha256": teacher.manifest_sha256,
                 "checkpoint_sha256": teacher.checkpoint_sha256})
    mf.save_manifest(job.root, m)
    return m


def main(argv: list[str] | None = None) -> int:
    def body() -> int:
        from pipeline.runner import ray_session, resolve_root

        job = parse_args(argv)
        job = dataclasses.replace(job, root=str(resolve_root(job.root)))
        # What can be checked without Ray is checked first: a mistake costs no start-up.
        teacher = load_teacher_round(job.root, job.run, job.round)
        check_teacher_file(teacher)
        with ray_session(job.num_cpus):
            m = run_pseudo_label_stages(job.root, job.run, job.round, job.label_config(),
                                        round_manifest(job, teacher))
        report(job, m)
        return 0

    return run_job("pseudo_label", body)


def report(job: PseudoLabelJob, m: dict[str, Any]) -> None:
    pl = m["pseudo_labels"]
    bad = m["stages"]["pseudo_label"].get("bad_samples", {})
    print(f"pseudo_label: {pl['rows']} images labeled in {len(pl['files'])} files under "
          f"{Path(job.root) / pl['uri']}; {bad.get('count', 0)} bad samples skipped")
    print(f"pseudo_label: selected {pl['kept']} images ({pl['selected_with_copies']} with "
          f"copies; threshold {pl['threshold']}, K {pl['k']}); manifest "
          f"{mf.manifest_path(job.root, job.run, job.round)}")


if __name__ == "__main__":
    sys.exit(main())

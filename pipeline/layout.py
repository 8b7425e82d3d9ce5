"""Where a run's files live: one object owns every path under ``--root``.

    <root>/manifests/<run>/round-<N>.json     the lineage record (pipeline.manifest)
    <root>/artifacts/<run>/round-<N>/         model.pt, pseudo/*.parquet, predictions, train/
    <root>/reports/<run>/                     what jobs/report.py writes

Records store locations under the root relative to it (``artifacts/r1/round-0/model.pt``), so a
root can be moved or mounted elsewhere; anything outside the root is stored absolute. Stages never
join these paths themselves: they ask the layout. The root may be local or ``s3://bucket/prefix``
(:mod:`pipeline.fs`); the paths it hands out are then :class:`~pipeline.fs.S3Path` objects with
the same interface.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.fs import S3Path, location

AnyPath = Path | S3Path

MODEL_FILE = "model.pt"
PSEUDO_DIR = "pseudo"
TRUTH_DIR = "truth"
PREDICTIONS_DIR = "predictions"
TEST_PREDICTIONS = "test_predictions.parquet"
TENSORBOARD_DIR = "tensorboard"


@dataclass(frozen=True)
class RunLayout:
    """The paths of run ``run`` under ``root`` (made absolute; local or ``s3://``)."""

    root: AnyPath
    run: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", location(self.root).resolve())

    @property
    def remote(self) -> bool:
        return isinstance(self.root, S3Path)

    # -- manifests
    @property
    def manifest_dir(self) -> AnyPath:
        return self.root / "manifests" / self.run

    def manifest_path(self, round_: int) -> AnyPath:
        return self.manifest_dir / f"round-{round_}.json"

    def rounds(self) -> list[int]:
        """Round numbers that have a manifest file, sorted."""
        found = []
        for p in self.manifest_dir.glob("round-*.json"):
            suffix = p.stem.removeprefix("round-")
            if suffix.isdigit():
                found.append(int(suffix))
        return sorted(found)

    # -- artifacts of a round
    def artifact_dir(self, round_: int) -> AnyPath:
        return self.root / "artifacts" / self.run / f"round-{round_}"

    def model_path(self, round_: int) -> AnyPath:
        return self.artifact_dir(round_) / MODEL_FILE

    def pseudo_dir(self, round_: int) -> AnyPath:
        return self.artifact_dir(round_) / PSEUDO_DIR

    def truth_dir(self, round_: int) -> AnyPath:
        return self.artifact_dir(round_) / TRUTH_DIR

    def predictions_dir(self, round_: int) -> AnyPath:
        """Per-rank prediction parts written by the training workers."""
        return self.artifact_dir(round_) / PREDICTIONS_DIR

    def test_predictions(self, round_: int) -> AnyPath:
        return self.artifact_dir(round_) / TEST_PREDICTIONS

    def tensorboard_dir(self, round_: int) -> AnyPath:
        return self.artifact_dir(round_) / TENSORBOARD_DIR

    def damage_dir(self, round_: int) -> AnyPath:
        """Where the training streams record the damaged samples they skipped."""
        return self.artifact_dir(round_) / "damage"

    # -- reports
    @property
    def report_dir(self) -> AnyPath:
        return self.root / "reports" / self.run

    # -- locations stored in records
    def resolve(self, uri: str | AnyPath) -> AnyPath:
        """A location from a record: relative ones are under the root."""
        p = location(uri)
        return p if p.is_absolute() else self.root / p

    def relative(self, path: str | AnyPath) -> str:
        """How a record stores ``path``: relative to the root when under it, else absolute."""
        p = location(path).resolve()
        try:
            return p.relative_to(self.root).as_posix()
        except (ValueError, TypeError):  # not under the root (TypeError: local vs s3)
            return str(p)

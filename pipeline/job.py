"""What one round's training workers are given: a plain dataclass, apart from pipeline.train so
that a job's driver builds it without importing torch and torchvision (the workers do)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.config import TrainConfig


@dataclass
class Job:
    """Everything a worker needs; it travels to Ray workers pickled, the config as its frozen
    dataclass."""

    config: TrainConfig  # a StudentConfig for a student
    role: str
    classes: list[str]
    labeled: dict[str, Any]  # {"shards": [...], "count": n, "weights": samples per shard or None}
    test: dict[str, Any]
    model: dict[str, Any]  # {"name", "train_resolution", "test_resolution", "dropout", "drop_path",
    #                         "options" (create_model's extra arguments)}
    predictions_dir: str
    pseudo: dict[str, Any] | None = None  # {"shards", "weights" (copies per shard), "dir",
    #                                         "count" (sum of copies), "names" (shard -> file)}
    randaugment: dict[str, Any] | None = None  # {"num_ops", "magnitude"}
    init: dict[str, Any] | None = None  # models.weights.InitPlan as a dict: --init-from, checked
    tensorboard_dir: str | None = None  # rank 0 writes its event files here
    damage_dir: str | None = None  # the training streams record their damage tallies here
    norm_shards: list[str] | None = None  # unlabeled shards: more images for FixRes's BatchNorm

    @property
    def num_classes(self) -> int:
        return len(self.classes)

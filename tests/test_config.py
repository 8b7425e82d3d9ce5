"""One config per stage: frozen dataclasses, presets, the typed command line, clear refusals."""

from __future__ import annotations

import dataclasses

import pytest

from pipeline.config import (
    PRESETS,
    ConfigError,
    PseudoLabelConfig,
    StudentConfig,
    TrainConfig,
    parse_config,
)


def test_student_and_pseudo_label_job_share_the_labeling_options() -> None:
    """The same flag names and defaults in jobs/student.py and jobs/pseudo_label.py: a round
    resumed through the other entry point labels and selects the same way."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "jobs"))
    from pseudo_label import PseudoLabelJob

    shared = {f.name: f.default for f in dataclasses.fields(PseudoLabelConfig)}
    student = {f.name: f.default for f in dataclasses.fields(StudentConfig)}
    job = {f.name: f.default for f in dataclasses.fields(PseudoLabelJob)}
    for name, default in shared.items():
        assert student[name] == default == job[name], name
    cfg = parse_config(StudentConfig, "student", ["--run", "r", "--label-batch-size", "64",
                                                  "--threshold", "0.5"])
    assert cfg.label_settings() == PseudoLabelConfig(label_batch_size=64, threshold=0.5)


def test_configs_are_frozen_and_travel_whole() -> None:
    cfg = StudentConfig(run="r", data="d")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 1.0  # type: ignore[misc]
    import pickle

    assert pickle.loads(pickle.dumps(cfg)) == cfg


def test_presets_override_defaults_and_flags_override_presets() -> None:
    demo = parse_config(TrainConfig, "teacher", ["--run", "r", "--preset", "demo",
                                                 "--epochs", "7"])
    assert demo.model == PRESETS["teacher"]["demo"]["model"] and demo.epochs == 7
    with pytest.raises(ConfigError, match="unknown preset 'fast'; available: demo"):
        parse_config(TrainConfig, "teacher", ["--preset", "fast"])
    with pytest.raises(ConfigError, match="--preset needs a name"):
        parse_config(TrainConfig, "teacher", ["--preset"])


def test_unknown_options_list_what_is_allowed() -> None:
    with pytest.raises(ConfigError, match=r"unknown option --learning-rate; allowed: --preset, "
                                          r".*--lr"):
        parse_config(TrainConfig, "teacher", ["--learning-rate", "0.1"])


@pytest.mark.parametrize("cls, values, message", [
    (TrainConfig, {"run": ""}, "--run is required"),
    (TrainConfig, {"run": "a b"}, "letters, digits"),
    (TrainConfig, {"data": ""}, "--data is required"),
    (TrainConfig, {"model": "resnet"}, "--model 'resnet' is unknown; valid:"),
    (TrainConfig, {"epochs": 0}, "--epochs must be > 0"),
    (TrainConfig, {"dropout": 1.0}, r"--dropout must be in \[0, 1\)"),
    (TrainConfig, {"damage_limit": 1.5}, r"--damage-limit must be in \[0, 1\]"),
    (StudentConfig, {"round": 0}, "--round must be >= 1 for a student"),
    (StudentConfig, {"threshold": 1.0}, r"--threshold must be in \[0, 1\)"),
    (StudentConfig, {"label_actors": 0}, "--label-actors must be >= 1|--label-batch-size"),
    (StudentConfig, {"k": 0}, "--k must be >= 1"),
])
def test_bad_values_are_refused_by_name(cls: type, values: dict, message: str) -> None:
    base = {"run": "r", "data": "d", "model": "efficientnet_t0"}
    with pytest.raises(ConfigError, match=message):
        cls(**{**base, **values}).validate()

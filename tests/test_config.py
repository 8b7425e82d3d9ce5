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


def test_only_plain_booleans_have_a_no_flag() -> None:
    """tyro negates ``bool`` fields; ``bool | None`` ones take a value. Our one-line check must
    agree, or ``--no-use-gpu`` would pass it and end in tyro's usage box instead."""
    cfg = parse_config(StudentConfig, "student", ["--run", "r", "--no-soft-labels",
                                                  "--use-gpu", "False"])
    assert cfg.soft_labels is False and cfg.use_gpu is False
    with pytest.raises(ConfigError, match="unknown option --no-use-gpu; allowed:"):
        parse_config(StudentConfig, "student", ["--run", "r", "--no-use-gpu"])


@pytest.mark.parametrize("cls, values, message", [
    (TrainConfig, {"run": ""}, "--run is required"),
    (TrainConfig, {"run": "a b"}, "letters, digits"),
    (TrainConfig, {"data": ""}, "--data is required"),
    (TrainConfig, {"model": "resnet"}, "--model 'resnet' is unknown; valid:"),
    (TrainConfig, {"epochs": 0}, "--epochs must be > 0"),
    (TrainConfig, {"dropout": 1.0}, r"--dropout must be in \[0, 1\)"),
    (TrainConfig, {"damage_limit": 1.5}, r"--damage-limit must be in \[0, 1\]"),
    (TrainConfig, {"decoded_cache_mb": -1}, "--decoded-cache-mb must be >= 0"),
    (StudentConfig, {"round": 0}, "--round must be >= 1 for a student"),
    (StudentConfig, {"threshold": 1.0}, r"--threshold must be in \[0, 1\)"),
    (StudentConfig, {"label_actors": 0}, "--label-actors must be >= 1|--label-batch-size"),
    (StudentConfig, {"k": 0}, "--k must be >= 1"),
    # nan passes every "value <= 0" check; found by trying bad values on every job
    (TrainConfig, {"lr": float("nan")}, "--lr must be a finite number, got nan"),
    (TrainConfig, {"warmup_epochs": float("inf")}, "--warmup-epochs must be a finite number"),
    (StudentConfig, {"temperature": float("nan")}, "--temperature must be a finite number"),
    (StudentConfig, {"cpus_per_actor": float("nan")}, "--cpus-per-actor must be a finite"),
    (TrainConfig, {"decay_rate": 0.0}, r"--decay-rate must be in \(0, 1\], got 0.0"),
    (TrainConfig, {"weight_decay": -1.0}, "--weight-decay must be >= 0, got -1.0"),
    (TrainConfig, {"grad_clip": -1.0}, "--grad-clip must be >= 0"),
    (TrainConfig, {"shuffle_buffer": -5}, "--shuffle-buffer must be >= 0"),
    (TrainConfig, {"preflight_limit": -1}, "--preflight-limit must be >= 0"),
    (TrainConfig, {"seed": -1}, "--seed must be >= 0"),
    (TrainConfig, {"finetune_lr_scale": -1.0}, "--finetune-lr-scale must be > 0"),
    (StudentConfig, {"randaugment_m": -5.0}, "--randaugment-m must be >= 0"),
    # Path() made s3://b/w.pt into s3:/b/w.pt, "no such file"
    (TrainConfig, {"init_from": "s3://b/w.pt"}, r"^--init-from s3://b/w\.pt: reads local files "
                                                 r"only; copy it to a local disk first"),
])
def test_bad_values_are_refused_by_name(cls: type, values: dict, message: str) -> None:
    base = {"run": "r", "data": "d", "model": "efficientnet_t0"}
    with pytest.raises(ConfigError, match=message):
        cls(**{**base, **values}).validate()


def test_resolutions_and_the_teacher_fine_tune_follow_the_model() -> None:
    """FixRes defaults come from the registry's train/test pair: L2 trains at 475 and tests at
    800, so its teacher fine-tunes 1.5 epochs; a model trained at its test resolution does not
    fine-tune as a teacher, while a student always does (the recipe's 1.5 epochs). Flags win."""
    l2 = TrainConfig(run="r", data="d", model="efficientnet_l2").with_model_defaults()
    assert (l2.train_resolution, l2.test_resolution, l2.finetune_epochs) == (475, 800, 1.5)
    b0 = TrainConfig(run="r", data="d", model="efficientnet_b0").with_model_defaults()
    assert (b0.train_resolution, b0.test_resolution, b0.finetune_epochs) == (224, 224, 0.0)
    lower = TrainConfig(run="r", data="d", model="efficientnet_b0",
                        train_resolution=192).with_model_defaults()
    assert (lower.train_resolution, lower.test_resolution, lower.finetune_epochs) == (192, 224, 1.5)
    higher = TrainConfig(run="r", data="d", model="efficientnet_b0",
                         train_resolution=256).with_model_defaults()
    assert (higher.train_resolution, higher.test_resolution, higher.finetune_epochs) == (256, 224,
                                                                                         1.5)
    student = StudentConfig(run="r", data="d", model="efficientnet_b0").with_model_defaults()
    assert student.finetune_epochs == 1.5 and student.finetune_norm == "auto"
    off = TrainConfig(run="r", data="d", model="efficientnet_l2",
                      finetune_epochs=0).with_model_defaults()
    assert off.finetune_epochs == 0
    cfg = parse_config(StudentConfig, "student", ["--run", "r", "--train-resolution", "24",
                                                  "--test-resolution", "40", "--finetune-norm",
                                                  "all", "--finetune-norm-images", "500"])
    assert (cfg.train_resolution, cfg.test_resolution, cfg.finetune_norm,
            cfg.finetune_norm_images) == (24, 40, "all", 500)


@pytest.mark.parametrize("values, message", [
    ({"train_resolution": 4}, "--train-resolution must be >= 8"),
    ({"test_resolution": 0}, "--test-resolution must be >= 8"),
    ({"finetune_norm_images": 0}, "--finetune-norm-images must be >= 1"),
    ({"finetune_epochs": -1.0}, "--finetune-epochs"),
])
def test_bad_fixres_values_are_refused(values: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TrainConfig(run="r", data="d", model="efficientnet_t0", **values).validate()


def test_a_preset_given_with_an_equals_sign() -> None:
    """``--preset=demo`` reached tyro, which refused it as an unknown option."""
    cfg = parse_config(TrainConfig, "teacher", ["--run", "r", "--data", "d", "--preset=demo"])
    assert cfg == parse_config(TrainConfig, "teacher", ["--run", "r", "--data", "d",
                                                        "--preset", "demo"])
    assert cfg.model == PRESETS["teacher"]["demo"]["model"]


def test_help_names_the_preset_option_and_shows_a_presets_values(
        capsys: pytest.CaptureFixture[str]) -> None:
    """--preset is taken out before tyro parses, so tyro's option list never showed it."""
    for args, epochs in ((["--help"], "(default: 350)"),
                         (["--preset", "demo", "--help"], "(default: 120)")):
        with pytest.raises(SystemExit):
            parse_config(TrainConfig, "teacher", args, description="Round 0.")
        out = capsys.readouterr().out
        assert "--preset NAME: start from a named preset's values (available: demo)" in out
        assert epochs in " ".join(out.split()), out

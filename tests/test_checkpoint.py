"""Checkpoint files: the training state round trip, and damaged or changed files refused."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from pipeline.checkpoint import (
    STATE_FILE,
    CheckpointError,
    load_model,
    load_training_state,
    read_model_file,
    read_state,
    read_weights,
    save_model_file,
    save_training_state,
)


def _trained() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(8, 4)).sum().backward()
    opt.step()  # so the optimizer has state (exp_avg, step) to save
    return model, opt


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_training_state_round_trip(tmp_path: Path) -> None:
    model, opt = _trained()
    ema = {k: v * 0.5 for k, v in model.state_dict().items()}
    state = {"phase": "finetune", "epoch": 3, "history": [{"epoch": 1, "test_top1": None}]}
    path = save_training_state(tmp_path, model=model.state_dict(), ema=ema, ema_updates=7,
                               optimizer=opt.state_dict(), state=state)
    assert path == tmp_path / STATE_FILE
    saved = load_training_state(tmp_path, "cpu")
    assert saved.state == state and saved.ema_updates == 7
    assert saved.ema is not None and all(torch.equal(ema[k], saved.ema[k]) for k in ema)
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    fresh.load_state_dict(saved.model)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1.0)
    fresh_opt.load_state_dict(saved.optimizer)
    assert fresh_opt.param_groups[0]["lr"] == 1e-2
    assert torch.equal(fresh_opt.state_dict()["state"][0]["exp_avg"],
                       opt.state_dict()["state"][0]["exp_avg"])
    assert read_state(tmp_path) == state
    weights = read_weights(tmp_path)
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


def test_training_state_without_ema(tmp_path: Path) -> None:
    model, opt = _trained()
    save_training_state(tmp_path, model=model.state_dict(), ema=None, ema_updates=0,
                        optimizer=opt.state_dict(), state={"phase": "train"})
    saved = load_training_state(tmp_path)
    assert saved.ema is None and saved.ema_updates == 0


def test_truncated_or_foreign_state_file_is_refused(tmp_path: Path) -> None:
    model, opt = _trained()
    save_training_state(tmp_path, model=model.state_dict(), ema=None, ema_updates=0,
                        optimizer=opt.state_dict(), state={"phase": "train"})
    _truncate(tmp_path / STATE_FILE)
    for read in (load_training_state, read_state, read_weights):
        with pytest.raises(CheckpointError, match=f"{re.escape(str(tmp_path / STATE_FILE))} cannot be read"):
            read(tmp_path)
    torch.save({"weights": model.state_dict()}, tmp_path / STATE_FILE)
    with pytest.raises(CheckpointError, match="is not a state.pt of this tool"):
        load_training_state(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_state(tmp_path / "nowhere")


def test_state_file_is_read_without_unpickling_code(tmp_path: Path) -> None:
    # weights_only=True: an object that is not tensors and primitives is refused, not run
    torch.save({"model": {}, "optimizer": {}, "state": Path("x")}, tmp_path / STATE_FILE)
    with pytest.raises(CheckpointError, match="cannot be read"):
        read_state(tmp_path)


def _model_file(path: Path, seed: int = 0) -> str:
    from models import create_model

    torch.manual_seed(seed)
    model = create_model("efficientnet_t0", 3)
    return save_model_file(path, model.state_dict(), model_name="efficientnet_t0",
                           classes=["a", "b", "c"], train_resolution=32, test_resolution=32)


def test_model_file_sha256_is_checked(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    sha = _model_file(path)
    model, payload = load_model(path, sha)
    assert payload["classes"] == ["a", "b", "c"] and not model.training
    assert read_model_file(path, sha)["num_classes"] == 3
    other = tmp_path / "other.pt"
    _model_file(other, seed=1)  # the same kind of file with other weights
    other.replace(path)
    with pytest.raises(CheckpointError, match=rf"model file {re.escape(str(path))} has sha256 .* changed"):
        read_model_file(path, sha)


def test_truncated_model_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    _model_file(path)
    _truncate(path)
    with pytest.raises(CheckpointError, match=rf"model file {re.escape(str(path))} cannot be read"):
        read_model_file(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_model_file(tmp_path / "missing.pt")

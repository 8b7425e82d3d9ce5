"""Checkpoint files: the model file a round hands on, and the training state of a worker.

The model file, ``artifacts/<run>/round-<N>/model.pt``: a plain dict of tensors and primitives
(loadable with ``torch.load(weights_only=True)``, so no pickled code ever runs): the model's
registry name, class names, resolutions and the weights to use for inference (the EMA weights
when training kept an EMA). Its sha256 goes into the round's manifest; loading for a later round
checks it, so a changed or truncated file is refused.

``state.pt`` (the training state) is what rank 0 puts in every Ray Train checkpoint: model,
EMA and optimizer state and the run's phase/epoch/history, so that a restarted job continues
where it stopped. Both are read with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import UserError
from pipeline.fs import location
from pipeline.storage import atomic_write_bytes, sha256_file

FORMAT = 1
STATE_FILE = "state.pt"


class CheckpointError(UserError, ValueError):
    """A checkpoint file is missing, changed since its manifest was written, or unreadable."""


def save_model_file(
    path: str | Path,
    state_dict: Mapping[str, torch.Tensor],
    *,
    model_name: str,
    classes: list[str],
    train_resolution: int,
    test_resolution: int,
    model_options: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """Write the model file atomically; returns its sha256.

    ``model_options`` are the :func:`models.create_model` arguments the weights need beyond the
    name (BatchNorm settings, TF padding of weights that came from elsewhere): every later round
    rebuilds the network with them."""
    payload = {
        "format": FORMAT,
        "model_name": model_name,
        "num_classes": len(classes),
        "classes": list(classes),
        "train_resolution": int(train_resolution),
        "test_resolution": int(test_resolution),
        "model_options": dict(model_options or {}),
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in state_dict.items()},
        "extra": dict(extra or {}),
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write_bytes(path, buf.getvalue())
    return sha256_file(path)


def read_model_file(path: str | Path, expected_sha256: str | None = None) -> dict[str, Any]:
    """The payload of a model file, after checking its hash when one is expected."""
    path = location(path)
    if not path.is_file():
        raise CheckpointError(f"model file {path} does not exist; rerun the round that makes it")
    # One read serves both the hash and the load: what is checked is what is loaded, even if
    # the file is replaced in between (and from an object store, one download).
    source = io.BytesIO(path.read_bytes())
    if expected_sha256 is not None:
        actual = hashlib.sha256(source.getbuffer()).hexdigest()
        if actual != expected_sha256:
            raise CheckpointError(
                f"model file {path} has sha256 {actual[:12]}..., but its manifest records "
                f"{expected_sha256[:12]}...; it changed after the round finished. Restore it or "
                "rerun that round with --force"
            )
    try:
        payload = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as e:  # any unpickling failure means the file is not ours or is damaged
        raise CheckpointError(f"model file {path} cannot be read ({type(e).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a model file of this tool (format {FORMAT})")
    return payload


def load_model(path: str | Path, expected_sha256: str | None = None,
               **model_kwargs: Any) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the model from its file; returns (model in eval mode, payload without weights)."""
    from models import create_model

    payload = read_model_file(path, expected_sha256)
    options = {**(payload.get("model_options") or {}), **model_kwargs}
    model = create_model(payload["model_name"], payload["num_classes"], **options)
    model.load_state_dict(payload.pop("state_dict"))
    model.eval()
    return model, payload


# ----------------------------------------------------------------------------- training state


@dataclass
class TrainingState:
    """The contents of ``state.pt``: state dicts, and ``state`` (phase, epoch, history...)."""

    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor] | None
    ema_updates: int
    optimizer: dict[str, Any]
    state: dict[str, Any]


def save_training_state(
    folder: str | Path,
    *,
    model: Mapping[str, torch.Tensor],
    ema: Mapping[str, torch.Tensor] | None,
    ema_updates: int,
    optimizer: Mapping[str, Any],
    state: Mapping[str, Any],
) -> Path:
    """Write ``folder/state.pt``; returns its path. Not atomic: the folder is a fresh temporary
    one that the reporter moves into place whole."""
    path = Path(folder) / STATE_FILE
    torch.save({"model": model, "ema": ema, "ema_updates": ema_updates, "optimizer": optimizer,
                "state": state}, path)
    return path


def _load_state_file(folder: str | Path, device: torch.device | str) -> dict[str, Any]:
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"training checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # a job killed while copying leaves a truncated file
        raise CheckpointError(f"training checkpoint {path} cannot be read "
                              f"({type(e).__name__}); it is truncated or not from this tool. "
                              "Remove that checkpoint folder to resume from an older one, or "
                              "rerun the round with --force") from None
    if not isinstance(payload, dict) or not {"model", "optimizer", "state"} <= payload.keys():
        raise CheckpointError(f"training checkpoint {path} is not a state.pt of this tool "
                              "(it needs model, optimizer and state)")
    return payload


def load_training_state(folder: str | Path,
                        device: torch.device | str = "cpu") -> TrainingState:
    """Everything :func:`save_training_state` wrote, tensors on ``device``."""
    saved = _load_state_file(folder, device)
    return TrainingState(model=saved["model"], ema=saved.get("ema"),
                         ema_updates=int(saved.get("ema_updates", 0)),
                         optimizer=saved["optimizer"], state=saved["state"])


def read_state(folder: str | Path) -> dict[str, Any]:
    """The ``state`` part of a checkpoint folder (history, phase, metrics)."""
    return _load_state_file(folder, "cpu")["state"]


def read_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """The weights to hand on: after training these already are the EMA weights."""
    return _load_state_file(folder, "cpu")["model"]

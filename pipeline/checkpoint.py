"""The model file a round hands on: ``artifacts/<run>/round-<N>/model.pt``.

A plain dict of tensors and primitives (loadable with ``torch.load(weights_only=True)``, so no
pickled code ever runs): the model's registry name, class names, resolutions and the weights to
use for inference (the EMA weights when training kept an EMA). Its sha256 goes into the round's
manifest; loading for a later round checks it, so a changed or truncated file is refused.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from pipeline.manifest import atomic_write_bytes, sha256_file

FORMAT = 1


class CheckpointError(ValueError):
    """A model file is missing, changed since its manifest was written, or unreadable."""


def save_model_file(
    path: str | Path,
    state_dict: Mapping[str, torch.Tensor],
    *,
    model_name: str,
    classes: list[str],
    train_resolution: int,
    test_resolution: int,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """Write the model file atomically; returns its sha256."""
    payload = {
        "format": FORMAT,
        "model_name": model_name,
        "num_classes": len(classes),
        "classes": list(classes),
        "train_resolution": int(train_resolution),
        "test_resolution": int(test_resolution),
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in state_dict.items()},
        "extra": dict(extra or {}),
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write_bytes(path, buf.getvalue())
    return sha256_file(path)


def read_model_file(path: str | Path, expected_sha256: str | None = None) -> dict[str, Any]:
    """The payload of a model file, after checking its hash when one is expected."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model file {path} does not exist; rerun the round that makes it")
    if expected_sha256 is not None:
        actual = sha256_file(path)
        if actual != expected_sha256:
            raise CheckpointError(
                f"model file {path} has sha256 {actual[:12]}..., but its manifest records "
                f"{expected_sha256[:12]}...; it changed after the round finished. Restore it or "
                "rerun that round with --force"
            )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
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
    model = create_model(payload["model_name"], payload["num_classes"], **model_kwargs)
    model.load_state_dict(payload.pop("state_dict"))
    model.eval()
    return model, payload

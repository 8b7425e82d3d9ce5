"""Model registry and EfficientNet builders (B0..B7, L2 and the tiny CPU family t0..t3)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from models.registry import ModelSpec, get_model_spec, list_models, register_model

if TYPE_CHECKING:
    from models.efficientnet import count_parameters, create_model, freeze_shallow

__all__ = [
    "ModelSpec",
    "count_parameters",
    "create_model",
    "freeze_shallow",
    "get_model_spec",
    "list_models",
    "register_model",
]

_BUILDERS = ("count_parameters", "create_model", "freeze_shallow")


def __getattr__(name: str) -> Any:
    # The builders import torch and torchvision (seconds); the registry alone does not, so a job
    # that only checks a model name imports them when it first builds a model (PEP 562).
    if name in _BUILDERS:
        from models import efficientnet

        return getattr(efficientnet, name)
    raise AttributeError(f"module 'models' has no attribute {name!r}")

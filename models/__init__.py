"""Model registry and EfficientNet builders (B0..B7, L2 and the tiny CPU family t0..t3)."""

from models.efficientnet import count_parameters, create_model, freeze_shallow
from models.registry import ModelSpec, get_model_spec, list_models, register_model

__all__ = [
    "ModelSpec",
    "count_parameters",
    "create_model",
    "freeze_shallow",
    "get_model_spec",
    "list_models",
    "register_model",
]

"""Model registry: a name -> ModelSpec table, in the style of timm's ``register_model``.

The registry holds data only; the builder that turns a spec into a module lives in
``models/efficientnet.py``, which registers its specs at import time.
"""

from __future__ import annotations

from dataclasses import dataclass

_REGISTRY: dict[str, ModelSpec] = {}


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model from its name (checkpoints store ``name``).

    ``width_mult`` and ``depth_mult`` are the effective compound-scaling multipliers applied to
    the EfficientNet-B0 stage table (the tiny family folds its base width/depth into them).
    """

    name: str
    width_mult: float
    depth_mult: float
    train_resolution: int
    test_resolution: int
    dropout: float  # default head dropout
    stem_stride: int = 2

    @property
    def relative_cost(self) -> float:
        """Parameter count grows about as depth * width^2; used to order ``list_models``."""
        return self.depth_mult * self.width_mult**2


def register_model(spec: ModelSpec) -> ModelSpec:
    """Add ``spec`` to the registry; registering a name twice is a programming error."""
    if spec.name in _REGISTRY:
        raise ValueError(f"model '{spec.name}' is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def list_models() -> list[str]:
    """Registered names, smallest model first (tests check this against real parameter counts)."""
    return sorted(_REGISTRY, key=lambda name: (_REGISTRY[name].relative_cost, name))


def get_model_spec(name: str) -> ModelSpec:
    """The spec registered under ``name``; unknown names fail with the list of valid ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        valid = ", ".join(list_models())
        raise ValueError(f"unknown model '{name}'; valid: {valid}") from None

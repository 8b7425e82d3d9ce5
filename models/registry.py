"""Model registry: a name -> ModelSpec table, in the style of timm's ``register_model``.

The registry holds data only, and this module registers the EfficientNet family itself (the
compound-scaling table below); the builder that turns a spec into a module lives in
``models/efficientnet.py``. Nothing here imports torch, so a job checks a model name, its
resolutions and its size-dependent defaults before paying for torch's import.
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


# Compound-scaling table (docs/recipe.md): name -> (width, depth, resolution, head dropout).
_COMPOUND_TABLE: dict[str, tuple[float, float, int, float]] = {
    "b0": (1.0, 1.0, 224, 0.2),
    "b1": (1.0, 1.1, 240, 0.2),
    "b2": (1.1, 1.2, 260, 0.3),
    "b3": (1.2, 1.4, 300, 0.3),
    "b4": (1.4, 1.8, 380, 0.4),
    "b5": (1.6, 2.2, 456, 0.4),
    "b6": (1.8, 2.6, 528, 0.5),
    "b7": (2.0, 3.1, 600, 0.5),
}

TINY_BASE_WIDTH = 0.25
TINY_BASE_DEPTH = 0.5
TINY_RESOLUTION = 32


def _register_all() -> None:
    # B0-B7 train and test at their table resolution, as their released Noisy Student
    # checkpoints (tensorflow/tpu efficientnet README); the paper's FixRes gap is L2's only.
    for key, (width, depth, res, dropout) in _COMPOUND_TABLE.items():
        register_model(ModelSpec(f"efficientnet_{key}", width, depth, res, res, dropout))
    # Noisy Student trained L2 at 475 px and tested at 800 px (paper Section 3.1; tpu README,
    # "L2-475"), with a 1.5-epoch fine-tune at 800 (pipeline/fixres.py).
    register_model(ModelSpec("efficientnet_l2", 4.3, 5.3, 475, 800, 0.5))
    for k in range(4):
        width, depth, _, dropout = _COMPOUND_TABLE[f"b{k}"]
        register_model(
            ModelSpec(
                f"efficientnet_t{k}",
                width_mult=TINY_BASE_WIDTH * width,
                depth_mult=TINY_BASE_DEPTH * depth,
                train_resolution=TINY_RESOLUTION,
                test_resolution=TINY_RESOLUTION,
                dropout=dropout,
                stem_stride=1,
            )
        )


_register_all()

"""Model registry: a name -> ModelSpec table, in the style of timm's ``register_model``.

The registry holds data only, and this module registers the EfficientNet family itself (the
compound-scaling table below); the builder that turns a spec into a module lives in
``models/efficientnet.py``. Nothing here imports torch, so a job checks a model name, its
resolutions and its size-dependent defaults before paying for torch's import.
"""

from __future__ import annotations

import math
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


def parameter_count(name: str, num_classes: int) -> int:
    """Parameters of the model ``create_model(name, num_classes)`` builds, by arithmetic on the
    stage table: torchvision's EfficientNet layer by layer (``tests/test_models.py`` checks it
    against built models of every registered name). It spares a job's driver importing torch and
    torchvision to count the sizes it records and compares."""
    spec = get_model_spec(name)

    def divisible(v: float) -> int:  # torchvision's _make_divisible(v, 8)
        rounded = max(8, int(v + 4) // 8 * 8)
        return rounded + 8 if rounded < 0.9 * v else rounded

    def conv_bn(c_in: int, c_out: int, k: int = 1, groups: int = 1) -> int:
        return c_in // groups * c_out * k * k + 2 * c_out  # no conv bias; BatchNorm's weight, bias

    stem = divisible(32 * spec.width_mult)
    total, c_in = conv_bn(3, stem, 3), stem
    for expand, kernel, _, first_in, out, layers in B0_STAGES:
        c_out = divisible(out * spec.width_mult)
        for i in range(math.ceil(layers * spec.depth_mult)):
            block_in = divisible(first_in * spec.width_mult) if i == 0 else c_out
            expanded = divisible(block_in * expand)
            squeeze = max(1, block_in // 4)
            if expanded != block_in:
                total += conv_bn(block_in, expanded)
            total += conv_bn(expanded, expanded, kernel, groups=expanded)
            total += expanded * squeeze + squeeze + squeeze * expanded + expanded  # SE, biases
            total += conv_bn(expanded, c_out)
        c_in = c_out
    head = 4 * c_in
    return total + conv_bn(c_in, head) + head * num_classes + num_classes


def get_model_spec(name: str) -> ModelSpec:
    """The spec registered under ``name``; unknown names fail with the list of valid ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        valid = ", ".join(list_models())
        raise ValueError(f"unknown model '{name}'; valid: {valid}") from None


# (expand_ratio, kernel, stride, in_channels, out_channels, num_layers) for B0.
B0_STAGES: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
)

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

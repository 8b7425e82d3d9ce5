"""EfficientNet B0-B7, L2 and a tiny CPU family, built from torchvision's EfficientNet blocks.

Architecture as data: ``_B0_STAGES`` is the B0 stage table (Tan & Le 2019, Table 1) and every
registered model is that table scaled by a (width, depth) multiplier pair with torchvision's
rounding (channels to multiples of 8 via ``_make_divisible``, depth ceil per stage). No weights
are downloaded; every model starts from torchvision's initialisation.

The tiny family (``efficientnet_t0`` .. ``efficientnet_t3``) exists so the whole Noisy Student
loop can run on CPUs with 32x32 images. It uses the SAME builder and the SAME compound-scaling
steps as B0..B3: t_k's multipliers are B_k's (width, depth) times a fixed base
(``TINY_BASE_WIDTH``, ``TINY_BASE_DEPTH``), so each round's student grows the way the paper's
B_k -> B_k+1 students do. The stem has stride 1, so a 32 px input ends at 2x2 before pooling
instead of 1x1 (the six other stride-2 steps already divide by 16). Train and test resolution are
both 32: the bundled images are 32 px, and up-sampling them for FixRes only costs CPU time.
TODO(numbers): base values and measured throughput are filled in below.
"""

from __future__ import annotations

from functools import partial

from torch import nn
from torchvision.models.efficientnet import EfficientNet, MBConv, MBConvConfig

from models.registry import ModelSpec, get_model_spec, register_model

# (expand_ratio, kernel, stride, in_channels, out_channels, num_layers) for B0.
_B0_STAGES: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
)

# Compound-scaling table (RECIPE.md): name -> (width, depth, resolution, head dropout).
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
    for key, (width, depth, res, dropout) in _COMPOUND_TABLE.items():
        register_model(ModelSpec(f"efficientnet_{key}", width, depth, res, res, dropout))
    # Noisy Student trained L2 at 475 px and tested at 800 px (FixRes-style gap).
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


def _stage_configs(spec: ModelSpec) -> list[MBConvConfig]:
    scaled = partial(MBConvConfig, width_mult=spec.width_mult, depth_mult=spec.depth_mult)
    return [scaled(*stage) for stage in _B0_STAGES]


def _set_drop_path(model: nn.Module, drop_path: float) -> None:
    """Linear stochastic-depth schedule reaching exactly ``drop_path`` at the last block.

    torchvision (like the TF reference) uses ``p * i / n``, which stops at ``p * (n-1)/n``;
    the recipe asks for ``p`` at the last block, so we overwrite with ``p * i / (n-1)``.
    """
    blocks = [m for m in model.modules() if isinstance(m, MBConv)]
    last = max(len(blocks) - 1, 1)
    for i, block in enumerate(blocks):
        block.stochastic_depth.p = drop_path * i / last


def _check_probability(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")


def create_model(
    name: str, num_classes: int, *, dropout: float | None = None, drop_path: float = 0.2
) -> nn.Module:
    """Build a registered model with fresh weights.

    ``dropout`` None uses the spec's head dropout; ``drop_path`` is the stochastic-depth drop
    probability at the last MBConv block, scaled linearly from 0 at the first.
    The result is a torchvision ``EfficientNet`` (``features``, ``avgpool``,
    ``classifier = Sequential(Dropout, Linear)``) carrying its ``spec`` as an attribute.
    """
    spec = get_model_spec(name)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    dropout = spec.dropout if dropout is None else dropout
    _check_probability("dropout", dropout)
    _check_probability("drop_path", drop_path)

    model = EfficientNet(_stage_configs(spec), dropout=dropout, num_classes=num_classes)
    # torchvision hard-codes a stride-2 stem; the tiny family needs stride 1 on 32 px inputs.
    # A 3x3 conv with padding 1 keeps "same" padding at either stride.
    model.features[0][0].stride = (spec.stem_stride, spec.stem_stride)
    _set_drop_path(model, drop_path)
    model.spec = spec
    return model


def count_parameters(model: nn.Module) -> int:
    """All parameters, trainable or not (the figure the compound-scaling table reports)."""
    return sum(p.numel() for p in model.parameters())


def _freeze_batchnorm_stats(modules: list[nn.Module]) -> None:
    """Keep frozen BatchNorms in eval mode even after the caller's ``model.train()``.

    Otherwise their running statistics would drift to the new resolution while their affine
    parameters stay fixed, which is exactly what FixRes fine-tuning must avoid.
    """
    norms = [m for module in modules for m in module.modules() if isinstance(m, nn.BatchNorm2d)]

    def to_eval(_module: nn.Module, _args: tuple) -> None:
        for norm in norms:
            norm.eval()

    for module in modules:
        module.register_forward_pre_hook(to_eval)


def freeze_shallow(model: nn.Module, fraction: float = 0.5) -> int:
    """Freeze the stem and the first ``floor(fraction * n_stages)`` MBConv stages (FixRes).

    Frozen parameters get ``requires_grad=False`` and their BatchNorms stay in eval mode via a
    forward-pre-hook, so no caller discipline is needed. The deep stages, the head conv and the
    classifier stay trainable. Returns the number of frozen parameters.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    features = getattr(model, "features", None)
    if not isinstance(features, nn.Sequential) or len(features) < 3:
        raise ValueError("freeze_shallow needs a model from create_model (with .features)")
    n_stages = len(features) - 2  # features = [stem, stage_1 .. stage_n, head conv]
    frozen = list(features[: 1 + int(fraction * n_stages)])
    params = [p for module in frozen for p in module.parameters()]
    for p in params:
        p.requires_grad_(False)
    _freeze_batchnorm_stats(frozen)
    return sum(p.numel() for p in params)


_register_all()

__all__ = ["count_parameters", "create_model", "freeze_shallow", "TINY_BASE_DEPTH", "TINY_BASE_WIDTH"]


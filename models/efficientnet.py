"""EfficientNet B0-B7, L2 and a tiny CPU family, built from torchvision's EfficientNet blocks.

Architecture as data: ``B0_STAGES`` (``models/registry.py``) is the B0 stage table (Tan & Le
2019, Table 1) and every registered model is that table scaled by a (width, depth) multiplier
pair with torchvision's rounding (channels to multiples of 8 via ``_make_divisible``, depth ceil
per stage). No weights are downloaded; every model starts from torchvision's initialisation.

The tiny family (``efficientnet_t0`` .. ``efficientnet_t3``) exists so the whole Noisy Student
loop can run on CPUs with 32x32 images. It uses the SAME builder and the SAME compound-scaling
steps as B0..B3: t_k's multipliers are B_k's (width, depth) times a fixed base
(``TINY_BASE_WIDTH`` 0.25, ``TINY_BASE_DEPTH`` 0.5, in ``models/registry.py``), so each
round's student grows the way the paper's B_k -> B_k+1 students do, and every t_k is strictly
larger than t_(k-1).

- Stem stride 1: the four stride-2 stages already divide by 16, so a 32 px input ends at 2x2
  before pooling instead of 1x1 (a stride-2 stem on 64 px up-sampled inputs would cost the same).
- Train and test resolution 32: the CPU images are 32 px; B_k's resolution step is not copied
  because up-sampling 32 px images adds CPU time and no information. A FixRes gap (training at
  24 or 28 px, or testing up-sampled at 40) measured 5 or more points worse on the demo's
  teacher even after the fine-tune (docs/recipe.md, FixRes); ``--train-resolution`` tries one.
- Size at 10 classes: t0 0.20M, t1 0.25M, t2 0.30M, t3 0.35M parameters. Channel rounding to
  multiples of 8 flattens width growth at this scale, so depth carries most of it.
- Speed on CPUs: training runs channels_last (``pipeline.train``), where PyTorch's depthwise
  convolutions are faster, and every depthwise layer is a ``models.depthwise.DepthwiseConv2d``,
  whose weight gradient on maps no larger than its kernel (this family's last stages at 32 px)
  is a matrix product; ``bench/depthwise.py`` measures the step against PyTorch's layers.
"""

from __future__ import annotations

from functools import partial

import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle
from torchvision.models.efficientnet import EfficientNet, MBConv, MBConvConfig

from models.depthwise import use_matmul_depthwise
from models.registry import B0_STAGES, ModelSpec, get_model_spec


def _stage_configs(spec: ModelSpec) -> list[MBConvConfig]:
    scaled = partial(MBConvConfig, width_mult=spec.width_mult, depth_mult=spec.depth_mult)
    return [scaled(*stage) for stage in B0_STAGES]


def _set_drop_path(model: nn.Module, drop_path: float) -> None:
    """Linear stochastic-depth schedule reaching exactly ``drop_path`` at the last block.

    torchvision (like the TF reference) uses ``p * i / n``, which stops at ``p * (n-1)/n``;
    the recipe asks for ``p`` at the last block, so we overwrite with ``p * i / (n-1)``.
    Blocks without a residual never apply it: each stage's first, so also the last block when
    the last stage has one block (B0 and every t_k).
    """
    blocks = [m for m in model.modules() if isinstance(m, MBConv)]
    last = max(len(blocks) - 1, 1)
    for i, block in enumerate(blocks):
        block.stochastic_depth.p = drop_path * i / last


def _check_probability(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")


class _SamePad:
    """Forward pre-hook: TF's "SAME" padding for a strided convolution whose own padding is 0.

    TF pads ``max((ceil(n / s) - 1) * s + k - n, 0)`` in total along each axis, the smaller half
    before: at stride 2 on an even size that is 0 before and 1 after, where PyTorch's symmetric
    padding puts 1 on each side, so weights trained in TF see every strided layer shifted by a
    pixel. A plain object (not a closure), so the model still pickles and deep-copies."""

    def __init__(self, kernel: tuple[int, int], stride: tuple[int, int]) -> None:
        self.kernel, self.stride = kernel, stride

    def __call__(self, _module: nn.Module, args: tuple) -> tuple:
        x = args[0]  # (B, C, H, W)
        pads = []
        for n, k, s in zip(x.shape[-1:-3:-1], self.kernel[::-1], self.stride[::-1], strict=True):
            total = max((-(-n // s) - 1) * s + k - n, 0)
            pads += [total // 2, total - total // 2]
        return (F.pad(x, pads), *args[1:])


def _use_same_padding(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and max(m.stride) > 1:
            m.padding = (0, 0)
            m.register_forward_pre_hook(_SamePad(m.kernel_size, m.stride))


def create_model(
    name: str, num_classes: int, *, dropout: float | None = None, drop_path: float = 0.2,
    norm_eps: float | None = None, norm_momentum: float | None = None,
    same_padding: bool = False,
) -> nn.Module:
    """Build a registered model with fresh weights.

    ``dropout`` None uses the spec's head dropout; ``drop_path`` is the stochastic-depth drop
    probability at the last MBConv block, scaled linearly from 0 at the first. ``norm_eps`` and
    ``norm_momentum`` set every BatchNorm (None: PyTorch's 1e-5 and 0.1); ``same_padding`` pads
    strided convolutions as TF does. The last three are what weights trained elsewhere expect
    (:mod:`models.weights`).
    The result is a torchvision ``EfficientNet`` (``features``, ``avgpool``,
    ``classifier = Sequential(Dropout, Linear)``) carrying its ``spec`` as an attribute.
    """
    spec = get_model_spec(name)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    dropout = spec.dropout if dropout is None else dropout
    _check_probability("dropout", dropout)
    _check_probability("drop_path", drop_path)

    norm = {k: v for k, v in (("eps", norm_eps), ("momentum", norm_momentum)) if v is not None}
    model = EfficientNet(_stage_configs(spec), dropout=dropout, num_classes=num_classes,
                         norm_layer=partial(nn.BatchNorm2d, **norm) if norm else None)
    # torchvision hard-codes a stride-2 stem; the tiny family needs stride 1 on 32 px inputs.
    # A 3x3 conv with padding 1 keeps "same" padding at either stride.
    model.features[0][0].stride = (spec.stem_stride, spec.stem_stride)
    # The same layers; on CPUs their weight gradient on small maps is computed much faster
    # (models/depthwise.py). Before the padding hooks, which attach to the final modules.
    use_matmul_depthwise(model)
    if same_padding:
        _use_same_padding(model)
    _set_drop_path(model, drop_path)
    # torchvision builds every SiLU in place. SiLU's backward needs its input, so under autograd
    # an in-place SiLU first copies that input (a whole activation map, each step); out of place
    # gives the same values, keeps the same tensors alive and copies nothing.
    for m in model.modules():
        if isinstance(m, nn.SiLU):
            m.inplace = False
    model.spec = spec
    return model


def count_parameters(model: nn.Module) -> int:
    """All parameters, trainable or frozen; BatchNorm running statistics are buffers, not counted.

    This is torchvision's ``num_params`` convention, and our B0..B7 counts equal it exactly.
    """
    return sum(p.numel() for p in model.parameters())


def _keep_batchnorm_frozen(model: nn.Module, frozen: list[nn.Module]) -> RemovableHandle:
    """Put the frozen BatchNorms back in eval mode before every forward of ``model.features``.

    ``model.train()`` would otherwise switch them to batch statistics and let their running
    statistics drift to the new resolution while their affine weights stay fixed, which is the
    mismatch FixRes fine-tuning must avoid. Hooking ``features`` (not the model) also covers
    callers that run ``model.features`` alone, and DDP wrappers, which call the inner forward.
    """
    norms = [m for module in frozen for m in module.modules() if isinstance(m, nn.BatchNorm2d)]

    def to_eval(_module: nn.Module, _args: tuple) -> None:
        for norm in norms:
            norm.eval()

    return model.features.register_forward_pre_hook(to_eval)


def freeze_shallow(model: nn.Module, fraction: float = 0.5, *,
                   hooks: list[RemovableHandle] | None = None) -> int:
    """Freeze the stem and the first ``floor(fraction * n_stages)`` MBConv stages (FixRes).

    Frozen parameters get ``requires_grad=False`` and their BatchNorms stay in eval mode via a
    forward-pre-hook, so no caller discipline is needed. The deep stages, the head conv and the
    classifier stay trainable. Returns the number of frozen parameters.

    The hook's handle is appended to ``hooks`` when given: a caller that unfreezes the model
    afterwards (``pipeline.fixres``) must remove it, or the frozen BatchNorms would keep
    switching themselves to eval mode in every later training forward.
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
    handle = _keep_batchnorm_frozen(model, frozen)
    if hooks is not None:
        hooks.append(handle)
    return sum(p.numel() for p in params)


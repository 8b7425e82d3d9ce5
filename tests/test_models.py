"""Model registry and EfficientNet builder: shapes, sizes, noise knobs, FixRes freezing."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torchvision.models.efficientnet import MBConv

from models import (
    ModelSpec,
    count_parameters,
    create_model,
    freeze_shallow,
    get_model_spec,
    list_models,
    register_model,
)

TINY = ["efficientnet_t0", "efficientnet_t1", "efficientnet_t2", "efficientnet_t3"]
B_FAMILY = [f"efficientnet_b{k}" for k in range(8)]

# docs/recipe.md compound-scaling table: params in millions at 1000 classes, as printed (the last
# printed digit is the precision we hold ourselves to).
TABLE_PARAMS_M = {
    "efficientnet_b0": "5.3",
    "efficientnet_b1": "7.8",
    "efficientnet_b2": "9.2",
    "efficientnet_b3": "12",
    "efficientnet_b4": "19",
    "efficientnet_b5": "30",
    "efficientnet_b6": "43",
    "efficientnet_b7": "66",
    "efficientnet_l2": "480",
}

# torchvision's published num_params for its efficientnet_b0..b7: same rounding rules, so the
# counts must agree to the parameter, which pins the whole architecture, not just its size.
TORCHVISION_PARAMS = {
    "efficientnet_b0": 5_288_548,
    "efficientnet_b1": 7_794_184,
    "efficientnet_b2": 9_109_994,
    "efficientnet_b3": 12_233_232,
    "efficientnet_b4": 19_341_616,
    "efficientnet_b5": 30_389_784,
    "efficientnet_b6": 43_040_704,
    "efficientnet_b7": 66_347_960,
}


def _meta_count(name: str, num_classes: int = 1000) -> int:
    # Building on the meta device allocates no memory, so even L2 (480M params) is instant.
    with torch.device("meta"):
        return count_parameters(create_model(name, num_classes))


def _last_digit_unit(printed: str) -> float:
    """1 unit in the last printed digit, in millions ("9.2" -> 0.1, "480" -> 10)."""
    if "." in printed:
        return 10.0 ** -len(printed.split(".")[1])
    return 10.0 ** (len(printed) - 2)


def _drop_path_probs(model: nn.Module) -> list[float]:
    return [m.stochastic_depth.p for m in model.modules() if isinstance(m, MBConv)]


def test_registry_lists_every_family_smallest_first() -> None:
    names = list_models()
    assert set(names) == set(TINY) | set(B_FAMILY) | {"efficientnet_l2"}
    assert names[:4] == TINY
    assert names[4:] == [*B_FAMILY, "efficientnet_l2"]


def test_list_order_matches_real_parameter_counts() -> None:
    counts = [_meta_count(name) for name in list_models()]
    assert all(a < b for a, b in zip(counts, counts[1:], strict=False)), counts


@pytest.mark.parametrize("num_classes", [1, 10, 1000])
def test_arithmetic_parameter_count_equals_the_built_model(num_classes: int) -> None:
    """models.registry.parameter_count (the jobs' drivers use it, without torch) against the
    model create_model builds, for every registered name."""
    from models.registry import parameter_count

    for name in list_models():
        assert parameter_count(name, num_classes) == _meta_count(name, num_classes), name


def test_tiny_family_grows_strictly_at_ten_classes() -> None:
    counts = [_meta_count(name, num_classes=10) for name in TINY]
    assert all(a < b for a, b in zip(counts, counts[1:], strict=False)), counts
    assert 100_000 <= counts[0] <= 300_000


@pytest.mark.parametrize("name", sorted(TABLE_PARAMS_M))
def test_parameter_count_matches_compound_scaling_table(name: str) -> None:
    printed = TABLE_PARAMS_M[name]
    ours_m = _meta_count(name) / 1e6
    assert abs(ours_m - float(printed)) <= _last_digit_unit(printed), (name, ours_m, printed)


@pytest.mark.parametrize("name", sorted(TORCHVISION_PARAMS))
def test_parameter_count_equals_torchvision(name: str) -> None:
    assert _meta_count(name) == TORCHVISION_PARAMS[name]


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="unknown model 'efficientnet_b9'; valid: ") as err:
        create_model("efficientnet_b9", 10)
    assert all(name in str(err.value) for name in list_models())


def test_register_twice_is_rejected() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_model(get_model_spec("efficientnet_b0"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_classes": 0}, "num_classes"),
        ({"num_classes": 10, "dropout": 1.0}, "dropout"),
        ({"num_classes": 10, "drop_path": -0.1}, "drop_path"),
    ],
)
def test_bad_arguments_fail_with_a_named_value(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        create_model("efficientnet_t0", **kwargs)


def test_specs_follow_the_recipe() -> None:
    b3 = get_model_spec("efficientnet_b3")
    assert (b3.width_mult, b3.depth_mult, b3.train_resolution, b3.dropout) == (1.2, 1.4, 300, 0.3)
    assert b3.test_resolution == 300 and b3.stem_stride == 2
    l2 = get_model_spec("efficientnet_l2")
    assert (l2.width_mult, l2.depth_mult, l2.train_resolution, l2.test_resolution) == (
        4.3,
        5.3,
        475,
        800,
    )
    for k, name in enumerate(TINY):
        tiny, big = get_model_spec(name), get_model_spec(f"efficientnet_b{k}")
        assert (tiny.train_resolution, tiny.test_resolution, tiny.stem_stride) == (32, 32, 1)
        # Same compound-scaling step as B_k: the ratio to the family's base is B_k's multiplier.
        t0 = get_model_spec("efficientnet_t0")
        assert tiny.width_mult / t0.width_mult == pytest.approx(big.width_mult)
        assert tiny.depth_mult / t0.depth_mult == pytest.approx(big.depth_mult)
        assert tiny.dropout == big.dropout


def test_module_keeps_torchvision_structure() -> None:
    model = create_model("efficientnet_t0", 7)
    assert isinstance(model.spec, ModelSpec) and model.spec.name == "efficientnet_t0"
    assert isinstance(model.features, nn.Sequential)
    assert isinstance(model.avgpool, nn.AdaptiveAvgPool2d)
    dropout, linear = model.classifier
    assert isinstance(dropout, nn.Dropout) and isinstance(linear, nn.Linear)
    assert linear.out_features == 7


@pytest.mark.parametrize(("name", "side"), [("efficientnet_t0", 2), ("efficientnet_b0", 1)])
def test_stem_stride_sets_final_feature_map(name: str, side: int) -> None:
    model = create_model(name, 10).eval()
    with torch.no_grad():
        features = model.features(torch.randn(1, 3, 32, 32))  # (B, C, H, W)
    assert features.shape[-2:] == (side, side)


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.slow) if n in ("efficientnet_b5", "efficientnet_b6",
                                                     "efficientnet_b7") else n
    for n in list_models() if n != "efficientnet_l2"])
def test_forward_and_backward_at_small_size(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, 5).train()
    images = torch.randn(2, 3, 32, 32)
    logits = model(images)  # (B, num_classes)
    assert logits.shape == (2, 5)
    logits.logsumexp(dim=1).mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.features[0][0].weight.grad.abs().sum() > 0  # gradient reaches the stem


def test_dropout_and_drop_path_land_in_modules() -> None:
    model = create_model("efficientnet_t1", 10, dropout=0.35, drop_path=0.3)
    assert model.classifier[0].p == 0.35
    probs = _drop_path_probs(model)
    last = len(probs) - 1
    assert probs == pytest.approx([0.3 * i / last for i in range(len(probs))])
    assert probs[0] == 0.0 and probs[-1] == pytest.approx(0.3)


def test_default_knobs_come_from_the_spec() -> None:
    model = create_model("efficientnet_b2", 10)
    assert model.classifier[0].p == get_model_spec("efficientnet_b2").dropout == 0.3
    assert _drop_path_probs(model)[-1] == pytest.approx(0.2)
    assert all(
        p == 0.0 for p in _drop_path_probs(create_model("efficientnet_t0", 10, drop_path=0.0))
    )


def test_eval_is_deterministic_and_train_with_noise_is_not() -> None:
    torch.manual_seed(0)
    model = create_model("efficientnet_t0", 10, dropout=0.5, drop_path=0.5)
    images = torch.randn(8, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(images), model(images))
        model.train()
        assert not torch.allclose(model(images), model(images))


def test_freeze_shallow_freezes_stem_and_early_stages_only() -> None:
    model = create_model("efficientnet_t0", 10)
    n_frozen = freeze_shallow(model, fraction=0.5)
    # 7 MBConv stages: the stem and floor(0.5 * 7) = 3 stages are frozen.
    frozen = [p for m in model.features[:4] for p in m.parameters()]
    assert n_frozen == sum(p.numel() for p in frozen) > 0
    assert all(not p.requires_grad for p in frozen)
    trainable = [*model.features[4:].parameters(), *model.classifier.parameters()]
    assert all(p.requires_grad for p in trainable)
    assert n_frozen == sum(p.numel() for p in model.parameters() if not p.requires_grad)


@pytest.mark.parametrize(("fraction", "frozen_modules"), [(0.0, 1), (1.0, 8)])
def test_freeze_shallow_extremes_keep_the_head_trainable(
    fraction: float, frozen_modules: int
) -> None:
    model = create_model("efficientnet_t0", 10)
    freeze_shallow(model, fraction=fraction)
    assert all(not p.requires_grad for p in model.features[:frozen_modules].parameters())
    assert all(p.requires_grad for p in model.features[frozen_modules:].parameters())
    assert all(p.requires_grad for p in model.classifier.parameters())


def test_freeze_shallow_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="fraction"):
        freeze_shallow(create_model("efficientnet_t0", 10), fraction=1.5)
    with pytest.raises(ValueError, match="create_model"):
        freeze_shallow(nn.Linear(2, 2))


def test_frozen_batchnorm_statistics_survive_training_steps() -> None:
    torch.manual_seed(0)
    model = create_model("efficientnet_t0", 10)
    freeze_shallow(model)
    frozen_bn, deep_bn = model.features[0][1], model.features[-1][1]
    before_frozen, before_deep = frozen_bn.running_mean.clone(), deep_bn.running_mean.clone()
    model.train()  # the caller's usual call must not undo the freeze
    model(torch.randn(4, 3, 32, 32) * 3 + 1).sum().backward()
    assert not frozen_bn.training and deep_bn.training
    assert torch.equal(frozen_bn.running_mean, before_frozen)
    assert not torch.equal(deep_bn.running_mean, before_deep)
    assert model.features[0][0].weight.grad is None
    assert model.classifier[1].weight.grad is not None


def test_batchnorm_settings_reach_every_norm_layer() -> None:
    model = create_model("efficientnet_t0", 10, norm_eps=1e-3, norm_momentum=0.01)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(m.eps == 1e-3 and m.momentum == 0.01 for m in norms)
    plain = [m for m in create_model("efficientnet_t0", 10).modules()
             if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(m.eps == 1e-5 and m.momentum == 0.1 for m in plain)


@pytest.mark.slow
def test_same_padding_pads_strided_convs_as_tensorflow() -> None:
    import copy
    import pickle

    model = create_model("efficientnet_b0", 10, same_padding=True).eval()
    stem = model.features[0][0]
    assert stem.padding == (0, 0) and stem._forward_pre_hooks
    x = torch.zeros(1, 3, 8, 8)
    # TF SAME at stride 2, k 3 on 8 px: 1 px of padding in total, all of it after.
    padded = next(iter(stem._forward_pre_hooks.values()))(stem, (x,))[0]
    assert padded.shape[-2:] == (9, 9) and padded[..., -1, :].abs().sum() == 0
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        y = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            assert torch.equal(clone.eval()(y), model(y))


@pytest.mark.slow
def test_training_step_copies_no_activation_and_matches_in_place_silu() -> None:
    """create_model turns torchvision's in-place SiLUs out of place: under autograd an in-place
    SiLU copies its input first (its backward needs it). The gradients stay bit-identical to the
    in-place model's, so a seeded run keeps its numbers."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    ours = create_model("efficientnet_t1", 10, dropout=0.0, drop_path=0.0)
    torchvision_way = copy.deepcopy(ours)
    for m in torchvision_way.modules():
        if isinstance(m, nn.SiLU):
            m.inplace = True
    x = torch.randn(4, 3, 32, 32)
    y = torch.tensor([0, 1, 2, 3])
    clones = {}
    for name, model in (("ours", ours), ("in place", torchvision_way)):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            nn.functional.cross_entropy(model(x), y).backward()
        clones[name] = sum(e.count for e in prof.key_averages() if e.key == "aten::clone")
    assert clones["ours"] == 0 and clones["in place"] > 0
    for a, b in zip(ours.parameters(), torchvision_way.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad)

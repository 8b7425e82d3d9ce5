"""--init-from: torchvision's, timm's and our own weights load into our models with the same logits.

Every source model is built here with random weights (nothing is downloaded), saved, loaded through
the loader into our model, and both are run on the same batch.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

from models import create_model
from models.weights import InitPlan, WeightsError, inspect_init, load_init, read_state_dict


def _batch(res: int = 64, n: int = 4) -> torch.Tensor:
    return torch.randn(n, 3, res, res, generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def _randomise_norms(model: torch.nn.Module) -> None:
    """Fresh BatchNorms are the identity (mean 0, var 1), which would hide an eps mismatch: give
    them the statistics of a random batch (a cumulative average over one pass)."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    model.train()(_batch(64, 8) * 2)
    model.eval()


def _ours_from(path: Path, name: str, classes: int, style: str = "auto") -> tuple[torch.nn.Module,
                                                                                   InitPlan]:
    plan = inspect_init(path, name, classes, style=style)
    model = create_model(name, classes, **plan.options)
    load_init(model, plan)
    return model.eval(), plan


@torch.no_grad()
def _max_logit_error(a: torch.nn.Module, b: torch.nn.Module, res: int = 64) -> float:
    x = _batch(res)
    return float((a.eval()(x) - b.eval()(x)).abs().max())


def test_torchvision_b0_gives_the_same_logits(tmp_path: Path) -> None:
    import torchvision

    torch.manual_seed(0)
    src = torchvision.models.efficientnet_b0(num_classes=10)
    _randomise_norms(src)
    torch.save(src.state_dict(), tmp_path / "tv.pth")
    ours, plan = _ours_from(tmp_path / "tv.pth", "efficientnet_b0", 10)
    assert plan.style == "torchvision" and plan.options == {} and not plan.reinit_classifier
    assert _max_logit_error(src, ours) < 1e-5


@pytest.mark.slow
def test_torchvision_b5_keeps_its_batchnorm_settings(tmp_path: Path) -> None:
    import torchvision

    torch.manual_seed(0)
    src = torchvision.models.efficientnet_b5(num_classes=3)
    _randomise_norms(src)
    torch.save({"model": src.state_dict()}, tmp_path / "tv_b5.pt")  # a container
    ours, plan = _ours_from(tmp_path / "tv_b5.pt", "efficientnet_b5", 3)
    assert plan.options == {"norm_eps": 1e-3, "norm_momentum": 0.01}
    assert _max_logit_error(src, ours) < 1e-5
    plain = create_model("efficientnet_b5", 3)
    load_init(plain, plan)  # our default eps 1e-5: the weights' own settings matter
    assert _max_logit_error(src, plain) > 1e-3


def test_timm_efficientnet_b0_maps_key_by_key(tmp_path: Path) -> None:
    torch.manual_seed(0)
    src = timm.create_model("efficientnet_b0", pretrained=False, num_classes=10)
    _randomise_norms(src)
    # timm's train script saves {"state_dict": ..., "state_dict_ema": ...}; EMA weights win.
    ema = {k: v.clone() for k, v in src.state_dict().items()}
    torch.save({"state_dict": {k: v * 0 for k, v in ema.items()}, "state_dict_ema": ema},
               tmp_path / "timm.pth")
    ours, plan = _ours_from(tmp_path / "timm.pth", "efficientnet_b0", 10)
    assert plan.style == "timm"
    assert _max_logit_error(src, ours) < 1e-5


def test_tf_port_needs_same_padding_and_tf_batchnorm(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(0)
    src = timm.create_model("tf_efficientnet_b0", pretrained=False, num_classes=10)
    _randomise_norms(src)
    path = tmp_path / "tf_efficientnet_b0.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    ours, plan = _ours_from(path, "efficientnet_b0", 10)
    assert plan.style == "tf" and plan.options["same_padding"] is True
    for res in (64, 65):  # even and odd sizes pad differently
        assert _max_logit_error(src, ours, res) < 1e-5
    # The same weights with symmetric padding: what loading them naively would cost.
    naive, _ = _ours_from(path, "efficientnet_b0", 10, style="timm")
    assert _max_logit_error(src, naive) > 1e-3


def test_new_class_count_reinitialises_the_classifier_only(tmp_path: Path) -> None:
    torch.manual_seed(0)
    src = create_model("efficientnet_t0", 7)
    torch.save({"module." + k: v for k, v in src.state_dict().items()}, tmp_path / "ddp.pt")
    torch.manual_seed(5)
    ours, plan = _ours_from(tmp_path / "ddp.pt", "efficientnet_t0", 10)
    assert plan.reinit_classifier and plan.source_classes == 7
    assert plan.record()["classifier"] == "re-initialised"
    assert torch.equal(ours.features[3][0].block[0][0].weight, src.features[3][0].block[0][0].weight)
    assert ours.classifier[1].weight.shape == (10, src.classifier[1].weight.shape[1])


def test_our_model_file_and_its_options_round_trip(tmp_path: Path) -> None:
    from pipeline.checkpoint import save_model_file

    torch.manual_seed(0)
    src = create_model("efficientnet_t1", 10, norm_eps=1e-3, norm_momentum=0.01)
    save_model_file(tmp_path / "model.pt", src.state_dict(), model_name="efficientnet_t1",
                    classes=[str(i) for i in range(10)], train_resolution=32, test_resolution=32,
                    model_options={"norm_eps": 1e-3, "norm_momentum": 0.01})
    ours, plan = _ours_from(tmp_path / "model.pt", "efficientnet_t1", 10)
    assert plan.style == "ours" and plan.options == {"norm_eps": 1e-3, "norm_momentum": 0.01}
    assert _max_logit_error(src, ours, 32) == 0.0
    with pytest.raises(WeightsError, match="a model file of efficientnet_t1, not efficientnet_t2"):
        inspect_init(tmp_path / "model.pt", "efficientnet_t2", 10)


def test_other_architectures_and_sizes_are_refused_in_one_line(tmp_path: Path) -> None:
    import torchvision

    torch.save(create_model("efficientnet_b1", 10).state_dict(), tmp_path / "b1.pt")
    with pytest.raises(WeightsError, match=r"does not fit this model: unexpected features\.1\.1"
                                           r".*is it the same architecture and size"):
        inspect_init(tmp_path / "b1.pt", "efficientnet_b0", 10)  # B1 is deeper
    torch.save(create_model("efficientnet_b0", 10).state_dict(), tmp_path / "b0.pt")
    with pytest.raises(WeightsError, match=r"missing features\.1\.1"):
        inspect_init(tmp_path / "b0.pt", "efficientnet_b1", 10)
    torch.save(create_model("efficientnet_b2", 10).state_dict(), tmp_path / "b2.pt")
    with pytest.raises(WeightsError, match=r"shapes differ at features\.\d[.\w]* \(\d+"):
        inspect_init(tmp_path / "b2.pt", "efficientnet_b0", 10)
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "resnet.pt")
    with pytest.raises(WeightsError, match="not an EfficientNet state dict"):
        inspect_init(tmp_path / "resnet.pt", "efficientnet_b0", 10)


class _Evil:
    def __reduce__(self):  # would run code if this file were unpickled
        return (print, ("pwned",))


def test_files_are_never_unpickled(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.save({"state_dict": {"x": torch.zeros(1)}, "extra": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(WeightsError, match="without running code from it"):
        read_state_dict(tmp_path / "evil.pt")
    assert "pwned" not in capsys.readouterr().out
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(WeightsError, match="not a readable safetensors file"):
        read_state_dict(tmp_path / "junk.safetensors")
    with pytest.raises(WeightsError, match="no such file"):
        read_state_dict(tmp_path / "nope.pt")
    (tmp_path / "empty.pt").write_bytes(b"")  # an IndexError on the empty message once
    with pytest.raises(WeightsError, match=r"empty\.pt: the file is empty$"):
        read_state_dict(tmp_path / "empty.pt")
    (tmp_path / "notes.pt").write_text('{"weights": "elsewhere"}')  # not code: say what it is
    with pytest.raises(WeightsError, match=r"notes\.pt: not a PyTorch weights file "
                                           r"\(torch\.save\) or a \.safetensors file$"):
        read_state_dict(tmp_path / "notes.pt")
    # Cut short (a download or copy that stopped): damaged, not "holds code" as it said before
    (tmp_path / "short.pt").write_bytes(b"\x80")  # a reason without text: still one line
    with pytest.raises(WeightsError, match=r"short\.pt: damaged or incomplete weights file "
                                           r"\(index out of range\); copy or save it again$"):
        read_state_dict(tmp_path / "short.pt")
    torch.save({"x": torch.zeros(1000)}, tmp_path / "whole.pt")
    data = (tmp_path / "whole.pt").read_bytes()
    (tmp_path / "torn.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=r"torn\.pt: damaged or incomplete weights file "
                                           r"\(PytorchStreamReader failed reading zip archive"):
        read_state_dict(tmp_path / "torn.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(WeightsError, match="holds no state dict"):
        read_state_dict(tmp_path / "list.pt")
    # a whole pickled module: named in a few words (torch's text, cut at 120 characters,
    # ended mid-word in a paragraph of advice on loading it unsafely)
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")
    with pytest.raises(WeightsError, match=(
            r"module\.pt: cannot be read as a weights file without running code from it \(it "
            r"holds a pickled torch\.nn\.modules\.linear\.Linear, not only tensors\); save a "
            r"plain state_dict")):
        read_state_dict(tmp_path / "module.pt")


def test_a_changed_file_is_refused_at_load(tmp_path: Path) -> None:
    torch.save(create_model("efficientnet_t0", 10).state_dict(), tmp_path / "w.pt")
    plan = inspect_init(tmp_path / "w.pt", "efficientnet_t0", 10)
    torch.save(create_model("efficientnet_t0", 10).state_dict(), tmp_path / "w.pt")
    with pytest.raises(WeightsError, match="changed after the round checked it"):
        load_init(create_model("efficientnet_t0", 10), plan)


def test_a_link_keeps_its_name_and_a_hashed_blob_is_still_read(tmp_path: Path) -> None:
    """A hub cache: snapshots/<rev>/model.safetensors -> ../../blobs/<hash>, in a folder named
    models--timm--tf_efficientnet_b0. The link's own name and the folder say format and style."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    src = timm.create_model("tf_efficientnet_b0", num_classes=10)
    _randomise_norms(src)
    repo = tmp_path / "models--timm--tf_efficientnet_b0"
    (repo / "blobs").mkdir(parents=True)
    (repo / "snapshots" / "abc").mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, repo / "blobs" / "3f2a9c")
    link = repo / "snapshots" / "abc" / "model.safetensors"
    link.symlink_to(Path("..") / ".." / "blobs" / "3f2a9c")
    ours, plan = _ours_from(link, "efficientnet_b0", 10)
    assert plan.style == "tf" and plan.path == str(link)  # recorded as the user named it
    assert _max_logit_error(src, ours) < 1e-4
    # the blob itself (a hashed name, no suffix) is recognised as safetensors by its header
    assert inspect_init(repo / "blobs" / "3f2a9c", "efficientnet_b0", 10).sha256 == plan.sha256
    tf_named = tmp_path / "tf_efficientnet_b0.pth"
    torch.save(src.state_dict(), tmp_path / "77aa01")
    tf_named.symlink_to(tmp_path / "77aa01")
    assert inspect_init(tf_named, "efficientnet_b0", 10).style == "tf"


def test_a_reinitialised_classifier_does_not_hide_missing_layers(tmp_path: Path) -> None:
    """Loading is strict but for the classifier that is meant to start fresh: a file without a
    layer is refused by the plan, and load_init itself refuses it too (a file changed after the
    plan was made)."""
    state = create_model("efficientnet_t0", 7).state_dict()
    torch.save(state, tmp_path / "full.pt")
    plan = inspect_init(tmp_path / "full.pt", "efficientnet_t0", 10)
    assert plan.reinit_classifier and plan.source_classes == 7
    model = create_model("efficientnet_t0", 10)
    head = model.classifier[1].weight.clone()
    load_init(model, plan)
    assert torch.equal(model.classifier[1].weight, head)  # the fresh classifier stayed
    assert torch.equal(model.features[1][0].block[0][0].weight,
                       state["features.1.0.block.0.0.weight"])
    partial = {k: v for k, v in state.items() if not k.startswith("features.1.")}
    torch.save(partial, tmp_path / "partial.pt")
    with pytest.raises(WeightsError, match=r"missing features\.1\.0"):
        inspect_init(tmp_path / "partial.pt", "efficientnet_t0", 10)
    from pipeline.storage import sha256_file

    forged = InitPlan(path=str(tmp_path / "partial.pt"), sha256=sha256_file(tmp_path /
                      "partial.pt"), style="torchvision", reinit_classifier=True, source_classes=7)
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*features\.1\.0"):
        load_init(create_model("efficientnet_t0", 10), forged)


def test_ported_weights_without_batchnorm_counters_load(tmp_path: Path) -> None:
    src = create_model("efficientnet_t0", 10)
    state = {k: v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "port.pt")
    ours, _ = _ours_from(tmp_path / "port.pt", "efficientnet_t0", 10)
    assert _max_logit_error(src, ours, 32) == 0.0


def test_our_model_file_with_other_class_names_gets_a_fresh_classifier(tmp_path: Path) -> None:
    """Same count, other names (or order): its rows would score the wrong classes."""
    from pipeline.checkpoint import save_model_file

    src = create_model("efficientnet_t0", 3)
    save_model_file(tmp_path / "model.pt", src.state_dict(), model_name="efficientnet_t0",
                    classes=["cat", "dog", "fox"], train_resolution=32, test_resolution=32)
    same = inspect_init(tmp_path / "model.pt", "efficientnet_t0", 3, classes=["cat", "dog", "fox"])
    assert not same.reinit_classifier
    other = inspect_init(tmp_path / "model.pt", "efficientnet_t0", 3, classes=["dog", "cat", "fox"])
    assert other.reinit_classifier and other.source_classes == 3

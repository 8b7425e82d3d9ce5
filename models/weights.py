"""Start a model from a weights file: torchvision's, timm's or one of our own rounds'.

``--init-from PATH`` takes a local file (nothing is downloaded) in any of these layouts:

* torchvision's EfficientNet state dict (``features.*``, ``classifier.1.*``): our models are
  torchvision ``EfficientNet`` modules, so the keys are ours already;
* timm's ``efficientnet_b*`` and ``tf_efficientnet_*`` (``conv_stem``, ``blocks.<s>.<i>.*``,
  ``conv_head``, ``classifier``), mapped key by key by each block's own layer names (an
  expansion-1 block has ``conv_dw`` -> ``conv_pw``; the others ``conv_pw`` -> ``conv_dw`` ->
  ``conv_pwl``), never by position;
* our own ``model.pt`` (the file a round hands on).

Files are read without unpickling code: ``torch.load(weights_only=True)`` for ``.pt``/``.pth``,
``safetensors`` for ``.safetensors``. The usual containers are unwrapped (``state_dict``,
``model``, ``state_dict_ema``, ``model_ema``; ``module.`` and ``_orig_mod.`` prefixes).

Weights expect the layer settings they were trained with, which a state dict does not record
(docs/recipe.md): BatchNorm epsilon (PyTorch's 1e-5 for torchvision B0-B4 and timm's
``efficientnet_*``; 1e-3 for torchvision B5-B7 and every TF port) and, for TF ports, TF's "SAME"
padding, which pads stride-2 convolutions asymmetrically. :func:`inspect_init` works them out
(``style`` "auto": from the layout, the model size and a ``tf_`` in the file's name as given, not
as a link resolves, or in a hub cache's ``models--timm--tf_...`` folder) and returns
them as model options, which the round's model file records so that later rounds rebuild the
same network.
"""

from __future__ import annotations

import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import UserError

STYLES = ("auto", "torchvision", "timm", "tf", "ours")
CONTAINERS = ("state_dict_ema", "model_ema", "state_dict", "model")  # EMA weights first
PREFIXES = ("module.", "_orig_mod.")
TF_BN = {"norm_eps": 1e-3, "norm_momentum": 0.01}  # TF's 0.99 decay in PyTorch's convention
_TORCHVISION_TF_BN = ("efficientnet_b5", "efficientnet_b6", "efficientnet_b7")


class WeightsError(UserError, ValueError):
    """A weights file cannot start this model; the message names the file and the first problem."""


@dataclass(frozen=True)
class InitPlan:
    """What starting from ``path`` means for the model: checked before any training starts."""

    path: str
    sha256: str
    style: str
    options: dict[str, Any] = field(default_factory=dict)  # create_model keyword arguments
    reinit_classifier: bool = False
    source_classes: int = 0

    def record(self) -> dict[str, Any]:
        """The manifest's ``init`` entry: where the lineage starts."""
        return {"file": Path(self.path).name, "path": self.path, "sha256": self.sha256,
                "style": self.style, "options": self.options,
                "classifier": "re-initialised" if self.reinit_classifier else "loaded",
                "source_classes": self.source_classes}


# ----------------------------------------------------------------------------- reading


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict with containers and prefixes removed, our model file's payload or {})."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"--init-from {path}: no such file")
    if path.stat().st_size == 0:
        raise WeightsError(f"--init-from {path}: the file is empty")
    if path.suffix == ".safetensors" or _looks_like_safetensors(path):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            raw: Any = load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise WeightsError(f"--init-from {path}: not a readable safetensors file "
                               f"({(str(e).splitlines() or [type(e).__name__])[0]})") from None
    else:
        with path.open("rb") as f:
            head = f.read(2)
        # torch.save writes a zip (PK) or, in its legacy format, a pickle (protocol byte 0x80)
        if head != b"PK" and head[:1] != b"\x80":
            raise WeightsError(f"--init-from {path}: not a PyTorch weights file (torch.save) or "
                               "a .safetensors file")
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:  # weights_only refuses pickled code: never run it
            raise WeightsError(
                f"--init-from {path}: cannot be read as a weights file without running code from "
                f"it ({_refusal(e)}); save a plain state_dict (torch.save(model.state_dict(), "
                "...)) or a .safetensors file") from None
        except Exception as e:  # a torn zip, a file cut short: not a question of trusting it
            raise WeightsError(
                f"--init-from {path}: damaged or incomplete weights file ({_refusal(e)}); copy "
                "or save it again") from None
    payload: dict[str, Any] = {}
    if isinstance(raw, dict) and raw.get("format") is not None and "model_name" in raw:
        payload = {k: v for k, v in raw.items() if k != "state_dict"}  # one of our model files
        raw = raw["state_dict"]
    for name in CONTAINERS:
        if isinstance(raw, dict) and isinstance(raw.get(name), dict):
            raw = raw[name]
            break
    if not isinstance(raw, dict) or not raw or not all(
            isinstance(v, torch.Tensor) for v in raw.values()):
        raise WeightsError(f"--init-from {path}: holds no state dict of tensors (looked in "
                           f"{', '.join(CONTAINERS)} and at the top level)")
    return {_strip(k): v for k, v in raw.items()}, payload


def _looks_like_safetensors(path: Path) -> bool:
    """A safetensors file under another name (a hub cache names its blobs by hash): 8 bytes of
    header length, then the JSON header. torch.save's files are zip archives ("PK")."""
    with path.open("rb") as f:
        head = f.read(9)
    return len(head) == 9 and not head.startswith(b"PK") and head[8:9] == b"{"


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


# ----------------------------------------------------------------------------- layouts


def layout_of(state: dict[str, torch.Tensor]) -> str:
    if "conv_stem.weight" in state:
        return "timm"
    if "features.0.0.weight" in state:
        return "torchvision"
    sample = ", ".join(sorted(state)[:3])
    raise WeightsError(f"not an EfficientNet state dict of torchvision's (features.*) or timm's "
                       f"(conv_stem, blocks.*) layout (first keys: {sample})")


_TIMM_DS = {"conv_dw": "block.0.0", "bn1": "block.0.1", "se.conv_reduce": "block.1.fc1",
            "se.conv_expand": "block.1.fc2", "conv_pw": "block.2.0", "bn2": "block.2.1"}
_TIMM_IR = {"conv_pw": "block.0.0", "bn1": "block.0.1", "conv_dw": "block.1.0",
            "bn2": "block.1.1", "se.conv_reduce": "block.2.fc1", "se.conv_expand": "block.2.fc2",
            "conv_pwl": "block.3.0", "bn3": "block.3.1"}
_BLOCK = re.compile(r"blocks\.(\d+)\.(\d+)\.(.+)\.(weight|bias|running_mean|running_var|"
                    r"num_batches_tracked)$")


def timm_to_torchvision(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm EfficientNet keys -> torchvision's, by layer name (see the module docstring)."""
    stages = 1 + max((int(m.group(1)) for k in state if (m := _BLOCK.match(k))), default=-1)
    inverted = {(m.group(1), m.group(2)) for k in state
                if (m := _BLOCK.match(k)) and m.group(3) == "conv_pwl"}
    top = {"conv_stem": "features.0.0", "bn1": "features.0.1",
           "conv_head": f"features.{stages + 1}.0", "bn2": f"features.{stages + 1}.1",
           "classifier": "classifier.1"}
    out = {}
    for key, value in state.items():
        m = _BLOCK.match(key)
        if m:
            stage, index, layer, param = m.groups()
            table = _TIMM_IR if (stage, index) in inverted else _TIMM_DS
            if layer not in table:
                raise WeightsError(f"timm key {key!r} has no counterpart in this EfficientNet "
                                   "(another block type?)")
            out[f"features.{int(stage) + 1}.{index}.{table[layer]}.{param}"] = value
            continue
        layer, _, param = key.rpartition(".")
        if layer not in top:
            raise WeightsError(f"timm key {key!r} has no counterpart in this EfficientNet")
        out[f"{top[layer]}.{param}"] = value
    return out


# ----------------------------------------------------------------------------- planning


def _style(style: str, layout: str, payload: dict[str, Any], path: Path, model_name: str) -> str:
    if style not in STYLES:
        raise WeightsError(f"--init-style {style!r} is unknown; use one of {', '.join(STYLES)}")
    if style != "auto":
        return style
    if payload:
        return "ours"
    if layout == "timm":
        # the file's own name, or the model folder of a hub cache (models--timm--tf_...)
        names = [path.name.lower(), *(p.lower() for p in path.parts if p.startswith("models--"))]
        return "tf" if any("tf_" in n for n in names) else "timm"
    return "torchvision"


def _options(style: str, payload: dict[str, Any], model_name: str) -> dict[str, Any]:
    if style == "ours":
        return dict(payload.get("model_options") or {})
    if style == "tf":
        return {**TF_BN, "same_padding": True}
    if style == "torchvision" and model_name in _TORCHVISION_TF_BN:
        return dict(TF_BN)  # torchvision builds B5-B7 with TF's BatchNorm settings
    return {}


def inspect_init(path: str | Path, model_name: str, num_classes: int, *,
                 style: str = "auto", classes: list[str] | None = None) -> InitPlan:
    """Check that ``path`` can start ``model_name`` with ``num_classes`` classes; one line on the
    first problem. A different class count re-initialises the classifier (said in the plan), and
    so do other class names (``classes``) in one of our model files, which records them.

    The path is made absolute, not resolved: a link's own name (``x.safetensors``,
    ``tf_efficientnet_b0.pth``) is what says its format and style."""
    from models import create_model
    from pipeline.storage import sha256_file

    path = Path(path).absolute()
    state, payload = read_state_dict(path)
    layout = "torchvision" if payload else _layout(state, path)
    style = _style(style, layout, payload, path, model_name)
    if payload and payload.get("model_name") != model_name:
        raise WeightsError(f"--init-from {path}: a model file of {payload.get('model_name')}, "
                           f"not {model_name}; pass --model {payload.get('model_name')}")
    mapped = timm_to_torchvision(state) if layout == "timm" else state
    options = _options(style, payload, model_name)
    with torch.device("meta"):
        target = create_model(model_name, num_classes, **options).state_dict()
    source = _classes(mapped)
    named = payload.get("classes") if payload else None
    reinit = source != num_classes or (classes is not None and named is not None
                                       and list(named) != list(classes))
    _check_shapes(path, mapped, target, skip_classifier=reinit)
    return InitPlan(path=str(path), sha256=sha256_file(path), style=style, options=options,
                    reinit_classifier=reinit, source_classes=source)


def _layout(state: dict[str, torch.Tensor], path: Path) -> str:
    try:
        return layout_of(state)
    except WeightsError as e:
        raise WeightsError(f"--init-from {path}: {e}") from None


def _classes(state: dict[str, torch.Tensor]) -> int:
    w = state.get("classifier.1.weight")
    return int(w.shape[0]) if w is not None else 0


def _check_shapes(path: Path, source: dict[str, torch.Tensor], target: dict[str, torch.Tensor],
                  *, skip_classifier: bool) -> None:
    wanted = {k: v for k, v in target.items()
              if not (skip_classifier and k.startswith("classifier."))}
    # BatchNorm's step counter is bookkeeping that ports often drop; load_init fills it in
    missing = [k for k in wanted if k not in source and not k.endswith(".num_batches_tracked")]
    unexpected = [k for k in source if k not in target]
    wrong = [f"{k} {tuple(source[k].shape)} vs {tuple(v.shape)}" for k, v in wanted.items()
             if k in source and tuple(source[k].shape) != tuple(v.shape)]
    if wrong or missing or unexpected:
        parts = []
        if wrong:
            parts.append(f"shapes differ at {', '.join(wrong[:2])} (file vs model)")
        if missing:
            parts.append(f"missing {', '.join(missing[:2])}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:2])}")
        raise WeightsError(f"--init-from {path} does not fit this model: {'; '.join(parts)} "
                           f"({len(wrong)} shape, {len(missing)} missing, {len(unexpected)} "
                           "unexpected keys); is it the same architecture and size (--model)?")


# ----------------------------------------------------------------------------- loading


def load_init(model: torch.nn.Module, plan: InitPlan) -> None:
    """Copy the planned weights into ``model`` (built with ``plan.options``); the file must be the
    one that was planned (sha256)."""
    from pipeline.storage import sha256_file

    if sha256_file(plan.path) != plan.sha256:
        raise WeightsError(f"--init-from {plan.path} changed after the round checked it (sha256 "
                           "mismatch); restore it or start the round again")
    state, payload = read_state_dict(plan.path)
    if not payload and layout_of(state) == "timm":
        state = timm_to_torchvision(state)
    own = model.state_dict()
    if plan.reinit_classifier:  # the model's own fresh classifier stays
        state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
        state.update({k: v for k, v in own.items() if k.startswith("classifier.")})
    state.update({k: v for k, v in own.items()
                  if k.endswith(".num_batches_tracked") and k not in state})
    model.load_state_dict(state, strict=True)  # every other layer comes from the file


def _refusal(e: Exception) -> str:
    """What torch.load(weights_only=True) refused, in a few words: the class a whole pickled
    module would need (its message runs to a paragraph of advice on unsafe loading)."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if found:
        return f"it holds a pickled {found.group(1)}, not only tensors"
    first = (text.strip().splitlines() or [type(e).__name__])[0]
    return first if len(first) <= 120 else first[:117].rsplit(" ", 1)[0] + " ..."

"""CPU training steps of the tiny family: our depthwise layers against PyTorch's ``nn.Conv2d``.

    python bench/depthwise.py                    # about 2 minutes on 2 CPU cores
    python bench/depthwise.py --steps 2 --rounds 1 --json bench/latest.json

What changes between the two: only the depthwise convolutions' weight gradient on maps no larger
than the kernel (``models/depthwise.py``); the models are built once, and the baseline gets a
copy whose ``DepthwiseConv2d`` layers are turned back into ``nn.Conv2d`` with the same weights.
A step is what a training worker does on a CPU: forward, cross-entropy, backward, AdamW, on a
channels_last batch of 128 images at 32 px (the demo's 32 labeled + 96 pseudo-labeled), one
torch thread (the demo's ``cpus_per_worker``). Timed in CPU seconds of this thread
(``time.thread_time``: another process on the machine moves it little), interleaved rounds
(which goes first alternates), median. ``depthwise_train_step_<model>`` in latest.json is ours
over PyTorch's, images per CPU-second; the report also times each depthwise layer's weight
gradient alone (``torch.ops.aten.convolution_backward`` against our matmul) for the shapes of
``efficientnet_t1``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from models import create_model  # noqa: E402
from models.depthwise import DepthwiseConv2d, uses_matmul_grad  # noqa: E402

MODELS = ("efficientnet_t0", "efficientnet_t1", "efficientnet_t2")
BATCH, RESOLUTION = 128, 32


def with_pytorch_depthwise(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose depthwise layers are plain ``nn.Conv2d`` (same weights)."""
    model = copy.deepcopy(model)
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, DepthwiseConv2d):
                conv = nn.Conv2d(child.in_channels, child.out_channels, child.kernel_size,
                                 child.stride, child.padding, child.dilation, child.groups,
                                 child.bias is not None, child.padding_mode)
                conv.weight, conv.bias = child.weight, child.bias
                setattr(parent, name, conv)
    return model


class Steps:
    """A model, its optimizer and one fixed batch; ``rate`` times whole steps."""

    def __init__(self, model: nn.Module, seed: int) -> None:
        self.model = model.to(memory_format=torch.channels_last).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(BATCH, 3, RESOLUTION, RESOLUTION, generator=g).contiguous(
            memory_format=torch.channels_last)
        self.y = torch.randint(0, 10, (BATCH,), generator=g)
        self.step()  # warm-up: the first call plans the kernels

    def step(self) -> None:
        loss = F.cross_entropy(self.model(self.x), self.y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def rate(self, steps: int) -> float:
        t0 = time.thread_time()
        for _ in range(steps):
            self.step()
        return steps * BATCH / (time.thread_time() - t0)


def layer_report(repeat: int) -> list[str]:
    """Each depthwise layer of efficientnet_t1 at 32 px: weight-gradient ms, PyTorch / ours."""
    model = create_model("efficientnet_t1", 10)
    shapes: list[tuple[DepthwiseConv2d, tuple[int, ...]]] = []
    hooks = [m.register_forward_pre_hook(lambda m, a: shapes.append((m, tuple(a[0].shape))))
             for m in model.modules() if isinstance(m, DepthwiseConv2d)]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, RESOLUTION, RESOLUTION))
    for h in hooks:
        h.remove()
    lines = []
    for conv, shape in shapes:
        x = torch.randn(BATCH, *shape[1:]).contiguous(memory_format=torch.channels_last)
        x.requires_grad_()
        if not uses_matmul_grad(x, conv):
            continue
        out = conv(x)
        g = torch.randn_like(out)

        def ours(out: torch.Tensor = out, g: torch.Tensor = g, conv: nn.Conv2d = conv) -> None:
            torch.autograd.grad(out, conv.weight, g, retain_graph=True)

        def pytorch(x: torch.Tensor = x, g: torch.Tensor = g, conv: nn.Conv2d = conv) -> None:
            torch.ops.aten.convolution_backward(
                g, x, conv.weight, None, list(conv.stride), list(conv.padding), [1, 1], False,
                [0, 0], conv.groups, [False, True, False])

        times = {}
        for name, fn in (("pytorch", pytorch), ("ours", ours)):
            fn()
            t0 = time.thread_time()
            for _ in range(repeat):
                fn()
            times[name] = (time.thread_time() - t0) / repeat * 1000
        lines.append(f"  {conv.in_channels:4d} channels, {conv.kernel_size[0]}x"
                     f"{conv.kernel_size[1]} kernel, {shape[2]}x{shape[3]} map: PyTorch "
                     f"{times['pytorch']:6.2f} ms, ours {times['ours']:5.2f} ms "
                     f"({times['pytorch'] / times['ours']:.1f}x)")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=8, help="steps per timing (default 8)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    p.add_argument("--json", type=Path, default=None,
                   help="merge the figures into this file (make bench: bench/latest.json)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    print(f"CPU training steps, batch {BATCH} at {RESOLUTION} px, channels_last, AdamW, 1 thread;"
          f" {args.rounds} interleaved rounds of {args.steps} steps, images per CPU-second")
    figures = {}
    for name in MODELS:
        torch.manual_seed(0)
        model = create_model(name, 10)
        loops = {"ours": Steps(model, 1), "pytorch": Steps(with_pytorch_depthwise(model), 1)}
        rates: dict[str, list[float]] = {"ours": [], "pytorch": []}
        for r in range(args.rounds):
            for which in (("ours", "pytorch") if r % 2 == 0 else ("pytorch", "ours")):
                rates[which].append(loops[which].rate(args.steps))
        ours, base = statistics.median(rates["ours"]), statistics.median(rates["pytorch"])
        figures[f"depthwise_train_step_{name.removeprefix('efficientnet_')}"] = ours / base
        print(f"  {name}: ours {ours:6.1f} images/s, PyTorch's depthwise {base:6.1f} images/s, "
              f"ratio {ours / base:.2f}")
    print("weight gradient alone, the depthwise layers of efficientnet_t1 that take our path "
          f"(batch {BATCH}, ms per call):")
    for line in layer_report(max(2, args.steps)):
        print(line)
    if args.json is not None:
        from bench.results import merge

        merge(figures, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

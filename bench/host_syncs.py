"""How many times the training loop reads a tensor's value back to the host, per step and per epoch.

    python bench/host_syncs.py            # a few seconds; teacher and student steps on the CPU

On a GPU every such read (``.item()``, ``int()``, ``float()``, ``.tolist()``, ``.cpu()``,
``.numpy()``, ``bool()``) waits for all queued kernels, so the host stops feeding the GPU until
the step is done. There is no way to see those waits on a CPU, so this counts the calls instead:
:func:`count_host_reads` patches the reading methods of ``torch.Tensor`` and counts every call
made while the loop runs (the data pipeline excluded: it builds batches on the host, where a read
is free), except the optimizers' step counters, which torch keeps on the host whatever the
device (reading them never waits for a GPU). :func:`pipeline.train.train_epoch` runs over synthetic batches for two epoch lengths;
the difference gives the reads per step, the rest the reads per epoch. The script uses only
``train_epoch``'s signature, so it measures older versions of the loop too (run it from their
checkout). On a GPU, ``bench/gpu_check.py`` checks the same with ``torch.cuda.set_sync_debug_mode``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

# The Tensor methods that copy a value to the host (a wait for the GPU when the tensor is on one).
READS = ("item", "tolist", "cpu", "numpy", "__int__", "__float__", "__bool__", "__index__")


@dataclasses.dataclass
class ReadCounter:
    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    paused: bool = False
    # Tensors whose reads are not counted: host-resident ones (see host_scalars).
    ignore: Callable[[torch.Tensor], bool] = lambda t: False

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def pause(self, it: Iterator[Any]) -> Iterator[Any]:
        """``it`` with counting off while it produces each item (the data pipeline's reads)."""
        while True:
            self.paused = True
            try:
                item = next(it)
            except StopIteration:
                return
            finally:
                self.paused = False
            yield item


@contextlib.contextmanager
def count_host_reads(ignore: Callable[[torch.Tensor], bool] | None = None
                     ) -> Iterator[ReadCounter]:
    """Count calls of :data:`READS` on any tensor but those ``ignore`` accepts while inside
    (the methods are restored on exit)."""
    counter = ReadCounter()
    if ignore is not None:
        counter.ignore = ignore
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def wrap(name: str, fn: Any) -> Any:
        def counted(self: torch.Tensor, *a: Any, **kw: Any) -> Any:
            if not counter.paused and not counter.ignore(self):
                counter.counts[name] = counter.counts.get(name, 0) + 1
            return fn(self, *a, **kw)
        return counted

    for name, fn in originals.items():
        setattr(torch.Tensor, name, wrap(name, fn))
    try:
        yield counter
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


def synthetic_batches(steps: int, batch: int, pseudo: int, classes: int,
                      resolution: int = 32) -> list[tuple[Any, Any]]:
    """``steps`` (labeled, pseudo-labeled or None) pairs of random tensors, made up front."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(steps):
        labeled = (torch.randn(batch, 3, resolution, resolution, generator=g),
                   torch.randint(0, classes, (batch,), generator=g))
        unl = None
        if pseudo:
            unl = (torch.randn(pseudo, 3, resolution, resolution, generator=g),
                   torch.softmax(torch.randn(pseudo, classes, generator=g), dim=1))
        out.append((labeled, unl))
    return out


def tiny_job(student: bool, batch: int = 8) -> Any:
    """A teacher or student job of the demo preset with ``efficientnet_t0`` at 32 px (no files:
    the batches are synthetic)."""
    from pipeline.config import PRESETS, StudentConfig, TrainConfig
    from pipeline.train import Job

    cfg: TrainConfig = dataclasses.replace(TrainConfig(**PRESETS["teacher"]["demo"]), run="h",
                                           data="x", batch_size=batch, ema_decay=0.99)
    if student:
        cfg = StudentConfig(**{**dataclasses.asdict(cfg), "unlabel_ratio": 2.0,
                               "pseudo_loss_weight": None})
    empty = {"shards": [], "count": 8 * batch}
    return Job(config=cfg, role="student" if student else "teacher",
               classes=[str(i) for i in range(10)], labeled=empty, test=empty,
               model={"name": cfg.model, "train_resolution": 32, "test_resolution": 32,
                      "dropout": 0.2, "drop_path": 0.2}, predictions_dir="unused",
               pseudo={"shards": [], "dir": "unused", "count": 16 * batch} if student else None)


def host_scalars(optimizer: torch.optim.Optimizer) -> Callable[[torch.Tensor], bool]:
    """Whether a tensor is one of ``optimizer``'s step counters (CPU tensors on every device
    unless the optimizer is capturable or fused; torch reads them with .item() every step)."""
    def ignore(t: torch.Tensor) -> bool:
        return t.device.type == "cpu" and t.ndim == 0 and any(
            t is s.get("step") for s in optimizer.state.values())
    return ignore


def reads_per_epoch(student: bool, steps: int, batch: int = 8) -> int:
    """Host reads of one ``train_epoch`` of ``steps`` steps (model built outside the count)."""
    from pipeline.train import WorkerContext, build_learner, train_epoch

    job = tiny_job(student, batch)
    ctx = WorkerContext()
    learner = build_learner(job, ctx)
    pseudo = 2 * batch if student else 0
    batches = synthetic_batches(steps, batch, pseudo, job.num_classes)
    with count_host_reads(host_scalars(learner.optimizer)) as counter:
        train_epoch(learner, learner.model, counter.pause(iter(batches)), cfg=job.config,
                    ctx=ctx, epoch=0, steps=steps, base_lr=1e-3)
    return counter.total


def measure(short: int = 2, long: int = 5) -> dict[str, float]:
    """Reads per step and per epoch (fixed part) of teacher and student epochs."""
    torch.set_num_threads(1)
    out = {}
    for role, student in (("teacher", False), ("student", True)):
        a, b = reads_per_epoch(student, short), reads_per_epoch(student, long)
        per_step = (b - a) / (long - short)
        out[f"{role}_reads_per_step"] = per_step
        out[f"{role}_reads_per_epoch_fixed"] = a - per_step * short
    return out


def main() -> int:
    m = measure()
    for role in ("teacher", "student"):
        print(f"{role}: {m[f'{role}_reads_per_step']:g} host reads per step, "
              f"{m[f'{role}_reads_per_epoch_fixed']:g} per epoch besides")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The workers' torch process group: set up as DDP needs it, by a controller that never imports
torch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_module_does_not_import_torch() -> None:
    """The point of the module: Ray Train's controller unpickles the config, and so imports this
    module, and whatever it imports."""
    code = ("import sys; import pipeline.process_group as m; c = m.TorchProcessGroup(); "
            "c.backend_cls; c.train_func_context; c.framework; c.to_dict(); "
            "print(sorted(k for k in sys.modules if k == 'torch' or k.startswith('torch.')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "[]"


def _probe(config: dict) -> None:
    """The training function: what a worker sees, and whether its controller mapped torch."""
    import ray.train
    import torch
    import torch.distributed as dist

    from bench.fit_startup import controllers_with_torch

    total = None
    if dist.is_initialized():
        t = torch.tensor([float(dist.get_rank() + 1)])
        dist.all_reduce(t)
        total = t.item()
    ctx = ray.train.get_context()
    with open(Path(config["out"]) / f"rank{ctx.get_world_rank()}", "w") as f:
        f.write(repr({
            "env": {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE",
                                                  "LOCAL_WORLD_SIZE", "NODE_RANK")},
            "master": bool(os.environ.get("MASTER_ADDR")) and bool(os.environ.get("MASTER_PORT")),
            "initialized": dist.is_initialized(),
            "backend": dist.get_backend() if dist.is_initialized() else None,
            "sum": total, "controllers": controllers_with_torch(),
        }))


def _fit(tmp_path: Path, workers: int) -> list[dict]:
    import ast

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.process_group import TorchProcessGroup

    out = tmp_path / f"out{workers}"
    out.mkdir()
    TorchTrainer(_probe, train_loop_config={"out": str(out)}, torch_config=TorchProcessGroup(),
                 scaling_config=ScalingConfig(num_workers=workers,
                                              resources_per_worker={"CPU": 1}),
                 run_config=RunConfig(name=f"pg{workers}", storage_path=str(tmp_path))).fit()
    return [ast.literal_eval((out / f"rank{r}").read_text()) for r in range(workers)]


@pytest.mark.slow
def test_two_workers_get_a_gloo_group_and_the_controller_no_torch(ray_address: str,
                                                                 tmp_path: Path) -> None:
    ranks = _fit(tmp_path, 2)
    for r, seen in enumerate(ranks):
        assert seen["env"] == {"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                               "LOCAL_WORLD_SIZE": "2", "NODE_RANK": "0"}, seen
        assert seen["master"] and seen["initialized"] and seen["backend"] == "gloo", seen
        assert seen["sum"] == 3.0, seen  # 1 + 2: the ranks talk to each other
    assert ranks[0]["controllers"] == [False], ranks[0]  # found, and without torch's libraries

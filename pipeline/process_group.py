"""The torch process group of Ray Train's workers, set up from a module that does not import torch.

Ray Train's own ``TorchConfig`` lives in a module that imports torch at the top, and Ray Train
hands the config to its controller actor, a process of its own on the driver's node: so every
fit made the controller import torch (seconds of CPU on the fit's critical path, and torch's
libraries mapped into a process that never runs a tensor op). This config does what ours needs
of ``TorchConfig`` through torch's public API and Ray Train's backend interface
(``ray.train.backend``, a developer API); torch is imported only in the workers, inside the
functions the controller asks them to run:

* the rendezvous address (rank 0's node and a free port there) and the variables torchrun sets
  (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``NODE_RANK``, ``MASTER_*``);
* ``init_process_group`` with NCCL when the workers have GPUs, gloo otherwise (NCCL with
  asynchronous error handling, so that a stuck collective fails instead of hanging), only when
  there are several workers: one process has no one to talk to, and our code calls no
  collective then (:class:`pipeline.train.WorkerContext`);
* each worker's default CUDA device set to its own before the training function runs;
* the group destroyed and CUDA's cache emptied when the run ends.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from ray.train.backend import Backend, BackendConfig


@dataclass
class TorchProcessGroup(BackendConfig):
    """Ray Train backend config for torch DDP; pass it as ``TorchTrainer(torch_config=...)``.

    ``backend``: a ``torch.distributed`` backend; None lets TorchTrainer choose (NCCL when the
    workers have GPUs, else gloo), as it does for its own config.
    """

    backend: str | None = None
    timeout_s: int = 1800

    @property
    def backend_cls(self) -> type[Backend]:
        return _Backend

    @property
    def train_func_context(self) -> Any:
        return _own_cuda_device

    @property
    def framework(self) -> Any:
        """What Ray's state export records (the base class says None); a private enum of Ray's,
        hence the fallback."""
        try:
            from ray.train.v2._internal.util import TrainingFramework
        except ImportError:
            return None
        return TrainingFramework.TORCH

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "timeout_s": self.timeout_s}


class _Backend(Backend):
    # Every worker sees all the GPUs of its node (as with TorchConfig): NCCL needs to see its
    # peers' devices; each worker still uses only its own (_own_cuda_device).
    share_cuda_visible_devices = True

    def on_start(self, worker_group: Any, backend_config: TorchProcessGroup) -> None:
        import ray

        world = len(worker_group)
        addr, port = worker_group.execute_single(0, _free_address)
        worker_group.execute(_set_env, addr=addr, port=port)
        if world > 1:
            ray.get([worker_group.execute_single_async(
                rank, _init_process_group, backend=backend_config.backend or "gloo",
                world_rank=rank, world_size=world, timeout_s=backend_config.timeout_s)
                for rank in range(world)])

    def on_shutdown(self, worker_group: Any, backend_config: TorchProcessGroup) -> None:
        import ray
        from ray.exceptions import GetTimeoutError

        # A stuck NCCL teardown must not keep the run from ending: the processes go anyway.
        with contextlib.suppress(GetTimeoutError):
            ray.get(worker_group.execute_async(_shutdown), timeout=30)


# ------------------------------------------------------------- run in the workers by the controller


def _free_address() -> tuple[str, int]:
    import socket

    import ray

    addr = ray.util.get_node_ip_address()
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return addr, s.getsockname()[1]


def _set_env(addr: str, port: int) -> None:
    import ray.train

    ctx = ray.train.get_context()
    os.environ.update({
        "MASTER_ADDR": addr, "MASTER_PORT": str(port),
        "RANK": str(ctx.get_world_rank()), "WORLD_SIZE": str(ctx.get_world_size()),
        "LOCAL_RANK": str(ctx.get_local_rank()),
        "LOCAL_WORLD_SIZE": str(ctx.get_local_world_size()),
        "NODE_RANK": str(ctx.get_node_rank()),
    })


def _init_process_group(backend: str, world_rank: int, world_size: int, timeout_s: int) -> None:
    import torch.distributed as dist

    if "nccl" in backend and "TORCH_NCCL_BLOCKING_WAIT" not in os.environ:
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    dist.init_process_group(backend=backend, init_method="env://", rank=world_rank,
                            world_size=world_size, timeout=timedelta(seconds=timeout_s))


def _shutdown() -> None:
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def _own_cuda_device() -> Iterator[None]:
    import torch

    if torch.cuda.is_available():
        import ray.train.torch

        device = ray.train.torch.get_device()
        if device.type == "cuda":
            torch.cuda.set_device(device)
    yield

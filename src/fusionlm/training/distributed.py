"""Process groups and FSDP2 sharding; every function is a no-op for a single process.

``torchrun`` sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; we then join a process group (NCCL
on GPUs, gloo on CPU), build a 1-D device mesh and shard each decoder layer, then the root,
with ``fully_shard``. The training loop is the same code either way.
"""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from fusionlm.errors import InvalidInputError


@dataclasses.dataclass(frozen=True)
class DistributedEnv:
    """Where this process stands: ``rank`` of ``world_size``, on ``device``."""

    rank: int
    world_size: int
    device: torch.device
    mesh: DeviceMesh | None
    owns_group: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistributedEnv:
    """Join the ``torchrun`` process group if there is one; pick this process's device.

    Raises:
        ValueError: ``device="cuda"`` without CUDA.
    """
    cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise InvalidInputError("device=cuda, but CUDA is not available")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    if world_size == 1:
        return DistributedEnv(rank=0, world_size=1, device=dev, mesh=None, owns_group=False)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if cuda else "gloo")
    mesh = init_device_mesh(dev.type, (dist.get_world_size(),))
    return DistributedEnv(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        device=dev,
        mesh=mesh,
        owns_group=owns,
    )


def shutdown(env: DistributedEnv) -> None:
    """Leave the process group if ``init_distributed`` created it."""
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def shard_model(model: nn.Module, env: DistributedEnv) -> nn.Module:
    """Shard ``model`` with FSDP2: each of ``model.layers`` on its own, then the rest.

    Each layer's parameters are all-gathered just before it runs and freed after, so a process
    holds one layer in full at a time plus its ``1 / world_size`` share of everything.
    """
    if env.mesh is None:
        return model
    from torch.distributed.fsdp import fully_shard

    for layer in model.layers:
        fully_shard(layer, mesh=env.mesh)
    fully_shard(model, mesh=env.mesh)
    return model


def all_reduce_sum(value: Tensor, env: DistributedEnv) -> Tensor:
    """``value`` summed over processes (a new tensor on ``value``'s device)."""
    value = value.detach().clone()
    if env.world_size > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def gather_to_main(value: Tensor, env: DistributedEnv) -> list[Tensor]:
    """Every process's copy of an equally shaped tensor, in rank order (for RNG states)."""
    if env.world_size == 1:
        return [value]
    on_device = value.to(env.device)
    out = [torch.empty_like(on_device) for _ in range(env.world_size)]
    dist.all_gather(out, on_device)
    return [t.cpu() for t in out]


def barrier(env: DistributedEnv) -> None:
    if env.world_size > 1:
        dist.barrier()


__all__ = [
    "DistributedEnv",
    "all_reduce_sum",
    "barrier",
    "gather_to_main",
    "init_distributed",
    "shard_model",
    "shutdown",
]

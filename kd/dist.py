"""Process-group setup from the environment; everything else asks here for rank, world, device.

Reads only environment variables set by the launcher (torchrun / torch elastic). A process
started without them is a world of one and needs no process group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from kd.errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """Rank 0 writes files and prints."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def world_info_from_env(env: dict[str, str] | None = None) -> tuple[int, int, int, int]:
    """``(rank, world_size, local_rank, local_world_size)`` as set by torchrun."""
    env = dict(os.environ) if env is None else env
    rank = int(env.get("RANK", 0))
    world = int(env.get("WORLD_SIZE", 1))
    local_rank = int(env.get("LOCAL_RANK", 0))
    local_world = int(env.get("LOCAL_WORLD_SIZE", world))
    return rank, world, local_rank, local_world


def select_device(preference: str, local_rank: int) -> torch.device:
    """``auto``: this process's GPU when CUDA is present, else the CPU."""
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("train.device=cuda but CUDA is not available; use train.device=cpu")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def select_backend(requested: str, device: torch.device) -> str:
    """``auto``: NCCL for GPUs, gloo for CPUs; an explicit choice is honoured."""
    if requested == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if requested == "nccl" and device.type != "cuda":
        raise ConfigError("dist.backend=nccl needs CUDA devices; use dist.backend=gloo on CPU")
    return requested


def init_distributed(cfg: Any, device_preference: str = "auto") -> DistInfo:
    """Initialise the process group when the launcher started several processes.

    Args:
        cfg: the ``dist`` config section (``backend``, ``timeout_s``).
        device_preference: ``train.device``.
    """
    rank, world, local_rank, local_world = world_info_from_env()
    device = select_device(device_preference, local_rank)
    if world == 1:
        return DistInfo(device=device)
    backend = select_backend(cfg.backend, device)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=cfg.timeout_s),
                                device_id=device if device.type == "cuda" else None)
    return DistInfo(rank, world, local_rank, local_world, device, backend)


def cleanup() -> None:
    """Destroy the process group, if any."""
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks in place (a no-op in a single process)."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()

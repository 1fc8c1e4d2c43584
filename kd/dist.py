"""Process-group setup from the environment; everything else asks here for rank, world, device.

This module reads only environment variables set by launchers:

- torchrun / torch elastic: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``,
  ``MASTER_ADDR``, ``MASTER_PORT``;
- Open MPI (SageMaker's ``smdistributed`` launcher starts ranks with mpirun):
  ``OMPI_COMM_WORLD_RANK``, ``OMPI_COMM_WORLD_SIZE``, ``OMPI_COMM_WORLD_LOCAL_RANK``,
  ``OMPI_COMM_WORLD_LOCAL_SIZE``;
- Slurm ``srun`` without torchrun: ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``,
  ``SLURM_NTASKS_PER_NODE``;
- SageMaker: ``SM_HOSTS``, ``SM_CURRENT_HOST``, ``SM_NUM_GPUS`` (the first host is the
  rendezvous address when ``MASTER_ADDR`` is not set).

The first family that sets a rank wins, in that order. A process started by none of them is a
world of one and needs no process group.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from kd import watchdog
from kd.errors import ConfigError

SMDDP_MODULE = "smdistributed.dataparallel.torch.torch_smddp"
DEFAULT_MASTER_PORT = "29500"


@dataclass(frozen=True)
class WorldInfo:
    """Rank layout read from the environment, and which launcher set it."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    launcher: str = "none"  # torchrun | mpi | slurm | none


@dataclass(frozen=True)
class DistInfo(WorldInfo):
    """Where this process sits in the job: the launcher's layout plus its device and backend."""

    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """Rank 0 writes files and prints."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def _int(env: Mapping[str, str], key: str, default: int) -> int:
    value = env.get(key)
    if value is None or value == "":
        return default
    try:
        return int(value.split("(")[0].split(",")[0])  # SLURM_NTASKS_PER_NODE may be "8(x4)"
    except ValueError:
        raise ConfigError(f"environment variable {key}={value!r} is not an integer") from None


def world_info_from_env(env: Mapping[str, str] | None = None) -> WorldInfo:
    """Rank, world size and local layout from torchrun, Open MPI or Slurm variables."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        world = _int(env, "WORLD_SIZE", 1)
        return WorldInfo(_int(env, "RANK", 0), world, _int(env, "LOCAL_RANK", 0),
                         _int(env, "LOCAL_WORLD_SIZE", world), "torchrun")
    if "OMPI_COMM_WORLD_RANK" in env:
        world = _int(env, "OMPI_COMM_WORLD_SIZE", 1)
        return WorldInfo(_int(env, "OMPI_COMM_WORLD_RANK", 0), world,
                         _int(env, "OMPI_COMM_WORLD_LOCAL_RANK", 0),
                         _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", world), "mpi")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        world = _int(env, "SLURM_NTASKS", 1)
        return WorldInfo(_int(env, "SLURM_PROCID", 0), world, _int(env, "SLURM_LOCALID", 0),
                         _int(env, "SLURM_NTASKS_PER_NODE", world), "slurm")
    return WorldInfo()


def sagemaker_master_addr(env: Mapping[str, str]) -> str | None:
    """The rendezvous host of a SageMaker job: the first of ``SM_HOSTS`` (``algo-1``)."""
    hosts = env.get("SM_HOSTS")
    if not hosts:
        return None
    try:
        names = json.loads(hosts)
    except ValueError:
        raise ConfigError(f"SM_HOSTS={hosts!r} is not a JSON list of host names") from None
    return sorted(names)[0] if names else None


def smddp_available() -> bool:
    """Whether SageMaker's data-parallel library is importable (only inside its containers)."""
    try:
        return importlib.util.find_spec("smdistributed.dataparallel") is not None
    except (ImportError, ValueError):
        return False


def select_device(preference: str, local_rank: int) -> torch.device:
    """``auto``: this process's GPU when CUDA is present, else the CPU."""
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("train.device=cuda but CUDA is not available; use train.device=cpu")
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} "
                              f"visible); start at most that many processes per node")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def select_backend(requested: str, device: torch.device, smddp: bool | None = None) -> str:
    """The process-group backend.

    ``auto`` picks ``smddp`` when SageMaker's library imports and the device is a GPU, else
    ``nccl`` on GPUs and ``gloo`` on CPUs. An explicit choice is honoured; ``smddp`` asked for
    but missing is an error (it ships only inside SageMaker's PyTorch containers).
    """
    smddp = smddp_available() if smddp is None else smddp
    if requested == "auto":
        if device.type == "cuda":
            return "smddp" if smddp else "nccl"
        return "gloo"
    if requested == "nccl" and device.type != "cuda":
        raise ConfigError("dist.backend=nccl needs CUDA devices; use dist.backend=gloo on CPU")
    if requested == "smddp" and not smddp:
        raise ConfigError("dist.backend=smddp needs SageMaker's smdistributed-dataparallel, which "
                          "ships only in SageMaker's PyTorch training containers; use "
                          "dist.backend=auto elsewhere")
    return requested


def _export_env(info: WorldInfo, env: Mapping[str, str]) -> None:
    """Give ``init_method='env://'`` what MPI / Slurm / SageMaker launchers leave out."""
    os.environ.setdefault("RANK", str(info.rank))
    os.environ.setdefault("WORLD_SIZE", str(info.world_size))
    os.environ.setdefault("LOCAL_RANK", str(info.local_rank))
    os.environ.setdefault("LOCAL_WORLD_SIZE", str(info.local_world_size))
    if "MASTER_ADDR" not in env:
        addr = sagemaker_master_addr(env)
        if addr is None:
            raise ConfigError(f"{info.launcher} started {info.world_size} processes but "
                              f"MASTER_ADDR is not set; export MASTER_ADDR (the first node's "
                              f"host name) and MASTER_PORT, or launch with torchrun")
        os.environ["MASTER_ADDR"] = addr
    os.environ.setdefault("MASTER_PORT", DEFAULT_MASTER_PORT)


def _attempt_store(info: WorldInfo, env: dict[str, str], timeout: timedelta) -> dist.Store:
    """The ``env://`` store, under a key prefix of its own for each torchrun restart.

    torchrun (c10d rendezvous) keeps one TCP store for all the restarts of a job and hands it to
    the workers of every attempt; without a prefix, the workers of a restarted group could read
    the keys their dead predecessors wrote (gloo peer addresses, NCCL unique ids) and connect to
    processes that no longer exist. ``TORCHELASTIC_RESTART_COUNT`` numbers the attempts.
    """
    store, _, _ = next(dist.rendezvous("env://", info.rank, info.world_size, timeout=timeout))
    return dist.PrefixStore(f"kd/attempt_{env.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def init_distributed(cfg: Any, device_preference: str = "auto") -> DistInfo:
    """Initialise the process group when the launcher started several processes.

    Args:
        cfg: the ``dist`` config section (``backend``, ``timeout_s``).
        device_preference: ``train.device``.

    Example:
        >>> info = init_distributed(cfg.dist)  # doctest: +SKIP
        >>> info.rank, info.world_size, info.device  # doctest: +SKIP
        (0, 1, device(type='cpu'))
    """
    env = dict(os.environ)
    info = world_info_from_env(env)
    device = select_device(device_preference, info.local_rank)
    if info.world_size == 1:
        return DistInfo(device=device)
    backend = select_backend(cfg.backend, device)
    if backend == "smddp":
        importlib.import_module(SMDDP_MODULE)  # registers the "smddp" backend with torch
    if not dist.is_initialized():
        _export_env(info, env)
        timeout = timedelta(seconds=cfg.timeout_s)
        dist.init_process_group(backend=backend, store=_attempt_store(info, env, timeout),
                                rank=info.rank, world_size=info.world_size, timeout=timeout)
        # Heartbeats, so that a rank that dies or hangs is named by the others (kd.watchdog).
        watchdog.start(info.rank, info.world_size, cfg.timeout_s)
    return DistInfo(**dataclasses.asdict(info), device=device, backend=backend)


def cleanup() -> None:
    """Stop the heartbeats and destroy the process group, if any."""
    watchdog.stop()
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

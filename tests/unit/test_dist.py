"""Launcher environments → rank layout, backend choice, rendezvous address, DeepSpeed config."""

from __future__ import annotations

import os

import pytest
import torch

from kd import dist as kd_dist
from kd.dist import (
    WorldInfo,
    sagemaker_master_addr,
    select_backend,
    world_info_from_env,
)
from kd.errors import ConfigError
from kd.strategy import deepspeed_config

CPU, GPU = torch.device("cpu"), torch.device("cuda", 0)


@pytest.mark.parametrize("env, expected", [
    ({}, WorldInfo()),
    ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"},
     WorldInfo(3, 8, 1, 4, "torchrun")),
    ({"RANK": "1", "WORLD_SIZE": "2"}, WorldInfo(1, 2, 0, 2, "torchrun")),
    # SageMaker's smdistributed launcher (mpirun): no RANK, Open MPI variables instead
    ({"OMPI_COMM_WORLD_RANK": "9", "OMPI_COMM_WORLD_SIZE": "32",
      "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "8",
      "SM_HOSTS": '["algo-1","algo-2","algo-3","algo-4"]'}, WorldInfo(9, 32, 1, 8, "mpi")),
    # Slurm srun without torchrun; SLURM_NTASKS_PER_NODE may read "8(x4)"
    ({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5",
      "SLURM_NTASKS_PER_NODE": "8(x2)"}, WorldInfo(5, 16, 5, 8, "slurm")),
    # torchrun inside a Slurm allocation: torchrun's variables win
    ({"RANK": "0", "WORLD_SIZE": "2", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"},
     WorldInfo(0, 2, 0, 2, "torchrun")),
])
def test_world_info_from_env(env, expected):
    assert world_info_from_env(env) == expected


def test_non_integer_rank_is_a_config_error():
    with pytest.raises(ConfigError, match="WORLD_SIZE"):
        world_info_from_env({"RANK": "0", "WORLD_SIZE": "two"})


@pytest.mark.parametrize("requested, device, smddp, expected", [
    ("auto", GPU, True, "smddp"),
    ("auto", GPU, False, "nccl"),
    ("auto", CPU, True, "gloo"),
    ("auto", CPU, False, "gloo"),
    ("gloo", GPU, True, "gloo"),
    ("nccl", GPU, True, "nccl"),
    ("smddp", CPU, True, "smddp"),
])
def test_select_backend(requested, device, smddp, expected):
    assert select_backend(requested, device, smddp=smddp) == expected


@pytest.mark.parametrize("requested, device, message", [
    ("smddp", GPU, "SageMaker"),
    ("nccl", CPU, "CUDA"),
])
def test_select_backend_errors(requested, device, message):
    with pytest.raises(ConfigError, match=message):
        select_backend(requested, device, smddp=False)


def test_smddp_is_not_available_outside_sagemaker():
    assert kd_dist.smddp_available() is False  # never pip-installed: it ships in SageMaker's DLCs


def test_sagemaker_master_is_first_host():
    assert sagemaker_master_addr({"SM_HOSTS": '["algo-2", "algo-1"]'}) == "algo-1"
    assert sagemaker_master_addr({}) is None
    with pytest.raises(ConfigError, match="SM_HOSTS"):
        sagemaker_master_addr({"SM_HOSTS": "algo-1,algo-2"})


@pytest.fixture
def environ(monkeypatch) -> dict[str, str]:
    """A private copy of the environment: what _export_env writes must not leak into other
    tests (a leaked RANK/WORLD_SIZE makes later in-process runs wait for a rendezvous)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                        "MASTER_PORT")}
    monkeypatch.setattr(os, "environ", env)
    return env


def test_export_env_fills_rendezvous_from_sagemaker(environ):
    info = WorldInfo(3, 16, 3, 8, "mpi")
    kd_dist._export_env(info, {"SM_HOSTS": '["algo-1", "algo-2"]'})
    assert (environ["RANK"], environ["WORLD_SIZE"], environ["LOCAL_RANK"]) == ("3", "16", "3")
    assert environ["MASTER_ADDR"] == "algo-1"
    assert environ["MASTER_PORT"] == kd_dist.DEFAULT_MASTER_PORT


def test_export_env_without_any_rendezvous_address_is_a_config_error(environ):
    with pytest.raises(ConfigError, match="MASTER_ADDR"):
        kd_dist._export_env(WorldInfo(0, 4, 0, 4, "slurm"), {})


def test_single_process_needs_no_process_group(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)

    class Cfg:
        backend, timeout_s = "auto", 60

    info = kd_dist.init_distributed(Cfg, "cpu")
    assert (info.rank, info.world_size, info.is_main, info.is_distributed) == (0, 1, True, False)
    assert not torch.distributed.is_initialized()


def test_deepspeed_config_follows_kd_config():
    cfg = deepspeed_config(batch_size=32, accum_steps=4, world_size=32, grad_clip=1.0,
                           zero_stage=2)
    assert cfg["train_micro_batch_size_per_gpu"] == 32
    assert cfg["gradient_accumulation_steps"] == 4
    assert cfg["train_batch_size"] == 32 * 4 * 32
    assert cfg["gradient_clipping"] == 1.0
    assert cfg["zero_optimization"]["stage"] == 2
    assert "bf16" not in cfg and "fp16" not in cfg  # precision is kd's autocast
    assert deepspeed_config(8, 1, 1, None, 1)["gradient_clipping"] == 0.0

"""Launcher environments → rank layout, backend choice, rendezvous address, DeepSpeed config."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch

from kd.core import dist as kd_dist
from kd.core.dist import (
    WorldInfo,
    prepare_environment,
    process_group_device,
    sagemaker_master_addr,
    select_backend,
    smddp_launch,
    world_info_from_env,
)
from kd.core.strategy import DDP_BUCKET_BYTES, deepspeed_bucket_size, deepspeed_config
from kd.errors import ConfigError

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


@pytest.mark.parametrize("requested, device, smddp, job, expected", [
    ("auto", GPU, True, True, "smddp"),  # SageMaker's SMDDP launcher, supported instance
    ("auto", GPU, True, False, "nccl"),  # the library ships in the image, but torchrun etc.
    ("auto", GPU, False, True, "nccl"),
    ("auto", CPU, True, True, "gloo"),
    ("auto", CPU, False, False, "gloo"),
    ("gloo", GPU, True, True, "gloo"),
    ("nccl", GPU, True, True, "nccl"),
    ("smddp", GPU, True, False, "smddp"),  # explicit: honoured wherever the library imports
    ("smddp", CPU, True, False, "smddp"),
])
def test_select_backend(requested, device, smddp, job, expected):
    assert select_backend(requested, device, smddp=smddp, smddp_job=job) == expected


MPI = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "16",
       "OMPI_COMM_WORLD_LOCAL_RANK": "3", "OMPI_COMM_WORLD_LOCAL_SIZE": "8"}
SMDDP_RUN = {**MPI, "SMDATAPARALLEL_USE_HOMOGENEOUS": "1"}


@pytest.mark.parametrize("env, expected, reason", [
    ({**SMDDP_RUN, "SM_CURRENT_INSTANCE_TYPE": "ml.p4d.24xlarge"}, True, "ml.p4d.24xlarge"),
    # another instance: mpirun forwards SAGEMAKER_INSTANCE_TYPE, not SM_*
    ({**SMDDP_RUN, "SAGEMAKER_INSTANCE_TYPE": "ml.p4de.24xlarge"}, True, "ml.p4de.24xlarge"),
    ({**MPI, "SMDATAPARALLEL_USE_SINGLENODE": "1",
      "SM_CURRENT_INSTANCE_TYPE": "ml.p4d.24xlarge"}, True, "ml.p4d.24xlarge"),
    ({**SMDDP_RUN, "SM_CURRENT_INSTANCE_TYPE": "ml.p5.48xlarge"}, False, "ml.p5.48xlarge is not"),
    ({**SMDDP_RUN, "SM_CURRENT_INSTANCE_TYPE": "ml.g5.48xlarge"}, False, "not one SMDDP"),
    ({**SMDDP_RUN}, False, "instance type unknown"),
    # SageMaker's plain MPI distribution (no smddprun), or any other mpirun
    ({**MPI, "SM_CURRENT_INSTANCE_TYPE": "ml.p4d.24xlarge"}, False, "SMDATAPARALLEL_USE"),
    # torchrun (SDK v3's driver) inside the same container: torchrun's variables win
    ({**SMDDP_RUN, "RANK": "3", "WORLD_SIZE": "16",
      "SM_CURRENT_INSTANCE_TYPE": "ml.p4d.24xlarge"}, False, "not started by mpirun"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SMDATAPARALLEL_USE_SINGLENODE": "1",
      "SM_CURRENT_INSTANCE_TYPE": "ml.p4d.24xlarge"}, False, "not started by mpirun"),
], ids=["p4d", "p4de-remote", "single-node", "p5", "g5", "no-type", "plain-mpi", "torchrun",
        "slurm"])
def test_smddp_only_under_sagemakers_smddp_launcher(tmp_path, env, expected, reason):
    job, why = smddp_launch(env, resource_config=tmp_path / "absent.json")
    assert job is expected and reason in why


def test_smddp_instance_type_from_resourceconfig(tmp_path):
    config = tmp_path / "resourceconfig.json"
    config.write_text(json.dumps({"current_host": "algo-2", "hosts": ["algo-1", "algo-2"],
                                  "current_instance_type": "ml.p4d.24xlarge"}))
    assert smddp_launch(SMDDP_RUN, resource_config=config) == (
        True, "SageMaker's SMDDP launcher on ml.p4d.24xlarge")
    config.write_text("not json")
    assert smddp_launch(SMDDP_RUN, resource_config=config)[0] is False


def test_auto_backend_reads_the_launch_and_says_why(monkeypatch, caplog):
    monkeypatch.setattr(kd_dist, "smddp_available", lambda: True)
    env = {**SMDDP_RUN, "SM_CURRENT_INSTANCE_TYPE": "ml.p4d.24xlarge"}
    with caplog.at_level(logging.INFO, logger="kd"):
        assert kd_dist._auto_backend("auto", GPU, env) == "smddp"
        assert kd_dist._auto_backend("auto", GPU, {**env, "RANK": "3", "WORLD_SIZE": "16"}) \
            == "nccl"
    assert "not started by mpirun" in caplog.text
    monkeypatch.setattr(kd_dist, "smddp_available", lambda: False)
    assert kd_dist._auto_backend("auto", GPU, env) == "nccl"


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
                           zero_stage=2, trainable_params=5_717_416)
    assert cfg["train_micro_batch_size_per_gpu"] == 32
    assert cfg["gradient_accumulation_steps"] == 4
    assert cfg["train_batch_size"] == 32 * 4 * 32
    assert cfg["gradient_clipping"] == 1.0
    zero = cfg["zero_optimization"]
    assert zero["stage"] == 2
    # ViT-Ti: buckets of its own size, not DeepSpeed's 5e8 elements (2 GB of fp32 per GPU)
    assert zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == 5_717_416
    assert "bf16" not in cfg and "fp16" not in cfg  # precision is kd's autocast
    assert deepspeed_config(8, 1, 1, None, 1, trainable_params=10)["gradient_clipping"] == 0.0


@pytest.mark.skipif(torch.cuda.is_available(), reason="the gpu test below covers CUDA")
def test_deepspeed_allocates_the_bucket_kd_sizes(monkeypatch):
    """The real DeepSpeed engine (CPU accelerator) takes kd's sizes: the reduce bucket it
    allocates holds the student's gradients, not 5e8 elements."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    # DeepSpeed asserts LOCAL_RANK even for one process; kd sets it when no launcher did.
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.delenv("LOCAL_RANK")  # (set first, so that the test ends without it)
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    from kd.core.dist import DistInfo
    from kd.core.strategy import DeepSpeedStrategy

    allocated = []
    setup = DeepSpeedZeroOptimizer.setup_buckets

    def record(self):
        setup(self)
        allocated.extend(b.numel() for bucket in self.ipg_buckets.values() for b in bucket.buffer)

    monkeypatch.setattr(DeepSpeedZeroOptimizer, "setup_buckets", record)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Linear(128, 64))
    params = sum(p.numel() for p in model.parameters())
    try:
        strategy = DeepSpeedStrategy(model, torch.optim.AdamW(model.parameters()), DistInfo(),
                                     "fp32", None, 4, 1, 2)
        loss = strategy.model(torch.randn(4, 64)).square().mean()
        strategy.backward(loss, 1, True)
        strategy.step(loss.detach())
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    assert strategy.engine.optimizer.reduce_bucket_size == params
    assert allocated and max(allocated) == params


FLOOR = DDP_BUCKET_BYTES // 4  # 25 MiB of fp32


@pytest.mark.parametrize("params, world, expected", [
    (5_717_416, 32, 5_717_416),  # ViT-Ti: the whole student, under the 25 MiB floor
    (86_000_000, 1, 86_000_000),  # ViT-B alone: its gradients
    (86_000_000, 32, FLOOR),  # ViT-B on 32 ranks: its partition is below the floor
    (304_000_000, 32, 9_500_000),  # ViT-L on 32 ranks: its partition
    (1_000_000_000, 1, 500_000_000),  # ViT-g alone: DeepSpeed's default is the ceiling
    (21, 2, 22),  # rounded up to even (DeepSpeed's NCCL alignment)
])
def test_deepspeed_bucket_is_sized_from_the_student(params, world, expected):
    size = deepspeed_bucket_size(params, world)
    assert size == expected and size % 2 == 0


def _mpi_info(local: int = 8) -> WorldInfo:
    return WorldInfo(3, 16, 3, local, "mpi")


@pytest.mark.parametrize("nccl, interfaces, expected", [
    ("eth0", ["lo", "eth0", "eth1"], "eth0"),
    ("eth", ["lo", "docker0", "eth2", "eth3"], "eth2"),  # a prefix: its first match
    ("=eth1", ["lo", "eth1", "eth10"], "eth1"),  # exact
    ("^docker,lo", ["lo", "docker0", "ens5"], "ens5"),  # exclusions
    ("^=eth1", ["lo", "eth1", "eth10"], "lo"),
    ("ib,eth", ["lo", "eth0", "ib0"], "eth0"),  # kernel order, not the list's
    ("bond0", ["lo", "eth0"], None),  # no such interface: left to gloo
])
def test_gloo_follows_nccls_interface(nccl, interfaces, expected):
    env = {"NCCL_SOCKET_IFNAME": nccl}
    changes = prepare_environment(WorldInfo(0, 2, 0, 1, "torchrun"), env, interfaces)
    assert changes.get("GLOO_SOCKET_IFNAME") == expected


def test_the_users_gloo_interface_is_kept():
    env = {"NCCL_SOCKET_IFNAME": "eth0", "GLOO_SOCKET_IFNAME": "eth1"}
    assert prepare_environment(WorldInfo(0, 2, 0, 1, "torchrun"), env, ["eth0", "eth1"]) == {}


@pytest.mark.parametrize("info, env, expected", [
    (_mpi_info(8), {}, "1"),  # SageMaker's mpirun: 8 ranks per node
    (_mpi_info(8), {"OMP_NUM_THREADS": "4"}, None),  # the user's value
    (_mpi_info(1), {}, None),  # one rank per node, as torchrun with --nproc-per-node 1
    (WorldInfo(0, 8, 0, 8, "torchrun"), {}, None),  # torchrun sets it itself
])
def test_omp_threads_under_mpi_as_torchrun_does(info, env, expected):
    assert prepare_environment(info, env, []).get("OMP_NUM_THREADS") == expected


def test_prepare_environment_changes_only_the_process_environment(environ, monkeypatch):
    threads = []
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    environ.pop("OMP_NUM_THREADS", None)
    environ.pop("GLOO_SOCKET_IFNAME", None)
    environ["NCCL_SOCKET_IFNAME"] = "lo"
    prepare_environment(_mpi_info(8), None, ["lo", "eth0"])
    assert environ["OMP_NUM_THREADS"] == "1" and environ["GLOO_SOCKET_IFNAME"] == "lo"
    assert threads == [1]  # torch read the variable at import: told directly
    given = {"NCCL_SOCKET_IFNAME": "eth0"}
    prepare_environment(_mpi_info(8), given, ["eth0"])
    assert given == {"NCCL_SOCKET_IFNAME": "eth0"} and threads == [1]


def test_the_default_group_is_bound_to_the_gpu_under_nccl_only():
    assert process_group_device("nccl", GPU) == GPU
    assert process_group_device("gloo", CPU) is None
    assert process_group_device("gloo", GPU) is None
    assert process_group_device("smddp", GPU) is None  # torch documents device_id for NCCL


def test_init_distributed_passes_device_id(environ, monkeypatch):
    """The call kd makes on a GPU node, without a GPU: torch's own checks of device_id run in
    the gpu test below."""
    calls = {}
    environ.update({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"})
    monkeypatch.setattr(kd_dist, "select_device", lambda preference, local_rank:
                        torch.device("cuda", local_rank))
    monkeypatch.setattr(kd_dist, "smddp_available", lambda: False)
    monkeypatch.setattr(kd_dist, "_attempt_store", lambda info, env, timeout: "store")
    monkeypatch.setattr(kd_dist.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(kd_dist.dist, "init_process_group", lambda **kw: calls.update(kw))
    monkeypatch.setattr(kd_dist.watchdog, "start", lambda *a: None)

    class Cfg:
        backend, timeout_s = "auto", 60

    info = kd_dist.init_distributed(Cfg, "auto")
    assert info.backend == "nccl" and calls["backend"] == "nccl"
    assert calls["device_id"] == torch.device("cuda", 1) and calls["store"] == "store"


@pytest.mark.gpu
def test_device_bound_nccl_group_and_the_gloo_stop_group_on_cuda():
    """init_process_group(device_id=...) forms the NCCL communicator at once; the gloo group of
    kd.core.guard.StopRequest is created after it (torch binds later groups to the same device)."""
    from kd.core.guard import StopRequest

    device = torch.device("cuda", torch.cuda.current_device())
    torch.distributed.init_process_group("nccl", store=torch.distributed.HashStore(), rank=0,
                                         world_size=1, device_id=process_group_device("nccl",
                                                                                      device))
    try:
        stop = StopRequest(distributed=True, timeout_s=60)
        assert stop.group is not None
        answers = []
        for call in range(3):
            if call == 1:
                stop.request()
            answers.append(stop.should_stop())
        stop.close()
        assert answers == [False, False, True]
        flag = torch.ones(1, device=device)
        torch.distributed.all_reduce(flag)
        assert flag.item() == 1.0
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("buckets", ["kd", "deepspeed-default"])
def test_deepspeed_bucket_memory_on_cuda(stage, buckets, monkeypatch):
    """DeepSpeed's default buckets cost ~1.9 GiB of fp32 on the GPU whatever the model (the
    control); kd's config keeps a 1 M-parameter student's whole step under 64 MiB."""
    pytest.importorskip("deepspeed")
    from kd.core import strategy as kd_strategy
    from kd.core.dist import DistInfo

    if buckets == "deepspeed-default":
        config = kd_strategy.deepspeed_config

        def without_buckets(*args, **kwargs):
            cfg = config(*args, **kwargs)
            for key in ("reduce_bucket_size", "allgather_bucket_size"):
                del cfg["zero_optimization"][key]
            return cfg

        monkeypatch.setattr(kd_strategy, "deepspeed_config", without_buckets)
    # DeepSpeed asserts LOCAL_RANK even for one process; kd sets it when no launcher did.
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.delenv("LOCAL_RANK")  # (set first, so that the test ends without it)
    device = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    model = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.Linear(1024, 512)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    try:
        strategy = kd_strategy.DeepSpeedStrategy(model, optimizer, DistInfo(device=device),
                                                 "bf16", None, 4, 1, stage)
        for _ in range(2):
            loss = strategy.model(torch.randn(4, 512, device=device)).square().mean()
            strategy.backward(loss, 1, True)
            strategy.step(loss.detach())
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        if buckets == "kd":
            assert peak < 64 * 1024**2, peak
        else:
            assert peak > 1024**3, peak  # the reduce bucket: 5e8 fp32 elements
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def test_gloo_is_given_only_interfaces_that_are_up_with_an_address(monkeypatch) -> None:
    # Containers list address-less placeholders (ifb0, tunl0) before eth0; gloo cannot bind them.
    import socket
    from types import SimpleNamespace

    import psutil

    from kd.core import dist as kd_dist

    def addr(family):
        return SimpleNamespace(family=family)

    monkeypatch.setattr(socket, "if_nameindex",
                        lambda: [(1, "lo"), (2, "ifb0"), (3, "tunl0"), (4, "eth0"), (5, "eth1")])
    monkeypatch.setattr(psutil, "net_if_addrs", lambda: {
        "lo": [addr(socket.AF_INET)], "ifb0": [addr(psutil.AF_LINK)], "tunl0": [],
        "eth0": [addr(socket.AF_INET)], "eth1": [addr(socket.AF_INET6)]})
    monkeypatch.setattr(psutil, "net_if_stats", lambda: {
        n: SimpleNamespace(isup=n != "eth1") for n in ("lo", "ifb0", "tunl0", "eth0", "eth1")})
    assert kd_dist._interface_names() == ["lo", "eth0"]
    changes = kd_dist.prepare_environment(kd_dist.WorldInfo(world_size=2),
                                          env={"NCCL_SOCKET_IFNAME": "^lo,docker0"})
    assert changes == {"GLOO_SOCKET_IFNAME": "eth0"}

"""Process-group setup from the environment; everything else asks here for rank, world, device.

This module reads only what launchers leave: environment variables, and on SageMaker its
``resourceconfig.json``:

- torchrun / torch elastic: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``,
  ``MASTER_ADDR``, ``MASTER_PORT``;
- Open MPI (SageMaker's ``smdistributed`` launcher starts ranks with mpirun):
  ``OMPI_COMM_WORLD_RANK``, ``OMPI_COMM_WORLD_SIZE``, ``OMPI_COMM_WORLD_LOCAL_RANK``,
  ``OMPI_COMM_WORLD_LOCAL_SIZE``;
- Slurm ``srun`` without torchrun: ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``,
  ``SLURM_NTASKS_PER_NODE``;
- SageMaker: ``SM_HOSTS``, ``SM_CURRENT_HOST``, ``SM_NUM_GPUS`` (the first host is the
  rendezvous address when ``MASTER_ADDR`` is not set); for ``dist.backend=auto``, the SMDDP
  launcher's ``SMDATAPARALLEL_USE_*`` flag and the instance type (:func:`smddp_launch`).

The first family that sets a rank wins, in that order. A process started by none of them is a
world of one and needs no process group.

Before the process group starts, kd fills in two variables that launchers leave to the user,
never overriding one the user set (:func:`prepare_environment`):

- ``GLOO_SOCKET_IFNAME`` from ``NCCL_SOCKET_IFNAME``: on nodes with several network interfaces
  the host name may resolve to one the other nodes cannot reach, and gloo (the CPU backend, and
  the small group :class:`kd.core.guard.StopRequest` agrees on stop signals over) then hangs at
  connection time while NCCL, told its interface, works;
- ``OMP_NUM_THREADS=1`` under Open MPI with several ranks per node, as torchrun does for
  ``--nproc-per-node`` > 1 (``torch/distributed/run.py``): each rank's intra-op thread pool
  would otherwise take every core of the node.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import json
import logging
import os
import socket
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import psutil
import torch
import torch.distributed as dist

from kd.config import DistConfig
from kd.core import watchdog
from kd.errors import ConfigError

log = logging.getLogger("kd")

SMDDP_MODULE = "smdistributed.dataparallel.torch.torch_smddp"
DEFAULT_MASTER_PORT = "29500"
# Instance types on which dist.backend=auto picks smddp. AWS's current documentation gives SMDDP
# for P4d and P4de only (SageMaker developer guide, model-parallel-core-features-v2-smddp-allgather
# and data-parallel-faq); SDK v2 also admits ml.p3.16xlarge and ml.p3dn.24xlarge
# (sagemaker-python-sdk fw_utils.SM_DATAPARALLEL_SUPPORTED_INSTANCE_TYPES), which the guide of
# 2022 listed for SMDDP 1.x, that is for PyTorch <= 1.12, older than kd's. launch/sagemaker.py
# offers --smddp on the same two.
SMDDP_INSTANCE_TYPES = ("ml.p4d.24xlarge", "ml.p4de.24xlarge")
# SageMaker's training toolkit starts an SMDDP job as `mpirun ... -x FLAG smddprun python ...`
# with exactly one of these set to 1 (sagemaker-training-toolkit, smdataparallel.py): every
# rank, on every instance, sees it; nothing else sets it.
SMDDP_LAUNCH_FLAGS = ("SMDATAPARALLEL_USE_SINGLENODE", "SMDATAPARALLEL_USE_HOMOGENEOUS")
# Where SageMaker describes the cluster in every training container (current_host, hosts,
# current_instance_type); the toolkit's SM_CURRENT_INSTANCE_TYPE comes from it.
SAGEMAKER_RESOURCE_CONFIG = Path("/opt/ml/input/config/resourceconfig.json")


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


def sagemaker_instance_type(env: Mapping[str, str],
                            resource_config: Path = SAGEMAKER_RESOURCE_CONFIG) -> str | None:
    """This SageMaker instance's type (``ml.p4d.24xlarge``), or None outside SageMaker.

    The toolkit exports ``SM_CURRENT_INSTANCE_TYPE`` to the processes it starts; mpirun forwards
    only chosen variables to the other instances, among them ``SAGEMAKER_INSTANCE_TYPE`` in a
    multi-instance SMDDP job; ``resourceconfig.json`` is in every training container.
    """
    for key in ("SM_CURRENT_INSTANCE_TYPE", "SAGEMAKER_INSTANCE_TYPE"):
        if env.get(key):
            return env[key]
    try:
        value = json.loads(resource_config.read_text()).get("current_instance_type")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) and value else None


def smddp_launch(env: Mapping[str, str], resource_config: Path = SAGEMAKER_RESOURCE_CONFIG
                 ) -> tuple[bool, str]:
    """Whether SageMaker's SMDDP launcher started this job on an instance SMDDP supports, and
    why not when it did not.

    That is: Open MPI's rank variables without torchrun's (``world_info_from_env`` says
    ``mpi``), the toolkit's ``SMDATAPARALLEL_USE_*`` flag, and an instance type in
    :data:`SMDDP_INSTANCE_TYPES`. Every rank of such a job sees the same three, so all of them
    choose the same backend.
    """
    if world_info_from_env(env).launcher != "mpi":
        return False, "not started by mpirun (SageMaker's SMDDP launcher)"
    if not any(env.get(flag) for flag in SMDDP_LAUNCH_FLAGS):
        return False, (f"mpirun did not come from SageMaker's SMDDP launcher (neither of "
                       f"{', '.join(SMDDP_LAUNCH_FLAGS)} is set)")
    instance = sagemaker_instance_type(env, resource_config)
    if instance not in SMDDP_INSTANCE_TYPES:
        return False, (f"instance type {instance or 'unknown'} is not one SMDDP supports "
                       f"({', '.join(SMDDP_INSTANCE_TYPES)})")
    return True, f"SageMaker's SMDDP launcher on {instance}"


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


def select_backend(requested: str, device: torch.device, smddp: bool | None = None,
                   smddp_job: bool = False) -> str:
    """The process-group backend.

    ``auto`` picks ``smddp`` on GPUs only when SageMaker's SMDDP launcher started the job on a
    supported instance (``smddp_job``, see :func:`smddp_launch`) and the library imports
    (``smddp``); it is ``nccl`` on GPUs otherwise (torchrun, Slurm, other instances, a container
    that merely ships the library) and ``gloo`` on CPUs. An explicit choice is honoured;
    ``smddp`` asked for but missing is an error (it ships only inside SageMaker's containers).
    """
    smddp = smddp_available() if smddp is None else smddp
    if requested == "auto":
        if device.type == "cuda":
            return "smddp" if smddp and smddp_job else "nccl"
        return "gloo"
    if requested == "nccl" and device.type != "cuda":
        raise ConfigError("dist.backend=nccl needs CUDA devices; use dist.backend=gloo on CPU")
    if requested == "smddp" and not smddp:
        raise ConfigError("dist.backend=smddp needs SageMaker's smdistributed-dataparallel, which "
                          "ships only in SageMaker's PyTorch training containers; use "
                          "dist.backend=auto elsewhere")
    return requested


def _auto_backend(requested: str, device: torch.device, env: Mapping[str, str]) -> str:
    """:func:`select_backend` with the SMDDP evidence read from ``env``; says why when the
    library imports but auto does not use it."""
    smddp = smddp_available()
    job, why = smddp_launch(env) if requested == "auto" and smddp else (False, "")
    backend = select_backend(requested, device, smddp, job)
    if requested == "auto" and smddp and device.type == "cuda":
        log.info("dist.backend=auto: %s (%s)", backend, why)
    return backend


def _matching_interfaces(pattern: str, names: Sequence[str]) -> list[str]:
    """The interfaces among ``names`` that an ``NCCL_SOCKET_IFNAME`` value selects.

    NCCL's syntax (NCCL user guide, "Environment Variables", NCCL_SOCKET_IFNAME): a
    comma-separated list of name prefixes; a leading ``^`` excludes instead of selecting, a
    leading ``=`` (after ``^`` if both) makes the names exact.
    """
    exclude = pattern.startswith("^")
    pattern = pattern[1:] if exclude else pattern
    exact = pattern.startswith("=")
    pattern = pattern[1:] if exact else pattern
    wanted = [p for p in pattern.split(",") if p]

    def hit(name: str) -> bool:
        return any(name == p if exact else name.startswith(p) for p in wanted)

    return [n for n in names if hit(n) != exclude]


def _interface_names() -> list[str]:
    """This host's interfaces that are up and have an IP address, in kernel order.

    NCCL considers only interfaces with an address; listing the others too would hand gloo a
    placeholder (``ifb0``, ``tunl0``, ``sit0``: often listed before ``eth0`` in containers) that
    it cannot bind ("Unable to find address for: ifb0").
    """
    try:
        names = [name for _, name in socket.if_nameindex()]
        addresses, stats = psutil.net_if_addrs(), psutil.net_if_stats()
    except OSError:
        return []
    ip = (socket.AF_INET, socket.AF_INET6)
    return [n for n in names if n in stats and stats[n].isup
            and any(a.family in ip for a in addresses.get(n, ()))]


def prepare_environment(info: WorldInfo, env: Mapping[str, str] | None = None,
                        interfaces: Sequence[str] | None = None) -> dict[str, str]:
    """Set ``GLOO_SOCKET_IFNAME`` and ``OMP_NUM_THREADS`` where launchers leave them out (see
    the module docstring); returns what it set. Only when ``env`` is ``os.environ`` (the
    default) does it change anything; given another mapping it only says what it would set.

    gloo takes exact interface names, and several of them are used round-robin and must all
    reach every peer; so kd resolves NCCL's prefixes and exclusions against this host's
    interfaces (kernel order) and passes the first match only, as NCCL does for its bootstrap
    connection.
    """
    env = os.environ if env is None else env
    changes: dict[str, str] = {}
    nccl_ifname = env.get("NCCL_SOCKET_IFNAME")
    if nccl_ifname and not env.get("GLOO_SOCKET_IFNAME"):
        names = _interface_names() if interfaces is None else list(interfaces)
        match = _matching_interfaces(nccl_ifname, names)
        if match:
            changes["GLOO_SOCKET_IFNAME"] = match[0]
            log.info("GLOO_SOCKET_IFNAME=%s, from NCCL_SOCKET_IFNAME=%s, so that gloo connects "
                     "over the interface NCCL uses", match[0], nccl_ifname)
        else:
            log.warning("NCCL_SOCKET_IFNAME=%s matches none of this host's interfaces (%s); "
                        "gloo picks its own: set GLOO_SOCKET_IFNAME if its groups hang",
                        nccl_ifname, ", ".join(names) or "none listed")
    if info.launcher == "mpi" and info.local_world_size > 1 and "OMP_NUM_THREADS" not in env:
        changes["OMP_NUM_THREADS"] = "1"
        log.warning("OMP_NUM_THREADS=1 for each of the %d ranks on this node, as torchrun sets "
                    "it, so that their thread pools do not overload the CPUs; set "
                    "OMP_NUM_THREADS yourself to tune it", info.local_world_size)
    if env is os.environ:
        os.environ.update(changes)
        if "OMP_NUM_THREADS" in changes:
            # torch has read the variable by now (set after `import torch`, it leaves
            # torch.get_num_threads() unchanged): the variable is for child processes,
            # set_num_threads for this one.
            torch.set_num_threads(1)
    return changes


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


def process_group_device(backend: str, device: torch.device) -> torch.device | None:
    """The ``device_id`` to bind the default group to: this rank's GPU under NCCL, else None.

    With it (torch >= 2.3, ``init_process_group(device_id=...)``) NCCL forms its communicator
    during ``init_process_group`` instead of at the first collective, so a bad network or a
    wrong GPU fails there, and later NCCL groups are split from it (``ncclCommSplit``). torch
    documents the effects under NCCL only, so other backends (smddp's among them) get None.
    """
    return device if backend == "nccl" and device.type == "cuda" else None


def init_distributed(cfg: DistConfig, device_preference: str = "auto") -> DistInfo:
    """Initialise the process group when the launcher started several processes.

    Prefer :func:`process_group`, which also tears the group down.

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
    backend = _auto_backend(cfg.backend, device, env)
    if backend == "smddp":
        importlib.import_module(SMDDP_MODULE)  # registers the "smddp" backend with torch
    if not dist.is_initialized():
        prepare_environment(info)
        _export_env(info, env)
        timeout = timedelta(seconds=cfg.timeout_s)
        dist.init_process_group(backend=backend, store=_attempt_store(info, env, timeout),
                                rank=info.rank, world_size=info.world_size, timeout=timeout,
                                device_id=process_group_device(backend, device))
        # Heartbeats, so that a rank that dies or hangs is named by the others (kd.core.watchdog).
        watchdog.start(info.rank, info.world_size, cfg.timeout_s)
    return DistInfo(**dataclasses.asdict(info), device=device, backend=backend)


def single_process(device_preference: str = "auto") -> DistInfo:
    """This process alone, on its device: for work outside :func:`process_group` (a test, a
    notebook). A launcher that started several processes needs :func:`process_group` instead."""
    info = world_info_from_env(os.environ)
    if info.world_size > 1 and not dist.is_initialized():
        raise RuntimeError(f"this process is rank {info.rank} of {info.world_size}: open the "
                           f"process group first (kd.core.dist.process_group)")
    if dist.is_initialized():
        raise RuntimeError("a process group is open: pass its DistInfo (process_group)")
    return DistInfo(device=select_device(device_preference, info.local_rank))


@contextlib.contextmanager
def process_group(cfg: DistConfig, device_preference: str = "auto") -> Iterator[DistInfo]:
    """This process's place in the job for the length of a command; the process group (when
    the launcher started several processes) is created on entry and torn down on exit, by
    whoever opened it.

    On a clean exit every rank waits for the others first, so that none tears its
    communicators down while another still uses them. On an error, a collective that failed
    because another rank died or hung becomes a :class:`~kd.errors.DistributedError` naming
    that rank; any other error is published for the other ranks first (:mod:`kd.core.watchdog`).

    Example:
        >>> with process_group(load_config(None).dist, "cpu") as info:  # doctest: +SKIP
        ...     info.world_size
        1
    """
    opened_before = dist.is_initialized()
    info = init_distributed(cfg, device_preference)
    if opened_before:  # its opener tears it down
        yield info
        return
    try:
        yield info
        barrier()
    except BaseException as e:
        fault = watchdog.diagnose(e)
        cleanup()
        if fault is not None:
            raise fault from None
        raise
    cleanup()


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

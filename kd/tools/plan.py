"""``kd plan``: size a data-parallel job before launching it.

For a config and a cluster (GPU model × GPUs per node × nodes), the plan says what one GPU holds
(student weights, gradients, optimizer state with and without ZeRO, teacher weights,
activations), the largest per-GPU batch that fits, and about how long an optimizer step takes
(counted FLOPs at a stated fraction of the GPU's peak, plus the gradient all-reduce).

Two halves:

- **Arithmetic**: the hardware tables (:data:`GPUS`, :data:`INSTANCES`), pure functions
  (:func:`optimizer_state_bytes`, :func:`allreduce_bytes`, :func:`largest_batch`, ...) and
  :func:`build_plan`, which turns measured model numbers and a cluster into the plan. Numbers
  in, numbers out, so they are tested against hand-computed cases.
- **Measurement**: :func:`measure_models` builds the config's student and teacher with kd's own
  builders (random weights: no checkpoint is read, nothing is downloaded) and measures on the
  device at hand: parameters; optimizer state per parameter (one step of the configured
  optimizer); activation memory, the peak of live tensor bytes during one training step
  (:class:`LiveTensorBytes`) at two small batches, whose slope is the memory per image and
  whose intercept a fixed overhead; FLOPs per image (:func:`kd.tools.profiler.count_flops`).

Example:
    >>> from kd.config import DEMO_PRESET, load_config
    >>> cluster = resolve_cluster(gpu="a100-40gb", nodes=4)
    >>> cluster.world_size, cluster.network_source
    (32, 'ml.p4d.24xlarge')
    >>> cfg = load_config(DEMO_PRESET)
    >>> plan = build_plan(measure_models(cfg), cluster, training_setup(cfg))  # doctest: +SKIP
    >>> plan["memory"]["without_zero"]["largest_batch"]  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import textwrap
import threading
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kd.config import (
    IMAGE_DATASETS,
    KDConfig,
    OptimConfig,
    derive,
    teacher_key,
    teacher_sections,
)
from kd.core.features import FeatureDistiller, FeatureStudent
from kd.core.models import (
    FrozenTeacher,
    build_input_norm,
    build_student,
    check_model_input,
    create_timm_model,
)
from kd.core.optim import build_optimizer
from kd.core.precision import DTYPES, autocast
from kd.core.strategy import deepspeed_bucket_size
from kd.core.task import DistillationTask
from kd.core.teachers import TeacherSet, check_teacher_inputs, hold_as_trained
from kd.data.datasets import DigitsDataset
from kd.data.pipeline import RunData
from kd.data.tuning import pipeline_rate
from kd.errors import UserError, output_error
from kd.tools.profiler import count_flops_safely, matmul_precision, table_peak, tensor_bytes
from kd.tools.profiler import optimizer_state_bytes as state_bytes
from kd.units import format_bytes, format_duration, format_flops, format_percent

DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
GiB = 1024**3
MiB = 1024**2

# Kept free when finding the largest batch: a share of the GPU's memory for the caching
# allocator's fragmentation, and a fixed reserve for the CUDA context (with lazy module loading
# about 0.5 GiB), cuBLAS/cuDNN workspaces and NCCL's communication buffers.
MEMORY_MARGIN = 0.10
CUDA_RESERVE_BYTES = 1 * GiB
# Achievable fraction of the dense matmul peak for ViT training in bf16 (a typical MFU of a
# well-fed data-parallel ViT job; `kd profile` measures the real one). Override with --mfu.
DEFAULT_MFU = 0.4
# Batches at which activation memory is measured: two points give slope and intercept.
MEASURE_BATCHES = (2, 4)


# ------------------------------------------------------------------------------ hardware
@dataclass(frozen=True)
class GpuSpec:
    """A GPU model: the memory the driver reports, its NVLink bandwidth and its peak FLOP/s.

    Peaks come from :data:`kd.tools.profiler.GPU_PEAK_FLOPS` (NVIDIA's datasheets, dense), looked up
    by the name ``torch.cuda.get_device_name`` gives, so kd keeps one table of peaks.
    """

    key: str
    device_name: str
    memory_bytes: int
    nvlink_gb_s: float  # per GPU, both directions together (the datasheet's figure), GB/s

    def peak_flops(self, precision: str) -> float:
        """Dense peak FLOP/s for a matmul precision (bf16, fp16, tf32, fp32)."""
        peak = table_peak(self.device_name, precision)
        if peak is None:
            raise UserError(f"no {precision} peak for {self.device_name} in kd's table")
        return peak


# Memory: the total nvidia-smi reports (memory.total), a little under the datasheets' "40GB",
# "80GB", "141GB". NVLink: per GPU, both directions together. Peaks:
# kd.tools.profiler.GPU_PEAK_FLOPS
# (A100: bf16 312, fp32 19.5 TFLOP/s; H100 SXM and H200: bf16 989, fp32 67 TFLOP/s, dense).
#   A100 SXM4 40/80 GB, NVLink 3 600 GB/s: https://www.nvidia.com/en-us/data-center/a100/
#   H100 SXM 80 GB, NVLink 4 900 GB/s: https://www.nvidia.com/en-us/data-center/h100/
#   H200 SXM 141 GB, NVLink 4 900 GB/s: https://www.nvidia.com/en-us/data-center/h200/
GPUS: dict[str, GpuSpec] = {g.key: g for g in (
    GpuSpec("a100-40gb", "NVIDIA A100-SXM4-40GB", 40536 * MiB, 600.0),
    GpuSpec("a100-80gb", "NVIDIA A100-SXM4-80GB", 81920 * MiB, 600.0),
    GpuSpec("h100", "NVIDIA H100 80GB HBM3", 81559 * MiB, 900.0),
    GpuSpec("h200", "NVIDIA H200", 143771 * MiB, 900.0),
)}


@dataclass(frozen=True)
class InstanceSpec:
    """A SageMaker (EC2) GPU instance: its GPUs and its network between instances (EFA)."""

    key: str
    sagemaker: str
    gpu: str
    gpus: int
    network_gbps: float
    vcpus: int


# 8 GPUs each; the network is the instance's EFA bandwidth; vCPUs as listed (hyperthreads):
#   p4d (8 x A100 40 GB) and p4de (8 x A100 80 GB), 400 Gbps, 96 vCPUs: https://aws.amazon.com/ec2/instance-types/p4/
#   p5 (8 x H100 80 GB) and p5e (8 x H200 141 GB), 3,200 Gbps, 192 vCPUs: https://aws.amazon.com/ec2/instance-types/p5/
#   SageMaker names them ml.<type>: https://aws.amazon.com/sagemaker/pricing/
INSTANCES: dict[str, InstanceSpec] = {i.key: i for i in (
    InstanceSpec("p4d", "ml.p4d.24xlarge", "a100-40gb", 8, 400.0, 96),
    InstanceSpec("p4de", "ml.p4de.24xlarge", "a100-80gb", 8, 400.0, 96),
    InstanceSpec("p5", "ml.p5.48xlarge", "h100", 8, 3200.0, 192),
    InstanceSpec("p5e", "ml.p5e.48xlarge", "h200", 8, 3200.0, 192),
)}
# Loader images/s per core when the training data cannot be read where kd plan runs: the DeiT
# recipe (random-resized crop, flip, rand-m9-mstd0.5-inc1, erasing 0.25) at 224 px on
# ImageNet-like 500×375 JPEGs (about 70 KB), one core of a Xeon with AVX-512
# (benchmarks/bench_input.py, README "Input pipeline"). "device": the loader's share with
# data.decode=device (reading the bytes and drawing the plan).
DEFAULT_CORE_RATES = {"cpu": 390.0, "device": 3300.0}


@dataclass(frozen=True)
class Cluster:
    """Where the job runs: ``nodes`` × ``gpus_per_node`` GPUs of one model."""

    gpu: GpuSpec
    nodes: int
    gpus_per_node: int
    network_gbps: float  # between nodes, per node
    network_source: str  # the instance it comes from, or --network-gbps
    cpus_per_gpu: float | None = None  # vCPUs per GPU for its loader and training process
    cpus_source: str = ""

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    def ring_link(self) -> tuple[float, str]:
        """Bytes/s of the slowest link of the ring, and its name.

        Between nodes, a ring all-reduce moves 2·(N−1)/N of the gradients through each node's
        network (NCCL spreads its rings over the node's NICs); within one node, through each
        GPU's NVLink in one direction (half the datasheet's two-way figure).
        """
        if self.nodes > 1:
            return (self.network_gbps * 1e9 / 8,
                    f"network between nodes, {self.network_gbps:,.0f} Gbps per node")
        return (self.gpu.nvlink_gb_s / 2 * 1e9,
                f"NVLink within the node, {self.gpu.nvlink_gb_s / 2:,.0f} GB/s per direction")


def _names(table: dict[str, Any]) -> str:
    return ", ".join(table)


def resolve_cluster(gpu: str | None = None, instance: str | None = None, nodes: int = 1,
                    gpus_per_node: int | None = None, network_gbps: float | None = None,
                    cpus_per_gpu: float | None = None) -> Cluster:
    """The cluster from ``kd plan``'s options; explicit options win over ``instance``'s.

    Without ``instance`` and ``network_gbps``, the network is that of the SageMaker instance
    with this GPU (p4d for a100-40gb, ...).

    Raises:
        UserError: an unknown GPU or instance name (listing the valid ones), or a count that is
            not positive.
    """
    spec = None
    if instance is not None:
        spec = INSTANCES.get(instance.removeprefix("ml.").split(".")[0])
        if spec is None:
            raise UserError(f"--instance {instance}: unknown instance; choose one of "
                            f"{_names(INSTANCES)}")
    gpu = gpu or (spec.gpu if spec else None)
    if gpu is None:
        raise UserError(f"give --gpu ({_names(GPUS)}) or --instance ({_names(INSTANCES)})")
    if gpu not in GPUS:
        raise UserError(f"--gpu {gpu}: unknown GPU; choose one of {_names(GPUS)}")
    if nodes < 1:
        raise UserError(f"--nodes {nodes}: give at least 1")
    if gpus_per_node is not None and gpus_per_node < 1:
        raise UserError(f"--gpus-per-node {gpus_per_node}: give at least 1")
    if network_gbps is not None and not network_gbps > 0:
        raise UserError(f"--network-gbps {network_gbps}: must be > 0")
    if cpus_per_gpu is not None and not cpus_per_gpu >= 1:
        raise UserError(f"--cpus-per-gpu {cpus_per_gpu}: give at least 1")
    if spec is None:  # the instance that carries this GPU sets the defaults
        spec = next(i for i in INSTANCES.values() if i.gpu == gpu)
    return Cluster(gpu=GPUS[gpu], nodes=nodes, gpus_per_node=gpus_per_node or spec.gpus,
                   network_gbps=network_gbps or spec.network_gbps,
                   network_source="--network-gbps" if network_gbps else spec.sagemaker,
                   cpus_per_gpu=cpus_per_gpu or spec.vcpus / spec.gpus,
                   cpus_source="--cpus-per-gpu" if cpus_per_gpu else
                   f"{spec.sagemaker}: {spec.vcpus} vCPUs, {spec.gpus} GPUs")


# ------------------------------------------------------------------------------ arithmetic
def optimizer_state_bytes(params: int, bytes_per_param: float, world_size: int = 1,
                          sharded: bool = False) -> float:
    """Optimizer state on one GPU: ``params × bytes_per_param``, split over the ranks with ZeRO.

    AdamW keeps two fp32 moments per parameter (8 bytes); ZeRO stage 1 (Rajbhandari et al.
    2020, §5.1) gives each of N ranks 1/N of it.

    Example:
        >>> optimizer_state_bytes(1_000_000, 8), optimizer_state_bytes(1_000_000, 8, 32, True)
        (8000000.0, 250000.0)
    """
    total = float(params * bytes_per_param)
    return total / world_size if sharded else total


def allreduce_bytes(nbytes: float, world_size: int) -> float:
    """Bytes each rank sends (and receives) in a ring all-reduce of ``nbytes``: 2·(N−1)/N ×.

    A reduce-scatter then an all-gather, each N−1 steps of nbytes/N (Patarasuk & Yuan 2009;
    NCCL's "bus bandwidth" uses the same factor).

    Example:
        >>> allreduce_bytes(100.0, 4), allreduce_bytes(100.0, 1)
        (150.0, 0.0)
    """
    return 2.0 * (world_size - 1) / world_size * nbytes


def usable_bytes(memory_bytes: float, margin: float = MEMORY_MARGIN,
                 reserve: float = CUDA_RESERVE_BYTES) -> float:
    """What tensors may use: the GPU's memory less ``margin`` of it and a fixed ``reserve``."""
    return memory_bytes * (1.0 - margin) - reserve


def largest_batch(budget: float, static: float, fixed: float, per_image: float) -> int:
    """The largest batch B with ``static + fixed + B × per_image <= budget`` (0: none fits).

    Example:
        >>> largest_batch(100.0, 30.0, 10.0, 7.0)
        8
    """
    if per_image <= 0:
        raise ValueError(f"activation bytes per image must be > 0, got {per_image}")
    return max(0, math.floor((budget - static - fixed) / per_image))


def compute_seconds(flops_per_image: float, images: int, peak_flops: float, mfu: float) -> float:
    """Time for ``images`` at ``mfu`` of ``peak_flops``.

    Example:
        >>> compute_seconds(1e12, 100, 1e14, 0.5)
        2.0
    """
    return flops_per_image * images / (peak_flops * mfu)


# ------------------------------------------------------------------------------ the plan
@dataclass(frozen=True)
class ModelMeasurement:
    """What :func:`measure_models` measured: sizes, bytes, FLOPs per image, activation memory."""

    student: str
    teacher: str | None  # None: no teacher in memory
    teacher_runs: bool  # the teacher's forward runs every step (not labels only, not cached)
    student_params: int
    trainable_params: int
    student_bytes: int  # parameters and buffers
    gradient_bytes: int
    teacher_params: int
    teacher_bytes: int
    optimizer: str
    optimizer_bytes_per_param: float
    activation_bytes_per_image: float
    activation_bytes_fixed: float
    activation_batches: tuple[int, ...]
    activation_peaks: tuple[int, ...]
    flops_teacher_forward: float  # per image
    flops_student_forward: float
    flops_backward: float
    precision: str  # autocast precision of the measurement (the plan's)
    device: str
    teacher_dtype: str = "float32"  # of the teacher's weights (teacher.dtype)
    ema_bytes: int = 0  # the student's EMA (train.ema_decay): a copy of its weights and buffers

    @property
    def flops_per_image(self) -> float:
        return self.flops_teacher_forward + self.flops_student_forward + self.flops_backward


@dataclass(frozen=True)
class TrainingSetup:
    """The config's choices that the plan depends on."""

    batch_size: int
    grad_accum_steps: int = 1
    precision: str = "bf16"
    strategy: str = "ddp"  # ddp | deepspeed
    zero: bool = False  # optimizer state sharded (optim.zero, or DeepSpeed)
    zero_stage: int = 1


def plan_precision(precision: str) -> str:
    """The precision a GPU run uses: ``auto`` is bf16 on every GPU in :data:`GPUS`."""
    return "bf16" if precision == "auto" else precision


def training_setup(cfg: KDConfig) -> TrainingSetup:
    """The :class:`TrainingSetup` of a loaded config."""
    deepspeed = cfg.dist.strategy == "deepspeed"
    return TrainingSetup(batch_size=int(cfg.data.batch_size),
                         grad_accum_steps=int(cfg.train.grad_accum_steps),
                         precision=plan_precision(cfg.train.precision),
                         strategy=str(cfg.dist.strategy), zero=bool(cfg.optim.zero) or deepspeed,
                         zero_stage=int(cfg.dist.zero_stage) if deepspeed else 1)


def deepspeed_buffer_bytes(trainable_params: int, world_size: int) -> dict[str, float]:
    """What DeepSpeed's ZeRO-1/2 optimizer allocates beyond weights, gradients and optimizer
    state, for kd's fp32 weights (deepspeed/runtime/zero/stage_1_and_2.py):

    - the reduce bucket: ``reduce_bucket_size`` fp32 elements, allocated whole at the first
      gradient (``setup_buckets``), as kd sizes it (:func:`kd.core.strategy.deepspeed_bucket_size`);
    - its fp32 copy of this rank's partition of the weights, made even when the weights are fp32
      already (``single_partition_of_fp32_groups``: a ``clone()`` of the partition).

    The all-gather bucket allocates nothing (see :func:`kd.core.strategy.deepspeed_bucket_size`).
    """
    bucket = deepspeed_bucket_size(trainable_params, world_size)
    return {"reduce_bucket": 4.0 * bucket,
            "fp32_partition": 4.0 * math.ceil(trainable_params / world_size)}


def memory_per_gpu(m: ModelMeasurement, setup: TrainingSetup, world_size: int, sharded: bool,
                   budget: float) -> dict[str, Any]:
    """One GPU's memory: static tensors, activations and the largest batch within ``budget``."""
    shard_grads = sharded and setup.strategy == "deepspeed" and setup.zero_stage >= 2
    rows: dict[str, float] = {
        "student_weights": float(m.student_bytes),
        "gradients": m.gradient_bytes / world_size if shard_grads else float(m.gradient_bytes),
        # No bucket copy: kd's DDP keeps gradients as views into its all-reduce buckets
        # (gradient_as_bucket_view=True, which "can reduce peak memory usage, where the saved
        # memory size will be equal to the total gradients size":
        # https://pytorch.org/docs/stable/generated/torch.nn.parallel.DistributedDataParallel.html)
        "optimizer_state": optimizer_state_bytes(m.trainable_params, m.optimizer_bytes_per_param,
                                                 world_size, sharded),
        "teacher_weights": float(m.teacher_bytes),
    }
    if m.ema_bytes:
        rows["ema_weights"] = float(m.ema_bytes)
    if setup.strategy == "deepspeed":
        # Only DeepSpeed's column: the one without ZeRO is what DDP would hold.
        rows["deepspeed_buffers"] = sum(deepspeed_buffer_bytes(
            m.trainable_params, world_size).values()) if sharded else 0.0
    static = sum(rows.values())
    per_image, fixed = m.activation_bytes_per_image, m.activation_bytes_fixed
    needed = static + fixed + setup.batch_size * per_image
    return {**rows, "static": static, "activations_fixed": fixed,
            "activations_per_image": per_image, "usable": budget,
            "largest_batch": largest_batch(budget, static, fixed, per_image),
            "batch_size": setup.batch_size, "needed_at_batch": needed,
            "fits_at_batch": needed <= budget}


def step_time(m: ModelMeasurement, setup: TrainingSetup, cluster: Cluster, batch: int,
              mfu: float, peak: float) -> dict[str, Any]:
    """One optimizer step at ``batch`` images per GPU: compute, gradient sync, images/s."""
    world = cluster.world_size
    images = batch * setup.grad_accum_steps
    compute = compute_seconds(m.flops_per_image, images, peak, mfu)
    grads = allreduce_bytes(m.gradient_bytes, world)
    # ZeroRedundancyOptimizer broadcasts each rank's updated shard: (N−1)/N of the weights.
    # DeepSpeed's reduce-scatter + all-gather move the same bytes as the all-reduce.
    params = (world - 1) / world * m.student_bytes if setup.zero and \
        setup.strategy == "ddp" else 0.0
    bandwidth, link = cluster.ring_link()
    comm = (grads + params) / bandwidth
    step, overlapped = compute + comm, max(compute, comm)
    return {"batch": batch, "images_per_step": images * world,
            "flops_per_gpu": m.flops_per_image * images, "compute_s": compute,
            "allreduce_bytes": grads, "zero_broadcast_bytes": params,
            "link": link, "link_bytes_s": bandwidth, "comm_s": comm, "step_s": step,
            "step_s_overlapped": overlapped, "images_per_s": images * world / step,
            "images_per_s_overlapped": images * world / overlapped}


def build_plan(m: ModelMeasurement, cluster: Cluster, setup: TrainingSetup,
               mfu: float = DEFAULT_MFU, rates: InputRates | None = None) -> dict[str, Any]:
    """The plan: memory per GPU without and with ZeRO, step time, assumptions (plain data).

    Raises:
        UserError: ``mfu`` outside (0, 1].
    """
    if not 0 < mfu <= 1:
        raise UserError(f"--mfu {mfu}: a fraction of the peak in (0, 1]")
    world, gpu = cluster.world_size, cluster.gpu
    matmul = matmul_precision(setup.precision, torch.device("cuda"))
    peak = gpu.peak_flops(matmul)
    budget = usable_bytes(gpu.memory_bytes)
    memory = {"without_zero": memory_per_gpu(m, setup, world, False, budget),
              "with_zero": memory_per_gpu(m, setup, world, True, budget)}
    column = "with_zero" if setup.zero and world > 1 else "without_zero"
    chosen = memory[column]
    times = {"at_batch_size": step_time(m, setup, cluster, setup.batch_size, mfu, peak)}
    if chosen["largest_batch"] > 0:
        times["at_largest_batch"] = step_time(m, setup, cluster, chosen["largest_batch"], mfu,
                                              peak)
    zero_label = f"ZeRO-{setup.zero_stage}" if setup.strategy == "deepspeed" else "ZeRO-1"
    extra = {}
    if setup.strategy == "deepspeed":
        extra = {"deepspeed_bucket_elements": deepspeed_bucket_size(m.trainable_params, world),
                 "deepspeed_buffers": deepspeed_buffer_bytes(m.trainable_params, world)}
    return {
        "setup": {**dataclasses.asdict(setup), "matmul_precision": matmul,
                  "zero_label": zero_label, "memory_column": column, **extra},
        "cluster": {"gpu": gpu.key, "gpu_name": gpu.device_name,
                    "memory_bytes": gpu.memory_bytes, "nodes": cluster.nodes,
                    "gpus_per_node": cluster.gpus_per_node, "world_size": world,
                    "network_gbps": cluster.network_gbps,
                    "network_source": cluster.network_source, "nvlink_gb_s": gpu.nvlink_gb_s,
                    "peak_flops": peak, "mfu": mfu},
        "measured": {**dataclasses.asdict(m), "flops_per_image": m.flops_per_image},
        "memory": memory,
        "time": times,
        "input": input_limit(m, setup, cluster, peak, mfu, rates or InputRates(
            DEFAULT_CORE_RATES["cpu"], DEFAULT_CORE_RATES["device"], "kd's defaults")),
        "assumptions": assumptions(m, cluster, setup, matmul, peak, mfu),
    }


@dataclass(frozen=True)
class InputRates:
    """Loader images/s per core for the config's recipe: with decoding in the loader, and the
    loader's share with ``data.decode: device`` (None where it does not apply)."""

    cpu: float
    device: float | None
    source: str  # where the numbers come from


def measure_input_rates(cfg: KDConfig, samples: int = 32) -> InputRates:
    """Per-core loader rates measured on the config's training data here, or
    :data:`DEFAULT_CORE_RATES` (saying why) when the data cannot be read."""
    try:
        data = RunData(cfg.data, cfg.student.channels, cfg.seed)
        cpu = pipeline_rate(data.train_set, samples, cfg.seed)
        device = None
        if cfg.data.name in IMAGE_DATASETS and cfg.data.pipeline == "kd":
            variant = derive(cfg, {"data.decode": "device"}, "kd plan (data.decode=device)")
            device_data = RunData(variant.data, cfg.student.channels, cfg.seed)
            device = pipeline_rate(device_data.train_set, samples, cfg.seed)
    except (UserError, OSError) as e:
        reason = str(e).splitlines()[0][:160]
        return InputRates(DEFAULT_CORE_RATES["cpu"], DEFAULT_CORE_RATES["device"],
                          f"kd's defaults for the DeiT recipe on ImageNet-like JPEGs (the "
                          f"training data is not readable here: {reason})")
    return InputRates(cpu, device, f"measured here on {min(samples, len(data.train_set))} "
                      f"training samples of data.name={cfg.data.name}, one core each")


def input_limit(m: ModelMeasurement, setup: TrainingSetup, cluster: Cluster, peak: float,
                mfu: float, rates: InputRates) -> dict[str, Any]:
    """What one GPU consumes at the planned step time, the loader cores that takes, and the
    share of the time the GPU is busy with the cores it has: with the live teacher and with a
    teacher-output cache (no teacher forward), decoding in the loader or on the device."""
    usable = None if cluster.cpus_per_gpu is None else max(cluster.cpus_per_gpu - 1, 0.0)
    rows = []
    variants = [("live teacher" if m.teacher_runs else "as configured", m)]
    if m.teacher_runs:
        variants.append(("teacher cache", dataclasses.replace(m, flops_teacher_forward=0.0)))
    for teacher, measured in variants:
        t = step_time(measured, setup, cluster, setup.batch_size, mfu, peak)
        demand = t["images_per_s_overlapped"] / cluster.world_size
        for decode, rate in (("cpu", rates.cpu), ("device", rates.device)):
            if rate is None:
                continue
            supply = None if usable is None else usable * rate
            rows.append({"teacher": teacher, "decode": decode, "gpu_images_per_s": demand,
                         "core_rate": rate, "cores_needed": demand / rate,
                         "cores_available": usable,
                         "gpu_busy": None if supply is None else min(1.0, supply / demand)})
    return {"rows": rows, "cpus_per_gpu": cluster.cpus_per_gpu,
            "cpus_source": cluster.cpus_source, "rate_source": rates.source}


def assumptions(m: ModelMeasurement, cluster: Cluster, setup: TrainingSetup, matmul: str,
                peak: float, mfu: float) -> list[str]:
    """What the plan assumes, in words, for the printout and the JSON."""
    world = cluster.world_size
    out = [
        f"precision {setup.precision}: "
        + ("autocast keeps weights, gradients and optimizer state in fp32 (no separate master "
           "copy); the low-precision weight casts live only during a step and are in the fixed "
           "activation overhead" if setup.precision in DTYPES else
           "everything in fp32"),
        f"compute: {mfu:.0%} of the {cluster.gpu.key}'s dense {matmul} peak "
        f"({peak / 1e12:,.4g} TFLOP/s) for the FLOPs torch.utils.flop_counter counts (matrix "
        f"products, attention, convolutions); narrow models such as ViT-Ti reach less: `kd "
        f"profile` measures the real fraction, pass it as --mfu",
        f"optimizer {m.optimizer}: {m.optimizer_bytes_per_param:.2f} bytes of state per "
        f"trainable parameter, measured after one step",
    ]
    if m.teacher is None:
        out.append("no teacher in memory (labels only, or logits from distill.teacher_cache)")
    else:
        out.append(f"teacher: a frozen replica on every GPU with {m.teacher_dtype} weights "
                   f"(teacher.dtype), forward only, no gradients"
                   + ("" if m.teacher_runs else "; it does not run in training"))
    out += [
        f"activations: the peak of live tensor bytes during one training step, measured on "
        f"{m.device} with {m.precision} autocast at batches "
        f"{' and '.join(map(str, m.activation_batches))} (slope per image, intercept fixed); "
        f"GPU kernels may keep a little less",
        f"largest batch: {MEMORY_MARGIN:.0%} of the GPU's memory kept free for the allocator's "
        f"fragmentation, plus {CUDA_RESERVE_BYTES / GiB:.0f} GiB for the CUDA context, "
        f"cuBLAS workspaces and NCCL buffers",
    ]
    if setup.strategy == "ddp" and world > 1:
        out.append("DDP: the gradients are views into its all-reduce buckets (kd sets "
                   "gradient_as_bucket_view=True), so there is no second gradient-sized copy")
    if world > 1:
        out.append(f"ZeRO: optimizer state split evenly over {world} ranks "
                   "(ZeroRedundancyOptimizer assigns whole tensors, so ranks differ a little)"
                   + (f"; ZeRO-{setup.zero_stage} with DeepSpeed"
                      + (" splits the gradients too" if setup.zero_stage >= 2 else "")
                      + f"; DeepSpeed's buffers counted: its reduce bucket, "
                      f"{deepspeed_bucket_size(m.trainable_params, world):,} fp32 elements as "
                      f"kd sizes it (the student's gradients over the ranks, at least 25 MiB, "
                      f"at most all of them), and its fp32 copy of this rank's share of the "
                      f"weights"
                      if setup.strategy == "deepspeed" else ""))
        out.append(f"gradient sync: ring all-reduce, 2·(N−1)/N × fp32 gradient bytes per "
                   f"optimizer step at the full rate of the {cluster.ring_link()[1]} "
                   f"({cluster.network_source if cluster.nodes > 1 else cluster.gpu.key}); "
                   f"real rings reach less")
        out.append("step time: compute plus gradient sync (DDP overlaps the all-reduce with "
                   "the backward pass, so a real step lies between the 'overlapped' and the "
                   "plain figure)")
    out.append("data loading keeps up in the step times above; the input-pipeline table says "
               "whether the loader cores a GPU has can (`kd tune-loader` measures the loader)")
    return out


# ------------------------------------------------------------------------------ measurement
class LiveTensorBytes(TorchDispatchMode):
    """The peak bytes of tensor storages created while the mode is active and still alive.

    Every operator's outputs pass through :meth:`__torch_dispatch__`. A storage not seen before
    is counted until it is freed (a weak reference's callback); storages that existed before
    (``exclude``: parameters, buffers, gradients) never are. PyTorch's own ``MemTracker``
    (``torch.distributed._tools.mem_tracker``) counts memory the same way; this is the minimal
    form, and works on any device, CPU included, where no allocator statistics exist.

    Example:
        >>> with LiveTensorBytes() as live:
        ...     y = torch.ones(256) * 2  # two 1 KiB storages, the first freed at once
        >>> live.peak
        2048
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self._exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self._alive: dict[int, weakref.ref] = {}
        self._lock = threading.Lock()  # CUDA's backward runs in the autograd engine's thread
        self.live = 0
        self.peak = 0

    def _release(self, key: int, nbytes: int, _ref: weakref.ref) -> None:
        with self._lock:
            self._alive.pop(key, None)
            self.live -= nbytes

    def _track(self, t: torch.Tensor) -> None:
        try:
            storage = t.untyped_storage()
        except (NotImplementedError, RuntimeError):  # sparse, nested, ...: no plain storage
            return
        key, nbytes = id(storage), storage.nbytes()
        with self._lock:
            if not nbytes or key in self._alive or storage.data_ptr() in self._exclude:
                return
            self._alive[key] = weakref.ref(storage, functools.partial(self._release, key, nbytes))
            self.live += nbytes
            self.peak = max(self.peak, self.live)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        stack = [out]
        while stack:
            item = stack.pop()
            if isinstance(item, torch.Tensor):
                self._track(item)
            elif isinstance(item, (tuple, list)):
                stack.extend(item)
        return out


def data_channels(cfg: KDConfig) -> int:
    """The channels of the configured dataset's images, without reading it: digits are grey,
    the image datasets decode to RGB, and synthetic images take the student's ``in_chans``."""
    if cfg.data.name == "digits":
        return DigitsDataset.channels
    if cfg.data.name == "synthetic":
        return cfg.student.channels
    return 3


@dataclass
class PlanModels:
    """The config's student, teacher and task, built as the trainer builds them."""

    student: torch.nn.Module
    student_norm: torch.nn.Module
    teacher: TeacherSet | None
    task: Any  # kd.core.task.DistillationTask
    cached: bool  # teacher logits come from distill.teacher_cache


def build_models(cfg: KDConfig, device: torch.device) -> PlanModels:
    """Student, teacher and task as the trainer builds them, but with random weights.

    The student is built without ``student.pretrained`` and the teacher without reading
    ``teacher.checkpoint``: memory and FLOPs depend on the architecture only, and a plan must
    not need the weights (or the network) on the machine that makes it.
    """
    torch.manual_seed(cfg.seed)
    data = cfg.data
    classes = data.num_classes
    # The architecture is what matters: nothing downloaded.
    student = build_student(dataclasses.replace(cfg.student, pretrained=False), classes)
    student_norm = build_input_norm(student, cfg.student.mean, cfg.student.std, "student")
    # The plan never reads the data: a random image of the data's shape takes the check that
    # training makes before its first step.
    image = torch.randint(0, 256, (1, data_channels(cfg), data.image_size, data.image_size),
                          dtype=torch.uint8)
    check_model_input(student, student_norm, image, section="student", name=cfg.student.name,
                      image_size=data.image_size, grey_to_rgb=data.grey_to_rgb)
    cached = bool(cfg.distill.teacher_cache)
    teacher = None
    if not cached and (cfg.distill.loss != "none" or cfg.distill.features or cfg.teachers
                       or cfg.teacher.checkpoint or cfg.teacher.pretrained):
        members = []
        sections = teacher_sections(cfg)
        for i, section in enumerate(sections):
            # What build_teacher builds, without reading a checkpoint or downloading weights.
            kwargs = dict(section.kwargs)
            model = create_timm_model(section.name, teacher_key(cfg, i),
                                      num_classes=kwargs.pop("num_classes", classes), **kwargs)
            norm = build_input_norm(model, section.mean, section.std, teacher_key(cfg, i))
            members.append(FrozenTeacher(model, norm))
        teacher = TeacherSet.from_sections(members, sections)
        check_teacher_inputs(cfg, teacher, image)
        teacher = teacher.to(device)
        # Held as training holds them: bf16 weights under bf16 autocast (dtype=auto).
        hold_as_trained(cfg, teacher, plan_precision(cfg.train.precision))
    student = student.to(device).train()
    student_norm = student_norm.to(device)
    features = None
    if cfg.distill.features and teacher is not None:  # the projectors train with the student
        probe = image.to(device)
        features = FeatureDistiller(cfg.distill.features, cfg.distill.projector, student,
                                    [t.model for t in teacher], student_norm(probe),
                                    teacher.inputs(probe), (cfg.student.name, teacher.names))
        student = features.student_module(student).to(device)
    task = DistillationTask(student, student_norm, teacher, cfg.distill,
                            cfg.train.label_smoothing, cached_teacher=cached, features=features)
    return PlanModels(student, student_norm, teacher, task, cached)


def activation_peak(built: PlanModels, cfg: KDConfig, batch: int, device: torch.device,
                    precision: str) -> int:
    """Peak bytes of tensors alive during one training step at ``batch`` (beyond the weights).

    The step is the trainer's: a uint8 batch arrives, is normalised, the teacher runs, the
    student runs, the loss terms are computed under autocast, and the loss is backpropagated.
    Gradients exist beforehand (they are static memory, counted separately).
    """
    student, teacher, task = built.student, built.teacher, built.task
    for p in student.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)
    before = [*student.parameters(), *student.buffers(), *built.student_norm.buffers(),
              *(p.grad for p in student.parameters() if p.grad is not None)]
    if teacher is not None:
        before += [*teacher.parameters(), *teacher.buffers()]
    channels = data_channels(cfg)
    side, classes = cfg.data.image_size, cfg.data.num_classes
    with LiveTensorBytes(exclude=before) as live:
        images = torch.randint(0, 256, (batch, channels, side, side), dtype=torch.uint8,
                               device=device)
        targets = torch.randint(0, classes, (batch,), device=device)
        x_student, x_teacher = task.prepare(images)
        with autocast(device, precision):
            teacher_logits = task.teacher_forward(x_teacher)
            if built.cached and task.uses_teacher:  # logits rebuilt from the cache's top-K
                teacher_logits = torch.randn(batch, classes, device=device)
            terms = task.loss(task.student_forward(x_student), teacher_logits, targets, 1.0)
        terms["loss"].backward()
        del images, targets, x_student, x_teacher, teacher_logits, terms
    return live.peak


def _optimizer_bytes_per_param(student: torch.nn.Module, cfg: OptimConfig) -> float:
    """Bytes of optimizer state per trainable parameter, after one step of the configured one."""
    trainable = [p for p in student.parameters() if p.requires_grad]
    optimizer = build_optimizer(student, cfg)
    for p in trainable:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    optimizer.step()  # optimizers create their state lazily, at the first step
    return state_bytes(optimizer) / max(1, sum(p.numel() for p in trainable))


def measure_models(cfg: KDConfig, device: torch.device | None = None,
                   batches: tuple[int, int] = MEASURE_BATCHES) -> ModelMeasurement:
    """Build the config's models (random weights) and measure what a plan needs, on ``device``.

    Args:
        cfg: a loaded config (:func:`kd.config.load_config`).
        device: where to run the measurement step; default: CUDA when present, else CPU.
        batches: two batch sizes for the activation memory (slope and intercept).

    Returns:
        Parameter counts and bytes, optimizer state per parameter, activation bytes per image
        and fixed, FLOPs per image.
    """
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() and
                              cfg.train.device != "cpu" else "cpu")
    precision = plan_precision(cfg.train.precision)
    built = build_models(cfg, device)
    student, teacher = built.student, built.teacher
    core = student.student if isinstance(student, FeatureStudent) else student
    trainable = [p for p in student.parameters() if p.requires_grad]
    peaks = tuple(activation_peak(built, cfg, b, device, precision) for b in batches)
    (b1, b2), (p1, p2) = batches, peaks
    per_image = max(1.0, (p2 - p1) / (b2 - b1))  # > 0 even if a tiny model's peak is flat
    fixed = max(0.0, p1 - b1 * per_image)
    # One image stands for the batch (FLOPs depend on shapes only).
    side = cfg.data.image_size
    image = torch.zeros(1, cfg.student.channels, side, side, dtype=torch.uint8, device=device)
    with torch.no_grad():
        inputs = built.task.prepare(image)
    flops = count_flops_safely(student, teacher, *inputs)
    bytes_per_param = _optimizer_bytes_per_param(student, cfg.optim)
    teacher_tensors = [*teacher.parameters(), *teacher.buffers()] if teacher is not None else []
    return ModelMeasurement(
        student=cfg.student.name,
        teacher=", ".join(teacher.names) if teacher is not None else None,
        teacher_runs=teacher is not None and built.task.uses_teacher,
        student_params=sum(p.numel() for p in student.parameters()),
        trainable_params=sum(p.numel() for p in trainable),
        student_bytes=tensor_bytes([*student.parameters(), *student.buffers()]),
        gradient_bytes=tensor_bytes(trainable),
        teacher_params=sum(p.numel() for p in teacher.parameters()) if teacher else 0,
        teacher_bytes=tensor_bytes(teacher_tensors),
        teacher_dtype=", ".join(sorted({str(t.dtype).removeprefix("torch.") for t in teacher}))
        if teacher else "float32",
        optimizer=str(cfg.optim.name),
        optimizer_bytes_per_param=bytes_per_param,
        activation_bytes_per_image=per_image,
        activation_bytes_fixed=fixed,
        activation_batches=tuple(batches),
        activation_peaks=peaks,
        flops_teacher_forward=float(flops.teacher_forward / flops.images),
        flops_student_forward=float(flops.student_forward / flops.images),
        flops_backward=float(flops.backward / flops.images),
        precision=precision,
        device=device.type,
        ema_bytes=tensor_bytes([*core.parameters(), *core.buffers()])
        if cfg.train.ema_decay is not None else 0,
    )


def run_plan(cfg: KDConfig, cluster: Cluster, mfu: float = DEFAULT_MFU) -> dict[str, Any]:
    """Measure the config's models here and plan the job on ``cluster``.

    Example:
        >>> from kd.config import DEMO_PRESET, load_config
        >>> plan = run_plan(load_config(DEMO_PRESET), resolve_cluster("h100", nodes=2))
        >>> plan["cluster"]["world_size"]
        16
    """
    if not 0 < mfu <= 1:  # before measuring
        raise UserError(f"--mfu {mfu}: a fraction of the peak in (0, 1]")
    return build_plan(measure_models(cfg), cluster, training_setup(cfg), mfu,
                      measure_input_rates(cfg))


# ------------------------------------------------------------------------------ output
def _batch(n: int) -> str:
    return "none fits" if n <= 0 else f"{n:,}"


def print_plan(plan: dict[str, Any], console: Any = None) -> None:
    """The plan as rich tables: memory per GPU, time per step, then the assumptions."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=100)
    s, c, m = plan["setup"], plan["cluster"], plan["measured"]
    teacher = f"{m['teacher']} → " if m["teacher"] else ""
    width = console.width

    def say(text: str, indent: str = "", first: str = "") -> None:
        console.print(textwrap.fill(text, width, initial_indent=first or indent,
                                    subsequent_indent=indent), highlight=False, soft_wrap=True)

    say(f"kd plan: {teacher}{m['student']}, {s['precision']}, {c['nodes']} node(s) × "
        f"{c['gpus_per_node']} {c['gpu']} ({c['gpu_name']}, {format_bytes(c['memory_bytes'])})"
        f" = {c['world_size']} GPUs; network {c['network_gbps']:,.0f} Gbps "
        f"({c['network_source']})")

    zero = s["zero_label"]
    table = Table(title="memory per GPU")
    table.add_column("item")
    for key, title in (("without_zero", "without ZeRO"), ("with_zero", zero)):
        mark = " (config)" if key == s["memory_column"] else ""
        table.add_column(f"{title}{mark}", justify="right")
    table.add_column("note")
    w, z = plan["memory"]["without_zero"], plan["memory"]["with_zero"]
    bpp = m["optimizer_bytes_per_param"]
    rows = [
        ("student weights", "student_weights", f"{m['student_params'] / 1e6:,.2f} M params, fp32"),
        ("gradients", "gradients", f"fp32, {m['trainable_params'] / 1e6:,.2f} M trainable"),
        ("optimizer state", "optimizer_state", f"{m['optimizer']}: {bpp:.2f} B/param"
         + (f" ({bpp / 4:.3g} fp32 tensors)" if bpp else "")),
        ("teacher weights", "teacher_weights",
         f"{m['teacher_params'] / 1e6:,.2f} M params, "
         f"{DTYPE_NAMES.get(m['teacher_dtype'], m['teacher_dtype'])}, frozen" if m["teacher"]
         else "no teacher in memory"),
    ]
    if "ema_weights" in w:
        rows.append(("student EMA", "ema_weights", "train.ema_decay: fp32 copy, every rank"))
    if "deepspeed_buffers" in w:
        ds = s["deepspeed_buffers"]
        rows.append(("DeepSpeed buffers", "deepspeed_buffers",
                     f"reduce bucket {format_bytes(ds['reduce_bucket'])} + fp32 weight "
                     f"partition {format_bytes(ds['fp32_partition'])}"))
    rows.append(("static total", "static", ""))
    for label, key, note in rows:
        table.add_row(label, format_bytes(w[key]), format_bytes(z[key]), note)
    table.add_row("activations per image", format_bytes(w["activations_per_image"]),
                  format_bytes(z["activations_per_image"]),
                  f"measured on {m['device']}, {m['precision']} autocast")
    table.add_row("activations, fixed", format_bytes(w["activations_fixed"]),
                  format_bytes(z["activations_fixed"]), "independent of the batch")
    table.add_row("usable memory", format_bytes(w["usable"]), format_bytes(z["usable"]),
                  f"{MEMORY_MARGIN:.0%} margin and {format_bytes(CUDA_RESERVE_BYTES)} "
                  f"CUDA/NCCL reserve off")
    table.add_row(f"needed at batch {w['batch_size']:,}", format_bytes(w["needed_at_batch"]),
                  format_bytes(z["needed_at_batch"]),
                  "fits" if plan["memory"][s["memory_column"]]["fits_at_batch"]
                  else "does NOT fit (config)")
    table.add_row("largest batch per GPU", _batch(w["largest_batch"]),
                  _batch(z["largest_batch"]), "")
    console.print(table)

    table = Table(title=f"time per optimizer step ({'ZeRO' if s['zero'] else 'no ZeRO'}, as "
                        f"configured; {plan['cluster']['mfu']:.0%} of the "
                        f"{c['peak_flops'] / 1e12:,.4g} TFLOP/s {s['matmul_precision']} peak)")
    table.add_column("")
    times = plan["time"]
    titles = {"at_batch_size": "data.batch_size", "at_largest_batch": "largest batch"}
    for key in times:
        table.add_column(f"{titles[key]} ({times[key]['batch']:,} per GPU)", justify="right")
    sync = "gradient all-reduce" + (" + ZeRO broadcast" if s["zero"] and
                                    s["strategy"] == "ddp" else "")
    rows = [("images per step (all GPUs)", lambda t: f"{t['images_per_step']:,}"),
            ("FLOPs per GPU", lambda t: format_flops(t["flops_per_gpu"])),
            ("compute", lambda t: format_duration(t["compute_s"])),
            (sync, lambda t: f"{format_duration(t['comm_s'])} for "
                             f"{format_bytes(t['allreduce_bytes'] + t['zero_broadcast_bytes'])}"),
            ("step", lambda t: format_duration(t["step_s"])),
            ("step, overlapped", lambda t: format_duration(t["step_s_overlapped"])),
            ("images/s (all GPUs)", lambda t: f"{t['images_per_s']:,.0f}"),
            ("images/s, overlapped", lambda t: f"{t['images_per_s_overlapped']:,.0f}")]
    for label, cell in rows:
        table.add_row(label, *[cell(t) for t in times.values()])
    console.print(table)
    print_input(plan["input"], console)
    say(f"FLOPs per image: teacher forward {m['flops_teacher_forward'] / 1e9:,.3g} + student "
        f"forward {m['flops_student_forward'] / 1e9:,.3g} + backward "
        f"{m['flops_backward'] / 1e9:,.3g} = {m['flops_per_image'] / 1e9:,.3g} GFLOP; gradient "
        f"sync over the {next(iter(times.values()))['link']}")
    say("assumptions:")
    for line in plan["assumptions"]:
        say(line, indent="    ", first="  - ")


def print_input(section: dict[str, Any], console: Any) -> None:
    """The input-pipeline table: images/s one GPU takes, loader cores, GPU busy."""
    from rich.table import Table

    cpus = section["cpus_per_gpu"]
    table = Table(title=f"input pipeline per GPU at data.batch_size ({cpus:,.4g} vCPUs per GPU, "
                        f"{section['cpus_source']}; one kept for the training process)"
                  if cpus is not None else "input pipeline per GPU at data.batch_size")
    for name in ("teacher", "data.decode", "GPU takes (images/s)", "per loader core",
                 "loader cores needed", "GPU busy"):
        table.add_column(name, justify="left" if name in ("teacher", "data.decode") else "right")
    for r in section["rows"]:
        busy = "unknown" if r["gpu_busy"] is None else format_percent(r["gpu_busy"])
        table.add_row(r["teacher"], r["decode"], f"{r['gpu_images_per_s']:,.0f}",
                      f"{r['core_rate']:,.0f}", f"{r['cores_needed']:,.1f}", busy)
    console.print(table)
    console.print(f"per-core rates: {section['rate_source']}; with data.decode=device the GPU "
                  f"also decodes and augments (not in the step time above: "
                  f"benchmarks/gpu_check.sh measures it)", highlight=False, soft_wrap=True)


def write_json(plan: dict[str, Any], path: str | Path) -> None:
    """The plan's numbers and assumptions as JSON (``--json``)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(plan, indent=2) + "\n")
    except OSError as e:
        raise output_error(f"--json {path}: cannot write it", e, setting="--json") from None

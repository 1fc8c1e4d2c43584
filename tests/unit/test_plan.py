"""``kd plan``'s arithmetic against hand-computed cases, its hardware tables, and its measured
activation memory against an independent measurement (saved tensors) at a batch it did not run."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from kd.config import load_config
from kd.errors import UserError
from kd.tools.plan import (
    CUDA_RESERVE_BYTES,
    GPUS,
    INSTANCES,
    GiB,
    LiveTensorBytes,
    ModelMeasurement,
    PlanModels,
    TrainingSetup,
    activation_peak,
    allreduce_bytes,
    build_models,
    build_plan,
    compute_seconds,
    largest_batch,
    measure_models,
    optimizer_state_bytes,
    resolve_cluster,
    usable_bytes,
)
from tests.conftest import TINY

VIT_TI = 5_717_416  # vit_tiny_patch16_224 parameters (1000 classes)
# configs/tiny.yaml with a 4-layer student on 32-pixel images (64 tokens): small and quick, yet
# activations dominate its step's memory.
SMALL = ["data.image_size=32", "data.num_classes=10", "student.kwargs.img_size=32",
         "student.kwargs.patch_size=4", "student.kwargs.embed_dim=64", "student.kwargs.depth=4",
         "teacher.kwargs.img_size=32", "teacher.kwargs.patch_size=4"]


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------ arithmetic
def test_adamw_state_with_and_without_zero() -> None:
    # AdamW: exp_avg and exp_avg_sq, 2 fp32 tensors = 8 bytes per parameter.
    assert optimizer_state_bytes(VIT_TI, 8) == 8 * VIT_TI == 45_739_328
    assert optimizer_state_bytes(VIT_TI, 8, world_size=32, sharded=True) == 8 * VIT_TI / 32
    assert optimizer_state_bytes(VIT_TI, 8, world_size=32, sharded=False) == 8 * VIT_TI


def test_allreduce_volume() -> None:
    grads = 4 * VIT_TI  # fp32 gradients
    assert allreduce_bytes(grads, 32) == pytest.approx(2 * 31 / 32 * grads)
    assert allreduce_bytes(grads, 32) == pytest.approx(44_309_937.5)
    assert allreduce_bytes(grads, 2) == grads  # two ranks: each sends half, twice
    assert allreduce_bytes(grads, 1) == 0


def test_largest_batch_for_a_budget() -> None:
    # 40 GiB less 10 % less 1 GiB = 35 GiB usable.
    budget = usable_bytes(40 * GiB)
    assert budget == pytest.approx(35 * GiB)
    # 3 GiB static, 1 GiB fixed activations, 100 MiB per image: (35 - 4) GiB / 100 MiB = 317.4
    assert largest_batch(budget, 3 * GiB, 1 * GiB, 100 * 1024**2) == 317
    assert largest_batch(budget, 34 * GiB, 1 * GiB, 1.0) == 0  # exactly full
    assert largest_batch(budget, 36 * GiB, 0.0, 1.0) == 0  # the weights alone do not fit
    with pytest.raises(ValueError):
        largest_batch(budget, 0.0, 0.0, 0.0)


def test_compute_seconds() -> None:
    # 16.7 GFLOP per image, 128 images at 40 % of 312 TFLOP/s.
    assert compute_seconds(16.7e9, 128, 312e12, 0.4) == pytest.approx(16.7e9 * 128 / 124.8e12)


def measurement(params: int = 1_000_000, per_image: float = 10 * 1024**2,
                fixed: float = 0.0) -> ModelMeasurement:
    """A hand-made measurement: a student of ``params`` fp32 parameters, a 4× teacher."""
    return ModelMeasurement(
        student="s", teacher="t", teacher_runs=True, student_params=params,
        trainable_params=params, student_bytes=4 * params, gradient_bytes=4 * params,
        teacher_params=4 * params, teacher_bytes=16 * params, optimizer="adamw",
        optimizer_bytes_per_param=8.0, activation_bytes_per_image=per_image,
        activation_bytes_fixed=fixed, activation_batches=(2, 4), activation_peaks=(0, 0),
        flops_teacher_forward=4e9, flops_student_forward=1e9, flops_backward=2e9,
        precision="bf16", device="cpu")


def test_plan_by_hand() -> None:
    p = 1_000_000
    cluster = resolve_cluster("a100-40gb", nodes=4)  # 32 GPUs, 400 Gbps (p4d)
    plan = build_plan(measurement(p), cluster, TrainingSetup(batch_size=64), mfu=0.5)
    plain, zero = plan["memory"]["without_zero"], plan["memory"]["with_zero"]
    assert plain["student_weights"] == zero["student_weights"] == 4 * p
    assert plain["gradients"] == zero["gradients"] == 4 * p  # ZeRO-1 keeps full gradients
    assert "ddp_buckets" not in plain  # gradients are views into DDP's buckets
    assert plain["optimizer_state"] == 8 * p and zero["optimizer_state"] == 8 * p / 32
    assert plain["teacher_weights"] == 16 * p
    assert plain["static"] == (4 + 4 + 8 + 16) * p
    budget = GPUS["a100-40gb"].memory_bytes * 0.9 - CUDA_RESERVE_BYTES
    assert plain["usable"] == pytest.approx(budget)
    assert plain["largest_batch"] == math.floor((budget - 32 * p) / (10 * 1024**2))
    assert zero["largest_batch"] == math.floor((budget - (24 + 8 / 32) * p) / (10 * 1024**2))
    assert plain["needed_at_batch"] == 32 * p + 64 * 10 * 1024**2 and plain["fits_at_batch"]
    assert plan["setup"]["memory_column"] == "without_zero"  # optim.zero is off

    t = plan["time"]["at_batch_size"]
    assert t["images_per_step"] == 64 * 32
    assert t["compute_s"] == pytest.approx(7e9 * 64 / (312e12 * 0.5))
    assert t["allreduce_bytes"] == pytest.approx(2 * 31 / 32 * 4 * p)
    assert t["comm_s"] == pytest.approx(2 * 31 / 32 * 4 * p / 50e9)  # 400 Gbps = 50 GB/s
    assert t["step_s"] == pytest.approx(t["compute_s"] + t["comm_s"])
    assert t["images_per_s"] == pytest.approx(64 * 32 / t["step_s"])
    assert plan["time"]["at_largest_batch"]["batch"] == plain["largest_batch"]
    assert any("bf16" in line for line in plan["assumptions"])


def test_input_limit_by_hand() -> None:
    """What a GPU takes at the planned step, the loader cores that needs at the per-core rates,
    and the GPU-busy share the instance's vCPUs allow (one kept for the training process)."""
    from kd.tools.plan import InputRates

    cluster = resolve_cluster(instance="p4d")  # 96 vCPUs for 8 GPUs: 12 per GPU
    assert cluster.cpus_per_gpu == 12 and "96 vCPUs" in cluster.cpus_source
    plan = build_plan(measurement(), cluster, TrainingSetup(batch_size=64), mfu=0.4,
                      rates=InputRates(300.0, 3000.0, "test"))
    rows = {(r["teacher"], r["decode"]): r for r in plan["input"]["rows"]}
    assert set(rows) == {("live teacher", "cpu"), ("live teacher", "device"),
                         ("teacher cache", "cpu"), ("teacher cache", "device")}
    live = plan["time"]["at_batch_size"]["images_per_s_overlapped"] / 8
    assert rows["live teacher", "cpu"]["gpu_images_per_s"] == pytest.approx(live)
    assert rows["live teacher", "cpu"]["cores_needed"] == pytest.approx(live / 300)
    assert rows["live teacher", "cpu"]["gpu_busy"] == pytest.approx(min(1, 11 * 300 / live))
    assert rows["live teacher", "device"]["gpu_busy"] == pytest.approx(min(1, 11 * 3000 / live))
    # Without the teacher's forward (4 of 7 GFLOP) a step is faster and takes more images.
    cached = rows["teacher cache", "cpu"]["gpu_images_per_s"]
    assert cached == pytest.approx(live * 7 / 3, rel=0.05)
    assert rows["teacher cache", "cpu"]["gpu_busy"] < rows["live teacher", "cpu"]["gpu_busy"]
    assert resolve_cluster("h100", cpus_per_gpu=6).cpus_per_gpu == 6


def test_zero_and_deepspeed_columns() -> None:
    p, cluster = 1_000_000, resolve_cluster("h100", nodes=1, gpus_per_node=8)
    zero1 = build_plan(measurement(p), cluster, TrainingSetup(batch_size=8, zero=True))
    assert zero1["setup"]["memory_column"] == "with_zero"
    t = zero1["time"]["at_batch_size"]
    assert t["zero_broadcast_bytes"] == pytest.approx(7 / 8 * 4 * p)  # weights re-broadcast
    assert t["comm_s"] == pytest.approx((2 * 7 / 8 * 4 * p + 7 / 8 * 4 * p) / 450e9)  # NVLink
    ds2 = build_plan(measurement(p), cluster, TrainingSetup(
        batch_size=8, strategy="deepspeed", zero=True, zero_stage=2))
    assert ds2["setup"]["zero_label"] == "ZeRO-2"
    assert ds2["memory"]["with_zero"]["gradients"] == 4 * p / 8
    assert "deepspeed_buffers" not in zero1["memory"]["with_zero"]  # DDP: none
    one = build_plan(measurement(p), resolve_cluster("h100", gpus_per_node=1),
                     TrainingSetup(batch_size=8))
    assert one["time"]["at_batch_size"]["comm_s"] == 0


@pytest.mark.parametrize(("params", "gpus", "bucket"), [
    (1_000_000, 8, 1_000_000),  # the whole student: under the 25 MiB floor
    (300_000_000, 8, 37_500_000),  # a ViT-L-sized student: its ZeRO partition
])
def test_deepspeed_buffers_are_counted(params: int, gpus: int, bucket: int) -> None:
    """DeepSpeed's reduce bucket (as kd sizes it) and its fp32 copy of the weight partition are
    in the DeepSpeed column, and in what fits."""
    cluster = resolve_cluster("h100", nodes=1, gpus_per_node=gpus)
    m = measurement(params)
    ddp = build_plan(m, cluster, TrainingSetup(batch_size=8, zero=True))["memory"]["with_zero"]
    plan = build_plan(m, cluster, TrainingSetup(batch_size=8, strategy="deepspeed", zero=True,
                                                zero_stage=1))
    plain, ds = plan["memory"]["without_zero"], plan["memory"]["with_zero"]
    assert plan["setup"]["deepspeed_bucket_elements"] == bucket
    assert plan["setup"]["deepspeed_buffers"] == {"reduce_bucket": 4 * bucket,
                                                  "fp32_partition": 4 * params / gpus}
    assert ds["deepspeed_buffers"] == 4 * bucket + 4 * params / gpus
    assert plain["deepspeed_buffers"] == 0  # the column without ZeRO is plain DDP
    assert ds["static"] == ddp["static"] + ds["deepspeed_buffers"]
    assert ds["needed_at_batch"] == ddp["needed_at_batch"] + ds["deepspeed_buffers"]
    assert any("reduce bucket" in line for line in plan["assumptions"])


def test_the_printed_plan_has_a_deepspeed_row() -> None:
    import io

    from rich.console import Console

    from kd.tools.plan import print_plan

    cluster = resolve_cluster("a100-40gb", nodes=1)
    plan = build_plan(measurement(5_717_416), cluster, TrainingSetup(
        batch_size=8, strategy="deepspeed", zero=True, zero_stage=2))
    out = io.StringIO()
    print_plan(plan, Console(file=out, width=140))
    assert "DeepSpeed buffers" in out.getvalue()
    assert "reduce bucket 21.81 MiB" in out.getvalue()


def test_mfu_must_be_a_fraction() -> None:
    with pytest.raises(UserError, match="--mfu"):
        build_plan(measurement(), resolve_cluster("h200"), TrainingSetup(batch_size=8), mfu=1.5)


# ------------------------------------------------------------------------------ hardware
def test_gpu_peaks_come_from_the_profiler_table() -> None:
    assert GPUS["a100-40gb"].peak_flops("bf16") == GPUS["a100-80gb"].peak_flops("bf16") == 312e12
    assert GPUS["a100-40gb"].peak_flops("fp32") == 19.5e12
    assert GPUS["h100"].peak_flops("bf16") == GPUS["h200"].peak_flops("bf16") == 989e12
    assert GPUS["h200"].peak_flops("fp32") == 67e12
    assert GPUS["h200"].memory_bytes > GPUS["h100"].memory_bytes > GPUS["a100-40gb"].memory_bytes


def test_instances_set_gpu_count_and_network() -> None:
    c = resolve_cluster(instance="p5", nodes=2)
    assert (c.gpu.key, c.gpus_per_node, c.network_gbps, c.world_size) == ("h100", 8, 3200, 16)
    assert c.ring_link()[0] == 400e9  # 3,200 Gbps
    assert resolve_cluster(instance="ml.p4de.24xlarge").gpu.key == "a100-80gb"
    explicit = resolve_cluster("a100-80gb", "p4d", nodes=3, gpus_per_node=4, network_gbps=100)
    assert (explicit.gpu.key, explicit.world_size, explicit.network_gbps) == ("a100-80gb", 12, 100)
    assert explicit.network_source == "--network-gbps"
    # Without an instance the network is that of the instance carrying the GPU.
    assert resolve_cluster("h200", nodes=2).network_source == INSTANCES["p5e"].sagemaker
    assert resolve_cluster("a100-40gb").ring_link()[0] == 300e9  # NVLink, one direction


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"gpu": "v100"}, "--gpu v100: unknown GPU; choose one of a100-40gb, a100-80gb, h100, h200"),
    ({"instance": "p3dn"}, "--instance p3dn: unknown instance; choose one of p4d, p4de, p5"),
    ({}, "give --gpu"),
    ({"gpu": "h100", "nodes": 0}, "--nodes 0"),
    ({"gpu": "h100", "gpus_per_node": 0}, "--gpus-per-node 0"),
    ({"gpu": "h100", "network_gbps": -1}, "--network-gbps -1"),
    ({"gpu": "h100", "cpus_per_gpu": 0}, "--cpus-per-gpu 0"),
])
def test_bad_cluster_options(kwargs: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        resolve_cluster(**kwargs)


# ------------------------------------------------------------------------------ measurement
def test_live_tensor_bytes_counts_new_storages_until_freed() -> None:
    weight = torch.ones(1024)
    with LiveTensorBytes(exclude=[weight]) as live:
        a = weight * 2  # 4 KiB
        b = a.view(32, 32).t()  # a view: no new storage
        del a, b  # freed: the next one reuses the budget
        c = weight + 1
        weight.mul_(1)  # in place on an excluded storage: not counted
    assert live.peak == 4096 and live.live == 4096
    del c
    assert live.live == 0


def saved_tensor_bytes(built: PlanModels, cfg: Any, batch: int, precision: str) -> int:
    """Bytes autograd saves for the backward pass in one training step (an independent measure:
    ``torch.autograd.graph.saved_tensors_hooks``), distinct storages, weights excluded."""
    weights = {t.untyped_storage().data_ptr()
               for t in [*built.student.parameters(), *built.student.buffers()]}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    images = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8)
    targets = torch.randint(0, cfg.data.num_classes, (batch,))
    task = built.task
    x_student, x_teacher = task.prepare(images)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    with torch.autocast("cpu", dtype=dtype, enabled=precision == "bf16"):
        teacher_logits = task.teacher_forward(x_teacher)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            terms = task.loss(task.student_forward(x_student), teacher_logits, targets, 1.0)
    terms["loss"].backward()
    return sum(seen.values())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_activation_memory_extrapolates_to_a_larger_batch(precision: str) -> None:
    cfg = load_config(TINY, [*SMALL, f"train.precision={precision}"])
    cpu = torch.device("cpu")
    m = measure_models(cfg, cpu)  # measured at batches 2 and 4
    predicted = m.activation_bytes_fixed + 8 * m.activation_bytes_per_image
    built = build_models(cfg, cpu)
    direct = activation_peak(built, cfg, 8, cpu, precision)
    saved = saved_tensor_bytes(built, cfg, 8, precision)
    assert direct == pytest.approx(predicted, rel=0.15)
    # Saved tensors are most, not all, of the live bytes at the peak (the loss's temporaries).
    assert saved <= predicted
    assert saved == pytest.approx(predicted, rel=0.15)


def test_measurement_of_the_tiny_config() -> None:
    cfg = load_config(TINY, ["optim.name=sgd", "optim.kwargs.momentum=0.9"])
    m = measure_models(cfg, torch.device("cpu"))
    student = build_models(cfg, torch.device("cpu")).student
    params = sum(p.numel() for p in student.parameters())
    assert m.student_params == m.trainable_params == params
    assert m.gradient_bytes == m.student_bytes == 4 * params
    assert m.optimizer_bytes_per_param == pytest.approx(4.0, abs=0.05)  # one momentum buffer
    assert m.teacher == "vit_tiny_patch16_224" and m.teacher_runs
    assert m.flops_teacher_forward > 0 and m.flops_backward > m.flops_student_forward > 0
    assert m.activation_bytes_per_image > 0
    adamw = measure_models(load_config(TINY, ["distill.loss=none"]), torch.device("cpu"))
    assert adamw.optimizer_bytes_per_param == pytest.approx(8.0, abs=0.05)
    assert adamw.teacher is None and adamw.flops_teacher_forward == 0  # labels only


def test_teacher_counted_in_the_dtype_training_holds_it() -> None:
    cpu = torch.device("cpu")
    fp32 = measure_models(load_config(TINY), cpu)
    bf16 = measure_models(load_config(TINY, ["train.precision=bf16"]), cpu)
    assert (fp32.teacher_dtype, bf16.teacher_dtype) == ("float32", "bfloat16")
    assert fp32.teacher_params == bf16.teacher_params
    # Only the weights halve: the input normalisation (6 fp32 numbers) stays.
    assert fp32.teacher_bytes - 24 == 2 * (bf16.teacher_bytes - 24)
    kept = measure_models(load_config(TINY, ["train.precision=bf16", "teacher.dtype=fp32"]), cpu)
    assert kept.teacher_bytes == fp32.teacher_bytes


def test_feature_pairs_count_their_projectors_and_memory() -> None:
    """tiny.yaml: student width 32, teacher 48; a linear projector adds 32 × 48 + 48."""
    cpu = torch.device("cpu")
    logits = measure_models(load_config(TINY), cpu)
    features = measure_models(load_config(TINY, [
        "distill.features=[{student: -1, teacher: -1, loss: mse}]"]), cpu)
    assert features.trainable_params == logits.trainable_params + 32 * 48 + 48
    assert features.activation_bytes_per_image > logits.activation_bytes_per_image
    assert features.flops_student_forward > logits.flops_student_forward  # the projector
    headless = measure_models(load_config(TINY, [
        "teacher.kwargs.num_classes=0", "distill.loss=none", "distill.features=[{}]"]), cpu)
    assert headless.teacher_params < logits.teacher_params  # no classifier


def test_activation_checkpointing_lowers_the_measured_activations() -> None:
    cpu = torch.device("cpu")
    kept = measure_models(load_config(TINY, ["student.kwargs.depth=4"]), cpu)
    recomputed = measure_models(load_config(TINY, ["student.kwargs.depth=4",
                                                   "student.grad_checkpointing=true"]), cpu)
    assert recomputed.activation_bytes_per_image < kept.activation_bytes_per_image
    assert recomputed.student_params == kept.student_params

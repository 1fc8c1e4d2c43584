"""GPU acceptance suite: every CUDA-only path of kd, checked in one run, one JSON of results.

    benchmarks/gpu_check.sh               # python benchmarks/gpu_check.py --out gpu_check.json
    python benchmarks/gpu_check.py --only a,e          # some checks, by letter or name (--list)
    python benchmarks/gpu_check.py --device cpu --only phase_times     # the logic, on a CPU

The checks run in this order, each in a process of its own (killed at its time budget; the
budgets add up to under 8 minutes on one GPU), so that a check that fails, hangs or crashes the
CUDA context never stops the others:

a. ``train_bf16_fused``: kd's Trainer takes bf16 steps with a fused AdamW (every parameter group
   ``fused``, the ``_fused_adamw_`` operator seen); one step fed a NaN pixel is skipped (weights
   and optimizer steps unchanged, ``n_skipped_steps`` 1) with no host synchronisation: CUDA's
   sync debug mode and an operator audit (``.item()``, device-to-host copies) watch the step.
b. ``phase_times``: the PhaseTimer's CUDA-event phase times against the wall time of each step
   (the device synchronised at step ends): the sum of the phases over the wall time.
c. ``nccl_torchrun``: ``torchrun --nproc-per-node 2`` of a short ``kd train`` with
   ``dist.backend=nccl`` when two GPUs are there; with one, ``--nproc-per-node 1``, and since
   kd opens no process group for a single process, this script's torchrun worker opens a
   one-rank NCCL group and trains kd's Trainer in it (kd's all-reduces of metrics and
   evaluation run over NCCL; DDP needs two ranks). Backend, world size, steps, finite losses.
d. ``profile_trace``: ``kd profile`` with CUDA activities; its Chrome trace must hold CUDA
   kernels and kd's record_function ranges (on the CPU and on the GPU timeline, with kernels
   inside forward and backward), and kd's NVTX pushes are recorded while it runs.
e. ``plan_memory``: ``kd plan --json``'s predicted memory for the config's batch against
   ``torch.cuda.max_memory_allocated()`` of the same config training here: predicted/measured.
f. ``bench_mfu``: ``kd bench`` at 224 px in bf16 (ViT-S teacher, ViT-Ti student, its defaults):
   images/s and MFU of kd, the plain loop and timm.
g. ``compile_reduce_overhead``: ``train.compile=true train.compile_mode=reduce-overhead``: the
   steps run and stay finite; images/s with and without compile, and the compile time.
h. ``decode_device``: ``data.decode=device`` against ``data.decode=cpu`` on generated JPEGs
   (ImageFolder): images/s of each, and JPEG decoding operators in the training process with
   ``device`` only (the loader workers decode with ``cpu``). Skipped when kd's config has no
   ``data.decode`` key.

The JSON holds the machine (device name, GPU count, driver, torch/CUDA/cuDNN/NCCL versions, kd
version, git commit) and, per check, its status (``pass``, ``fail``, ``skipped``), the reason,
wall seconds, its budget and its numbers (also those measured before a failure). Exit code 0
when no check failed, 1 when one did, 2 when ``--device cuda`` finds no CUDA device.

Every check also runs with ``--device cpu`` (on tiny models), so that its logic is tested where
no GPU is: ``tests/unit/test_gpu_check.py``. ``tests/gpu/`` runs each check as a ``gpu`` test.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import io
import itertools
import json
import logging
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))  # its sibling bench_input

from bench_input import photo_jpeg

import kd
from kd.cli import main as kd_main
from kd.config import KDConfig, load_config
from kd.core.checkpoint import atomic_write_text, save_weights
from kd.core.dist import DistInfo, process_group_device, select_device, world_info_from_env
from kd.core.guard import SkipTracker
from kd.core.models import create_timm_model
from kd.core.precision import autocast
from kd.core.trainer import PHASES, Trainer
from kd.errors import ConfigError
from kd.tools import plan
from kd.tools.plan import LiveTensorBytes
from kd.tools.profiler import cpu_model
from kd.tools.report import trace_kernels

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).resolve()
TINY_PRESET = ROOT / "configs" / "tiny.yaml"
SCHEMA = "kd-gpu-check/1"
STATUSES = ("pass", "fail", "skipped")

# The whole run's time limit (seconds on one GPU, before --budget-scale); the checks' budgets
# add up to it, so the suite ends within 8 minutes with time left to record the machine.
TOTAL_BUDGET_S = 450.0
MIN_BUDGET_S = 5.0  # a check with less time left than this is skipped, not started
# Sanity bands of the numbers (what "pass" means beyond "it ran").
PLAN_RATIO_RANGE = (0.5, 2.0)  # kd plan's predicted memory / measured peak
PHASE_RATIO_MAX = 1.02  # sum of phase times / wall time of a step: at most 1 (+ timer jitter)
PHASE_RATIO_MIN = 0.5  # ... and the phases cover most of the step
BENCH_MIN_KD_PLAIN = 0.5  # kd's images/s at least half the plain loop's
FORWARD_BACKWARD = ("teacher_forward", "student_forward", "backward")
FUSED_OP = "_fused_adamw"
DECODE_MODES = ("cpu", "device")
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                      "ROLE_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


# ------------------------------------------------------------------------------ settings
@dataclass(frozen=True)
class ModelSize:
    """The models and synthetic data of the checks' configs."""

    student: str
    student_kwargs: dict[str, Any]
    teacher: str
    teacher_kwargs: dict[str, Any]
    image_size: int
    num_classes: int
    batch_size: int
    synthetic_size: int
    num_workers: int


def _tiny_size() -> ModelSize:
    """configs/tiny.yaml's models and data (one source for the tiny models)."""
    tiny = yaml.safe_load(TINY_PRESET.read_text())
    data = tiny["data"]
    return ModelSize(tiny["student"]["name"], dict(tiny["student"].get("kwargs") or {}),
                     tiny["teacher"]["name"], dict(tiny["teacher"].get("kwargs") or {}),
                     data["image_size"], data["num_classes"], data["batch_size"],
                     data["synthetic_size"], 0)


SIZES = {
    # On the GPU: a real ViT-S/16 teacher and ViT-Ti/16 student at 224 px (kd bench's pair).
    "small": ModelSize("vit_tiny_patch16_224", {}, "vit_small_patch16_224", {}, image_size=224,
                       num_classes=100, batch_size=64, synthetic_size=1024, num_workers=2),
    "tiny": _tiny_size(),
}


@dataclass(frozen=True)
class Settings:
    """Where and on what the checks run."""

    device: str = "cuda"  # cuda | cpu
    workdir: Path = Path("gpu_check_work")
    size: str = "small"  # a key of SIZES
    gpus: int = 0  # CUDA devices visible (torch.cuda.device_count())

    @property
    def models(self) -> ModelSize:
        return SIZES[self.size]


class Skip(Exception):
    """The check cannot run here; the message says why (status ``skipped``)."""


class CheckFailed(Exception):
    """A requirement failed; continuing the check would measure nothing (status ``fail``)."""


class Context:
    """What a check gets: the settings, its time, and where its numbers and problems go.

    ``record`` keeps numbers as they are measured (written to ``partial_path`` too, so a check
    killed at its budget still reports them); ``expect`` notes a problem and goes on;
    ``require`` ends the check.
    """

    def __init__(self, settings: Settings, name: str, budget_s: float = math.inf,
                 deadline: float | None = None, partial_path: Path | None = None) -> None:
        self.settings, self.name, self.budget_s = settings, name, budget_s
        self.deadline = deadline if deadline is not None else time.time() + budget_s
        self.partial_path = partial_path
        self.numbers: dict[str, Any] = {}
        self.problems: list[str] = []

    @property
    def device(self) -> torch.device:
        return torch.device(self.settings.device)

    @property
    def workdir(self) -> Path:
        return self.settings.workdir

    def remaining(self) -> float:
        """Seconds left of this check's budget."""
        return self.deadline - time.time()

    def record(self, **numbers: Any) -> None:
        self.numbers.update(numbers)
        if self.partial_path is not None:
            atomic_write_text(self.partial_path, json.dumps(self.numbers, default=str))

    def expect(self, ok: bool, problem: str) -> bool:
        if not ok:
            self.problems.append(problem)
        return bool(ok)

    def require(self, ok: bool, problem: str) -> None:
        if not ok:
            raise CheckFailed(problem)

    def preset(self, run: str, *, teacher: bool = True, size: str | None = None,
               data: Mapping[str, Any] | None = None,
               train: Mapping[str, Any] | None = None) -> Path:
        """Write the YAML preset of one run of this check (see :func:`check_preset`)."""
        tree = check_preset(self.settings, run, teacher=teacher, size=size, data=data,
                            train=train)
        path = self.workdir / "presets" / f"{run}.yaml"
        atomic_write_text(path, yaml.safe_dump(tree, sort_keys=False))
        return path

    def config(self, run: str, *overrides: str, **preset: Any) -> KDConfig:
        return load_config(str(self.preset(run, **preset)), list(overrides))


@dataclass(frozen=True)
class Check:
    """One check: a letter and name, what it checks, its budget and the function that runs it."""

    letter: str
    name: str
    title: str
    budget_s: float
    run: Callable[[Context], None] = field(repr=False)


# ------------------------------------------------------------------------------ configs
def random_teacher(settings: Settings, size: str | None = None) -> Path:
    """Random-initialised teacher weights for a model size, written once per work folder (kd
    distils only from a teacher with weights; nothing is downloaded)."""
    size = size or settings.size
    models = SIZES[size]
    path = settings.workdir / f"teacher_{size}.safetensors"
    if not path.is_file():
        torch.manual_seed(1)
        model = create_timm_model(models.teacher, "teacher", num_classes=models.num_classes,
                                  **models.teacher_kwargs)
        save_weights(path, model.state_dict(), {"name": models.teacher})
    return path


def check_preset(settings: Settings, run: str, *, teacher: bool = True,
                 size: str | None = None, data: Mapping[str, Any] | None = None,
                 train: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The config of one run, as a preset: synthetic data, bf16, no checkpoints, writing into
    ``<workdir>/runs/<run>``; ``data`` and ``train`` replace keys of those sections."""
    m = SIZES[size or settings.size]
    tree: dict[str, Any] = {
        "output_dir": str(settings.workdir / "runs" / run),
        "seed": 0,
        "student": {"name": m.student, "kwargs": dict(m.student_kwargs)},
        "teacher": {"name": m.teacher, "kwargs": dict(m.teacher_kwargs),
                    "checkpoint": str(random_teacher(settings, size)) if teacher else None},
        "data": {"name": "synthetic", "num_classes": m.num_classes,
                 "image_size": m.image_size, "batch_size": m.batch_size,
                 "num_workers": m.num_workers, "synthetic_size": m.synthetic_size,
                 "augment": False, **(data or {})},
        # A random teacher is near chance: no teacher check (it would only warn).
        "distill": {"loss": "soft" if teacher else "none", "check_teacher": False},
        "train": {"device": settings.device, "precision": "bf16", "epochs": 1000,
                  "log_every": 10**6, "eval_every_epochs": 10**6, **(train or {})},
        "checkpoint": {"every_steps": 0, "resume": "none"},
    }
    return tree


def torchrun_processes(device: str, gpus: int) -> int:
    """Processes for the torchrun check: 2 with two GPUs or more, else 1 (1 on a CPU)."""
    return 2 if device == "cuda" and gpus >= 2 else 1


def torchrun_command(nproc: int, port: int, *target: str) -> list[str]:
    """``torchrun`` (as ``python -m torch.distributed.run``) on this node of ``target``: a
    script and its arguments, or ``-m module ...``."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes=1",
            f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1", f"--master-port={port}",
            *target]


def bench_arguments(settings: Settings, json_path: Path) -> list[str]:
    """``kd bench`` at 224 px, bf16, with its default models (ViT-S → ViT-Ti); the tiny models at
    their own size for ``--size tiny``."""
    args = ["bench", "--precision", "bf16", "--device", settings.device, "--json", str(json_path)]
    if settings.size != "tiny":
        return [*args, "--image-size", "224"]
    m = settings.models
    return [*args, "--teacher", m.teacher, "--student", m.student,
            "--teacher-kwargs", json.dumps(m.teacher_kwargs),
            "--student-kwargs", json.dumps(m.student_kwargs),
            "--image-size", str(m.image_size), "--num-classes", str(m.num_classes),
            "--batch", "8", "--steps", "2", "--warmup", "1", "--rounds", "2"]


def profile_arguments(preset: Path, out: Path) -> list[str]:
    return ["profile", "-c", str(preset), "--wait", "0", "--warmup", "1", "--active", "3",
            "--out", str(out)]


def plan_gpu_key(device_name: str) -> str:
    """The ``kd plan --gpu`` entry for this GPU (by the name the driver gives), else h100: the
    predicted memory at the config's batch does not depend on it."""
    for key, spec in plan.GPUS.items():
        if spec.device_name in device_name:
            return key
    return "h100"


def plan_arguments(preset: Path, gpu: str, json_path: Path) -> list[str]:
    return ["plan", "-c", str(preset), "--gpu", gpu, "--gpus-per-node", "1",
            "--json", str(json_path)]


def decode_key_missing(error: ConfigError) -> str | None:
    """The skip reason when ``error`` says kd's config has no ``data.decode`` key, else None."""
    message = str(error)
    if "unknown config key 'data.decode'" in message:
        return f"kd's config has no data.decode key yet ({message})"
    return None


# ------------------------------------------------------------------------------ measuring
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class OpNames(TorchDispatchMode):
    """The names of the operators run while active (``_fused_adamw_``, ``decode_jpeg``, ...)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: set[str] = set()

    def seen(self, func: Any, args: Any, kwargs: dict[str, Any]) -> str:
        name = str(func.overloadpacket.__name__) if hasattr(func, "overloadpacket") else str(func)
        self.ops.add(name)
        return name

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None):
        kwargs = kwargs or {}
        self.seen(func, args, kwargs)
        return func(*args, **kwargs)


class HostSyncAudit(OpNames):
    """Records what would make the host wait for the device while active, and the operators run.

    On every device: reads of a device value (``.item()``, ``bool()``: ``_local_scalar_dense``)
    and copies between the device and the host. On CUDA also the driver's view: sync debug mode
    ``warn`` (``torch.cuda.set_sync_debug_mode``), whose warnings are collected, not raised, so
    the step runs to its end.
    """

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.cuda = device.type == "cuda"
        self.syncs: list[str] = []
        self._stack = contextlib.ExitStack()
        self._caught: list[warnings.WarningMessage] = []

    def __enter__(self) -> HostSyncAudit:
        if self.cuda:
            self._caught = self._stack.enter_context(warnings.catch_warnings(record=True))
            warnings.simplefilter("always")
            previous = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("warn")
            self._stack.callback(torch.cuda.set_sync_debug_mode, previous)
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        self._stack.close()  # restores the sync debug mode, then the warning filters
        self.syncs += [f"CUDA sync debug mode: {str(w.message).splitlines()[0]}"
                       for w in self._caught if "synchroniz" in str(w.message)]

    def seen(self, func: Any, args: Any, kwargs: dict[str, Any]) -> str:
        name = super().seen(func, args, kwargs)
        if name == "_local_scalar_dense":
            self.syncs.append("a read of a device value (.item() or bool())")
        elif name in ("_to_copy", "copy_"):
            source = args[1] if name == "copy_" else args[0]
            target = args[0].device if name == "copy_" else kwargs.get("device")
            if isinstance(source, torch.Tensor) and target is not None and \
                    torch.device(target).type != source.device.type:
                self.syncs.append(f"a copy {source.device.type} -> {torch.device(target).type}")
        return name


def in_memory_batch(trainer: Trainer, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A uint8 batch of the config's shape and its labels, already on the trainer's device."""
    cfg = trainer.cfg
    g = torch.Generator().manual_seed(seed)
    side, batch = cfg.data.image_size, cfg.data.batch_size
    images = torch.randint(0, 256, (batch, cfg.student.channels, side, side), generator=g,
                           dtype=torch.uint8)
    targets = torch.randint(0, cfg.data.num_classes, (batch,), generator=g)
    return images.to(trainer.device), targets.to(trainer.device)


def tracked_step(trainer: Trainer, batches: Iterator) -> dict[str, torch.Tensor]:
    """``Trainer.train_step`` plus the skip bookkeeping ``Trainer.train`` does after it."""
    terms = trainer.train_step(batches)
    values = torch.stack([terms[k].float() for k in SkipTracker.TERMS])
    trainer.skips.update(trainer.step, terms["skipped"], values)
    return terms


def optimizer_steps(optimizer: Any) -> list[float]:
    """Each parameter's optimizer ``step`` count (a host copy: call outside audits)."""
    return [float(state["step"]) for state in optimizer.state.values() if "step" in state]


def skip_step_audit(trainer: Trainer, clean_steps: int = 3) -> dict[str, Any]:
    """Clean steps, then one whose batch holds a NaN pixel, under :class:`HostSyncAudit`, then a
    clean one again: what was skipped, what changed, what synchronised."""
    device = trainer.device
    images, targets = in_memory_batch(trainer)
    clean = itertools.repeat((images, targets, []))
    poisoned = images.float().div(255.0)
    poisoned[0, 0, 0, 0] = float("nan")
    t0 = time.perf_counter()
    for _ in range(clean_steps):
        last = tracked_step(trainer, clean)
    sync(device)
    clean_s = (time.perf_counter() - t0) / clean_steps
    with torch.no_grad(), autocast(device, trainer.precision):
        logits = trainer.student_core(trainer.student_norm(images[:2]))
    before = {n: p.detach().clone() for n, p in trainer.student_core.named_parameters()}
    steps_before = optimizer_steps(trainer.optimizer)
    skipped_before = trainer.skips.check()
    with HostSyncAudit(device) as bad_audit:
        bad = tracked_step(trainer, iter([(poisoned, targets, [])]))
    sync(device)
    skipped_after = trainer.skips.check()
    unchanged = all(torch.equal(before[n], p) for n, p in trainer.student_core.named_parameters())
    steps_unchanged = optimizer_steps(trainer.optimizer) == steps_before
    with HostSyncAudit(device) as clean_audit:
        after = tracked_step(trainer, clean)
    sync(device)
    moved = any(not torch.equal(before[n], p)
                for n, p in trainer.student_core.named_parameters())
    return {
        "clean_step_s": clean_s,
        "clean_loss": float(last["loss"]),
        "student_logits_dtype": str(logits.dtype).removeprefix("torch."),
        "skipped_steps": skipped_after - skipped_before,
        "poisoned_loss_finite": math.isfinite(float(bad["loss"])),
        "poisoned_step_reported_skipped": bool(bad["skipped"]),
        "weights_unchanged_by_skipped_step": unchanged,
        "optimizer_steps_unchanged_by_skipped_step": steps_unchanged,
        "next_step_skipped": bool(after["skipped"]),
        "next_step_loss": float(after["loss"]),
        "weights_moved_after_next_step": moved,
        "host_syncs_skipped_step": bad_audit.syncs,
        "host_syncs_clean_step": clean_audit.syncs,
        "fused_kernel_seen": any(FUSED_OP in op for op in bad_audit.ops),
        "cuda_sync_debug_mode": bad_audit.cuda,
    }


def timed_phases(trainer: Trainer, warmup: int,
                 steps: int) -> tuple[list[dict[str, float]], list[float]]:
    """Phase seconds (``trainer.timer.end_step()``, which synchronises the device) and wall
    seconds of each of ``steps`` training steps after ``warmup``, as ``kd profile`` takes them."""
    phases: list[dict[str, float]] = []
    walls: list[float] = []
    last = [time.perf_counter()]

    def on_step(t: Trainer) -> None:
        phases.append(t.timer.end_step())
        walls.append(time.perf_counter() - last[0])
        last[0] = time.perf_counter()

    trainer.train(evaluate=False, save=False, steps=warmup + steps, on_step=on_step)
    return phases[warmup:], walls[warmup:]


def phase_summary(phases: Sequence[Mapping[str, float]],
                  walls: Sequence[float]) -> dict[str, Any]:
    """Sum of phase times against the wall time, per step: medians, extremes, the phases."""
    if not phases or len(phases) != len(walls) or min(walls) <= 0:
        raise ValueError(f"need as many positive wall times as steps, got {len(phases)} steps "
                         f"and walls {list(walls)}")
    sums = [sum(p.values()) for p in phases]
    ratios = [s / w for s, w in zip(sums, walls, strict=True)]
    return {
        "steps": len(phases),
        "wall_s_median": statistics.median(walls),
        "phase_sum_s_median": statistics.median(sums),
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "phases_s_median": {k: statistics.median(p[k] for p in phases) for k in phases[0]},
    }


def time_training(trainer: Trainer, warmup: int, steps: int) -> dict[str, Any]:
    """Images/s of ``steps`` real training steps (loader included) after ``warmup`` steps; the
    device is synchronised at both ends of the timed steps only."""
    marks: list[float] = []
    start = trainer.step

    def on_step(t: Trainer) -> None:
        if t.step - start == warmup:
            sync(t.device)
            marks.append(time.perf_counter())

    summary = trainer.train(evaluate=False, save=False, steps=warmup + steps, on_step=on_step)
    sync(trainer.device)
    seconds = time.perf_counter() - marks[0]
    return {"img_per_s": steps * trainer.global_batch / seconds, "seconds": seconds,
            "steps": steps, "n_skipped_steps": summary["n_skipped_steps"]}


def time_in_memory_steps(trainer: Trainer, warmup: int, steps: int) -> dict[str, Any]:
    """Images/s of ``Trainer.train_step`` on one batch held on the device (as ``kd bench``),
    after ``warmup`` steps whose time (compilation included) is reported apart."""
    device = trainer.device
    images, targets = in_memory_batch(trainer)
    batches = itertools.repeat((images, targets, []))
    t0 = time.perf_counter()
    for _ in range(warmup):
        trainer.train_step(batches)
    sync(device)
    t1 = time.perf_counter()
    total = None
    for _ in range(steps):
        terms = trainer.train_step(batches)
        loss = terms["loss"].detach().float()
        total = loss if total is None else total + loss
    sync(device)
    t2 = time.perf_counter()
    mean_loss = float(total) / steps if total is not None else float("nan")
    return {"warmup_s": t1 - t0, "img_per_s": steps * trainer.cfg.data.batch_size / (t2 - t1),
            "mean_loss": mean_loss, "finite": math.isfinite(mean_loss)}


def plan_ratio(predicted: float, measured: float) -> float:
    """Predicted over measured bytes."""
    if measured <= 0:
        raise ValueError(f"measured peak memory must be > 0, got {measured}")
    return predicted / measured


def measured_peak_bytes(cfg: KDConfig, steps: int) -> tuple[int, str]:
    """Peak bytes a short training run of ``cfg`` holds on its device, from building the
    trainer to the end of ``steps`` steps, and where the number comes from."""
    device = torch.device(cfg.train.device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        Trainer(cfg).train(evaluate=False, save=False, steps=steps)
        torch.cuda.synchronize(device)
        return (int(torch.cuda.max_memory_allocated(device) - base),
                "torch.cuda.max_memory_allocated, less what was allocated before")
    with LiveTensorBytes() as live:  # a CPU has no allocator statistics
        Trainer(cfg).train(evaluate=False, save=False, steps=steps)
    return int(live.peak), "kd.tools.plan.LiveTensorBytes (no allocator statistics on a CPU)"


# ------------------------------------------------------------------------------ traces
def summarize_trace(trace: Mapping[str, Any], names: Sequence[str] = PHASES) -> dict[str, Any]:
    """What a Chrome trace from ``torch.profiler`` holds of kd's ranges and the device's work.

    Ranges opened by ``record_function`` are ``user_annotation`` events on the host and
    ``gpu_user_annotation`` events on the GPU timeline; kernels are ``kernel`` events
    (:func:`kd.tools.report.trace_kernels`). For each range name: how many ranges, the host
    operators (``cpu_op``, same process) and the kernels inside them.
    """
    events = [e for e in trace.get("traceEvents", ()) if e.get("ph") == "X" and "ts" in e]

    def spans(category: str) -> dict[str, list[tuple[float, float, Any]]]:
        out: dict[str, list[tuple[float, float, Any]]] = {n: [] for n in names}
        for e in events:
            if e.get("cat") == category and e.get("name") in out:
                start = float(e["ts"])
                out[e["name"]].append((start, start + float(e.get("dur", 0.0)), e.get("pid")))
        return out

    def inside(items: list[tuple[float, Any]], ranges: list[tuple[float, float, Any]],
               same_pid: bool) -> int:
        return sum(1 for t, pid in items for start, end, rpid in ranges
                   if start <= t <= end and (not same_pid or pid == rpid))

    cpu, gpu = spans("user_annotation"), spans("gpu_user_annotation")
    ops = [(float(e["ts"]), e.get("pid")) for e in events if e.get("cat") == "cpu_op"]
    kernels = [(float(e["ts"]), e.get("pid")) for e in events if e.get("cat") == "kernel"]
    return {
        "kernels": len(trace_kernels(trace)),
        "kernel_names": len({k["name"] for k in trace_kernels(trace)}),
        "cpu_ranges": {n: len(cpu[n]) for n in names},
        "gpu_ranges": {n: len(gpu[n]) for n in names},
        "cpu_ops_in": {n: inside(ops, cpu[n], True) for n in names},
        "kernels_in": {n: inside(kernels, gpu[n], False) for n in names},
    }


def trace_problems(summary: Mapping[str, Any], device: str,
                   nvtx: Sequence[str] | None = None) -> list[str]:
    """What is missing from a trace summary (:func:`summarize_trace`) for a run on ``device``.

    Everywhere: every phase range on the host, with operators inside forward and backward. On
    CUDA also: kernels, forward and backward ranges on the GPU timeline with kernels inside, and
    (when ``nvtx`` names are given) NVTX ranges of the forward and backward phases.
    """
    problems = []
    missing = [n for n, count in summary["cpu_ranges"].items() if count == 0]
    if missing:
        problems.append(f"no record_function range {missing} on the host")
    empty = [n for n in FORWARD_BACKWARD if not summary["cpu_ops_in"].get(n)]
    if empty:
        problems.append(f"no host operators inside the ranges {empty}")
    if device != "cuda":
        return problems
    if summary["kernels"] == 0:
        problems.append("no CUDA kernels in the trace")
    missing = [n for n in FORWARD_BACKWARD if not summary["gpu_ranges"].get(n)]
    if missing:
        problems.append(f"no range {missing} on the GPU timeline (gpu_user_annotation)")
    empty = [n for n in FORWARD_BACKWARD
             if summary["gpu_ranges"].get(n) and not summary["kernels_in"].get(n)]
    if empty:
        problems.append(f"no CUDA kernels inside the GPU ranges {empty}")
    if nvtx is not None:
        missing = [n for n in FORWARD_BACKWARD if n not in set(nvtx)]
        if missing:
            problems.append(f"no NVTX range {missing} pushed (kd.core.annotate)")
    return problems


@contextlib.contextmanager
def recorded_nvtx() -> Iterator[list[str]]:
    """The names passed to ``torch.cuda.nvtx.range_push`` while inside (they still reach NVTX):
    the torch profiler's trace does not carry NVTX ranges, only Nsight Systems sees them."""
    names: list[str] = []
    push = torch.cuda.nvtx.range_push

    def recording_push(msg: str) -> Any:
        names.append(msg)
        return push(msg)

    torch.cuda.nvtx.range_push = recording_push
    try:
        yield names
    finally:
        torch.cuda.nvtx.range_push = push


# ------------------------------------------------------------------------------ generated JPEGs
def write_image_folder(root: Path, classes: int, train_per_class: int, val_per_class: int,
                       unique: int = 64, width: int = 500, height: int = 375,
                       seed: int = 0) -> dict[str, Any]:
    """An ImageFolder tree of JPEGs (quality 90): ``root/{train,val}/class_<k>/<i>.jpg``.

    ``unique`` distinct images are encoded and their bytes reused for the other files: decoding
    costs the same, and generating stays a second or two.
    """
    rng = np.random.default_rng(seed)
    encoded = []
    for _ in range(max(1, min(unique, classes * (train_per_class + val_per_class)))):
        encoded.append(photo_jpeg(rng, width, height))  # as benchmarks/bench_input.py
    files = itertools.cycle(encoded)
    counts = {"train": classes * train_per_class, "val": classes * val_per_class}
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for k in range(classes):
            folder = root / split / f"class_{k}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                (folder / f"{i:05d}.jpg").write_bytes(next(files))
    return {**counts, "unique": len(encoded), "mean_bytes": statistics.fmean(map(len, encoded)),
            "width": width, "height": height}


# ------------------------------------------------------------------------------ the checks
def run_kd_cli(args: Sequence[str]) -> tuple[int, str]:
    """The real ``kd`` command in this process; its exit code and what it wrote to stderr."""
    captured = io.StringIO()
    with contextlib.redirect_stderr(captured):
        try:
            code = kd_main(list(args))
        except SystemExit as e:  # argparse
            code = e.code if isinstance(e.code, int) else 2
    err = captured.getvalue()
    sys.stderr.write(err)
    return code, err.strip()[-1500:]


def check_train_bf16_fused(ctx: Context) -> None:
    trainer = Trainer(ctx.config("train_bf16_fused"))
    groups = [bool(g.get("fused")) for g in trainer.optimizer.param_groups]
    ctx.record(precision=trainer.precision, optimizer=type(trainer.optimizer).__name__,
               fused=bool(groups) and all(groups), param_groups=len(groups))
    ctx.expect(trainer.precision == "bf16", f"precision {trainer.precision}, not bf16")
    ctx.expect(ctx.numbers["fused"], f"the optimizer is not fused (groups: {groups})")
    n = skip_step_audit(trainer)
    ctx.record(**n)
    ctx.expect(n["student_logits_dtype"] == "bfloat16",
               f"the student's logits under kd's autocast are {n['student_logits_dtype']}")
    ctx.expect(n["fused_kernel_seen"], f"no {FUSED_OP} operator in the optimizer step")
    ctx.expect(n["skipped_steps"] == 1 and n["poisoned_step_reported_skipped"],
               f"the non-finite step was not skipped once (skipped: {n['skipped_steps']})")
    ctx.expect(not n["poisoned_loss_finite"], "the poisoned batch gave a finite loss")
    ctx.expect(n["weights_unchanged_by_skipped_step"], "the skipped step changed the weights")
    ctx.expect(n["optimizer_steps_unchanged_by_skipped_step"],
               "the skipped step advanced the optimizer's step counts")
    ctx.expect(not n["next_step_skipped"] and math.isfinite(n["next_step_loss"])
               and n["weights_moved_after_next_step"],
               "training did not resume after the skipped step")
    ctx.expect(not n["host_syncs_skipped_step"],
               f"host synchronisation in the skipped step: {n['host_syncs_skipped_step']}")
    ctx.expect(not n["host_syncs_clean_step"],
               f"host synchronisation in a clean step: {n['host_syncs_clean_step']}")


def check_phase_times(ctx: Context) -> None:
    trainer = Trainer(ctx.config("phase_times"))
    ctx.record(timer="cuda events" if trainer.timer.cuda else "host perf_counter")
    ctx.expect(trainer.timer.cuda == (ctx.device.type == "cuda"),
               f"the phase timer uses {ctx.numbers['timer']} on {ctx.device.type}")
    summary = phase_summary(*timed_phases(trainer, warmup=3, steps=8))
    ctx.record(**summary)
    ctx.expect(summary["ratio_max"] <= PHASE_RATIO_MAX,
               f"phases sum to {summary['ratio_max']:.3f} of a step's wall time (> "
               f"{PHASE_RATIO_MAX})")
    ctx.expect(summary["ratio_median"] >= PHASE_RATIO_MIN,
               f"phases cover {summary['ratio_median']:.3f} of the wall time (< "
               f"{PHASE_RATIO_MIN})")


def check_nccl_torchrun(ctx: Context) -> None:
    settings = ctx.settings
    nproc = torchrun_processes(settings.device, settings.gpus)
    backend = "nccl" if settings.device == "cuda" else "gloo"
    ctx.require(backend != "nccl" or dist.is_nccl_available(),
                "this torch was built without NCCL")
    steps = 12
    preset = ctx.preset("nccl_torchrun", size="tiny", train={"max_steps": steps, "log_every": 4})
    out = settings.workdir / "runs" / "nccl_torchrun"
    worker_result = settings.workdir / "results" / "nccl_torchrun.worker.json"
    if nproc > 1:  # kd's own path: kd.core.dist opens the group, DDP syncs the gradients
        target = ["-m", "kd.cli", "train", "-c", str(preset), f"dist.backend={backend}"]
        how = "kd train under torchrun (kd opens the process group)"
    else:  # kd opens no group for one process: open a one-rank group, hand kd's Trainer its
        # DistInfo; kd's collectives (metrics, evaluation) then run over it.
        target = [str(SCRIPT), "--torchrun-worker", str(preset), "--backend", backend,
                  "--result", str(worker_result)]
        how = ("one rank: kd opens no process group for one process (kd.core.dist."
               "init_distributed), so this script opens it and runs kd's Trainer in it")
    cmd = torchrun_command(nproc, free_port(), *target)
    ctx.record(nproc=nproc, backend_asked=backend, how=how, command=" ".join(cmd))
    logfile = settings.workdir / "logs" / "nccl_torchrun.torchrun.log"
    code = run_process(cmd, timeout_s=ctx.remaining() - 2, log_path=logfile)
    ctx.record(returncode=code)
    ctx.require(code == 0, f"torchrun {'timed out' if code is None else f'exited with {code}'}"
                           f": {tail(logfile, 1200)}")
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
               if line.strip()]
    losses = [r["loss"] for r in records if "loss" in r and "split" not in r]
    group = {"backend": summary.get("backend"), "world_size": summary.get("world_size")}
    if nproc == 1:
        worker = json.loads(worker_result.read_text())
        group = {"backend": worker["group_backend"], "world_size": worker["group_world_size"]}
        ctx.record(all_reduce_sum=worker["all_reduce_sum"])
        ctx.expect(worker["all_reduce_sum"] == nproc,
                   f"an all-reduce of ones gave {worker['all_reduce_sum']}, not {nproc}")
    ctx.record(backend=group["backend"], world_size=group["world_size"],
               steps=summary.get("steps"), img_per_s=summary.get("img_per_s"),
               run_wall_s=summary.get("wall_s"), losses=losses,
               n_skipped_steps=summary.get("n_skipped_steps"))
    ctx.expect(group["backend"] == backend, f"process group backend {group['backend']}, not "
                                            f"{backend}")
    ctx.expect(group["world_size"] == nproc, f"world size {group['world_size']}, not {nproc}")
    ctx.expect(summary.get("steps") == steps, f"{summary.get('steps')} steps, not {steps}")
    ctx.expect(bool(losses) and all(v is not None and math.isfinite(v) for v in losses),
               f"losses not finite: {losses}")


def torchrun_worker(preset: Path, backend: str, result: Path) -> int:
    """A torchrun worker: open the process group as kd.core.dist does (``device_id`` under
    NCCL), train kd's Trainer with this rank's DistInfo, all-reduce ones, record the group."""
    cfg = load_config(str(preset))
    world = world_info_from_env()
    device = select_device(cfg.train.device, world.local_rank)
    dist.init_process_group(backend, rank=world.rank, world_size=world.world_size,
                            timeout=timedelta(seconds=300),
                            device_id=process_group_device(backend, device))
    try:
        info = DistInfo(**dataclasses.asdict(world), device=device, backend=backend)
        summary = Trainer(cfg, info).train()
        ones = torch.ones(1, device=device)
        dist.all_reduce(ones)
        record = {"group_backend": dist.get_backend(), "group_world_size": dist.get_world_size(),
                  "all_reduce_sum": float(ones.item()), "steps": summary["steps"]}
        if world.rank == 0:
            atomic_write_text(result, json.dumps(record) + "\n")
    finally:
        dist.destroy_process_group()
    return 0


def check_profile_trace(ctx: Context) -> None:
    out = ctx.workdir / "runs" / "profile_trace"
    args = profile_arguments(ctx.preset("profile_trace"), out)
    cuda = ctx.device.type == "cuda"
    with recorded_nvtx() if cuda else contextlib.nullcontext() as nvtx:
        code, err = run_kd_cli(args)
    ctx.require(code == 0, f"kd profile exited with {code}: {err}")
    trace = json.loads((out / "trace_rank0.json").read_text())
    summary = summarize_trace(trace)
    analysis = json.loads((out / "profile.json").read_text())
    ctx.record(**summary, nvtx_ranges=sorted(set(nvtx)) if nvtx is not None else None,
               ops_on=analysis["meta"]["ops_on"], img_per_s=analysis["analysis"]["img_per_s"],
               mfu=analysis["analysis"]["mfu"],
               verdict=analysis["analysis"]["verdict"]["kind"], trace=str(out / "trace_rank0.json"))
    ctx.expect(analysis["meta"]["ops_on"] == ("cuda" if cuda else "cpu"),
               f"the profile recorded {analysis['meta']['ops_on']} activities")
    for problem in trace_problems(summary, ctx.device.type, nvtx):
        ctx.expect(False, problem)


def check_plan_memory(ctx: Context) -> None:
    preset = ctx.preset("plan_memory")
    gpu = plan_gpu_key(torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda"
                       else "")
    json_path = ctx.workdir / "runs" / "plan_memory.plan.json"
    code, err = run_kd_cli(plan_arguments(preset, gpu, json_path))
    ctx.require(code == 0, f"kd plan exited with {code}: {err}")
    result = json.loads(json_path.read_text())
    column = result["setup"]["memory_column"]
    memory = result["memory"][column]
    predicted = float(memory["needed_at_batch"])
    ctx.record(plan_gpu=gpu, batch_size=memory["batch_size"], predicted_bytes=predicted,
               predicted_static_bytes=memory["static"],
               predicted_activation_bytes_per_image=memory["activations_per_image"],
               predicted_activation_bytes_fixed=memory["activations_fixed"],
               measured_on=result["measured"]["device"])
    gc.collect()
    measured, source = measured_peak_bytes(load_config(str(preset)), steps=3)
    ratio = plan_ratio(predicted, measured)
    ctx.record(measured_bytes=measured, measured_source=source, ratio=ratio)
    low, high = PLAN_RATIO_RANGE
    ctx.expect(low <= ratio <= high, f"kd plan predicted {ratio:.2f}x the measured peak "
                                     f"(outside {low}-{high})")


def check_bench_mfu(ctx: Context) -> None:
    json_path = ctx.workdir / "runs" / "bench_mfu.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)  # kd bench checks it before it runs
    code, err = run_kd_cli(bench_arguments(ctx.settings, json_path))
    ctx.require(code == 0, f"kd bench exited with {code}: {err}")
    result = json.loads(json_path.read_text())
    (run,) = result["runs"]
    rows = run["rows"]
    datasheet = run.get("datasheet_peak_flops")
    kd_img = rows["kd"]["img_per_s"]
    ctx.record(image_size=run["image_size"], precision=run["precision"],
               optimizer=run["optimizer"], flops_per_image=run["flops_per_image"],
               peak_flops_measured=run["peak_flops"], peak_flops_datasheet=datasheet,
               img_per_s={k: r["img_per_s"] for k, r in rows.items()},
               mfu={k: r["mfu"] for k, r in rows.items()},
               mfu_kd_datasheet=run["flops_per_image"] * kd_img / datasheet if datasheet
               else None, ratios=run["ratios"], kd_phases=run["kd_phases"])
    ctx.expect(run["precision"] == "bf16", f"precision {run['precision']}, not bf16")
    ctx.expect(all(r["img_per_s"] > 0 for r in rows.values()), "a loop measured 0 img/s")
    ctx.expect(0 < rows["kd"]["mfu"] <= 1, f"kd's MFU {rows['kd']['mfu']} is not in (0, 1]")
    ctx.expect("kd: AdamW (fused)" in run["optimizer"], f"kd's optimizer: {run['optimizer']}")
    ctx.expect(run["ratios"]["kd/plain"] >= BENCH_MIN_KD_PLAIN,
               f"kd runs at {run['ratios']['kd/plain']:.2f}x the plain loop's speed")


def check_compile_reduce_overhead(ctx: Context) -> None:
    eager = Trainer(ctx.config("compile_eager"))
    plain = time_in_memory_steps(eager, warmup=2, steps=10)
    ctx.record(eager=plain)
    del eager
    gc.collect()
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()
    cfg = ctx.config("compile_reduce_overhead", "train.compile=true",
                     "train.compile_mode=reduce-overhead")
    t0 = time.perf_counter()
    compiled = Trainer(cfg)
    build_s = time.perf_counter() - t0
    fast = time_in_memory_steps(compiled, warmup=3, steps=10)
    ctx.record(compiled=fast, build_s=build_s, compile_mode=cfg.train.compile_mode,
               speedup=fast["img_per_s"] / plain["img_per_s"])
    ctx.expect(plain["finite"] and fast["finite"],
               f"non-finite losses: eager {plain['mean_loss']}, compiled {fast['mean_loss']}")
    ctx.expect(fast["img_per_s"] > 0, "the compiled steps measured 0 img/s")


def check_decode_device(ctx: Context) -> None:
    cuda = ctx.device.type == "cuda"
    classes = 4
    root = ctx.workdir / "jpegs"
    data = {"name": "imagefolder", "root": str(root), "num_classes": classes, "augment": True,
            "num_workers": min(8, max(1, (os.cpu_count() or 2) - 1))}
    preset = ctx.preset("decode_device", teacher=False, data=data)
    try:
        load_config(str(preset), ["data.decode=cpu"])
    except ConfigError as e:
        reason = decode_key_missing(e)
        if reason is None:
            raise
        raise Skip(reason) from None
    per_class = 128 if cuda else 4
    ctx.record(images=write_image_folder(root, classes, per_class, 2),
               num_workers=data["num_workers"])
    for mode in DECODE_MODES:
        trainer = Trainer(load_config(str(preset), [f"data.decode={mode}"]))
        speed = time_training(trainer, warmup=2, steps=6 if cuda else 2)
        with OpNames() as names:  # one more step, untimed: who decodes
            trainer.train(evaluate=False, save=False, steps=1)
        decodes = sorted(op for op in names.ops if "decode" in op)
        ctx.record(**{mode: {**speed, "decode_ops_in_training_process": decodes}})
        ctx.expect(speed["img_per_s"] > 0 and speed["n_skipped_steps"] == 0,
                   f"data.decode={mode}: {speed}")
        # device: the training process decodes the batch (torchvision.io.decode_jpeg); cpu: the
        # loader workers do, out of this process.
        ctx.expect(bool(decodes) == (mode == "device"),
                   f"data.decode={mode}: JPEG decoding operators in the training process: "
                   f"{decodes or 'none'}")
        del trainer
        gc.collect()
    ctx.record(device_over_cpu=ctx.numbers["device"]["img_per_s"] / ctx.numbers["cpu"]
               ["img_per_s"])


CHECKS: dict[str, Check] = {c.name: c for c in (
    Check("a", "train_bf16_fused", "bf16 steps with fused AdamW; a non-finite step skipped "
          "without a host sync", 40, check_train_bf16_fused),
    Check("b", "phase_times", "CUDA-event phase times against wall time", 30, check_phase_times),
    Check("c", "nccl_torchrun", "torchrun of a short kd train with dist.backend=nccl", 55,
          check_nccl_torchrun),
    Check("d", "profile_trace", "kd profile: CUDA kernels and kd's ranges in the trace", 55,
          check_profile_trace),
    Check("e", "plan_memory", "kd plan's predicted memory against the measured peak", 40,
          check_plan_memory),
    Check("f", "bench_mfu", "kd bench at 224 px bf16 (ViT-S -> ViT-Ti) with MFU", 60,
          check_bench_mfu),
    Check("g", "compile_reduce_overhead", "train.compile with reduce-overhead: steps and "
          "img/s with and without", 120, check_compile_reduce_overhead),
    Check("h", "decode_device", "data.decode=device against cpu on generated JPEGs", 50,
          check_decode_device),
)}


# ------------------------------------------------------------------------------ running
def make_record(check: Check, status: str, *, budget_s: float, wall_s: float = 0.0,
                reason: str | None = None, numbers: Mapping[str, Any] | None = None,
                problems: Sequence[str] = (), error: str | None = None) -> dict[str, Any]:
    """One check's entry of the JSON."""
    if status not in STATUSES:
        raise ValueError(f"status {status!r}: one of {STATUSES}")
    return {"letter": check.letter, "name": check.name, "title": check.title, "status": status,
            "reason": reason, "wall_s": round(wall_s, 3), "budget_s": round(budget_s, 3),
            "numbers": dict(numbers or {}), "problems": list(problems), "error": error}


def run_check(check: Check, settings: Settings, budget_s: float | None = None,
              deadline: float | None = None, partial_path: Path | None = None) -> dict[str, Any]:
    """Run one check in this process; whatever it raises becomes its record, never an error."""
    budget = check.budget_s if budget_s is None else budget_s
    ctx = Context(settings, check.name, budget, deadline, partial_path)
    status, reason, error = "pass", None, None
    t0 = time.perf_counter()
    try:
        check.run(ctx)
    except Skip as e:
        status, reason = "skipped", str(e)
    except CheckFailed as e:
        ctx.problems.append(str(e))
    except (Exception, SystemExit) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        status, reason = "fail", f"{type(e).__name__}: {first}"
        error = "".join(traceback.format_exception(e))[-4000:]
    wall = time.perf_counter() - t0
    if status != "skipped" and wall > budget:
        ctx.problems.append(f"took {wall:.1f} s, over its budget of {budget:.3g} s")
    if status == "pass" and ctx.problems:
        status = "fail"
    if status == "fail" and reason is None:
        reason = "; ".join(ctx.problems)
    return make_record(check, status, budget_s=budget, wall_s=wall, reason=reason,
                       numbers=ctx.numbers, problems=ctx.problems, error=error)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def child_env() -> dict[str, str]:
    """This environment without a launcher's rank variables, unbuffered."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    return {**env, "PYTHONUNBUFFERED": "1"}


def run_process(cmd: Sequence[str], timeout_s: float, log_path: Path) -> int | None:
    """Run ``cmd`` in a session of its own, output to ``log_path``; its exit code, or None when
    it ran past ``timeout_s`` and was killed with everything it started."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as out:
        proc = subprocess.Popen(list(cmd), cwd=ROOT, env=child_env(), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait(timeout=max(0.1, timeout_s))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return None


def tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def child_command(check: Check, settings: Settings, deadline: float,
                  result: Path) -> list[str]:
    """This script, running one check and writing its record to ``result``."""
    return [sys.executable, str(SCRIPT), "--child", check.name, "--result", str(result),
            "--deadline", repr(deadline), "--device", settings.device,
            "--size", settings.size, "--gpus", str(settings.gpus),
            "--workdir", str(settings.workdir)]


def run_isolated(check: Check, settings: Settings, budget_s: float | None = None
                 ) -> dict[str, Any]:
    """Run one check in a child process, killed at its budget; its record either way."""
    budget = check.budget_s if budget_s is None else budget_s
    result = settings.workdir / "results" / f"{check.name}.json"
    partial = result.with_suffix(".partial.json")
    logfile = settings.workdir / "logs" / f"{check.name}.log"
    for path in (result, partial):
        path.unlink(missing_ok=True)
    result.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.time() + budget
    t0 = time.perf_counter()
    code = run_process(child_command(check, settings, deadline, result), budget, logfile)
    wall = time.perf_counter() - t0
    if result.is_file():
        record = json.loads(result.read_text())
        record["wall_s"] = round(wall, 3)  # with the child's start-up
        record["budget_s"] = round(budget, 3)
    else:
        numbers = json.loads(partial.read_text()) if partial.is_file() else {}
        reason = (f"timed out after {budget:.3g} s (its budget) and was killed" if code is None
                  else f"its process exited with code {code} without a result")
        record = make_record(check, "fail", budget_s=budget, wall_s=wall, reason=reason,
                             numbers=numbers)
    record["log"] = str(logfile)
    if record["status"] == "fail":
        record["log_tail"] = tail(logfile)
    return record


def run_checks(checks: Sequence[Check], settings: Settings, *, isolate: bool = True,
               total_budget_s: float = TOTAL_BUDGET_S, budget_scale: float = 1.0,
               progress: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Every check in turn, each within its budget (scaled) and what is left of the total."""
    end = time.perf_counter() + total_budget_s
    records = []
    for check in checks:
        left = end - time.perf_counter()
        budget = min(check.budget_s * budget_scale, left)
        if left < min(MIN_BUDGET_S, check.budget_s * budget_scale):
            record = make_record(check, "skipped", budget_s=max(0.0, budget),
                                 reason=f"the run's total budget of {total_budget_s:.0f} s "
                                        f"is spent ({max(0.0, left):.1f} s left)")
        elif isolate:
            record = run_isolated(check, settings, budget)
        else:
            record = run_check(check, settings, budget)
        records.append(record)
        if progress is not None:
            progress(record)
    return records


# ------------------------------------------------------------------------------ the machine
def git_commit() -> str | None:
    """HEAD of the checkout this script is in (read-only), or None outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def nvidia_driver() -> str | None:
    """The NVIDIA driver's version (nvidia-smi, else NVML through pynvml), or None."""
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version",
                                  "--format=csv,noheader"], capture_output=True, text=True,
                                 timeout=20)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip().splitlines()[0].strip()
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        import pynvml

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:  # no pynvml, or no driver: say nothing rather than guess
        return None


def _quiet(read: Callable[[], Any]) -> Any:
    try:
        return read()
    except Exception:
        return None


def environment() -> dict[str, Any]:
    """The machine and software the checks ran on."""
    import timm
    import torchvision

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    devices = []
    for i in range(gpus):
        props = torch.cuda.get_device_properties(i)
        devices.append({"index": i, "name": props.name, "capability": f"{props.major}."
                        f"{props.minor}", "memory_bytes": int(props.total_memory)})
    nccl = _quiet(torch.cuda.nccl.version)
    return {
        "device_name": devices[0]["name"] if devices else cpu_model(),
        "gpu_count": gpus,
        "gpus": devices,
        "driver": nvidia_driver() if gpus else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": _quiet(torch.backends.cudnn.version),
        "nccl": ".".join(map(str, nccl)) if isinstance(nccl, tuple) else nccl,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "kd_version": kd.__version__,
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
    }


def build_report(records: Sequence[Mapping[str, Any]], env: Mapping[str, Any],
                 settings: Settings, wall_s: float, argv: Sequence[str]) -> dict[str, Any]:
    """The JSON: schema, when, how, the machine, a summary and every check's record."""
    counts = {s: sum(1 for r in records if r["status"] == s) for s in STATUSES}
    return {
        "schema": SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(["benchmarks/gpu_check.py", *argv]),
        "settings": {"device": settings.device, "size": settings.size,
                     "workdir": str(settings.workdir)},
        "environment": dict(env),
        "wall_s": round(wall_s, 3),
        "summary": counts,
        "checks": list(records),
    }


# ------------------------------------------------------------------------------ the command
def select_checks(only: str | None, skip: str | None) -> list[Check]:
    """Checks named in ``only`` (all by default) minus those in ``skip``; letters or names."""
    by_key = {**CHECKS, **{c.letter: c for c in CHECKS.values()}}

    def names(text: str | None) -> set[str]:
        keys = [k.strip() for k in (text or "").split(",") if k.strip()]
        unknown = [k for k in keys if k not in by_key]
        if unknown:
            raise ValueError(f"unknown check(s) {', '.join(unknown)}; choose from "
                             f"{', '.join(f'{c.letter}/{c.name}' for c in CHECKS.values())}")
        return {by_key[k].name for k in keys}

    chosen = names(only) or set(CHECKS)
    dropped = names(skip)
    return [c for c in CHECKS.values() if c.name in chosen and c.name not in dropped]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="gpu_check.json", help="the JSON of results "
                   "(default: gpu_check.json)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                   help="cuda (the point of this suite) or cpu (the checks' logic, on tiny "
                   "models)")
    p.add_argument("--size", choices=tuple(SIZES), help="the models: small (ViT-S -> ViT-Ti at "
                   "224 px; the default on cuda) or tiny (configs/tiny.yaml's; on cpu)")
    p.add_argument("--only", help="checks to run, comma-separated letters or names (a-h)")
    p.add_argument("--skip", help="checks to leave out, as --only")
    p.add_argument("--budget-scale", type=float, default=1.0,
                   help="multiply every time budget (a slower GPU), default 1")
    p.add_argument("--workdir", help="where runs, logs and traces go (default: a temporary "
                   "folder, removed at the end unless a check failed or --keep-workdir)")
    p.add_argument("--keep-workdir", action="store_true")
    p.add_argument("--in-process", action="store_true", help="run the checks in this process "
                   "(no isolation and no kill at the budget: for debugging)")
    p.add_argument("--list", action="store_true", help="list the checks and exit")
    # A child process running one check (run_isolated).
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    p.add_argument("--gpus", type=int, help=argparse.SUPPRESS)
    # A torchrun worker of the nccl_torchrun check with one process (torchrun_worker).
    p.add_argument("--torchrun-worker", metavar="PRESET", help=argparse.SUPPRESS)
    p.add_argument("--backend", help=argparse.SUPPRESS)
    return p


def child_main(args: argparse.Namespace) -> int:
    """One check in this (child) process; the record goes to ``--result``."""
    settings = Settings(args.device, Path(args.workdir), args.size, args.gpus or 0)
    result = Path(args.result)
    budget = args.deadline - time.time()
    record = run_check(CHECKS[args.child], settings, budget, args.deadline,
                       result.with_suffix(".partial.json"))
    atomic_write_text(result, json.dumps(record, indent=1, default=str) + "\n")
    return 0


def format_record(record: Mapping[str, Any]) -> str:
    line = (f"[{record['letter']}] {record['name']:<24} {record['status'].upper():<7} "
            f"{record['wall_s']:6.1f} s of {record['budget_s']:.0f} s")
    return line + (f"  {record['reason']}" if record.get("reason") else "")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.size is None:
        args.size = "small" if args.device == "cuda" else "tiny"
    if args.child:
        return child_main(args)
    if args.torchrun_worker:
        return torchrun_worker(Path(args.torchrun_worker), args.backend, Path(args.result))
    try:
        checks = select_checks(args.only, args.skip)
    except ValueError as e:
        parser.error(str(e))
    if args.list:
        for c in CHECKS.values():
            print(f"{c.letter}  {c.name:<24} {c.budget_s:4.0f} s  {c.title}")
        return 0
    t0 = time.perf_counter()
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(
        prefix="kd_gpu_check_"))
    workdir.mkdir(parents=True, exist_ok=True)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    settings = Settings(args.device, workdir.resolve(), args.size, gpus)
    env = environment()
    print(f"kd GPU check: {env['device_name']}, {gpus} GPU(s), torch {env['torch']}, CUDA "
          f"{env['cuda']}, kd {env['kd_version']} ({env['git_commit'] or 'no git'}); "
          f"work folder {workdir}", flush=True)
    no_cuda = args.device == "cuda" and gpus == 0
    if no_cuda:
        records = [make_record(c, "skipped", budget_s=c.budget_s * args.budget_scale,
                               reason="no CUDA device (torch.cuda.is_available() is False)")
                   for c in checks]
        for record in records:
            print(format_record(record), flush=True)
    else:
        records = run_checks(checks, settings, isolate=not args.in_process,
                             total_budget_s=TOTAL_BUDGET_S * args.budget_scale,
                             budget_scale=args.budget_scale,
                             progress=lambda r: print(format_record(r), flush=True))
    report = build_report(records, env, settings, time.perf_counter() - t0, argv)
    failed = report["summary"]["fail"]
    keep = args.keep_workdir or args.workdir or failed
    report["settings"]["workdir_kept"] = bool(keep)
    atomic_write_text(Path(args.out), json.dumps(report, indent=1, default=str) + "\n")
    if not keep:
        shutil.rmtree(workdir, ignore_errors=True)
    s = report["summary"]
    print(f"{s['pass']} passed, {s['fail']} failed, {s['skipped']} skipped in "
          f"{report['wall_s']:.0f} s; results: {args.out}", flush=True)
    return 2 if no_cuda else int(failed > 0)


if __name__ == "__main__":
    sys.exit(main())

"""Training speed of kd against a plain PyTorch loop and timm's distillation task (``kd bench``).

Three loops run the same distillation step on the same models, batch, precision and data:

- ``plain``: the shortest loop PyTorch allows — teacher forward under ``torch.no_grad``, student
  forward and backward, ``(1 - alpha) * CE + alpha * T² * KL(teacher ‖ student at T)``, AdamW
  (fused where PyTorch has the kernel, else foreach), no host synchronisation;
- ``kd``: :meth:`kd.core.trainer.Trainer.train_step`, on a Trainer built from a config like
  any run's (its phase timer and annotations, the strategy's gradient norm and non-finite check, the
  schedule), fed in-memory batches;
- ``timm``: ``timm.task.LogitDistillationTask`` (timm >= 1.0.20) called as timm's ``train.py``
  calls it, stepped with the same AdamW as ``plain``.

The models are random-initialised timm models (no downloads): the teacher's weights go through a
``.safetensors`` file into the Trainer's config while ``plain`` and ``timm`` share the fp32 model
they came from (so kd's own choices for its teacher, e.g. ``teacher.dtype``, count as kd's), and
``plain`` and ``timm`` train copies of the Trainer's freshly built student: all three start from
the same weights. The data is one
random batch already on the device, so no loader runs; every loop normalises it on the device
each step, as a loop fed raw images does.

After ``warmup`` steps of each loop, the loops alternate — ``plain kd timm plain kd timm ...``,
``rounds`` rounds of ``steps`` steps each, timed as one block (one device synchronisation per
block) — so that other work on a shared machine slows them alike; images/s are medians over
rounds, with their range. FLOPs per image (teacher forward + student forward + backward) are
counted with ``torch.utils.flop_counter`` (:func:`kd.tools.profiler.count_flops_safely`), the matmul
peak for the precision is measured here, before and after the rounds (the larger counts:
:func:`kd.tools.profiler.measure_matmul_flops`), and MFU = FLOPs per image × images/s ÷ peak.

Example:
    >>> from kd.tools.bench import run_bench, print_table
    >>> result = run_bench("vit_small_patch16_224", "vit_tiny_patch16_224",
    ...                    image_sizes=[112], steps=3, rounds=3)  # doctest: +SKIP
    >>> print_table(result)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import logging
import os
import platform
import re
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kd.config import load_config
from kd.core.checkpoint import atomic_write_text, save_weights
from kd.core.models import create_timm_model
from kd.core.precision import autocast
from kd.core.trainer import Trainer
from kd.errors import ConfigError, UserError, output_error
from kd.tools.plan import LiveTensorBytes
from kd.tools.profiler import (
    count_flops_safely,
    cpu_model,
    matmul_precision,
    measure_matmul_flops,
    table_peak,
    training_batch_inputs,
)
from kd.units import format_bytes, format_flops, format_percent

log = logging.getLogger("kd")

DEFAULT_TEACHER = "vit_small_patch16_224"
DEFAULT_STUDENT = "vit_tiny_patch16_224"
DEFAULT_IMAGE_SIZES = (112, 224)
LOOPS = ("plain", "kd", "timm")
LOOP_TITLES = {"plain": "plain PyTorch loop", "kd": "kd Trainer.train_step",
               "timm": "timm LogitDistillationTask"}
LOGITS_ONLY = "kd_logits"  # the loop added with a WORK_OPTIONS setting
LOGITS_ONLY_TITLE = "kd, logits only"
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


# ------------------------------------------------------------------------------ building blocks
def parse_image_sizes(values: Sequence[str | int] | None) -> list[int]:
    """Image sides from repeated options and/or comma lists: ``["112,224", "64"]`` → 112, 224, 64.

    Example:
        >>> parse_image_sizes(["112,224", "64"])
        [112, 224, 64]
    """
    if not values:
        return list(DEFAULT_IMAGE_SIZES)
    sizes = []
    for value in values:
        for part in str(value).split(","):
            if not part.strip():
                continue
            try:
                size = int(part)
            except ValueError:
                raise UserError(f"--image-size {value}: expected integers, e.g. 112,224") from None
            if size <= 0:
                raise UserError(f"--image-size {size}: must be > 0")
            sizes.append(size)
    if not sizes:
        raise UserError("--image-size: give at least one size")
    return sizes


def model_kwargs(name: str, image_size: int, kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """``kwargs`` plus ``img_size=image_size`` when the model takes it (ViTs fix their position
    embeddings at build time; convnets take any size and reject the argument).

    Probed on the meta device: nothing is allocated.
    """
    import timm

    kwargs = dict(kwargs or {})
    if "img_size" in kwargs:
        return kwargs
    try:
        timm.create_model(name, pretrained=False, num_classes=1, img_size=image_size,
                          device="meta", **kwargs)
    except TypeError:
        return kwargs
    except RuntimeError as e:  # an unknown model name
        raise UserError(f"cannot build timm model '{name}': {str(e).splitlines()[0]}") from None
    except (AssertionError, ValueError):  # bad arguments: building the model says which
        pass
    return {**kwargs, "img_size": image_size}


def build_adamw(params: Any, device: torch.device, lr: float = 1e-3,
                weight_decay: float = 0.05) -> tuple[torch.optim.Optimizer, str]:
    """The fastest ``torch.optim.AdamW`` this device has: fused, else foreach; and its kind."""
    params = list(params)
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True), "fused"
    except (RuntimeError, ValueError):  # no fused kernel for this device or dtype
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay,
                                 foreach=True), "foreach"


def _norm_stats(model: nn.Module, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's input mean and std (timm's pretrained config) as (1, C, 1, 1) tensors."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean = torch.tensor(cfg.get("mean", IMAGENET_DEFAULT_MEAN), device=device).view(1, -1, 1, 1)
    std = torch.tensor(cfg.get("std", IMAGENET_DEFAULT_STD), device=device).view(1, -1, 1, 1)
    return mean, std


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                  targets: torch.Tensor, temperature: float, alpha: float) -> torch.Tensor:
    """``(1 - alpha) * CE + alpha * T² * KL(softmax(t/T) ‖ softmax(s/T))``, batch mean, in fp32
    (Hinton et al. 2015, §2; the T² keeps the soft term's gradients on the scale of the CE's)."""
    s, t = student_logits.float(), teacher_logits.float()
    kl = F.kl_div(F.log_softmax(s / temperature, dim=-1), F.log_softmax(t / temperature, dim=-1),
                  reduction="batchmean", log_target=True)
    return (1 - alpha) * F.cross_entropy(s, targets) + alpha * temperature**2 * kl


def _backward_and_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer,
                       scaler: torch.amp.GradScaler | None) -> None:
    """Backward, optimizer step (through the fp16 scaler when there is one), zero the grads."""
    if scaler is None:
        loss.backward()
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    optimizer.zero_grad(set_to_none=True)


def make_plain_step(student: nn.Module, teacher: nn.Module, images: torch.Tensor,
                    targets: torch.Tensor, precision: str, temperature: float,
                    alpha: float) -> tuple[Callable[[], None], str]:
    """One step of the minimal loop as a closure, and the AdamW kind it uses."""
    device = images.device
    optimizer, kind = build_adamw(student.parameters(), device)
    mean, std = _norm_stats(student, device)
    t_mean, t_std = _norm_stats(teacher, device)
    same_norm = torch.equal(mean, t_mean) and torch.equal(std, t_std)  # once, not per step
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    def step() -> None:
        x = (images - mean) / std
        x_teacher = x if same_norm else (images - t_mean) / t_std
        with autocast(device, precision):
            with torch.no_grad():
                teacher_logits = teacher(x_teacher)
            student_logits = student(x)
        loss = plain_kd_loss(student_logits, teacher_logits, targets, temperature, alpha)
        _backward_and_step(loss, optimizer, scaler)

    return step, kind


def make_timm_step(student: nn.Module, teacher: nn.Module, images: torch.Tensor,
                   targets: torch.Tensor, precision: str, temperature: float,
                   alpha: float) -> Callable[[], None]:
    """One step of ``timm.task.LogitDistillationTask`` as timm's ``train.py`` runs it: inputs
    normalised for the student, the task under autocast, then backward and the optimizer.

    ``task_loss_weight=1 - alpha`` alone selects timm's complementary weighting (distillation
    weight ``alpha``): the same loss as the other loops.
    """
    from timm.task import DistillationTeacher, LogitDistillationTask

    device = images.device
    task = LogitDistillationTask(student, DistillationTeacher(teacher, device=device),
                                 criterion=nn.CrossEntropyLoss(), task_loss_weight=1 - alpha,
                                 temperature=temperature, device=device, verbose=False)
    task.train()
    optimizer, _ = build_adamw(task.trainable_module.parameters(), device)
    mean, std = _norm_stats(student, device)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    def step() -> None:
        x = (images - mean) / std
        with autocast(device, precision):
            loss = task(x, targets)["loss"]
        _backward_and_step(loss, optimizer, scaler)

    return step


# The config keys kd bench sets from its own options, as its errors name them.
BENCH_OPTIONS = {"student.kwargs": "--student-kwargs", "teacher.kwargs": "--teacher-kwargs",
                 "student.name": "--student", "teacher.name": "--teacher",
                 "data.image_size": "--image-size", "data.num_classes": "--num-classes"}


@contextlib.contextmanager
def bench_options() -> Iterator[None]:
    """A ConfigError about a model raised inside names the ``kd bench`` option that set it."""
    try:
        yield
    except ConfigError as e:
        message = str(e)
        for key, option in BENCH_OPTIONS.items():
            message = re.sub(rf"(?<![\w.-]){re.escape(key)}(?![\w])", option, message)
        raise ConfigError(message) from None


def build_trainer(teacher: str, student: str, image_size: int, batch: int, precision: str,
                  total_steps: int, device: str, num_classes: int, workdir: Path,
                  teacher_kwargs: dict[str, Any] | None = None,
                  student_kwargs: dict[str, Any] | None = None, temperature: float = 4.0,
                  alpha: float = 0.5, seed: int = 0,
                  kd_overrides: Sequence[str] = ()) -> tuple[Any, nn.Module]:
    """A kd Trainer for the benchmark, and the teacher for the other loops.

    The random-initialised teacher is saved under ``workdir`` for the Trainer (kd distils only
    from a teacher with weights); the other loops get the fp32 model itself, frozen, on the
    Trainer's device: kd's own copy may be cast (``teacher.dtype``), and that choice is part of
    what is measured. The data is the synthetic dataset, without loader workers.
    """
    t_kwargs = model_kwargs(teacher, image_size, teacher_kwargs)
    s_kwargs = model_kwargs(student, image_size, student_kwargs)
    torch.manual_seed(seed + 1)
    with bench_options():
        model = create_timm_model(teacher, "teacher", num_classes=num_classes, **t_kwargs)
    weights = workdir / "teacher.safetensors"
    save_weights(weights, model.state_dict(), {"name": teacher})
    overrides = {
        "output_dir": str(workdir / "kd"), "seed": seed,
        "student.name": student, "student.kwargs": s_kwargs,
        "teacher.name": teacher, "teacher.kwargs": t_kwargs, "teacher.checkpoint": str(weights),
        "data.name": "synthetic", "data.num_classes": num_classes, "data.image_size": image_size,
        "data.batch_size": batch, "data.num_workers": 0, "data.synthetic_size": batch,
        "data.augment": False,
        "distill.loss": "soft", "distill.temperature": temperature, "distill.alpha": alpha,
        "train.precision": precision, "train.device": device, "train.max_steps": total_steps,
        "checkpoint.resume": "none", "checkpoint.every_steps": 0,
    }
    # JSON is YAML: dictionaries and strings pass through the dotted overrides unchanged.
    # ``kd_overrides`` (``--set``) go last: kd options under test, e.g. train.compile=true.
    cfg = load_config(None, [*(f"{k}={json.dumps(v)}" for k, v in overrides.items()),
                             *kd_overrides])
    with bench_options():  # the Trainer checks that both models take the images
        trainer = Trainer(cfg)
    return trainer, model.to(trainer.device).eval().requires_grad_(False)


def plain_copy(student: nn.Module) -> nn.Module:
    """A copy of kd's freshly built student for the other loops, without kd's options on it
    (``student.grad_checkpointing`` is kd's, so its cost shows in kd ÷ plain)."""
    model = copy.deepcopy(student)
    if getattr(model, "grad_checkpointing", False):
        model.set_grad_checkpointing(False)
    return model


def make_kd_step(trainer: Trainer, images: torch.Tensor,
                 targets: torch.Tensor) -> Callable[[], None]:
    """One ``Trainer.train_step`` on the in-memory batch (it advances the step, and the
    schedule with it, as in ``train``)."""
    batches = itertools.repeat((images, targets, []))

    def step() -> None:
        trainer.train_step(batches)

    return step


def time_steps(step: Callable[[], None], n: int, device: torch.device) -> float:
    """Seconds for ``n`` calls of ``step``, with one device synchronisation at each end."""
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    _sync(device)
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------ the benchmark
def bench_image_size(teacher: str = DEFAULT_TEACHER, student: str = DEFAULT_STUDENT,
                     image_size: int = 224, batch: int = 32, precision: str = "auto",
                     steps: int = 5, warmup: int = 2, rounds: int = 3, device: str = "auto",
                     num_classes: int = 1000, teacher_kwargs: dict[str, Any] | None = None,
                     student_kwargs: dict[str, Any] | None = None, temperature: float = 4.0,
                     alpha: float = 0.5, kd_overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Images/s of the three loops at one image size, their ratios, FLOPs and MFU.

    Args:
        teacher, student: timm model names (random initialisation, no download).
        image_size: side of the square images.
        batch: images per step.
        precision: ``auto`` (as kd's ``train.precision=auto``: bf16 on GPUs and AMX CPUs), ``fp32``,
            ``bf16`` or ``fp16`` (autocast, and a gradient scaler in every loop with fp16).
        steps: timed steps per loop per round.
        warmup: untimed steps of each loop before the first round.
        rounds: rounds of ``plain``, ``kd``, ``timm`` in turn.
        device: ``auto``, ``cpu`` or ``cuda``.
        num_classes: classifier outputs of both models.
        teacher_kwargs, student_kwargs: extra ``timm.create_model`` arguments (e.g. a tiny
            ``embed_dim``); ``img_size`` is added for models that take it.
        temperature, alpha: the soft-KD temperature and the distillation term's weight.

    Returns:
        ``{"image_size", "precision", "optimizer", "flops", "flops_per_image", "peak_flops",
        "peak_source", "rows": {loop: {"img_per_s", "rounds", "min", "max", "spread", "mfu"}},
        "ratios": {"kd/plain", "kd/timm"}, "ratio_rounds", "kd_phases"}``.
    """
    for name, value, least in (("steps", steps, 1), ("rounds", rounds, 1), ("warmup", warmup, 0),
                               ("batch", batch, 1), ("num-classes", num_classes, 2)):
        if value < least:
            raise UserError(f"--{name} {value}: must be >= {least}")
    if precision not in PRECISIONS:
        raise UserError(f"--precision {precision}: choose one of {', '.join(PRECISIONS)}")

    with tempfile.TemporaryDirectory(prefix="kd_bench_") as tmp:
        trainer, teacher_model = build_trainer(
            teacher, student, image_size, batch, precision, warmup + rounds * steps + 1, device,
            num_classes, Path(tmp), teacher_kwargs, student_kwargs, temperature, alpha,
            kd_overrides=kd_overrides)
    dev, prec = trainer.device, trainer.precision
    g = torch.Generator().manual_seed(0)
    channels = trainer.cfg.student.channels
    images = torch.rand(batch, channels, image_size, image_size, generator=g).to(dev)
    targets = torch.randint(0, num_classes, (batch,), generator=g).to(dev)

    plain_step, optimizer_kind = make_plain_step(plain_copy(trainer.student_core),
                                                 teacher_model, images, targets, prec,
                                                 temperature, alpha)
    timm_step = make_timm_step(plain_copy(trainer.student_core), teacher_model, images,
                               targets, prec, temperature, alpha)
    loops = {"plain": plain_step, "kd": make_kd_step(trainer, images, targets),
             "timm": timm_step}
    names = list(LOOPS)
    work = [o for o in kd_overrides if o.split("=", 1)[0].strip() in WORK_OPTIONS]
    if work:  # kd's step does more (feature pairs): time it against kd on logits alone too
        with tempfile.TemporaryDirectory(prefix="kd_bench_") as tmp:
            logits_only, _ = build_trainer(
                teacher, student, image_size, batch, precision, warmup + rounds * steps + 1,
                device, num_classes, Path(tmp), teacher_kwargs, student_kwargs, temperature,
                alpha, kd_overrides=[o for o in kd_overrides if o not in work])
        loops[LOGITS_ONLY] = make_kd_step(logits_only, images, targets)
        names.insert(2, LOGITS_ONLY)

    flops = count_flops_safely(trainer.student_core, trainer.teachers,
                               *training_batch_inputs(trainer))
    mm_precision = matmul_precision(prec, dev)
    peaks = [measure_matmul_flops(mm_precision, dev)]
    for name in names:
        if warmup:
            time_steps(loops[name], warmup, dev)
    step_bytes = {"kd": live_step_bytes(trainer, loops["kd"])}
    if work:
        step_bytes[LOGITS_ONLY] = live_step_bytes(logits_only, loops[LOGITS_ONLY])
    trainer.timer.flush()
    seconds: dict[str, list[float]] = {name: [] for name in names}
    kd_phases: list[dict[str, float]] = []
    for r in range(rounds):
        for name in names:
            seconds[name].append(time_steps(loops[name], steps, dev))
            if name == "kd":
                kd_phases.append({k: v / steps for k, v in trainer.timer.flush().items()})
        log.info("round %d/%d at %d px: %s", r + 1, rounds, image_size, ", ".join(
            f"{n} {batch * steps / seconds[n][-1]:.1f} img/s" for n in names))
    peaks.append(measure_matmul_flops(mm_precision, dev))
    peak = max(peaks)

    rows = {}
    for name in names:
        per_round = [batch * steps / s for s in seconds[name]]
        median = statistics.median(per_round)
        rows[name] = {"img_per_s": median, "rounds": per_round, "min": min(per_round),
                      "max": max(per_round),
                      "spread": (max(per_round) - min(per_round)) / median,
                      "mfu": flops.per_image * median / peak,
                      "step_bytes": step_bytes.get(name)}
    datasheet = table_peak(torch.cuda.get_device_name(dev), mm_precision) \
        if dev.type == "cuda" else None
    return {
        "image_size": image_size, "device": str(dev), "precision": prec,
        "matmul_precision": mm_precision,
        "optimizer": f"AdamW ({optimizer_kind}) in plain and timm; kd: "
                     f"{type(trainer.optimizer).__name__} "
                     f"({'fused' if trainer.optimizer.defaults.get('fused') else 'default'})",
        "flops": {"teacher_forward": flops.teacher_forward,
                  "student_forward": flops.student_forward, "backward": flops.backward,
                  "images": flops.images, "counted_on": flops.device},
        "flops_per_image": flops.per_image,
        "peak_flops": peak, "peak_measurements": peaks,
        "peak_source": f"measured {mm_precision} matmul on {describe_device(dev)} "
                       f"({torch.get_num_threads()} threads), best of before and after the rounds",
        "datasheet_peak_flops": datasheet,
        "rows": rows,
        "loops": names,
        "ratios": {f"kd/{name}": rows["kd"]["img_per_s"] / rows[name]["img_per_s"]
                   for name in names if name != "kd"},
        # Per round (neighbouring blocks): less exposed to slow drifts of the machine's load.
        "ratio_rounds": {f"kd/{name}": [o / k for o, k in zip(seconds[name], seconds["kd"],
                                                               strict=True)]
                         for name in names if name != "kd"},
        "kd_phases": {p: statistics.median(r[p] for r in kd_phases) for p in kd_phases[0]},
        "seconds": seconds,
    }


def describe_device(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


def describe_machine(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on."""
    import psutil
    import timm

    return {
        "device": device.type, "device_name": describe_device(device),
        "cpu": describe_device(torch.device("cpu")),
        "logical_cores": psutil.cpu_count(logical=True), "threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__, "timm": timm.__version__,
        "python": platform.python_version(), "platform": platform.platform(),
    }


def run_bench(teacher: str = DEFAULT_TEACHER, student: str = DEFAULT_STUDENT,
              image_sizes: Sequence[int] = DEFAULT_IMAGE_SIZES, batch: int = 32,
              precision: str = "auto", steps: int = 5, warmup: int = 2, rounds: int = 3,
              device: str = "auto", num_classes: int = 1000,
              teacher_kwargs: dict[str, Any] | None = None,
              student_kwargs: dict[str, Any] | None = None, temperature: float = 4.0,
              alpha: float = 0.5, kd_overrides: Sequence[str] = ()) -> dict[str, Any]:
    """:func:`bench_image_size` for each image size, with the settings and the machine.

    Example:
        >>> result = run_bench(image_sizes=[112], steps=3, rounds=3)  # doctest: +SKIP
        >>> result["runs"][0]["ratios"]["kd/plain"]  # doctest: +SKIP
        0.99
    """
    check_kd_overrides(kd_overrides)
    t0 = time.perf_counter()
    runs = [bench_image_size(teacher, student, size, batch, precision, steps, warmup, rounds,
                             device, num_classes, teacher_kwargs, student_kwargs, temperature,
                             alpha, kd_overrides) for size in image_sizes]
    return {
        "settings": {"teacher": teacher, "student": student, "image_sizes": list(image_sizes),
                     "batch": batch, "precision": precision, "steps": steps, "warmup": warmup,
                     "rounds": rounds, "device": device, "num_classes": num_classes,
                     "teacher_kwargs": teacher_kwargs or {},
                     "student_kwargs": student_kwargs or {},
                     "temperature": temperature, "alpha": alpha,
                     "kd_overrides": list(kd_overrides)},
        "machine": describe_machine(torch.device(runs[0]["device"])),
        "wall_s": time.perf_counter() - t0,
        "created": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "runs": runs,
    }


# ------------------------------------------------------------------------------ output
def print_table(result: dict[str, Any]) -> None:
    """The result as a rich table: one row per image size and loop."""
    from rich.console import Console
    from rich.table import Table

    s, m = result["settings"], result["machine"]
    precision = result["runs"][0]["precision"] if result["runs"] else s["precision"]
    table = Table(title=f"kd bench: {s['teacher']} → {s['student']}, batch {s['batch']}, "
                        f"{precision}, {s['rounds']} rounds × {s['steps']} steps")
    for column in ("image", "loop", "images/s (median)", "range over rounds", "kd ÷ this",
                   "MFU", "step tensors"):
        table.add_column(column, justify="left" if column in ("image", "loop") else "right")
    for run in result["runs"]:
        names = run.get("loops", LOOPS)
        for i, name in enumerate(names):
            row = run["rows"][name]
            ratio = "—" if name == "kd" else f"{run['ratios'][f'kd/{name}']:.3f}"
            step = row.get("step_bytes")
            title = LOGITS_ONLY_TITLE if name == LOGITS_ONLY else LOOP_TITLES[name]
            table.add_row(f"{run['image_size']} px" if i == 0 else "", title,
                          f"{row['img_per_s']:.2f}",
                          f"{row['min']:.2f}–{row['max']:.2f} "
                          f"(±{format_percent(row['spread'] / 2)})",
                          ratio, format_percent(row["mfu"], fine=True),
                          format_bytes(step) if step is not None else "",
                          end_section=i == len(names) - 1)
    console = Console(width=130)
    console.print(table)
    for run in result["runs"]:
        f = run["flops"]
        console.print(
            f"{run['image_size']} px: {format_flops(run['flops_per_image'])} per image (teacher "
            f"forward {format_flops(f['teacher_forward'] / f['images'])}, student forward "
            f"{format_flops(f['student_forward'] / f['images'])}, backward "
            f"{format_flops(f['backward'] / f['images'])}); peak "
            f"{format_flops(run['peak_flops'], per_s=True)} ({run['matmul_precision']} matmul, "
            f"measured)", highlight=False, soft_wrap=True)
    console.print(f"machine: {m['device_name']}, {m['threads']} threads "
                  f"({m['logical_cores']} logical cores), torch {m['torch']}, timm {m['timm']}",
                  highlight=False, soft_wrap=True)


# What ``--set`` may change: options of how kd runs the same step. Anything else (batch, mixing,
# accumulation, losses, models) would make kd's step other work than the other loops' steps.
SPEED_OPTIONS = ("train.compile", "train.compile_mode", "teacher.dtype", "optim.zero",
                 "train.log_phases", "student.grad_checkpointing")
# Options that add work to kd's step (feature pairs): with one of them, kd's step is also timed
# without them, in the same rounds (the ``kd, logits only`` row), which measures their cost.
WORK_OPTIONS = ("distill.features", "distill.projector")


def check_kd_overrides(overrides: Sequence[str]) -> None:
    """``--set`` takes ``key=value`` for :data:`SPEED_OPTIONS` and :data:`WORK_OPTIONS` only."""
    allowed = (*SPEED_OPTIONS, *WORK_OPTIONS)
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if "=" not in item or key not in allowed:
            raise UserError(f"--set {item}: give key=value for one of {', '.join(allowed)} "
                            f"(other settings would make kd's step other work than the plain "
                            f"loop's)")


def live_step_bytes(trainer: Trainer, step: Callable[[], None]) -> int:
    """Peak bytes of the tensors one kd step creates (activations, gradients, feature tokens),
    beyond the weights and optimizer state that exist before it; counted per operator on any
    device (:class:`kd.tools.plan.LiveTensorBytes`), outside the timed rounds."""
    module = trainer.strategy.model
    held = [*module.parameters(), *module.buffers()]
    held += [t for state in trainer.optimizer.state.values() for t in state.values()
             if isinstance(t, torch.Tensor)]
    if trainer.teachers is not None:
        held += [*trainer.teachers.parameters(), *trainer.teachers.buffers()]
    with LiveTensorBytes(exclude=held) as live:
        step()
    return live.peak


def check_json_path(path: str | Path | None) -> None:
    """Before a run of minutes: fail now if ``--json`` cannot be written at the end."""
    if path is None:
        return
    folder = Path(path).resolve().parent
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise UserError(f"--json {path}: folder {folder} does not exist or is not writable")


def write_json(result: dict[str, Any], path: str | Path) -> None:
    """Every number, the settings and the machine, as JSON (written atomically)."""
    try:
        atomic_write_text(Path(path), json.dumps(result, indent=1) + "\n")
    except OSError as e:
        raise output_error(f"--json {path}: cannot write it", e, setting="--json") from None

"""The profiling run behind ``kd profile``, and the measurements other tools share.

The ranges it reads are opened by :func:`kd.core.annotate.annotate` around every training phase.

- :func:`run_profile` — a short training run under ``torch.profiler`` on every rank, with a
  background sampler of CPU (and GPU) utilisation, per-step phase times, counted FLOPs and a
  measured or tabulated peak; rank 0 gathers every rank's summary and writes the report
  (:mod:`kd.tools.report`).

"""

from __future__ import annotations

import json
import logging
import platform
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch
import torch.distributed as dist
from torch import nn
from torch.autograd import DeviceType
from torch.func import functional_call
from torch.utils._pytree import tree_leaves, tree_map
from torch.utils.flop_counter import FlopCounterMode

from kd.core.annotate import SMPROF_MODULE, import_smprof
from kd.core.trainer import Trainer
from kd.errors import UserError
from kd.tools import report

log = logging.getLogger("kd")

EXTERNAL_PROFILERS = ("none", "nsys", "sagemaker")

# ------------------------------------------------------------------------------ step timer
# ------------------------------------------------------------------------------ sampling
@dataclass
class ResourceSamples:
    """What the background sampler saw: times (s since start), per-core CPU % (whole machine),
    this process's and its children's (loader workers') CPU % of one core, RSS, GPU %."""

    t: list[float] = field(default_factory=list)
    cpu: list[list[float]] = field(default_factory=list)
    process: list[float] = field(default_factory=list)
    workers: list[float] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)
    gpu: list[float] = field(default_factory=list)
    gpu_source: str = "no GPU"


def gpu_utilization_reader(device: torch.device) -> tuple[Callable[[], float] | None, str]:
    """A reader of the GPU's utilisation (NVML through ``torch.cuda.utilization``) and a note.

    ``torch.cuda.utilization`` needs the ``pynvml`` module (package ``nvidia-ml-py``); without
    it, or on a CPU, there is no reader and the note says why.
    """
    if device.type != "cuda":
        return None, "no GPU"
    try:
        torch.cuda.utilization(device)
    except Exception as e:  # ModuleNotFoundError without pynvml, NVML errors in containers
        return None, (f"GPU utilisation not sampled: {str(e).splitlines()[0]} "
                      f"(pip install nvidia-ml-py)")
    return (lambda: float(torch.cuda.utilization(device))), "NVML (torch.cuda.utilization)"


class ResourceSampler:
    """Samples per-core CPU utilisation, this process's RSS and GPU utilisation in a thread.

    ``psutil.cpu_percent(percpu=True)`` reports the utilisation since its previous call, so each
    sample covers one interval; so do the per-process readings, which separate kd's own load
    (main process, loader workers) from other processes on the machine.
    """

    def __init__(self, interval: float = 0.1, device: torch.device | None = None) -> None:
        self.interval = interval
        self.samples = ResourceSamples()
        self.gpu_reader, self.samples.gpu_source = gpu_utilization_reader(
            device or torch.device("cpu"))
        self.process = psutil.Process()
        self._children: dict[int, psutil.Process] = {}  # kept: cpu_percent needs its last call
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kd-resource-sampler",
                                        daemon=True)
        self.t0 = 0.0

    def __enter__(self) -> ResourceSampler:
        psutil.cpu_percent(percpu=True)  # the first call only starts the interval
        self.process.cpu_percent()
        self.t0 = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()  # the last partial interval, and at least one sample

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _children_percent(self) -> float:
        """CPU % of this process's children; a new child's first reading only starts it."""
        total = 0.0
        try:
            children = self.process.children(recursive=True)
        except psutil.Error:
            return total
        for child in children:
            known = self._children.setdefault(child.pid, child)
            try:
                total += known.cpu_percent()
            except psutil.Error:  # exited between listing and reading
                self._children.pop(child.pid, None)
        return float(total)

    def _sample(self) -> None:
        s = self.samples
        s.t.append(time.perf_counter() - self.t0)
        s.cpu.append([float(v) for v in psutil.cpu_percent(percpu=True)])
        s.process.append(float(self.process.cpu_percent()))
        s.workers.append(self._children_percent())
        s.rss.append(int(self.process.memory_info().rss))
        if self.gpu_reader is not None:
            try:
                s.gpu.append(self.gpu_reader())
            except Exception:  # one failed NVML read must not end the sampling
                s.gpu.append(float("nan"))


# ------------------------------------------------------------------------------ FLOPs
@dataclass(frozen=True)
class FlopCount:
    """FLOPs of one micro-batch counted by ``torch.utils.flop_counter.FlopCounterMode``."""

    teacher_forward: int
    student_forward: int
    backward: int
    images: int
    device: str  # where they were counted: "meta" (shapes only) or the training device

    @property
    def per_image(self) -> float:
        return (self.teacher_forward + self.student_forward + self.backward) / self.images


def _stand_ins(module: torch.nn.Module, device: torch.device | str,
               trainable: bool) -> dict[str, torch.Tensor]:
    """Parameters and buffers to run ``module`` with through ``functional_call``.

    On the meta device they hold shapes only. Elsewhere they are detached copies, so counting
    never writes gradients into (or fires DDP / DeepSpeed hooks on) the real parameters.
    """
    out: dict[str, torch.Tensor] = {}
    for name, t in (*module.named_parameters(), *module.named_buffers()):
        copy = torch.empty_like(t, device=device) if str(device) == "meta" else t.detach().clone()
        if trainable and isinstance(t, torch.nn.Parameter) and t.requires_grad:
            copy.requires_grad_(True)
        out[name] = copy
    return out


def count_flops(student: nn.Module, teacher: nn.Module | None, x_student: torch.Tensor,
                x_teacher: Any, device: torch.device | str = "meta") -> FlopCount:
    """Teacher forward + student forward + backward FLOPs on one batch.

    Args:
        student: the (unwrapped) student, in training mode.
        teacher: the frozen teacher(s) (:class:`~kd.core.teachers.TeacherSet`), or None
            (labels only, or a teacher cache).
        x_student: a batch as the student takes it (normalised); FLOPs depend on its shape only.
        x_teacher: the teacher's input for the same batch (a list with a ``TeacherSet``), or
            None.
        device: where to count. The models run through ``torch.func.functional_call`` on
            stand-in tensors (the meta device by default: nothing is computed), so the
            training state is untouched. On meta, attention is counted through its matrix
            products; on a CPU device it would not be (the fused CPU attention kernel has no
            FLOP formula), one more reason to count on meta.

    The backward pass starts from the sum of the student's outputs: the loss's own FLOPs are
    negligible and not matrix products, which is what the counter counts.
    """
    x_student = x_student.detach().to(device)
    counts = []
    with FlopCounterMode(display=False) as counter:
        if x_teacher is not None and teacher is not None:
            functional_call(teacher, _stand_ins(teacher, device, False),
                            (tree_map(lambda t: t.detach().to(device), x_teacher),))
    counts.append(counter.get_total_flops())
    with FlopCounterMode(display=False) as counter:
        out = functional_call(student, _stand_ins(student, device, True), (x_student,))
    counts.append(counter.get_total_flops())
    # Every tensor the student returns: logits, DeiT's pair, projected feature tokens.
    surrogate = sum(o.float().sum() for o in tree_leaves(out) if isinstance(o, torch.Tensor))
    with FlopCounterMode(display=False) as counter:
        surrogate.backward()
    counts.append(counter.get_total_flops())
    return FlopCount(*counts, images=x_student.shape[0], device=str(device))


def forward_flops(model: nn.Module, x: torch.Tensor) -> int:
    """FLOPs of one forward of ``model`` on ``x``, without autograd: counted on the meta device
    (stand-in weights, nothing computed), or on copies on ``x``'s device when an operator has
    no meta implementation."""
    for device in ("meta", x.device):
        try:
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                functional_call(model, _stand_ins(model, device, False), (x.to(device),))
            return counter.get_total_flops()
        except (NotImplementedError, RuntimeError):
            if device != "meta":
                raise
    raise AssertionError("unreachable: the loop returns or raises")


def count_flops_safely(student: nn.Module, teacher: nn.Module | None, x_student: torch.Tensor,
                       x_teacher: Any) -> FlopCount:
    """:func:`count_flops` on the meta device, or on copies on the inputs' device when an
    operator has no meta implementation."""
    try:
        return count_flops(student, teacher, x_student, x_teacher, "meta")
    except (NotImplementedError, RuntimeError) as e:
        log.info("counting FLOPs on the meta device failed (%s); counting on %s",
                 str(e).splitlines()[0], x_student.device)
        return count_flops(student, teacher, x_student, x_teacher, x_student.device)


def training_batch_inputs(trainer: Trainer) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """A training batch's model inputs, for counting FLOPs: the first training image repeated
    ``data.batch_size`` times, normalised for the student and the teacher as training does."""
    image = trainer.train_set[0][0]
    batch = trainer.cfg.data.batch_size
    images = image[None].expand(batch, *image.shape).to(trainer.device)
    with torch.no_grad():
        return trainer.task.prepare(images)


# ------------------------------------------------------------------------------ peak FLOP/s
# Dense peaks (without 2:4 sparsity) in FLOP/s by matmul precision, from NVIDIA's datasheets:
# "NVIDIA A100 Tensor Core GPU" (BF16/FP16 312 TFLOPS, TF32 156, FP32 19.5), "NVIDIA H100 Tensor
# Core GPU" (SXM: BF16/FP16 989, TF32 494, FP32 67; PCIe: 756, 378, 51) and "NVIDIA H200 Tensor
# Core GPU" (SXM: the H100 SXM's compute, 989, 494, 67). The datasheets print tensor-core figures
# with sparsity; dense is half of those. Entries: (name contains, name must not contain, peaks).
GPU_PEAK_FLOPS: tuple[tuple[str, tuple[str, ...], dict[str, float]], ...] = (
    ("H100", ("PCIe", "NVL"), {"bf16": 989e12, "fp16": 989e12, "tf32": 494e12, "fp32": 67e12}),
    ("H100 PCIe", (), {"bf16": 756e12, "fp16": 756e12, "tf32": 378e12, "fp32": 51e12}),
    ("H200", ("NVL",), {"bf16": 989e12, "fp16": 989e12, "tf32": 494e12, "fp32": 67e12}),
    ("A100", (), {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
)
MATMUL_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
                 "tf32": torch.float32}


def matmul_precision(precision: str, device: torch.device) -> str:
    """The precision matrix products run in: fp32 autocast on a GPU is TF32 when enabled."""
    if precision == "fp32" and device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return precision


def table_peak(device_name: str, precision: str) -> float | None:
    """The datasheet peak of a known GPU for a matmul precision, else None."""
    for needle, excluded, peaks in GPU_PEAK_FLOPS:
        if needle in device_name and not any(x in device_name for x in excluded):
            return peaks.get(precision)
    return None


def measure_matmul_flops(precision: str, device: torch.device, max_size: int | None = None,
                         min_seconds: float = 0.3) -> float:
    """FLOP/s of square matrix products in ``precision``, measured here and now.

    The peak a model could reach on this device with this process's threads: on a CPU, that is
    oneDNN/MKL's GEMM for the precision (fast with AMX or AVX-512 BF16, very slow without).
    The size doubles from 256 while one product takes under 50 ms, up to ``max_size``, so a
    slow precision is measured in a fraction of a second too.
    """
    max_size = max_size or (8192 if device.type == "cuda" else 2048)
    dtype = MATMUL_DTYPES[precision]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def timed(a: torch.Tensor, b: torch.Tensor, repeats: int) -> float:
        sync()
        t0 = time.perf_counter()
        for _ in range(repeats):
            a @ b
        sync()
        return time.perf_counter() - t0

    size = 256
    while True:
        a = torch.randn(size, size, device=device).to(dtype)
        b = torch.randn(size, size, device=device).to(dtype)
        once = timed(a, b, 2) / 2  # also warms up kernel selection and thread pools
        if once >= 0.05 or size >= max_size:
            break
        size *= 2
    # A peak is a maximum: the best of three rounds, so a burst of other work during one round
    # does not lower it.
    repeats = max(1, min(1000, int(min_seconds / 3 / max(once, 1e-6))))
    return max(2.0 * size**3 * repeats / timed(a, b, repeats) for _ in range(3))


def peak_flops(device: torch.device, precision: str) -> tuple[float, str]:
    """Peak FLOP/s for ``precision`` on ``device`` and where the number comes from."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = table_peak(name, precision)
        if peak is not None:
            return peak, f"datasheet peak of the {name} ({precision}, dense)"
        return (measure_matmul_flops(precision, device),
                f"measured {precision} matmul on the {name} (not in kd's table)")
    return (measure_matmul_flops(precision, device),
            f"measured {precision} matmul on this CPU ({torch.get_num_threads()} threads)")


# ------------------------------------------------------------------------------ memory
def tensor_bytes(tensors: Iterable[Any]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def optimizer_state_bytes(optimizer: Any) -> int:
    """Bytes of this rank's optimizer state (its shard under ZeRO / DeepSpeed)."""
    inner = getattr(optimizer, "optim", None) or getattr(optimizer, "optimizer", None)
    if inner is not None and hasattr(inner, "state"):
        return optimizer_state_bytes(inner)
    state = getattr(optimizer, "state", {})
    return sum(tensor_bytes(s.values()) for s in state.values() if isinstance(s, dict))


def model_bytes(student: nn.Module, teacher: nn.Module | None,
                optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Parameters, gradients (one per trainable parameter), optimizer state and teacher bytes."""
    params = list(student.parameters())
    return {
        "parameters": tensor_bytes(params),
        "gradients": tensor_bytes(p for p in params if p.requires_grad),
        "optimizer_state": optimizer_state_bytes(optimizer),
        "teacher": tensor_bytes([*teacher.parameters(), *teacher.buffers()]) if teacher else 0,
    }


# ------------------------------------------------------------------------------ external tools
class ExternalCapture:
    """Starts and stops an external profiler around the active steps.

    ``nsys``: ``cudaProfilerStart/Stop`` (``torch.cuda.profiler``), for
    ``nsys profile --capture-range=cudaProfilerApi``. ``sagemaker``: SageMaker Profiler's
    ``SMProfiler.instance()`` (configured with ``EnableCuda``), as in AWS's guide. Both tools
    collect GPU activity through CUPTI, which takes one subscriber at a time, so with either of
    them ``torch.profiler`` records CPU activity only.
    """

    def __init__(self, kind: str, device: torch.device) -> None:
        if kind not in EXTERNAL_PROFILERS:
            raise UserError(f"--external-profiler {kind}: choose one of "
                            f"{', '.join(EXTERNAL_PROFILERS)}")
        self.kind, self.device, self._smprof = kind, device, None
        if kind == "nsys" and device.type != "cuda":
            raise UserError("--external-profiler nsys needs a CUDA device (Nsight Systems "
                            "captures GPU activity); drop it on CPU")
        if kind == "sagemaker":
            module = import_smprof()
            if module is None:
                raise UserError("--external-profiler sagemaker needs SageMaker Profiler's "
                                f"'{SMPROF_MODULE}' module, which ships only in SageMaker's "
                                "training containers")
            self._smprof = module.SMProfiler.instance()
            config = module.Config()
            config.profiler = {"EnableCuda": "1" if device.type == "cuda" else "0"}
            self._smprof.configure(config)

    @property
    def owns_cupti(self) -> bool:
        return self.kind != "none"

    def start(self) -> None:
        if self.kind == "nsys":
            torch.cuda.profiler.start()
        elif self._smprof is not None:
            self._smprof.start_profiling()

    def stop(self) -> None:
        if self.kind == "nsys":
            torch.cuda.synchronize(self.device)
            torch.cuda.profiler.stop()
        elif self._smprof is not None:
            self._smprof.stop_profiling()


# ------------------------------------------------------------------------------ the run
@dataclass(frozen=True)
class ProfileSettings:
    """``kd profile`` options: the torch.profiler schedule and the report's table length."""

    wait: int = 1
    warmup: int = 2
    active: int = 5
    top: int = 15
    external: str = "none"
    sample_interval: float = 0.1

    def validate(self) -> None:
        for name in ("wait", "warmup"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name} {getattr(self, name)}: must be >= 0")
        if self.active < 1:
            raise UserError(f"--active {self.active}: profile at least one step")
        if self.top < 1:
            raise UserError(f"--top {self.top}: must be >= 1")
        if self.external not in EXTERNAL_PROFILERS:
            raise UserError(f"--external-profiler {self.external}: choose one of "
                            f"{', '.join(EXTERNAL_PROFILERS)}")


# Files a run writes; cleared first so a second run into the same directory cannot mix.
_ARTEFACTS = ("trace_rank*.json", "tb/rank*.pt.trace.json", "report.md", "report.html",
              "phases.png", "utilisation.png", "memory.png", "ranks.png", "profile.json",
              "metrics.jsonl")


def prepare_run_dir(out: Path) -> None:
    """Create the run directory, refusing a training run's (its metrics would be replaced)."""
    if (out / "checkpoints").is_dir() or (out / "summary.json").is_file():
        raise UserError(f"--out {out} holds a training run; profile into another directory "
                        f"(the default is <output_dir>/profile)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        for pattern in _ARTEFACTS:
            for path in out.glob(pattern):
                path.unlink()
    except OSError as e:
        raise UserError(f"--out {out}: cannot write there: {e.strerror}") from None


def _op_rows(prof: torch.profiler.profile) -> list[dict[str, Any]]:
    """``key_averages()`` as plain rows (seconds), for the analysis in :mod:`kd.tools.report`."""
    rows = []
    for e in prof.key_averages():
        rows.append({
            "name": e.key, "calls": int(e.count),
            "kind": "kernel" if e.device_type == DeviceType.CUDA else "cpu_op",
            "self_cpu_s": e.self_cpu_time_total / 1e6, "cpu_total_s": e.cpu_time_total / 1e6,
            "self_device_s": e.self_device_time_total / 1e6,
            "device_total_s": e.device_time_total / 1e6,
        })
    return rows


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gather(obj: Any) -> list[Any]:
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def run_profile(trainer: Trainer, out_dir: str | Path,
                settings: ProfileSettings | None = None) -> dict[str, Any] | None:
    """Profile ``wait + warmup + active`` training steps and write the report (rank 0).

    Every rank runs the same steps under ``torch.profiler`` (CPU activity, plus CUDA on GPUs)
    with ``profile_memory`` and ``record_shapes``, writes ``trace_rank{r}.json`` and a
    TensorBoard trace under ``tb/``; rank 0 gathers the summaries and writes ``report.md``,
    ``report.html`` (self-contained), the PNG plots and ``profile.json``.

    Args:
        trainer: a built :class:`kd.core.trainer.Trainer` whose ``output_dir`` is ``out_dir``
            (its config and metrics records go there too).
        out_dir: the run directory.
        settings: schedule and options.

    Returns:
        The analysis on rank 0 (verdict, recommendations, paths), None on other ranks.

    Example:
        >>> trainer = Trainer(load_config(None, ["output_dir=runs/p"]))  # doctest: +SKIP
        >>> run_profile(trainer, "runs/p")["verdict"]["kind"]  # doctest: +SKIP
        'compute-bound'
    """
    settings = settings or ProfileSettings()
    settings.validate()
    info, device = trainer.dist, trainer.device
    external = ExternalCapture(settings.external, device)
    out = Path(out_dir)
    error = None
    if info.is_main:
        try:
            prepare_run_dir(out)
        except UserError as e:
            error = str(e)
    error = _broadcast(error)  # every rank stops, not only rank 0
    if error is not None:
        raise UserError(error)

    # The run: exactly the schedule's steps from wherever the trainer starts (a resumed step).
    n_steps = settings.wait + settings.warmup + settings.active
    first_active = settings.wait + settings.warmup
    baseline = _measure_before_training(trainer)

    ops: list[dict[str, Any]] = []

    def on_trace_ready(prof: torch.profiler.profile) -> None:
        # One export, for TensorBoard's profiler plugin; the per-rank Chrome trace is a copy.
        worker = f"rank{info.rank}"
        torch.profiler.tensorboard_trace_handler(str(out / "tb"), worker_name=worker)(prof)
        newest = max((out / "tb").glob(f"{worker}.*.pt.trace.json"),
                     key=lambda p: p.stat().st_mtime_ns)
        shutil.copyfile(newest, out / f"trace_rank{info.rank}.json")
        ops.extend(_op_rows(prof))

    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda" and not external.owns_cupti:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    ops_on = "cuda" if torch.profiler.ProfilerActivity.CUDA in activities else "cpu"
    steps: list[dict[str, float]] = []
    walls: list[float] = []
    marks: dict[str, float] = {}
    sampler = ResourceSampler(settings.sample_interval, device)
    schedule = torch.profiler.schedule(wait=settings.wait, warmup=settings.warmup,
                                       active=settings.active, repeat=1)
    with sampler, torch.profiler.profile(activities=activities, schedule=schedule,
                                         on_trace_ready=on_trace_ready, record_shapes=True,
                                         profile_memory=True) as prof:
        if first_active == 0:
            external.start()
            marks["active_start"] = time.perf_counter() - sampler.t0
        last = [time.perf_counter()]

        def on_step(trainer: Trainer) -> None:
            steps.append(trainer.timer.end_step())
            walls.append(time.perf_counter() - last[0])
            prof.step()
            done = len(steps)
            if done == first_active:
                external.start()
                marks["active_start"] = time.perf_counter() - sampler.t0
            elif done == first_active + settings.active:
                external.stop()
                marks["active_end"] = time.perf_counter() - sampler.t0
            last[0] = time.perf_counter()  # profiler bookkeeping is not step time

        trainer.train(evaluate=False, save=False, steps=n_steps, on_step=on_step)
    samples = sampler.samples

    active = slice(first_active, first_active + settings.active)
    cfg = trainer.cfg
    summary = {
        "rank": info.rank, "host": socket.gethostname(), "local_rank": info.local_rank,
        "steps": steps[active], "walls": walls[active], "first_step": trainer.step - n_steps,
        "ops": report.compact_ops(ops, keep=max(50, settings.top)),
        "op_totals": rank_op_totals(ops, ops_on, list(steps[0]) if steps else (),
                                    out / f"trace_rank{info.rank}.json"),
        "memory": _memory(trainer, baseline, samples),
        "images_per_step": cfg.data.batch_size * cfg.train.grad_accum_steps,
        "samples": {"t": samples.t, "cpu": samples.cpu, "process": samples.process,
                    "workers": samples.workers, "gpu": samples.gpu,
                    "gpu_source": samples.gpu_source, **marks},
        **{k: baseline[k] for k in ("flops", "peak_flops", "peak_source", "matmul_precision",
                                    "bf16_speedup")},
    }
    summaries = _gather(summary)
    if not info.is_main:
        return None
    meta = _run_meta(trainer, settings, ops_on)
    analysis = report.write_report(summaries, meta, out, top=settings.top)
    (out / "profile.json").write_text(json.dumps(
        {"meta": meta, "analysis": analysis, "ranks": summaries}, indent=1, default=str) + "\n")
    return analysis


def rank_op_totals(ops: list[dict[str, Any]], ops_on: str, exclude: Iterable[str],
                   trace: Path) -> dict[str, float]:
    """:func:`kd.tools.report.op_totals`, with communication measured on the GPU timeline.

    Where CUDA kernels were recorded, ``comm_s`` (NCCL kernel seconds) and ``exposed_comm_s``
    (the part no compute kernel overlaps) come from this rank's Chrome trace
    (:func:`kd.tools.report.comm_exposure`): ``key_averages`` carries no timestamps, so it cannot
    tell the all-reduces DDP hides behind backward from those the step waits for. On a CPU
    (gloo) there are no device kernels; the totals stay as ``op_totals`` gives them, without
    ``exposed_comm_s``, and the verdict counts all of the backend's time, as it always has.
    """
    totals = report.op_totals(ops, ops_on, exclude=list(exclude))
    if ops_on == "cuda" and trace.is_file():
        kernels = report.trace_kernels(json.loads(trace.read_text()))
        totals.update(report.comm_exposure(kernels))
    return totals


def _measure_before_training(trainer: Trainer) -> dict[str, Any]:
    """FLOPs per batch, the peak to compare with and memory baselines, before profiling."""
    device = trainer.device
    flops = count_flops_safely(trainer.student_core, trainer.teachers,
                               *training_batch_inputs(trainer))
    precision = matmul_precision(trainer.precision, device)
    _barrier()  # ranks sharing a machine measure the peak together, as they will train
    peak, source = peak_flops(device, precision)
    bf16_speedup = None
    if precision in ("fp32", "tf32"):  # would bf16 pay off here? (the fp32-gemm rule asks)
        bf16_speedup = peak_flops(device, "bf16")[0] / peak
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return {
        "flops": {"teacher_forward": flops.teacher_forward,
                  "student_forward": flops.student_forward, "backward": flops.backward,
                  "images": flops.images, "counted_on": flops.device},
        "peak_flops": peak, "peak_source": source, "matmul_precision": precision,
        "bf16_speedup": bf16_speedup,
        "tensors": model_bytes(trainer.student_core, trainer.teachers, trainer.optimizer),
        "rss": psutil.Process().memory_info().rss,
    }


def _memory(trainer: Trainer, baseline: dict[str, Any], samples: ResourceSamples
            ) -> dict[str, Any]:
    """Peak memory (the allocator's on a GPU, the sampled RSS on a CPU) and tensor bytes."""
    memory: dict[str, Any] = model_bytes(trainer.student_core, trainer.teachers,
                                         trainer.optimizer)
    if trainer.device.type == "cuda":
        memory.update(peak=int(torch.cuda.max_memory_allocated(trainer.device)),
                      peak_source="torch.cuda.max_memory_allocated", runtime=0)
        return memory
    # RSS also holds the Python/torch runtime and the data: what it held before training
    # beyond the tensors alive then.
    before = baseline["tensors"]
    runtime = baseline["rss"] - before["parameters"] - before["teacher"] \
        - before["optimizer_state"]
    memory.update(peak=int(max(samples.rss, default=baseline["rss"])),
                  peak_source="process RSS, sampled", runtime=max(0, runtime))
    return memory


def _run_meta(trainer: Trainer, settings: ProfileSettings, ops_on: str) -> dict[str, Any]:
    """What was profiled, where and how: the report's setup table."""
    cfg, info, device = trainer.cfg, trainer.dist, trainer.device
    return {
        "student": cfg.student.name,
        "teacher": ", ".join(trainer.teachers.names) if trainer.teachers else None,
        "distill_loss": cfg.distill.loss, "image_size": cfg.data.image_size,
        "dataset": cfg.data.name, "decode": cfg.data.decode, "batch_size": cfg.data.batch_size,
        "grad_accum_steps": cfg.train.grad_accum_steps, "precision": trainer.precision,
        "world_size": info.world_size, "local_world_size": info.local_world_size,
        "backend": info.backend, "device": device.type, "ops_on": ops_on,
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else cpu_model()),
        "logical_cores": psutil.cpu_count(logical=True) or 1,
        "threads": torch.get_num_threads(),
        "num_workers": trainer.num_workers,
        "strategy": cfg.dist.strategy,
        "sharded_optimizer": bool(cfg.optim.zero or cfg.dist.strategy == "deepspeed"),
        "schedule": {"wait": settings.wait, "warmup": settings.warmup,
                     "active": settings.active},
        "torch": torch.__version__, "external_profiler": settings.external,
        "created": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }

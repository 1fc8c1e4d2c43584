"""The ``kd profile`` report: analysis of the gathered numbers, and ``report.md`` / ``.html``.

The analysis is pure functions over plain numbers and dicts (unit-tested on constructed
cases): :func:`phase_spread`, :func:`op_totals`, :func:`comm_exposure` (communication kernels
not overlapped by compute, from a trace's kernel intervals), :func:`classify` (the verdict) and
:func:`recommend` (each recommendation carries the number that triggered it). Rendering builds
a list of :class:`Section` once and writes it as Markdown (with PNG files beside it) and as one
self-contained HTML file (PNGs embedded as base64).

Thresholds (also in ``profiling/README.md``):

- input-bound: data wait ≥ :data:`DATA_WAIT_THRESHOLD` of the step;
- communication-bound: exposed collectives ≥ :data:`COMM_THRESHOLD` of the step (several
  ranks). On a GPU, exposed means NCCL kernel time during which no compute kernel runs on the
  same device: DDP launches each bucket's all-reduce while backward still computes, and that
  overlapped time costs the step nothing. On a CPU (gloo) there are no device kernels, the
  overlap is not measured and all of the backend's time counts;
- compute-bound otherwise.
"""

from __future__ import annotations

import base64
import html
import math
import re
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kd.config import IMAGE_DATASETS
from kd.units import format_bytes, format_duration, format_flops, format_percent

DATA_WAIT_THRESHOLD = 0.10  # share of step time spent waiting for the loader
COMM_THRESHOLD = 0.20  # share of step time in exposed collectives (on a CPU: all of them)
CPU_SATURATED = 0.90  # mean utilisation of all cores during the profiled steps
MANY_WORKERS = 0.5  # loader processes on a node, as a share of its logical cores
OTHER_PROCESSES = 0.25  # CPU share of processes other than kd's on a saturated machine
LOADER_CPU = 0.10  # CPU share of the loader workers for them to count as competing
GEMM_SHARE_THRESHOLD = 0.20  # share of operator time in matrix products
BF16_MIN_SPEEDUP = 1.5  # bf16 matmul peak over the current precision's, to advise bf16
OPTIMIZER_STATE_SHARE = 0.25  # optimizer state as a share of peak memory
STRAGGLER_EXCESS = 0.10  # slowest rank's step time over the median rank's, minus one

# Matrix products that do the arithmetic (aten::linear / matmul call these).
GEMM_OPS = frozenset({"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm",
                      "aten::_addmm_activation"})
# Collectives as torch.profiler names them: c10d ops, backend ranges (gloo:/nccl:) and kernels.
COMM_PATTERN = re.compile(r"nccl|gloo|smddp|c10d::|allreduce|all_reduce|allgather|all_gather|"
                          r"reduce_scatter|broadcast|alltoall|all_to_all", re.IGNORECASE)
# A backend's own work (gloo:all_reduce, nccl:all_reduce): asynchronous events whose duration is
# the collective's, recorded on the backend's threads while c10d:: ops only enqueue them.
BACKEND_WORK = re.compile(r"^(gloo|nccl|mpi|ucc|smddp):", re.IGNORECASE)
# Device kernels that communicate. NCCL (and ROCm's RCCL) name every device kernel after the
# library: ncclKernel_* in older releases, ncclDevKernel_* in newer ones (NCCL's
# src/device/common.h). COMM_PATTERN is too wide for kernels: CUTLASS GEMMs with a broadcast
# epilogue carry "broadcast" in their names.
COMM_KERNEL = re.compile(r"nccl", re.IGNORECASE)
VERDICTS = ("input-bound", "compute-bound", "communication-bound")


# ------------------------------------------------------------------------------ analysis
@dataclass(frozen=True)
class Verdict:
    """What bounds the step, with the shares that decided it."""

    kind: str  # one of VERDICTS
    data_share: float
    comm_share: float  # exposed collectives (on a CPU, where overlap is not measured: all)
    reason: str
    comm_total_share: float | None = None  # all collective time; None: overlap not measured
    dataset: str = ""  # data.name
    decode: str = "cpu"  # data.decode


@dataclass(frozen=True)
class Recommendation:
    """One suggested change, the rule that fired and the number that triggered it."""

    rule: str
    trigger: str
    advice: str


@dataclass(frozen=True)
class Facts:
    """The numbers the recommendation rules read (one run, all ranks)."""

    data_share: float
    comm_share: float  # exposed collectives, as in Verdict
    world_size: int
    local_world_size: int
    num_workers: int
    logical_cores: int
    cpu_util: float | None  # mean over cores and the profiled steps, 0..1; None: not sampled
    precision: str  # the matmul precision: bf16, fp16, tf32, fp32
    gemm_share: float
    bf16_speedup: float | None  # bf16 peak / the current precision's; None: unknown
    optimizer_state_bytes: int
    memory_peak_bytes: int
    sharded_optimizer: bool
    slowest_rank: int = 0
    slowest_excess: float = 0.0
    own_cpu_share: float | None = None  # kd's processes (rank, loader workers), 0..1 of the machine
    workers_cpu_share: float | None = None  # the loader workers alone, 0..1 of the machine
    comm_total_share: float | None = None  # all collective time; None: overlap not measured
    dataset: str = ""  # data.name
    decode: str = "cpu"  # data.decode


def phase_spread(steps: Sequence[dict[str, float]], walls: Sequence[float] | None = None
                 ) -> dict[str, dict[str, float]]:
    """Mean, std, min, max and coefficient of variation of each phase (and the step) over steps.

    Args:
        steps: seconds per phase, one dict per step.
        walls: each step's wall time; adds a ``step`` row.
    """
    names = list(steps[0]) if steps else []
    columns: dict[str, list[float]] = {k: [s[k] for s in steps] for k in names}
    if walls is not None:
        columns["step"] = list(walls)
    out = {}
    for name, values in columns.items():
        mean = statistics.fmean(values) if values else 0.0
        std = statistics.pstdev(values) if len(values) > 1 else 0.0
        out[name] = {"mean": mean, "std": std, "min": min(values, default=0.0),
                     "max": max(values, default=0.0), "cv": std / mean if mean > 0 else 0.0}
    return out


def is_comm(name: str) -> bool:
    """Whether a profiler event is a collective (or its backend's work)."""
    return bool(COMM_PATTERN.search(name))


def is_comm_kernel(name: str) -> bool:
    """Whether a device kernel is a communication library's (NCCL, RCCL)."""
    return bool(COMM_KERNEL.search(name))


# ------------------------------------------------------------------------------ overlap
Interval = tuple[float, float]


def union_intervals(intervals: Iterable[Interval]) -> list[Interval]:
    """The union of ``(start, end)`` intervals as sorted, disjoint intervals.

    Empty intervals (``end <= start``) cover nothing and are dropped; touching ones merge.

    Example:
        >>> union_intervals([(3, 4), (0, 2), (1, 3), (5, 5)])
        [(0, 4)]
    """
    merged: list[Interval] = []
    for start, end in sorted(i for i in intervals if i[1] > i[0]):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def subtract_intervals(intervals: Iterable[Interval], cover: Iterable[Interval]
                       ) -> list[Interval]:
    """The parts of the union of ``intervals`` that no interval of ``cover`` overlaps.

    Both inputs may be unsorted and overlap among themselves; the result is sorted and
    disjoint. One pass over both sorted unions: O((n + m) log(n + m)).

    Example:
        >>> subtract_intervals([(0, 10)], [(2, 3), (5, 12)])
        [(0, 2), (3, 5)]
    """
    holes = union_intervals(cover)
    out: list[Interval] = []
    first = 0  # holes before it end before the current interval starts, and every later one
    for start, end in union_intervals(intervals):
        while first < len(holes) and holes[first][1] <= start:
            first += 1
        cursor, k = start, first
        while k < len(holes) and holes[k][0] < end:
            if holes[k][0] > cursor:
                out.append((cursor, holes[k][0]))
            cursor = max(cursor, holes[k][1])
            k += 1
        if cursor < end:
            out.append((cursor, end))
    return out


def total_length(intervals: Iterable[Interval]) -> float:
    """Summed length; of a union (disjoint intervals), the time covered."""
    return sum((end - start for start, end in intervals), 0.0)


def trace_kernels(trace: dict[str, Any]) -> list[dict[str, Any]]:
    """The device kernels of a Chrome trace as ``torch.profiler`` exports it (Kineto).

    Kernels are complete events (``"ph": "X"``) of category ``"kernel"``, with ``ts`` and
    ``dur`` in microseconds and the device in ``args.device`` (Kineto's ChromeTraceLogger; the
    categories are libkineto's ActivityType names). Memory copies (``gpu_memcpy``), memsets
    and ``gpu_user_annotation`` events — kd's phase ranges drawn on the GPU timeline, which
    span whole phases — are other categories and are left out.

    Returns:
        ``{"name", "device", "start_s", "end_s"}`` per kernel, times in seconds from the first
        kernel's start (offsets keep the precision that epoch microseconds would lose).
    """
    events = [e for e in trace.get("traceEvents", ())
              if e.get("cat") == "kernel" and e.get("ph", "X") == "X" and "ts" in e]
    if not events:
        return []
    t0 = min(float(e["ts"]) for e in events)
    kernels = []
    for e in events:
        # Ends computed in microseconds, so kernels that meet in the trace meet here too.
        start_us = float(e["ts"]) - t0
        end_us = start_us + float(e.get("dur", 0.0))
        args = e.get("args") or {}
        kernels.append({"name": str(e.get("name", "")), "device": args.get("device", e.get("pid")),
                        "start_s": start_us / 1e6, "end_s": end_us / 1e6})
    return kernels


def comm_exposure(kernels: Iterable[dict[str, Any]]) -> dict[str, float]:
    """Seconds of communication kernels in all, and exposed: not overlapped by compute.

    ``comm_s`` sums the communication kernels' durations (what ``key_averages`` reports);
    ``exposed_comm_s`` is the length of their union minus the union of every other kernel on
    the same device, over all streams. DDP starts a bucket's all-reduce asynchronously as soon
    as backward has produced all of its gradients (PyTorch docs, notes/ddp "Distributed Data
    Parallel", backward pass), so NCCL's kernels run while backward's go on on the compute
    stream; only the time no compute kernel runs alongside adds to the step.
    Summed over devices; over a window of whole steps this is the sum of the steps' own
    exposed times, since the per-step GPU synchronisation keeps steps from overlapping.

    Args:
        kernels: ``{"name", "device", "start_s", "end_s"}`` each, as :func:`trace_kernels`.
    """
    comm: dict[Any, list[Interval]] = {}
    compute: dict[Any, list[Interval]] = {}
    total = 0.0
    for k in kernels:
        span = (k["start_s"], k["end_s"])
        if is_comm_kernel(k["name"]):
            comm.setdefault(k["device"], []).append(span)
            total += max(0.0, span[1] - span[0])
        else:
            compute.setdefault(k["device"], []).append(span)
    exposed = sum((total_length(subtract_intervals(spans, compute.get(device, ())))
                   for device, spans in comm.items()), 0.0)
    return {"comm_s": total, "exposed_comm_s": exposed}


def op_totals(ops: Sequence[dict[str, Any]], device_type: str,
              exclude: Sequence[str] = ()) -> dict[str, float]:
    """Operator time totals over the profiled steps (seconds).

    ``compute_s`` is the self time of all operators (CPU) or all kernels (GPU), without kd's
    own ranges (``exclude``), ``ProfilerStep#`` ranges and collectives; ``gemm_s`` the part in
    matrix products; ``comm_s`` the time in collectives: on a GPU, the NCCL kernels; on a CPU,
    the backend's own events (``gloo:all_reduce``, which run on its threads and include waiting
    for the other ranks), else the ``c10d::`` ops. Aggregates carry no timestamps, so how much
    of ``comm_s`` overlaps compute is not known here: on a GPU the profiler adds
    ``exposed_comm_s`` from the trace (:func:`comm_exposure`).
    """
    skip = set(exclude)

    def mine(name: str) -> bool:
        return name in skip or name.startswith("ProfilerStep")

    if device_type == "cuda":
        # kd's ranges and ProfilerStep# also show on the GPU timeline (gpu_user_annotation
        # events, device type CUDA in key_averages), spanning the kernels they hold.
        kernels = [o for o in ops if o["kind"] == "kernel" and not mine(o["name"])]
        comm = sum(o["self_device_s"] for o in kernels if is_comm_kernel(o["name"]))
        compute = sum(o["self_device_s"] for o in kernels if not is_comm_kernel(o["name"]))
        gemm = sum(o["device_total_s"] for o in ops
                   if o["kind"] == "cpu_op" and o["name"] in GEMM_OPS)
    else:
        cpu = [o for o in ops if o["kind"] == "cpu_op" and not mine(o["name"])]
        backend = [o for o in cpu if BACKEND_WORK.match(o["name"])]
        if backend:  # the transfers themselves, on the backend's threads
            comm = sum(o["cpu_total_s"] for o in backend)
        else:
            comm = sum(o["self_cpu_s"] for o in cpu if is_comm(o["name"]))
        compute = sum(o["self_cpu_s"] for o in cpu if not is_comm(o["name"]))
        gemm = sum(o["self_cpu_s"] for o in cpu if o["name"] in GEMM_OPS)
    return {"compute_s": compute, "gemm_s": min(gemm, compute), "comm_s": comm}


def compact_ops(ops: Sequence[dict[str, Any]], keep: int = 50) -> list[dict[str, Any]]:
    """The rows worth shipping to rank 0: the top ``keep`` by self CPU and by self device time."""
    by_cpu = sorted(ops, key=lambda o: -o["self_cpu_s"])[:keep]
    by_dev = sorted((o for o in ops if o["self_device_s"] > 0),
                    key=lambda o: -o["self_device_s"])[:keep]
    seen, out = set(), []
    for o in (*by_cpu, *by_dev):
        if (o["name"], o["kind"]) not in seen:
            seen.add((o["name"], o["kind"]))
            out.append(dict(o))
    return out


def _in_all(comm_total_share: float | None) -> str:
    """What the exposed share leaves out, for the texts that quote it."""
    if comm_total_share is None:
        return ""
    return f" ({format_percent(comm_total_share)} in all, the rest overlapped with compute)"


def classify(data_share: float, comm_share: float, world_size: int,
             comm_total_share: float | None = None) -> Verdict:
    """Input-, communication- or compute-bound, from shares of the step time.

    Input-bound when the data wait reaches :data:`DATA_WAIT_THRESHOLD` (and is not smaller
    than the communication share); communication-bound when several ranks spend at least
    :data:`COMM_THRESHOLD` in exposed collectives; compute-bound otherwise.

    Args:
        data_share: waiting for data, share of the step.
        comm_share: exposed collectives (not overlapped by compute), share of the step; where
            the overlap is not measured (CPU), all of the collectives' time.
        world_size: ranks; one rank has no collectives.
        comm_total_share: all collective time, overlapped or not, for the reason's text; None
            where the overlap was not measured.
    """
    comm = comm_share if world_size > 1 else 0.0
    total = comm_total_share if world_size > 1 else None
    what = "exposed collectives" if total is not None else "collectives"
    if data_share >= DATA_WAIT_THRESHOLD and data_share >= comm:
        return Verdict("input-bound", data_share, comm,
                       f"waiting for data takes {format_percent(data_share)} of the step "
                       f"(threshold {format_percent(DATA_WAIT_THRESHOLD)})", total)
    if world_size > 1 and comm >= COMM_THRESHOLD:
        return Verdict("communication-bound", data_share, comm,
                       f"{what} take {format_percent(comm)} of the step (threshold "
                       f"{format_percent(COMM_THRESHOLD)}){_in_all(total)}", total)
    why = f"data wait {format_percent(data_share)} < {format_percent(DATA_WAIT_THRESHOLD)}"
    if world_size > 1:
        why += f", {what} {format_percent(comm)} < {format_percent(COMM_THRESHOLD)}{_in_all(total)}"
    return Verdict("compute-bound", data_share, comm, f"the models' arithmetic dominates ({why})",
                   total)


def recommend(f: Facts) -> list[Recommendation]:
    """Every rule that fires on these numbers, in order of how directly it speeds up a step."""
    recs = []
    if f.data_share > DATA_WAIT_THRESHOLD:
        busy = (f", CPUs {format_percent(f.cpu_util)} busy" if f.cpu_util is not None else "")
        loaders = (f", loader workers {format_percent(f.workers_cpu_share)} of the machine"
                   if f.workers_cpu_share is not None else "")
        advice = [f"feed the models faster: raise data.num_workers (now {f.num_workers}) while "
                  f"CPUs have headroom"]
        if f.dataset in IMAGE_DATASETS:
            if f.decode == "cpu":
                advice.append("set data.decode=device: the loader then only reads each JPEG and "
                              "draws its augmentation, and the training process decodes "
                              "(nvJPEG) and augments the batch on the GPU")
            advice.append("pre-resize the images once with `kd prepare-data --max-side 320` "
                          "(fewer pixels to decode and crop; `kd tune-loader` shows the gain)")
        else:
            advice.append("make each sample cheaper to produce")
        recs.append(Recommendation(
            "data-wait", f"data wait {format_percent(f.data_share)} of the step "
            f"(> {format_percent(DATA_WAIT_THRESHOLD)}) with {f.num_workers} loader "
            f"worker{'s' if f.num_workers != 1 else ''} per rank{busy}{loaders}",
            "; or ".join(advice)))
    workers_per_node = f.num_workers * f.local_world_size
    saturated = f.cpu_util is not None and f.cpu_util > CPU_SATURATED
    others = (f.cpu_util - f.own_cpu_share
              if saturated and f.own_cpu_share is not None else 0.0)
    if saturated and others >= OTHER_PROCESSES:
        recs.append(Recommendation(
            "cpu-contention", f"other processes use {format_percent(others)} of a "
            f"{format_percent(f.cpu_util)} busy machine (kd: {format_percent(f.own_cpu_share)})",
            "kd's threads wait for CPU time, so steps are slow and uneven: run on a machine "
            "of its own or pin kd to free cores (taskset, numactl), with torch threads × "
            "ranks + loader workers ≤ cores"))
    loaders_busy = f.workers_cpu_share is None or f.workers_cpu_share >= LOADER_CPU
    if (saturated and f.num_workers > 0 and workers_per_node >= MANY_WORKERS * f.logical_cores
            and others < OTHER_PROCESSES and loaders_busy):
        use = (f" using {format_percent(f.workers_cpu_share)} of the machine"
               if f.workers_cpu_share is not None else "")
        recs.append(Recommendation(
            "cpu-saturated", f"CPUs {format_percent(f.cpu_util)} busy with {workers_per_node} "
            f"loader process{'es' if workers_per_node != 1 else ''}{use} on {f.logical_cores} "
            f"logical cores",
            "lower data.num_workers: loader processes compete with the training processes' "
            "compute and launch threads"))
    if (f.precision in ("fp32", "tf32") and f.gemm_share >= GEMM_SHARE_THRESHOLD
            and (f.bf16_speedup is None or f.bf16_speedup >= BF16_MIN_SPEEDUP)):
        speed = (f"; bf16 matmuls peak {f.bf16_speedup:.1f}× higher here"
                 if f.bf16_speedup is not None else "")
        recs.append(Recommendation(
            "fp32-gemm", f"matrix products take {format_percent(f.gemm_share)} of operator time in "
            f"{f.precision}{speed}",
            "set train.precision=bf16 (autocast; weights and optimizer stay fp32)"))
    if (f.world_size > 1 and not f.sharded_optimizer and f.memory_peak_bytes > 0
            and f.optimizer_state_bytes >= OPTIMIZER_STATE_SHARE * f.memory_peak_bytes):
        saved = f.optimizer_state_bytes * (1 - 1 / f.world_size)
        recs.append(Recommendation(
            "optimizer-state", f"optimizer state {format_bytes(f.optimizer_state_bytes)} = "
            f"{format_percent(f.optimizer_state_bytes / f.memory_peak_bytes)} of peak memory, "
            f"replicated on {f.world_size} ranks",
            f"set optim.zero=true to shard it (about {format_bytes(saved)} less per rank), then "
            f"spend the memory on a larger data.batch_size"))
    if f.world_size > 1 and f.comm_share > COMM_THRESHOLD:
        what = "exposed collectives" if f.comm_total_share is not None else "collectives"
        recs.append(Recommendation(
            "communication", f"{what} {format_percent(f.comm_share)} of the step "
            f"(> {format_percent(COMM_THRESHOLD)}){_in_all(f.comm_total_share)}",
            "all-reduce less often per image: a larger data.batch_size or "
            "train.grad_accum_steps; check the interconnect (on AWS: EFA enabled, NCCL with "
            "the aws-ofi-nccl plugin)"))
    if f.world_size > 1 and f.slowest_excess > STRAGGLER_EXCESS:
        recs.append(Recommendation(
            "straggler", f"rank {f.slowest_rank} is {format_percent(f.slowest_excess)} slower "
            f"than the median rank", "every rank waits for it at each all-reduce: check that node "
            "(other processes, thermal throttling, a slower data path)"))
    return recs


def quiet_rules(f: Facts, fired: set[str]) -> list[str]:
    """For each rule that did not fire, the number that kept it quiet."""
    notes = []
    if "data-wait" not in fired:
        notes.append(f"data wait {format_percent(f.data_share)} ≤ "
                     f"{format_percent(DATA_WAIT_THRESHOLD)}")
    if not fired & {"cpu-contention", "cpu-saturated"}:
        if f.cpu_util is None:
            notes.append("CPU utilisation not sampled")
        else:
            loaders = (f" (using {format_percent(f.workers_cpu_share)})"
                       if f.workers_cpu_share is not None else "")
            n = f.num_workers * f.local_world_size
            notes.append(f"CPUs {format_percent(f.cpu_util)} busy with {n} loader "
                         f"process{'es' if n != 1 else ''}{loaders} on {f.logical_cores} "
                         f"logical cores")
    if "fp32-gemm" not in fired:
        if f.precision not in ("fp32", "tf32"):
            notes.append(f"matrix products already run in {f.precision}")
        elif f.gemm_share < GEMM_SHARE_THRESHOLD:
            notes.append(f"matrix products {format_percent(f.gemm_share)} of operator time < "
                         f"{format_percent(GEMM_SHARE_THRESHOLD)}")
        else:
            notes.append(f"matrix products {format_percent(f.gemm_share)} of operator time in "
                         f"{f.precision}, but bf16 matmuls are only {f.bf16_speedup:.2f}× as "
                         f"fast here")
    if "optimizer-state" not in fired:
        if f.world_size == 1:
            notes.append("one rank: no optimizer state to shard")
        elif f.sharded_optimizer:
            notes.append("optimizer state already sharded")
        else:
            share = f.optimizer_state_bytes / f.memory_peak_bytes if f.memory_peak_bytes else 0
            notes.append(f"optimizer state {format_percent(share)} of peak memory < "
                         f"{format_percent(OPTIMIZER_STATE_SHARE)}")
    if f.world_size == 1:
        notes.append("one rank: no collectives, no stragglers")
    else:
        if "communication" not in fired:
            what = "exposed collectives" if f.comm_total_share is not None else "collectives"
            notes.append(f"{what} {format_percent(f.comm_share)} ≤ {format_percent(COMM_THRESHOLD)}"
                         f"{_in_all(f.comm_total_share)}")
        if "straggler" not in fired:
            notes.append(f"slowest rank {format_percent(f.slowest_excess)} above the median ≤ "
                         f"{format_percent(STRAGGLER_EXCESS)}")
    return notes


# ------------------------------------------------------------------------------ per-rank stats
def rank_stats(summary: dict[str, Any]) -> dict[str, Any]:
    """Step time, shares, throughput and FLOP utilisation of one rank's summary."""
    spread = phase_spread(summary["steps"], summary["walls"])
    step_s = spread["step"]["mean"]
    n_steps = max(len(summary["walls"]), 1)
    totals = summary["op_totals"]
    comm_per_step = totals["comm_s"] / n_steps
    # Absent where no device kernels were recorded (CPU, or CUPTI lent to an external
    # profiler): the overlap is unknown and all of the collectives' time counts, as before.
    exposed = totals.get("exposed_comm_s")
    exposed_per_step = comm_per_step if exposed is None else exposed / n_steps
    img_s = summary["images_per_step"] / step_s if step_s > 0 else 0.0
    flops = summary["flops"]
    per_image = (flops["teacher_forward"] + flops["student_forward"] + flops["backward"]) \
        / flops["images"]
    achieved = per_image * img_s
    return {
        "rank": summary["rank"], "host": summary["host"], "spread": spread, "step_s": step_s,
        "data_share": spread["data"]["mean"] / step_s if step_s > 0 else 0.0,
        "comm_share": min(exposed_per_step / step_s, 1.0) if step_s > 0 else 0.0,
        "comm_total_share": min(comm_per_step / step_s, 1.0) if step_s > 0 else 0.0,
        "comm_per_step_s": comm_per_step, "exposed_comm_per_step_s": exposed_per_step,
        "comm_overlap_measured": exposed is not None,
        "gemm_share": totals["gemm_s"] / totals["compute_s"] if totals["compute_s"] > 0 else 0.0,
        "img_per_s": img_s, "flops_per_image": per_image, "achieved_flops": achieved,
        "mfu": achieved / summary["peak_flops"] if summary["peak_flops"] > 0 else 0.0,
    }


def _in_active(samples: dict[str, Any], key: str) -> list[Any]:
    """The samples of ``key`` taken during the profiled steps (all of them if none was)."""
    start, end = samples.get("active_start", -math.inf), samples.get("active_end", math.inf)
    values = samples.get(key) or []
    inside = [v for ti, v in zip(samples["t"], values) if start < ti <= end + 1e-9]
    return inside or list(values)


def cpu_utilisation(samples: dict[str, Any]) -> tuple[float | None, list[float]]:
    """Mean utilisation (0..1) over cores during the profiled steps, and per core."""
    rows = _in_active(samples, "cpu")
    if not rows:
        return None, []
    per_core = [statistics.fmean(col) / 100 for col in zip(*rows)]
    return statistics.fmean(per_core), per_core


def own_cpu_shares(samples: dict[str, Any]) -> tuple[float, float]:
    """Shares (0..1) of the whole machine used by kd's main process and by its loader workers
    during the profiled steps (per-process readings are % of one core)."""
    cores = len(samples["cpu"][0]) if samples["cpu"] else 1
    process, workers = _in_active(samples, "process"), _in_active(samples, "workers")
    mean = statistics.fmean
    return (mean(process) / 100 / cores if process else 0.0,
            mean(workers) / 100 / cores if workers else 0.0)


def analyse(summaries: Sequence[dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
    """Per-rank statistics, the verdict and the recommendations for the whole run."""
    ranks = [rank_stats(s) for s in summaries]
    data_share = statistics.fmean(r["data_share"] for r in ranks)
    comm_share = statistics.fmean(r["comm_share"] for r in ranks)  # exposed
    comm_total_share = (statistics.fmean(r["comm_total_share"] for r in ranks)
                        if all(r["comm_overlap_measured"] for r in ranks) else None)
    verdict = classify(data_share, comm_share, meta["world_size"], comm_total_share)
    steps = [r["step_s"] for r in ranks]
    slowest = max(range(len(ranks)), key=lambda i: steps[i])
    median = statistics.median(steps)
    cpu_util, _ = cpu_utilisation(summaries[0]["samples"])
    own = own_cpu_shares(summaries[0]["samples"])
    peak_memory = max(s["memory"]["peak"] for s in summaries)
    facts = Facts(
        data_share=data_share, comm_share=comm_share, world_size=meta["world_size"],
        local_world_size=meta["local_world_size"], num_workers=meta["num_workers"],
        logical_cores=meta["logical_cores"], cpu_util=cpu_util,
        precision=summaries[0]["matmul_precision"],
        gemm_share=statistics.fmean(r["gemm_share"] for r in ranks),
        bf16_speedup=summaries[0]["bf16_speedup"],
        optimizer_state_bytes=max(s["memory"]["optimizer_state"] for s in summaries),
        memory_peak_bytes=peak_memory, sharded_optimizer=meta["sharded_optimizer"],
        slowest_rank=ranks[slowest]["rank"],
        slowest_excess=steps[slowest] / median - 1 if median > 0 else 0.0,
        own_cpu_share=own[0] + own[1], workers_cpu_share=own[1],
        comm_total_share=comm_total_share, dataset=meta.get("dataset", ""),
        decode=meta.get("decode", "cpu"))
    return {
        "verdict": asdict(verdict), "recommendations": [asdict(r) for r in recommend(facts)],
        "facts": asdict(facts), "ranks": ranks,
        "img_per_s": sum(r["img_per_s"] for r in ranks),
        "mfu": statistics.fmean(r["mfu"] for r in ranks),
        "slowest_rank": ranks[slowest]["rank"],
    }


# ------------------------------------------------------------------------------ rendering
@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]


@dataclass
class Image:
    file: str  # PNG beside report.md
    alt: str


Block = str | Table | Image


@dataclass
class Section:
    title: str
    blocks: list[Block]


PHASE_LABELS = {"data": "data", "teacher_forward": "teacher fwd", "student_forward": "student fwd",
                "loss": "loss", "backward": "backward", "optimizer": "optimizer",
                "other": "other", "step": "step (wall)"}
PHASE_COLOURS = {"data": "#d62728", "teacher_forward": "#9467bd", "student_forward": "#1f77b4",
                 "loss": "#17becf", "backward": "#2ca02c", "optimizer": "#ff7f0e",
                 "other": "#c7c7c7"}


def _label(phase: str) -> str:
    return PHASE_LABELS.get(phase, phase)


def _phases_with_other(summary: dict[str, Any]) -> list[dict[str, float]]:
    """Each step's phases plus ``other``: wall time not inside any phase (logging, loop)."""
    out = []
    for step, wall in zip(summary["steps"], summary["walls"]):
        out.append({**step, "other": max(0.0, wall - sum(step.values()))})
    return out


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _save(fig: Any, path: Path) -> None:
    fig.savefig(path, format="png")


def plot_phases(summary: dict[str, Any], path: Path) -> None:
    """Stacked bars: seconds per phase for each profiled step."""
    steps = _phases_with_other(summary)
    fig = _figure(7, 3.2)
    ax = fig.add_subplot()
    x = list(range(len(steps)))
    bottom = [0.0] * len(steps)
    for phase in steps[0]:
        values = [s[phase] for s in steps]
        ax.bar(x, values, bottom=bottom, label=_label(phase),
               color=PHASE_COLOURS.get(phase), width=0.7)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_xticks(x, [str(i + 1) for i in x])
    ax.set_xlabel("profiled step")
    ax.set_ylabel("seconds")
    ax.set_title(f"Time per phase, rank {summary['rank']}")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    _save(fig, path)


def plot_utilisation(samples: dict[str, Any], path: Path) -> None:
    """Heat map of per-core CPU utilisation over time; below it, how much of the machine kd's
    processes use (and GPU utilisation when sampled)."""
    import numpy as np

    cpu = np.array(samples["cpu"], dtype=float).T  # cores × samples
    t = samples["t"]
    cores = cpu.shape[0]
    gpu = samples.get("gpu") or []
    fig = _figure(7, 4.2 + 0.1 * cores)
    grid = fig.add_gridspec(2, 1, height_ratios=[max(1.0, 0.12 * cores + 0.8), 1.2])
    ax = fig.add_subplot(grid[0])
    image = ax.pcolormesh([0.0, *t], range(cores + 1), cpu, vmin=0, vmax=100, cmap="viridis",
                          shading="flat")
    step = max(1, cores // 16)  # at most ~16 labels on big machines
    ax.set_yticks([i + 0.5 for i in range(0, cores, step)], [str(i) for i in range(0, cores, step)])
    ax.set_ylabel("core")
    ax.set_title("CPU utilisation per core (%)")
    fig.colorbar(image, ax=ax, label="%")
    lines = fig.add_subplot(grid[1], sharex=ax)
    lines.plot(t, cpu.mean(axis=0), color="#444444", label="machine")
    lines.plot(t, np.array(samples.get("process") or [0.0] * len(t)) / cores, color="#1f77b4",
               label="kd main process")
    lines.plot(t, np.array(samples.get("workers") or [0.0] * len(t)) / cores, color="#ff7f0e",
               label="loader workers")
    if gpu:
        lines.plot(t, gpu, color="#2ca02c", label="GPU")
    lines.set_ylim(0, 105)
    lines.set_ylabel("% of machine")
    lines.set_xlabel("seconds since the run started")
    lines.legend(loc="upper center", bbox_to_anchor=(0.5, -0.32), ncol=4, fontsize=8)
    for axis in (ax, lines):
        for key in ("active_start", "active_end"):
            if key in samples:
                axis.axvline(samples[key], color="white" if axis is ax else "#999999",
                             linestyle="--", linewidth=1)
    _save(fig, path)


def plot_memory(memory: dict[str, Any], path: Path) -> None:
    """One horizontal stacked bar: where the peak memory goes."""
    parts = _memory_parts(memory)
    fig = _figure(7, 1.6)
    ax = fig.add_subplot()
    left = 0.0
    colours = ["#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#d62728", "#c7c7c7"]
    for (name, value), colour in zip(parts, colours):
        ax.barh([0], [value / 2**20], left=[left], color=colour, label=name)
        left += value / 2**20
    ax.set_yticks([])
    ax.set_xlabel("MiB")
    ax.set_title(f"Peak memory {format_bytes(memory['peak'])} ({memory['peak_source']})")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.2), fontsize=8)
    _save(fig, path)


def plot_ranks(summaries: Sequence[dict[str, Any]], path: Path) -> None:
    """Mean seconds per phase, one stacked bar per rank."""
    means = [{k: statistics.fmean(s[k] for s in _phases_with_other(r))
              for k in _phases_with_other(r)[0]} for r in summaries]
    fig = _figure(7, 3.0)
    ax = fig.add_subplot()
    x = [r["rank"] for r in summaries]
    bottom = [0.0] * len(x)
    for phase in means[0]:
        values = [m[phase] for m in means]
        ax.bar(x, values, bottom=bottom, label=_label(phase), color=PHASE_COLOURS.get(phase))
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_xticks(x, [f"rank {r}" for r in x])
    ax.set_ylabel("seconds per step (mean)")
    ax.set_title("Phases per rank")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    _save(fig, path)


def _memory_parts(memory: dict[str, Any]) -> list[tuple[str, float]]:
    known = (memory["parameters"] + memory["gradients"] + memory["optimizer_state"]
             + memory["teacher"] + memory["runtime"])
    parts = [("student parameters", memory["parameters"]), ("gradients", memory["gradients"]),
             ("optimizer state", memory["optimizer_state"]), ("teacher", memory["teacher"])]
    if memory["runtime"]:
        parts.append(("runtime & data (RSS before training)", memory["runtime"]))
    parts.append(("activations & workspace (estimate)", max(0.0, memory["peak"] - known)))
    return parts


def build_sections(summaries: Sequence[dict[str, Any]], meta: dict[str, Any],
                   analysis: dict[str, Any], top: int) -> list[Section]:
    """The report's sections, every one with numbers."""
    main = summaries[0]
    r0 = analysis["ranks"][0]
    verdict = analysis["verdict"]
    cuda = meta.get("ops_on", meta["device"]) == "cuda"  # kernels recorded
    sections = []

    teacher = meta["teacher"] or "none (labels only)"
    sections.append(Section("Summary", [
        f"**Verdict: {verdict['kind']}** — {verdict['reason']}.",
        f"{analysis['img_per_s']:.1f} images/s over {meta['world_size']} rank(s), "
        f"model FLOP utilisation {format_percent(analysis['mfu'], fine=True)}, mean step "
        f"{format_duration(r0['step_s'])} (rank 0).",
        Table(["setting", "value"], [
            ["student / teacher", f"`{meta['student']}` / `{teacher}`"],
            ["data", f"{meta['dataset']}, {meta['image_size']} px, batch {meta['batch_size']} "
                     f"× {meta['grad_accum_steps']} accumulation per rank"],
            ["precision", meta["precision"]],
            ["ranks", f"{meta['world_size']} ({meta['local_world_size']} per node), backend "
                      f"{meta['backend'] or 'none'}, strategy {meta['strategy']}"],
            ["device", f"{meta['device_name']} ({meta['logical_cores']} logical cores, "
                       f"{meta['threads']} torch threads per rank)"],
            ["loader workers per rank", str(meta["num_workers"])],
            ["schedule", f"wait {meta['schedule']['wait']}, warm-up "
                         f"{meta['schedule']['warmup']}, active {meta['schedule']['active']} "
                         f"steps"],
            ["torch", meta["torch"]],
        ]),
    ]))

    steps = _phases_with_other(main)
    phases = list(steps[0])
    rows = [[str(i + 1), *(format_duration(s[p]) for p in phases), format_duration(w)]
            for i, (s, w) in enumerate(zip(steps, main["walls"]))]
    sections.append(Section("Time per phase", [
        "Seconds in each phase of every profiled step on rank 0 (`other`: wall time outside "
        "the phases — loop, logging, metrics).",
        Image("phases.png", "stacked bars of seconds per phase for each profiled step"),
        Table(["step", *(_label(p) for p in phases), "wall"], rows),
    ]))

    spread = r0["spread"]
    sections.append(Section("Step-to-step spread", [
        f"Over {len(main['walls'])} profiled steps on rank 0; CV = std / mean.",
        Table(["phase", "mean", "std", "min", "max", "CV"],
              [[_label(p), *(format_duration(v[k]) for k in ("mean", "std", "min", "max")),
                format_percent(v["cv"])] for p, v in spread.items()]),
    ]))

    n_steps = len(main["walls"])
    exclude = set(main["steps"][0])
    if cuda:
        ops = [o for o in main["ops"] if o["kind"] == "kernel"]
        key, label = "self_device_s", "self CUDA"
    else:
        ops = [o for o in main["ops"] if o["kind"] == "cpu_op" and o["name"] not in exclude
               and not o["name"].startswith("ProfilerStep")]
        key, label = "self_cpu_s", "self CPU"
    ops = sorted(ops, key=lambda o: -o[key])[:top]
    total = main["op_totals"]["compute_s"] + main["op_totals"]["comm_s"]
    what = "CUDA kernels" if cuda else "operators"
    sections.append(Section(f"Top {len(ops)} {what} by self time", [
        f"From `torch.profiler` `key_averages()` on rank 0, summed over {n_steps} profiled "
        f"steps; share of all {what}' self time ({format_duration(total)}). Matrix products "
        f"({', '.join(sorted(GEMM_OPS))}) take {format_percent(r0['gemm_share'])} of operator "
        f"time.",
        Table(["operator", "calls", f"{label} total", "per step", "share"],
              [[f"`{o['name'][:80]}`", str(o["calls"]), format_duration(o[key]),
                format_duration(o[key] / n_steps),
                format_percent(o[key] / total if total > 0 else 0.0)]
               for o in ops]),
    ]))

    facts = analysis["facts"]
    sections.append(Section("Data wait and verdict", [
        f"Waiting for data: {format_percent(facts['data_share'])} of the step (mean over ranks); "
        f"{_comm_note(meta, facts, r0)}; compute: the rest.",
        *_comm_table(meta, facts, r0),
        f"**{verdict['kind']}**: {verdict['reason']}.",
        f"Rules: input-bound when the data wait is ≥ {format_percent(DATA_WAIT_THRESHOLD)} of the "
        f"step; communication-bound when exposed collectives take ≥ "
        f"{format_percent(COMM_THRESHOLD)} (several ranks); compute-bound otherwise.",
    ]))

    samples = main["samples"]
    cpu_mean, per_core = cpu_utilisation(samples)
    gpu = [g for g in samples.get("gpu") or [] if not math.isnan(g)]
    gpu_line = (f"GPU utilisation ({samples['gpu_source']}): mean {statistics.fmean(gpu):.1f} %, "
                f"max {max(gpu):.1f} % over {len(gpu)} samples." if gpu
                else f"GPU utilisation: {samples['gpu_source']}.")
    own_process, own_workers = own_cpu_shares(samples)
    others = max(0.0, (cpu_mean or 0.0) - own_process - own_workers)
    util_blocks: list[Block] = [
        f"Sampled every ~{_interval(samples['t'])} on {main['host']} (all its cores; dashed "
        f"lines: the profiled steps). Mean over cores during the profiled steps: "
        f"{format_percent(cpu_mean or 0.0)} of the machine — kd's main process "
        f"{format_percent(own_process)}, its loader workers {format_percent(own_workers)}, other "
        f"processes {format_percent(others)}.",
        Image("utilisation.png", "heat map of CPU utilisation per core over time"),
        Table(["core", *(str(i) for i in range(len(per_core)))],
              [["mean busy", *(f"{100 * u:.0f} %" for u in per_core)]]),
        gpu_line,
    ]
    sections.append(Section("CPU and GPU utilisation", util_blocks))

    memory = main["memory"]
    parts = _memory_parts(memory)
    sections.append(Section("Memory", [
        f"Peak {format_bytes(memory['peak'])} on rank 0 ({memory['peak_source']}). Parameters, "
        f"gradients (one per trainable parameter), optimizer state and teacher are summed "
        f"tensor bytes; activations & workspace is an **estimate**: the peak minus the rest.",
        Image("memory.png", "stacked bar of peak memory by use"),
        Table(["use", "bytes", "share of peak"],
              [[name, format_bytes(v),
                format_percent(v / memory["peak"] if memory["peak"] else 0.0)]
               for name, v in parts]),
    ]))

    flops = main["flops"]
    per_img = r0["flops_per_image"]
    sections.append(Section("Throughput and model FLOP utilisation", [
        f"FLOPs counted with `torch.utils.flop_counter.FlopCounterMode` on one batch of "
        f"{flops['images']} images (on {flops['counted_on']}); MFU = FLOPs per image × "
        f"images/s ÷ peak, per rank.",
        Table(["quantity", "value"], [
            ["teacher forward / image", format_flops(flops["teacher_forward"] / flops["images"])],
            ["student forward / image", format_flops(flops["student_forward"] / flops["images"])],
            ["student backward / image", format_flops(flops["backward"] / flops["images"])],
            ["total / image", format_flops(per_img)],
            ["images/s (all ranks)", f"{analysis['img_per_s']:.1f}"],
            ["images/s (rank 0)", f"{r0['img_per_s']:.1f}"],
            ["achieved (rank 0)", format_flops(r0["achieved_flops"], per_s=True)],
            ["peak (rank 0)", f"{format_flops(main['peak_flops'], per_s=True)} — "
                              f"{main['peak_source']}"],
            *([["bf16 matmul peak", f"{main['bf16_speedup']:.2f}× the "
                                    f"{main['matmul_precision']} peak"]]
              if main["bf16_speedup"] is not None else []),
            ["model FLOP utilisation", format_percent(analysis["mfu"], fine=True)],
        ]),
    ]))

    rank_rows = []
    for s, r in zip(summaries, analysis["ranks"]):
        means = r["spread"]
        rank_rows.append([str(r["rank"]), s["host"],
                          *(format_duration(means[p]["mean"]) for p in main["steps"][0]),
                          format_duration(r["step_s"]), f"{r['img_per_s']:.1f}",
                          format_percent(r["data_share"])])
    rank_blocks: list[Block] = []
    if len(summaries) > 1:
        steps_s = [r["step_s"] for r in analysis["ranks"]]
        rank_blocks += [
            f"Slowest: **rank {analysis['slowest_rank']}**, mean step "
            f"{format_duration(max(steps_s))} against "
            f"{format_duration(statistics.median(steps_s))} for the median rank "
            f"({format_percent(facts['slowest_excess'])} slower).",
            Image("ranks.png", "stacked bars of mean phase times per rank")]
    else:
        rank_blocks.append(f"One rank: nothing to compare (rank 0 mean step "
                           f"{format_duration(r0['step_s'])}).")
    rank_blocks.append(Table(["rank", "host", *(_label(p) for p in main["steps"][0]), "step",
                              "images/s", "data wait"], rank_rows))
    sections.append(Section("Ranks", rank_blocks))

    recs = analysis["recommendations"]
    rec_blocks: list[Block] = []
    if recs:
        rec_blocks.append(Table(["rule", "triggered by", "advice"],
                                [[r["rule"], r["trigger"], r["advice"]] for r in recs]))
    else:
        rec_blocks.append("No rule fired.")
    quiet = quiet_rules(Facts(**facts), {r["rule"] for r in recs})
    rec_blocks.append("Checked without firing: " + "; ".join(quiet) + ".")
    sections.append(Section("Recommendations", rec_blocks))
    return sections


def _comm_note(meta: dict[str, Any], facts: dict[str, Any], r0: dict[str, Any]) -> str:
    """The collectives' part of the verdict section's first line."""
    if meta["world_size"] == 1:
        return "collectives 0.0 % (one rank)"
    if facts.get("comm_total_share") is not None:
        return (f"collectives (NCCL kernels) {format_percent(facts['comm_total_share'])} of the "
                f"step in all, of which {format_percent(facts['comm_share'])} exposed — not "
                f"overlapped by any compute kernel on the same GPU; DDP all-reduces gradient "
                f"buckets while backward still computes, so only the exposed part lengthens the "
                f"step and the verdict reads it")
    return (f"collectives {format_percent(facts['comm_share'])} of the step "
            f"({format_duration(r0['comm_per_step_s'])} per step on rank 0), all of it counted: "
            f"without device kernels ({meta['backend'] or 'no backend'} on {meta['device']}) the "
            f"overlap with backward is not measured, so this is an upper bound")


def _comm_table(meta: dict[str, Any], facts: dict[str, Any], r0: dict[str, Any]) -> list[Block]:
    """Total against exposed communication, where the overlap was measured."""
    if meta["world_size"] == 1 or facts.get("comm_total_share") is None:
        return []
    return [Table(["communication", "per step (rank 0)", "share of the step (mean over ranks)"], [
        ["total: NCCL kernel time", format_duration(r0["comm_per_step_s"]),
         format_percent(facts["comm_total_share"])],
        ["exposed: no compute kernel running", format_duration(r0["exposed_comm_per_step_s"]),
         format_percent(facts["comm_share"])],
    ])]


def _interval(t: Sequence[float]) -> str:
    if len(t) < 2:
        return format_duration(t[0] if t else 0.0)
    return format_duration((t[-1] - t[0]) / (len(t) - 1))


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(title: str, sections: Sequence[Section]) -> str:
    lines = [f"# {title}", ""]
    for section in sections:
        lines += [f"## {section.title}", ""]
        for block in section.blocks:
            if isinstance(block, Table):
                lines.append("| " + " | ".join(map(_md_cell, block.headers)) + " |")
                lines.append("|" + "---|" * len(block.headers))
                lines += ["| " + " | ".join(map(_md_cell, row)) + " |" for row in block.rows]
            elif isinstance(block, Image):
                lines.append(f"![{block.alt}]({block.file})")
            else:
                lines.append(block)
            lines.append("")
    return "\n".join(lines)


def _inline_html(text: str) -> str:
    """Escape, then the two Markdown inlines the report uses: `code` and **bold**."""
    out = html.escape(text, quote=False)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)


_CSS = ("body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;"
        "color:#222}table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ccc;"
        "padding:.2rem .5rem;text-align:left;font-size:.9rem}th{background:#f3f3f3}"
        "img{max-width:100%}code{background:#f3f3f3;padding:0 .2rem}")


def render_html(title: str, sections: Sequence[Section], image_dir: Path) -> str:
    """One HTML file with every PNG embedded as a base64 data URI."""
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>"]
    for section in sections:
        parts.append(f"<h2>{html.escape(section.title)}</h2>")
        for block in section.blocks:
            if isinstance(block, Table):
                head = "".join(f"<th>{_inline_html(h)}</th>" for h in block.headers)
                body = "".join("<tr>" + "".join(f"<td>{_inline_html(c)}</td>" for c in row)
                               + "</tr>" for row in block.rows)
                parts.append(f"<table><tr>{head}</tr>{body}</table>")
            elif isinstance(block, Image):
                data = base64.b64encode((image_dir / block.file).read_bytes()).decode("ascii")
                parts.append(f'<img alt="{html.escape(block.alt)}" '
                             f'src="data:image/png;base64,{data}">')
            else:
                parts.append(f"<p>{_inline_html(block)}</p>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_report(summaries: Sequence[dict[str, Any]], meta: dict[str, Any], out: Path,
                 top: int = 15) -> dict[str, Any]:
    """Analyse, plot and write ``report.md`` and ``report.html``; returns the analysis."""
    analysis = analyse(summaries, meta)
    main = summaries[0]
    plot_phases(main, out / "phases.png")
    plot_utilisation(main["samples"], out / "utilisation.png")
    plot_memory(main["memory"], out / "memory.png")
    if len(summaries) > 1:
        plot_ranks(summaries, out / "ranks.png")
    sections = build_sections(summaries, meta, analysis, top)
    title = f"kd profile: {meta['student']} ← {meta['teacher'] or 'labels'}"
    (out / "report.md").write_text(render_markdown(title, sections))
    (out / "report.html").write_text(render_html(title, sections, out))
    analysis["report_md"] = str(out / "report.md")
    analysis["report_html"] = str(out / "report.html")
    return analysis


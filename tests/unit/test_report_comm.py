"""Exposed communication: the interval arithmetic, kernels read from Chrome traces, and the
verdict on synthetic traces where NCCL kernels hide behind backward or do not (issue "Defects
on the GPU path", item 9). The ``gpu`` tests read real CUDA and NCCL kernels."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from kd.tools import report
from kd.tools.profiler import rank_op_totals
from kd.tools.report import (
    comm_exposure,
    subtract_intervals,
    total_length,
    trace_kernels,
    union_intervals,
)
from tests.conftest import TINY

# ------------------------------------------------------------------------------ intervals


def test_union_sorts_merges_and_drops_empty_intervals() -> None:
    assert union_intervals([]) == []
    assert union_intervals([(5, 6), (0, 2), (1, 3), (3, 4)]) == [(0, 4), (5, 6)]  # touching merge
    assert union_intervals([(0, 10), (2, 3), (4, 5)]) == [(0, 10)]  # nested
    assert union_intervals([(1, 1), (3, 2), (4, 5)]) == [(4, 5)]  # zero and negative length


@pytest.mark.parametrize(("comm", "compute", "exposed"), [
    ([(2, 4)], [(0, 10)], []),  # fully hidden behind compute
    ([(2, 6)], [(0, 4)], [(4, 6)]),  # partly overlapping: the tail is exposed
    ([(0, 6)], [(4, 10)], [(0, 4)]),  # partly overlapping: the head is exposed
    ([(0, 2), (5, 7)], [(2, 5)], [(0, 2), (5, 7)]),  # disjoint, touching at the ends
    ([(0, 10)], [(2, 3), (5, 6)], [(0, 2), (3, 5), (6, 10)]),  # compute nested inside
    ([(0, 10)], [(0, 4), (3, 7), (6, 9)], [(9, 10)]),  # compute on several streams, overlapping
    ([(6, 8), (0, 3), (2, 4)], [(7, 9), (1, 2)], [(0, 1), (2, 4), (6, 7)]),  # unsorted input
    ([(3, 3), (5, 6)], [(0, 1), (5.5, 5.5)], [(5, 6)]),  # zero-length kernels cover nothing
    ([], [(0, 1)], []),
    ([(0, 1)], [], [(0, 1)]),
])
def test_subtract_intervals(comm: list, compute: list, exposed: list) -> None:
    assert subtract_intervals(comm, compute) == exposed
    assert total_length(exposed) <= total_length(union_intervals(comm))


def test_a_compute_interval_spanning_two_comm_intervals_hides_both() -> None:
    assert subtract_intervals([(1, 2), (3, 4), (5, 7)], [(0, 4.5), (6, 6.5)]) == [
        (5, 6), (6.5, 7)]


def kernel(name: str, start: float, end: float, device: int = 0) -> dict[str, Any]:
    return {"name": name, "device": device, "start_s": start, "end_s": end}


def test_comm_exposure_counts_overlap_on_the_same_device_only() -> None:
    kernels = [
        kernel("sm90_xmma_gemm_bf16", 0.0, 0.6),
        kernel("ncclDevKernel_AllReduce_Sum_f32_RING_LL", 0.2, 0.5),  # hidden
        kernel("ncclKernel_AllReduce_RING_LL_Sum_float", 0.5, 0.8),  # 0.2 s exposed
        # Another GPU's compute does not hide this GPU's communication.
        kernel("elementwise_kernel", 0.0, 1.0, device=1),
        kernel("ncclDevKernel_AllReduce_Sum_f32_RING_LL", 0.0, 0.1, device=2),
    ]
    got = comm_exposure(kernels)
    assert got["comm_s"] == pytest.approx(0.3 + 0.3 + 0.1)
    assert got["exposed_comm_s"] == pytest.approx(0.2 + 0.1)
    assert comm_exposure([]) == {"comm_s": 0.0, "exposed_comm_s": 0.0}


def test_only_nccl_kernels_communicate() -> None:
    assert report.is_comm_kernel("ncclDevKernel_SendRecv(ncclDevKernelArgs4K)")
    # A GEMM with a broadcast epilogue is compute, though COMM_PATTERN would match it.
    gemm = "cutlass::Kernel<EpilogueWithBroadcast>"
    assert report.is_comm(gemm) and not report.is_comm_kernel(gemm)


# ------------------------------------------------------------------------------ traces

BASE_US = 1_700_000_000_000_000.0  # Kineto's timestamps are epoch microseconds
STEP_MS = 100.0
STEPS = 5


def chrome_trace(kernels: list[tuple[str, int, float, float]], steps: int = STEPS) -> dict:
    """A trace shaped like torch.profiler's export: every step repeats ``kernels`` given as
    (name, stream, start ms, end ms), among the other categories a real trace holds."""
    events: list[dict[str, Any]] = []
    for step in range(steps):
        t0 = BASE_US + step * STEP_MS * 1e3

        def at(ms: float, t0: float = t0) -> float:
            return t0 + ms * 1e3

        # CPU side, and kd's ranges drawn on the GPU timeline over the whole step: neither is
        # a kernel, and counting the annotation as compute would hide every NCCL kernel.
        events += [
            {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "pid": 1, "tid": 1, "ts": at(0),
             "dur": 90e3},
            {"ph": "X", "cat": "gpu_user_annotation", "name": f"ProfilerStep#{step}",
             "pid": 0, "tid": 7, "ts": at(0), "dur": STEP_MS * 1e3, "args": {"device": 0}},
            {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD (Pinned -> Device)",
             "pid": 0, "tid": 9, "ts": at(0), "dur": STEP_MS * 1e3, "args": {"device": 0}},
            {"ph": "f", "cat": "ac2g", "name": "ac2g", "id": step, "pid": 0, "tid": 7,
             "ts": at(0)},
        ]
        for name, stream, start, end in kernels:
            events.append({"ph": "X", "cat": "kernel", "name": name, "pid": 0, "tid": stream,
                           "ts": at(start), "dur": (end - start) * 1e3,
                           "args": {"device": 0, "stream": stream, "correlation": 1}})
    return {"schemaVersion": 1, "traceEvents": events}


GEMM = "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_cublas"
ELEMENTWISE = "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>"
NCCL = "ncclDevKernel_AllReduce_Sum_f32_RING_LL(ncclDevKernelArgs4K)"
# Backward computes on stream 7 until 90 ms while DDP's two buckets all-reduce on NCCL's
# stream 20: 40 ms of NCCL kernels in a 100 ms step, all of it hidden.
HIDDEN = [(GEMM, 7, 0, 30), (GEMM, 7, 30, 60), (ELEMENTWISE, 7, 60, 90),
          (NCCL, 20, 40, 60), (NCCL, 20, 65, 85)]
# Compute ends at 70 ms; the last bucket all-reduces after it: 35 ms in all, 25 ms exposed.
EXPOSED = [(GEMM, 7, 0, 40), (ELEMENTWISE, 7, 40, 70), (NCCL, 20, 50, 60), (NCCL, 20, 70, 95)]


def test_kd_ranges_on_the_gpu_timeline_are_not_kernels() -> None:
    # key_averages() lists record_function ranges seen on the GPU (gpu_user_annotation) with
    # device type CUDA, like kernels: they span the kernels and must not count again.
    def row(name: str, device_s: float) -> dict[str, Any]:
        return {"name": name, "calls": 1, "kind": "kernel", "self_cpu_s": 0.0,
                "cpu_total_s": 0.0, "self_device_s": device_s, "device_total_s": device_s}

    ops = [row("ampere_bf16_gemm", 3.0), row("ncclDevKernel_AllReduce", 1.0),
           row("backward", 4.0), row("ProfilerStep#7", 5.0)]
    totals = report.op_totals(ops, "cuda", exclude=["backward"])
    assert totals["compute_s"] == 3.0 and totals["comm_s"] == 1.0


def test_trace_kernels_reads_kernels_only() -> None:
    kernels = trace_kernels(chrome_trace(EXPOSED, steps=1))
    assert [k["name"] for k in kernels] == [GEMM, ELEMENTWISE, NCCL, NCCL]
    assert kernels[-1]["start_s"] == pytest.approx(0.070)
    assert kernels[-1]["end_s"] == pytest.approx(0.095)
    assert {k["device"] for k in kernels} == {0}
    assert trace_kernels({"traceEvents": []}) == [] and trace_kernels({}) == []


def key_average_rows(kernels: list[tuple[str, int, float, float]]) -> list[dict[str, Any]]:
    """What ``key_averages`` makes of the trace: one row per kernel name, summed."""
    rows: dict[str, dict[str, Any]] = {}
    for name, _, start, end in kernels:
        row = rows.setdefault(name, {"name": name, "calls": 0, "kind": "kernel",
                                     "self_cpu_s": 0.0, "cpu_total_s": 0.0,
                                     "self_device_s": 0.0, "device_total_s": 0.0})
        row["calls"] += STEPS
        row["self_device_s"] += STEPS * (end - start) / 1e3
        row["device_total_s"] = row["self_device_s"]
    return list(rows.values())


PHASES = ("data", "teacher_forward", "student_forward", "loss", "backward", "optimizer")


def rank_summary(rank: int, op_totals: dict[str, float]) -> dict[str, Any]:
    """One rank's summary as run_profile gathers it: 5 steps of 100 ms, 1 ms waiting for data."""
    step = {"data": 0.001, "teacher_forward": 0.010, "student_forward": 0.020, "loss": 0.001,
            "backward": 0.060, "optimizer": 0.005}
    return {
        "rank": rank, "host": "node0", "local_rank": rank, "steps": [dict(step)] * STEPS,
        "walls": [STEP_MS / 1e3] * STEPS, "first_step": 3, "ops": [], "op_totals": op_totals,
        "memory": {"parameters": 2**20, "gradients": 2**20, "optimizer_state": 2**21,
                   "teacher": 2**22, "runtime": 0, "peak": 2**30,
                   "peak_source": "torch.cuda.max_memory_allocated"},
        "images_per_step": 64,
        "samples": {"t": [0.1, 0.2, 0.3], "cpu": [[40.0, 50.0]] * 3, "process": [50.0] * 3,
                    "workers": [10.0] * 3, "gpu": [90.0] * 3,
                    "gpu_source": "NVML (torch.cuda.utilization)"},
        "flops": {"teacher_forward": 10**12, "student_forward": 10**11, "backward": 2 * 10**11,
                  "images": 64, "counted_on": "meta"},
        "peak_flops": 989e12, "peak_source": "datasheet peak of the NVIDIA H100 (bf16, dense)",
        "matmul_precision": "bf16", "bf16_speedup": None,
    }


META = {
    "student": "vit_tiny_patch16_224", "teacher": "vit_small_patch16_224", "distill_loss": "kl",
    "image_size": 224, "dataset": "synthetic", "batch_size": 64, "grad_accum_steps": 1,
    "precision": "bf16", "world_size": 2, "local_world_size": 2, "backend": "nccl",
    "device": "cuda", "ops_on": "cuda", "device_name": "NVIDIA H100 80GB HBM3",
    "logical_cores": 2, "threads": 1, "num_workers": 4, "strategy": "ddp",
    "sharded_optimizer": False, "schedule": {"wait": 1, "warmup": 2, "active": STEPS},
    "torch": torch.__version__, "external_profiler": "none", "created": "now",
}


def analyse_trace(tmp_path: Path, kernels: list[tuple[str, int, float, float]],
                  ops_on: str = "cuda") -> dict[str, Any]:
    """Two ranks with the same synthetic trace, through the profiler's totals and the analysis."""
    trace = tmp_path / "trace_rank0.json"
    trace.write_text(json.dumps(chrome_trace(kernels)))
    totals = rank_op_totals(key_average_rows(kernels), ops_on, PHASES, trace)
    summaries = [rank_summary(r, totals) for r in range(2)]
    return report.analyse(summaries, {**META, "ops_on": ops_on})


def test_nccl_hidden_behind_backward_is_not_communication_bound(tmp_path: Path) -> None:
    analysis = analyse_trace(tmp_path, HIDDEN)
    rank = analysis["ranks"][0]
    # The NCCL kernels' sum (what kd summed before) is 40 % of the step, over the threshold...
    assert rank["comm_per_step_s"] == pytest.approx(0.040)
    assert analysis["facts"]["comm_total_share"] == pytest.approx(0.40)
    # ...but backward's kernels ran all along: nothing was exposed.
    assert rank["exposed_comm_per_step_s"] == pytest.approx(0.0, abs=1e-9)
    assert analysis["facts"]["comm_share"] == pytest.approx(0.0, abs=1e-9)
    assert analysis["verdict"]["kind"] == "compute-bound"
    assert "exposed collectives 0.0 % < 20.0 % (40.0 % in all" in analysis["verdict"]["reason"]
    assert "communication" not in {r["rule"] for r in analysis["recommendations"]}


def test_nccl_after_backward_is_communication_bound(tmp_path: Path) -> None:
    analysis = analyse_trace(tmp_path, EXPOSED)
    rank = analysis["ranks"][0]
    assert rank["comm_per_step_s"] == pytest.approx(0.035)
    assert rank["exposed_comm_per_step_s"] == pytest.approx(0.025)
    assert analysis["verdict"]["kind"] == "communication-bound"
    assert analysis["verdict"]["comm_share"] == pytest.approx(0.25)
    assert analysis["verdict"]["comm_total_share"] == pytest.approx(0.35)
    rec = next(r for r in analysis["recommendations"] if r["rule"] == "communication")
    assert rec["trigger"].startswith("exposed collectives 25.0 % of the step (> 20.0 %)")


def test_without_device_kernels_all_collective_time_counts(tmp_path: Path) -> None:
    # The CPU path (gloo, or CUPTI lent to nsys) keeps what kd did before: no timeline, so
    # all of the backend's time counts, even the part backward hid.
    ops = [{"name": "gloo:all_reduce", "calls": 5, "kind": "cpu_op", "self_cpu_s": 0.0,
            "cpu_total_s": 0.2, "self_device_s": 0.0, "device_total_s": 0.0},
           {"name": "aten::mm", "calls": 50, "kind": "cpu_op", "self_cpu_s": 0.3,
            "cpu_total_s": 0.3, "self_device_s": 0.0, "device_total_s": 0.0}]
    totals = rank_op_totals(ops, "cpu", PHASES, tmp_path / "absent.json")
    assert "exposed_comm_s" not in totals and totals["comm_s"] == pytest.approx(0.2)
    summaries = [rank_summary(r, totals) for r in range(2)]
    analysis = report.analyse(summaries, {**META, "device": "cpu", "ops_on": "cpu",
                                          "backend": "gloo"})
    assert analysis["facts"]["comm_share"] == pytest.approx(0.40)
    assert analysis["facts"]["comm_total_share"] is None
    assert analysis["verdict"]["kind"] == "communication-bound"
    assert analysis["verdict"]["reason"].startswith("collectives take 40.0 %")


def test_report_shows_total_and_exposed_communication(tmp_path: Path) -> None:
    trace = tmp_path / "trace_rank0.json"
    trace.write_text(json.dumps(chrome_trace(HIDDEN)))
    totals = rank_op_totals(key_average_rows(HIDDEN), "cuda", PHASES, trace)
    summaries = [rank_summary(r, totals) for r in range(2)]
    report.write_report(summaries, META, tmp_path, top=5)
    md = (tmp_path / "report.md").read_text()
    section = md.split("## Data wait and verdict")[1].split("\n## ")[0]
    assert "collectives (NCCL kernels) 40.0 % of the step in all, of which 0.0 % exposed" in section
    assert "| total: NCCL kernel time | 40.0 ms | 40.0 % |" in section
    assert "| exposed: no compute kernel running | 0 µs | 0.0 % |" in section
    assert "**compute-bound**" in section and "exposed collectives take ≥ 20.0 %" in section
    assert "exposed collectives 0.0 % ≤ 20.0 % (40.0 % in all" in md  # the quiet rule
    page = (tmp_path / "report.html").read_text()
    assert "<td>total: NCCL kernel time</td><td>40.0 ms</td>" in page
    assert "None" not in md and "nan" not in md


# ------------------------------------------------------------------------------ on CUDA


@pytest.mark.gpu
def test_exposed_communication_of_real_nccl_kernels(tmp_path: Path) -> None:
    """One-process NCCL: single-rank collectives are plain copies (NCCL's enqueue.cc,
    ncclLaunchOneRank), but a send/receive to itself runs an NCCL kernel, which is what
    all_to_all with tensor lists issues."""
    import torch.distributed as dist

    if not dist.is_nccl_available():
        pytest.skip("this torch has no NCCL")
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    try:
        a = torch.randn(4096, 4096, device=device)
        send = [torch.randn(1 << 24, device=device)]
        recv = [torch.empty_like(send[0])]
        dist.all_to_all(recv, send)  # NCCL connects on the first call: keep it out
        torch.cuda.synchronize(device)
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as prof:
            work = dist.all_to_all(recv, send, async_op=True)  # on NCCL's stream, beside:
            for _ in range(10):
                a @ a
            work.wait()
            torch.cuda.synchronize(device)
            dist.all_to_all(recv, send)  # alone on the GPU: fully exposed
            torch.cuda.synchronize(device)
        prof.export_chrome_trace(str(tmp_path / "trace.json"))
        rows = [(e.key, e.self_device_time_total) for e in prof.key_averages()]
    finally:
        dist.destroy_process_group()
    kernels = trace_kernels(json.loads((tmp_path / "trace.json").read_text()))
    nccl = sorted((k for k in kernels if report.is_comm_kernel(k["name"])),
                  key=lambda k: k["start_s"])
    assert len(nccl) >= 2, sorted({k["name"] for k in kernels})
    assert len(kernels) > len(nccl)  # the matrix products
    got = comm_exposure(kernels)
    durations = sum(k["end_s"] - k["start_s"] for k in nccl)
    assert got["comm_s"] == pytest.approx(durations)
    # key_averages sums the same kernels (µs).
    assert got["comm_s"] == pytest.approx(
        sum(t for name, t in rows if report.is_comm_kernel(name)) / 1e6, rel=1e-3)
    last = nccl[-1]["end_s"] - nccl[-1]["start_s"]
    assert last * 0.999 <= got["exposed_comm_s"] <= got["comm_s"] + 1e-12


@pytest.mark.gpu
def test_profile_on_cuda_measures_communication_from_the_kernels(tmp_path: Path) -> None:
    from kd.config import load_config
    from kd.core.trainer import Trainer
    from kd.tools.profiler import ProfileSettings, run_profile

    cfg = load_config(TINY, ["distill.loss=none", "teacher.checkpoint=null",
                             f"output_dir={tmp_path}", "train.device=cuda"])
    analysis = run_profile(Trainer(cfg), tmp_path, ProfileSettings(wait=0, warmup=1, active=2))
    saved = json.loads((tmp_path / "profile.json").read_text())
    totals = saved["ranks"][0]["op_totals"]
    kernels = trace_kernels(json.loads((tmp_path / "trace_rank0.json").read_text()))
    assert kernels, "no CUDA kernels in the exported trace"
    # One process: no NCCL, and the totals came from the trace (the key is there).
    assert totals["comm_s"] == 0.0 and totals["exposed_comm_s"] == 0.0
    assert analysis["ranks"][0]["comm_overlap_measured"]
    assert "collectives 0.0 % (one rank)" in (tmp_path / "report.md").read_text()

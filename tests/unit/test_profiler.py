"""Profiling pieces on constructed cases: annotations, the step timer, the analysis rules (each
verdict and recommendation fires at its threshold and not below), rendering, and the
per-iteration timing line."""

from __future__ import annotations

import importlib.machinery
import logging
import sys
import time
import types
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from kd.core.annotate import annotate, range_factories
from kd.core.metrics import ConsoleSink, phase_line
from kd.core.trainer import PHASES, PhaseTimer
from kd.errors import UserError
from kd.tools import report
from kd.tools.profiler import (
    ExternalCapture,
    ProfileSettings,
    ResourceSampler,
    matmul_precision,
    measure_matmul_flops,
    optimizer_state_bytes,
    prepare_run_dir,
    table_peak,
)
from kd.tools.report import Facts, classify, op_totals, phase_spread, recommend

# ------------------------------------------------------------------------------ annotations


@pytest.fixture
def fresh_ranges():
    """Re-decide which ranges annotate() opens, before and after the test."""
    range_factories.cache_clear()
    yield
    range_factories.cache_clear()


def test_annotate_without_a_profiler_is_a_plain_context(fresh_ranges) -> None:
    with annotate("data"):
        x = torch.ones(2) + 1
    assert x.sum().item() == 4
    assert range_factories() == (torch.profiler.record_function,)  # CPU, no SageMaker


def test_annotate_records_a_range_under_the_profiler(fresh_ranges) -> None:
    cpu = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=cpu) as prof, annotate("teacher_forward"):
        torch.ones(4, 4) @ torch.ones(4, 4)
    names = {e.key for e in prof.key_averages()}
    assert "teacher_forward" in names and "aten::mm" in names


def test_annotate_also_opens_a_sagemaker_range_when_smprof_imports(fresh_ranges,
                                                                  monkeypatch) -> None:
    opened: list[str] = []

    class Range:
        def __init__(self, name: str) -> None:
            self.name = name

        def __enter__(self) -> None:
            opened.append(f"enter {self.name}")

        def __exit__(self, *exc: object) -> None:
            opened.append(f"exit {self.name}")

    smprof = types.ModuleType("smprof")
    smprof.__spec__ = importlib.machinery.ModuleSpec("smprof", None)
    smprof.annotate = Range
    monkeypatch.setitem(sys.modules, "smprof", smprof)
    cpu = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=cpu) as prof, annotate("backward"):
        torch.ones(2) * 2
    assert opened == ["enter backward", "exit backward"]
    assert "backward" in {e.key for e in prof.key_averages()}


def test_a_module_named_smprof_without_annotate_is_ignored(fresh_ranges, monkeypatch) -> None:
    unrelated = types.ModuleType("smprof")
    unrelated.__spec__ = importlib.machinery.ModuleSpec("smprof", None)
    monkeypatch.setitem(sys.modules, "smprof", unrelated)
    assert range_factories() == (torch.profiler.record_function,)


# ------------------------------------------------------------------------------ step timer


def test_step_timer_gives_each_step_and_keeps_the_trainers_interval_sums() -> None:
    timer = PhaseTimer(torch.device("cpu"))
    per_step = []
    for _ in range(3):
        for phase in PHASES:
            with timer.phase(phase, host=phase == "data"):
                time.sleep(0.001)
        per_step.append(timer.end_step())
    assert all(set(s) == set(PHASES) and all(v > 0 for v in s.values()) for s in per_step)
    flushed = timer.flush()  # what the trainer's log step reads: the three steps together
    for phase in PHASES:
        assert flushed[phase] == pytest.approx(sum(s[phase] for s in per_step))
    assert all(v == 0 for v in timer.flush().values())


# ------------------------------------------------------------------------------ analysis

FACTS = Facts(data_share=0.02, comm_share=0.0, world_size=1, local_world_size=1, num_workers=4,
              logical_cores=8, cpu_util=0.5, precision="bf16", gemm_share=0.5,
              bf16_speedup=None, optimizer_state_bytes=10, memory_peak_bytes=100,
              sharded_optimizer=False)


def rules(facts: Facts) -> list[str]:
    return [r.rule for r in recommend(facts)]


def test_phase_spread() -> None:
    steps = [{"data": 1.0, "backward": 2.0}, {"data": 3.0, "backward": 2.0}]
    spread = phase_spread(steps, walls=[4.0, 6.0])
    assert spread["data"] == {"mean": 2.0, "std": 1.0, "min": 1.0, "max": 3.0, "cv": 0.5}
    assert spread["backward"]["cv"] == 0.0
    assert spread["step"]["mean"] == 5.0


@pytest.mark.parametrize(("data", "comm", "world", "kind"), [
    (0.10, 0.0, 1, "input-bound"),
    (0.099, 0.0, 1, "compute-bound"),
    (0.05, 0.50, 1, "compute-bound"),  # one rank has no collectives
    (0.05, 0.20, 2, "communication-bound"),
    (0.05, 0.199, 2, "compute-bound"),
    (0.30, 0.25, 4, "input-bound"),
    (0.15, 0.40, 4, "communication-bound"),
])
def test_classify(data: float, comm: float, world: int, kind: str) -> None:
    verdict = classify(data, comm, world)
    assert verdict.kind == kind
    assert "%" in verdict.reason


def test_no_rule_fires_on_a_healthy_run() -> None:
    assert rules(FACTS) == []


def test_data_wait_rule() -> None:
    assert rules(replace(FACTS, data_share=0.101)) == ["data-wait"]
    assert rules(replace(FACTS, data_share=0.10)) == []
    rec = recommend(replace(FACTS, data_share=0.34))[0]
    assert "34.0 %" in rec.trigger and "data.num_workers (now 4)" in rec.advice
    assert "4 loader workers per rank, CPUs 50.0 % busy" in rec.trigger
    assert "data.decode=device" not in rec.advice  # synthetic images: nothing to decode
    # Image data decoded in the loader: device decoding and pre-resized shards are offered.
    images = recommend(replace(FACTS, data_share=0.34, dataset="imagefolder"))[0]
    assert "set data.decode=device" in images.advice and "kd prepare-data" in images.advice
    on_device = recommend(replace(FACTS, data_share=0.34, dataset="wds", decode="device"))[0]
    assert "data.decode=device" not in on_device.advice and "kd prepare-data" in on_device.advice


def test_cpu_saturated_rule() -> None:
    busy = replace(FACTS, cpu_util=0.95, num_workers=4, logical_cores=8)
    assert rules(busy) == ["cpu-saturated"]
    assert "95.0 %" in recommend(busy)[0].trigger
    assert rules(replace(busy, cpu_util=0.90)) == []
    assert rules(replace(busy, num_workers=3)) == []  # 3 workers on 8 cores is not many
    assert rules(replace(busy, num_workers=2, local_world_size=2)) == ["cpu-saturated"]
    assert rules(replace(busy, cpu_util=None)) == []
    loaded = replace(busy, workers_cpu_share=0.30)
    assert rules(loaded) == ["cpu-saturated"]
    assert "using 30.0 % of the machine" in recommend(loaded)[0].trigger
    assert rules(replace(busy, workers_cpu_share=0.05)) == []  # idle loaders compete with nothing


def test_cpu_contention_rule() -> None:
    shared = replace(FACTS, cpu_util=0.95, own_cpu_share=0.30, num_workers=4)
    assert rules(shared) == ["cpu-contention"]  # not kd's workers: the others' load
    assert "65.0 %" in recommend(shared)[0].trigger
    assert rules(replace(shared, own_cpu_share=0.71)) == ["cpu-saturated"]
    assert rules(replace(shared, own_cpu_share=0.71, num_workers=1)) == []
    assert rules(replace(shared, cpu_util=0.85)) == []


def test_quiet_rules_give_the_numbers_that_kept_them_quiet() -> None:
    notes = report.quiet_rules(replace(FACTS, precision="fp32", bf16_speedup=0.03), set())
    assert "data wait 2.0 % ≤ 10.0 %" in notes
    assert any("only 0.03× as fast" in n for n in notes)
    assert "one rank: no collectives, no stragglers" in notes
    multi = report.quiet_rules(replace(FACTS, world_size=2, comm_share=0.05), {"data-wait"})
    assert not any(n.startswith("data wait") for n in multi)
    assert "collectives 5.0 % ≤ 20.0 %" in multi


def test_fp32_gemm_rule() -> None:
    fp32 = replace(FACTS, precision="fp32", gemm_share=0.3, bf16_speedup=3.0)
    assert rules(fp32) == ["fp32-gemm"]
    assert "30.0 %" in recommend(fp32)[0].trigger and "3.0×" in recommend(fp32)[0].trigger
    assert rules(replace(fp32, precision="tf32")) == ["fp32-gemm"]
    assert rules(replace(fp32, bf16_speedup=None)) == ["fp32-gemm"]
    assert rules(replace(fp32, bf16_speedup=1.2)) == []  # a CPU without fast bf16
    assert rules(replace(fp32, gemm_share=0.19)) == []
    assert rules(replace(fp32, precision="bf16")) == []


def test_optimizer_state_rule() -> None:
    big = replace(FACTS, world_size=4, optimizer_state_bytes=30 * 2**20,
                  memory_peak_bytes=100 * 2**20)
    assert rules(big) == ["optimizer-state"]
    rec = recommend(big)[0]
    assert "30.0 %" in rec.trigger and "optim.zero=true" in rec.advice and "22.50 MiB" in rec.advice
    assert rules(replace(big, sharded_optimizer=True)) == []
    assert rules(replace(big, world_size=1)) == []
    assert rules(replace(big, optimizer_state_bytes=20 * 2**20)) == []


def test_communication_and_straggler_rules() -> None:
    assert rules(replace(FACTS, world_size=2, comm_share=0.21)) == ["communication"]
    assert rules(replace(FACTS, world_size=2, comm_share=0.20)) == []
    assert rules(replace(FACTS, world_size=1, comm_share=0.5)) == []
    slow = replace(FACTS, world_size=2, slowest_rank=1, slowest_excess=0.25)
    assert rules(slow) == ["straggler"]
    assert "rank 1 is 25.0 %" in recommend(slow)[0].trigger
    assert rules(replace(slow, slowest_excess=0.05)) == []


def op(name: str, kind: str = "cpu_op", self_cpu: float = 0.0, cpu_total: float | None = None,
       self_dev: float = 0.0, dev_total: float | None = None) -> dict:
    return {"name": name, "calls": 1, "kind": kind, "self_cpu_s": self_cpu,
            "cpu_total_s": self_cpu if cpu_total is None else cpu_total,
            "self_device_s": self_dev, "device_total_s": self_dev if dev_total is None
            else dev_total}


def test_op_totals_on_cpu() -> None:
    ops = [op("aten::mm", self_cpu=3.0), op("aten::add", self_cpu=1.0),
           op("backward", self_cpu=5.0), op("ProfilerStep#3", self_cpu=9.0),
           op("c10d::allreduce_", self_cpu=0.1), op("gloo:all_reduce", cpu_total=2.0)]
    totals = op_totals(ops, "cpu", exclude=["backward"])
    assert totals == {"compute_s": 4.0, "gemm_s": 3.0, "comm_s": 2.0}
    no_backend = [o for o in ops if not o["name"].startswith("gloo")]
    assert op_totals(no_backend, "cpu", exclude=["backward"])["comm_s"] == pytest.approx(0.1)


def test_op_totals_on_gpu_read_kernels() -> None:
    ops = [op("aten::mm", dev_total=3.0), op("sm90_xmma_gemm", "kernel", self_dev=3.0),
           op("elementwise_kernel", "kernel", self_dev=1.0),
           op("ncclDevKernel_AllReduce_Sum_f32_RING_LL", "kernel", self_dev=0.5)]
    assert op_totals(ops, "cuda") == {"compute_s": 4.0, "gemm_s": 3.0, "comm_s": 0.5}


# ------------------------------------------------------------------------------ peaks, memory


def test_peak_table() -> None:
    assert table_peak("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert table_peak("NVIDIA H100 PCIe", "bf16") == 756e12
    assert table_peak("NVIDIA H200", "bf16") == 989e12
    assert table_peak("NVIDIA A100-SXM4-80GB", "tf32") == 156e12
    assert table_peak("NVIDIA H100 NVL", "bf16") is None  # not tabulated: measured instead
    assert table_peak("NVIDIA L4", "bf16") is None
    assert matmul_precision("fp32", torch.device("cpu")) == "fp32"


def test_matmul_measurement_is_positive() -> None:
    assert measure_matmul_flops("fp32", torch.device("cpu"), max_size=256,
                                min_seconds=0.01) > 0


def test_optimizer_state_bytes_counts_tensors() -> None:
    w = torch.nn.Parameter(torch.zeros(10))
    opt = torch.optim.AdamW([w])
    assert optimizer_state_bytes(opt) == 0
    w.grad = torch.ones(10)
    opt.step()
    assert optimizer_state_bytes(opt) >= 2 * 10 * 4  # exp_avg and exp_avg_sq
    wrapper = types.SimpleNamespace(optim=opt, state={})  # how ZeRO holds its local shard
    assert optimizer_state_bytes(wrapper) == optimizer_state_bytes(opt)


def test_resource_sampler_samples_every_core() -> None:
    with ResourceSampler(interval=0.02) as sampler:
        time.sleep(0.1)
    s = sampler.samples
    assert len(s.t) >= 2 and len(s.cpu) == len(s.t) == len(s.rss)
    assert all(len(row) == len(s.cpu[0]) > 0 for row in s.cpu)
    assert s.gpu == [] and s.gpu_source == "no GPU"


def test_external_profilers_need_their_tools(monkeypatch) -> None:
    with pytest.raises(UserError, match="needs a CUDA device"):
        ExternalCapture("nsys", torch.device("cpu"))
    monkeypatch.setitem(sys.modules, "smprof", None)  # import fails
    with pytest.raises(UserError, match="SageMaker's training containers"):
        ExternalCapture("sagemaker", torch.device("cpu"))
    ExternalCapture("none", torch.device("cpu")).start()  # a no-op


def test_sagemaker_capture_follows_the_documented_calls(monkeypatch) -> None:
    calls: list[str] = []

    class Profiler:
        @classmethod
        def instance(cls) -> Profiler:
            return cls()

        def configure(self, config: object) -> None:
            calls.append(f"configure {config.profiler}")

        def start_profiling(self) -> None:
            calls.append("start")

        def stop_profiling(self) -> None:
            calls.append("stop")

    smprof = types.ModuleType("smprof")
    smprof.__spec__ = importlib.machinery.ModuleSpec("smprof", None)
    smprof.annotate = lambda name: None
    smprof.SMProfiler, smprof.Config = Profiler, types.SimpleNamespace
    monkeypatch.setitem(sys.modules, "smprof", smprof)
    capture = ExternalCapture("sagemaker", torch.device("cpu"))
    capture.start()
    capture.stop()
    assert calls == ["configure {'EnableCuda': '0'}", "start", "stop"]
    assert capture.owns_cupti


def test_run_dir_is_cleared_of_old_results_but_never_a_training_run(tmp_path: Path) -> None:
    out = tmp_path / "profile"
    (out / "tb").mkdir(parents=True)
    for name in ("report.md", "phases.png", "trace_rank3.json", "tb/rank0.1.pt.trace.json",
                 "notes.png", "tb/events.out.tfevents.1"):
        (out / name).write_text("old")
    prepare_run_dir(out)
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == [
        "events.out.tfevents.1", "notes.png"]
    (tmp_path / "summary.json").write_text("{}")
    with pytest.raises(UserError, match="holds a training run"):
        prepare_run_dir(tmp_path)


@pytest.mark.parametrize("bad", [{"active": 0}, {"wait": -1}, {"warmup": -2}, {"top": 0},
                                 {"external": "perf"}])
def test_profile_settings_are_validated(bad: dict) -> None:
    with pytest.raises(UserError):
        ProfileSettings(**bad).validate()


# ------------------------------------------------------------------------------ rendering


def test_markdown_and_self_contained_html(tmp_path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(1, 1))
    fig.add_subplot().plot([0, 1])
    fig.savefig(tmp_path / "p.png")
    sections = [report.Section("Numbers", [
        "Mean **3.0 s** for `a|b` <x>",
        report.Table(["k", "v"], [["a|b", "1.0 %"]]),
        report.Image("p.png", "a plot"),
    ])]
    md = report.render_markdown("T", sections)
    assert "## Numbers" in md and "| a\\|b | 1.0 % |" in md and "![a plot](p.png)" in md
    page = report.render_html("T", sections, tmp_path)
    assert "<strong>3.0 s</strong>" in page and "<code>a|b</code>" in page
    assert "&lt;x&gt;" in page and 'src="data:image/png;base64,iVBOR' in page


# ------------------------------------------------------------------------------ timing line

RECORD = {"step": 40, "epoch": 1.0, "loss": 0.5, "loss_task": 0.6, "loss_kd": 0.4, "lr": 1e-3,
          "img_per_s": 812.4, "t_data": 0.0005, "t_teacher": 0.61, "t_student_fwd": 0.83,
          "t_loss": 0.01, "t_backward": 8.41, "t_optim": 0.12, "eta_s": 10.0}


def test_phase_line_shows_the_records_numbers() -> None:
    assert phase_line(RECORD) == ("iter 40 | data 0.0005s | teacher 0.61s | forward 0.83s | "
                                  "backward 8.41s | optim 0.12s | 812 img/s")
    line = phase_line({**RECORD, "t_data": 0.000123456, "t_backward": 12.3456})
    assert "data 0.000123s" in line and "backward 12.3s" in line


def test_console_prints_the_line_only_with_log_phases(caplog) -> None:
    with caplog.at_level(logging.INFO, logger="kd"):
        ConsoleSink(100, 0, interactive=False).write(RECORD)
        assert not any(m.startswith("iter ") for m in caplog.messages)
        ConsoleSink(100, 0, interactive=False, log_phases=True).write(RECORD)
    assert caplog.messages[-1] == phase_line(RECORD)

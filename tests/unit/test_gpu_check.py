"""The GPU acceptance suite's logic on the CPU (``benchmarks/gpu_check.py``): its bookkeeping
(statuses, budgets, isolation, the JSON), its configs and commands, the trace reading, the
ratios, the generated JPEGs, and the fast checks themselves on tiny models. The checks on CUDA
are ``tests/gpu/``."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import kd
from kd.cli import build_parser
from kd.config import iter_fields, load_config
from kd.core.trainer import PHASES, Trainer
from kd.errors import ConfigError
from tests.conftest import ROOT
from tests.gpu.helpers import load_gpu_check

g = load_gpu_check()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def cpu(tmp_path: Path) -> Any:
    return g.Settings(device="cpu", workdir=tmp_path, size="tiny", gpus=0)


# ------------------------------------------------------------------------------ bookkeeping
def test_the_checks_are_the_eight_in_order_within_eight_minutes() -> None:
    assert [c.letter for c in g.CHECKS.values()] == list("abcdefgh")
    assert sum(c.budget_s for c in g.CHECKS.values()) <= g.TOTAL_BUDGET_S < 8 * 60
    assert [c.name for c in g.select_checks("a,phase_times,h", "h")] == ["train_bf16_fused",
                                                                         "phase_times"]
    with pytest.raises(ValueError, match=r"unknown check.*z"):
        g.select_checks("a,z", None)


def _raises(ctx: Any) -> None:
    ctx.record(before=1)
    raise RuntimeError("CUDA error: an illegal memory access was encountered")


def _skips(ctx: Any) -> None:
    raise g.Skip("needs two GPUs")


def _expects(ctx: Any) -> None:
    ctx.record(ratio=3.0)
    ctx.expect(False, "ratio 3.0 outside 0.5-2")
    ctx.expect(True, "never reported")
    ctx.record(after=2)  # an expectation that fails does not stop the check


def _requires(ctx: Any) -> None:
    ctx.require(False, "kd profile exited with 2")
    ctx.record(unreachable=True)


def _passes(ctx: Any) -> None:
    ctx.record(img_per_s=123.0)


def _slow(ctx: Any) -> None:
    time.sleep(0.05)


def test_a_check_that_raises_fails_alone_and_the_json_says_what_each_did(cpu: Any) -> None:
    checks = [g.Check(letter, name, name, budget, fn) for letter, name, budget, fn in (
        ("a", "raises", 10, _raises), ("b", "skips", 10, _skips), ("c", "expects", 10, _expects),
        ("d", "requires", 10, _requires), ("e", "passes", 10, _passes), ("f", "slow", 0.01, _slow))]
    seen: list[str] = []
    records = g.run_checks(checks, cpu, isolate=False, progress=lambda r: seen.append(r["name"]))
    assert seen == [c.name for c in checks]
    by = {r["name"]: r for r in records}
    assert [r["status"] for r in records] == ["fail", "skipped", "fail", "fail", "pass", "fail"]
    assert by["raises"]["reason"].startswith("RuntimeError: CUDA error")
    assert "Traceback" in by["raises"]["error"] and by["raises"]["numbers"] == {"before": 1}
    assert by["skips"]["reason"] == "needs two GPUs"
    assert by["expects"]["problems"] == ["ratio 3.0 outside 0.5-2"]
    assert by["expects"]["numbers"] == {"ratio": 3.0, "after": 2}
    assert by["requires"]["reason"] == "kd profile exited with 2" and not by["requires"]["numbers"]
    assert by["passes"]["numbers"] == {"img_per_s": 123.0} and by["passes"]["reason"] is None
    assert re.match(r"took 0\.\d s, over its budget of 0\.01 s", by["slow"]["reason"])

    report = json.loads(json.dumps(g.build_report(records, {"gpu_count": 0}, cpu, 1.0, ["-x"])))
    assert report["schema"] == g.SCHEMA and report["summary"] == {"pass": 1, "fail": 4,
                                                                   "skipped": 1}
    assert set(report["checks"][0]) >= {"letter", "name", "title", "status", "reason", "wall_s",
                                        "budget_s", "numbers", "problems", "error"}
    assert "FAIL" in g.format_record(by["raises"]) and "illegal memory" in g.format_record(
        by["raises"])


def test_checks_that_the_total_budget_cannot_start_are_skipped(cpu: Any) -> None:
    checks = [g.Check("a", "passes", "p", 10, _passes)]
    (record,) = g.run_checks(checks, cpu, isolate=False, total_budget_s=g.MIN_BUDGET_S - 1)
    assert record["status"] == "skipped" and "total budget" in record["reason"]


def test_an_isolated_check_is_killed_at_its_budget_and_keeps_its_numbers(
        cpu: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # A child that records a number, then hangs; and one that dies without a result.
    hang = ("import json, sys, time; open(sys.argv[1], 'w').write(json.dumps({'steps': 3})); "
            "print('compiling...', flush=True); time.sleep(60)")
    monkeypatch.setattr(g, "child_command", lambda check, settings, deadline, result: [
        sys.executable, "-c", hang, str(result.with_suffix(".partial.json"))])
    check = g.Check("g", "hangs", "hangs", 60, _passes)
    t0 = time.perf_counter()
    record = g.run_isolated(check, cpu, budget_s=1.0)
    assert time.perf_counter() - t0 < 5
    assert record["status"] == "fail" and "timed out after 1 s" in record["reason"]
    assert record["numbers"] == {"steps": 3} and "compiling..." in record["log_tail"]
    monkeypatch.setattr(g, "child_command", lambda *a: [sys.executable, "-c", "exit(3)"])
    record = g.run_isolated(check, cpu, budget_s=10.0)
    assert record["status"] == "fail" and "exited with code 3 without a result" in record["reason"]


def test_the_environment_record_on_this_machine() -> None:
    env = g.environment()
    assert env["gpu_count"] == torch.cuda.device_count()
    assert env["torch"] == torch.__version__ and env["kd_version"] == kd.__version__
    assert env["device_name"] and env["cpu"] and env["python"]
    assert env["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}", env["git_commit"])
    assert {"cuda", "cudnn", "nccl", "driver", "gpus", "torchvision", "timm"} <= set(env)
    json.dumps(env)


def test_without_cuda_every_check_is_skipped_and_the_exit_code_says_so(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is present")
    out = tmp_path / "r.json"
    assert g.main(["--only", "a,h", "--out", str(out), "--workdir", str(tmp_path / "w")]) == 2
    report = json.loads(out.read_text())
    assert [c["status"] for c in report["checks"]] == ["skipped", "skipped"]
    assert "no CUDA device" in report["checks"][0]["reason"]


# ------------------------------------------------------------------------------ configs, commands
def test_presets_and_commands_are_ones_kd_accepts(cpu: Any, monkeypatch: pytest.MonkeyPatch
                                                  ) -> None:
    monkeypatch.setattr(g, "random_teacher", lambda settings, size=None: Path("t.safetensors"))
    parser = build_parser()
    for device, size in (("cpu", "tiny"), ("cuda", "small")):
        settings = g.Settings(device, cpu.workdir, size, 1)
        ctx = g.Context(settings, "x")
        cfg = ctx.config("x", "train.compile=true", "train.compile_mode=reduce-overhead")
        assert (cfg.train.device, cfg.train.precision, cfg.data.image_size) == (
            device, "bf16", g.SIZES[size].image_size)
        preset = ctx.preset("y")
        for args in (g.bench_arguments(settings, Path("b.json")),
                     g.profile_arguments(preset, Path("p")),
                     g.plan_arguments(preset, g.plan_gpu_key("NVIDIA H200"), Path("p.json"))):
            parser.parse_args(args)  # kd's own options, as kd parses them
    assert "224" in g.bench_arguments(g.Settings("cuda", cpu.workdir, "small"), Path("b"))
    assert g.plan_gpu_key("NVIDIA A100-SXM4-80GB") == "a100-80gb"
    assert g.plan_gpu_key("NVIDIA L4") == "h100"
    assert [g.torchrun_processes("cuda", n) for n in (1, 2, 8)] == [1, 2, 2]
    assert g.torchrun_processes("cpu", 0) == 1
    cmd = g.torchrun_command(2, 1234, "-m", "kd.cli", "train")
    assert "--nproc-per-node=2" in cmd and cmd[-3:] == ["-m", "kd.cli", "train"]


def test_kd_bench_finds_the_folder_of_its_json_in_a_fresh_work_folder(
        cpu: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from kd.tools.bench import check_json_path

    def bench(args: list[str]) -> tuple[int, str]:
        check_json_path(args[args.index("--json") + 1])  # what kd bench checks first
        return 2, "stopped here"

    monkeypatch.setattr(g, "run_kd_cli", bench)
    record = g.run_check(g.CHECKS["bench_mfu"], cpu)
    assert record["reason"] == "kd bench exited with 2: stopped here"


def test_device_decoding_is_skipped_exactly_while_kd_lacks_the_key(cpu: Any) -> None:
    missing = ConfigError("command line: unknown config key 'data.decode' (did you mean "
                          "'data.scale'?)")
    assert "no data.decode key" in g.decode_key_missing(missing)
    assert g.decode_key_missing(ConfigError("command line: unknown config key 'data.decod'")) \
        is None
    assert g.decode_key_missing(ConfigError("command line: invalid value for 'data.decode'")) \
        is None
    has_key = "data.decode" in {k for k, _ in iter_fields()}
    try:
        load_config(str(g.TINY_PRESET), ["data.decode=cpu"])
        probe = None
    except ConfigError as e:
        probe = g.decode_key_missing(e)
    assert (probe is None) == has_key


def test_generated_jpegs_form_an_image_folder(tmp_path: Path) -> None:
    from PIL import Image

    info = g.write_image_folder(tmp_path, classes=2, train_per_class=3, val_per_class=1,
                                unique=2, width=60, height=45)
    assert (info["train"], info["val"], info["unique"]) == (6, 2, 2)
    for split, n in (("train", 3), ("val", 1)):
        assert sorted(p.name for p in (tmp_path / split).iterdir()) == ["class_0", "class_1"]
        assert len(list((tmp_path / split / "class_1").glob("*.jpg"))) == n
    with Image.open(tmp_path / "train" / "class_0" / "00000.jpg") as jpeg:
        assert (jpeg.format, jpeg.mode, jpeg.size) == ("JPEG", "RGB", (60, 45))
        image = torch.from_numpy(np.asarray(jpeg, dtype=np.float32))
    assert 40 < image.mean() < 215 and image.std() > 10  # structure, not a flat field


# ------------------------------------------------------------------------------ numbers, traces
def test_ratios() -> None:
    s = g.phase_summary([{"a": 0.2, "b": 0.5}, {"a": 0.3, "b": 0.6}], [1.0, 1.0])
    assert s["ratio_min"] == pytest.approx(0.7) and s["ratio_max"] == pytest.approx(0.9)
    assert s["phases_s_median"] == pytest.approx({"a": 0.25, "b": 0.55}) and s["steps"] == 2
    with pytest.raises(ValueError):
        g.phase_summary([{"a": 1.0}], [0.0])
    assert g.plan_ratio(3.0, 2.0) == 1.5
    with pytest.raises(ValueError):
        g.plan_ratio(1.0, 0)


def test_a_real_cpu_trace_holds_kd_ranges_with_operators_inside(cpu: Any, tmp_path: Path
                                                                ) -> None:
    trainer = Trainer(g.Context(cpu, "trace").config("trace"))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        trainer.train(evaluate=False, save=False, steps=2)
    prof.export_chrome_trace(str(tmp_path / "trace.json"))
    summary = g.summarize_trace(json.loads((tmp_path / "trace.json").read_text()))
    assert summary["cpu_ranges"] == dict.fromkeys(PHASES, 2)
    assert all(summary["cpu_ops_in"][n] > 0 for n in g.FORWARD_BACKWARD)
    assert summary["kernels"] == 0 and not any(summary["gpu_ranges"].values())
    assert g.trace_problems(summary, "cpu") == []
    problems = " | ".join(g.trace_problems(summary, "cuda", nvtx=[]))
    assert "no CUDA kernels" in problems and "GPU timeline" in problems and "NVTX" in problems


def _event(cat: str, name: str, ts: float, dur: float, pid: int = 0) -> dict[str, Any]:
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": pid, "tid": 7}


def test_kernels_are_counted_inside_the_gpu_ranges_of_a_cuda_trace() -> None:
    events = []
    for i, name in enumerate(PHASES):
        start = 100.0 * i
        events += [_event("user_annotation", name, start, 90), _event("cpu_op", "aten::mm",
                                                                       start + 1, 5),
                   _event("gpu_user_annotation", name, start + 10, 80, pid=1)]
        if name != "backward":
            events.append(_event("kernel", f"sm90_gemm_{i}", start + 20, 10, pid=1))
    events.append(_event("kernel", "stray", 10_000, 5, pid=1))
    summary = g.summarize_trace({"traceEvents": events})
    assert summary["kernels"] == len(PHASES) and summary["kernel_names"] == len(PHASES)
    assert summary["kernels_in"] == {n: int(n != "backward") for n in PHASES}
    assert summary["gpu_ranges"] == dict.fromkeys(PHASES, 1)
    assert g.trace_problems(summary, "cuda", nvtx=list(PHASES)) == [
        "no CUDA kernels inside the GPU ranges ['backward']"]


# ------------------------------------------------------------------------------ the checks, on CPU
def test_the_skip_audit_sees_the_host_sync_of_an_unfused_optimizer(cpu: Any) -> None:
    ctx = g.Context(cpu, "audit")
    fused = g.skip_step_audit(Trainer(ctx.config("fused")), clean_steps=1)
    assert fused["fused_kernel_seen"] and fused["host_syncs_skipped_step"] == []
    assert fused["skipped_steps"] == 1 and fused["weights_unchanged_by_skipped_step"]
    foreach = g.skip_step_audit(Trainer(ctx.config("foreach", "optim.kwargs={foreach: true}")),
                                clean_steps=1)
    assert not foreach["fused_kernel_seen"] and foreach["skipped_steps"] == 1
    assert foreach["host_syncs_skipped_step"] == ["a read of a device value (.item() or bool())"]


def test_the_script_runs_fast_checks_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    assert g.main(["--device", "cpu", "--only", "a,b,e", "--in-process", "--out", str(out),
                   "--workdir", str(tmp_path / "work")]) == 0
    report = json.loads(out.read_text())
    assert report["settings"]["size"] == "tiny" and report["environment"]["gpu_count"] == 0
    checks = {c["name"]: c for c in report["checks"]}
    assert [c["status"] for c in checks.values()] == ["pass"] * 3, checks
    assert checks["train_bf16_fused"]["numbers"]["fused"]
    phases = checks["phase_times"]["numbers"]
    assert g.PHASE_RATIO_MIN <= phases["ratio_median"] <= phases["ratio_max"] <= 1.0
    plan = checks["plan_memory"]["numbers"]
    assert g.PLAN_RATIO_RANGE[0] <= plan["ratio"] <= g.PLAN_RATIO_RANGE[1]


def test_the_shell_entry_point_writes_gpu_check_json_at_the_root() -> None:
    sh = ROOT / "benchmarks" / "gpu_check.sh"
    assert os.access(sh, os.X_OK)
    assert "python benchmarks/gpu_check.py --out gpu_check.json \"$@\"" in sh.read_text()


@pytest.mark.slow
def test_the_shell_entry_point_runs_a_check_in_a_child_process(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    result = subprocess.run([str(ROOT / "benchmarks" / "gpu_check.sh"), "--device", "cpu",
                             "--only", "phase_times", "--out", str(out)],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    (check,) = json.loads(out.read_text())["checks"]
    assert check["status"] == "pass" and Path(check["log"]).name == "phase_times.log"
    assert "1 passed, 0 failed, 0 skipped" in result.stdout

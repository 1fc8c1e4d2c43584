"""The GPU acceptance suite (``benchmarks/gpu_check.py``) as tests: one per check, on CUDA.

Each test runs its check exactly as the script does (a child process, killed at the check's
budget) and asserts that it passed and that its numbers are sane. Without a CUDA device
``tests/conftest.py`` reports them as skipped; with one, ``pytest`` (and so ``.ci/run``) runs
them, about 8 minutes on one GPU. ``benchmarks/gpu_check.sh`` runs the same checks and writes
their numbers to one JSON.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.gpu.helpers import load_gpu_check

pytestmark = pytest.mark.gpu

gpu_check = load_gpu_check()


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return gpu_check.Settings(device="cuda", workdir=Path(tmp_path_factory.mktemp("gpu_check")),
                              size="small", gpus=torch.cuda.device_count())


def explain(record: dict[str, Any]) -> str:
    return "\n".join(str(part) for part in (record["reason"], record.get("problems"),
                                             record.get("error"), record.get("log_tail")) if part)


def passed(name: str, settings: Any, may_skip: bool = False) -> dict[str, Any]:
    """The numbers of check ``name`` run in its own process; fails the test unless it passed."""
    record = gpu_check.run_isolated(gpu_check.CHECKS[name], settings)
    if may_skip and record["status"] == "skipped":
        pytest.skip(record["reason"])
    assert record["status"] == "pass", explain(record)
    return record["numbers"]


def test_the_environment_record_names_the_gpu_and_its_libraries() -> None:
    env = gpu_check.environment()
    assert env["gpu_count"] == torch.cuda.device_count() >= 1
    assert env["device_name"] == torch.cuda.get_device_name(0)
    assert env["cuda"] and env["cudnn"] and env["nccl"]
    # The driver comes from nvidia-smi or NVML (pynvml); a container may have neither.
    assert env["driver"] or not (shutil.which("nvidia-smi") or importlib.util.find_spec("pynvml"))


def test_bf16_steps_use_fused_adamw_and_skip_a_non_finite_step_without_a_host_sync(
        settings: Any) -> None:
    n = passed("train_bf16_fused", settings)
    assert n["precision"] == "bf16" and n["student_logits_dtype"] == "bfloat16"
    assert n["fused"] and n["fused_kernel_seen"]
    assert n["skipped_steps"] == 1 and n["weights_unchanged_by_skipped_step"]
    assert n["cuda_sync_debug_mode"]
    assert n["host_syncs_skipped_step"] == [] and n["host_syncs_clean_step"] == []


def test_cuda_event_phase_times_fit_inside_the_wall_time(settings: Any) -> None:
    n = passed("phase_times", settings)
    assert n["timer"] == "cuda events"
    assert n["ratio_median"] >= gpu_check.PHASE_RATIO_MIN
    assert n["ratio_max"] <= gpu_check.PHASE_RATIO_MAX
    assert n["phases_s_median"]["backward"] > 0


def test_torchrun_trains_over_an_nccl_process_group(settings: Any) -> None:
    n = passed("nccl_torchrun", settings)
    assert n["backend"] == "nccl"
    assert n["world_size"] == n["nproc"] == min(2, torch.cuda.device_count())
    assert n["steps"] == 12


def test_kd_profile_trace_holds_cuda_kernels_inside_kd_ranges(settings: Any) -> None:
    n = passed("profile_trace", settings)
    assert n["ops_on"] == "cuda" and n["kernels"] > 0
    for name in gpu_check.FORWARD_BACKWARD:
        assert n["gpu_ranges"][name] > 0 and n["kernels_in"][name] > 0, name
    assert set(gpu_check.FORWARD_BACKWARD) <= set(n["nvtx_ranges"])


def test_plan_predicts_the_measured_peak_memory_within_a_factor_of_two(settings: Any) -> None:
    n = passed("plan_memory", settings)
    assert n["measured_source"].startswith("torch.cuda.max_memory_allocated")
    low, high = gpu_check.PLAN_RATIO_RANGE
    assert low <= n["ratio"] <= high


def test_bench_at_224_px_bf16_reports_mfu(settings: Any) -> None:
    n = passed("bench_mfu", settings)
    assert n["image_size"] == 224 and n["precision"] == "bf16"
    assert 0 < n["mfu"]["kd"] <= 1
    assert n["ratios"]["kd/plain"] >= gpu_check.BENCH_MIN_KD_PLAIN


def test_compile_with_reduce_overhead_trains(settings: Any) -> None:
    n = passed("compile_reduce_overhead", settings)
    assert n["compile_mode"] == "reduce-overhead"
    assert n["compiled"]["finite"] and n["compiled"]["img_per_s"] > 0
    assert n["eager"]["img_per_s"] > 0


def test_device_decoding_against_cpu_decoding(settings: Any) -> None:
    n = passed("decode_device", settings, may_skip=True)  # until data.decode exists
    assert n["cpu"]["img_per_s"] > 0 and n["device"]["img_per_s"] > 0

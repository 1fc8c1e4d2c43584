"""Launching kd in several processes on loopback, and comparing the students they train."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT

# fp32 on CPU: 2 ranks × B and 1 rank × 2B differ only in the order of floating-point sums
# (gradient all-reduce vs one batch mean), which Adam amplifies to ~1e-4 after 16 steps.
ATOL = 2e-3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                        "MASTER_PORT")}
    return {**env, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
            **(extra or {})}


def torchrun(nproc: int, *args: str, nnodes: int = 1, node_rank: int = 0, port: int | None = None,
             wait: bool = True, command: str = "train"
             ) -> subprocess.CompletedProcess | subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}",
           f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
           f"--master-port={port or free_port()}", f"--node-rank={node_rank}",
           "-m", "kd.cli", command, *args]
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=launch_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, cwd=ROOT, env=launch_env(), capture_output=True, text=True,
                          timeout=600)


def single(*args: str, command: str = "train") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kd.cli", command, *args], cwd=ROOT,
                          env=launch_env(), capture_output=True, text=True, timeout=600)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "student.safetensors"))


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def keep_only_checkpoint(run: Path, step: int) -> None:
    """Turn a finished run into one killed right after its checkpoint at ``step``."""
    ckpts = run / "checkpoints"
    for later in ckpts.glob("step_*"):
        if int(later.name.removeprefix("step_")) > step:
            shutil.rmtree(later)
    (ckpts / "latest").write_text(f"step_{step:08d}\n")
    (run / "student.safetensors").unlink()
    (run / "summary.json").unlink()


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (a hung or stopped rank included)."""
    try:
        root = psutil.Process(pid)
        procs = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)

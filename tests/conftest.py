"""Shared fixtures: a tiny teacher checkpoint made once per session, and CLI helpers."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` reproduce CUDA-only behaviour: they run where a CUDA device is
    present (``pytest -m gpu`` on a GPU machine) and are reported as skipped elsewhere."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run `pytest -m gpu` on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """torch on one intra-op thread for this module (restored after): tiny models gain nothing
    from intra-op threads, and tests run side by side."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run_kd(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
           timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the real ``kd`` CLI in a subprocess (as a user would) and capture its output."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "kd.cli", *args], cwd=cwd or ROOT,
                          env=full_env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session", autouse=True)
def kd_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Keep the loader-tuning cache (data.num_workers=auto) out of the user's home directory;
    subprocesses inherit it through the environment."""
    path = tmp_path_factory.mktemp("kd_cache")
    os.environ["KD_CACHE_DIR"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A teacher for configs/tiny.yaml, trained on labels for a few seconds; its weights path."""
    from kd.config import load_config
    from kd.core.trainer import Trainer

    out = tmp_path_factory.mktemp("tiny_teacher")
    cfg = load_config(TINY, [f"output_dir={out}", "distill.loss=none", "teacher.checkpoint=null",
                             "student.kwargs.embed_dim=48", "train.epochs=6",
                             "checkpoint.every_steps=0"])
    Trainer(cfg).train()
    return str(out / "student.safetensors")


@pytest.fixture
def tiny_args(tiny_teacher: str, tmp_path: Path) -> list[str]:
    """CLI arguments for a tiny distillation run writing into a fresh directory."""
    return ["-c", TINY, f"teacher.checkpoint={tiny_teacher}", f"output_dir={tmp_path / 'run'}"]

"""Fixtures for multi-process tests: base arguments and the one-process reference run."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.conftest import TINY
from tests.multiproc.helpers import kill_tree, ok, single


@pytest.fixture
def base(tiny_teacher: str) -> list[str]:
    # keep: the resume tests cut runs back to an early checkpoint, which the default
    # (3 newest plus the best) would have pruned.
    return ["-c", TINY, f"teacher.checkpoint={tiny_teacher}", "checkpoint.resume=auto",
            "checkpoint.keep=10"]


@pytest.fixture(scope="module")
def reference(tiny_teacher: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One process, global batch 16 (2 × 8), 16 steps: what every multi-process run must match."""
    out = tmp_path_factory.mktemp("ref")
    ok(single("-c", TINY, f"teacher.checkpoint={tiny_teacher}", f"output_dir={out}",
              "data.batch_size=16"))
    return out


@pytest.fixture(autouse=True)
def no_orphans() -> Iterator[None]:
    """After each test, kill whatever it launched and left running (a failed test's torchrun
    and its workers): a stuck rank would otherwise live on and slow every later test."""
    yield
    for child in psutil.Process().children():
        kill_tree(child.pid)

"""Helpers for the integration tests: tiny runs in-process, and reading what a run wrote.

In-process runs (``Trainer(load_config(...)).train()``) take well under a second; a ``kd``
subprocess costs several seconds of start-up, so it is kept for tests whose subject is the
command itself (exit codes, messages, the results table, files written by ``kd eval/export``).

Modules that train use ``pytestmark = pytest.mark.usefixtures("one_thread")``: the tiny models
gain nothing from intra-op threads, and on a busy 2-core machine OpenMP's spinning threads make
a sub-second run take ten times longer.
"""

from __future__ import annotations

import json
import math
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import TINY, run_kd

ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def kd_cli(*args: str) -> subprocess.CompletedProcess:
    """``run_kd`` with one OpenMP thread (see the module docstring)."""
    return run_kd(*args, env=ONE_THREAD)


@dataclass
class Run:
    """What a finished run left in its output directory."""

    dir: Path
    summary: dict[str, Any]

    @property
    def records(self) -> list[dict[str, Any]]:
        return read_jsonl(self.dir / "metrics.jsonl")

    @property
    def train_records(self) -> list[dict[str, Any]]:
        return [r for r in self.records if "split" not in r]

    @property
    def val_records(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("split") == "val"]

    @property
    def weights(self) -> dict[str, torch.Tensor]:
        return load_file(str(self.dir / "student.safetensors"))

    def checkpoint(self, step: int) -> Path:
        return self.dir / "checkpoints" / f"step_{step:08d}"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def tiny_config(teacher: str | None, out: Path, *overrides: str) -> Any:
    """configs/tiny.yaml with the session's tiny teacher, writing into ``out``."""
    from kd.config import load_config

    return load_config(TINY, [f"teacher.checkpoint={teacher}" if teacher else
                              "teacher.checkpoint=null", f"output_dir={out}", *overrides])


def train_tiny(teacher: str | None, out: Path, *overrides: str) -> Run:
    """One tiny run in this process (2 epochs × 8 steps unless overridden)."""
    from kd.core.trainer import Trainer

    summary = Trainer(tiny_config(teacher, out, *overrides)).train()
    return Run(out, summary)


@pytest.fixture
def tiny_run(tiny_teacher: str, tmp_path: Path) -> Callable[..., Run]:
    """``tiny_run(name, *overrides)``: a tiny in-process run under this test's tmp_path."""

    def run(name: str, *overrides: str) -> Run:
        return train_tiny(tiny_teacher, tmp_path / name, *overrides)

    return run


TRAIN_KEYS = ("step", "epoch", "loss", "loss_task", "loss_kd", "lr", "img_per_s", "t_data",
              "t_teacher", "t_student_fwd", "t_backward", "t_optim")
VAL_KEYS = ("student_top1", "student_top5", "teacher_top1", "agreement")


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def losses_decrease(records: list[dict[str, Any]], key: str = "loss",
                    factor: float = 0.9) -> bool:
    """The last logged value is clearly below the first (the run learned)."""
    return records[-1][key] < factor * records[0][key]


def assert_loss_is_weighted_sum(records: list[dict[str, Any]], alpha: float) -> None:
    """loss = (1 - alpha) * loss_task + alpha * loss_kd on every record (1e-5 relative)."""
    for r in records:
        want = (1 - alpha) * r["loss_task"] + alpha * r["loss_kd"]
        assert r["loss"] == pytest.approx(want, rel=1e-5), r


def assert_one_line_user_error(result: subprocess.CompletedProcess, *mentions: str) -> str:
    """Exit code 2 and exactly one stderr line ``kd: error: ...`` naming ``mentions``."""
    err = result.stderr
    assert result.returncode == 2, (result.returncode, result.stdout[-2000:], err[-3000:])
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("kd: error: "), err
    for m in mentions:
        assert m in lines[0], (m, lines[0])
    return lines[0]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Same keys, and every tensor bit-identical (torch.equal)."""
    assert sorted(a) == sorted(b)
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)}/{len(a)} tensors differ, e.g. {differ[:3]}: max abs " \
        f"diff {max((a[k].float() - b[k].float()).abs().max().item() for k in differ):.3g}"


def replayed_batches(teacher: str, tmp_path: Path, *overrides: str
                     ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Epoch 0's student inputs as ``kd cache-teacher`` ran the teacher on them, and as a run
    from that cache (``distill.teacher_cache``) sees them, batch by batch."""
    from kd.core.dist import single_process
    from kd.core.trainer import Trainer
    from kd.tools.cache_builder import CacheBuilder, build_cache

    cfg = tiny_config(teacher, tmp_path / "cfg", *overrides)
    builder = CacheBuilder(cfg, single_process(cfg.train.device), 1, 4, tmp_path / "cache")
    written = [x for _, _, x in builder._batches(0)]
    build_cache(cfg, single_process(cfg.train.device), 1, 4, tmp_path / "cache")
    trainer = Trainer(tiny_config(teacher, tmp_path / "run", *overrides, "train.epochs=1",
                                  f"distill.teacher_cache={tmp_path / 'cache'}"))
    seen: list[torch.Tensor] = []
    prepare = trainer.task.prepare

    def record(images: torch.Tensor) -> tuple:
        out = prepare(images)
        seen.append(out[0].clone())
        return out

    trainer.task.prepare = record  # type: ignore[method-assign]
    trainer.train(evaluate=False, save=False)
    return written, seen

"""Real runs that meet bad numbers and stop signals: skipped steps, divergence, preemption."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kd.core.trainer import Trainer
from kd.errors import DivergedError, Preempted
from tests.conftest import ROOT, TINY
from tests.integration.conftest import (
    ONE_THREAD,
    assert_same_weights,
    read_jsonl,
    tiny_config,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def poison_steps(trainer: Trainer, steps: set[int]) -> None:
    """Make the loss NaN on the given optimizer steps (1-based), as an fp overflow would."""
    loss = trainer.task.loss

    def poisoned(*args, **kwargs):
        terms = loss(*args, **kwargs)
        if trainer.step + 1 in steps:
            terms = {k: v * float("nan") for k, v in terms.items()}
        return terms

    trainer.task.loss = poisoned


def test_non_finite_steps_are_skipped_counted_and_leave_the_weights(tiny_teacher, tmp_path):
    trainer = Trainer(tiny_config(tiny_teacher, tmp_path, "train.log_every=1"))
    poison_steps(trainer, {3, 4})
    snapshots: dict[int, torch.Tensor] = {}
    summary = trainer.train(on_step=lambda t: snapshots.__setitem__(
        t.step, t.student_core.head.weight.detach().clone()))
    assert torch.equal(snapshots[2], snapshots[3]) and torch.equal(snapshots[3], snapshots[4])
    assert not torch.equal(snapshots[4], snapshots[5])
    assert summary["n_skipped_steps"] == 2
    records = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "split" not in r]
    assert [r["n_skipped_steps"] for r in records[:5]] == [0, 0, 1, 2, 2]
    assert records[2]["loss"] is None  # no step of that interval updated the weights
    assert all(r["grad_norm"] > 0 for r in records if r["loss"] is not None)
    assert summary["student_top1"] is not None
    assert all(torch.isfinite(v).all() for v in trainer.student_core.state_dict().values())


def test_consecutive_non_finite_steps_stop_the_run_naming_step_and_terms(tiny_teacher, tmp_path):
    cfg = tiny_config(tiny_teacher, tmp_path, "train.max_skipped_steps=3", "train.log_every=2")
    trainer = Trainer(cfg)
    poison_steps(trainer, set(range(5, 17)))
    with pytest.raises(DivergedError) as err:
        trainer.train()
    # Steps 5-8 skipped; the limit is checked at log step 8.
    assert "4 consecutive" in str(err.value) and "at step 8: loss=nan" in str(err.value)
    assert err.value.exit_code == 4


def test_divergence_from_the_cli_is_one_line_with_exit_code_4(tmp_path):
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "kd.cli", "train", "-c", TINY, "distill.loss=none",
         "teacher.checkpoint=null", f"output_dir={out}", "optim.lr=1e30",
         "train.max_skipped_steps=2"],
        cwd=ROOT, env={**os.environ, **ONE_THREAD}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 4, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("kd: error: ") and "non-finite" in line and "optim.lr" in line


class Killed(Exception):
    pass


def test_sigterm_saves_at_the_step_boundary_and_the_resume_is_exact(tiny_teacher, tmp_path,
                                                                    caplog):
    straight = Trainer(tiny_config(tiny_teacher, tmp_path / "a"))
    straight.train()

    def sigterm_at_5(t: Trainer) -> None:
        if t.step == 5:
            os.kill(os.getpid(), signal.SIGTERM)  # a real signal, to this process

    first = Trainer(tiny_config(tiny_teacher, tmp_path / "b"))
    with pytest.raises(Preempted) as stopped:
        first.train(on_step=sigterm_at_5)
    assert stopped.value.step == 5 and stopped.value.exit_code == 75
    assert "SIGTERM" in str(stopped.value)
    assert (tmp_path / "b" / "checkpoints" / "step_00000005").is_dir()
    assert re.search(r"preemption checkpoint saved in \d+\.\d s", caplog.text)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler removed again
    second = Trainer(tiny_config(tiny_teacher, tmp_path / "b"))
    assert second.step == 5
    second.train()
    assert_same_weights(load_file(str(tmp_path / "a" / "student.safetensors")),
                        load_file(str(tmp_path / "b" / "student.safetensors")))


def wait_for_step(metrics: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before it was signalled"
        if metrics.exists():
            steps = [json.loads(x).get("step", 0) for x in metrics.read_text().splitlines()
                     if x.strip()]
            if steps and max(steps) >= step:
                return
        time.sleep(0.02)
    raise TimeoutError(f"no step {step} in {metrics}")


def test_sigterm_to_kd_train_exits_75_with_one_line(tiny_teacher, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "kd.cli", "train", "-c", TINY, f"teacher.checkpoint={tiny_teacher}",
         f"output_dir={out}", "train.epochs=200", "train.log_every=1"],
        cwd=ROOT, env={**os.environ, **ONE_THREAD}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    wait_for_step(out / "metrics.jsonl", 3, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 75, stderr[-2000:]
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("kd: stopped by SIGTERM at step ") and "run the same command" in last
    step = int(last.split("at step ")[1].split()[0])
    assert (out / "checkpoints" / f"step_{step:08d}").is_dir()
    assert not (out / "summary.json").exists()  # the run is not finished


def test_pruning_keeps_the_newest_checkpoints_plus_the_best(tiny_teacher, tmp_path):
    from kd.core.checkpoint import CheckpointManager, verify

    trainer = Trainer(tiny_config(tiny_teacher, tmp_path, "train.epochs=4",
                                  "checkpoint.keep=1", "checkpoint.every_steps=4"))
    evals = []
    evaluate = trainer.evaluate

    def noisy_evaluate(epoch: int):
        record = evaluate(epoch)
        # Make epoch 2 the best whatever the run learns (later ones are worse).
        record["student_top1"] = {1: 0.5, 2: 0.9}.get(epoch, 0.7)
        evals.append(record)
        return record

    trainer.evaluate = noisy_evaluate
    trainer.train()
    manager = CheckpointManager(tmp_path / "checkpoints", keep=1)
    best = manager.best()
    assert best == {"checkpoint": "step_00000016", "step": 16, "student_top1": 0.9}
    assert [p.name for p in manager.list()] == ["step_00000016", "step_00000032"]
    verify(manager.list()[0])
    # A resumed run knows the best so far: a worse evaluation does not replace it.
    assert Trainer(tiny_config(tiny_teacher, tmp_path, "train.epochs=4"))._best_top1 == 0.9

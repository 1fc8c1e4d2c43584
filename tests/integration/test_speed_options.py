"""Speed options train to the same losses as without them: the teacher held in the training
dtype, the teacher under inference mode, and ``train.compile``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kd.core.trainer import Trainer
from tests.integration.conftest import tiny_config, train_tiny

pytestmark = pytest.mark.usefixtures("one_thread")

STEPWISE = ("train.log_every=1", "checkpoint.every_steps=0")


def losses(run) -> list[float]:
    return [r["loss"] for r in run.train_records]


def teacher_bytes(trainer: Trainer) -> int:
    return sum(p.numel() * p.element_size() for p in trainer.teacher.model.parameters())


def test_bf16_training_holds_the_teacher_in_bf16(tiny_teacher: str, tmp_path: Path) -> None:
    bf16 = ("train.precision=bf16",)
    held = Trainer(tiny_config(tiny_teacher, tmp_path / "a", *bf16))
    full = Trainer(tiny_config(tiny_teacher, tmp_path / "b", *bf16, "teacher.dtype=fp32"))
    assert held.teacher.dtype == torch.bfloat16 and full.teacher.dtype == torch.float32
    assert 2 * teacher_bytes(held) == teacher_bytes(full)
    assert held.teacher.norm.mean.dtype == torch.float32  # inputs are normalised in fp32
    # fp32 training keeps an fp32 teacher.
    assert Trainer(tiny_config(tiny_teacher, tmp_path / "c")).teacher.dtype == torch.float32
    # The same run either way, within bf16 rounding of the teacher's weights.
    a = train_tiny(tiny_teacher, tmp_path / "held", *bf16, *STEPWISE)
    b = train_tiny(tiny_teacher, tmp_path / "full", *bf16, *STEPWISE, "teacher.dtype=fp32")
    assert losses(a) == pytest.approx(losses(b), rel=3e-2)
    assert a.summary["teacher_top1"] == pytest.approx(b.summary["teacher_top1"], abs=2 / 32)


def test_teacher_logits_come_from_inference_mode(tiny_teacher: str, tmp_path: Path) -> None:
    trainer = Trainer(tiny_config(tiny_teacher, tmp_path / "run"))
    images = trainer.train_set[0][0][None].repeat(4, 1, 1, 1)
    x_student, x_teacher = trainer.task.prepare(images)
    logits = trainer.task.teacher_forward(x_teacher)
    assert logits.is_inference() and not logits.requires_grad
    # The losses read inference tensors and still reach the student's weights.
    terms = trainer.task.loss(trainer.task.student_forward(x_student), logits,
                              torch.zeros(4, dtype=torch.long), 0.0)
    terms["loss"].backward()
    assert all(p.grad is not None for p in trainer.student_core.parameters() if p.requires_grad)


@pytest.mark.slow
def test_compiled_models_train_like_eager_ones(tiny_teacher: str, tmp_path: Path) -> None:
    eager = train_tiny(tiny_teacher, tmp_path / "eager", *STEPWISE)
    compiled = train_tiny(tiny_teacher, tmp_path / "compiled", *STEPWISE, "train.compile=true")
    assert losses(compiled) == pytest.approx(losses(eager), rel=1e-4)
    assert compiled.summary["student_top1"] == pytest.approx(eager.summary["student_top1"],
                                                             abs=1 / 32)
    # Compiled in place: the checkpoint's keys are the eager model's.
    assert sorted(compiled.weights) == sorted(eager.weights)

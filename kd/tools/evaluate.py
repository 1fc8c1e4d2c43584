"""``kd eval``: a checkpoint's student on the validation split, next to the teacher.

Builds what evaluation needs and nothing else: the models (the student from the checkpoint, the
teacher from its weights when they are on this machine) and the validation loader; no
optimizer, strategy or loader sweep.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch

from kd.config import KDConfig, teacher_sections
from kd.core import checkpoint as ckpt
from kd.core.dist import DistInfo
from kd.core.evaluation import eval_record, teacher_results, val_counts
from kd.core.models import (
    build_input_norm,
    build_student,
    check_model_input,
    describe_mismatch,
    resolve_path,
)
from kd.core.precision import resolve_precision
from kd.core.task import DistillationTask
from kd.core.teachers import build_teachers, check_teacher_inputs, hold_as_trained
from kd.data.pipeline import Ranks, RunData
from kd.data.tuning import max_workers
from kd.errors import UserError

log = logging.getLogger("kd")


def teacher_weights_here(cfg: KDConfig) -> bool:
    """Whether every teacher can be built on this machine (hub weights, or its checkpoint
    file)."""
    return all(t.pretrained or bool(t.checkpoint and resolve_path(t.checkpoint).is_file())
               for t in teacher_sections(cfg))


def evaluate_checkpoint(cfg: KDConfig, info: DistInfo, checkpoint: Path,
                        ema: bool = False) -> dict[str, Any]:
    """The evaluation record of ``checkpoint``'s student (its EMA with ``ema``; every rank of
    ``info`` takes part).

    The teacher is evaluated too; a run trained from ``distill.teacher_cache`` may have been
    trained where the teacher's weights are not, and then the student is evaluated alone.
    ``data.num_workers: auto`` takes the CPUs this rank may use, without measuring: the
    validation pass decodes without augmenting.
    """
    device = info.device
    precision = resolve_precision(cfg.train.precision, device)
    workers = cfg.data.num_workers
    if workers == "auto":
        workers = max_workers(info.local_world_size)
    data = RunData(dataclasses.replace(cfg.data, num_workers=workers), cfg.student.channels,
                   cfg.seed, Ranks(info.rank, info.world_size, info.local_world_size),
                   pin_memory=device.type == "cuda", grad_accum_steps=cfg.train.grad_accum_steps)
    student_state, state, _ = ckpt.load(checkpoint, ema=ema)
    torch.manual_seed(cfg.seed)
    student = build_student(cfg.student, cfg.data.num_classes)
    mismatch = describe_mismatch(student.state_dict(), student_state)
    if mismatch:
        raise UserError(f"checkpoint {checkpoint} does not fit student.name/student.kwargs: "
                        f"{mismatch}")
    student.load_state_dict(student_state)
    norm = build_input_norm(student, cfg.student.mean, cfg.student.std, "student")
    teachers = None
    if not cfg.distill.teacher_cache or teacher_weights_here(cfg):
        teachers = build_teachers(cfg)
    image = data.val_set[0][0][None]
    check_model_input(student, norm, image, section="student", name=cfg.student.name,
                      image_size=cfg.data.image_size, grey_to_rgb=cfg.data.grey_to_rgb)
    if teachers is not None:
        check_teacher_inputs(cfg, teachers, image)
        hold_as_trained(cfg, teachers, precision)  # as training held them
        teachers = teachers.to(device)
    student = student.to(device)
    settings = cfg.distill if teachers is not None else dataclasses.replace(
        cfg.distill, loss="none", teacher_cache=None, features=[])
    task = DistillationTask(student, norm.to(device), teachers, settings,
                            cached_teacher=teachers is None and settings.loss != "none")
    counts = val_counts(task, data.val_loader(), device, precision, cfg.data.num_classes)
    step = int(state["step"])
    record = eval_record(counts, step, round(step / max(1, data.steps_per_epoch)),
                         task.teacher_predicts)
    # Each teacher by name (one too), and how many images the numbers are over.
    return {**record, "teachers": teacher_results(task, counts), "images": int(counts[0])}

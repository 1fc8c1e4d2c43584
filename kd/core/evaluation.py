"""Evaluation on the validation split: top-1/top-5 of the student, the teacher's top-1 and their
top-1 agreement, summed over ranks. Training evaluates through it, and so does ``kd eval``."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from kd.core.dist import all_reduce_sum
from kd.core.precision import autocast
from kd.core.task import DistillationTask


@torch.no_grad()
def val_counts(task: DistillationTask, loader: Iterable, device: torch.device, precision: str,
               num_classes: int, *, student: bool = True,
               on_bad: Callable[[list[str]], None] | None = None,
               ema: nn.Module | None = None) -> list[float]:
    """One pass over ``loader``, summed over ranks (so every rank gets the same numbers):
    images, student top-1, student top-5, the teachers' (mixture) top-1, agreement, each
    teacher's top-1, then, with ``ema`` (the student's EMA), its top-1 and top-5 (hits, not
    fractions).

    ``student=False`` runs the teachers alone (the student's counts stay 0). ``on_bad`` is told
    of the unreadable samples a batch replaced. The student is in eval mode during the pass and
    back in training mode after it.
    """
    core = task.student_core
    was_training = core.training
    core.eval()
    k = min(5, num_classes)
    n_teachers = len(task.teachers) if task.teachers is not None else 0
    # n, student top1, top5, teachers' top1, agreement, each teacher's top1
    counts = torch.zeros(5 + n_teachers + (2 if ema is not None else 0), device=device)
    try:
        for images, targets, bad in loader:
            if bad and on_bad is not None:
                on_bad(bad)
            images = images.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            with autocast(device, precision):
                s, each = task.predict_all(images, student=student)
                t = task.mix(each)
            counts[0] += targets.numel()
            if s is not None:
                top = s.float().topk(k, dim=-1).indices
                counts[1] += (top[:, 0] == targets).sum()
                counts[2] += (top == targets[:, None]).any(dim=-1).sum()
            if t is not None:
                t1 = t.float().argmax(-1)
                counts[3] += (t1 == targets).sum()
                if s is not None:
                    counts[4] += (t1 == top[:, 0]).sum()
            for i, logits in enumerate(each if n_teachers > 1 else []):
                if logits is not None:
                    counts[5 + i] += (logits.float().argmax(-1) == targets).sum()
            if ema is not None:
                with autocast(device, precision):
                    e = ema(task.student_norm(images))
                top = e.float().topk(k, dim=-1).indices
                counts[5 + n_teachers] += (top[:, 0] == targets).sum()
                counts[6 + n_teachers] += (top == targets[:, None]).any(dim=-1).sum()
    finally:
        core.train(was_training)
    counts = all_reduce_sum(counts).tolist()
    if n_teachers == 1:  # one teacher: its top-1 is the mixture's
        counts[5] = counts[3]
    return counts


def teacher_results(task: DistillationTask, counts: list[float]) -> list[dict[str, Any]]:
    """Each teacher's name and top-1 from :func:`val_counts` (None for a headless one)."""
    if task.teachers is None:
        return []
    n = counts[0]
    return [{"name": name, "top1": None if t.headless else counts[5 + i] / n}
            for i, (name, t) in enumerate(zip(task.teachers.names, task.teachers, strict=True))]


def eval_record(counts: list[float], step: int, epoch: int, has_teacher: bool,
                teachers: list[dict[str, Any]] | None = None, ema: bool = False
                ) -> dict[str, Any]:
    """The ``metrics.jsonl`` record of an evaluation from :func:`val_counts`: the student's
    top-1/top-5, the teachers' (mixture) top-1 and agreement, and, with several teachers,
    ``teachers`` (each one's name and top-1)."""
    n, s1, s5, t1, agree = counts[:5]
    record = {"split": "val", "step": step, "epoch": epoch,
              "student_top1": s1 / n, "student_top5": s5 / n,
              "teacher_top1": t1 / n if has_teacher else None,
              "agreement": agree / n if has_teacher else None}
    if teachers is not None and len(teachers) > 1:
        record["teachers"] = teachers
    if ema:  # counts of the student's EMA follow the teachers'
        n_teachers = len(teachers or [])
        record["student_ema_top1"] = counts[5 + n_teachers] / n
        record["student_ema_top5"] = counts[6 + n_teachers] / n
    return record

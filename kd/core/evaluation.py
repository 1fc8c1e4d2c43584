"""Evaluation on the validation split: top-1/top-5 of the student, the teacher's top-1 and their
top-1 agreement, summed over ranks. Training evaluates through it, and so does ``kd eval``."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from kd.core.dist import all_reduce_sum
from kd.core.precision import autocast
from kd.core.task import DistillationTask


@torch.no_grad()
def val_counts(task: DistillationTask, loader: Iterable, device: torch.device, precision: str,
               num_classes: int, *, student: bool = True,
               on_bad: Callable[[list[str]], None] | None = None) -> list[float]:
    """One pass over ``loader``, summed over ranks (so every rank gets the same numbers):
    images, student top-1, student top-5, teacher top-1, agreement (hits, not fractions).

    ``student=False`` runs the teacher alone (the student's counts stay 0). ``on_bad`` is told
    of the unreadable samples a batch replaced. The student is in eval mode during the pass and
    back in training mode after it.
    """
    core = task.student_core
    was_training = core.training
    core.eval()
    k = min(5, num_classes)
    counts = torch.zeros(5, device=device)  # n, student top1, top5, teacher top1, agreement
    try:
        for images, targets, bad in loader:
            if bad and on_bad is not None:
                on_bad(bad)
            images = images.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            with autocast(device, precision):
                if student:
                    s, t = task.predict(images)
                else:
                    s, t = None, task.predict_teacher(images)
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
    finally:
        core.train(was_training)
    return all_reduce_sum(counts).tolist()


def eval_record(counts: list[float], step: int, epoch: int, has_teacher: bool) -> dict[str, Any]:
    """The ``metrics.jsonl`` record of an evaluation from :func:`val_counts`."""
    n, s1, s5, t1, agree = counts
    return {"split": "val", "step": step, "epoch": epoch,
            "student_top1": s1 / n, "student_top5": s5 / n,
            "teacher_top1": t1 / n if has_teacher else None,
            "agreement": agree / n if has_teacher else None}

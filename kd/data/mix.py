"""Mixup / CutMix on the device, reproducible from (seed, rank, epoch, batch).

timm's :class:`~timm.data.Mixup` draws its parameters from NumPy's global generator; kd seeds
that generator from the run seed, the rank, the epoch and the batch's position in that epoch
before each call (and restores it after), so a batch's mixing is a pure function of where it sits
in the data order: resumed runs, and runs replaying a teacher-output cache
(:mod:`kd.core.teacher_cache`), mix exactly as the original did.

The mixed batch is what both the student and the teacher see, and the targets become soft
(mixed one-hot, with ``train.label_smoothing`` applied by Mixup itself).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from kd.config import DataConfig


def build_mixup(cfg: DataConfig, num_classes: int, label_smoothing: float) -> Any | None:
    """timm ``Mixup`` from the ``data`` section, or None when both alphas are 0."""
    if cfg.mixup <= 0 and cfg.cutmix <= 0:
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                 switch_prob=cfg.mixup_switch_prob, mode=cfg.mixup_mode,
                 label_smoothing=label_smoothing, num_classes=num_classes)


def mix_seed(seed: int, rank: int, epoch: int, batch: int) -> int:
    """The NumPy seed for the mixing parameters of this rank's ``batch``-th (micro-)batch of
    data epoch ``epoch``."""
    return int(np.random.SeedSequence([seed, rank, epoch, batch]).generate_state(1)[0])


def apply_mixup(mixup: Any, images: torch.Tensor, targets: torch.Tensor,
                seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix a raw batch (uint8 → float in [0, 1] first); returns images and soft targets."""
    if images.dtype == torch.uint8:
        images = images.float().div_(255.0)
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        images, soft = mixup(images, targets)
    finally:
        np.random.set_state(state)
    return images, soft

"""From a loader batch to what the task takes: one preparer for training and the teacher cache.

The trainer's data phase and the cache builder (``kd cache-teacher``) must produce the very same
images for a batch, or a cached teacher output would belong to another picture. Both go through
:class:`BatchPreparer`:

1. the batch moves to the device (with ``data.decode: device`` it is decoded and augmented
   there, :class:`~kd.data.tensor_transform.EncodedBatch`);
2. with a transfer set and Mixup/CutMix, unlabelled images (label ``UNLABELLED``) become one
   extra class, ``num_classes``, so that mixing keeps track of how much of each image is
   labelled;
3. Mixup/CutMix, seeded by ``(seed, rank, data epoch, micro-batch in the epoch)``
   (:func:`~kd.data.mix.mix_seed`), so a resumed run, a replayed cache and a live run mix alike;
4. with a transfer set, the task targets and each image's labelled share
   (:func:`~kd.data.transfer.labelled_share`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kd.config import DataConfig
from kd.data.datasets import UNLABELLED
from kd.data.mix import apply_mixup, build_mixup, mix_seed
from kd.data.tensor_transform import EncodedBatch
from kd.data.transfer import labelled_share


@dataclass
class PreparedBatch:
    """A batch on the device, ready for the task."""

    images: torch.Tensor  # (B, C, H, W): uint8 as loaded, or float in [0, 1] once mixed
    targets: torch.Tensor  # class indices, or soft targets once mixed
    share: torch.Tensor | None  # each image's labelled share (transfer sets), else None


class BatchPreparer:
    """Prepares this rank's micro-batches; see the module docstring.

    Args:
        data: the ``data`` config section (``num_classes``, ``transfer_set`` and the Mixup /
            CutMix keys).
        seed: the run's seed.
        rank: this process's rank (each rank mixes its own batches).
        device: where the batch goes.
        label_smoothing: applied by Mixup to its soft targets; with a transfer set the task
            smooths instead (the labelled share must stay exact), so it is ignored there.
    """

    def __init__(self, data: DataConfig, seed: int, rank: int, device: torch.device,
                 label_smoothing: float) -> None:
        self.num_classes, self.seed, self.rank, self.device = data.num_classes, seed, rank, device
        self.transfer = data.transfer_set != "none"
        self.mixup = build_mixup(data, self.num_classes + 1, 0.0) if self.transfer else \
            build_mixup(data, self.num_classes, label_smoothing)

    @property
    def mixes(self) -> bool:
        """Whether batches are mixed (Mixup or CutMix on)."""
        return self.mixup is not None

    @property
    def smooths_targets(self) -> bool:
        """Whether Mixup applies the label smoothing (the task must not apply it again)."""
        return self.mixes and not self.transfer

    def __call__(self, images: torch.Tensor | EncodedBatch, targets: torch.Tensor, data_epoch: int,
                 batch: int) -> PreparedBatch:
        """Prepare micro-batch ``batch`` (counted from 0 in this rank's data epoch
        ``data_epoch``)."""
        if isinstance(images, EncodedBatch):  # data.decode=device
            images = images.decode(self.device)
        else:
            images = images.to(self.device, non_blocking=True)
        targets = targets.to(self.device, non_blocking=True)
        if self.mixup is not None:
            if self.transfer:
                targets = torch.where(targets == UNLABELLED, self.num_classes, targets)
            seed = mix_seed(self.seed, self.rank, data_epoch, batch)
            images, targets = apply_mixup(self.mixup, images, targets, seed)
        share = None
        if self.transfer:
            targets, share = labelled_share(targets, self.num_classes)
        return PreparedBatch(images, targets, share)

"""Transfer sets: unlabelled images the student learns from through the teacher alone.

``data.transfer_set`` adds unlabelled images to the training split:

* ``rest``: the training images whose labels ``data.labels_per_class`` dropped;
* a path: a folder of images with no class structure (every ``.jpg``/``.jpeg``/``.png`` below
  it), or WebDataset shards (a ``.tar`` file, a brace or ``*`` pattern, or a folder of ``.tar``
  files) read without labels.

**Batches and epochs.** The labelled and the unlabelled images form one training split: an
epoch is one pass over both, and each batch is drawn from the shuffled union, so it holds
labelled and unlabelled images in proportion to their numbers (with 50 labelled and 1,150
transfer images, about 4 % of each batch is labelled). Unlabelled samples carry the label -1.

**The loss.** Per sample, a labelled image gets ``(1 - alpha) * task + alpha * kd`` and an
unlabelled one ``kd`` alone; the batch loss is the mean over the batch (see
:meth:`kd.core.task.DistillationTask.loss`). With Mixup/CutMix an image can be part labelled: its
*labelled share* ``m`` (the mixing weight of its labelled source images) weights the task term,
whose target is the labelled part of the mix renormalised, and the kd term is weighted
``alpha * m + (1 - m)``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kd.config import DataConfig
from kd.data.datasets import (
    UNLABELLED,
    KeyedDataset,
    build_image_transform,
    load_image,
    train_transform_kwargs,
)
from kd.data.subset import SubsetDataset, dataset_targets
from kd.data.wds import build_wds_dataset
from kd.errors import ConfigError, DataError

log = logging.getLogger("kd")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")  # timm's image folder reader's extensions


class UnlabelledFolder(KeyedDataset):
    """Every image below ``root`` (any depth, sorted by path), label -1."""

    channels = 3

    def __init__(self, root: str | Path, image_size: int, train: bool,
                 transform_kwargs: dict[str, Any] | None = None, *,
                 on_error: str = "skip") -> None:
        self.root, self.on_error = Path(root), on_error
        self.files = sorted(str(p) for p in self.root.rglob("*")
                            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not self.files:
            raise DataError(f"data.transfer_set: no images ({', '.join(IMAGE_SUFFIXES)}) under "
                            f"{self.root}")
        self.transform = build_image_transform(image_size, train, transform_kwargs)

    def __len__(self) -> int:
        return len(self.files)

    def describe(self, index: int) -> str:
        return self.files[index]

    def targets(self) -> np.ndarray:
        return np.full(len(self), UNLABELLED, dtype=np.int64)

    def get(self, index: int, seed: int | None) -> tuple[torch.Tensor, int]:
        return load_image(self.transform, self.files[index], seed, self.files[index]), UNLABELLED


class WithoutLabels(KeyedDataset):
    """A dataset's samples with their labels dropped (label -1).

    ``on_error``: what an unreadable sample does (None: as ``base`` does).
    """

    def __init__(self, base: KeyedDataset, *, on_error: str | None = None) -> None:
        self.base, self.channels = base, base.channels
        self.on_error = base.on_error if on_error is None else on_error

    def __len__(self) -> int:
        return len(self.base)

    def describe(self, index: int) -> str:
        return self.base.describe(index)

    def targets(self) -> np.ndarray:
        return np.full(len(self), UNLABELLED, dtype=np.int64)

    def get(self, index: int, seed: int | None) -> tuple[torch.Tensor, int]:
        return self.base.get(index, seed)[0], UNLABELLED


class LabelledAndTransfer(KeyedDataset):
    """The labelled split followed by the transfer set: indices ``[0, L)`` then ``[L, L + U)``."""

    def __init__(self, labelled: KeyedDataset, transfer: KeyedDataset) -> None:
        if transfer.channels != labelled.channels:
            raise DataError(f"data.transfer_set has {transfer.channels}-channel images, the "
                            f"training split {labelled.channels}-channel ones")
        self.labelled, self.transfer = labelled, transfer
        self.channels, self.on_error = labelled.channels, labelled.on_error
        self.n_labelled = len(labelled)

    def __len__(self) -> int:
        return self.n_labelled + len(self.transfer)

    def _part(self, index: int) -> tuple[KeyedDataset, int]:
        if index < self.n_labelled:
            return self.labelled, index
        return self.transfer, index - self.n_labelled

    def describe(self, index: int) -> str:
        dataset, i = self._part(index)
        return dataset.describe(i)

    def targets(self) -> np.ndarray:
        return np.concatenate([dataset_targets(self.labelled), dataset_targets(self.transfer)])

    def get(self, index: int, seed: int | None) -> tuple[torch.Tensor, int]:
        dataset, i = self._part(index)
        return dataset.get(i, seed)


def _is_shards(path: str) -> bool:
    p = Path(path)
    if any(c in path for c in "{*?[") or path.endswith(".tar"):
        return True
    return p.is_dir() and any(p.glob("*.tar")) and not any(
        q.suffix.lower() in IMAGE_SUFFIXES for q in p.iterdir())


def build_transfer_set(cfg: DataConfig, labelled: KeyedDataset) -> KeyedDataset:
    """The unlabelled images ``cfg.transfer_set`` names (``cfg``: the ``data`` section)."""
    setting = cfg.transfer_set
    if setting == "rest":
        if not isinstance(labelled, SubsetDataset):
            raise ConfigError("data.transfer_set=rest uses the training images whose labels "
                              "were dropped: set data.labels_per_class too")
        rest = np.setdiff1d(np.arange(len(labelled.base)), labelled.indices)
        # Unreadable labels (wds) do not make a sample unreadable here: it has no label anyway.
        transfer: KeyedDataset = WithoutLabels(SubsetDataset(labelled.base, rest),
                                               on_error=cfg.on_error)
        if len(transfer) == 0:
            raise DataError("data.transfer_set=rest: data.labels_per_class keeps every "
                            "training image, so no image is left for the transfer set")
    elif _is_shards(setting):
        transfer = build_wds_dataset("train", root=None, shards=setting,
                                     image_size=cfg.image_size, train=cfg.augment,
                                     num_classes=cfg.num_classes, labels=False,
                                     transform_kwargs=train_transform_kwargs(cfg),
                                     on_error=cfg.on_error)
    elif Path(setting).is_dir():
        transfer = UnlabelledFolder(setting, cfg.image_size, cfg.augment,
                                    train_transform_kwargs(cfg), on_error=cfg.on_error)
    else:
        raise DataError(f"data.transfer_set: {setting} is neither none, rest, a folder of "
                        f"images nor WebDataset shards")
    log.info("data.transfer_set=%s: %d unlabelled images beside %d labelled ones (an epoch "
             "is one pass over both)", setting, len(transfer), len(labelled))
    return LabelledAndTransfer(labelled, transfer)


def labelled_share(targets: torch.Tensor, num_classes: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Task targets and each sample's labelled share, from a batch's targets.

    ``targets`` are class indices with -1 for unlabelled samples, or, after Mixup/CutMix over
    ``num_classes + 1`` classes (the last one standing for "unlabelled"), soft targets. Returns
    targets the task loss can take (indices clamped to 0, or the labelled part of each mix
    renormalised) and the labelled share in ``[0, 1]`` (its weight). Tensor ops only.
    """
    if targets.dim() == 1:
        share = (targets >= 0).float()
        return targets.clamp(min=0), share
    labelled = targets[:, :num_classes]
    share = labelled.sum(dim=-1)
    return labelled / share.clamp(min=1e-12).unsqueeze(1), share

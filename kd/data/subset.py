"""Few labels: a fixed, stratified, seeded subset of the training split (``data.labels_per_class``).

The subset is a pure function of the split's labels, ``data.labels_per_class`` and
``data.subset_seed``: for every class, that class's images are shuffled by a generator seeded
with ``(subset_seed, class)`` and the first N kept. So it is the same in every run, on every
rank and after a resume, it does not depend on the run's ``seed`` (changing the training seed
keeps the same labelled images, so seeds compare like with like), and asking for more labels
per class keeps the smaller subset's images (nested subsets). The validation split is never
touched. Labels are read from the dataset's index (file lists, label columns, shard indexes):
no image is decoded to choose the subset.
"""

from __future__ import annotations

import hashlib
import json
import logging

import numpy as np
import torch

from kd.config import DataConfig
from kd.data.datasets import KeyedDataset
from kd.errors import ConfigError

log = logging.getLogger("kd")


def dataset_targets(dataset: KeyedDataset) -> np.ndarray:
    """Every training sample's label, without decoding images (-1 or -2: none or unreadable).

    Raises:
        ConfigError: the dataset cannot list its labels (a streamed split).
    """
    targets = getattr(dataset, "targets", None)
    if targets is None:
        raise ConfigError(f"data.labels_per_class needs the training labels up front, which "
                          f"{type(dataset).__name__} cannot list (a streamed split: set "
                          f"data.stream=false)")
    return np.asarray(targets() if callable(targets) else targets, dtype=np.int64)


def select_per_class(targets: np.ndarray, per_class: int, seed: int,
                     num_classes: int) -> np.ndarray:
    """Indices of ``per_class`` samples of each class (all of a smaller class), sorted.

    Example:
        >>> select_per_class(np.array([0, 1, 0, 1, 0, 1]), 2, seed=0, num_classes=2).tolist()
        [0, 1, 2, 5]
    """
    chosen = []
    short = []
    for c in range(num_classes):
        members = np.flatnonzero(targets == c)
        order = np.random.default_rng([seed, c]).permutation(len(members))
        chosen.append(members[order[:per_class]])
        if len(members) < per_class:
            short.append(f"{c} ({len(members)})")
    if short:
        log.warning("data.labels_per_class=%d: %d classes have fewer training images, all of "
                    "theirs are used: %s", per_class, len(short), ", ".join(short[:10]))
    return np.sort(np.concatenate(chosen))


class SubsetDataset(KeyedDataset):
    """The samples ``indices`` of ``base``, renumbered from 0."""

    def __init__(self, base: KeyedDataset, indices: np.ndarray) -> None:
        self.base, self.indices = base, np.asarray(indices, dtype=np.int64)
        self.channels = base.channels
        self.on_error = base.on_error

    def __len__(self) -> int:
        return len(self.indices)

    def describe(self, index: int) -> str:
        return self.base.describe(int(self.indices[index]))

    def get(self, index: int, seed: int | None) -> tuple[torch.Tensor, int]:
        return self.base.get(int(self.indices[index]), seed)

    def targets(self) -> np.ndarray:
        return dataset_targets(self.base)[self.indices]


def fingerprint(indices: np.ndarray) -> str:
    """A short hash of a subset, to compare runs and ranks at a glance in the logs."""
    return hashlib.sha256(np.asarray(indices, dtype=np.int64).tobytes()).hexdigest()[:12]


def labelled_subset(dataset: KeyedDataset, per_class: int, seed: int,
                    num_classes: int) -> SubsetDataset:
    """The training split cut to ``per_class`` labelled images per class (see the module doc)."""
    indices = select_per_class(dataset_targets(dataset), per_class, seed, num_classes)
    subset = SubsetDataset(dataset, indices)
    log.info("data.labels_per_class=%d: %d of %d training images keep their labels "
             "(subset_seed %d, subset %s)", per_class, len(indices), len(dataset), seed,
             fingerprint(indices))
    return subset


def subset_record(subset: SubsetDataset, data_cfg: DataConfig) -> str:
    """``labelled_subset.json``: which training images kept their labels, by name."""
    return json.dumps({
        "labels_per_class": data_cfg.labels_per_class, "subset_seed": data_cfg.subset_seed,
        "fingerprint": fingerprint(subset.indices), "n": len(subset),
        "samples": [subset.describe(i) for i in range(len(subset))],
    }, indent=1) + "\n"

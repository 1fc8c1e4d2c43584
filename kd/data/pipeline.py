"""One rank's data for a run, built once from the ``data`` section: the one data builder that
training, the teacher-cache builder, ``kd compare`` and ``kd tune-loader`` share.

What it decides is decided here only: the training and validation splits, the loader's worker
count (``data.num_workers``, measured on first use when ``auto``), the loaders, and how many
optimizer steps an epoch holds.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from kd.config import DataConfig, to_container
from kd.data.build import build_split
from kd.data.datasets import KeyedDataset, WithIndex, collate, repeated
from kd.data.loaders import build_eval_loader, build_train_loader
from kd.data.sampler import SampleKey
from kd.data.tuning import LoaderFactory, resolve_num_workers, train_loader_factory
from kd.errors import DataError


@dataclass(frozen=True)
class Ranks:
    """Where this process sits in the job: its rank, the number of ranks, and the ranks on its
    node (which share the node's CPUs)."""

    rank: int = 0
    world_size: int = 1
    local_world_size: int = 1


def steps_per_epoch(size: int, batch_size: int, world_size: int, grad_accum_steps: int) -> int:
    """Optimizer steps in one pass over ``size`` training images: every rank reads only full
    batches, and an optimizer step takes ``grad_accum_steps`` of them.

    Example:
        >>> steps_per_epoch(1000, 32, 2, 2)  # 15 batches per rank, 2 per step
        7
    """
    return size // (batch_size * world_size) // grad_accum_steps


class RunData:
    """The datasets and loaders of one rank, from ``data.*`` (see the module docstring).

    Args:
        cfg: the ``data`` section.
        channels: channels of the images the student takes (:attr:`StudentConfig.channels`).
        seed: the run's seed (data order and augmentation).
        ranks: this process's place in the job.
        pin_memory: pin host batches (the device is a GPU).
        grad_accum_steps: micro-batches per optimizer step.

    Example:
        >>> from kd.config import DEMO_PRESET, load_config
        >>> cfg = load_config(DEMO_PRESET)
        >>> data = RunData(cfg.data, cfg.student.channels, cfg.seed)
        >>> data.steps_per_epoch, data.global_batch
        (22, 64)
    """

    def __init__(self, cfg: DataConfig, channels: int, seed: int, ranks: Ranks = Ranks(), *,
                 pin_memory: bool = False, grad_accum_steps: int = 1) -> None:
        self.cfg, self.channels, self.seed, self.ranks = cfg, channels, seed, ranks
        self.pin_memory, self.grad_accum_steps = pin_memory, grad_accum_steps
        # The split (one entry per image) and what the sampler deals: every image
        # data.repeated_aug times per epoch.
        self.train_images = build_split(cfg, "train", channels, seed=seed)
        self.train_set = repeated(self.train_images, cfg.repeated_aug)
        self.global_batch = cfg.batch_size * ranks.world_size * grad_accum_steps
        self.steps_per_epoch = steps_per_epoch(len(self.train_set), cfg.batch_size,
                                               ranks.world_size, grad_accum_steps)

    def check_steps(self) -> None:
        """Stop before training when the split cannot fill one optimizer step."""
        if self.steps_per_epoch == 0:
            repeats = (f" × data.repeated_aug={self.cfg.repeated_aug}"
                       if self.cfg.repeated_aug > 1 else "")
            raise DataError(f"the training split has {len(self.train_images)} images{repeats}, "
                            f"fewer samples than one optimizer step needs ({self.global_batch} "
                            f"= data.batch_size × processes × train.grad_accum_steps); lower "
                            f"data.batch_size")

    @functools.cached_property
    def val_set(self) -> KeyedDataset:
        return build_split(self.cfg, "val", self.channels)

    @functools.cached_property
    def num_workers(self) -> int:
        """Loader workers per rank: ``data.num_workers``, or measured once for ``auto``."""
        cfg = self.cfg
        return resolve_num_workers(
            cfg.num_workers, self.train_set, cfg.batch_size, self.ranks.local_world_size,
            cache_key={"data": to_container(cfg), "channels": self.channels}, seed=self.seed,
            prefetch_factor=cfg.prefetch_factor, pin_memory=self.pin_memory)

    def train_loader(self, *, recorded_seeds: Callable[[int], torch.Tensor] | None = None,
                     stream_slots: int | None = None) -> DataLoader:
        """This rank's training loader (:func:`kd.data.build_train_loader`)."""
        r = self.ranks
        return build_train_loader(self.train_set, self.cfg.batch_size, self.seed, r.rank,
                                  r.world_size, self.num_workers, self.pin_memory,
                                  self.cfg.prefetch_factor, stream_slots=stream_slots,
                                  recorded_seeds=recorded_seeds)

    def loader_factory(self) -> LoaderFactory:
        """``(workers, prefetch_factor) ->`` this rank's training loader, for measuring worker
        counts (``kd tune-loader``)."""
        return train_loader_factory(self.train_set, self.cfg.batch_size, self.seed,
                                    self.pin_memory)

    def val_loader(self) -> DataLoader:
        """This rank's share of the validation split, unaugmented."""
        cfg, r = self.cfg, self.ranks
        return build_eval_loader(self.val_set, cfg.eval_batch_size or cfg.batch_size, r.rank,
                                 r.world_size, self.num_workers, self.pin_memory,
                                 cfg.prefetch_factor)

    def keyed_loader(self, batches: list[list[SampleKey]]) -> DataLoader:
        """A loader over the given batches of (index, seed) keys of :attr:`train_set`; its
        batches carry their samples' indices (slots) as a fourth item (what the teacher-cache
        builder replays)."""
        workers = self.num_workers
        return DataLoader(WithIndex(self.train_set), batch_sampler=batches, collate_fn=collate,
                          num_workers=workers,
                          prefetch_factor=self.cfg.prefetch_factor if workers else None,
                          pin_memory=self.pin_memory)

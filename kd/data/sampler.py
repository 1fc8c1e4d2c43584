"""Deterministic, resumable, rank-aware batch sampling.

Each epoch's order is a permutation drawn from ``(seed, epoch)`` alone, so every rank computes
the same one and takes its own slice; resuming at batch ``k`` of an epoch continues with exactly
the next unseen batch. Every sample also gets an augmentation seed drawn from ``(seed, epoch)``:
the image a sample yields in an epoch is a pure function of its index and that seed, whichever
worker, rank or restart produces it.

**Repeated augmentation** (``data.repeated_aug: N``, DeiT's sampler): the training split is seen
through :class:`kd.data.datasets.Repeated`, whose *slot* ``s`` is copy ``s % N`` of image
``s // N``. An epoch shuffles the images and lays each one's N slots side by side; the ranks
take that order in turn (rank ``r`` every ``world_size``-th slot), so with N or more ranks the
copies of an image go to N different ranks in the same step, each with its own augmentation
seed. An epoch holds every slot, N times as many samples as images (the last partial global
batch dropped as always). With N = 1 the order and seeds are those of a run without it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.utils.data import Sampler

SampleKey = tuple[int, int | None]  # (dataset index, augmentation seed or None for no augmentation)


def epoch_order(seed: int, epoch: int, size: int, repeats: int = 1
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """One epoch's order of the ``size`` samples (slots) and every sample's augmentation seed.

    With ``repeats`` > 1, ``size`` counts slots (images × repeats): the images are shuffled and
    each image's slots follow one another.

    Example:
        >>> order, seeds = epoch_order(0, 0, 9, repeats=3)  # slots of 3 images
        >>> order.tolist(), (order // 3).tolist(), len(set(seeds.tolist()))
        ([6, 7, 8, 0, 1, 2, 3, 4, 5], [2, 2, 2, 0, 0, 0, 1, 1, 1], 9)
    """
    g = epoch_generator(seed, epoch)
    images = size // repeats
    order = torch.randperm(images, generator=g)
    seeds = torch.randint(0, 2**31 - 1, (images * repeats,), generator=g)
    if repeats > 1:
        order = (order[:, None] * repeats + torch.arange(repeats)).reshape(-1)
    return order, seeds


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator behind one epoch's order and augmentation seeds."""
    # Mix seed and epoch so (seed=0, epoch=1) and (seed=1, epoch=0) differ.
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2**63 - 1))


class TrainBatchSampler(Sampler[list[SampleKey]]):
    """Shuffled full batches for one rank, resumable mid-epoch.

    Every rank gets the same number of batches (the permutation is cut to a multiple of
    ``world_size * batch_size``), so collectives stay in lock-step.

    ``size`` counts samples, i.e. slots with ``repeats`` > 1 (repeated augmentation, see the
    module docstring): a key ``(slot, seed)`` then asks :class:`~kd.data.datasets.Repeated` for
    image ``slot // repeats``.

    Example:
        >>> s = TrainBatchSampler(10, batch_size=2, seed=0)
        >>> s.set_epoch(0, start_batch=1)
        >>> len(s), len(list(s))
        (5, 4)
    """

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1,
                 recorded_seeds: Callable[[int], torch.Tensor] | None = None,
                 repeats: int = 1) -> None:
        if size % repeats:
            raise ValueError(f"{size} samples are no whole number of {repeats} repeats")
        self.size, self.batch_size, self.seed, self.repeats = size, batch_size, seed, repeats
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start_batch = 0, 0
        # A teacher-output cache (kd.core.teacher_cache) replays the augmentation seeds it recorded.
        self.recorded_seeds = recorded_seeds

    def __len__(self) -> int:
        """Batches per epoch for this rank (including any skipped by a resume)."""
        return self.size // (self.batch_size * self.world_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch to iterate and the batch to start from."""
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self) -> Iterator[list[SampleKey]]:
        order, aug_seeds = epoch_order(self.seed, self.epoch, self.size, self.repeats)
        if self.recorded_seeds is not None:
            aug_seeds = self.recorded_seeds(self.epoch)
        usable = len(self) * self.batch_size * self.world_size
        mine = order[:usable][self.rank::self.world_size].tolist()
        seeds = aug_seeds.tolist()
        for b in range(self.start_batch, len(self)):
            chunk = mine[b * self.batch_size:(b + 1) * self.batch_size]
            yield [(i, seeds[i]) for i in chunk]


class EvalBatchSampler(Sampler[list[SampleKey]]):
    """Every sample exactly once across ranks, in order, unaugmented (no padding, no drops)."""

    def __init__(self, size: int, batch_size: int, rank: int = 0, world_size: int = 1) -> None:
        self.indices = list(range(rank, size, world_size))
        self.batch_size = batch_size

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)

    def __iter__(self) -> Iterator[list[SampleKey]]:
        for b in range(len(self)):
            yield [(i, None) for i in self.indices[b * self.batch_size:(b + 1) * self.batch_size]]

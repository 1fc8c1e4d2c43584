"""Training and evaluation loaders over keyed datasets: deterministic, resumable, sharded."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch.utils.data import DataLoader, Dataset

from kd.data.datasets import KeyedDataset, Repeated, WithIndex, collate
from kd.data.sampler import EvalBatchSampler, TrainBatchSampler
from kd.data.stream import StreamBatchSampler, WdsStreamDataset

log = logging.getLogger("kd")


def _loader_kwargs(num_workers: int, pin_memory: bool, prefetch_factor: int, seed: int) -> dict:
    # A loader's own generator: without one, every iter(loader) draws its workers' base seed from
    # torch's global generator, and a resumed run (which iterates at other points) would then
    # see other dropout / drop-path masks than an uninterrupted one.
    kwargs: dict = {"num_workers": num_workers, "pin_memory": pin_memory, "collate_fn": collate,
                    "generator": torch.Generator().manual_seed(seed)}
    if num_workers > 0:
        kwargs["prefetch_factor"] = prefetch_factor
    return kwargs


def build_train_loader(dataset: KeyedDataset | Repeated, batch_size: int, seed: int, rank: int,
                       world_size: int, num_workers: int, pin_memory: bool,
                       prefetch_factor: int = 2, stream_slots: int | None = None,
                       recorded_seeds: Callable[[int], torch.Tensor] | None = None
                       ) -> DataLoader:
    """A loader over this rank's shuffled full batches of ``(images, labels, bad)``.

    ``loader.batch_sampler.set_epoch(epoch, start_batch)`` selects the epoch and the batch to
    resume from. Workers persist across epochs (no re-spawn cost per epoch). A streamed dataset
    (:class:`kd.data.stream.WdsStreamDataset`) is read by ``stream_slots`` readers per rank
    (None: one per worker).

    ``recorded_seeds(epoch)`` (a teacher-output cache, :mod:`kd.core.teacher_cache`) replaces
    the epoch's augmentation seeds by the ones the cache recorded, and batches then carry their
    samples' dataset indices as a fourth item. Over :class:`~kd.data.datasets.Repeated`
    (``data.repeated_aug``) an epoch holds every image's copies, side by side in the order.
    """
    sampler: TrainBatchSampler | StreamBatchSampler
    if isinstance(dataset, WdsStreamDataset):
        slots = stream_slots or max(1, num_workers)
        sampler = StreamBatchSampler(len(dataset), batch_size, rank, world_size, slots)
        units = world_size * slots
        if len(dataset.shards) < units:
            log.warning("wds: %d shards for %d readers (%d ranks x %d): every reader reads "
                        "every shard and keeps 1/%d of its samples; use at least %d shards",
                        len(dataset.shards), units, world_size, slots, units, units)
    else:
        repeats = dataset.repeats if isinstance(dataset, Repeated) else 1
        sampler = TrainBatchSampler(len(dataset), batch_size, seed, rank, world_size,
                                    recorded_seeds, repeats)
    source: Dataset = dataset if recorded_seeds is None else WithIndex(dataset)
    return DataLoader(source, batch_sampler=sampler, persistent_workers=num_workers > 0,
                      **_loader_kwargs(num_workers, pin_memory, prefetch_factor, seed))


def build_eval_loader(dataset: KeyedDataset, batch_size: int, rank: int, world_size: int,
                      num_workers: int, pin_memory: bool, prefetch_factor: int = 2) -> DataLoader:
    """A loader that visits each sample once across all ranks, unaugmented."""
    sampler = EvalBatchSampler(len(dataset), batch_size, rank, world_size)
    return DataLoader(dataset, batch_sampler=sampler,
                      **_loader_kwargs(num_workers, pin_memory, prefetch_factor, 0))

"""Data: keyed datasets, deterministic resumable samplers and loaders."""

from __future__ import annotations

from torch.utils.data import DataLoader

from kd.data.datasets import KeyedDataset, build_dataset
from kd.data.sampler import EvalBatchSampler, TrainBatchSampler


def build_train_loader(dataset: KeyedDataset, batch_size: int, seed: int, rank: int,
                       world_size: int, num_workers: int, pin_memory: bool) -> DataLoader:
    """A loader over this rank's shuffled full batches; ``loader.batch_sampler.set_epoch`` selects
    the epoch and the batch to resume from."""
    sampler = TrainBatchSampler(len(dataset), batch_size, seed, rank, world_size)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                      pin_memory=pin_memory, persistent_workers=num_workers > 0)


def build_eval_loader(dataset: KeyedDataset, batch_size: int, rank: int, world_size: int,
                      num_workers: int, pin_memory: bool) -> DataLoader:
    """A loader that visits each sample once across all ranks, unaugmented."""
    sampler = EvalBatchSampler(len(dataset), batch_size, rank, world_size)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                      pin_memory=pin_memory)


__all__ = [
    "EvalBatchSampler",
    "KeyedDataset",
    "TrainBatchSampler",
    "build_dataset",
    "build_eval_loader",
    "build_train_loader",
]

"""Data: keyed datasets, deterministic resumable samplers and loaders, the batch preparer.

The names most callers need, re-exported from the modules that own them.
"""

from kd.data.build import build_dataset, build_split
from kd.data.datasets import KeyedDataset, collate
from kd.data.loaders import build_eval_loader, build_train_loader
from kd.data.sampler import EvalBatchSampler, TrainBatchSampler

__all__ = [
    "EvalBatchSampler",
    "KeyedDataset",
    "TrainBatchSampler",
    "build_dataset",
    "build_eval_loader",
    "build_split",
    "build_train_loader",
    "collate",
]

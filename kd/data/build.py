"""Building a dataset split by name, as the ``data`` config section describes it.

The one place that knows every dataset kind: :func:`build_dataset` for one split of a named
dataset, :func:`build_split` for a split as training reads it (streamed, a labelled subset, a
transfer set).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kd.config import DataConfig
from kd.data.datasets import (
    DigitsDataset,
    ImageFolderDataset,
    KeyedDataset,
    SyntheticDataset,
    train_transform_kwargs,
)
from kd.data.hf import HFDiskDataset
from kd.data.stream import build_stream_dataset
from kd.data.subset import labelled_subset
from kd.data.transfer import build_transfer_set
from kd.data.wds import build_wds_dataset
from kd.errors import DataError


def source_kwargs(cfg: DataConfig) -> dict[str, Any]:
    """:func:`build_dataset` arguments locating wds shards and hf columns, from ``data``."""
    return {"train_shards": cfg.train_shards, "val_shards": cfg.val_shards,
            "hf_image_key": cfg.hf_image_key, "hf_label_key": cfg.hf_label_key}


def build_dataset(name: str, split: str, *, root: str | None, image_size: int, num_classes: int,
                  augment: bool, channels: int, synthetic_size: int, on_error: str = "skip",
                  transform_kwargs: dict[str, Any] | None = None,
                  train_shards: str | None = None, val_shards: str | None = None,
                  hf_image_key: str = "image", hf_label_key: str = "label") -> KeyedDataset:
    """Build one split (``train`` or ``val``) of a dataset by name.

    ``train_shards``/``val_shards`` are wds shard patterns (None: shards found in ``root``);
    ``hf_image_key``/``hf_label_key`` name the hf dataset's columns (see :func:`source_kwargs`).
    """
    source = {"shards": train_shards if split == "train" else val_shards,
              "image_key": hf_image_key, "label_key": hf_label_key}
    return _build(name, split, root=root, image_size=image_size, num_classes=num_classes,
                  augment=augment, channels=channels, synthetic_size=synthetic_size,
                  on_error=on_error, transform_kwargs=transform_kwargs, source=source)


def _build(name: str, split: str, *, root: str | None, image_size: int, num_classes: int,
           augment: bool, channels: int, synthetic_size: int, on_error: str,
           transform_kwargs: dict[str, Any] | None, source: dict[str, Any]) -> KeyedDataset:
    if name == "digits":
        if num_classes != DigitsDataset.num_classes:
            raise DataError(f"data.num_classes={num_classes} but digits has 10 classes; "
                            f"set data.num_classes=10")
        return DigitsDataset(split, image_size, augment and split == "train", on_error=on_error)
    if name == "synthetic":
        size = synthetic_size if split == "train" else max(synthetic_size // 4, num_classes)
        return SyntheticDataset(size, num_classes, image_size, channels,
                                offset=0 if split == "train" else 10_000_019, on_error=on_error)
    if name == "imagefolder":
        if root is None or not Path(root).is_dir():
            raise DataError(f"data.root: folder not found: {root} (point it at a folder with "
                            f"train/ and val/ class sub-folders)")
        return ImageFolderDataset(root, split, image_size, augment, num_classes,
                                  transform_kwargs, on_error=on_error)
    train = augment and split == "train"
    if name == "wds":
        return build_wds_dataset(split, root=root, shards=source["shards"], image_size=image_size,
                                 train=train, num_classes=num_classes,
                                 transform_kwargs=transform_kwargs, on_error=on_error)
    if name == "hf":
        if root is None or not Path(root).is_dir():
            raise DataError(f"data.root: folder not found: {root} (point it at a dataset "
                            f"saved with save_to_disk)")
        return HFDiskDataset(root, split, image_size=image_size, train=train,
                             num_classes=num_classes, image_key=source["image_key"],
                             label_key=source["label_key"], transform_kwargs=transform_kwargs,
                             on_error=on_error)
    raise DataError(f"data.name: unknown dataset '{name}'")


def build_split(cfg: DataConfig, split: str, channels: int, seed: int = 0) -> KeyedDataset:
    """One split of the dataset the ``data`` config section describes, as training uses it.

    ``seed`` (the run's) orders a streamed training split (``data.stream``, see
    :mod:`kd.data.stream`); an indexed split's order is the sampler's business.
    """
    if cfg.stream and split == "train":
        return build_stream_dataset(
            root=cfg.root, shards=cfg.train_shards, image_size=cfg.image_size,
            train=cfg.augment, num_classes=cfg.num_classes, seed=seed,
            buffer_size=cfg.shuffle_buffer, num_samples=cfg.train_samples,
            transform_kwargs=train_transform_kwargs(cfg), on_error=cfg.on_error)
    dataset = build_dataset(cfg.name, split, root=cfg.root, image_size=cfg.image_size,
                            num_classes=cfg.num_classes, augment=cfg.augment, channels=channels,
                            synthetic_size=cfg.synthetic_size, on_error=cfg.on_error,
                            transform_kwargs=train_transform_kwargs(cfg), **source_kwargs(cfg))
    if split == "train" and cfg.labels_per_class:
        dataset = labelled_subset(dataset, cfg.labels_per_class, cfg.subset_seed,
                                  cfg.num_classes)
    if split == "train" and cfg.transfer_set != "none":
        dataset = build_transfer_set(cfg, dataset)
    return dataset

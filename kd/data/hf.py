"""A Hugging Face ``datasets`` dataset saved on local disk (``data.name=hf``).

``data.root`` is the folder written by ``DatasetDict.save_to_disk`` (``dataset_dict.json`` plus
one folder per split), or any folder with one ``Dataset.save_to_disk`` folder per split. The
``train`` split is read from ``<root>/train``, the ``val`` split from ``<root>/validation`` or
``<root>/val``. Images come from the column ``data.hf_image_key`` (an ``Image`` feature) and
labels from ``data.hf_label_key`` (a ``ClassLabel`` or an integer column). Nothing is
downloaded: ``load_from_disk`` memory-maps the Arrow files, and sample ``i`` is read with
``dataset[i]`` — random access, so kd's sampler gives exact resume and seeded augmentation as
for every other dataset.

Needs the optional extra: ``pip install -e ".[hf]"``.

Unreadable data: an image that does not decode, or a missing label (null, or -1, the
``ClassLabel`` convention for "no label") in a labelled split, makes that sample unreadable
(skipped and counted, or a failure with ``data.on_error=fail``). A missing split or column, or
labels outside ``[0, data.num_classes)``, is a :class:`~kd.errors.DataError` at start-up.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from kd.data.datasets import (
    KeyedDataset,
    build_image_transform,
    label_out_of_range,
    load_image,
)
from kd.errors import DataError

SPLIT_FOLDERS = {"train": ("train",), "val": ("validation", "val")}
INSTALL_HINT = 'pip install -e ".[hf]"'


def _import_datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise DataError(f"data.name=hf needs the Hugging Face datasets package: "
                        f"{INSTALL_HINT}") from None
    return datasets


class HFDiskDataset(KeyedDataset):
    """One split of a ``save_to_disk`` dataset, transformed by timm like the image folders.

    Args:
        root: the saved dataset's folder (see the module docstring for the layout).
        split: ``train`` or ``val``.
        image_size: side of the output image.
        train: apply the training transform (with ``transform_kwargs``).
        num_classes: labels must lie in ``[0, num_classes)``.
        image_key: the image column.
        label_key: the label column.
        labels: False for an unlabelled dataset: no label column needed, every label is -1.
        transform_kwargs: timm ``create_transform`` arguments for training.
        on_error: what an unreadable sample does, ``skip`` or ``fail`` (see
            :class:`~kd.data.datasets.KeyedDataset`).

    Example:
        >>> ds = HFDiskDataset("/data/beans", "train", image_size=224, train=True,
        ...                    num_classes=3)  # doctest: +SKIP
        >>> image, label, bad = ds[(0, 1234)]  # doctest: +SKIP
    """

    channels = 3

    def __init__(self, root: str, split: str, *, image_size: int, train: bool, num_classes: int,
                 image_key: str = "image", label_key: str = "label", labels: bool = True,
                 transform_kwargs: dict[str, Any] | None = None,
                 on_error: str = "skip") -> None:
        datasets = _import_datasets()
        candidates = SPLIT_FOLDERS.get(split, (split,))
        folder = next((Path(root) / c for c in candidates if (Path(root) / c).is_dir()), None)
        if folder is None:
            raise DataError(f"data.root: no {' or '.join(candidates)} split in {root} (hf expects "
                            f"a folder written by DatasetDict.save_to_disk with train and "
                            f"validation splits)")
        try:
            data = datasets.load_from_disk(str(folder))
        except Exception as e:  # datasets raises FileNotFoundError, ValueError, arrow errors...
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DataError(f"data.root: cannot load {folder} with datasets.load_from_disk: "
                            f"{msg}") from None
        if not isinstance(data, datasets.Dataset):
            raise DataError(f"data.root: {folder} holds a {type(data).__name__}, not one split")
        self.folder, self.image_key, self.label_key = str(folder), image_key, label_key
        self.labelled = labels
        self.on_error = on_error
        columns = [image_key, label_key] if labels else [image_key]
        for key, column in zip(("data.hf_image_key", "data.hf_label_key"), columns):
            if column not in data.column_names:
                raise DataError(f"{key}: no column '{column}' in {folder} (columns: "
                                f"{', '.join(data.column_names)})")
        feature = data.features[image_key]
        if not isinstance(feature, datasets.Image):
            raise DataError(f"data.hf_image_key: column '{image_key}' in {folder} is "
                            f"{feature}, not an Image feature")
        # Keep only the columns kd reads, and decode images here rather than inside `datasets`,
        # so a corrupt image fails in `get` like a corrupt file of any other dataset.
        self.data = data.select_columns(columns).cast_column(image_key,
                                                             datasets.Image(decode=False))
        if labels:
            self._check_labels(num_classes, folder)
        self.transform = build_image_transform(image_size, train, transform_kwargs)

    def _check_labels(self, num_classes: int, folder: Path) -> None:
        import pyarrow as pa
        import pyarrow.compute as pc

        feature = self.data.features[self.label_key]
        names = getattr(feature, "names", None)
        if names is not None and len(names) != num_classes:
            raise DataError(f"data.num_classes={num_classes} but column '{self.label_key}' in "
                            f"{folder} is a ClassLabel with {len(names)} classes; set "
                            f"data.num_classes={len(names)}")
        column = self.data.data.column(self.label_key)
        if not pa.types.is_integer(column.type):
            raise DataError(f"data.hf_label_key: column '{self.label_key}' in {folder} holds "
                            f"{column.type}, not integer class indices")
        top = pc.max(column).as_py()
        if top is not None and top >= num_classes:
            raise label_out_of_range(num_classes, f"column '{self.label_key}' in {folder}", top)

    def __len__(self) -> int:
        return len(self.data)

    def describe(self, index: int) -> str:
        return f"{self.folder}[{index}]"

    def targets(self) -> list[int]:
        if not self.labelled:
            return [-1] * len(self)
        return [-1 if t is None else int(t) for t in self.data.data.column(self.label_key)
                .to_pylist()]

    def get(self, index: int, seed: int | None) -> tuple[torch.Tensor, int]:
        row = self.data[index]
        label = row[self.label_key] if self.labelled else -1
        if self.labelled and (label is None or label < 0):
            raise ValueError(f"no label ({self.label_key}={label})")
        image = row[self.image_key]
        if image is None:
            raise ValueError(f"no image ({self.image_key} is null)")
        source = image["bytes"] if image["bytes"] is not None else image["path"]
        return load_image(self.transform, source, seed, self.describe(index)), int(label)

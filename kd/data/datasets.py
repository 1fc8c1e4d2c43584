"""Datasets keyed by ``(index, augmentation seed)``.

Every dataset returns ``(image, label)`` where ``image`` is a ``uint8`` or ``[0, 1]`` float tensor
of shape (C, H, W), *not normalised*: the student and the teacher each normalise on the device
with their own mean and std (see :mod:`kd.models`). With a seed, the augmentation is a pure
function of it; with ``None`` the sample is returned unaugmented (evaluation).
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from kd.data.sampler import SampleKey
from kd.errors import DataError


class KeyedDataset(Dataset):
    """Base class: ``dataset[(index, seed)]`` → ``(image, label)``."""

    channels: int

    def get(self, index: int, seed: int | None) -> tuple[torch.Tensor, int]:
        raise NotImplementedError

    def __getitem__(self, key: SampleKey | int) -> tuple[torch.Tensor, int]:
        index, seed = (key, None) if isinstance(key, int) else key
        return self.get(index, seed)


def random_affine(image: torch.Tensor, g: torch.Generator, shift: float, degrees: float,
                  scale: float) -> torch.Tensor:
    """A random affine warp of one (C, H, W) float image; ``shift`` is a fraction of the side."""
    u = torch.rand(4, generator=g) * 2 - 1  # four uniform draws in [-1, 1]
    angle = math.radians(float(u[0]) * degrees)
    s = 1.0 + float(u[1]) * scale
    tx, ty = float(u[2]) * shift * 2, float(u[3]) * shift * 2  # grid coordinates span 2
    cos, sin = math.cos(angle) / s, math.sin(angle) / s
    theta = torch.tensor([[cos, -sin, tx], [sin, cos, ty]], dtype=image.dtype)
    grid = F.affine_grid(theta[None], [1, *image.shape], align_corners=False)
    return F.grid_sample(image[None], grid, mode="bilinear", padding_mode="zeros",
                         align_corners=False)[0]


class DigitsDataset(KeyedDataset):
    """scikit-learn's 1,797 handwritten 8×8 digits, resampled to ``image_size``, one channel.

    A fixed stratified split (seed 0, independent of the run's seed): 1,200 train, 597 val.
    Training augmentation is a mild random affine (shift ±0.5 source pixel, rotation ±5°,
    scale ±5 %): strong augmentation under-fits these tiny models in short budgets.
    """

    channels = 1
    num_classes = 10
    n_val = 597

    def __init__(self, split: str, image_size: int, augment: bool) -> None:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
        y = torch.tensor(digits.target, dtype=torch.int64)
        train_idx, val_idx = train_test_split(
            range(len(y)), test_size=self.n_val, stratify=digits.target, random_state=0)
        idx = torch.tensor(train_idx if split == "train" else val_idx)
        self.images = F.interpolate(x[idx], size=(image_size, image_size), mode="bilinear",
                                    align_corners=False).clamp_(0, 1)
        self.labels = y[idx]
        self.augment = augment

    def __len__(self) -> int:
        return len(self.labels)

    def get(self, index: int, seed: int | None) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        if self.augment and seed is not None:
            g = torch.Generator().manual_seed(seed)
            image = random_affine(image, g, shift=0.5 / 8, degrees=5.0, scale=0.05).clamp_(0, 1)
        return image, int(self.labels[index])


class SyntheticDataset(KeyedDataset):
    """Learnable random images for tests and benchmarks: a fixed pattern per class plus noise.

    Image ``i`` has label ``i % num_classes``; its noise depends on ``i`` (and on the augmentation
    seed when training), so nothing is stored.
    """

    def __init__(self, size: int, num_classes: int, image_size: int, channels: int,
                 offset: int = 0) -> None:
        self.size, self.num_classes = size, num_classes
        self.channels, self.offset = channels, offset
        g = torch.Generator().manual_seed(1234)
        self.patterns = torch.rand(num_classes, channels, image_size, image_size, generator=g)

    def __len__(self) -> int:
        return self.size

    def get(self, index: int, seed: int | None) -> tuple[torch.Tensor, int]:
        label = index % self.num_classes
        g = torch.Generator().manual_seed(index + self.offset if seed is None else seed)
        noise = torch.rand(self.patterns.shape[1:], generator=g)
        return (0.3 * self.patterns[label] + 0.7 * noise), label


class ImageFolderDataset(KeyedDataset):
    """Class sub-folders of images, read and transformed by timm's data stack.

    The transform runs with Python's and torch's generators seeded from the sample's seed (and
    restored after), so a sample's augmentation is reproducible anywhere.
    """

    channels = 3

    def __init__(self, root: str, split: str, image_size: int, augment: bool,
                 num_classes: int) -> None:
        from timm.data import ImageDataset, create_transform

        folder = Path(root) / split
        if not folder.is_dir():
            raise DataError(f"data.root: no '{split}' folder in {root} (imagefolder expects "
                            f"{root}/train/<class>/*.jpg and {root}/val/<class>/*.jpg)")
        # use_prefetcher=True: the transform ends in uint8 (C, H, W); normalising happens on the
        # device, separately for student and teacher.
        transform = create_transform(image_size, is_training=augment and split == "train",
                                     use_prefetcher=True)
        try:
            self.dataset = ImageDataset(str(folder), transform=transform)
        except Exception as e:  # timm raises a bare RuntimeError for an empty folder
            raise DataError(f"data.root: cannot read images in {folder}: {e}") from None
        classes = getattr(self.dataset.reader, "class_to_idx", {})
        if len(self.dataset) == 0:
            raise DataError(f"data.root: no images found under {folder}")
        if len(classes) != num_classes:
            raise DataError(f"data.num_classes={num_classes} but {folder} has {len(classes)} "
                            f"class folders; set data.num_classes={len(classes)}")
        self.classes = sorted(classes, key=classes.get)

    def __len__(self) -> int:
        return len(self.dataset)

    def get(self, index: int, seed: int | None) -> tuple[torch.Tensor, int]:
        if seed is None:
            image, label = self.dataset[index]
        else:
            state = random.getstate(), torch.get_rng_state()
            random.seed(seed)
            torch.manual_seed(seed)
            try:
                image, label = self.dataset[index]
            finally:
                random.setstate(state[0])
                torch.set_rng_state(state[1])
        return torch.as_tensor(image), int(label)


def build_dataset(name: str, split: str, *, root: str | None, image_size: int, num_classes: int,
                  augment: bool, channels: int, synthetic_size: int) -> KeyedDataset:
    """Build one split (``train`` or ``val``) of a dataset by name."""
    if name == "digits":
        if num_classes != DigitsDataset.num_classes:
            raise DataError(f"data.num_classes={num_classes} but digits has 10 classes; "
                            f"set data.num_classes=10")
        return DigitsDataset(split, image_size, augment and split == "train")
    if name == "synthetic":
        size = synthetic_size if split == "train" else max(synthetic_size // 4, num_classes)
        return SyntheticDataset(size, num_classes, image_size, channels,
                                offset=0 if split == "train" else 10_000_019)
    if name == "imagefolder":
        if root is None or not Path(root).is_dir():
            raise DataError(f"data.root: folder not found: {root} (point it at a folder with "
                            f"train/ and val/ class sub-folders)")
        return ImageFolderDataset(root, split, image_size, augment, num_classes)
    raise DataError(f"data.name: unknown dataset '{name}'")


def dataset_info(ds: Any) -> dict[str, Any]:
    """A short description for logs."""
    return {"type": type(ds).__name__, "size": len(ds), "channels": ds.channels}

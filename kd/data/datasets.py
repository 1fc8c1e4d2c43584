"""Datasets keyed by ``(index, augmentation seed)``.

Every dataset returns ``(image, label)`` where ``image`` is a ``uint8`` or ``[0, 1]`` float tensor
of shape (C, H, W), *not normalised*: the student and the teacher each normalise on the device
with their own mean and std (see :mod:`kd.core.models`). With a seed, the augmentation is a pure
function of it; with ``None`` the sample is returned unaugmented (evaluation).
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from kd.config import DataConfig
from kd.data.augment import PixelErasing, fix_posterize, run_steps, seeded, transform_steps
from kd.data.sampler import SampleKey
from kd.data.tensor_transform import (
    EncodedBatch,
    EncodedImage,
    TensorTrainTransform,
    tensor_transform,
    unsupported_steps,
)
from kd.errors import ConfigError, DataError

log = logging.getLogger("kd")

# Errors that mean "this sample's file is unreadable" (PIL raises OSError subclasses for
# truncated and unidentified images, tarfile ReadError is an OSError too).
SAMPLE_ERRORS = (OSError, ValueError, SyntaxError)
MAX_REPLACEMENTS = 50
# The label of an image without one (a transfer set, shards read without labels).
UNLABELLED = -1


class KeyedDataset(Dataset):
    """Base class: ``dataset[(index, seed)]`` → ``(image, label, bad)``.

    Subclasses implement :meth:`get` (and :meth:`describe` for file-backed samples). An
    unreadable sample is replaced by the next readable one of the split (``on_error="skip"``)
    and reported in ``bad`` (descriptions of the samples skipped), or stops the run with the
    file's name (``on_error="fail"``). Each subclass takes ``on_error`` in its constructor.
    """

    channels: int
    on_error: str

    def get(self, index: int, seed: int | None) -> tuple[torch.Tensor, int]:
        raise NotImplementedError

    def describe(self, index: int) -> str:
        """A human-readable name of sample ``index`` (its file, where there is one)."""
        return f"{type(self).__name__}[{index}]"

    def __getitem__(self, key: SampleKey | int) -> tuple[torch.Tensor, int, list[str]]:
        index, seed = (key, None) if isinstance(key, int) else key
        bad: list[str] = []
        for attempt in range(MAX_REPLACEMENTS):
            i = (index + attempt) % len(self)
            try:
                image, label = self.get(i, seed)
                return image, label, bad
            except SAMPLE_ERRORS as e:
                if self.on_error == "fail":
                    raise DataError(f"cannot read {self.describe(i)}: {e} (data.on_error=fail; "
                                    f"set data.on_error=skip to skip unreadable samples)") from None
                bad.append(f"{self.describe(i)}: {e}")
        raise DataError(f"{MAX_REPLACEMENTS} consecutive unreadable samples from "
                        f"{self.describe(index)}: is data.root the dataset you meant?")


def label_out_of_range(num_classes: int, where: str, label: int) -> DataError:
    """The error for a label the configured number of classes cannot hold."""
    return DataError(f"data.num_classes={num_classes} but {where} has label {label}; set "
                     f"data.num_classes to at least {label + 1}")


class WithIndex(Dataset):
    """``dataset[key]`` followed by the dataset index the key asked for (a teacher-output cache
    looks its rows up by it; a replaced unreadable sample keeps the index asked for, as it did
    when the cache was written). Over :class:`Repeated` the index is the slot."""

    def __init__(self, dataset: KeyedDataset | Repeated) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: SampleKey) -> tuple[torch.Tensor, int, list[str], int]:
        return (*self.dataset[key], key[0])


class Repeated(Dataset):
    """Repeated augmentation (``data.repeated_aug``): each image of ``images`` as ``repeats``
    samples of an epoch. Sample (slot) ``s`` is image ``s // repeats``, augmented with the seed
    the sampler drew for that slot (see :mod:`kd.data.sampler`); a teacher-output cache keys
    its rows by slot, so every copy keeps its own teacher output."""

    def __init__(self, images: KeyedDataset, repeats: int) -> None:
        self.images, self.repeats = images, repeats
        self.channels, self.on_error = images.channels, images.on_error

    def __len__(self) -> int:
        return len(self.images) * self.repeats

    def __getitem__(self, key: SampleKey | int) -> tuple[torch.Tensor, int, list[str]]:
        slot, seed = (key, None) if isinstance(key, int) else key
        return self.images[(slot // self.repeats, seed)]

    def describe(self, slot: int) -> str:
        return (f"{self.images.describe(slot // self.repeats)} (copy "
                f"{slot % self.repeats + 1} of {self.repeats})")


def repeated(images: KeyedDataset, repeats: int) -> KeyedDataset | Repeated:
    """``images`` seen ``repeats`` times per epoch (themselves when ``repeats`` is 1)."""
    return images if repeats == 1 else Repeated(images, repeats)


def collate(samples: list[tuple]) -> tuple:
    """Stack a batch; keep the descriptions of the samples skipped while reading it.

    ``(image, label, bad)`` samples give ``(images, labels, bad)``; :class:`WithIndex` samples
    add their dataset indices as a fourth item.
    """
    if isinstance(samples[0][0], EncodedImage):  # data.decode=device: decoded on the device
        images: torch.Tensor | EncodedBatch = EncodedBatch([s[0] for s in samples])
    else:
        images = torch.stack([s[0] for s in samples])
    labels = torch.tensor([s[1] for s in samples], dtype=torch.int64)
    bad = [b for s in samples for b in s[2]]
    if len(samples[0]) == 4:
        return images, labels, bad, torch.tensor([s[3] for s in samples], dtype=torch.int64)
    return images, labels, bad


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

    def __init__(self, split: str, image_size: int, augment: bool, *,
                 on_error: str = "skip") -> None:
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
        self.on_error = on_error

    def __len__(self) -> int:
        return len(self.labels)

    def targets(self) -> Any:
        return self.labels.numpy()

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
                 offset: int = 0, *, on_error: str = "skip") -> None:
        self.size, self.num_classes = size, num_classes
        self.channels, self.offset = channels, offset
        self.on_error = on_error
        g = torch.Generator().manual_seed(1234)
        self.patterns = torch.rand(num_classes, channels, image_size, image_size, generator=g)

    def __len__(self) -> int:
        return self.size

    def targets(self) -> Any:
        return torch.arange(self.size).remainder(self.num_classes).numpy()

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
                 num_classes: int, transform_kwargs: dict[str, Any] | None = None, *,
                 on_error: str = "skip") -> None:
        from timm.data import ImageDataset

        folder = Path(root) / split
        if not folder.is_dir():
            raise DataError(f"data.root: no '{split}' folder in {root} (imagefolder expects "
                            f"{root}/train/<class>/*.jpg and {root}/val/<class>/*.jpg)")
        transform = build_image_transform(image_size, augment and split == "train",
                                          transform_kwargs)
        try:
            # Only timm's reader (file listing, class map) is used: ImageDataset itself would
            # skip unreadable files silently, and kd counts them.
            self.reader = ImageDataset(str(folder)).reader
        except Exception as e:  # timm raises a bare RuntimeError for an empty folder
            raise DataError(f"data.root: cannot read images in {folder}: {e}") from None
        self.transform = transform
        self.on_error = on_error
        classes = getattr(self.reader, "class_to_idx", {})
        if len(self.reader) == 0:
            raise DataError(f"data.root: no images found under {folder}")
        if len(classes) != num_classes:
            raise DataError(f"data.num_classes={num_classes} but {folder} has {len(classes)} "
                            f"class folders; set data.num_classes={len(classes)}")
        self.classes = sorted(classes, key=classes.get)

    def __len__(self) -> int:
        return len(self.reader)

    def describe(self, index: int) -> str:
        return str(self.reader.filename(index, absolute=True))

    def targets(self) -> list[int]:
        return [int(target) for _, target in self.reader.samples]

    def get(self, index: int, seed: int | None) -> tuple[torch.Tensor, int]:
        source, label = self.reader[index][:2]
        return load_image(self.transform, source, seed, self.describe(index)), int(label)


def decode_rgb(source: str | Path | bytes | BinaryIO) -> Any:
    """Decode an image (a path, a file, or its bytes) to an RGB PIL image.

    Decodes now, so truncated or corrupt data fails here with an OSError (an unreadable sample),
    and with a message that does not depend on where the bytes were held.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            return img.convert("RGB")
    except UnidentifiedImageError:
        raise OSError("not an image file PIL can decode") from None


def build_image_transform(image_size: int, train: bool,
                          transform_kwargs: dict[str, Any] | None = None) -> Callable[[Any], Any]:
    """timm's transform for one split of an image dataset, ending in a uint8 (C, H, W) tensor.

    ``use_prefetcher=True``: normalising happens on the device, separately for student and
    teacher. ``transform_kwargs`` (see :func:`train_transform_kwargs`) apply to training only;
    their posterize ops and random erasing are kd's (see :mod:`kd.data.augment`). With
    ``pipeline: kd`` among them, training gets the transform's tensor form
    (:class:`kd.data.tensor_transform.TensorTrainTransform`) where it has one.
    """
    from timm.data import create_transform

    kwargs = dict(transform_kwargs or {}) if train else {}
    pipeline = kwargs.pop("pipeline", "timm")
    decode = kwargs.pop("decode", "cpu")
    transform = create_transform(image_size, is_training=train, use_prefetcher=True, **kwargs)
    fix_posterize(transform)
    if kwargs.get("re_prob", 0) > 0:  # timm leaves erasing to its prefetcher: kd does it here
        transform.transforms.append(PixelErasing(kwargs["re_prob"]))
    if pipeline == "kd" and train:
        fast = tensor_transform(transform)
        if fast is not None:
            fast.decode = decode
            return fast
        if decode == "device":
            raise ConfigError(f"data.decode=device: the training transform has a step kd has "
                              f"no tensor form of ({unsupported_steps(transform)}); set "
                              f"data.decode=cpu")
        log.info("data.pipeline=kd: the training transform's %s has no tensor form; using "
                 "timm's transform", unsupported_steps(transform))
    return transform


def transform_image(transform: Callable[[Any], Any], img: Any, seed: int | None,
                    where: str) -> torch.Tensor:
    """Apply ``transform`` to a decoded PIL image of sample ``where``; with a seed, as a pure
    function of it.

    timm's transforms draw from the global generators of Python, NumPy and torch: all three are
    seeded from ``seed`` for the call and restored after (:func:`kd.data.augment.seeded`), so a
    sample's augmentation is the same in any process, worker or restart, and the caller's random
    streams are untouched. A transform that
    raises is an :class:`~kd.errors.AugmentationError` naming ``where`` and the step (a bug, not
    an unreadable sample: ``data.on_error`` does not apply).
    """
    steps = transform_steps(transform)
    return torch.as_tensor(seeded(lambda: run_steps(steps, img, where), seed))


def train_transform_kwargs(cfg: DataConfig) -> dict[str, Any]:
    """timm ``create_transform`` arguments for training from the ``data`` config section, and
    the pipeline that runs them (``data.pipeline``)."""
    return {"auto_augment": cfg.auto_augment, "color_jitter": cfg.color_jitter,
            "re_prob": cfg.re_prob, "scale": tuple(cfg.scale), "hflip": cfg.hflip,
            "pipeline": cfg.pipeline, "decode": cfg.decode}


def load_image(transform: Any, source: str | Path | bytes | BinaryIO, seed: int | None,
               where: str) -> torch.Tensor:
    """Decode ``source`` and transform it: the one way every image dataset reads a sample.

    kd's tensor transform plans the augmentation first and decodes at the scale the crop
    allows; timm's decodes, then transforms (:func:`transform_image`). Either way the result is
    a pure function of ``seed``, an unreadable image raises OSError and a failing augmentation
    an :class:`~kd.errors.AugmentationError`.
    """
    if isinstance(transform, TensorTrainTransform):  # its NumPy draws are its own (plan)
        if seed is None and transform.decode == "device":  # a sample read outside the loader
            return transform.decoded(source, where)
        return seeded(lambda: transform(source, where, seed), seed, numpy=False)
    return transform_image(transform, decode_rgb(source), seed, where)

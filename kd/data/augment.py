"""kd's adjustments to timm's training transforms, and running them so that a failure is named.

timm builds the augmentation (:func:`timm.data.create_transform`); two things in it need kd's
hand, both applied to kd's own transform objects (nothing in timm is patched globally):

- **Posterize at 0 bits.** RandAugment's increasing posterize keeps ``4 - int(level / 10 * 4)``
  bits, so the top of the magnitude range (``m10``, reached whenever ``mstd`` noise pushes the
  magnitude past 10 and timm clips it there) asks for 0 bits. Pillow up to 12 and the
  TensorFlow reference (``tf.bitwise.left_shift(right_shift(x, 8), 8)``) turn 0 bits into a
  black image; Pillow 13 refuses with ``ValueError: bits must be between or equal to 1 and 8``.
  kd posterizes with its own lookup table, which keeps the published meaning at every level
  (0 bits: every channel 0) and behaves the same on every Pillow kd allows.
- **Random erasing.** With ``use_prefetcher=True`` (kd normalises on the device, separately
  for student and teacher) timm leaves :class:`~timm.data.random_erasing.RandomErasing` out of
  the transform, so ``data.re_prob`` would do nothing. kd appends :class:`PixelErasing`, timm's
  erasing run on the uint8 image (see there).
"""

from __future__ import annotations

import random
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kd.errors import AugmentationError

# RandAugment / AutoAugment op names whose function is timm's `posterize`.
POSTERIZE_OPS = ("Posterize", "PosterizeIncreasing", "PosterizeOriginal")
# The mean and std under which erased pixels are N(0, 1), as timm's prefetcher erases them for
# a model with ImageNet's normalisation (timm.data.IMAGENET_DEFAULT_MEAN / _STD).
ERASE_MEAN = (0.485, 0.456, 0.406)
ERASE_STD = (0.229, 0.224, 0.225)


def posterize(img: Any, bits_to_keep: int, **_: Any) -> Any:
    """Keep the ``bits_to_keep`` most significant bits of each channel of a PIL image.

    ``bits_to_keep`` of 8 or more returns the image; 0 (or less) gives 0 in every channel, as
    Pillow < 13 and the TensorFlow RandAugment do. Same signature as timm's op.

    Example:
        >>> from PIL import Image
        >>> posterize(Image.new("RGB", (1, 1), (200, 100, 50)), 2).getpixel((0, 0))
        (192, 64, 0)
        >>> posterize(Image.new("RGB", (1, 1), (200, 100, 50)), 0).getpixel((0, 0))
        (0, 0, 0)
    """
    if bits_to_keep >= 8:
        return img
    mask = 0 if bits_to_keep <= 0 else 0xFF & ~(2 ** (8 - bits_to_keep) - 1)
    lut = [i & mask for i in range(256)]
    return img.point(lut * len(img.getbands()))


def fix_posterize(transform: Any) -> int:
    """Point every posterize op inside ``transform`` (a timm Compose) at :func:`posterize`.

    Looks into RandAugment (``ops``), AutoAugment (``policy``) and AugMix (``ops``) of this
    transform object only. Returns the number of ops changed.
    """
    changed = 0
    for step in transform_steps(transform):
        ops = list(getattr(step, "ops", []) or [])
        for sub_policy in getattr(step, "policy", []) or []:
            ops.extend(sub_policy)
        for op in ops:
            if getattr(op, "name", None) in POSTERIZE_OPS:
                op.aug_fn = posterize
                changed += 1
    return changed


class PixelErasing:
    """timm's :class:`~timm.data.random_erasing.RandomErasing` on a uint8 (C, H, W) image.

    timm erases normalised tensors with N(0, 1) noise ('pixel' mode). kd's loaders ship uint8
    images that the student and the teacher normalise each with its own mean and std, so the
    erasing happens here, before either: the image is normalised with ImageNet's mean and std,
    erased by timm's own code (same rectangle distribution, same random streams), mapped back and
    rounded to uint8 (noise beyond the pixel range is clamped). Both models then see the same
    erased pixels; for a model with ImageNet's normalisation the noise is timm's.

    The coin is tossed here, as timm tosses it, so that images left alone skip the conversion
    (0.6 ms per 224 px image here); timm's erasing then runs with probability 1.
    """

    def __init__(self, probability: float, mode: str = "pixel", count: int = 1) -> None:
        from timm.data.random_erasing import RandomErasing

        self.probability = probability
        self.erase = RandomErasing(1.0, mode=mode, max_count=count, device="cpu")
        self.mean = torch.tensor(ERASE_MEAN).view(3, 1, 1) * 255
        self.std = torch.tensor(ERASE_STD).view(3, 1, 1) * 255

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if random.random() > self.probability:
            return image
        x = (image.float() - self.mean) / self.std
        self.erase(x)
        return x.mul_(self.std).add_(self.mean).round_().clamp_(0, 255).to(torch.uint8)

    def __repr__(self) -> str:
        return f"PixelErasing(p={self.probability})"


def run_steps(steps: Sequence[Callable[[Any], Any]], img: Any, where: str) -> Any:
    """Apply ``steps`` in turn; an exception in one is an :class:`AugmentationError` naming
    the sample (``where``), the step and the function that raised, never a bad sample."""
    for step in steps:
        try:
            img = step(img)
        except Exception as e:
            frame = traceback.extract_tb(e.__traceback__)[-1]
            raise AugmentationError(
                f"augmentation failed on {where} in {type(step).__name__} ({frame.name} at "
                f"{Path(frame.filename).name}:{frame.lineno}): {type(e).__name__}: {e}; this is "
                f"a bug in the transform, not bad data, so data.on_error does not skip it"
            ) from e
    return img


def transform_steps(transform: Callable[[Any], Any]) -> list[Callable[[Any], Any]]:
    """The steps of a torchvision Compose (or the transform itself)."""
    return list(getattr(transform, "transforms", [transform]))


def seeded(fn: Callable[[], Any], seed: int | None, numpy: bool = True) -> Any:
    """``fn()`` with Python's, NumPy's and torch's global generators seeded from ``seed`` for the
    call and restored after; ``None`` runs it as is.

    timm's transforms draw from all three: crops and op magnitudes from ``random``, RandAugment's
    and AugMix's choice of ops from ``np.random`` (timm/data/auto_augment.py), colour jitter and
    erasing noise from torch. ``numpy=False`` leaves NumPy's alone, for a caller that draws from
    its own ``RandomState`` seeded the same way (saving and restoring NumPy's global state costs
    0.14 ms a call here, more than the rest of this function).
    """
    if seed is None:
        return fn()
    state = random.getstate(), torch.get_rng_state(), np.random.get_state() if numpy else None
    random.seed(seed)
    if numpy:
        np.random.seed(seed % 2**32)
    # The CPU generator only: torch.manual_seed would also reseed every CUDA generator (the
    # trainer's dropout stream, when the loader runs in the training process; nothing restores
    # it) and costs 0.085 ms a call here against 0.0014.
    torch.default_generator.manual_seed(seed)
    try:
        return fn()
    finally:
        random.setstate(state[0])
        torch.set_rng_state(state[1])
        if state[2] is not None:
            np.random.set_state(state[2])

"""The training transform: DeiT's RandAugment recipe over its whole magnitude range, random
erasing, and augmentation failures stopping the run instead of counting as bad samples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from kd.data import build_dataset
from kd.data.augment import POSTERIZE_OPS, PixelErasing, posterize, seeded
from kd.data.datasets import build_image_transform, transform_image
from kd.data.stream import WdsStreamDataset
from kd.data.transfer import UnlabelledFolder
from kd.errors import AugmentationError
from tests.unit.test_data import make_tree
from tests.unit.test_wds_hf import write_shard

DEIT = {"auto_augment": "rand-m9-mstd0.5-inc1", "color_jitter": 0.4, "re_prob": 0.25,
        "scale": (0.08, 1.0), "hflip": 0.5}


def photo(size: int = 24) -> Image.Image:
    """A smooth RGB image with every channel spanning 0-255."""
    y, x = np.mgrid[0:size, 0:size] * (255 / (size - 1))
    return Image.fromarray(np.stack([x, y, 255 - x], -1).astype(np.uint8))


def augment_ops(transform: Any) -> list[Any]:
    return [op for step in transform.transforms for op in getattr(step, "ops", [])]


@pytest.mark.parametrize("policy", ["rand-m9-mstd0.5-inc1", "rand-m9-mstd0.5", "original"])
def test_posterize_ops_run_over_the_whole_magnitude_range(policy: str) -> None:
    transform = build_image_transform(16, True, {"auto_augment": policy})
    steps = transform.transforms
    ops = augment_ops(transform) + [op for step in steps for sub in getattr(step, "policy", [])
                                    for op in sub]
    posterizers = [op for op in ops if op.name in POSTERIZE_OPS]
    assert posterizers, [op.name for op in ops]
    img, arr = photo(), np.asarray(photo())
    for op in posterizers:
        for magnitude in np.linspace(0, 10, 41):
            (bits,) = op.level_fn(float(magnitude), op.hparams)
            out = np.asarray(op.aug_fn(img, bits))
            keep = 0 if bits <= 0 else 256 - 2 ** (8 - min(bits, 8))
            assert np.array_equal(out, arr & keep), (op.name, magnitude, bits)


def test_zero_bits_is_black_as_in_the_reference_implementations() -> None:
    # TensorFlow's posterize shifts by 8 - bits (8 at 0 bits) and Pillow < 13 masks with ~255.
    assert np.asarray(posterize(photo(), 0)).max() == 0
    assert posterize(photo(), 8) is not None and np.array_equal(
        np.asarray(posterize(photo(), 8)), np.asarray(photo()))
    assert np.asarray(posterize(photo().convert("L"), 1)).max() == 128


def test_deit_recipe_drops_no_image(tmp_path: Path) -> None:
    # About 0.5 % of images hit the m10 posterize with timm's unadjusted op (Pillow 13).
    make_tree(tmp_path, {"train": 4}, classes=("a", "b"))
    ds = build_dataset("imagefolder", "train", root=str(tmp_path), image_size=16, num_classes=2,
                       augment=True, channels=3, synthetic_size=0, transform_kwargs=DEIT)
    bad = [b for seed in range(2400) for b in ds[(seed % len(ds), seed)][2]]
    assert bad == []


def test_random_erasing_is_applied_and_seeded() -> None:
    plain = build_image_transform(32, True, {**DEIT, "re_prob": 0.0, "auto_augment": None})
    erasing = build_image_transform(32, True, {**DEIT, "re_prob": 1.0, "auto_augment": None})
    assert isinstance(erasing.transforms[-1], PixelErasing)
    assert not any(isinstance(t, PixelErasing) for t in plain.transforms)
    img = photo(48)
    for seed in range(5):
        a = transform_image(plain, img, seed, "x")
        b = transform_image(erasing, img, seed, "x")
        assert b.dtype == torch.uint8 and b.shape == a.shape
        assert torch.equal(b, transform_image(erasing, img, seed, "x"))
        changed = (a != b).any(0)
        rows, cols = changed.any(1).nonzero(), changed.any(0).nonzero()
        assert changed.any()
        # One erased rectangle; every pixel outside it is untouched.
        box = torch.zeros_like(changed)
        box[rows.min():rows.max() + 1, cols.min():cols.max() + 1] = True
        assert not (changed & ~box).any()


def test_erasing_noise_is_normal_under_imagenet_normalisation() -> None:
    image = torch.full((3, 200, 200), 128, dtype=torch.uint8)
    erase = PixelErasing(1.0)
    # A square of half the image: it always fits, so it is always erased.
    erase.erase.min_area, erase.erase.max_area = 0.5, 0.5
    erase.erase.log_aspect_ratio = (0.0, 0.0)
    out = seeded(lambda: erase(image), 0)
    erased = (out != 128).any(0)
    assert float(erased.float().mean()) > 0.45
    z = ((out.float() - erase.mean) / erase.std)[:, erased]
    # N(0, 1) noise, a little narrower where it was clamped to the pixel range.
    assert abs(float(z.mean())) < 0.1 and 0.85 < float(z.std()) < 1.05


class Boom:
    """A transform step that fails on every image, as a buggy augmentation would."""

    def __call__(self, img: Any) -> Any:
        raise ValueError("boom in the augmentation")


def break_transform(ds: Any) -> None:
    ds.transform.transforms.insert(1, Boom())


def imagefolder_kind(root: Path, on_error: str = "skip") -> tuple[Any, Any]:
    make_tree(root, {"train": 2}, classes=("a", "b"))
    ds = build_dataset("imagefolder", "train", root=str(root), image_size=16, num_classes=2,
                       augment=True, channels=3, synthetic_size=0, on_error=on_error)
    return ds, lambda: ds[(0, 1)]


def wds_kind(root: Path, on_error: str = "skip") -> tuple[Any, Any]:
    write_shard(root / "train-000000.tar", "s0", 3, np.random.default_rng(0))
    ds = build_dataset("wds", "train", root=str(root), image_size=16, num_classes=3,
                       augment=True, channels=3, synthetic_size=0, on_error=on_error)
    return ds, lambda: ds[(0, 1)]


def stream_kind(root: Path, on_error: str = "skip") -> tuple[Any, Any]:
    write_shard(root / "train-000000.tar", "s0", 3, np.random.default_rng(0))
    ds = WdsStreamDataset([root / "train-000000.tar"], image_size=16, train=True,
                          num_classes=3, seed=0, buffer_size=2, on_error=on_error)
    return ds, lambda: ds.__getitems__([(0, 1, 0, 0)])


def hf_kind(root: Path, on_error: str = "skip") -> tuple[Any, Any]:
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=["a", "b"])})
    split = datasets.Dataset.from_dict({"image": [photo(), photo()], "label": [0, 1]},
                                       features=features)
    datasets.DatasetDict({"train": split}).save_to_disk(str(root))
    ds = build_dataset("hf", "train", root=str(root), image_size=16, num_classes=2,
                       augment=True, channels=3, synthetic_size=0, on_error=on_error)
    return ds, lambda: ds[(0, 1)]


def transfer_kind(root: Path, on_error: str = "skip") -> tuple[Any, Any]:
    photo().save(root / "unlabelled.jpg")
    ds = UnlabelledFolder(root, image_size=16, train=True, on_error=on_error)
    return ds, lambda: ds[(0, 1)]


@pytest.mark.parametrize("kind", [imagefolder_kind, wds_kind, stream_kind, hf_kind,
                                  transfer_kind], ids=lambda k: k.__name__)
@pytest.mark.parametrize("on_error", ["skip", "fail"])
def test_a_failing_augmentation_stops_the_run_naming_sample_and_step(
        kind: Any, on_error: str, tmp_path: Path) -> None:
    ds, read = kind(tmp_path, on_error)
    read()  # reads and augments
    break_transform(ds)
    with pytest.raises(AugmentationError) as info:
        read()
    message = str(info.value)
    assert "augmentation failed on " in message and "in Boom (__call__ at test_augment.py:" \
        in message and "ValueError: boom in the augmentation" in message
    assert "data.on_error does not skip it" in message
    # The sample is named as data errors name it (a file, a shard member, a row).
    assert str(tmp_path) in message or "train-000000.tar" in message


def test_a_failing_augmentation_in_a_loader_worker_keeps_its_type(tmp_path: Path) -> None:
    from kd.data import build_train_loader

    ds, _ = imagefolder_kind(tmp_path)
    break_transform(ds)
    loader = build_train_loader(ds, 2, seed=0, rank=0, world_size=1, num_workers=1,
                                pin_memory=False)
    with pytest.raises(AugmentationError, match="augmentation failed on"):
        next(iter(loader))


def test_seeding_a_sample_leaves_the_cuda_generators_alone(monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    calls: list[int] = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", calls.append)
    monkeypatch.setattr(torch.cuda, "manual_seed", calls.append)
    transform = build_image_transform(16, True, DEIT)
    a = transform_image(transform, photo(), 3, "x")
    assert torch.equal(a, transform_image(transform, photo(), 3, "x")) and calls == []


@pytest.mark.gpu
def test_a_sample_read_in_the_training_process_keeps_the_cuda_rng() -> None:
    torch.cuda.manual_seed(5)
    state = torch.cuda.get_rng_state()
    transform_image(build_image_transform(16, True, DEIT), photo(), 3, "x")
    assert torch.equal(torch.cuda.get_rng_state(), state)


@pytest.mark.parametrize("policy", ["rand-m9-mstd0.5-inc1", "augmix-m5-w3-d2"])
def test_augmentation_is_a_pure_function_of_the_seed(policy: str) -> None:
    # RandAugment and AugMix choose their ops with NumPy's global generator: a sample's image
    # must not depend on where that generator happens to be.
    transform = build_image_transform(16, True, {**DEIT, "auto_augment": policy})
    images = []
    for numpy_state in range(8):
        np.random.seed(numpy_state)
        images.append(transform_image(transform, photo(), 3, "x"))
        assert np.random.get_state()[1][0] == np.random.RandomState(numpy_state).get_state()[1][0]
    assert all(torch.equal(images[0], other) for other in images[1:])

"""Unit tests for kd.data: deterministic resumable samplers and keyed datasets."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from kd.data import build_dataset, build_eval_loader, build_train_loader
from kd.data.datasets import DigitsDataset, SyntheticDataset
from kd.data.sampler import EvalBatchSampler, TrainBatchSampler
from kd.errors import DataError


def batches(sampler: TrainBatchSampler | EvalBatchSampler) -> list[list[tuple[int, int | None]]]:
    return [list(b) for b in sampler]


def indices(bs: list[list[tuple[int, int | None]]]) -> list[int]:
    return [i for b in bs for i, _ in b]


# ------------------------------------------------------------------------------------------
# TrainBatchSampler
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size, batch_size", [(20, 4), (23, 5), (7, 7), (100, 1)])
def test_epoch_is_a_permutation_of_full_batches(size: int, batch_size: int) -> None:
    s = TrainBatchSampler(size, batch_size, seed=3)
    bs = batches(s)
    assert len(bs) == len(s) == size // batch_size
    assert all(len(b) == batch_size for b in bs)
    idx = indices(bs)
    assert len(set(idx)) == len(idx)  # no repeats
    assert set(idx) <= set(range(size))
    if size % batch_size == 0:
        assert sorted(idx) == list(range(size))


def test_epochs_differ_and_repeat_exactly() -> None:
    s = TrainBatchSampler(64, 8, seed=0)
    by_epoch = []
    for epoch in range(3):
        s.set_epoch(epoch)
        by_epoch.append(batches(s))
    assert indices(by_epoch[0]) != indices(by_epoch[1])
    assert indices(by_epoch[1]) != indices(by_epoch[2])
    # Augmentation seeds are drawn per epoch too.
    seeds0 = dict(k for b in by_epoch[0] for k in b)
    seeds1 = dict(k for b in by_epoch[1] for k in b)
    assert [seeds0[i] for i in range(64)] != [seeds1[i] for i in range(64)]
    # Same (seed, epoch) from a fresh sampler: the same batches and seeds.
    again = TrainBatchSampler(64, 8, seed=0)
    again.set_epoch(1)
    assert batches(again) == by_epoch[1]
    # Iterating twice gives the same thing.
    assert batches(again) == by_epoch[1]


def test_seeds_differ() -> None:
    a, b = TrainBatchSampler(64, 8, seed=0), TrainBatchSampler(64, 8, seed=1)
    assert batches(a) != batches(b)
    # (seed=0, epoch=1) and (seed=1, epoch=0) are different streams.
    a.set_epoch(1)
    assert batches(a) != batches(b)


@pytest.mark.parametrize("world_size, rank", [(1, 0), (2, 0), (2, 1), (3, 2)])
@pytest.mark.parametrize("start", [0, 1, 3, 5])
def test_start_batch_yields_the_tail_of_the_epoch(world_size: int, rank: int,
                                                  start: int) -> None:
    full = TrainBatchSampler(50, 3, seed=7, rank=rank, world_size=world_size)
    full.set_epoch(2)
    all_batches = batches(full)
    resumed = TrainBatchSampler(50, 3, seed=7, rank=rank, world_size=world_size)
    resumed.set_epoch(2, start_batch=start)
    assert len(resumed) == len(all_batches)  # __len__ counts skipped batches too
    assert batches(resumed) == all_batches[start:]


def test_start_batch_at_the_end_yields_nothing() -> None:
    s = TrainBatchSampler(20, 4, seed=0)
    s.set_epoch(0, start_batch=len(s))
    assert batches(s) == []


def _permutation(size: int, seed: int, epoch: int) -> list[int]:
    """The epoch's global order: rank 0 of a world of one, batch size 1, sees all of it."""
    s = TrainBatchSampler(size, 1, seed)
    s.set_epoch(epoch)
    return indices(batches(s))


@pytest.mark.parametrize("size, batch_size, world_size", [(40, 4, 2), (45, 4, 2), (50, 3, 4)])
def test_ranks_split_the_usable_prefix(size: int, batch_size: int, world_size: int) -> None:
    per_rank = []
    for rank in range(world_size):
        s = TrainBatchSampler(size, batch_size, seed=5, rank=rank, world_size=world_size)
        s.set_epoch(1)
        per_rank.append(batches(s))
    counts = {len(bs) for bs in per_rank}
    assert counts == {size // (batch_size * world_size)}  # equal number of batches per rank
    sets = [set(indices(bs)) for bs in per_rank]
    for a in range(world_size):
        for b in range(a + 1, world_size):
            assert not sets[a] & sets[b]
    usable = len(per_rank[0]) * batch_size * world_size
    assert set().union(*sets) == set(_permutation(size, 5, 1)[:usable])


def test_augmentation_seed_of_a_sample_does_not_depend_on_world_size() -> None:
    single = TrainBatchSampler(48, 4, seed=9)
    single.set_epoch(3)
    seeds1 = dict(k for b in batches(single) for k in b)
    seeds2: dict[int, int | None] = {}
    for rank in range(2):
        s = TrainBatchSampler(48, 4, seed=9, rank=rank, world_size=2)
        s.set_epoch(3)
        seeds2.update(k for b in batches(s) for k in b)
    assert seeds2 == seeds1
    assert len(set(seeds1.values())) > 40  # seeds are per sample, not one per epoch
    assert all(isinstance(v, int) and v >= 0 for v in seeds1.values())


def test_sampler_docstring_example() -> None:
    s = TrainBatchSampler(10, batch_size=2, seed=0)
    s.set_epoch(0, start_batch=1)
    assert (len(s), len(list(s))) == (5, 4)


@pytest.mark.parametrize("repeats, world_size", [(3, 1), (3, 3), (3, 4), (2, 2)])
def test_repeated_augmentation_shows_each_image_n_times_on_n_ranks(repeats: int,
                                                                   world_size: int) -> None:
    """data.repeated_aug: an epoch holds every image `repeats` times, each copy with its own
    seed; with at least `repeats` ranks the copies of an image go to different ranks in the
    same step (DeiT's sampler), and a mid-epoch resume yields the rest of the epoch."""
    images, batch = 24, 2
    size = images * repeats
    per_rank = []
    for rank in range(world_size):
        s = TrainBatchSampler(size, batch, seed=4, rank=rank, world_size=world_size,
                              repeats=repeats)
        s.set_epoch(1)
        per_rank.append(batches(s))
        assert len(s) == size // (batch * world_size)
        resumed = TrainBatchSampler(size, batch, seed=4, rank=rank, world_size=world_size,
                                    repeats=repeats)
        resumed.set_epoch(1, start_batch=3)
        assert batches(resumed) == per_rank[-1][3:]
    keys = [(slot, seed, rank, b) for rank, bs in enumerate(per_rank)
            for b, chunk in enumerate(bs) for slot, seed in chunk]
    usable = len(per_rank[0]) * batch * world_size
    assert len({slot for slot, *_ in keys}) == len(keys) == usable  # every slot once
    seen = Counter(slot // repeats for slot, *_ in keys)
    if usable == size:
        assert seen == {i: repeats for i in range(images)}
    assert len({seed for _, seed, *_ in keys}) == len(keys)  # every copy its own augmentation
    if world_size >= repeats:
        by_image: dict[int, list[tuple[int, int]]] = {}
        for slot, _, rank, b in keys:
            by_image.setdefault(slot // repeats, []).append((rank, b))
        for where in by_image.values():
            ranks, steps = {r for r, _ in where}, {b for _, b in where}
            assert len(ranks) == len(where)  # copies on different ranks
            assert max(steps) - min(steps) <= 1  # in the same step, or the next at a seam


def test_repeated_augmentation_of_one_is_the_plain_order() -> None:
    plain, once = TrainBatchSampler(40, 4, seed=2), TrainBatchSampler(40, 4, seed=2, repeats=1)
    for s in (plain, once):
        s.set_epoch(3)
    assert batches(plain) == batches(once)


def test_repeated_dataset_augments_each_copy_on_its_own() -> None:
    from kd.data.datasets import Repeated

    images = SyntheticDataset(10, num_classes=4, image_size=8, channels=3)
    view = Repeated(images, 3)
    assert len(view) == 30 and view.channels == images.channels
    copies = [view[(slot, 100 + slot)] for slot in (12, 13, 14)]  # image 4, three seeds
    assert {label for _, label, _ in copies} == {images[(4, None)][1]}
    assert not torch.equal(copies[0][0], copies[1][0])
    assert torch.equal(view[(13, 7)][0], images[(4, 7)][0])  # slot 13 is image 4
    assert "copy 2 of 3" in view.describe(13)


# ------------------------------------------------------------------------------------------
# EvalBatchSampler
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size, batch_size, world_size", [(10, 3, 1), (10, 3, 2), (11, 4, 3),
                                                          (2, 4, 3), (0, 2, 2)])
def test_eval_sampler_visits_every_index_once(size: int, batch_size: int,
                                              world_size: int) -> None:
    seen = []
    for rank in range(world_size):
        s = EvalBatchSampler(size, batch_size, rank, world_size)
        bs = batches(s)
        assert len(bs) == len(s)
        assert all(0 < len(b) <= batch_size for b in bs)
        assert all(seed is None for b in bs for _, seed in b)
        seen += indices(bs)
    assert sorted(seen) == list(range(size))
    assert len(seen) == size


# ------------------------------------------------------------------------------------------
# digits
# ------------------------------------------------------------------------------------------


def digits(split: str, augment: bool = True, image_size: int = 16) -> DigitsDataset:
    ds = build_dataset("digits", split, root=None, image_size=image_size, num_classes=10,
                       augment=augment, channels=1, synthetic_size=0)
    assert isinstance(ds, DigitsDataset)
    return ds


@pytest.fixture(scope="module")
def digits_train() -> DigitsDataset:
    return digits("train")


@pytest.fixture(scope="module")
def digits_val() -> DigitsDataset:
    return digits("val")


def test_digits_sizes_and_classes(digits_train: DigitsDataset, digits_val: DigitsDataset) -> None:
    assert len(digits_train) == 1200 and len(digits_val) == 597
    assert digits_train.images.shape == (1200, 1, 16, 16)
    assert digits_val.images.shape == (597, 1, 16, 16)
    from sklearn.datasets import load_digits

    total = np.bincount(load_digits().target, minlength=10)
    for ds in (digits_train, digits_val):
        counts = torch.bincount(ds.labels, minlength=10).numpy()
        # stratified: each class in proportion to its overall frequency (within rounding)
        assert np.all(np.abs(counts - total * len(ds) / 1797) <= 1.0)


def test_digits_split_is_a_partition(digits_train: DigitsDataset,
                                     digits_val: DigitsDataset) -> None:
    """Train and val together hold every digit image exactly as often as the full set."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    full = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False).clamp_(0, 1)

    def key(img: torch.Tensor, label: int) -> tuple[bytes, int]:
        return img.numpy().tobytes(), label

    whole = Counter(key(full[i], int(d.target[i])) for i in range(len(full)))
    parts = Counter(key(ds.images[i], int(ds.labels[i]))
                    for ds in (digits_train, digits_val) for i in range(len(ds)))
    assert parts == whole


def test_digits_are_reproducible(digits_train: DigitsDataset) -> None:
    again = digits("train")
    assert torch.equal(again.images, digits_train.images)
    assert torch.equal(again.labels, digits_train.labels)


def test_digits_augmentation(digits_train: DigitsDataset) -> None:
    a, ya, _ = digits_train[(3, 7)]
    b, yb, _ = digits_train[(3, 7)]
    c, _, _ = digits_train[(3, 8)]
    plain, yp, _ = digits_train[(3, None)]
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(plain, digits_train.images[3])
    assert not torch.equal(a, plain)
    assert ya == yb == yp == int(digits_train.labels[3])
    assert torch.equal(digits_train[3][0], plain)  # a bare index means no augmentation
    for img in (a, c, plain):
        assert img.dtype == torch.float32 and img.shape == (1, 16, 16)
        assert img.min() >= 0 and img.max() <= 1


def test_digits_augmentation_does_not_modify_the_stored_image(
        digits_train: DigitsDataset) -> None:
    before = digits_train.images[5].clone()
    digits_train[(5, 123)]
    assert torch.equal(digits_train.images[5], before)


def test_digits_val_and_unaugmented_train_ignore_seeds(digits_val: DigitsDataset) -> None:
    assert torch.equal(digits_val[(0, 1)][0], digits_val[(0, 2)][0])
    assert torch.equal(digits_val[(0, 1)][0], digits_val.images[0])
    plain = digits("train", augment=False)
    assert torch.equal(plain[(4, 1)][0], plain.images[4])


def test_digits_value_range(digits_train: DigitsDataset) -> None:
    assert digits_train.images.min() >= 0 and digits_train.images.max() <= 1
    assert digits_train.images.max() > 0.9  # scaled from 0..16, not left at 0..1/16


def test_digits_need_ten_classes() -> None:
    with pytest.raises(DataError, match=r"data\.num_classes"):
        build_dataset("digits", "train", root=None, image_size=16, num_classes=5,
                      augment=False, channels=1, synthetic_size=0)


def test_unknown_dataset_name() -> None:
    with pytest.raises(DataError, match=r"data\.name"):
        build_dataset("mnist", "train", root=None, image_size=16, num_classes=10,
                      augment=False, channels=1, synthetic_size=0)


# ------------------------------------------------------------------------------------------
# synthetic
# ------------------------------------------------------------------------------------------


def synthetic(split: str, size: int = 40, classes: int = 3) -> SyntheticDataset:
    ds = build_dataset("synthetic", split, root=None, image_size=8, num_classes=classes,
                       augment=True, channels=3, synthetic_size=size)
    assert isinstance(ds, SyntheticDataset)
    return ds


def test_synthetic_labels_and_sizes() -> None:
    tr, va = synthetic("train"), synthetic("val")
    assert (len(tr), len(va)) == (40, 10)
    assert [tr[i][1] for i in range(len(tr))] == [i % 3 for i in range(40)]
    assert [va[i][1] for i in range(len(va))] == [i % 3 for i in range(10)]
    assert len(synthetic("val", size=4, classes=3)) == 3  # at least one image per class
    img, _, _ = tr[(5, 11)]
    assert img.shape == (3, 8, 8) and img.dtype == torch.float32
    assert img.min() >= 0 and img.max() <= 1


def test_synthetic_is_deterministic_and_splits_differ() -> None:
    tr, va = synthetic("train"), synthetic("val")
    assert torch.equal(tr[2][0], synthetic("train")[2][0])
    assert torch.equal(tr[(2, 9)][0], tr[(2, 9)][0])
    assert not torch.equal(tr[(2, 9)][0], tr[(2, 10)][0])
    assert not torch.equal(tr[2][0], va[2][0])
    assert not torch.equal(tr[0][0], tr[3][0])  # same class, different noise


# ------------------------------------------------------------------------------------------
# imagefolder
# ------------------------------------------------------------------------------------------

CLASSES = ("cat", "dog", "eel")


def make_tree(root: Path, per_split: dict[str, int], classes: tuple[str, ...] = CLASSES) -> None:
    rng = np.random.default_rng(0)
    for split, n in per_split.items():
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"{i}.{'png' if i % 2 else 'jpg'}")


@pytest.fixture(scope="module")
def image_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("imagefolder")
    make_tree(root, {"train": 3, "val": 2})
    return root


def imagefolder(root: Path | str | None, split: str, num_classes: int = 3, augment: bool = True):
    return build_dataset("imagefolder", split, root=None if root is None else str(root),
                         image_size=16, num_classes=num_classes, augment=augment, channels=3,
                         synthetic_size=0)


def test_imagefolder_sizes_labels_and_tensors(image_root: Path) -> None:
    tr, va = imagefolder(image_root, "train"), imagefolder(image_root, "val")
    assert (len(tr), len(va)) == (9, 6)
    assert tr.classes == list(CLASSES)
    assert sorted(tr[i][1] for i in range(len(tr))) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert [va[i][1] for i in range(len(va))] == [0, 0, 1, 1, 2, 2]
    for ds, key in ((tr, (0, 5)), (tr, 0), (va, 0)):
        img, _, _ = ds[key]
        assert img.dtype == torch.uint8
        assert img.shape == (3, 16, 16)


def test_imagefolder_augmentation_is_reproducible(image_root: Path) -> None:
    tr = imagefolder(image_root, "train")
    a, _, _ = tr[(1, 5)]
    b, _, _ = tr[(1, 5)]
    assert torch.equal(a, b)
    others = [tr[(1, s)][0] for s in range(6, 12)]
    assert any(not torch.equal(a, o) for o in others)


def test_imagefolder_seeded_read_restores_global_rngs(image_root: Path) -> None:
    import random

    tr = imagefolder(image_root, "train")
    random.seed(42)
    torch.manual_seed(42)
    expected = (random.random(), torch.rand(1))
    random.seed(42)
    torch.manual_seed(42)
    tr[(0, 5)]
    assert (random.random(), torch.rand(1)) == expected


def test_imagefolder_eval_ignores_seeds(image_root: Path) -> None:
    va = imagefolder(image_root, "val")
    assert torch.equal(va[(0, 1)][0], va[(0, 2)][0])
    assert torch.equal(va[(0, 1)][0], va[0][0])


def test_imagefolder_class_count_mismatch(image_root: Path) -> None:
    with pytest.raises(DataError) as info:
        imagefolder(image_root, "train", num_classes=4)
    assert "data.num_classes=4" in str(info.value)
    assert "3 class folders" in str(info.value)


def test_imagefolder_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data\.root"):
        imagefolder(tmp_path / "nope", "train")
    with pytest.raises(DataError, match=r"data\.root"):
        imagefolder(None, "train")


def test_imagefolder_missing_split(tmp_path: Path) -> None:
    make_tree(tmp_path, {"train": 1})
    with pytest.raises(DataError, match="no 'val' folder"):
        imagefolder(tmp_path, "val")


@pytest.mark.parametrize("with_class_dirs", [False, True])
def test_imagefolder_empty_split(tmp_path: Path, with_class_dirs: bool) -> None:
    (tmp_path / "train").mkdir()
    if with_class_dirs:
        for c in CLASSES:
            (tmp_path / "train" / c).mkdir()
    with pytest.raises(DataError, match=r"data\.root"):
        imagefolder(tmp_path, "train")


# ------------------------------------------------------------------------------------------
# loaders
# ------------------------------------------------------------------------------------------


def test_train_loader_batches_follow_the_sampler() -> None:
    ds = synthetic("train", size=24, classes=4)
    loader = build_train_loader(ds, 8, seed=1, rank=0, world_size=1, num_workers=0,
                                pin_memory=False)
    loader.batch_sampler.set_epoch(2)
    keys = batches(loader.batch_sampler)
    got = list(loader)
    assert len(got) == 3
    for (images, labels, bad), ks in zip(got, keys):
        assert bad == []
        assert images.shape == (8, 3, 8, 8)
        assert labels.tolist() == [i % 4 for i, _ in ks]
        expected = torch.stack([ds[k][0] for k in ks])
        assert torch.equal(images, expected)


def test_eval_loader_is_unaugmented_and_complete() -> None:
    ds = synthetic("val", size=40, classes=3)
    loader = build_eval_loader(ds, 4, rank=0, world_size=1, num_workers=0, pin_memory=False)
    images = torch.cat([x for x, _, _ in loader])
    labels = torch.cat([y for _, y, _ in loader])
    assert len(images) == len(ds)
    assert labels.tolist() == [i % 3 for i in range(len(ds))]
    assert torch.equal(images, torch.stack([ds[i][0] for i in range(len(ds))]))

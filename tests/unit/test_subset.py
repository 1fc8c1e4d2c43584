"""Few labels (``data.labels_per_class``): a stratified, seeded, stable training subset."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kd.config import load_config
from kd.data.build import build_split
from kd.data.sampler import TrainBatchSampler
from kd.data.subset import SubsetDataset, fingerprint, select_per_class
from kd.errors import ConfigError


def digits(*overrides: str) -> SubsetDataset:
    cfg = load_config("kd://presets/demo.yaml", list(overrides))
    return build_split(cfg.data, "train", 1)


def test_stratified_seeded_and_nested() -> None:
    five = digits("data.labels_per_class=5")
    assert isinstance(five, SubsetDataset) and len(five) == 50
    assert Counter(five.targets().tolist()) == {c: 5 for c in range(10)}
    again = digits("data.labels_per_class=5", "seed=123")  # the run's seed: same subset
    assert np.array_equal(five.indices, again.indices)
    other = digits("data.labels_per_class=5", "data.subset_seed=1")
    assert not np.array_equal(five.indices, other.indices)
    ten = digits("data.labels_per_class=10")
    assert set(five.indices) < set(ten.indices)  # more labels keep the fewer ones


def test_samples_and_labels_come_from_the_training_split_only() -> None:
    subset = digits("data.labels_per_class=3")
    base = subset.base
    for i in range(len(subset)):
        image, label, _ = subset[(i, None)]
        j = int(subset.indices[i])
        assert label == int(base.labels[j]) and np.array_equal(image, base.images[j])
    val = build_split(load_config("kd://presets/demo.yaml", ["data.labels_per_class=3"]).data,
                      "val", 1)
    assert len(val) == 597  # validation untouched
    val_images = {v.numpy().tobytes() for v in val.images}
    assert not any(base.images[j].numpy().tobytes() in val_images for j in subset.indices)


def test_ranks_split_the_same_subset() -> None:
    subset = digits("data.labels_per_class=8")  # 80 images
    seen = []
    for rank in (0, 1):
        sampler = TrainBatchSampler(len(digits("data.labels_per_class=8")), 8, seed=0,
                                    rank=rank, world_size=2)
        seen += [subset.indices[i] for batch in sampler for i, _ in batch]
    assert sorted(seen) == sorted(subset.indices.tolist())


def test_a_small_class_gives_all_it_has(caplog: pytest.LogCaptureFixture) -> None:
    targets = np.array([0] * 6 + [1] * 2 + [2] * 6)
    with caplog.at_level(logging.WARNING, logger="kd"):
        chosen = select_per_class(targets, 4, seed=0, num_classes=3)
    assert Counter(targets[chosen].tolist()) == {0: 4, 1: 2, 2: 4}
    assert "1 (2)" in caplog.text


def test_imagefolder_subset_reads_no_image(tmp_path: Path) -> None:
    for split in ("train", "val"):
        for c in range(3):
            folder = tmp_path / split / f"class_{c}"
            folder.mkdir(parents=True)
            for i in range(4):
                if split == "train" and i == 0:
                    (folder / f"{i}.jpg").write_bytes(b"not a jpeg")  # never decoded here
                else:
                    Image.new("RGB", (8, 8), (c * 80, i, 0)).save(folder / f"{i}.jpg")
    cfg = load_config(None, ["data.name=imagefolder", f"data.root={tmp_path}",
                             "data.num_classes=3", "data.image_size=8",
                             "data.labels_per_class=2"])
    subset = build_split(cfg.data, "train", 3)
    assert len(subset) == 6 and Counter(subset.targets().tolist()) == {0: 2, 1: 2, 2: 2}
    assert all("/train/class_" in subset.describe(i) for i in range(len(subset)))


def test_config_checks() -> None:
    with pytest.raises(ConfigError, match=r"data\.labels_per_class"):
        load_config("kd://presets/demo.yaml", ["data.labels_per_class=0"])
    with pytest.raises(ConfigError, match=r"data\.stream=false"):
        load_config(None, ["data.name=wds", "data.root=x", "data.stream=true",
                           "data.labels_per_class=5"])


def test_a_run_writes_the_subset_it_trained_on(tmp_path: Path) -> None:
    from kd.core.trainer import Trainer

    cfg = load_config("kd://presets/demo.yaml", [
        "data.labels_per_class=4", "train.epochs=1", "checkpoint.every_steps=0",
        f"output_dir={tmp_path}", "data.batch_size=8", "data.num_workers=0",
        "train.log_every=1"])
    trainer = Trainer(cfg)
    assert trainer.steps_per_epoch == 5  # 40 images / batch 8
    trainer.train()
    record = json.loads((tmp_path / "labelled_subset.json").read_text())
    assert record["n"] == 40 and record["fingerprint"] == fingerprint(trainer.train_set.indices)
    assert len(record["samples"]) == 40

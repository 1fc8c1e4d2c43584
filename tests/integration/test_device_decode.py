"""kd's image pipeline in real runs on JPEG folders, decoding in the loader (data.pipeline=kd)
and in the training process (data.decode=device; device=cpu here, nvJPEG on CUDA runs the same
code): exact mid-epoch resume and teacher-cache replay hold for both."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kd.core.trainer import Trainer
from tests.integration.conftest import (
    Run,
    assert_same_weights,
    read_jsonl,
    replayed_batches,
    tiny_config,
    train_tiny,
)
from tests.integration.test_resume import comparable, interrupted_run

pytestmark = pytest.mark.usefixtures("one_thread")

RECIPE = ("data.auto_augment=rand-m9-mstd0.5-inc1", "data.re_prob=0.25")


@pytest.fixture(scope="module")
def jpeg_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 classes × 16 training and 2 validation photo-like JPEGs of about 40×30 px (one PNG)."""
    root = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(0)
    for split, n in (("train", 16), ("val", 2)):
        for c in range(4):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                w, h = 36 + 2 * i, 28 + i
                coarse = rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)
                smooth = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC),
                                    np.float32)
                pixels = (smooth + rng.normal(0, 10, smooth.shape)).clip(0, 255)
                image = Image.fromarray(pixels.astype(np.uint8))
                image.save(folder / (f"{i}.png" if (c, i) == (0, 3) else f"{i}.jpg"),
                           quality=90)
    return root


def folder_args(root: Path, decode: str = "device") -> tuple[str, ...]:
    return ("data.name=imagefolder", f"data.root={root}", f"data.decode={decode}", *RECIPE)


@pytest.mark.parametrize("decode", ["cpu", "device"])
def test_interrupted_and_resumed_equals_straight(tiny_teacher: str, jpeg_root: Path,
                                                 tmp_path: Path, decode: str) -> None:
    overrides = (*folder_args(jpeg_root, decode), "train.epochs=2", "checkpoint.every_steps=3",
                 "checkpoint.keep=10")
    straight = train_tiny(tiny_teacher, tmp_path / "straight", *overrides)
    out = tmp_path / "resumed"
    interrupted_run(tiny_teacher, out, 5, *overrides)  # resumes at step 3, mid-epoch 0
    summary = Trainer(tiny_config(tiny_teacher, out, *overrides)).train()
    assert summary["steps"] == straight.summary["steps"] == 8
    assert_same_weights(Run(out, summary).weights, straight.weights)  # bit-identical
    assert comparable(read_jsonl(out / "metrics.jsonl")) == comparable(straight.records)


@pytest.mark.parametrize("decode", ["cpu", "device"])
def test_the_cache_replays_the_images_the_teacher_saw(tiny_teacher: str, jpeg_root: Path,
                                                      tmp_path: Path, decode: str) -> None:
    """A cache records the plans' seeds; a cached run's decoded, augmented batches are
    bit-identical to the ones the teacher was run on."""
    written, seen = replayed_batches(tiny_teacher, tmp_path, *folder_args(jpeg_root, decode))
    assert len(seen) == len(written) == 4
    for b, (x, y) in enumerate(zip(written, seen, strict=True)):
        assert torch.equal(x, y), f"batch {b} differs"


def test_device_decoding_trains_like_cpu_decoding(tiny_teacher: str, jpeg_root: Path,
                                                  tmp_path: Path) -> None:
    """Same plans, decoded in the training process: the losses follow the CPU-decoded run's
    closely (decoders and colour-op forms differ by rounding only)."""
    from kd.data.tensor_transform import EncodedBatch

    loader = Trainer(tiny_config(tiny_teacher, tmp_path / "probe", *folder_args(jpeg_root)))\
        .train_loader
    assert isinstance(next(iter(loader))[0], EncodedBatch)  # bytes and plans, not pixels
    runs = {d: train_tiny(tiny_teacher, tmp_path / d, *folder_args(jpeg_root, d),
                          "train.log_every=1", "train.epochs=1") for d in ("cpu", "device")}
    a = [r["loss"] for r in runs["cpu"].train_records]
    b = [r["loss"] for r in runs["device"].train_records]
    assert len(a) == len(b) == 4
    assert b == pytest.approx(a, rel=0.02)

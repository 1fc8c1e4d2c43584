"""Data pipeline in real runs: exact mid-epoch resume order, Mixup/CutMix with every loss,
a teacher at its own image size, and unreadable images (skip / fail)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kd.core.trainer import Trainer
from kd.data.sampler import TrainBatchSampler
from tests.conftest import TINY, run_kd
from tests.integration.conftest import (
    assert_one_line_user_error,
    is_number,
    read_jsonl,
    tiny_config,
)


class Killed(Exception):
    """Stands in for a SIGKILL between two steps."""


def record_samples(trainer: Trainer) -> list[tuple[int, int]]:
    """Every training sample the trainer reads, as (index, augmentation seed)."""
    seen: list[tuple[int, int]] = []
    images = trainer.data.train_images
    get = images.get

    def recording_get(index: int, seed: int | None):
        if seed is not None:  # evaluation reads unaugmented samples
            seen.append((index, seed))
        return get(index, seed)

    images.get = recording_get
    return seen


@pytest.mark.parametrize("repeats", [1, 3])
def test_mid_epoch_resume_reads_exactly_the_unseen_batches(tiny_teacher, tmp_path, repeats):
    """8 steps per epoch of 16 images (24 with each image 3 times: data.repeated_aug=3);
    killed during step 7, last checkpoint at step 6."""
    extra = ("checkpoint.every_steps=3", f"data.repeated_aug={repeats}", "train.max_steps=12")
    straight = Trainer(tiny_config(tiny_teacher, tmp_path / "a", *extra))
    all_samples = record_samples(straight)
    straight.train()

    first = Trainer(tiny_config(tiny_teacher, tmp_path / "b", *extra))
    assert first.steps_per_epoch == 8 * repeats
    before = record_samples(first)

    def kill_at_7(t: Trainer) -> None:
        if t.step == 7:
            raise Killed

    with pytest.raises(Killed):
        first.train(on_step=kill_at_7)
    second = Trainer(tiny_config(tiny_teacher, tmp_path / "b", *extra))
    assert second.step == 6
    after = record_samples(second)
    second.train()

    committed = before[:6 * 16]  # step 7's batch was read but never committed
    assert committed + after == all_samples
    if repeats == 1:
        epoch0 = committed + after[:2 * 16]
        assert sorted(i for i, _ in epoch0) == list(range(128))  # each sample once in the epoch
    else:  # 12 of 24 steps: images come in runs of 3 copies, each copy with its own seed
        assert len(all_samples) == 12 * 16
        for k in range(0, len(all_samples), repeats):
            copies = all_samples[k:k + repeats]
            assert len({i for i, _ in copies}) == 1 and len({s for _, s in copies}) == repeats


@pytest.mark.parametrize("world", [2, 4])
def test_two_rank_resume_arithmetic_covers_each_epoch_once(world):
    """What each rank reads after resuming at step k equals the rest of its epoch, and all ranks
    together read every usable sample of the epoch exactly once."""
    size, batch, accum, steps_done = 100, 3, 2, 3
    for epoch in range(2):
        seen = []
        for rank in range(world):
            full = TrainBatchSampler(size, batch, seed=5, rank=rank, world_size=world)
            full.set_epoch(epoch)
            batches = list(full)
            resumed = TrainBatchSampler(size, batch, seed=5, rank=rank, world_size=world)
            resumed.set_epoch(epoch, start_batch=steps_done * accum)  # as Trainer.train does
            assert list(resumed) == batches[steps_done * accum:]
            seen += [i for b in batches for i, _ in b]
        usable = len(full) * batch * world
        assert len(seen) == len(set(seen)) == usable


@pytest.mark.parametrize("loss, extra", [
    ("none", ()), ("soft", ()), ("hard", ()), ("dkd", ()),
    ("token", ("student.name=deit_tiny_distilled_patch16_224",)),
])
def test_mixup_and_cutmix_work_with_every_loss(tiny_teacher, tmp_path, loss, extra):
    cfg = tiny_config(tiny_teacher, tmp_path / loss, f"distill.loss={loss}", "data.mixup=0.8",
                      "data.cutmix=1.0", "train.label_smoothing=0.1", "train.max_steps=6",
                      *extra)
    trainer = Trainer(cfg)
    assert trainer.preparer.mixup is not None and trainer.task.label_smoothing == 0.0  # once
    seen_targets = []
    original = trainer.task.loss

    def spy(student_out, teacher_logits, targets, epoch, share=None):
        assert share is None  # no transfer set: every sample is labelled
        seen_targets.append(targets)
        return original(student_out, teacher_logits, targets, epoch, share)

    trainer.task.loss = spy
    summary = trainer.train()
    assert summary["steps"] == 6 and is_number(summary["student_top1"])
    assert all(t.shape == (16, 4) and t.dtype == torch.float32 for t in seen_targets)
    torch.testing.assert_close(seen_targets[0].sum(-1), torch.ones(16))


def test_teacher_sees_the_student_crop_resized_to_its_own_size(tiny_teacher, tmp_path):
    """Student at 24 px, teacher (trained at 16 px) gets the same augmented crop at 16 px."""
    cfg = tiny_config(tiny_teacher, tmp_path / "run", "data.image_size=24",
                      "student.kwargs.img_size=24", "teacher.image_size=16", "train.max_steps=2")
    trainer = Trainer(cfg)
    inputs = []
    forward = trainer.teacher.forward
    trainer.teacher.forward = lambda x: (inputs.append(x), forward(x))[1]
    prepare = trainer.task.prepare
    pairs = []
    trainer.task.prepare = lambda images: (pairs.append(images), prepare(images))[1]
    trainer.train(evaluate=False, save=False)
    x_student = trainer.student_norm(pairs[0])
    expected = torch.nn.functional.interpolate(x_student, size=(16, 16), mode="bilinear",
                                               align_corners=False, antialias=True)
    assert inputs[0].shape[-2:] == (16, 16)
    torch.testing.assert_close(inputs[0], expected)


@pytest.fixture(scope="module")
def broken_folder(tmp_path_factory) -> Path:
    """3 classes of 20×20 JPEGs; one file is not an image and one is truncated."""
    root = tmp_path_factory.mktemp("broken")
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("val", 4)):
        for c in range(3):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                pixels = (rng.random((20, 20, 3)) * 80 + c * 80).astype("uint8")
                Image.fromarray(pixels).save(d / f"{i}.jpg")
    (root / "train" / "class1" / "3.jpg").write_bytes(b"not a jpeg")
    good = (root / "train" / "class2" / "4.jpg").read_bytes()
    (root / "train" / "class2" / "4.jpg").write_bytes(good[: len(good) // 2])
    return root


def folder_args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "-c", TINY, "data.name=imagefolder", f"data.root={root}",
            "data.num_classes=3", "data.batch_size=8", "distill.loss=none",
            "teacher.checkpoint=null", f"output_dir={out}", *extra]


def test_unreadable_images_are_skipped_and_counted(broken_folder, tmp_path):
    result = run_kd(*folder_args(broken_folder, tmp_path / "run", "data.num_workers=1"))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    # 2 unreadable files, read once per epoch for 2 epochs (36 images: 4 steps of 8 per epoch
    # cover 32 of them, so a bad file may fall outside the usable part of an epoch)
    assert 1 <= summary["n_bad_samples"] <= 4
    assert "class1/3.jpg" in result.stderr or "class2/4.jpg" in result.stderr
    train_records = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")
                     if "split" not in r]
    counts = [r["n_bad_samples"] for r in train_records]
    assert counts == sorted(counts)  # a running total
    assert counts[-1] == summary["n_bad_samples"]  # the val split is clean


def test_unreadable_image_with_on_error_fail_names_the_file(broken_folder, tmp_path):
    result = run_kd(*folder_args(broken_folder, tmp_path / "run", "data.on_error=fail",
                                 "data.num_workers=1"))
    line = assert_one_line_user_error(result, "data.on_error=fail")
    assert "class1/3.jpg" in line or "class2/4.jpg" in line

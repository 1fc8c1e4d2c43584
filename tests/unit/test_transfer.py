"""Transfer sets (``data.transfer_set``): unlabelled images learnt through the teacher alone."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kd.config import load_config
from kd.core.trainer import Trainer
from kd.data.build import build_split
from kd.data.mix import apply_mixup, build_mixup
from kd.data.transfer import LabelledAndTransfer, labelled_share
from kd.errors import ConfigError, DataError

DEMO = "kd://presets/demo.yaml"


def test_labelled_share_from_indices_and_from_mixed_targets() -> None:
    targets, share = labelled_share(torch.tensor([2, -1, 0]), num_classes=3)
    assert targets.tolist() == [2, 0, 0] and share.tolist() == [1.0, 0.0, 1.0]
    # Mixup over num_classes + 1 classes: the last column is the unlabelled share.
    cfg = load_config(DEMO, ["data.mixup=1.0"]).data
    mixup = build_mixup(cfg, 4, 0.0)  # 3 classes + "unlabelled"
    raw = torch.tensor([0, 3, 1, 3])  # samples 1 and 3 unlabelled
    _, soft = apply_mixup(mixup, torch.rand(4, 1, 8, 8), raw, seed=5)
    targets, share = labelled_share(soft, num_classes=3)
    assert torch.allclose(share, 1 - soft[:, 3])
    assert torch.allclose(targets.sum(-1), torch.ones(4))
    lam = soft[0, 0].item()  # batch mode: sample 0 mixed with sample 3 (flipped): unlabelled
    assert share[0].item() == pytest.approx(lam)


@pytest.fixture(scope="module")
def trainer(tmp_path_factory: pytest.TempPathFactory) -> Trainer:
    out = tmp_path_factory.mktemp("transfer")
    return Trainer(load_config(DEMO, ["data.labels_per_class=5", "data.transfer_set=rest",
                                      f"output_dir={out}", "distill.alpha=0.3"]))


def test_the_split_is_the_labelled_subset_then_the_rest_unlabelled(trainer: Trainer) -> None:
    data = trainer.train_set
    assert isinstance(data, LabelledAndTransfer)
    assert (len(data), data.n_labelled) == (1200, 50)
    targets = data.targets()
    assert (targets[:50] >= 0).all() and (targets[50:] == -1).all()
    assert data[(60, None)][1] == -1 and data[(3, None)][1] >= 0
    labelled = {int(i) for i in data.labelled.indices}
    assert labelled.isdisjoint(int(i) for i in data.transfer.base.indices)


def test_unlabelled_samples_get_the_distillation_term_only(trainer: Trainer) -> None:
    torch.manual_seed(0)
    student = torch.randn(6, 10, requires_grad=True)
    teacher = torch.randn(6, 10)
    targets = torch.tensor([1, 2, 3, 0, 0, 0])
    share = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    terms = trainer.task.loss(student, teacher, targets, 0.0, share)
    # By hand: per sample share*((1-a) ce + a kl) + (1-share) kl, averaged over the batch.
    a, t = 0.3, 4.0
    ce = torch.nn.functional.cross_entropy(student, targets, reduction="none")
    kl = torch.nn.functional.kl_div(torch.log_softmax(student / t, -1),
                                    torch.log_softmax(teacher / t, -1), log_target=True,
                                    reduction="none").sum(-1) * t * t
    want = (share * ((1 - a) * ce + a * kl) + (1 - share) * kl).mean()
    assert terms["loss"].item() == pytest.approx(want.item(), rel=1e-5)
    # An unlabelled sample's "label" has no effect on the loss or its gradient.
    grad = torch.autograd.grad(terms["loss"], student)[0]
    other = trainer.task.loss(student, teacher, torch.tensor([1, 2, 3, 7, 9, 4]), 0.0, share)
    assert torch.equal(torch.autograd.grad(other["loss"], student)[0], grad)
    # All labelled: exactly the usual (1 - a) task + a kd.
    full = trainer.task.loss(student, teacher, targets, 0.0, torch.ones(6))
    assert full["loss"].item() == pytest.approx(((1 - a) * ce + a * kl).mean().item(), rel=1e-5)


def _images(folder: Path, n: int, nested: bool = False) -> None:
    for i in range(n):
        path = folder / (f"sub{i % 2}" if nested else "") / f"img_{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (10, 10), (i * 20, 0, 0)).save(path)


def _shards(folder: Path, n: int) -> None:
    folder.mkdir(parents=True)
    with tarfile.open(folder / "u-0000.tar", "w") as tar:
        for i in range(n):
            buf = io.BytesIO()
            Image.new("RGB", (10, 10), (0, i * 20, 0)).save(buf, format="PNG")
            info = tarfile.TarInfo(f"x{i:03d}.png")
            info.size = len(buf.getvalue())
            tar.addfile(info, io.BytesIO(buf.getvalue()))


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    for split in ("train", "val"):
        for c in range(2):
            _images(root / "labelled" / split / f"c{c}", 4)
    _images(root / "unlabelled", 6, nested=True)
    _shards(root / "shards", 5)
    return root


@pytest.mark.parametrize(("source", "n"), [("unlabelled", 6), ("shards", 5),
                                           ("shards/u-0000.tar", 5)])
def test_transfer_from_a_folder_without_classes_or_unlabelled_shards(folders, source, n,
                                                                      tmp_path) -> None:
    overrides = ["data.name=imagefolder", f"data.root={folders / 'labelled'}",
                 "data.num_classes=2", "data.image_size=8", "data.batch_size=4",
                 "data.num_workers=0", f"data.transfer_set={folders / source}",
                 "teacher.checkpoint=null", "teacher.pretrained=false"]
    data = build_split(load_config(None, overrides).data, "train", 3)
    assert isinstance(data, LabelledAndTransfer) and (len(data), data.n_labelled) == (8 + n, 8)
    assert np.array_equal(data.targets()[8:], np.full(n, -1))
    image, label, _ = data[(8 + n - 1, 11)]
    assert label == -1 and image.shape == (3, 8, 8)


def test_a_run_with_a_transfer_set_and_mixup_trains(tmp_path: Path) -> None:
    trainer = Trainer(load_config(DEMO, [
        "data.labels_per_class=5", "data.transfer_set=rest", "data.mixup=0.8",
        "data.cutmix=1.0", "train.max_steps=4", "train.log_every=2",
        f"output_dir={tmp_path}"]))
    summary = trainer.train()
    assert summary["steps"] == 4 and summary["n_skipped_steps"] == 0
    assert trainer.preparer.mixup.num_classes == 11  # 10 classes + "unlabelled"
    assert (tmp_path / "labelled_subset.json").is_file()


@pytest.mark.parametrize(("overrides", "key"), [
    (["data.labels_per_class=5", "data.transfer_set=rest", "distill.loss=dkd"], "distill.loss"),
    (["data.labels_per_class=5", "data.transfer_set=rest", "distill.loss=none"], "distill.loss"),
    (["data.transfer_set=rest"], "data.transfer_set"),
])
def test_transfer_set_config_errors(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(DEMO, overrides)


def test_a_transfer_path_that_is_nothing_is_a_data_error(tmp_path: Path) -> None:
    cfg = load_config(DEMO, [f"data.transfer_set={tmp_path / 'missing'}"])
    with pytest.raises(DataError, match=r"data\.transfer_set"):
        build_split(cfg.data, "train", 1)
    (tmp_path / "empty").mkdir()
    cfg = load_config(DEMO, [f"data.transfer_set={tmp_path / 'empty'}"])
    with pytest.raises(DataError, match="no images"):
        build_split(cfg.data, "train", 1)

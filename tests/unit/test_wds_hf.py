"""WebDataset shards (``data.name=wds``) and saved Hugging Face datasets (``data.name=hf``)."""

from __future__ import annotations

import gzip
import io
import json
import shutil
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kd.data import TrainBatchSampler, build_dataset, build_train_loader
from kd.data.wds import WdsDataset, expand_braces, expand_shards
from kd.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[2]
PER_SHARD = 4
CORRUPT = ("train-000001.tar", "s1_002")  # an image member that is not an image
UNLABELLED = ("train-000002.tar", "s2_003")  # a sample with no label member


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _image(rng: np.random.Generator, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def write_shard(path: Path, prefix: str, n: int, rng: np.random.Generator) -> None:
    """``n`` samples ``<prefix>_<i>``: JPEG or PNG image, label ``i % 3`` as .cls, .cls.txt or
    .json, and a metadata-only key that is not a sample."""
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            key = f"{prefix}_{i:03d}"
            image = b"not an image" if (path.name, key) == CORRUPT else _image(
                rng, "PNG" if i % 2 else "JPEG")
            _add(tar, f"{key}.{'png' if i % 2 else 'jpg'}", image)
            if (path.name, key) == UNLABELLED:
                continue
            if i == 0:  # metadata without a label: the .cls member still gives the label
                _add(tar, f"{key}.json", json.dumps({"caption": "x"}).encode())
            if i == 1:
                _add(tar, f"{key}.json", json.dumps({"label": i % 3, "caption": "x"}).encode())
            elif i == 2:
                _add(tar, f"{key}.cls.txt", f"{i % 3}\n".encode())
            else:
                _add(tar, f"{key}.cls", str(i % 3).encode())
        _add(tar, "__meta__.json", b"{}")


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 training shards of 4 samples and 1 validation shard of 3."""
    root = tmp_path_factory.mktemp("wds")
    rng = np.random.default_rng(0)
    for s in range(3):
        write_shard(root / f"train-{s:06d}.tar", f"s{s}", PER_SHARD, rng)
    write_shard(root / "val-000000.tar", "val/été", 3, rng)  # a folder and non-ASCII keys
    return root


def wds(split: str = "train", root: Path | str | None = None, num_classes: int = 3,
        augment: bool = True, on_error: str = "skip", **kwargs) -> WdsDataset:
    ds = build_dataset("wds", split, root=None if root is None else str(root), image_size=16,
                       num_classes=num_classes, augment=augment, channels=3, synthetic_size=0,
                       on_error=on_error, **kwargs)
    assert isinstance(ds, WdsDataset)
    return ds


def index_of(ds: WdsDataset, shard: str, key: str) -> int:
    return next(i for i in range(len(ds)) if ds.describe(i).rpartition(".")[0].endswith(
        f"{shard}:{key}"))


# ------------------------------------------------------------------------------------ finding
def test_expand_braces() -> None:
    assert expand_braces("t-{000..002}.tar") == ["t-000.tar", "t-001.tar", "t-002.tar"]
    assert expand_braces("{a,b}/x.tar") == ["a/x.tar", "b/x.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def test_shards_from_root_braces_globs_and_folders(shards: Path, tmp_path: Path) -> None:
    by_root = wds(root=shards)
    assert by_root.shards == [str(shards / f"train-{s:06d}.tar") for s in range(3)]
    assert len(by_root) == 3 * PER_SHARD  # unreadable samples are indexed too (skipped on read)
    assert by_root.n_ignored_keys == 3  # the metadata-only key of each shard
    assert len(wds("val", root=shards)) == 3
    for pattern, root in ((f"{shards}/train-{{000000..000002}}.tar", None),
                          ("train-{000000..000002}.tar", shards),  # relative to data.root
                          (f"{shards}/train-*.tar", None)):
        ds = wds(root=root, train_shards=pattern)
        assert ds.shards == by_root.shards
        assert list(ds.names) == list(by_root.names)
    # A folder as the pattern, and the <root>/<split>/*.tar convention.
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    shutil.copy(shards / "train-000000.tar", tmp_path / "train" / "a.tar")
    shutil.copy(shards / "val-000000.tar", tmp_path / "val" / "b.tar")
    assert len(wds(root=tmp_path)) == PER_SHARD
    assert len(wds("val", root=tmp_path)) == 3
    assert len(wds(val_shards=str(tmp_path / "train"), split="val")) == PER_SHARD


def test_no_shards_is_a_data_error(shards: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nothing matches .*train-\*\.tar"):
        wds(root=tmp_path)
    with pytest.raises(DataError, match="folder not found"):
        wds(root=tmp_path / "missing")
    with pytest.raises(DataError, match=r"no wds shards match '.*nothing-\*\.tar'"):
        wds(train_shards=str(tmp_path / "nothing-*.tar"))
    with pytest.raises(DataError, match=r"shard not found: .*train-000003\.tar"):
        wds(train_shards=f"{shards}/train-{{000000..000003}}.tar")  # the range overshoots
    tarfile.open(tmp_path / "train-000000.tar", "w").close()  # an empty shard
    with pytest.raises(DataError, match="no samples in the wds shards"):
        wds(root=tmp_path)


def test_truncated_or_compressed_shard_is_a_data_error_naming_it(shards: Path,
                                                                 tmp_path: Path) -> None:
    data = (shards / "train-000000.tar").read_bytes()
    (tmp_path / "train-000000.tar").write_bytes(data[:len(data) // 2])
    with pytest.raises(DataError, match=r"train-000000\.tar is not a readable tar file"):
        wds(root=tmp_path)
    (tmp_path / "train-000000.tar").write_bytes(gzip.compress(data))
    with pytest.raises(DataError, match=r"train-000000\.tar is not a readable tar file"):
        wds(root=tmp_path)


# ----------------------------------------------------------------------------------- samples
def test_labels_and_tensors(shards: Path) -> None:
    tr = wds(root=shards)
    skip = {index_of(tr, *CORRUPT), index_of(tr, *UNLABELLED)}
    for i in range(len(tr)):
        if i in skip:
            continue
        image, label, bad = tr[(i, 7)]
        assert (image.dtype, image.shape, bad) == (torch.uint8, (3, 16, 16), [])
        assert label == (i % PER_SHARD) % 3  # written as .cls, .cls.txt and .json
    va = wds("val", root=shards, augment=False)
    image, label, bad = va[2]
    assert (image.dtype, image.shape, label, bad) == (torch.uint8, (3, 16, 16), 2, [])
    assert va.describe(2).endswith("val-000000.tar:val/été_002.jpg")


def test_augmentation_is_a_pure_function_of_the_seed(shards: Path) -> None:
    a, b = wds(root=shards), wds(root=shards)
    torch.manual_seed(0)
    before = torch.rand(1)
    x = a[(4, 123)][0]
    assert torch.equal(x, a[(4, 123)][0])
    assert torch.equal(x, b[(4, 123)][0])  # another instance (another process, a restart)
    assert any(not torch.equal(x, a[(4, s)][0]) for s in (1, 2, 3))
    torch.manual_seed(0)
    assert torch.equal(before, torch.rand(1))  # the caller's generator is restored


def test_loader_workers_give_the_main_process_batches(shards: Path) -> None:
    ds = wds(root=shards)

    def batches(workers: int) -> list:
        loader = build_train_loader(ds, 4, seed=3, rank=0, world_size=1, num_workers=workers,
                                    pin_memory=False)
        loader.batch_sampler.set_epoch(1)
        return list(loader)

    main, workers = batches(0), batches(2)
    assert len(main) == len(workers) == 3
    for (xm, ym, bm), (xw, yw, bw) in zip(main, workers):
        assert torch.equal(xm, xw) and torch.equal(ym, yw) and bm == bw
    sampler = TrainBatchSampler(len(ds), 4, seed=3)
    sampler.set_epoch(1)
    first = next(iter(sampler))  # the same keys, read directly
    assert torch.equal(torch.stack([ds[k][0] for k in first]), main[0][0])
    assert sum(len(b) for _, _, b in main) == 2  # the corrupt and the unlabelled sample


def test_unreadable_member_is_skipped_or_fails_naming_it(shards: Path) -> None:
    tr = wds(root=shards)
    i = index_of(tr, *CORRUPT)
    image, label, bad = tr[(i, 5)]
    assert image.shape == (3, 16, 16)
    assert label == ((i + 1) % PER_SHARD) % 3  # replaced by the next sample
    assert len(bad) == 1 and f"{CORRUPT[0]}:{CORRUPT[1]}.jpg" in bad[0]
    with pytest.raises(DataError, match=rf"cannot read .*{CORRUPT[0]}:{CORRUPT[1]}\.jpg"):
        wds(root=shards, on_error="fail")[(i, 5)]


def test_missing_label_is_unreadable_unless_unlabelled(shards: Path) -> None:
    tr = wds(root=shards)
    i = index_of(tr, *UNLABELLED)
    _, _, bad = tr[(i, 5)]
    assert len(bad) == 1 and UNLABELLED[1] in bad[0] and "no label member" in bad[0]
    with pytest.raises(DataError, match="no label member"):
        wds(root=shards, on_error="fail")[i]
    unlabelled = WdsDataset(expand_shards(f"{shards}/train-*.tar"), image_size=16, train=True,
                            num_classes=3, labels=False)
    image, label, bad = unlabelled[(i, 5)]
    assert (image.shape, label, bad) == ((3, 16, 16), -1, [])
    assert {unlabelled[j][1] for j in range(len(unlabelled)) if j != index_of(tr, *CORRUPT)} \
        == {-1}


def test_label_beyond_num_classes_is_a_data_error(shards: Path) -> None:
    with pytest.raises(DataError, match=r"data.num_classes=2 but .*has label 2; set "
                                        r"data.num_classes to at least 3"):
        wds(root=shards, num_classes=2)


def test_config_accepts_wds_and_hf() -> None:
    from kd.config import load_config

    cfg = load_config(None, ["data.name=wds", "data.train_shards=a-{0..1}.tar",
                             "data.val_shards=b.tar"])
    assert (cfg.data.train_shards, cfg.data.val_shards) == ("a-{0..1}.tar", "b.tar")
    with pytest.raises(ConfigError, match=r"data\.root"):
        load_config(None, ["data.name=wds", "data.train_shards=a.tar"])
    with pytest.raises(ConfigError, match=r"data\.root"):
        load_config(None, ["data.name=hf"])
    assert load_config(None, ["data.name=hf", "data.root=x"]).data.hf_image_key == "image"


@pytest.mark.slow
def test_training_runs_on_wds_shards(shards: Path, tmp_path: Path) -> None:
    from kd.config import load_config
    from kd.core.trainer import Trainer

    cfg = load_config(str(ROOT / "configs" / "tiny.yaml"), [
        "data.name=wds", f"data.root={shards}", "data.num_classes=3", "data.image_size=16",
        "data.batch_size=4", "data.num_workers=0", "distill.loss=none",
        "teacher.checkpoint=null", "student.kwargs.in_chans=3", f"output_dir={tmp_path}",
        "train.epochs=2", "checkpoint.every_steps=0"])
    trainer = Trainer(cfg)
    summary = trainer.train()
    assert summary["steps"] == 6  # 12 samples / batch 4 × 2 epochs
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 6
    assert trainer.total_bad_samples() >= 2  # the corrupt and the unlabelled sample


# ---------------------------------------------------------------------------------------- hf
def test_hf_without_the_package_names_the_extra(monkeypatch: pytest.MonkeyPatch,
                                                tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
    with pytest.raises(DataError, match=r'pip install -e "\.\[hf\]"'):
        build_dataset("hf", "train", root=str(tmp_path), image_size=16, num_classes=3,
                      augment=True, channels=3, synthetic_size=0)


@pytest.fixture(scope="module")
def hf_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(1)
    features = datasets.Features({"img": datasets.Image(),
                                  "label": datasets.ClassLabel(names=["a", "b", "c"]),
                                  "note": datasets.Value("string")})

    def split(n: int, missing: int | None = None) -> datasets.Dataset:
        images = [Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8))
                  for _ in range(n)]
        labels = [-1 if i == missing else i % 3 for i in range(n)]
        return datasets.Dataset.from_dict({"img": images, "label": labels,
                                           "note": ["x"] * n}, features=features)

    root = tmp_path_factory.mktemp("hf")
    datasets.DatasetDict({"train": split(9, missing=4), "validation": split(3)}).save_to_disk(
        str(root))
    return root


def hf(root: Path, split: str = "train", num_classes: int = 3, **kwargs):
    return build_dataset("hf", split, root=str(root), image_size=16, num_classes=num_classes,
                         augment=True, channels=3, synthetic_size=0, hf_image_key="img",
                         **kwargs)


def test_hf_sizes_labels_tensors_and_seeds(hf_root: Path) -> None:
    tr, va = hf(hf_root), hf(hf_root, "val")
    assert (len(tr), len(va)) == (9, 3)
    assert [va[i][1] for i in range(3)] == [0, 1, 2]
    image, label, bad = tr[(2, 11)]
    assert (image.dtype, image.shape, label, bad) == (torch.uint8, (3, 16, 16), 2, [])
    assert torch.equal(image, tr[(2, 11)][0])
    assert torch.equal(image, hf(hf_root)[(2, 11)][0])
    assert any(not torch.equal(image, tr[(2, s)][0]) for s in (1, 2, 3))
    # label -1 (ClassLabel's "no label") makes the sample unreadable: skipped, or a failure.
    _, label, bad = tr[(4, 0)]
    assert label == 5 % 3 and len(bad) == 1 and "no label" in bad[0]
    with pytest.raises(DataError, match="no label"):
        hf(hf_root, on_error="fail")[4]


def test_hf_loader_workers_match_the_main_process(hf_root: Path) -> None:
    ds = hf(hf_root)
    runs = []
    for workers in (0, 2):
        loader = build_train_loader(ds, 3, seed=0, rank=0, world_size=1, num_workers=workers,
                                    pin_memory=False)
        runs.append(list(loader))
    for (xm, ym, _), (xw, yw, _) in zip(*runs):
        assert torch.equal(xm, xw) and torch.equal(ym, yw)


def test_hf_errors_name_the_key_to_fix(hf_root: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data\.num_classes=4 .*ClassLabel with 3 classes"):
        hf(hf_root, num_classes=4)
    with pytest.raises(DataError, match=r"data\.hf_label_key: no column 'target'"):
        hf(hf_root, hf_label_key="target")
    with pytest.raises(DataError, match=r"data\.hf_image_key: column 'note' .* not an Image"):
        build_dataset("hf", "train", root=str(hf_root), image_size=16, num_classes=3,
                      augment=True, channels=3, synthetic_size=0, hf_image_key="note")
    with pytest.raises(DataError, match="no validation or val split"):
        hf(tmp_path, "val")

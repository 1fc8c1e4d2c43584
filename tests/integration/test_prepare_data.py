"""``kd prepare-data``: an image folder of mixed sizes and modes becomes resized WebDataset
shards that kd reads back with their labels, byte for byte the same on every run, resumed
after an interruption; the shards' index files replace the tar scan; user errors end in one
line."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import kd.data.wds as wds_mod
import kd.tools.prepare_data as prepare_mod
from kd.config import load_config
from kd.data import build_dataset
from kd.data.wds import index_path, scan_shard
from kd.tools.prepare_data import PrepareSettings, prepare_data
from tests.integration.conftest import assert_one_line_user_error, kd_cli, train_tiny

pytestmark = pytest.mark.usefixtures("one_thread")

SETTINGS = PrepareSettings(max_side=32, quality=90, shard_samples=3)
# split/class/file: (format, mode, size, extra save arguments); "broken" is a truncated JPEG.
IMAGES = {
    "train/a/big.jpg": ("JPEG", "RGB", (200, 150), {}),  # shrunk, through Image.draft
    "train/a/broken.jpg": ("JPEG", "RGB", (24, 20), {}),  # unreadable: left out
    "train/a/grey.jpg": ("JPEG", "L", (20, 20), {}),
    "train/a/small.jpg": ("JPEG", "RGB", (24, 20), {}),  # copied byte for byte
    "train/b/cmyk.jpg": ("JPEG", "CMYK", (20, 20), {}),
    "train/b/progressive.jpg": ("JPEG", "RGB", (24, 24), {"progressive": True}),
    "train/b/rgba.png": ("PNG", "RGBA", (40, 30), {}),
    "train/b/rotated.jpg": ("JPEG", "RGB", (24, 16), {"exif": "rotate"}),
    "val/a/v.jpg": ("JPEG", "RGB", (64, 64), {}),
    "val/b/v.png": ("PNG", "RGB", (16, 16), {}),
}


def make_image(mode: str, size: tuple[int, int], seed: int) -> Image.Image:
    """A smooth random image (photograph-like enough for JPEG)."""
    rng = np.random.default_rng(seed)
    channels = len(Image.new(mode, (1, 1)).getbands())
    coarse = rng.integers(0, 256, (4, 4, channels), dtype=np.uint8)
    img = Image.fromarray(coarse.squeeze(-1) if channels == 1 else coarse,
                          mode if mode != "CMYK" else None).resize(size, Image.BICUBIC)
    return img if img.mode == mode else img.convert(mode)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("imagefolder")
    for seed, (name, (fmt, mode, size, extra)) in enumerate(IMAGES.items()):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        if extra.get("exif") == "rotate":
            exif = Image.Exif()
            exif[0x0112] = 6
            extra = {"exif": exif}
        make_image(mode, size, seed).save(buf, format=fmt, quality=90, **extra)
        path.write_bytes(buf.getvalue()[:200] if "broken" in name else buf.getvalue())
    return root


def data_config(root: Path, *overrides: str):
    return load_config(None, ["data.name=imagefolder", f"data.root={root}",
                              "data.num_classes=2", *overrides]).data


def prepare(root: Path, out: Path, settings: PrepareSettings = SETTINGS) -> dict:
    return prepare_data(data_config(root), out, settings)


def wds(root: Path, split: str = "train"):
    return build_dataset("wds", split, root=str(root), image_size=16, num_classes=2,
                         augment=False, channels=3, synthetic_size=0)


def hashes(out: Path) -> dict[str, str]:
    """sha256 of every file but the report (which holds timings)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())
            if p.name != "prepare.json"}


@pytest.fixture(scope="module")
def prepared(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("prepared")
    return out, prepare(folder, out)


def test_shards_hold_the_split_resized_with_labels(folder: Path, prepared: tuple[Path, dict],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    out, report = prepared
    assert sorted(p.name for p in out.glob("*.tar")) == [
        "train-000000.tar", "train-000001.tar", "train-000002.tar", "val-000000.tar"]
    train = report["splits"]["train"]
    assert (train["samples"], train["unreadable"], train["shards"]) == (7, 1, 3)
    assert (train["copied"], train["resized"], train["converted"]) == (1, 2, 4)
    assert train["mean_size_before"][0] > train["mean_size_after"][0]
    assert report["decode"]["images"] == 9 and report["decode"]["speedup"] > 0
    assert json.loads((out / "prepare.json").read_text())["splits"] == report["splits"]

    def no_scan(*args, **kwargs):
        raise AssertionError("scanned a shard that has an index file")

    monkeypatch.setattr(wds_mod, "scan_shard", no_scan)
    ds = wds(out)
    assert ds.n_index_files == 3
    # the split's order, without the unreadable image; labels from the class folders
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1, 1]
    assert len(wds(out, "val")) == 2
    sources = [s for p in sorted(out.glob("train-*.tar"))
               for s in json.loads(index_path(p).read_text())["sources"]]
    assert sources == ["a/big.jpg", "a/grey.jpg", "a/small.jpg", "b/cmyk.jpg",
                       "b/progressive.jpg", "b/rgba.png", "b/rotated.jpg"]
    for i, source in enumerate(sources):
        data = ds.read_bytes(i)
        with Image.open(io.BytesIO(data)) as img:
            assert img.format == "JPEG" and img.mode == "RGB" and max(img.size) <= 32, source
            assert not img.info.get("progressive") and 0x0112 not in img.getexif(), source
            if source == "a/big.jpg":
                assert img.size == (32, 24)
        if source == "a/small.jpg":
            assert data == (folder / "train" / source).read_bytes()
    image, label, bad = ds[(0, None)]
    assert tuple(image.shape) == (3, 16, 16) and label == 0 and not bad


def test_index_matches_the_scan_and_a_stale_one_falls_back(prepared: tuple[Path, dict],
                                                           tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture
                                                           ) -> None:
    out, _ = prepared
    for shard in out.glob("*.tar"):
        from_file, scanned = wds_mod.read_shard_index(shard), scan_shard(shard)
        assert (from_file.names, from_file.offsets, from_file.sizes, from_file.labels) == \
            (scanned.names, scanned.offsets, scanned.sizes, scanned.labels)
    copy = tmp_path / "copy"
    copy.mkdir()
    for p in out.glob("train-*"):
        copy.joinpath(p.name).write_bytes(p.read_bytes())
    stale = json.loads(index_path(copy / "train-000000.tar").read_text())
    stale["bytes"] += 512  # the shard it describes had another size
    index_path(copy / "train-000000.tar").write_text(json.dumps(stale))
    index_path(copy / "train-000001.tar").write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="kd"):
        ds = wds(copy)
    assert ds.n_index_files == 1 and ds.labels.tolist() == wds(out).labels.tolist()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "2 shard index file(s)" in warnings[0].getMessage()
    assert "stale" in warnings[0].getMessage()


def test_reruns_are_byte_identical_and_an_interrupted_run_resumes(
        folder: Path, prepared: tuple[Path, dict], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    reference = hashes(prepared[0])
    out = tmp_path / "out"
    calls = {"n": 0}
    prepare_image = prepare_mod.prepare_image

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # inside the second shard
            raise KeyboardInterrupt
        return prepare_image(*args, **kwargs)

    monkeypatch.setattr(prepare_mod, "prepare_image", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare(folder, out)
    monkeypatch.undo()
    # only the complete first shard and its index: no half-written shard, no temporary
    assert sorted(p.name for p in out.iterdir()) == ["train-000000.tar",
                                                     "train-000000.tar.idx.json"]
    (out / ".train-000001.tar.partial").write_bytes(b"left by a killed run")
    report = prepare(folder, out)
    assert (report["shards_kept"], report["shards_written"]) == (1, 3)
    assert hashes(out) == reference
    # a shard that no longer matches its index is made again; the others are kept
    (out / "val-000000.tar").write_bytes(b"\0" * 1024)
    report = prepare(folder, out)
    assert (report["shards_kept"], report["shards_written"]) == (3, 1)
    assert hashes(out) == reference
    # fewer, larger shards: the old numbers beyond the new count are deleted
    prepare(folder, out, PrepareSettings(max_side=32, shard_samples=8))
    assert sorted(p.name for p in out.glob("*.tar")) == ["train-000000.tar", "val-000000.tar"]


def test_prepared_shards_as_input_are_copied_unchanged(prepared: tuple[Path, dict],
                                                       tmp_path: Path) -> None:
    """A wds source: every image is already a small baseline JPEG, so every one is copied."""
    out, _ = prepared
    cfg = load_config(None, ["data.name=wds", f"data.root={out}", "data.num_classes=2"]).data
    report = prepare_data(cfg, tmp_path / "again", SETTINGS)
    assert report["splits"]["train"]["copied"] == 7 == report["splits"]["train"]["samples"]
    before, after = wds(out), wds(tmp_path / "again")
    assert after.labels.tolist() == before.labels.tolist()
    assert [after.read_bytes(i) for i in range(7)] == [before.read_bytes(i) for i in range(7)]


def test_hf_source(tmp_path: Path) -> None:
    """A saved Hugging Face dataset: its encoded images and class labels, in row order."""
    datasets = pytest.importorskip("datasets")

    def png(seed: int) -> dict:
        buf = io.BytesIO()
        make_image("RGB", (48, 40), seed).save(buf, format="PNG")
        return {"bytes": buf.getvalue(), "path": None}

    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=["a", "b"])})
    datasets.DatasetDict({split: datasets.Dataset.from_dict(
        {"image": [png(i) for i in range(3)], "label": [1, 0, 1]}, features=features)
        for split in ("train", "validation")}).save_to_disk(str(tmp_path / "hf"))
    cfg = load_config(None, ["data.name=hf", f"data.root={tmp_path / 'hf'}",
                             "data.num_classes=2"]).data
    report = prepare_data(cfg, tmp_path / "out", SETTINGS)
    assert report["splits"]["val"]["resized"] == 3
    assert wds(tmp_path / "out", "val").labels.tolist() == [1, 0, 1]


def test_training_reads_prepared_shards(prepared: tuple[Path, dict], tmp_path: Path) -> None:
    run = train_tiny(None, tmp_path / "run", "distill.loss=none", "data.name=wds",
                     f"data.root={prepared[0]}", "data.num_classes=2", "data.batch_size=4",
                     "train.epochs=1", "checkpoint.every_steps=0")
    assert run.train_records and np.isfinite(run.train_records[-1]["loss"])


def test_user_error_is_one_line_and_writes_nothing(folder: Path, tmp_path: Path) -> None:
    """The real command, in a subprocess: exit code 2, one line, no output folder."""
    out = tmp_path / "out"
    result = kd_cli("prepare-data", "data.name=imagefolder", f"data.root={folder}",
                    "data.num_classes=2", "--out", str(out), "--max-side", "16")
    assert_one_line_user_error(result, "--max-side 16", "at least 32")
    assert not out.exists()


@pytest.mark.parametrize(("args", "mention"), [
    (["--splits", "train,test"], "unknown split 'test'"),
    (["--shard-samples", "0"], "--shard-samples 0"),
    (["data.num_classes=3"], "data.num_classes=2"),
    (["data.name=synthetic"], "data.name=synthetic"),
    (["data.nme=x"], "data.name"),
])
def test_user_errors_name_the_fix(folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                  args: list[str], mention: str) -> None:
    from kd.cli import main

    out = tmp_path / "out"
    rc = main(["prepare-data", "-c", str(write_config(folder, tmp_path)), "--out", str(out),
               *args])
    captured = capsys.readouterr()
    assert_one_line_user_error(subprocess.CompletedProcess([], rc, captured.out, captured.err),
                               mention)
    assert not out.exists()


def test_unwritable_out_is_one_line(folder: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture) -> None:
    from kd.cli import main

    (tmp_path / "file").write_text("")
    rc = main(["prepare-data", "-c", str(write_config(folder, tmp_path)), "--out",
               str(tmp_path / "file" / "out")])
    captured = capsys.readouterr()
    assert_one_line_user_error(subprocess.CompletedProcess([], rc, captured.out, captured.err),
                               "--out", "set --out to another path")


def write_config(folder: Path, tmp_path: Path) -> Path:
    path = tmp_path / "data.yaml"
    path.write_text(f"data: {{name: imagefolder, root: {folder}, num_classes: 2}}\n")
    return path

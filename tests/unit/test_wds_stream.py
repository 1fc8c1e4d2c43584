"""Streamed WebDataset shards (``data.stream=true``): shard split, shuffle buffer, exact resume."""

from __future__ import annotations

import io
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kd.data import build_train_loader
from kd.data import stream as stream_mod
from kd.data.stream import StreamBatchSampler, WdsStreamDataset, check_complete, count_samples
from kd.errors import DataError

CORRUPT_KEY = "s3_004"


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shard(path: Path, shard: int, n: int, corrupt: str | None = None) -> None:
    """``n`` samples ``s<shard>_<i>``; each image's top-left pixel encodes (shard, i)."""
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            key = f"s{shard}_{i:03d}"
            pixels = np.full((8, 8, 3), 0, dtype=np.uint8)
            pixels[..., 0], pixels[..., 1] = shard * 10, i * 10
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, format="PNG")
            _add(tar, f"{key}.png", b"garbage" if key == corrupt else buf.getvalue())
            _add(tar, f"{key}.cls", str((shard + i) % 3).encode())


def make_shards(root: Path, sizes: list[int], corrupt: str | None = None) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for s, n in enumerate(sizes):
        paths.append(root / f"train-{s:04d}.tar")
        write_shard(paths[-1], s, n, corrupt)
    return paths


def dataset(paths: list[Path], buffer: int = 4, seed: int = 0, on_error: str = "skip",
            augment: bool = False, **kwargs) -> WdsStreamDataset:
    return WdsStreamDataset(paths, image_size=8, train=augment, num_classes=3, seed=seed,
                            buffer_size=buffer, on_error=on_error, **kwargs)


def ids(images: torch.Tensor) -> list[tuple[int, int]]:
    """(shard, sample) of each image in a batch, read back from the encoded pixel."""
    return [(round(float(im[0, 0, 0]) * 255 / 10), round(float(im[1, 0, 0]) * 255 / 10))
            for im in images.float() / (255 if images.dtype == torch.uint8 else 1)]


def epoch_ids(ds: WdsStreamDataset, epoch: int, batch: int, world: int, slots: int
              ) -> list[list[list[tuple[int, int]]]]:
    """Per rank, per batch: the samples an epoch reads (in this process, no workers)."""
    out = []
    for rank in range(world):
        sampler = StreamBatchSampler(len(ds), batch, rank, world, slots)
        sampler.set_epoch(epoch)
        out.append([ids(torch.stack([s[0] for s in ds.__getitems__(keys)])) for keys in sampler])
    return out


def test_every_sample_once_per_epoch_across_ranks_and_readers(tmp_path: Path) -> None:
    ds = dataset(make_shards(tmp_path, [6] * 8))
    assert len(ds) == 48
    orders = []
    for epoch in (0, 1):
        per_rank = epoch_ids(ds, epoch, batch=4, world=2, slots=2)
        assert [len(r) for r in per_rank] == [6, 6]  # equal steps on every rank
        seen = [x for r in per_rank for b in r for x in b]
        assert sorted(seen) == [(s, i) for s in range(8) for i in range(6)]
        orders.append(seen)
    assert orders[0] != orders[1]  # a new shard split and shuffle each epoch


def test_shuffle_buffer_mixes_within_a_reader(tmp_path: Path) -> None:
    paths = make_shards(tmp_path, [8])
    in_file_order = [(0, i) for i in range(8)]
    plain = epoch_ids(dataset(paths, buffer=1), 0, batch=8, world=1, slots=1)[0][0]
    assert plain == in_file_order
    mixed = epoch_ids(dataset(paths, buffer=4), 0, batch=8, world=1, slots=1)[0][0]
    assert sorted(mixed) == in_file_order and mixed != in_file_order


def test_fewer_shards_than_readers_split_by_sample(tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    paths = make_shards(tmp_path, [8, 8])
    ds = dataset(paths)
    per_rank = epoch_ids(ds, 0, batch=2, world=2, slots=2)  # 4 readers, 2 shards
    seen = [x for r in per_rank for b in r for x in b]
    assert sorted(seen) == [(s, i) for s in range(2) for i in range(8)]
    with caplog.at_level(logging.WARNING, logger="kd"):
        build_train_loader(ds, 2, 0, 0, 2, 2, False)
    assert "2 shards for 4 readers" in caplog.text


def test_uneven_shards_keep_ranks_in_step_with_another_pass(tmp_path: Path) -> None:
    ds = dataset(make_shards(tmp_path, [9, 1, 5, 1]))  # 16 samples, very uneven
    per_rank = epoch_ids(ds, 0, batch=2, world=2, slots=1)
    assert [len(r) for r in per_rank] == [4, 4]
    seen = [x for r in per_rank for b in r for x in b]
    assert len(seen) == 16 and len(set(seen)) >= 8  # a short reader starts another pass


@pytest.mark.parametrize(("workers", "resume_workers"), [(0, 0), (2, 2), (2, 1)])
def test_mid_epoch_resume_continues_with_the_same_batches(tmp_path: Path, workers: int,
                                                          resume_workers: int) -> None:
    paths = make_shards(tmp_path, [6] * 4)

    def batches(start: int, num_workers: int) -> list[torch.Tensor]:
        ds = dataset(paths, seed=7, augment=True)  # a fresh dataset: a restarted process
        loader = build_train_loader(ds, 3, 7, 0, 1, num_workers, False,
                                    stream_slots=max(1, workers))
        loader.batch_sampler.set_epoch(1, start_batch=start)
        return [images for images, _, _ in loader]

    straight = batches(0, workers)
    assert len(straight) == 8
    resumed = batches(5, resume_workers)
    assert len(resumed) == 3
    for a, b in zip(straight[5:], resumed, strict=True):
        assert torch.equal(a, b)


def test_unreadable_sample_is_replaced_within_its_batch_and_counted(tmp_path: Path) -> None:
    paths = make_shards(tmp_path, [6] * 4, corrupt=CORRUPT_KEY)
    ds = dataset(paths)
    sampler = StreamBatchSampler(len(ds), 4, 0, 1, 1)
    bad, n = [], 0
    for keys in sampler:
        batch = ds.__getitems__(keys)
        assert len(batch) == 4
        bad += [b for s in batch for b in s[2]]
        n += 1
    assert n == 6
    assert len(bad) == 1 and f"train-0003.tar:{CORRUPT_KEY}" in bad[0]
    with pytest.raises(DataError, match=CORRUPT_KEY):
        for keys in sampler:
            dataset(paths, on_error="fail").__getitems__(keys)


def test_label_beyond_num_classes_is_a_data_error(tmp_path: Path) -> None:
    paths = make_shards(tmp_path, [4])
    ds = WdsStreamDataset(paths, image_size=8, train=False, num_classes=2, seed=0, buffer_size=1)
    with pytest.raises(DataError, match=r"data\.num_classes=2"):
        ds.__getitems__([(0, 1, 0, i) for i in range(4)])


def test_truncated_shard_is_a_data_error_at_start(tmp_path: Path) -> None:
    paths = make_shards(tmp_path, [4, 4])
    check_complete(paths[0])
    data = paths[1].read_bytes()
    # Cut between two members (a multiple of 512 bytes) and cut mid-block: both caught.
    for cut in (3 * tarfile.BLOCKSIZE, len(data) // 2 + 7):
        paths[1].write_bytes(data[:cut])
        with pytest.raises(DataError, match=r"train-0001\.tar.*not a complete tar"):
            dataset(paths)


def test_damaged_shard_ends_that_shard_or_fails(tmp_path: Path) -> None:
    paths = make_shards(tmp_path, [4, 4])
    data = bytearray(paths[1].read_bytes())
    header = 4 * tarfile.BLOCKSIZE  # the second sample's image header
    data[header:header + tarfile.BLOCKSIZE] = b"\x07" * tarfile.BLOCKSIZE
    paths[1].write_bytes(bytes(data))
    ds = dataset(paths, num_samples=8)
    batch = ds.__getitems__([(0, 1, 0, i) for i in range(8)])
    assert any("train-0001.tar: damaged part-way" in b for b in batch[0][2])
    with pytest.raises(DataError, match="damaged part-way"):
        dataset(paths, on_error="fail", num_samples=8).__getitems__(
            [(0, 1, 0, i) for i in range(8)])


def test_sample_counts_are_cached_by_path_size_and_mtime(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    paths = make_shards(tmp_path / "s", [3, 5])
    assert count_samples(paths) == 8

    def no_scan(*args, **kwargs):
        raise AssertionError("scanned again")

    monkeypatch.setattr(stream_mod, "scan_shard", no_scan)
    assert count_samples(paths) == 8
    write_shard(paths[1], 1, 2)  # the shard changed: counted again
    monkeypatch.undo()
    assert count_samples(paths) == 5
    assert dataset(paths, num_samples=100).num_samples == 100  # data.train_samples wins


def test_config_checks() -> None:
    from kd.config import load_config
    from kd.errors import ConfigError

    with pytest.raises(ConfigError, match=r"data\.stream"):
        load_config(None, ["data.name=digits", "data.num_classes=10", "data.stream=true"])
    with pytest.raises(ConfigError, match=r"data\.shuffle_buffer"):
        load_config(None, ["data.name=wds", "data.root=x", "data.stream=true",
                           "data.shuffle_buffer=0"])


class Killed(Exception):
    """Stands in for a SIGKILL between two steps."""


def test_streamed_training_resumes_bit_identically_with_other_workers(tmp_path: Path) -> None:
    """Killed mid-epoch with 2 workers; resumed with none: the checkpoint's 2 readers are kept
    and the final student equals an uninterrupted run's."""
    from safetensors.torch import load_file

    from kd.config import load_config
    from kd.core.trainer import Trainer

    root = tmp_path / "shards"
    make_shards(root, [6] * 6)

    def config(out: str, workers: int) -> object:
        return load_config(str(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"), [
            "data.name=wds", f"data.root={root}", "data.val_shards=train-0000.tar",
            "data.stream=true", "data.shuffle_buffer=5", "data.num_classes=3",
            "data.image_size=8", "student.kwargs.img_size=8", "student.kwargs.patch_size=4",
            "data.batch_size=4", f"data.num_workers={workers}", "distill.loss=none",
            "teacher.checkpoint=null", f"output_dir={tmp_path / out}", "train.epochs=2",
            "checkpoint.every_steps=3", "train.log_every=1"])

    straight = Trainer(config("a", 2))
    assert straight.steps_per_epoch == 9  # 36 samples / batch 4
    straight.train()

    def kill_at_5(t: Trainer) -> None:
        if t.step == 5:
            raise Killed

    with pytest.raises(Killed):
        Trainer(config("b", 2)).train(on_step=kill_at_5)
    resumed = Trainer(config("b", 0))
    assert resumed.step == 3 and resumed.train_loader.batch_sampler.slots == 2
    resumed.train()
    a = load_file(str(tmp_path / "a" / "student.safetensors"))
    b = load_file(str(tmp_path / "b" / "student.safetensors"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)

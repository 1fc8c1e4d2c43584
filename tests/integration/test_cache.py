"""Training from a teacher-output cache (``kd cache-teacher``, ``distill.teacher_cache``): it
reproduces the live-teacher run, replays the exact augmented and mixed images, resumes an
interrupted build, and refuses caches that do not fit the run."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from kd.core.dist import single_process
from kd.core.teacher_cache import shard_name
from kd.core.trainer import Trainer
from kd.tools.cache_builder import build_cache
from tests.conftest import TINY
from tests.integration.conftest import (
    assert_one_line_user_error,
    kd_cli,
    replayed_batches,
    tiny_config,
    train_tiny,
)

pytestmark = pytest.mark.usefixtures("one_thread")

MIX = ("data.mixup=0.8", "data.cutmix=1.0", "data.mixup_switch_prob=0.5")
STEPWISE = ("train.log_every=1", "checkpoint.every_steps=0", "train.eval_every_epochs=2")


def cli_train(teacher: str, out: Path, *overrides: str):
    from tests.conftest import TINY

    return kd_cli("train", "-c", TINY, f"teacher.checkpoint={teacher}", f"output_dir={out}",
                  *overrides)


def make_cache(teacher: str, out: Path, *overrides: str, epochs: int = 2,
               top_k: int = 4) -> dict:
    cfg = tiny_config(teacher, out.parent / f"{out.name}_cfg", *overrides)
    manifest = build_cache(cfg, single_process(cfg.train.device), epochs, top_k, out)
    assert manifest is not None
    return manifest


def losses(run) -> list[tuple[float, float, float]]:
    return [(r["loss"], r["loss_task"], r["loss_kd"]) for r in run.train_records]


def assert_close_runs(live, cached, rtol: float = 2e-3, atol: float = 2e-3) -> None:
    """Step by step the same loss terms within fp16 rounding of the teacher's logits, and
    students within tolerance at the end."""
    a, b = losses(live), losses(cached)
    assert len(a) == len(b) > 1
    for step, (x, y) in enumerate(zip(a, b, strict=True), start=1):
        assert y == pytest.approx(x, rel=rtol, abs=1e-4), f"step {step}: {x} vs {y}"
    wa, wb = live.weights, cached.weights
    assert sorted(wa) == sorted(wb)
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst < atol, worst


@pytest.mark.parametrize("extra", [(), MIX, ("data.repeated_aug=3", "train.max_steps=20")],
                         ids=["plain", "mixup-cutmix", "repeated-aug"])
def test_cached_run_reproduces_live_run_step_by_step(tiny_teacher: str, tmp_path: Path,
                                                     extra: tuple[str, ...]) -> None:
    """With data.repeated_aug every copy of an image has its own augmentation and row, so a
    cache keyed by image alone would give copies the wrong teacher outputs."""
    manifest = make_cache(tiny_teacher, tmp_path / "cache", *extra)  # K = 4 = every class
    assert manifest["top_k"] == 4 and manifest["epochs"] == 2
    live = train_tiny(tiny_teacher, tmp_path / "live", *extra, *STEPWISE)
    cached = train_tiny(tiny_teacher, tmp_path / "cached", *extra, *STEPWISE,
                        f"distill.teacher_cache={tmp_path / 'cache'}")
    assert_close_runs(live, cached)
    assert cached.summary["teacher_top1"] is None  # the teacher was never built
    assert cached.summary["student_top1"] == pytest.approx(live.summary["student_top1"],
                                                           abs=1 / 32)


def test_cache_serves_another_batch_size_without_mixing(tiny_teacher: str,
                                                         tmp_path: Path) -> None:
    """Rows are keyed by sample index: a cache built with batch 16 serves a run with batch 32."""
    make_cache(tiny_teacher, tmp_path / "cache", "data.batch_size=16")
    live = train_tiny(tiny_teacher, tmp_path / "live", "data.batch_size=32", *STEPWISE)
    cached = train_tiny(tiny_teacher, tmp_path / "cached", "data.batch_size=32", *STEPWISE,
                        f"distill.teacher_cache={tmp_path / 'cache'}")
    assert_close_runs(live, cached)


def test_replayed_images_equal_the_images_the_teacher_saw(tiny_teacher: str,
                                                          tmp_path: Path) -> None:
    """The student's augmented, mixed batches in a cached run are bit-identical to the batches
    the cache builder ran the teacher on (tiny.yaml: same normalisation for both models)."""
    written, seen = replayed_batches(tiny_teacher, tmp_path, *MIX)
    assert len(seen) == len(written) == 8
    for b, (x, y) in enumerate(zip(written, seen, strict=True)):
        assert torch.equal(x, y), f"batch {b} differs"


def test_sparse_top_k_trains_and_hard_kd_matches_the_live_teacher(tiny_teacher: str,
                                                                   tmp_path: Path) -> None:
    make_cache(tiny_teacher, tmp_path / "cache", top_k=1)
    # Hard KD only needs the argmax: K = 1 gives the live run's losses.
    live = train_tiny(tiny_teacher, tmp_path / "live", "distill.loss=hard", *STEPWISE)
    cached = train_tiny(tiny_teacher, tmp_path / "hard", "distill.loss=hard", *STEPWISE,
                        f"distill.teacher_cache={tmp_path / 'cache'}")
    assert_close_runs(live, cached, rtol=1e-5, atol=1e-5)
    # Soft KD on a top-1 cache: the rest of the mass is spread evenly; it trains.
    soft = train_tiny(tiny_teacher, tmp_path / "soft", *STEPWISE,
                      f"distill.teacher_cache={tmp_path / 'cache'}")
    assert all(torch.isfinite(torch.tensor(t)).all() for t in losses(soft))


def test_more_epochs_than_cached_is_an_error_or_cycles(tiny_teacher: str,
                                                       tmp_path: Path) -> None:
    make_cache(tiny_teacher, tmp_path / "cache", epochs=1)
    cache = f"distill.teacher_cache={tmp_path / 'cache'}"
    result = cli_train(tiny_teacher, tmp_path / "err", cache)
    assert_one_line_user_error(result, "training runs 2 epochs", "holds 1",
                               "distill.cache_cycle=true")
    assert not (tmp_path / "err").exists()
    cycled = train_tiny(tiny_teacher, tmp_path / "cycled", cache, "distill.cache_cycle=true",
                        *STEPWISE)
    assert cycled.summary["steps"] == 16
    # Epoch 1 replayed cached epoch 0: the same data order and augmentation.
    trainer = Trainer(tiny_config(tiny_teacher, tmp_path / "t", cache, "distill.cache_cycle=true"))
    assert [trainer.data_epoch(e) for e in range(3)] == [0, 0, 0]
    sampler = trainer.train_loader.batch_sampler
    sampler.set_epoch(trainer.data_epoch(1))
    assert list(sampler) == list(Trainer(tiny_config(
        tiny_teacher, tmp_path / "t0", cache, "distill.cache_cycle=true")).train_loader
        .batch_sampler)


def test_transfer_set_trains_from_the_cache(tiny_teacher: str, tmp_path: Path) -> None:
    few = ("data.labels_per_class=8", "data.transfer_set=rest", *MIX)
    make_cache(tiny_teacher, tmp_path / "cache", *few)
    live = train_tiny(tiny_teacher, tmp_path / "live", *few, *STEPWISE)
    cached = train_tiny(tiny_teacher, tmp_path / "cached", *few, *STEPWISE,
                        f"distill.teacher_cache={tmp_path / 'cache'}")
    assert_close_runs(live, cached)


def test_interrupted_build_resumes_without_redoing_finished_shards(
        tiny_teacher: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "cache"
    first = make_cache(tiny_teacher, out)
    sums = {s["file"]: s["sha256"] for s in first["shards"]}
    # As if killed while writing epoch 1: its shard half-written under a temporary name, no
    # record, no manifest.
    (out / shard_name(1, 0)).rename(out / f".{shard_name(1, 0)}.tmp123")
    (out / shard_name(1, 0)).with_suffix(".json").unlink()
    (out / "manifest.json").unlink()
    kept = (out / shard_name(0, 0)).stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="kd"):
        again = make_cache(tiny_teacher, out, epochs=3)  # and one epoch more
    assert "2 of 3 epochs to compute" in caplog.text
    assert (out / shard_name(0, 0)).stat().st_mtime_ns == kept
    assert not list(out.glob(".*"))
    redone = {s["file"]: s["sha256"] for s in again["shards"]}
    assert {k: redone[k] for k in sums} == sums  # deterministic: the same bytes again
    assert len(redone) == 3


# ------------------------------------------------------------------ refusals (exit code 2)
@pytest.fixture(scope="module")
def built(tiny_teacher: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("built") / "cache"
    make_cache(tiny_teacher, out, epochs=2)
    return out


@pytest.mark.parametrize(("override", "names"), [
    ("data.image_size=32", "data.image_size: the cache has 16, this run 32"),
    ("data.hflip=0.2", "data.hflip: the cache has 0.5, this run 0.2"),
    ("seed=7", "seed: the cache has 0, this run 7"),
    ("teacher.kwargs.depth=2", "teacher.kwargs"),
    ("data.synthetic_size=96", "dataset size: the cache has 128, this run 96"),
    ("data.repeated_aug=2", "data.repeated_aug: the cache has null, this run 2"),
    ("distill.cache_top_k=2", "distill.cache_top_k=2 but"),
])
def test_a_cache_for_another_config_is_refused(tiny_teacher: str, built: Path, tmp_path: Path,
                                               override: str, names: str) -> None:
    result = cli_train(tiny_teacher, tmp_path / "run", f"distill.teacher_cache={built}",
                       override, "student.kwargs.img_size=32" if "image_size" in override
                       else "train.log_every=2")
    assert_one_line_user_error(result, names)
    assert not (tmp_path / "run").exists()


def test_mixing_needs_the_batches_the_cache_recorded(tiny_teacher: str, tmp_path: Path) -> None:
    make_cache(tiny_teacher, tmp_path / "cache", *MIX)
    result = cli_train(tiny_teacher, tmp_path / "run", *MIX, "data.batch_size=8",
                       f"distill.teacher_cache={tmp_path / 'cache'}")
    assert_one_line_user_error(result, "data.batch_size: the cache has 16, this run 8")


@pytest.mark.parametrize("damage", ["missing", "truncated", "corrupt", "manifest", "unfinished"])
def test_a_damaged_cache_names_the_file(tiny_teacher: str, built: Path, tmp_path: Path,
                                        damage: str) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(built, cache)
    shard = cache / shard_name(0, 0)
    if damage == "missing":
        shard.unlink()
    elif damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:-10])
    elif damage == "corrupt":  # same size, one byte flipped near the end (in the rows)
        data = bytearray(shard.read_bytes())
        data[-3] ^= 0xFF
        shard.write_bytes(bytes(data))
    elif damage == "manifest":
        (cache / "manifest.json").write_text("{not json")
    else:
        (cache / "manifest.json").unlink()
    result = cli_train(tiny_teacher, tmp_path / "run", f"distill.teacher_cache={cache}")
    expected = {"missing": f"shard {shard} is missing", "truncated": f"shard {shard} has",
                "corrupt": f"shard {shard} is corrupt", "manifest": "manifest.json is not",
                "unfinished": "an unfinished build"}[damage]
    assert_one_line_user_error(result, expected)
    assert not (tmp_path / "run").exists()


def test_cache_teacher_command(tiny_teacher: str, tmp_path: Path) -> None:
    from tests.conftest import TINY

    out = tmp_path / "cache"
    args = ("cache-teacher", "-c", TINY, f"teacher.checkpoint={tiny_teacher}", "--epochs", "2",
            "--top-k", "3", "--out", str(out))
    result = kd_cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    # The storage estimate comes before the work.
    assert "128 images x 2 epochs x 24 bytes (top-3 of 4 classes) = 6.14 KB" in result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rows"] == 256 and manifest["top_k"] == 3 and manifest["row_bytes"] == 24
    assert manifest["fields"]["teacher.checkpoint"] == tiny_teacher
    assert len(manifest["teacher_sha256"]) == 64
    assert "distill.teacher_cache=" in result.stdout
    # Resuming a finished build with other settings is refused; with the same, nothing to do.
    other = kd_cli(*args[:-4], "--top-k", "2", "--out", str(out))
    assert_one_line_user_error(other, "--top-k: the cache has 3, this run 2")
    same = kd_cli(*args)
    assert same.returncode == 0 and "0 of 2 epochs to compute" in same.stderr
    # No teacher: nothing to cache.
    none = kd_cli("cache-teacher", "-c", TINY, "--out", str(tmp_path / "none"))
    assert_one_line_user_error(none, "needs a teacher")
    assert not (tmp_path / "none").exists()


def test_the_cache_is_tied_to_the_teachers_weights(tiny_teacher: str, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    teacher = tmp_path / "teacher.safetensors"
    shutil.copy(tiny_teacher, teacher)
    make_cache(str(teacher), tmp_path / "cache")
    # Retrained weights under the same file name: neither a resumed build nor training may mix
    # them with the cached outputs.
    weights = load_file(str(teacher))
    save_file({k: v + 0.01 for k, v in weights.items()}, str(teacher))
    cache = ("--out", str(tmp_path / "cache"))
    resumed = kd_cli("cache-teacher", "-c", str(TINY), f"teacher.checkpoint={teacher}",
                     "--epochs", "2", "--top-k", "4", *cache)
    assert_one_line_user_error(resumed, "teacher.checkpoint sha256")
    train = cli_train(str(teacher), tmp_path / "run", f"distill.teacher_cache={tmp_path}/cache")
    assert_one_line_user_error(train, "teacher.checkpoint sha256")
    # Where the teacher's file is not (the usual case for a cached run), nothing is compared.
    teacher.unlink()
    run = train_tiny(str(teacher), tmp_path / "away", f"distill.teacher_cache={tmp_path}/cache")
    assert run.summary["steps"] == 16


def test_eval_of_a_cached_run_needs_no_cache(tiny_teacher: str, tmp_path: Path) -> None:
    make_cache(tiny_teacher, tmp_path / "cache")
    run = train_tiny(tiny_teacher, tmp_path / "run", f"distill.teacher_cache={tmp_path}/cache")
    shutil.rmtree(tmp_path / "cache")
    result = kd_cli("eval", "--checkpoint", str(run.checkpoint(16)))
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads((run.dir / "eval.json").read_text())
    assert record["student_top1"] == pytest.approx(run.summary["student_top1"])
    assert record["teacher_top1"] is not None  # the teacher's weights are here: evaluated too

"""``kd tune-loader`` on a tiny generated JPEG ImageFolder: the structure of what it prints and
writes, and the bounds of its recommendation (never timings)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kd.cli import main
from tests.conftest import TINY, run_kd
from tests.integration.conftest import assert_one_line_user_error

COLUMNS = ("workers", "prefetch", "images/s", "per core", "CPU %", "wait/batch (ms)")
RECOMMENDED = re.compile(r"^recommended: data\.num_workers=(\d+)(?: data\.prefetch_factor=(\d+))?$",
                         re.MULTILINE)


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes × 8 JPEGs of 32 px in train/ and val/."""
    root = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(3):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(8):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)
    return root


def data_args(root: Path) -> list[str]:
    return ["-c", TINY, "data.name=imagefolder", f"data.root={root}", "data.num_classes=3",
            "data.image_size=16", "data.batch_size=4"]


def test_tune_loader_prints_plots_and_recommends(jpeg_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "tune"
    result = run_kd("tune-loader", *data_args(jpeg_folder), "--max-workers", "2", "--batches",
                    "3", "--out", str(out), timeout=120)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    for column in COLUMNS:
        assert column in result.stdout, (column, result.stdout)

    # Every worker count up to the limit, each prefetch factor (0 workers once: no prefetching).
    saved = json.loads((out / "tune_loader.json").read_text())
    settings = {(r["workers"], r["prefetch_factor"]) for r in saved["measurements"]}
    assert settings == {(0, None), (1, 2), (1, 4), (2, 2), (2, 4)}
    for r in saved["measurements"]:
        assert r["img_per_s"] > 0 and r["batch_size"] == 4 and r["batches"] >= 3
        assert 0 <= r["cpu_percent"] <= 100 and r["wait_ms"] >= 0
        if r["loader_cpus"] > 0:  # images/s per core the loader kept busy
            assert r["img_per_core"] == pytest.approx(r["img_per_s"] / r["loader_cpus"],
                                                      rel=0.01)
    assert saved["max_workers"] == 2 and saved["batch_size"] == 4
    assert (out / "tune_loader.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The recommendation: within the limit and this machine's cap (CPUs - 1), and within 95 % of
    # the best setting measured there.
    match = RECOMMENDED.search(result.stdout)
    assert match, result.stdout
    workers = int(match.group(1))
    cap = saved["cap"]
    assert 0 <= workers <= min(2, cap)
    assert saved["recommended"]["workers"] == workers
    assert saved["overrides"] == match.group(0).removeprefix("recommended: ")
    if workers:
        assert int(match.group(2)) in (2, 4)
    best = max(r["img_per_s"] for r in saved["measurements"] if r["workers"] <= cap)
    assert saved["recommended"]["img_per_s"] >= 0.95 * best


def test_default_output_folder(jpeg_folder: Path, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    rc = main(["tune-loader", *data_args(jpeg_folder), f"output_dir={run}", "--max-workers", "0",
               "--batches", "1"])
    assert rc == 0
    assert "recommended: data.num_workers=0" in capsys.readouterr().out
    assert {p.name for p in (run / "tune_loader").iterdir()} == {"tune_loader.json",
                                                                "tune_loader.png"}


def test_missing_root_is_one_line(tmp_path: Path) -> None:
    result = run_kd("tune-loader", *data_args(tmp_path / "nowhere"), "--out",
                    str(tmp_path / "out"), timeout=120)
    assert_one_line_user_error(result, "data.root", "nowhere")


@pytest.mark.parametrize(("args", "mentions"), [
    (["--prefetch", "2,x"], ["--prefetch"]),
    (["--batches", "0"], ["--batches"]),
    (["--max-workers", "-1"], ["--max-workers"]),
    (["data.batch_size=100"], ["data.batch_size"]),
    (["data.num_classes=5"], ["data.num_classes=5"]),
], ids=["prefetch", "batches", "max-workers", "batch-larger-than-dataset", "class-count"])
def test_user_errors(jpeg_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                     args: list[str], mentions: list[str]) -> None:
    rc = main(["tune-loader", *data_args(jpeg_folder), *args, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("kd: error: ")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    for m in mentions:
        assert m in lines[0], (m, lines[0])

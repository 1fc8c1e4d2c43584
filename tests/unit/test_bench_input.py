"""benchmarks/bench_input.py runs end to end (a few images, one round): every pipeline is timed
on the originals and the resized copies, and a kd config sets the recipe and the data."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT, TINY

pytestmark = pytest.mark.usefixtures("one_thread")


def bench_input():
    spec = importlib.util.spec_from_file_location("bench_input",
                                                  ROOT / "benchmarks" / "bench_input.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rows(out: str) -> dict[tuple[str, str], list[str]]:
    table = [line.split(" | ") for line in out.splitlines() if line.startswith("| ")][2:]
    return {(r[0].strip("| "), r[1].split(" (")[0]): r[2:] for r in table}


def test_generated_jpegs_every_pipeline_and_the_resized_copies(capsys) -> None:
    module = bench_input()
    assert module.main(["--images", "4", "--rounds", "1", "--image-size", "48",
                        "--max-side", "160"]) == 0
    found = rows(capsys.readouterr().out)
    names = {"timm (reference)", "kd, data.pipeline=timm", "kd, data.pipeline=kd",
             "kd, data.decode=device: loader's share",
             "kd, data.decode=device, all of it on this CPU"}
    assert {name for name, _ in found} == names
    assert {images for _, images in found} == {"originals", "max side 160"}
    assert found["timm (reference)", "originals"][1].strip() == "1.00"
    for cells in found.values():
        assert float(re.sub(r"[^\d.]", "", cells[0].split(" (")[0])) > 0


def test_a_config_sets_the_recipe_and_its_imagefolder_the_images(tmp_path: Path,
                                                                 capsys) -> None:
    module = bench_input()
    rng = np.random.default_rng(0)
    folder = tmp_path / "train" / "class0"
    folder.mkdir(parents=True)
    for i in range(3):
        (folder / f"{i}.jpg").write_bytes(module.photo_jpeg(rng, 80, 60))
    assert module.main(["-c", TINY, "data.name=imagefolder", f"data.root={tmp_path}",
                        "data.num_classes=1", "data.re_prob=0.5", "--rounds", "1",
                        "--max-side", "0"]) == 0
    out = capsys.readouterr().out
    assert f"3 JPEGs from {tmp_path / 'train'}" in out and "→ 16 px" in out
    assert "'re_prob': 0.5" in out
    assert {images for _, images in rows(out)} == {"originals"}

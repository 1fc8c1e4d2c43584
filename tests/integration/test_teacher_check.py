"""The teacher check before training: logged, in summary.json, a warning near chance, an error
below ``distill.require_teacher_top1`` (exit code 2, nothing written), and skippable."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from kd.cli import main
from kd.core.trainer import Trainer, near_chance
from tests.conftest import TINY
from tests.integration.conftest import assert_same_weights, tiny_config, train_tiny

pytestmark = pytest.mark.usefixtures("one_thread")

CAUSES = ("teacher.checkpoint", "teacher.mean/std", "data.num_classes", "teacher.image_size")


@pytest.fixture(scope="module")
def random_teacher(tmp_path_factory: pytest.TempPathFactory) -> str:
    """configs/tiny.yaml's teacher architecture with random weights (a forgotten training)."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=4, img_size=16, patch_size=8,
                              embed_dim=48, depth=1, num_heads=2)
    path = tmp_path_factory.mktemp("random_teacher") / "random.safetensors"
    save_file(model.state_dict(), str(path))
    return str(path)


def test_teacher_top1_before_training(tiny_teacher: str, tmp_path: Path,
                                      caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="kd"):
        run = train_tiny(tiny_teacher, tmp_path / "run")
    before = run.summary["teacher_top1_before"]
    assert json.loads((run.dir / "summary.json").read_text())["teacher_top1_before"] == before
    # The same number evaluate() gives for the teacher at step 0 (and, frozen, at the end).
    fresh = Trainer(tiny_config(tiny_teacher, tmp_path / "fresh"))
    assert before == fresh.evaluate(0)["teacher_top1"] == run.summary["teacher_top1"]
    assert before >= near_chance(4)
    assert f"teacher top-1 before training: {before:.4f}" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    # A resumed run skips the check, says why, and keeps the first run's number.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="kd"):
        resumed = train_tiny(tiny_teacher, run.dir, "train.epochs=3")
    assert "teacher check skipped: resuming at step 16" in caplog.text
    assert resumed.summary["teacher_top1_before"] == before


def test_random_teacher_warns_near_chance(random_teacher: str, tmp_path: Path,
                                          caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="kd"):
        run = train_tiny(random_teacher, tmp_path / "run", "train.max_steps=2")
    before = run.summary["teacher_top1_before"]
    assert before < near_chance(4) and before == run.summary["teacher_top1"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, caplog.text
    assert f"{before:.4f}" in warnings[0] and "near chance" in warnings[0]
    for cause in (*CAUSES, "distill.require_teacher_top1"):
        assert cause in warnings[0], (cause, warnings[0])


def test_required_top1_stops_before_writing(random_teacher: str, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    capsys.readouterr()
    rc = main(["train", "-c", TINY, f"teacher.checkpoint={random_teacher}", f"output_dir={out}",
               "distill.require_teacher_top1=0.9"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("kd: error: ")]
    assert rc == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert "distill.require_teacher_top1=0.9" in errors[0]
    # The measured value (what evaluate() reports for the teacher at step 0) is in the line.
    measured = Trainer(tiny_config(random_teacher, out)).evaluate(0)["teacher_top1"]
    assert f"top-1 on the validation split is {measured:.4f}" in errors[0], errors[0]
    for cause in CAUSES:
        assert cause in errors[0], (cause, errors[0])
    assert not out.exists()


def test_check_can_be_skipped(tiny_teacher: str, tmp_path: Path,
                              caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="kd"):
        skipped = train_tiny(tiny_teacher, tmp_path / "skipped", "distill.check_teacher=false")
    assert skipped.summary["teacher_top1_before"] is None
    assert "teacher check skipped: distill.check_teacher=false" in caplog.text
    assert "teacher top-1 before training" not in caplog.text
    # The check only observes: training with it ends with the same weights as without.
    checked = train_tiny(tiny_teacher, tmp_path / "checked")
    assert checked.summary["teacher_top1_before"] is not None
    assert_same_weights(skipped.weights, checked.weights)


def test_check_is_skipped_without_a_teacher_in_training(
        tiny_teacher: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="kd"):
        run = train_tiny(tiny_teacher, tmp_path / "run", "distill.loss=none",
                         "train.max_steps=2")
    assert run.summary["teacher_top1_before"] is None
    assert "teacher check skipped: the teacher does not run in training (distill.loss=none)" \
        in caplog.text
    # Without a teacher at all there is nothing to check, and nothing is said.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="kd"):
        run = train_tiny(None, tmp_path / "labels", "distill.loss=none", "train.max_steps=2")
    assert run.summary["teacher_top1_before"] is None
    assert "teacher check" not in caplog.text and "teacher top-1 before" not in caplog.text


def test_required_top1_needs_the_check(tmp_path: Path) -> None:
    from kd.errors import ConfigError

    with pytest.raises(ConfigError, match=r"distill\.require_teacher_top1"):
        tiny_config(None, tmp_path, "distill.check_teacher=false",
                    "distill.require_teacher_top1=0.5")
    with pytest.raises(ConfigError, match=r"distill\.require_teacher_top1"):
        tiny_config(None, tmp_path, "distill.require_teacher_top1=1.5")

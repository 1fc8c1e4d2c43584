"""``kd compare``: labels only vs distillation vs a transfer set, same budget, several seeds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kd.cli import main
from kd.config import load_config
from kd.tools.compare import plan
from tests.conftest import TINY

pytestmark = pytest.mark.usefixtures("one_thread")

FEW = ["data.labels_per_class=4", "data.transfer_set=rest"]  # 16 labelled, 112 unlabelled


def test_every_arm_gets_the_same_budget(tiny_teacher: str, tmp_path: Path) -> None:
    cfg = load_config(TINY, [f"teacher.checkpoint={tiny_teacher}", *FEW,
                             f"output_dir={tmp_path}", "sched.warmup_epochs=1"])
    budget, configs = plan(cfg, world_size=1)
    assert list(configs) == ["labels", "kd", "kd+transfer"]
    assert budget["train_images"] == {"labels": 16, "kd": 16, "kd+transfer": 128}
    assert budget["steps"] == 16 and budget["batch_size"] == 16  # 2 epochs of the 128
    for arm, c in configs.items():
        epoch_steps = budget["train_images"][arm] // 16
        assert c.train.max_steps == 16 and c.data.batch_size == 16
        assert c.train.epochs * epoch_steps >= 16  # enough epochs for the steps
        assert c.sched.warmup_epochs * epoch_steps == pytest.approx(8)  # same warm-up steps
    assert configs["labels"].distill.loss == "none"
    assert configs["labels"].data.transfer_set == configs["kd"].data.transfer_set == "none"
    assert configs["kd+transfer"].data.transfer_set == "rest"
    assert cfg.data.transfer_set == "rest"  # the command's config is left as it was
    two_arms, _ = plan(load_config(TINY, [f"teacher.checkpoint={tiny_teacher}",
                                          "data.labels_per_class=4"]), world_size=1)
    assert two_arms["reference_arm"] == "kd"


def test_compare_writes_the_table_json_and_plot(tiny_teacher: str, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cmp"
    rc = main(["compare", "-c", TINY, f"teacher.checkpoint={tiny_teacher}", *FEW,
               "train.epochs=1", f"output_dir={tmp_path / 'run'}", "--seeds", "2",
               "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "kd compare: student top-1, 2 seeds, 8 steps x 16 images each" in printed
    for arm in ("labels", "kd", "kd+transfer"):
        assert arm in printed
    report = json.loads((out / "compare.json").read_text())
    assert report["seeds"] == [0, 1]
    arms = report["arms"]
    assert list(arms) == ["labels", "kd", "kd+transfer"]
    for arm in arms.values():
        assert len(arm["student_top1"]) == 2 and all(0 <= v <= 1 for v in arm["student_top1"])
        assert arm["student_top1_mean"] == pytest.approx(sum(arm["student_top1"]) / 2)
        assert arm["gain_over_labels"] == pytest.approx(
            arm["student_top1_mean"] - arms["labels"]["student_top1_mean"])
        for run in arm["runs"]:  # every arm is a full kd run
            summary = json.loads((Path(run) / "summary.json").read_text())
            assert summary["steps"] == 8
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_without_distillation_is_a_user_error(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["compare", "-c", TINY, "distill.loss=none", "teacher.checkpoint=null",
               f"output_dir={tmp_path}"])
    assert rc == 2
    assert "distill.loss" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_compare_refuses_a_teacher_cache(tiny_teacher: str, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["compare", "-c", TINY, f"teacher.checkpoint={tiny_teacher}",
               f"distill.teacher_cache={tmp_path / 'cache'}", f"output_dir={tmp_path / 'out'}"])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unset distill.teacher_cache" in err[0]
    assert not (tmp_path / "out").exists()


def test_feature_pairs_add_the_feature_arms(tiny_teacher: str, tmp_path: Path) -> None:
    """With distill.features: a features arm (the same teacher used headless, feature terms
    only) and a kd+features arm, each with the transfer set; the budget follows the largest."""
    cfg = load_config(TINY, [f"teacher.checkpoint={tiny_teacher}", *FEW, f"output_dir={tmp_path}",
                             "distill.features=[{tokens: pooled}]"])
    budget, configs = plan(cfg, world_size=1)
    assert list(configs) == ["labels", "kd", "kd+transfer", "features+transfer",
                             "kd+features+transfer"]
    assert budget["reference_arm"] == "kd+features+transfer"
    assert {arm: c.train.max_steps for arm, c in configs.items()} == dict.fromkeys(configs, 16)
    features = configs["features+transfer"]
    assert features.distill.loss == "none" and features.teacher.kwargs["num_classes"] == 0
    assert len(features.distill.features) == 1 and features.data.transfer_set == "rest"
    both = configs["kd+features+transfer"]
    assert both.distill.loss == "soft" and "num_classes" not in both.teacher.kwargs
    assert all(not configs[a].distill.features for a in ("labels", "kd", "kd+transfer"))

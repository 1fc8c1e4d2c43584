"""Feature distillation in real runs: a CNN teacher for a ViT student, a headless teacher with a
transfer set, the loss written as logit loss plus weighted feature terms."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from kd.config import validate
from kd.core.trainer import Trainer
from tests.integration.conftest import is_number, read_jsonl, tiny_config, train_tiny

pytestmark = pytest.mark.usefixtures("one_thread")

PAIRS = ("distill.features=[{student: 0, teacher: 0, weight: 2.0}, "
         "{student: -1, teacher: -1, loss: smooth_l1, tokens: pooled}]")


def test_total_loss_adds_the_weighted_feature_terms(tiny_teacher: str, tmp_path: Path) -> None:
    run = train_tiny(tiny_teacher, tmp_path / "run", PAIRS, "distill.alpha=0.5")
    for r in run.train_records:
        logit = 0.5 * r["loss_task"] + 0.5 * r["loss_kd"]
        want = logit + 2.0 * r["loss_feat_0"] + r["loss_feat_1"]
        assert r["loss"] == pytest.approx(want, rel=1e-5)
    assert all(is_number(r["loss_feat_0"]) and r["loss_feat_0"] > 0 for r in run.train_records)
    assert run.train_records[-1]["loss_feat_0"] < run.train_records[0]["loss_feat_0"]


def test_a_cnn_teacher_teaches_a_vit_student(tmp_path: Path) -> None:
    """The teacher's stage maps (B, C, H, W) are grids; a 32 px teacher view of the 16 px crop
    gives a 4×4 map at stage 2, resampled to the student's 2×2 patch grid."""
    teacher = timm.create_model("resnet10t", num_classes=4)
    path = tmp_path / "resnet.safetensors"
    save_file(teacher.state_dict(), str(path))
    cfg = tiny_config(str(path), tmp_path / "run", "distill.check_teacher=false",
                      "distill.features=[{student: -1, teacher: 2, tokens: patch}]")
    # A dict override merges into tiny.yaml's ViT kwargs: replace the teacher section instead.
    cfg = dataclasses.replace(cfg, teacher=dataclasses.replace(
        cfg.teacher, name="resnet10t", kwargs={}, image_size=32))
    validate(cfg)
    trainer = Trainer(cfg)
    assert trainer.features is not None
    assert trainer.features.projectors[0].out_features == 128  # resnet10t stage 2 width
    summary = trainer.train()
    records = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "split" not in r]
    assert summary["steps"] == 16 and all(is_number(r["loss_feat_0"]) for r in records)


def test_a_headless_teacher_teaches_through_features_on_a_transfer_set(
        tiny_teacher: str, tmp_path: Path) -> None:
    """A teacher checkpoint with a head, built headless: features only, the labels train the
    student's head, unlabelled images add the feature term only, no teacher top-1."""
    run = train_tiny(tiny_teacher, tmp_path / "run", "teacher.kwargs.num_classes=0",
                     "distill.loss=none", "distill.features=[{tokens: pooled}]",
                     "data.labels_per_class=4", "data.transfer_set=rest")
    assert run.summary["teacher_top1"] is None and run.summary["teacher_top1_before"] is None
    records = run.train_records
    assert all(r["loss_kd"] == 0 and is_number(r["loss_feat_0"]) for r in records)
    # loss = (labelled share) * loss_task + loss_feat_0
    assert all(r["loss"] > r["loss_feat_0"] for r in records)
    assert all(v["teacher_top1"] is None and v["agreement"] is None for v in run.val_records)


def test_eval_and_export_of_a_feature_run_hold_the_student_alone(tiny_teacher: str,
                                                                 tmp_path: Path) -> None:
    """The projectors are saved in checkpoints but are not the student: kd export writes the
    timm-loadable student alone, and kd eval of a headless-teacher run has no teacher top-1."""
    from kd.cli import main

    run = train_tiny(tiny_teacher, tmp_path / "run", "teacher.kwargs.num_classes=0",
                     "distill.loss=none", "distill.features=[{}]")
    state = torch.load(run.checkpoint(16) / "state.pt", map_location="cpu", weights_only=True)
    assert set(state["projectors"]) == {"0.weight", "0.bias"}
    assert main(["export", "--checkpoint", str(run.dir), "--out", str(tmp_path / "export")]) == 0
    exported = load_file(str(tmp_path / "export" / "model.safetensors"))
    assert exported.keys() == run.weights.keys()
    assert not any(k.startswith("projectors") for k in exported)
    assert main(["eval", "--checkpoint", str(run.dir)]) == 0
    record = json.loads((run.dir / "eval.json").read_text())
    assert record["teacher_top1"] is None and record["student_top1"] == run.summary[
        "student_top1"]


def test_two_teachers_with_their_own_normalisation_and_image_size(
        tiny_teacher: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The tiny ViT teacher (weight 2) and a CNN seeing a 32 px view with its own statistics:
    the logit terms distil their mixture, a feature pair names the CNN, every teacher is checked
    and evaluated, and summary.json lists them next to the mixture's top-1."""
    cnn = timm.create_model("resnet10t", num_classes=4)
    path = tmp_path / "resnet.safetensors"
    save_file(cnn.state_dict(), str(path))
    vit = ("{name: vit_tiny_patch16_224, checkpoint: " + tiny_teacher + ", weight: 2, kwargs: "
           "{img_size: 16, patch_size: 8, embed_dim: 48, depth: 1, num_heads: 2}}")
    other = ("{name: resnet10t, checkpoint: " + str(path) + ", image_size: 32, "
             "mean: [0.4, 0.4, 0.4], std: [0.2, 0.25, 0.3]}")
    with caplog.at_level("INFO", logger="kd"):
        run = train_tiny(None, tmp_path / "run", f"teachers=[{vit}, {other}]",
                         "distill.features=[{student: -1, teacher: 3, teacher_index: 1, "
                         "tokens: pooled}]")
    assert "teachers[0] (vit_tiny_patch16_224) top-1 before training" in caplog.text
    assert "teachers[1] (resnet10t) top-1 before training" in caplog.text
    assert "teachers' mixture top-1 before training" in caplog.text
    teachers = run.summary["teachers"]
    assert [t["name"] for t in teachers] == ["vit_tiny_patch16_224", "resnet10t"]
    assert all(is_number(t["top1"]) for t in teachers) and is_number(run.summary["teacher_top1"])
    assert run.val_records[-1]["teachers"] == teachers
    assert all(is_number(r["loss_feat_0"]) for r in run.train_records)


def test_mixed_batches_reach_both_models_and_the_profile_has_a_range_per_term(
        tiny_teacher: str, tmp_path: Path) -> None:
    """With Mixup/CutMix the feature pairs compare the same mixed images; kd profile shows each
    feature term as its own range."""
    from kd.tools.profiler import ProfileSettings, run_profile

    cfg = tiny_config(tiny_teacher, tmp_path, PAIRS, "data.mixup=0.8", "data.cutmix=1.0")
    trainer = Trainer(cfg)
    seen: list[tuple[torch.Tensor, list[torch.Tensor]]] = []
    prepare = trainer.task.prepare

    def spy(images: torch.Tensor):
        x_student, x_teachers = prepare(images)
        seen.append((images.clone(), x_teachers))
        return x_student, x_teachers

    trainer.task.prepare = spy
    analysis = run_profile(trainer, tmp_path / "profile", ProfileSettings(wait=0, warmup=1,
                                                                        active=2))
    images, (x_teacher,) = seen[0]
    assert not torch.equal(images, torch.zeros_like(images))
    torch.testing.assert_close(x_teacher, trainer.teacher.norm(images))  # the mixed batch
    names = {row["name"] for rank in json.loads(
        (tmp_path / "profile" / "profile.json").read_text())["ranks"] for row in rank["ops"]}
    assert {"loss_feat_0", "loss_feat_1"} <= names, sorted(names)[:20]
    assert analysis is not None


def test_layer_decay_groups_are_logged_on_request(tiny_teacher: str, tmp_path: Path) -> None:
    """tiny.yaml's student has 1 block: patch embedding, block and head learn at lr · d², lr · d
    and lr; ``lr`` is the schedule's value (the head's)."""
    run = train_tiny(tiny_teacher, tmp_path / "run", "optim.layer_decay=0.5",
                     "train.log_lr_groups=true")
    for r in run.train_records:
        groups = sorted({v for k, v in r.items() if k.startswith("lr_group_")})
        assert groups == pytest.approx([r["lr"] / 4, r["lr"] / 2, r["lr"]])


def test_activation_checkpointing_trains_the_same_student(tiny_teacher: str,
                                                          tmp_path: Path) -> None:
    """Recomputing each block's activations in the backward pass changes memory and time, not
    the maths: the same losses and weights as without it."""
    plain = train_tiny(tiny_teacher, tmp_path / "plain", PAIRS)
    ckpt = train_tiny(tiny_teacher, tmp_path / "ckpt", PAIRS, "student.grad_checkpointing=true")
    for a, b in zip(plain.train_records, ckpt.train_records, strict=True):
        for key in ("loss", "loss_task", "loss_kd", "loss_feat_0", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key
    for name, tensor in plain.weights.items():
        torch.testing.assert_close(ckpt.weights[name], tensor, rtol=1e-5, atol=1e-6)


def test_the_students_ema_is_evaluated_kept_as_best_and_exported(tiny_teacher: str,
                                                                 tmp_path: Path) -> None:
    from kd.cli import main

    run = train_tiny(tiny_teacher, tmp_path / "run", "train.ema_decay=0.9",
                     "checkpoint.best_metric=student_ema_top1")
    for record in run.val_records:
        assert is_number(record["student_ema_top1"]) and is_number(record["student_ema_top5"])
    assert run.summary["student_ema_top1"] == run.val_records[-1]["student_ema_top1"]
    best = json.loads((run.dir / "checkpoints" / "best.json").read_text())
    assert best["student_ema_top1"] == max(r["student_ema_top1"] for r in run.val_records)
    state = torch.load(run.checkpoint(16) / "state.pt", map_location="cpu", weights_only=True)
    assert main(["export", "--checkpoint", str(run.checkpoint(16)), "--out",
                 str(tmp_path / "ema"), "--ema"]) == 0
    exported = load_file(str(tmp_path / "ema" / "model.safetensors"))
    assert all(torch.equal(exported[k], state["ema"][k]) for k in exported)
    assert any(not torch.equal(exported[k], run.weights[k]) for k in exported)  # not the student
    plain = train_tiny(tiny_teacher, tmp_path / "plain", "train.max_steps=4")
    assert main(["export", "--checkpoint", str(plain.dir), "--out", str(tmp_path / "x"),
                 "--ema"]) == 2  # no EMA in that run
    assert not (tmp_path / "x").exists()

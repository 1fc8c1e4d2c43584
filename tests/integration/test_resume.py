"""Resume: an interrupted run continues to exactly the weights and metrics of a straight run.

Interruptions are real: the trainer runs in this process and a step raises part-way between two
checkpoints (after the checkpoint, before the next one), as a crash or a pre-emption would.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from kd.core import checkpoint as ckpt
from kd.core.trainer import Trainer
from kd.errors import UserError
from tests.conftest import TINY
from tests.integration.conftest import (
    Run,
    assert_one_line_user_error,
    assert_same_weights,
    kd_cli,
    read_jsonl,
    tiny_config,
    train_tiny,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# 3 epochs × 8 steps; checkpoints every 4 steps (12 is mid-epoch: 12 / 8 = 1.5).
N, STEPS_PER_EPOCH = 24, 8
BASE = ["train.epochs=3", "checkpoint.keep=50"]
TIMING = {"img_per_s", "eta_s"}  # wall-clock values; everything else must match exactly


class Interrupted(Exception):
    pass


def interrupted_run(teacher: str, out: Path, at_step: int, *overrides: str) -> None:
    """Train in ``out`` and crash when step ``at_step + 1`` starts."""

    class Crashing(Trainer):
        def train_step(self, *args: Any, **kwargs: Any) -> Any:
            if self.step == at_step:
                raise Interrupted
            return super().train_step(*args, **kwargs)

    with pytest.raises(Interrupted):
        Crashing(tiny_config(teacher, out, *overrides)).train()


def comparable(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in TIMING and not k.startswith("t_")}
            for r in records]


def final_state(run_dir: Path, step: int) -> dict[str, Any]:
    return torch.load(run_dir / "checkpoints" / f"step_{step:08d}" / "state.pt",
                      map_location="cpu", weights_only=True)


def assert_same_optimizer_state(a: dict[str, Any], b: dict[str, Any]) -> None:
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for k in sa[i]:
            assert torch.equal(torch.as_tensor(sa[i][k]), torch.as_tensor(sb[i][k])), (i, k)


@pytest.fixture(scope="module")
def straight(tiny_teacher: str, tmp_path_factory: pytest.TempPathFactory) -> Run:
    return train_tiny(tiny_teacher, tmp_path_factory.mktemp("straight") / "run", *BASE,
                      "checkpoint.every_steps=4")


PARITY_CASES = {
    # name: (checkpoint.every_steps, crash when this step starts, resume step, extra overrides)
    "mid-epoch": (4, 13, 12, []),
    "epoch-boundary": (8, 9, 8, []),
    "grad-accum-mid-epoch": (4, 13, 12, ["data.batch_size=8", "train.grad_accum_steps=2"]),
    "fp16-scaler": (4, 13, 12, ["train.precision=fp16"]),
    "dkd-warmup": (5, 11, 10, ["distill.loss=dkd", "distill.dkd_warmup_epochs=2"]),
    "dropout": (4, 13, 12, ["student.kwargs.drop_rate=0.1",
                            "student.kwargs.drop_path_rate=0.1"]),
    "feature-pairs": (4, 13, 12, ["distill.features=[{student: 0, teacher: 0}, {student: -1, "
                                  "teacher: blocks.0.mlp, loss: mse, tokens: pooled}]",
                                  "distill.projector=mlp"]),
    "layer-decay": (4, 13, 12, ["optim.layer_decay=0.5", "train.log_lr_groups=true"]),
    "repeated-aug": (4, 13, 12, ["data.repeated_aug=2", "train.max_steps=24"]),  # mid-epoch 0
    "ema": (4, 13, 12, ["train.ema_decay=0.9", "train.ema_warmup=true",
                        "checkpoint.best_metric=student_ema_top1"]),
}


@pytest.mark.parametrize("case", PARITY_CASES.values(), ids=PARITY_CASES.keys())
def test_interrupted_and_resumed_equals_straight(tiny_teacher: str, tmp_path: Path,
                                                 straight: Run, case: tuple) -> None:
    every, crash_at, resume_step, extra = case
    overrides = [*BASE, f"checkpoint.every_steps={every}", *extra]
    ref = straight if not extra else train_tiny(tiny_teacher, tmp_path / "straight",
                                                *overrides)
    out = tmp_path / "resumed"
    interrupted_run(tiny_teacher, out, crash_at, *overrides)
    assert not (out / "student.safetensors").exists()  # it really stopped early
    assert ckpt.CheckpointManager(out / "checkpoints", 50).latest().name == \
        f"step_{resume_step:08d}"

    trainer = Trainer(tiny_config(tiny_teacher, out, *overrides))  # checkpoint.resume=auto
    assert trainer.step == resume_step
    summary = trainer.train()
    assert summary["steps"] == N

    assert_same_weights(Run(out, summary).weights, ref.weights)  # bit-identical
    assert_same_optimizer_state(final_state(out, N), final_state(ref.dir, N))
    for name, tensor in final_state(ref.dir, N).get("ema", {}).items():  # train.ema_decay
        assert torch.equal(final_state(out, N)["ema"][name], tensor), name
    # The crashed run logged up to the checkpoint; the resumed one logged the rest: together
    # exactly the straight run's records (losses, lr, evaluations at the same steps).
    assert comparable(read_jsonl(out / "metrics.jsonl")) == comparable(ref.records)
    for key in ("student_top1", "student_top5", "teacher_top1", "agreement", "steps"):
        assert summary[key] == ref.summary[key]


def test_resume_from_an_explicit_checkpoint(tiny_teacher: str, tmp_path: Path,
                                            straight: Run) -> None:
    out = tmp_path / "elsewhere"
    path = straight.checkpoint(12)
    trainer = Trainer(tiny_config(tiny_teacher, out, *BASE, "checkpoint.every_steps=4",
                                  f"checkpoint.resume={path}"))
    assert trainer.step == 12
    summary = trainer.train()
    assert summary["steps"] == N
    assert_same_weights(Run(out, summary).weights, straight.weights)
    records = read_jsonl(out / "metrics.jsonl")
    assert records[0]["step"] == 14  # logging continues after the resume point
    assert comparable(records) == comparable([r for r in straight.records if r["step"] > 12])


def test_resume_none_starts_over(tiny_teacher: str, tmp_path: Path, straight: Run) -> None:
    out = tmp_path / "run"
    shutil.copytree(straight.dir, out)
    args = (*BASE, "checkpoint.every_steps=4", "checkpoint.resume=none")
    # Over another run's checkpoints, a fresh start would interleave the two: refused.
    with pytest.raises(UserError, match=r"checkpoint\.resume=auto"):
        Trainer(tiny_config(tiny_teacher, out, *args))
    shutil.rmtree(out / "checkpoints")
    trainer = Trainer(tiny_config(tiny_teacher, out, *args))
    assert trainer.step == 0
    summary = trainer.train()
    assert summary["steps"] == N
    assert_same_weights(Run(out, summary).weights, straight.weights)  # same seed, same run
    # The old run's records are gone: the file holds the new run's, once each.
    assert comparable(read_jsonl(out / "metrics.jsonl")) == comparable(straight.records)


def test_restart_with_resume_none_then_auto_resume_continues_the_new_run(
        tiny_teacher: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    train_tiny(tiny_teacher, out)  # tiny.yaml: checkpoints 8, 12, 16 (every 4, keep 3)
    try:
        interrupted_run(tiny_teacher, out, 6, "checkpoint.resume=none")  # saved step 4
    except UserError:
        return  # refusing to restart over another run's checkpoints is a fix too
    trainer = Trainer(tiny_config(tiny_teacher, out))  # checkpoint.resume=auto
    assert trainer.step == 4


def test_resume_leaves_one_record_per_step(tiny_teacher: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    # Checkpoint at step 3; step 4 is logged (log_every=2), then the run dies.
    interrupted_run(tiny_teacher, out, 4, "checkpoint.every_steps=3")
    train_tiny(tiny_teacher, out, "checkpoint.every_steps=3")
    steps = [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "split" not in r]
    assert steps == sorted(set(steps)), steps


def test_extending_a_finished_run_follows_the_new_schedule(tiny_teacher: str,
                                                           tmp_path: Path) -> None:
    out = tmp_path / "run"
    train_tiny(tiny_teacher, out)  # tiny.yaml: 2 epochs, 16 steps
    try:
        extended = train_tiny(tiny_teacher, out, "train.epochs=4")
    except UserError:
        return  # refusing a checkpoint whose schedule length differs is a fix too
    assert extended.summary["steps"] == 32
    fresh = train_tiny(tiny_teacher, tmp_path / "fresh", "train.epochs=4")
    lr_fresh = {r["step"]: r["lr"] for r in fresh.train_records}
    for r in extended.train_records:
        if r["step"] > 16:  # the steps the resumed run trained: the 32-step schedule's lr
            assert r["lr"] == pytest.approx(lr_fresh[r["step"]], rel=1e-6), r


def test_resume_at_the_final_step_only_evaluates(tiny_teacher: str, tmp_path: Path,
                                                 straight: Run) -> None:
    out = tmp_path / "run"
    shutil.copytree(straight.dir, out)
    (out / "summary.json").write_text("{}\n")
    before = read_jsonl(out / "metrics.jsonl")
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    manifest = (straight.checkpoint(N) / "manifest.json").read_text()

    trainer = Trainer(tiny_config(tiny_teacher, out, *BASE, "checkpoint.every_steps=4"))
    assert trainer.step == N
    summary = trainer.train()

    assert summary["steps"] == N
    written = json.loads((out / "summary.json").read_text())
    assert written["steps"] == N
    for key in ("student_top1", "student_top5", "teacher_top1", "agreement"):
        assert written[key] == straight.summary[key]
    added = read_jsonl(out / "metrics.jsonl")[len(before):]
    assert len(added) == 1 and added[0]["split"] == "val" and added[0]["step"] == N
    assert added[0]["student_top1"] == straight.val_records[-1]["student_top1"]
    assert_same_weights(Run(out, summary).weights, straight.weights)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == checkpoints
    assert (out / "checkpoints" / f"step_{N:08d}" / "manifest.json").read_text() == manifest


def test_resume_with_another_student_architecture_is_a_user_error(
        tiny_teacher: str, tmp_path: Path, straight: Run) -> None:
    out = tmp_path / "run"
    shutil.copytree(straight.dir, out)
    records = (out / "metrics.jsonl").read_text()
    result = kd_cli("train", "-c", TINY, f"teacher.checkpoint={tiny_teacher}",
                    f"output_dir={out}", *BASE, "student.kwargs.embed_dim=48")
    line = assert_one_line_user_error(result, "checkpoint")
    assert f"step_{N:08d}" in line
    assert (out / "metrics.jsonl").read_text() == records  # nothing was appended


def test_resume_architecture_error_says_what_differs(tiny_teacher: str, tmp_path: Path,
                                                     straight: Run) -> None:
    out = tmp_path / "run"
    with pytest.raises(UserError) as e:
        Trainer(tiny_config(tiny_teacher, out, *BASE, "student.kwargs.embed_dim=48",
                            f"checkpoint.resume={straight.checkpoint(N)}"))
    message = str(e.value)
    assert "\n" not in message
    assert "shape" in message or "size mismatch" in message, message

"""Real tiny runs (in-process) for every distillation loss, precision and training option."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from kd.config import load_config
from kd.core.models import build_student
from kd.core.precision import resolve_precision
from tests.conftest import TINY
from tests.integration.conftest import (
    Run,
    assert_loss_is_weighted_sum,
    is_number,
    losses_decrease,
    train_tiny,
)

pytestmark = pytest.mark.usefixtures("one_thread")

DEIT = ["student.name=deit_tiny_distilled_patch16_224"]  # with tiny.yaml's student.kwargs
STEPS = 16  # tiny.yaml: 8 steps/epoch × 2 epochs


@pytest.fixture(scope="module")
def baseline(cached_run: Callable[..., Run]) -> Run:
    """tiny.yaml as is: distill.loss=soft, fp32, batch 16, no clipping."""
    return cached_run("distill.loss=soft")


@pytest.fixture(scope="module")
def cached_run(tiny_teacher: str,
               tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Run]:
    """``cached_run(*overrides)``: one tiny run per distinct set of overrides in this module."""
    runs: dict[tuple[str, ...], Run] = {}

    def get(*overrides: str) -> Run:
        if overrides not in runs:
            runs[overrides] = train_tiny(tiny_teacher, tmp_path_factory.mktemp("run") / "run",
                                         *overrides)
        return runs[overrides]

    return get


def logits(run: Run, x: torch.Tensor) -> torch.Tensor:
    cfg = load_config(str(run.dir / "config.yaml"))
    model = build_student(cfg.student, cfg.data.num_classes)
    model.load_state_dict(run.weights)
    with torch.no_grad():
        return model.eval()(x)


LOSSES = {
    "none": ["distill.loss=none"],
    "soft": ["distill.loss=soft"],
    "hard": ["distill.loss=hard"],
    "dkd": ["distill.loss=dkd", "distill.dkd_warmup_epochs=0"],
    "token-hard": ["distill.loss=token", "distill.token_loss=hard", *DEIT],
    "token-soft": ["distill.loss=token", "distill.token_loss=soft", *DEIT],
}


@pytest.mark.parametrize("name", LOSSES)
def test_every_distill_loss_trains(cached_run, name: str) -> None:
    run = cached_run(*LOSSES[name])
    train, val = run.train_records, run.val_records
    assert run.summary["steps"] == STEPS
    assert all(is_number(r[k]) for r in train for k in ("loss", "loss_task", "loss_kd"))
    assert losses_decrease(train), [r["loss"] for r in train]
    if name == "none":
        assert all(r["loss"] == r["loss_task"] and r["loss_kd"] == 0 for r in train)
    else:
        assert all(r["loss_kd"] > 0 for r in train)
        assert_loss_is_weighted_sum(train, alpha=0.5)  # alpha is constant: no warm-up
    for r in val:
        for key in ("student_top1", "student_top5", "teacher_top1", "agreement"):
            assert 0.0 <= r[key] <= 1.0
    assert run.summary["student_top1"] >= 0.5  # 4 classes: chance is 0.25
    if name.startswith("token"):
        assert "head_dist.weight" in run.weights  # a DeiT student with its distillation head


def test_token_loss_variants_differ(cached_run) -> None:
    hard = cached_run(*LOSSES["token-hard"])
    soft = cached_run(*LOSSES["token-soft"])
    assert [r["loss_kd"] for r in hard.train_records] != [r["loss_kd"] for r in soft.train_records]


def test_dkd_warmup_ramps_the_kd_term(tiny_run) -> None:
    """With dkd_warmup_epochs=1 and one record per step, the weight of the KD term at step s
    is min(epoch / 1, 1) with epoch = (s - 1) / 8 at the start of the step."""
    run = tiny_run("dkd", "distill.loss=dkd", "distill.dkd_warmup_epochs=1", "train.log_every=1")
    train = run.train_records
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    for r in train:
        w = min((r["step"] - 1) / 8, 1.0)
        want = 0.5 * r["loss_task"] + 0.5 * w * r["loss_kd"]
        assert r["loss"] == pytest.approx(want, rel=1e-5), r
    assert train[0]["loss"] == pytest.approx(0.5 * train[0]["loss_task"], rel=1e-6)


@pytest.mark.parametrize("precision", ["fp32", "auto", "bf16", "fp16"])
def test_precision(tiny_run, baseline: Run, precision: str) -> None:
    run = tiny_run(precision, f"train.precision={precision}")
    # auto on CPU: bf16 where the CPU has AMX, else fp32 (tests/unit/test_precision.py)
    resolved = resolve_precision(precision, torch.device("cpu"))
    assert run.summary["precision"] == resolved
    assert run.summary["steps"] == STEPS
    train = run.train_records
    assert all(is_number(r["loss"]) for r in train)
    assert losses_decrease(train), [r["loss"] for r in train]
    base = [r["loss"] for r in baseline.train_records]
    ours = [r["loss"] for r in train]
    if resolved == "fp32":
        assert ours == base  # same computation, bit for bit
    else:
        assert ours != base  # autocast really ran in reduced precision...
        assert ours[0] == pytest.approx(base[0], rel=1e-2)  # ...and computed the same loss
    state = torch.load(run.checkpoint(STEPS) / "state.pt", map_location="cpu", weights_only=True)
    if resolved == "fp16":  # the gradient scaler is on and its state is checkpointed
        assert is_number(state["scaler"]["scale"]) and state["scaler"]["scale"] > 0
    else:
        assert state["scaler"] == {}


def test_grad_accumulation_matches_a_full_batch(tiny_run, baseline: Run) -> None:
    """batch 8 × 2 micro-batches is the same optimizer step as batch 16: the mean of two
    half-batch means is the full-batch mean, and the sampler yields the same 16 images."""
    run = tiny_run("accum", "data.batch_size=8", "train.grad_accum_steps=2")
    assert run.summary["steps"] == baseline.summary["steps"] == STEPS
    ours, base = run.train_records, baseline.train_records
    assert [r["step"] for r in ours] == [r["step"] for r in base]
    for a, b in zip(ours, base, strict=True):
        for key in ("loss", "loss_task", "loss_kd", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), (key, a, b)
    w, w_base = run.weights, baseline.weights
    assert w.keys() == w_base.keys()
    embed = 32  # tiny.yaml student.kwargs.embed_dim
    for k in w:
        a, b = w[k], w_base[k]
        if k.endswith("attn.qkv.bias"):
            # The key bias has an exactly-zero gradient (softmax ignores a shift shared by all
            # keys); Adam normalises the rounding noise there into lr-sized steps. It does not
            # change any output; compare the query and value parts only.
            a = torch.cat([a[:embed], a[2 * embed:]])
            b = torch.cat([b[:embed], b[2 * embed:]])
        # fp32 rounding differences only (sums in another order), after 16 Adam steps.
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)
    x = torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits(run, x), logits(baseline, x), rtol=1e-5, atol=1e-5)


def test_grad_clip_changes_the_update(tiny_run, baseline: Run) -> None:
    run = tiny_run("clip", "optim.grad_clip=0.01")
    assert run.summary["steps"] == STEPS
    assert losses_decrease(run.train_records)
    diff = max((run.weights[k] - baseline.weights[k]).abs().max().item() for k in run.weights)
    assert diff > 1e-3, diff


def test_max_steps_caps_the_run_and_the_schedule(tiny_run, baseline: Run) -> None:
    run = tiny_run("max", "train.max_steps=5")
    assert run.summary["steps"] == 5
    train = run.train_records
    assert [r["step"] for r in train] == [2, 4, 5]  # the last step is always logged
    min_lr = load_config(TINY).sched.min_lr
    assert train[-1]["lr"] == pytest.approx(min_lr, rel=1e-6)  # the schedule spans 5 steps
    assert all(r["lr"] > min_lr * 1.01 for r in train[:-1])
    lr_base = {r["step"]: r["lr"] for r in baseline.train_records}
    assert train[1]["lr"] != pytest.approx(lr_base[4])  # not the 16-step schedule
    assert [r["step"] for r in run.val_records] == [5]
    assert (run.dir / "checkpoints" / "latest").read_text().strip() == "step_00000005"
    state = torch.load(run.checkpoint(5) / "state.pt", map_location="cpu", weights_only=True)
    assert state["step"] == 5


def test_label_smoothing(tiny_run, baseline: Run) -> None:
    """With ε = 0.5 the task term cannot drop below the entropy of the smoothed targets
    q = (1 - ε) one-hot + ε / C; the unsmoothed baseline ends below that floor."""
    eps, c = 0.5, 4
    q_true, q_other = 1 - eps + eps / c, eps / c
    floor = -(q_true * math.log(q_true) + (c - 1) * q_other * math.log(q_other))
    run = tiny_run("smooth", f"train.label_smoothing={eps}")
    train = run.train_records
    assert losses_decrease(train, factor=0.95)
    assert all(r["loss_task"] >= floor - 1e-4 for r in train), (floor, train)
    assert baseline.train_records[-1]["loss_task"] < floor
    assert_loss_is_weighted_sum(train, alpha=0.5)


def test_outputs_written_even_without_teacher(tiny_run) -> None:
    run = tiny_run("labels", "distill.loss=none", "teacher.checkpoint=null")
    assert run.summary["teacher_top1"] is None and run.summary["agreement"] is None
    assert all(r["teacher_top1"] is None for r in run.val_records)
    assert (run.dir / "student.safetensors").is_file()

"""Unit tests for kd.core.task: how inputs reach both models and how the loss terms combine.

References are written with torch.nn.functional directly (soft and hard terms) or with the
separately tested kd.core.losses.dkd, following the table in kd/core/task.py's docstring.
"""

from __future__ import annotations

from typing import Any

import pytest
import timm
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from kd.config import DistillConfig
from kd.core.losses import dkd
from kd.core.models import FrozenTeacher, InputNorm
from kd.core.task import DistillationTask
from kd.errors import ConfigError

VIT = "vit_tiny_patch16_224"
DEIT = "deit_tiny_distilled_patch16_224"
TINY = {"img_size": 16, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}
CLASSES = 4
SMOOTHING = 0.1
HALF = ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])
IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def distill_cfg(**values: Any) -> Any:
    cfg = OmegaConf.structured(DistillConfig)
    cfg.temperature = 2.0
    cfg.alpha = 0.3
    for k, v in values.items():
        cfg[k] = v
    return cfg


def student(name: str = VIT, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(name, num_classes=CLASSES, **TINY)


def teacher(norm: tuple[list[float], list[float]] = HALF) -> FrozenTeacher:
    torch.manual_seed(1)
    model = timm.create_model(VIT, num_classes=CLASSES, **{**TINY, "embed_dim": 48})
    with torch.no_grad():  # confident, not near-uniform, teacher logits
        model.get_classifier().weight.mul_(20)
    return FrozenTeacher(model, InputNorm(*norm))


def make_task(loss: str, student_name: str = VIT, teacher_norm=HALF, with_teacher: bool = True,
              **values: Any) -> DistillationTask:
    model = student(student_name)
    return DistillationTask(model, InputNorm(*HALF), teacher(teacher_norm) if with_teacher
                            else None, distill_cfg(loss=loss, **values),
                            label_smoothing=SMOOTHING)


def batch(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=g)
    targets = torch.arange(n) % CLASSES
    return images, targets


def run(task: DistillationTask, epoch: float = 10.0):
    images, targets = batch()
    x_s, x_t = task.prepare(images)
    t = task.teacher_forward(x_t)
    out = task.student_forward(x_s)
    return out, t, targets, task.loss(out, t, targets, epoch)


def task_ref(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), targets, label_smoothing=SMOOTHING)


def soft_ref(s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    log_p_s = F.log_softmax(s.float() / temperature, dim=-1)
    log_p_t = F.log_softmax(t.float() / temperature, dim=-1)
    return F.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean") * temperature ** 2


def hard_ref(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(s.float(), t.argmax(dim=-1))


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------
# loss combination, one case per distill.loss
# ------------------------------------------------------------------------------------------


def test_loss_none_is_the_task_loss_and_skips_the_teacher() -> None:
    task = make_task("none")
    assert not task.uses_teacher
    images, _ = batch()
    assert task.prepare(images)[1] is None
    assert task.teacher_forward(None) is None
    out, t, y, terms = run(task)
    assert t is None
    close(terms["loss_task"], task_ref(out, y))
    assert torch.equal(terms["loss"], terms["loss_task"])
    assert terms["loss_kd"].item() == 0.0


def test_loss_none_without_a_teacher() -> None:
    task = make_task("none", with_teacher=False)
    out, t, y, terms = run(task)
    assert t is None
    close(terms["loss"], task_ref(out, y))


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_loss_soft(alpha: float) -> None:
    task = make_task("soft", alpha=alpha, temperature=3.0)
    out, t, y, terms = run(task)
    assert isinstance(out, torch.Tensor) and isinstance(t, torch.Tensor)
    close(terms["loss_task"], task_ref(out, y))
    close(terms["loss_kd"], soft_ref(out, t, 3.0))
    close(terms["loss"], (1 - alpha) * task_ref(out, y) + alpha * soft_ref(out, t, 3.0))
    assert terms["loss_kd"] > 0


def test_loss_hard() -> None:
    task = make_task("hard", alpha=0.6)
    out, t, y, terms = run(task)
    assert not torch.equal(t.argmax(-1), y)  # the teacher's labels are not the targets
    close(terms["loss_task"], task_ref(out, y))
    close(terms["loss_kd"], hard_ref(out, t))
    close(terms["loss"], 0.4 * task_ref(out, y) + 0.6 * hard_ref(out, t))


def test_temperature_matters_for_soft_only() -> None:
    soft = [run(make_task("soft", temperature=temp))[3]["loss_kd"] for temp in (1.0, 4.0)]
    hard = [run(make_task("hard", temperature=temp))[3]["loss_kd"] for temp in (1.0, 4.0)]
    assert not torch.equal(soft[0], soft[1])
    assert torch.equal(hard[0], hard[1])


def test_loss_dkd_warmup_epoch_zero_is_exactly_the_weighted_task_loss() -> None:
    task = make_task("dkd", alpha=0.3, dkd_warmup_epochs=5.0)
    *_, terms = run(task, epoch=0.0)
    assert terms["loss_kd"] > 0  # the DKD term is computed and logged...
    assert torch.equal(terms["loss"], (1.0 - 0.3) * terms["loss_task"])  # ...but weighted 0


@pytest.mark.parametrize("epoch, weight", [(1.0, 0.2), (2.5, 0.5), (5.0, 1.0), (12.0, 1.0)])
def test_loss_dkd_warmup_ramp(epoch: float, weight: float) -> None:
    task = make_task("dkd", alpha=0.3, dkd_warmup_epochs=5.0, dkd_alpha=1.0, dkd_beta=8.0)
    out, t, y, terms = run(task, epoch=epoch)
    kd = dkd(out, t, y, 1.0, 8.0, 2.0)
    close(terms["loss_kd"], kd)
    close(terms["loss_task"], task_ref(out, y))
    close(terms["loss"], 0.7 * task_ref(out, y) + 0.3 * weight * kd)


def test_loss_dkd_without_warmup_has_full_weight_at_once() -> None:
    task = make_task("dkd", alpha=0.5, dkd_warmup_epochs=0.0, dkd_alpha=2.0, dkd_beta=3.0)
    out, t, y, terms = run(task, epoch=0.0)
    kd = dkd(out, t, y, 2.0, 3.0, 2.0)
    close(terms["loss"], 0.5 * task_ref(out, y) + 0.5 * kd)


def _deit_task(token_loss: str) -> DistillationTask:
    task = make_task("token", student_name=DEIT, token_loss=token_loss, alpha=0.4)
    with torch.no_grad():  # make the two heads clearly different
        task.student_core.head_dist.weight.normal_(0, 1)
    return task


@pytest.mark.parametrize("token_loss", ["soft", "hard"])
def test_loss_token_uses_the_distillation_head(token_loss: str) -> None:
    task = _deit_task(token_loss)
    out, t, y, terms = run(task)
    assert isinstance(out, tuple) and len(out) == 2
    cls, dist = out
    assert not torch.allclose(cls, dist)
    kd_ref = soft_ref(dist, t, 2.0) if token_loss == "soft" else hard_ref(dist, t)
    wrong_head = soft_ref(cls, t, 2.0) if token_loss == "soft" else hard_ref(cls, t)
    close(terms["loss_task"], task_ref(cls, y))
    close(terms["loss_kd"], kd_ref)
    assert not torch.allclose(terms["loss_kd"], wrong_head)
    close(terms["loss"], 0.6 * task_ref(cls, y) + 0.4 * kd_ref)


def test_token_loss_needs_a_distilled_student() -> None:
    with pytest.raises(ConfigError, match=r"distill\.loss=token"):
        make_task("token", student_name=VIT)


@pytest.mark.parametrize("loss", ["soft", "hard", "dkd", "token"])
def test_distillation_needs_a_teacher(loss: str) -> None:
    with pytest.raises(ConfigError, match=rf"distill\.loss={loss} needs a teacher"):
        make_task(loss, student_name=DEIT, with_teacher=False)


def test_distilled_student_without_token_loss_returns_one_tensor() -> None:
    task = make_task("soft", student_name=DEIT)
    out, t, _, terms = run(task)
    assert isinstance(out, torch.Tensor) and out.shape == (6, CLASSES)
    close(terms["loss_kd"], soft_ref(out, t, 2.0))


# ------------------------------------------------------------------------------------------
# gradients, inputs, prediction
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["soft", "hard", "dkd"])
def test_teacher_gets_no_gradients(loss: str) -> None:
    task = make_task(loss)
    _, t, _, terms = run(task)
    assert not t.requires_grad
    terms["loss"].backward()
    assert task.teacher is not None
    assert all(p.grad is None for p in task.teacher.parameters())
    grads = [p.grad for p in task.student.parameters()]
    assert all(g is not None for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_teacher_gets_no_gradients_with_token_loss() -> None:
    task = _deit_task("soft")
    *_, terms = run(task)
    terms["loss"].backward()
    assert all(p.grad is None for p in task.teacher.parameters())
    assert task.student_core.head_dist.weight.grad.abs().sum() > 0
    assert task.student_core.dist_token.grad is not None


def test_prepare_shares_the_tensor_when_norms_match() -> None:
    task = make_task("soft", teacher_norm=HALF)
    assert task.share_input
    images, _ = batch()
    x_s, (x_t,) = task.prepare(images)  # one input per teacher
    assert x_t is x_s
    close(x_s, (images.float() / 255 - 0.5) / 0.5)


def test_prepare_normalises_separately_when_norms_differ() -> None:
    task = make_task("soft", teacher_norm=IMAGENET)
    assert not task.share_input
    images, _ = batch()
    x_s, (x_t,) = task.prepare(images)
    assert x_t is not x_s
    close(x_s, (images.float() / 255 - 0.5) / 0.5)
    mean = torch.tensor(IMAGENET[0]).view(3, 1, 1)
    std = torch.tensor(IMAGENET[1]).view(3, 1, 1)
    close(x_t, (images.float() / 255 - mean) / std)
    t = task.teacher_forward([x_t])
    assert task.teacher is not None
    close(t, task.teacher.model(x_t))


@pytest.mark.parametrize("train_mode", [False, True])
def test_predict_averages_the_deit_heads(train_mode: bool) -> None:
    task = _deit_task("hard")
    core = task.student_core
    images, _ = batch()
    core.train()
    with torch.no_grad():
        cls, dist = core(task.student_norm(images))  # no dropout: train = eval numerically
    core.train(train_mode)
    s, t = task.predict(images)
    close(s, (cls + dist) / 2)
    assert task.teacher is not None
    close(t, task.teacher.model(task.teacher.norm(images)))
    assert not s.requires_grad


def test_predict_with_separate_teacher_norm() -> None:
    task = make_task("soft", teacher_norm=IMAGENET)
    task.student.eval()
    images, _ = batch()
    s, t = task.predict(images)
    assert task.teacher is not None
    close(s, task.student(task.student_norm(images)))
    close(t, task.teacher.model(task.teacher.norm(images)))


def test_predict_without_teacher() -> None:
    task = make_task("none", with_teacher=False)
    s, t = task.predict(batch()[0])
    assert t is None and s.shape == (6, CLASSES)


# ------------------------------------------------------------------------------------------
# precision
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss, student_name", [("none", VIT), ("soft", VIT), ("hard", VIT),
                                                ("dkd", VIT), ("token", DEIT)])
def test_loss_terms_are_fp32_under_bf16_autocast(loss: str, student_name: str) -> None:
    task = make_task(loss, student_name=student_name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _, _, terms = run(task, epoch=1.0)
    first = out[0] if isinstance(out, tuple) else out
    assert first.dtype == torch.bfloat16  # autocast is really in effect
    assert set(terms) == {"loss", "loss_task", "loss_kd"}
    for name, value in terms.items():
        assert value.dtype == torch.float32, name
        assert value.dim() == 0, name
        assert torch.isfinite(value), name
    terms["loss"].backward()

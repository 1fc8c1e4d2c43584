"""Several teachers: the mixture the logit losses distil, and each teacher's own inputs."""

from __future__ import annotations

import pytest
import timm
import torch

from kd.core.losses import soft_kd
from kd.core.models import FrozenTeacher, InputNorm
from kd.core.teachers import TeacherSet


def member(num_classes: int = 5, mean: float = 0.5, std: float = 0.5) -> FrozenTeacher:
    model = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=8, embed_dim=16,
                              depth=1, num_heads=2, num_classes=num_classes)
    return FrozenTeacher(model, InputNorm([mean] * 3, [std] * 3))


def test_the_mixture_is_the_weighted_mean_of_probabilities_at_t() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 5, generator=g) * 3, torch.randn(4, 5, generator=g)
    teachers, t = TeacherSet([member(), member()], weights=[3.0, 1.0]), 2.0
    mixed = teachers.mix([a, b], t)
    p = 0.75 * torch.softmax(a.double() / t, -1) + 0.25 * torch.softmax(b.double() / t, -1)
    torch.testing.assert_close(torch.softmax(mixed.double() / t, -1), p)
    # The soft term of the mixture is the KL to p itself: T² · KL(p ‖ softmax(s/T)).
    s = torch.randn(4, 5, generator=g)
    reference = (p * (p.log() - torch.log_softmax(s.double() / t, -1))).sum(-1).mean() * t * t
    assert soft_kd(s, mixed, t).item() == pytest.approx(reference.item(), rel=1e-5)
    assert torch.equal(mixed.argmax(-1), p.argmax(-1))  # what the hard term distils


def test_one_teacher_passes_its_logits_through_and_headless_ones_are_left_out() -> None:
    logits = torch.randn(2, 5)
    assert TeacherSet([member()]).mix([logits], 4.0) is logits
    two = TeacherSet([member(), member(num_classes=0)], weights=[1.0, 5.0])
    assert two.mix([logits, None], 4.0) is logits  # the headless one has no probabilities
    assert two.predicts and not TeacherSet([member(num_classes=0)]).predicts
    assert TeacherSet([member(num_classes=0)]).mix([None], 4.0) is None


def test_each_teacher_gets_its_own_normalisation_and_image_size() -> None:
    teachers = TeacherSet([member(mean=0.5, std=0.5), member(mean=0.0, std=1.0)],
                          image_sizes=[None, 24])
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    x_student = (images.float() / 255 - 0.5) / 0.5
    shared = teachers.shares_input(InputNorm([0.5] * 3, [0.5] * 3))
    assert shared == [True, False]
    first, second = teachers.inputs(images, x_student, shared)
    assert first is x_student  # normalised like the student: shared
    assert second.shape[-1] == 24
    torch.testing.assert_close(second, torch.nn.functional.interpolate(
        images.float() / 255, size=24, mode="bilinear", antialias=True, align_corners=False))
    out = teachers([first, teachers[1].norm(images)])
    assert [o.shape for o in out] == [(2, 5), (2, 5)]

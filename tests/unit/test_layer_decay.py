"""optim.layer_decay: timm's layer-wise learning-rate decay through kd's optimizer and schedule."""

from __future__ import annotations

import pytest
import timm
import torch

from kd.config import FeaturePairConfig, OptimConfig, SchedConfig
from kd.core.features import FeatureDistiller
from kd.core.optim import build_optimizer, build_scheduler
from kd.errors import ConfigError


def vit(depth: int = 3) -> torch.nn.Module:
    return timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=8, embed_dim=16,
                             depth=depth, num_heads=2, num_classes=4)


def group_of(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> dict:
    return next(g for g in optimizer.param_groups if any(p is param for p in g["params"]))


@pytest.mark.parametrize("scheduled", [False, True])
def test_each_layer_learns_at_lr_times_decay_to_its_depth(scheduled: bool) -> None:
    model, lr, d = vit(depth=3), 1e-3, 0.5
    optimizer = build_optimizer(model, OptimConfig(lr=lr, layer_decay=d))
    if scheduled:  # the schedule's value times each group's scale, at every step
        scheduler = build_scheduler(optimizer, SchedConfig(name="cosine", warmup_epochs=1),
                                    100, 10)
        scheduler.step_update(50)
        lr = group_of(optimizer, model.head.weight)["lr"]
        assert 1e-5 < lr < 1e-3  # mid-schedule
    else:  # a constant learning rate
        assert build_scheduler(optimizer, SchedConfig(name="none"), 100, 10) is None
    depth = 4  # patch embedding (0), blocks 1..3, head (4)
    expected = {model.patch_embed.proj.weight: d ** depth, model.blocks[0].attn.qkv.weight:
                d ** (depth - 1), model.blocks[2].mlp.fc1.weight: d, model.head.weight: 1.0}
    for param, scale in expected.items():
        assert group_of(optimizer, param)["lr"] == pytest.approx(lr * scale)
    assert all(g["fused"] for g in optimizer.param_groups)  # still one fused kernel
    assert group_of(optimizer, model.blocks[0].norm1.weight)["weight_decay"] == 0.0


def test_projectors_learn_at_the_full_rate() -> None:
    student, x = vit(), torch.randn(1, 3, 16, 16)
    features = FeatureDistiller([FeaturePairConfig()], "linear", student, [vit()], x, [x],
                                ("s", ["t"]))
    module = features.student_module(student)
    optimizer = build_optimizer(module, OptimConfig(lr=1e-3, layer_decay=0.5))
    build_scheduler(optimizer, SchedConfig(name="none"), 100, 10)
    assert group_of(optimizer, module.projectors[0].weight)["lr"] == pytest.approx(1e-3)
    assert group_of(optimizer, module.projectors[0].bias)["weight_decay"] == 0.0
    assert group_of(optimizer, student.blocks[0].attn.qkv.weight)["lr"] < 1e-3
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(module.parameters()))


def test_a_model_timm_cannot_group_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"optim.layer_decay=0.5: timm cannot group.*null"):
        build_optimizer(torch.nn.Sequential(torch.nn.Linear(2, 2)),
                        OptimConfig(layer_decay=0.5))

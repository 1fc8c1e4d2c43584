"""Feature distillation pieces: layer taps, token alignment, projectors and the feature losses."""

from __future__ import annotations

import logging

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from kd.config import FeaturePairConfig, TeacherConfig
from kd.core.features import (
    FeatureDistiller,
    LayerTap,
    Tokens,
    WithFeatures,
    align,
    as_tokens,
    feature_loss,
)
from kd.core.models import build_teacher
from kd.errors import ConfigError


def with_class(grid: torch.Tensor, prefix: torch.Tensor) -> Tokens:
    """Tokens whose first prefix token is a class token."""
    return Tokens(grid, prefix, prefix[:, :1])


def vit(**kw: int) -> torch.nn.Module:
    args = {"img_size": 16, "patch_size": 4, "embed_dim": 16, "depth": 3, "num_heads": 2,
            "num_classes": 5, **kw}
    return timm.create_model("vit_tiny_patch16_224", **args).eval()


def cnn() -> torch.nn.Module:
    return timm.create_model("resnet10t", num_classes=5).eval()


# ------------------------------------------------------------------------------ losses
def reference(kind: str, s: torch.Tensor, t: torch.Tensor) -> float:
    """The loss in float64, written out."""
    s, t = s.double(), t.double()
    if kind == "cosine":
        cos = (s * t).sum(-1) / (s.norm(dim=-1).clamp(min=1e-8) * t.norm(dim=-1).clamp(min=1e-8))
        return float((1 - cos).mean())
    d = s - t
    if kind == "mse":
        return float((d ** 2).mean())
    a = d.abs()
    return float(torch.where(a < 1, 0.5 * d ** 2, a - 0.5).mean())


@pytest.mark.parametrize("kind", ["cosine", "mse", "smooth_l1"])
def test_feature_losses_match_float64_references(kind: str) -> None:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 7, 10, generator=g) * 2, torch.randn(3, 7, 10, generator=g)
    assert feature_loss(kind, s, t).item() == pytest.approx(reference(kind, s, t), rel=1e-5)
    assert feature_loss(kind, t, t).item() == pytest.approx(0.0, abs=1e-6)


def test_feature_loss_is_fp32_for_bf16_inputs() -> None:
    s = torch.randn(2, 3, 4).bfloat16()
    assert feature_loss("mse", s, torch.zeros_like(s)).dtype == torch.float32


# ------------------------------------------------------------------------------ tokens
def test_token_sequences_split_prefix_and_fold_the_grid() -> None:
    x = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)  # 1 prefix + 2×2 grid
    tokens = as_tokens(x, num_prefix=1)
    assert tokens.prefix.shape == (2, 1, 3) and torch.equal(tokens.prefix, x[:, :1])
    assert tokens.grid.shape == (2, 3, 2, 2)
    assert torch.equal(tokens.grid[:, :, 0, 1], x[:, 2])  # row-major patches
    assert as_tokens(torch.zeros(2, 8), 0).grid.shape == (2, 8, 1, 1)  # pooled output
    with pytest.raises(ValueError, match="square grid"):
        as_tokens(torch.zeros(2, 6, 3), num_prefix=1)


def test_patch_grids_of_other_sizes_are_resampled_to_the_students() -> None:
    g = torch.Generator().manual_seed(1)
    student = with_class(torch.randn(2, 4, 2, 2, generator=g), torch.randn(2, 1, 4, generator=g))
    teacher = with_class(torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 2, 4, generator=g))
    s, t = align(student, teacher, "patch")
    assert s.shape == t.shape == (2, 4, 4)  # the student's 2×2 grid
    expected = F.interpolate(teacher.grid, size=(2, 2), mode="bilinear", align_corners=False,
                             antialias=True)  # shrinking: averaged, not sampled
    assert torch.equal(t, expected.flatten(2).transpose(1, 2))
    s, t = align(student, teacher, "all")  # class tokens first, then the patches
    assert s.shape == (2, 5, 4) and torch.equal(t[:, 0], teacher.prefix[:, 0])
    s, t = align(student, teacher, "prefix")
    assert torch.equal(s, student.prefix[:, :1]) and torch.equal(t, teacher.prefix[:, :1])
    s, t = align(student, teacher, "pooled")
    assert torch.allclose(t[:, 0], teacher.grid.mean(dim=(2, 3)))


def test_a_cnn_map_aligns_with_a_vit_grid() -> None:
    student = with_class(torch.randn(2, 8, 4, 4), torch.randn(2, 1, 8))
    teacher = Tokens(torch.randn(2, 8, 8, 8), None)  # a CNN stage: no prefix tokens
    s, t = align(student, teacher, "all")  # no class token on one side: patches only
    assert s.shape == t.shape == (2, 16, 8)


# ------------------------------------------------------------------------------ taps
def test_block_indices_come_from_forward_intermediates_in_one_forward() -> None:
    model, x = vit(), torch.randn(2, 3, 16, 16)
    out, tokens = LayerTap(model, [-1, 0, 2], "student", "vit")(x)
    torch.testing.assert_close(out, model(x))  # forward_head(final) is the model's forward
    _, reference_blocks = model.forward_intermediates(x, indices=[0, 2],
                                                       return_prefix_tokens=True)
    assert torch.equal(tokens[0].grid, reference_blocks[1][0])  # -1 is block 2
    assert torch.equal(tokens[1].grid, reference_blocks[0][0])
    assert torch.equal(tokens[2].prefix, reference_blocks[1][1])
    assert tokens[0].grid.shape == (2, 16, 4, 4) and tokens[0].prefix.shape == (2, 1, 16)


def test_module_paths_are_taken_with_hooks() -> None:
    model, x = vit(), torch.randn(2, 3, 16, 16)
    out, (tokens,) = LayerTap(model, ["blocks.1"], "teacher", "vit")(x)
    torch.testing.assert_close(out, model(x))
    _, (block,) = model.forward_intermediates(x, indices=[1], return_prefix_tokens=True)
    assert torch.equal(tokens.grid, block[0]) and torch.equal(tokens.prefix, block[1])


def test_a_cnn_teacher_stage_is_a_grid() -> None:
    _, (tokens,) = LayerTap(cnn(), [-1], "teacher", "resnet10t")(torch.randn(1, 3, 32, 32))
    assert tokens.prefix is None and tokens.grid.shape == (1, 512, 1, 1)


@pytest.mark.parametrize("layer, message", [
    (3, r"distill.features\[0\].student: 3 is not a block of student vit \(it has 3: 0 to 2"),
    (-4, "is not a block"),
    ("blocks.9", r"has no module 'blocks.9' \(did you mean 'blocks.2'\?\)"),
    ("", "has no module"),
])
def test_unknown_layers_name_the_key(layer: int | str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        LayerTap(vit(), [layer], "student", "vit")


def test_a_block_index_needs_forward_intermediates() -> None:
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    with pytest.raises(ConfigError, match=r"no forward_intermediates.*module path"):
        LayerTap(model, [0], "teacher", "mlp")


# ------------------------------------------------------------------------------ projectors
def distiller(pairs: list[FeaturePairConfig], projector: str = "linear",
              teacher: torch.nn.Module | None = None) -> FeatureDistiller:
    teacher = teacher if teacher is not None else vit(embed_dim=24, patch_size=8)
    x = torch.randn(1, 3, 16, 16)
    return FeatureDistiller(pairs, projector, vit(), [teacher], x, [x], ("s", ["t"]))


def test_projectors_map_to_the_teachers_width_and_their_gradients_reach_the_student() -> None:
    pairs = [FeaturePairConfig(student=-1, teacher=-1, loss="cosine"),
             FeaturePairConfig(student=0, teacher=0, loss="mse", tokens="patch", weight=0.5)]
    fd = distiller(pairs, "mlp")
    module = fd.student_module(fd.student_tap.model).train()
    x = torch.randn(4, 3, 16, 16)
    student_out = module(x)
    assert isinstance(student_out, WithFeatures)
    assert student_out.features[0].grid.shape == (4, 24, 4, 4)  # projected to 24 channels
    with torch.no_grad():
        teacher_out = fd.teacher_taps[0](x)
    terms = fd.terms(student_out.features, teacher_out.features)
    assert list(terms) == ["loss_feat_0", "loss_feat_1"]
    fd.weighted_sum(terms).backward()
    for name, p in module.named_parameters():
        if name.startswith(("projectors.", "student.blocks.0.")):
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_projector_none_needs_equal_widths() -> None:
    with pytest.raises(ConfigError, match=r"distill.projector=none but distill.features\[0\] "
                                          r"maps 16 student channels onto 24"):
        distiller([FeaturePairConfig()], "none")
    fd = distiller([FeaturePairConfig()], "none", teacher=vit())
    assert isinstance(fd.projectors[0], torch.nn.Identity)


def test_prefix_tokens_need_a_class_token_on_both_sides() -> None:
    with pytest.raises(ConfigError, match=r"features\[0\].tokens=prefix but the teacher layer"):
        distiller([FeaturePairConfig(tokens="prefix")], teacher=cnn())


# ------------------------------------------------------------------------------ headless
def test_a_headless_teacher_loads_a_checkpoint_with_a_head(tmp_path, caplog) -> None:
    donor = vit()
    path = tmp_path / "teacher.safetensors"
    save_file(donor.state_dict(), str(path))
    cfg = TeacherConfig(name="vit_tiny_patch16_224", checkpoint=str(path), kwargs={
        "img_size": 16, "patch_size": 4, "embed_dim": 16, "depth": 3, "num_heads": 2,
        "num_classes": 0})
    with caplog.at_level(logging.INFO, logger="kd"):
        teacher = build_teacher(cfg, num_classes=5)
    assert teacher.headless
    assert "classifier head.bias, head.weight left out" in caplog.text
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(teacher(x), donor.forward_head(donor.forward_features(x),
                                                              pre_logits=True))


@pytest.mark.parametrize("name, kwargs, prefix", [
    ("deit_tiny_distilled_patch16_224", {}, 2),  # class and distillation tokens
    ("vit_tiny_patch16_224", {"reg_tokens": 4}, 5),  # class and 4 register tokens
    ("vit_tiny_patch16_224", {"class_token": False, "global_pool": "avg"}, 0),
    ("vit_tiny_patch16_224", {"class_token": False, "reg_tokens": 4, "global_pool": "avg"}, 4),
])
def test_prefix_tokens_of_every_kind_split_from_the_grid(name: str, kwargs: dict,
                                                         prefix: int) -> None:
    model = timm.create_model(name, img_size=16, patch_size=4, embed_dim=16, depth=2,
                              num_heads=2, num_classes=5, **kwargs).eval()
    x = torch.randn(2, 3, 16, 16)
    by_index = LayerTap(model, [-1], "teacher", name)(x).features[0]
    by_path = LayerTap(model, ["blocks.1"], "teacher", name)(x).features[0]
    for tokens in (by_index, by_path):
        assert tokens.grid.shape == (2, 16, 4, 4)
        assert (tokens.prefix.shape[1] if tokens.prefix is not None else 0) == prefix
    torch.testing.assert_close(by_index.grid, by_path.grid)
    student = with_class(torch.randn(2, 16, 2, 2), torch.randn(2, 1, 16))
    s, t = align(student, by_index, "all")  # only a class token joins the patches
    has_class = kwargs.get("class_token", True)
    assert (by_index.cls is not None) == has_class  # register tokens are not class tokens
    assert s.shape == t.shape == (2, 4 + has_class, 16)


def test_the_projectors_module_keeps_timms_no_weight_decay_names() -> None:
    """Position embeddings and class tokens stay without weight decay under the wrapper."""
    from kd.config import OptimConfig
    from kd.core.optim import build_optimizer

    fd = distiller([FeaturePairConfig()])
    module = fd.student_module(fd.student_tap.model)
    optimizer = build_optimizer(module, OptimConfig(weight_decay=0.05))
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    student = fd.student_tap.model
    assert decay[id(student.pos_embed)] == decay[id(student.cls_token)] == 0.0
    assert decay[id(student.blocks[0].attn.qkv.weight)] == 0.05


def test_channels_last_module_outputs_become_channels_first_grids() -> None:
    model = timm.create_model("swin_tiny_patch4_window7_224", img_size=32, window_size=2,
                              embed_dim=16, depths=(1, 1), num_heads=(1, 2), num_classes=3)
    tokens = LayerTap(model.eval(), ["layers.1"], "teacher", "swin")(
        torch.randn(1, 3, 32, 32)).features[0]
    assert tokens.grid.shape == (1, 32, 4, 4) and tokens.prefix is None

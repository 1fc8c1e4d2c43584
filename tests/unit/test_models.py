"""Unit tests for kd.core.models: safe weight loading, the frozen teacher, input normalisation."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

import kd
from kd.config import StudentConfig, TeacherConfig
from kd.core import models
from kd.core.models import (
    FrozenTeacher,
    InputNorm,
    build_input_norm,
    build_student,
    build_teacher,
    load_state_dict,
    resolve_path,
)
from kd.errors import CheckpointError, ConfigError

VIT = "vit_tiny_patch16_224"
TINY = {"img_size": 16, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}


def tiny_vit(num_classes: int = 4, **kw: Any) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(VIT, num_classes=num_classes, **{**TINY, **kw})


def teacher_cfg(**values: Any) -> Any:
    cfg = OmegaConf.structured(TeacherConfig)
    cfg.name, cfg.kwargs = VIT, dict(TINY)
    for k, v in values.items():
        cfg[k] = v
    return cfg


def save_teacher(path: Path, model: torch.nn.Module) -> str:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------------------------------
# load_state_dict
# ------------------------------------------------------------------------------------------


def test_resolve_kd_path_points_at_the_shipped_teacher() -> None:
    p = resolve_path("kd://assets/digits_teacher.safetensors")
    assert p.is_file()
    assert p == Path(kd.__file__).resolve().parent / "assets" / "digits_teacher.safetensors"
    assert resolve_path("some/rel.pt") == Path("some/rel.pt")


def test_load_safetensors(tmp_path: Path) -> None:
    model = tiny_vit()
    path = save_teacher(tmp_path / "w.safetensors", model)
    assert_same_state(load_state_dict(path), model.state_dict())


def _wrap(kind: str, sd: dict[str, torch.Tensor]) -> Any:
    return {
        "plain": sd,
        "state_dict": {"state_dict": sd, "epoch": 3},
        "model": {"model": sd, "optimizer": {"lr": 0.1}},
        "state_dict_ema": {"state_dict_ema": sd, "state_dict": {"x": torch.zeros(1)}},
        "module_prefix": {f"module.{k}": v for k, v in sd.items()},
        "model_module_prefix": {"model": {f"module.{k}": v for k, v in sd.items()}},
    }[kind]


@pytest.mark.parametrize("suffix", [".pt", ".pth"])
@pytest.mark.parametrize("kind", ["plain", "state_dict", "model", "state_dict_ema",
                                  "module_prefix", "model_module_prefix"])
def test_load_torch_files_unwraps(tmp_path: Path, suffix: str, kind: str) -> None:
    sd = tiny_vit().state_dict()
    path = tmp_path / f"w{suffix}"
    torch.save(_wrap(kind, sd), path)
    key = "state_dict_ema" if kind == "state_dict_ema" else None  # EMA only when asked for
    assert_same_state(load_state_dict(str(path), key=key), sd)


class _Marker:
    """Unpickling this would call ``open(marker, "w")`` and create the marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("payload", ["instance", "function", "instance_in_state"])
def test_pickled_code_is_refused_and_never_runs(tmp_path: Path, payload: str) -> None:
    marker = tmp_path / "ran"
    obj = {
        "instance": {"w": torch.zeros(2), "x": _Marker(str(marker))},
        "function": {"w": torch.zeros(2), "fn": os.getcwd},
        "instance_in_state": {"state_dict": {"w": torch.zeros(2)}, "x": _Marker(str(marker))},
    }[payload]
    path = tmp_path / "evil.pt"
    torch.save(obj, path)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_state_dict(str(path))
    assert not marker.exists()


def test_non_tensor_values_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    torch.save({"w": torch.zeros(2), "epoch": 3}, path)
    with pytest.raises(CheckpointError, match="not a state dict of tensors"):
        load_state_dict(str(path))
    torch.save([torch.zeros(2)], path)
    with pytest.raises(CheckpointError, match="not a state dict of tensors"):
        load_state_dict(str(path))


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_file_is_a_checkpoint_error(tmp_path: Path, suffix: str, damage: str) -> None:
    sd = tiny_vit().state_dict()
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": os.urandom(512),
                      "empty": b""}[damage])
    with pytest.raises(CheckpointError, match="cannot read checkpoint") as info:
        load_state_dict(str(path))
    assert "\n" not in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_state_dict(str(tmp_path / "nope.safetensors"))


# ------------------------------------------------------------------------------------------
# build_teacher
# ------------------------------------------------------------------------------------------


def test_teacher_from_checkpoint_is_frozen_and_reproduces_the_source(tmp_path: Path) -> None:
    source = tiny_vit().eval()
    teacher = build_teacher(teacher_cfg(checkpoint=save_teacher(tmp_path / "t.safetensors",
                                                                source)), 4)
    assert isinstance(teacher, FrozenTeacher)
    assert not teacher.training and not teacher.model.training
    assert all(not p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training
    assert all(not m.training for m in teacher.modules())
    x = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        expected = source(teacher.norm(x))
    out = teacher(teacher.norm(x))
    assert torch.equal(out, expected)
    assert not out.requires_grad


def test_teacher_from_wrapped_pt_checkpoint(tmp_path: Path) -> None:
    source = tiny_vit().eval()
    path = tmp_path / "t.pth"
    torch.save({"model": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    teacher = build_teacher(teacher_cfg(checkpoint=str(path)), 4)
    assert teacher is not None
    assert_same_state(teacher.model.state_dict(), source.state_dict())


@pytest.mark.parametrize("name", [VIT, "deit_tiny_distilled_patch16_224"])
def test_teacher_head_of_another_size(tmp_path: Path, name: str) -> None:
    torch.manual_seed(0)
    source = timm.create_model(name, num_classes=5, **TINY)
    path = save_teacher(tmp_path / "t.safetensors", source)
    with pytest.raises(CheckpointError) as info:
        build_teacher(teacher_cfg(name=name, checkpoint=path), 4)
    assert "data.num_classes=4" in str(info.value)
    assert "5-class" in str(info.value)


@pytest.mark.parametrize("other", [
    {"embed_dim": 48},  # wrong shapes
    {"depth": 2},  # missing keys (checkpoint has fewer blocks)
    {"class_token": False, "global_pool": "avg"},  # unexpected key cls_token
])
def test_teacher_checkpoint_of_another_architecture(tmp_path: Path, other: dict) -> None:
    source = tiny_vit(**other)
    path = save_teacher(tmp_path / "t.safetensors", source)
    with pytest.raises(CheckpointError, match=r"does not fit teacher\.name/teacher\.kwargs"):
        build_teacher(teacher_cfg(checkpoint=path), 4)


def test_teacher_missing_checkpoint_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        build_teacher(teacher_cfg(checkpoint=str(tmp_path / "missing.safetensors")), 4)


def test_no_teacher_weights_gives_none() -> None:
    assert build_teacher(teacher_cfg(), 4) is None


def test_shipped_demo_teacher_loads() -> None:
    from kd.config import DEMO_PRESET, load_config

    cfg = load_config(DEMO_PRESET)
    teacher = build_teacher(cfg.teacher, cfg.data.num_classes)
    assert teacher is not None
    assert teacher.norm.mean.shape == (1, 1, 1)
    out = teacher(teacher.norm(torch.rand(2, 1, 16, 16)))
    assert out.shape == (2, 10)


class _FakeCreate:
    """Stands in for timm.create_model: records the call, returns a tiny random model."""

    def __init__(self, classes: int) -> None:
        self.classes = classes
        self.calls: list[dict[str, Any]] = []
        self.real = timm.create_model

    def __call__(self, name: str, **kwargs: Any) -> torch.nn.Module:
        self.calls.append({"name": name, **kwargs})
        kwargs.pop("pretrained", None)
        kwargs.setdefault("num_classes", self.classes)
        return self.real(name, **kwargs)


@pytest.mark.parametrize("classes, ok", [(1000, False), (4, True)])
def test_pretrained_teacher_head_must_match(monkeypatch: pytest.MonkeyPatch, classes: int,
                                            ok: bool) -> None:
    fake = _FakeCreate(classes)
    monkeypatch.setattr(timm, "create_model", fake)
    cfg = teacher_cfg(pretrained=True)
    if ok:
        teacher = build_teacher(cfg, 4)
        assert teacher is not None and models.num_outputs(teacher.model) == 4
    else:
        with pytest.raises(ConfigError) as info:
            build_teacher(cfg, 4)
        assert "1000 classes" in str(info.value) and "data.num_classes=4" in str(info.value)
    # The head is never resized: timm would silently put a random classifier there.
    assert len(fake.calls) == 1
    assert fake.calls[0]["pretrained"] is True
    assert "num_classes" not in fake.calls[0]


# ------------------------------------------------------------------------------------------
# model creation
# ------------------------------------------------------------------------------------------


def test_unknown_model_name_suggests_the_closest() -> None:
    with pytest.raises(ConfigError) as info:
        models.create_timm_model("vit_tiny_patch16_22", "student")
    assert "student.name" in str(info.value)
    assert "did you mean 'vit_tiny_patch16_224'?" in str(info.value)


def test_unknown_teacher_name_via_build_teacher(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"teacher\.name"):
        build_teacher(teacher_cfg(name="no_such_model_xyz", checkpoint=str(tmp_path / "x")), 4)


@pytest.mark.parametrize("kwargs", [{"foo": 1}, {"embed_dim": 30, "num_heads": 4}])
def test_bad_model_kwargs_are_config_errors(kwargs: dict) -> None:
    with pytest.raises(ConfigError, match=r"student\.kwargs"):
        models.create_timm_model(VIT, "student", **{**TINY, **kwargs})


def test_build_student_uses_config_and_num_classes() -> None:
    cfg = OmegaConf.structured(StudentConfig)
    cfg.name, cfg.kwargs = VIT, {**TINY, "in_chans": 1}
    student = build_student(cfg, 7)
    assert models.num_outputs(student) == 7
    assert student.training
    assert student(torch.rand(2, 1, 16, 16)).shape == (2, 7)
    assert all(p.requires_grad for p in student.parameters())


def test_is_distilled_vit() -> None:
    assert not models.is_distilled_vit(tiny_vit())
    deit = timm.create_model("deit_tiny_distilled_patch16_224", num_classes=4, **TINY)
    assert models.is_distilled_vit(deit)


# ------------------------------------------------------------------------------------------
# input normalisation
# ------------------------------------------------------------------------------------------


def _values(t: torch.Tensor) -> list[float]:
    return t.flatten().tolist()


def test_norm_defaults_to_the_pretrained_config() -> None:
    model = tiny_vit()
    model.pretrained_cfg = {**model.pretrained_cfg, "mean": (0.1, 0.2, 0.3),
                            "std": (0.4, 0.5, 0.6)}
    norm = build_input_norm(model, None, None, "student")
    assert _values(norm.mean) == pytest.approx([0.1, 0.2, 0.3])
    assert _values(norm.std) == pytest.approx([0.4, 0.5, 0.6])


def test_config_values_win_over_the_pretrained_config() -> None:
    model = tiny_vit()
    model.pretrained_cfg = {**model.pretrained_cfg, "mean": (0.1, 0.2, 0.3),
                            "std": (0.4, 0.5, 0.6)}
    norm = build_input_norm(model, [0.7, 0.8, 0.9], [0.2], "student")
    assert _values(norm.mean) == pytest.approx([0.7, 0.8, 0.9])
    assert _values(norm.std) == pytest.approx([0.2, 0.2, 0.2])


def test_norm_without_pretrained_config_uses_half() -> None:
    model = tiny_vit(in_chans=1)
    model.pretrained_cfg = {}
    norm = build_input_norm(model, None, None, "student")
    assert _values(norm.mean) == [0.5] and _values(norm.std) == [0.5]


def test_equal_pretrained_values_broadcast_to_one_channel() -> None:
    model = tiny_vit(in_chans=1)
    model.pretrained_cfg = {**model.pretrained_cfg, "mean": (0.5, 0.5, 0.5),
                            "std": (0.25, 0.25, 0.25)}
    norm = build_input_norm(model, None, None, "teacher")
    assert _values(norm.mean) == [0.5] and _values(norm.std) == [0.25]


@pytest.mark.parametrize("given", [None, [0.1, 0.2, 0.3]])
def test_unequal_three_values_for_one_channel_is_an_error(given: list[float] | None) -> None:
    model = tiny_vit(in_chans=1)
    model.pretrained_cfg = {**model.pretrained_cfg, "mean": (0.485, 0.456, 0.406),
                            "std": (0.5, 0.5, 0.5)}
    with pytest.raises(ConfigError) as info:
        build_input_norm(model, given, None, "teacher")
    assert "teacher.mean" in str(info.value)
    assert "1 channels" in str(info.value)


def test_input_norm_scales_uint8() -> None:
    norm = InputNorm([0.1, 0.2, 0.3], [0.5, 0.25, 2.0])
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8, generator=g)
    out = norm(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, norm(x.float() / 255), rtol=0, atol=0)
    expected = (x.float() / 255 - torch.tensor([0.1, 0.2, 0.3]).view(3, 1, 1)) / \
        torch.tensor([0.5, 0.25, 2.0]).view(3, 1, 1)
    torch.testing.assert_close(out, expected)


def test_input_norm_does_not_modify_its_input() -> None:
    norm = InputNorm([0.5], [0.5])
    x = torch.rand(2, 1, 4, 4)
    before = x.clone()
    norm(x)
    assert torch.equal(x, before)


def test_input_norm_same_as() -> None:
    a = InputNorm([0.5, 0.5, 0.5], [0.2, 0.2, 0.2])
    assert a.same_as(InputNorm([0.5, 0.5, 0.5], [0.2, 0.2, 0.2]))
    assert not a.same_as(InputNorm([0.5, 0.5, 0.5], [0.2, 0.2, 0.3]))
    assert not a.same_as(InputNorm([0.4, 0.5, 0.5], [0.2, 0.2, 0.2]))


# ------------------------------------------------------------------ channels of data vs model
def test_grey_data_for_an_rgb_model_is_replicated_and_said_once(
        caplog: pytest.LogCaptureFixture) -> None:
    model = tiny_vit()  # in_chans 3
    norm = InputNorm([0.1, 0.2, 0.3], [0.5, 0.25, 2.0])
    grey = torch.rand(1, 1, 16, 16)
    with caplog.at_level("INFO", logger="kd"):
        models.check_model_input(model, norm, grey, section="teacher", name=VIT, image_size=16)
    said = [r.getMessage() for r in caplog.records if "replicated" in r.getMessage()]
    assert len(said) == 1 and "data.grey_to_rgb" in said[0] and "teacher" in said[0]
    torch.testing.assert_close(norm(grey), norm(grey.expand(-1, 3, -1, -1)), rtol=0, atol=0)


def test_grey_data_is_refused_when_replication_is_off() -> None:
    with pytest.raises(ConfigError, match=r"student\.kwargs\.in_chans.*data\.grey_to_rgb"):
        models.check_model_input(tiny_vit(), InputNorm([0.5] * 3, [0.5] * 3),
                                 torch.rand(1, 1, 16, 16), section="student", name=VIT,
                                 image_size=16, grey_to_rgb=False)


@pytest.mark.parametrize("data, model", [(3, 1), (1, 4), (4, 3)])
def test_other_channel_differences_name_in_chans(data: int, model: int) -> None:
    norm = InputNorm([0.5] * model, [0.5] * model)
    with pytest.raises(ConfigError) as info:
        models.check_model_input(tiny_vit(in_chans=model), norm, torch.rand(1, data, 16, 16),
                                 section="student", name=VIT, image_size=16)
    assert f"set student.kwargs.in_chans={data}" in str(info.value)
    assert f"takes {model}" in str(info.value)


# ------------------------------------------------- teacher checkpoints in the formats people have
def timm_train_checkpoint(path: Path, plain: torch.nn.Module, ema: torch.nn.Module) -> Path:
    """What timm's train.py (CheckpointSaver) writes: its argparse Namespace included."""
    import argparse

    optimizer = torch.optim.AdamW(plain.parameters())
    torch.save({"epoch": 3, "arch": VIT, "state_dict": plain.state_dict(),
                "optimizer": optimizer.state_dict(), "version": 2,
                "args": argparse.Namespace(model=VIT, lr=5e-4, epochs=300, amp=True),
                "state_dict_ema": ema.state_dict(), "metric": 71.2}, path)
    return path


def lightning_checkpoint(path: Path, monkeypatch: pytest.MonkeyPatch,
                         modules: dict[str, torch.nn.Module]) -> Path:
    """What PyTorch Lightning's Trainer.save_checkpoint writes for a LightningModule holding
    ``modules`` as attributes, its hyper-parameters an AttributeDict (lightning is not
    installed here: a stand-in module of that name pickles it under the real name)."""
    import sys
    import types

    data = types.ModuleType("lightning.fabric.utilities.data")

    class AttributeDict(dict):
        pass

    AttributeDict.__module__, AttributeDict.__qualname__ = data.__name__, "AttributeDict"
    data.AttributeDict = AttributeDict
    for name in ("lightning", "lightning.fabric", "lightning.fabric.utilities"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, data.__name__, data)
    state = {f"{attr}.{k}": v for attr, m in modules.items() for k, v in m.state_dict().items()}
    torch.save({"epoch": 9, "global_step": 900, "pytorch-lightning_version": "2.5.1",
                "state_dict": state, "loops": {"fit_loop": {"epoch_progress": {"current": 9}}},
                "callbacks": {"ModelCheckpoint{'monitor': 'val_acc'}": {"best_model_score":
                                                                       torch.tensor(0.71)}},
                "optimizer_states": [torch.optim.AdamW(
                    next(iter(modules.values())).parameters()).state_dict()],
                "lr_schedulers": [], "hparams_name": "kwargs",
                "hyper_parameters": AttributeDict(lr=1e-3, backbone=VIT)}, path)
    for name in ("lightning", "lightning.fabric", "lightning.fabric.utilities", data.__name__):
        monkeypatch.delitem(sys.modules, name)  # loading must not need them
    return path


def test_timm_training_checkpoint_loads_plain_weights_by_default(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    plain, ema = tiny_vit(), tiny_vit()
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(1.0)
    path = timm_train_checkpoint(tmp_path / "model_best.pth.tar", plain, ema)
    with caplog.at_level("INFO", logger="kd"):
        teacher = build_teacher(teacher_cfg(checkpoint=str(path)), 4)
    assert_same_state(teacher.model.state_dict(), plain.state_dict())
    assert "'state_dict' entry" in caplog.text
    teacher = build_teacher(teacher_cfg(checkpoint=str(path), checkpoint_key="state_dict_ema"), 4)
    assert_same_state(teacher.model.state_dict(), ema.state_dict())


def test_lightning_checkpoint_strips_its_model_prefix(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    source = tiny_vit()
    criterion = torch.nn.Linear(2, 2)  # another part of the LightningModule: ignored
    path = lightning_checkpoint(tmp_path / "epoch=9.ckpt", monkeypatch,
                                {"model": source, "criterion": criterion})
    with caplog.at_level("INFO", logger="kd"):
        teacher = build_teacher(teacher_cfg(checkpoint=str(path)), 4)
    assert_same_state(teacher.model.state_dict(), source.state_dict())
    assert "prefix 'model.'" in caplog.text and "2 entries outside it ignored" in caplog.text


def test_two_prefixes_that_fit_are_an_error_naming_both(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    student, teacher = tiny_vit(), tiny_vit()
    with torch.no_grad():
        for p in teacher.parameters():
            p.mul_(2.0)
    path = lightning_checkpoint(tmp_path / "kd.ckpt", monkeypatch,
                                {"student": student, "teacher": teacher})
    with pytest.raises(CheckpointError) as info:
        build_teacher(teacher_cfg(checkpoint=str(path)), 4)
    assert "'student.'" in str(info.value) and "'teacher.'" in str(info.value)
    assert "teacher.checkpoint_prefix" in str(info.value)
    chosen = build_teacher(teacher_cfg(checkpoint=str(path), checkpoint_prefix="teacher."), 4)
    assert_same_state(chosen.model.state_dict(), teacher.state_dict())


@pytest.mark.parametrize("values, needle", [
    ({"checkpoint_key": "nope"}, "teacher.checkpoint_key=nope"),
    ({"checkpoint_prefix": "net."}, "teacher.checkpoint_prefix=net."),
])
def test_a_key_or_prefix_the_file_lacks_names_the_setting(tmp_path: Path, values: dict[str, str],
                                                          needle: str) -> None:
    path = timm_train_checkpoint(tmp_path / "last.pth.tar", tiny_vit(), tiny_vit())
    with pytest.raises(CheckpointError, match=re.escape(needle)):
        build_teacher(teacher_cfg(checkpoint=str(path), **values), 4)


def test_an_ema_only_checkpoint_says_how_to_load_it(tmp_path: Path) -> None:
    path = tmp_path / "ema.pt"
    torch.save({"state_dict_ema": tiny_vit().state_dict(), "epoch": 3}, path)
    with pytest.raises(CheckpointError, match=r"teacher\.checkpoint_key=state_dict_ema"):
        build_teacher(teacher_cfg(checkpoint=str(path)), 4)

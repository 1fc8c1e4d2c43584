"""`kd eval` and `kd export` on checkpoints of a real run, through the CLI."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from safetensors.torch import load_file

from kd.config import DEMO_PRESET, load_config
from kd.core.models import build_student
from kd.core.trainer import Trainer
from kd.tools.export import export_student
from tests.conftest import ROOT, TINY
from tests.integration.conftest import (
    Run,
    assert_one_line_user_error,
    assert_same_weights,
    kd_cli,
    train_tiny,
)

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_KWARGS = dict(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2)


@pytest.fixture(scope="module")
def run(tiny_teacher: str, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """configs/tiny.yaml: checkpoints at steps 8 (end of epoch 1), 12 and 16."""
    return train_tiny(tiny_teacher, tmp_path_factory.mktemp("trained") / "run")


def val_record(run: Run, step: int) -> dict[str, Any]:
    (record,) = [r for r in run.val_records if r["step"] == step]
    return record


def student_from_checkpoint(checkpoint: Path) -> torch.nn.Module:
    cfg = load_config(str(checkpoint / "config.yaml"))
    model = build_student(cfg.student, cfg.data.num_classes)
    model.load_state_dict(load_file(str(checkpoint / "student.safetensors")))
    return model.eval()


def assert_same_outputs(model: torch.nn.Module, reference: torch.nn.Module,
                        x: torch.Tensor) -> None:
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), reference.eval()(x))


# ------------------------------------------------------------------------------------ eval
def test_eval_without_config_writes_run_eval_json(run: Run) -> None:
    checkpoint = run.checkpoint(16)
    result = kd_cli("eval", "--checkpoint", str(checkpoint))
    assert result.returncode == 0, result.stderr[-3000:]
    out = run.dir / "eval.json"  # default: <run>/eval.json
    written = json.loads(out.read_text())
    final = val_record(run, 16)
    for key in ("student_top1", "student_top5", "teacher_top1", "agreement"):
        assert written[key] == final[key], key
    assert written["step"] == 16
    assert written["checkpoint"] == str(checkpoint)
    assert f"{100 * final['student_top1']:.2f} %" in result.stdout
    assert "student top-1" in result.stdout and "teacher top-1" in result.stdout


def test_eval_with_config_and_out_on_an_earlier_checkpoint(run: Run, tiny_teacher: str,
                                                           tmp_path: Path) -> None:
    out = tmp_path / "reports" / "step8.json"
    result = kd_cli("eval", "-c", TINY, f"teacher.checkpoint={tiny_teacher}",
                    f"output_dir={tmp_path / 'unused'}", "--checkpoint", str(run.checkpoint(8)),
                    "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    written = json.loads(out.read_text())
    at_epoch_1 = val_record(run, 8)  # the evaluation the run made at this checkpoint's step
    for key in ("student_top1", "student_top5", "teacher_top1", "agreement"):
        assert written[key] == at_epoch_1[key], key
    assert written["step"] == 8
    assert not (tmp_path / "unused").exists()  # eval writes only --out


def test_eval_of_a_corrupt_checkpoint_is_a_user_error(run: Run, tmp_path: Path) -> None:
    checkpoint = tmp_path / "run" / "checkpoints" / "step_00000016"
    shutil.copytree(run.checkpoint(16), checkpoint)
    weights = checkpoint / "student.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside the tensor data
    weights.write_bytes(bytes(data))
    result = kd_cli("eval", "--checkpoint", str(checkpoint))
    assert_one_line_user_error(result, "corrupt", "student.safetensors")
    assert not (tmp_path / "run" / "eval.json").exists()


# ---------------------------------------------------------------------------------- export
@pytest.fixture(scope="module")
def exported(run: Run, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export") / "student"
    result = kd_cli("export", "--checkpoint", str(run.checkpoint(16)), "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert str(out) in result.stdout
    return out


def test_export_and_eval_take_the_run_directory_and_best(run: Run, tmp_path: Path) -> None:
    """--checkpoint as users pass it: the run (its newest checkpoint), its checkpoints/ folder
    with --best (the one best.json names)."""
    out = tmp_path / "newest"
    result = kd_cli("export", "--checkpoint", str(run.dir), "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_weights(load_file(str(out / "model.safetensors")),
                        load_file(str(run.checkpoint(16) / "student.safetensors")))
    best = json.loads((run.dir / "checkpoints" / "best.json").read_text())
    report = tmp_path / "best.json"
    result = kd_cli("eval", "--checkpoint", str(run.dir / "checkpoints"), "--best", "--out",
                    str(report))
    assert result.returncode == 0, result.stderr[-3000:]
    written = json.loads(report.read_text())
    assert written["step"] == best["step"]
    assert written["checkpoint"] == str(run.dir / "checkpoints" / best["checkpoint"])
    assert written["student_top1"] == val_record(run, best["step"])["student_top1"]
    assert f"the best in {run.dir / 'checkpoints'}" in result.stderr


def test_export_writes_safetensors_and_timm_config(run: Run, exported: Path) -> None:
    assert sorted(p.name for p in exported.iterdir()) == ["README.md", "config.json",
                                                          "model.safetensors"]  # + the card
    assert_same_weights(load_file(str(exported / "model.safetensors")),
                        load_file(str(run.checkpoint(16) / "student.safetensors")))
    config = json.loads((exported / "config.json").read_text())
    assert config["architecture"] == "vit_tiny_patch16_224"
    assert config["num_classes"] == 4
    assert {k: config["model_args"][k] for k in ("patch_size", "embed_dim", "depth",
                                                 "num_heads")} == \
        {k: TINY_KWARGS[k] for k in ("patch_size", "embed_dim", "depth", "num_heads")}
    assert list(config["pretrained_cfg"]["input_size"]) == [3, 16, 16]


def test_export_loads_in_timm_by_name(run: Run, exported: Path) -> None:
    """The name + kwargs route. timm drops a classifier whose size differs from the model's
    registered pretrained_cfg (1000 classes) unless the overlay says num_classes too."""
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=True,
        pretrained_cfg_overlay=dict(file=str(exported / "model.safetensors"), num_classes=4),
        num_classes=4, **TINY_KWARGS)
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert_same_outputs(model, student_from_checkpoint(run.checkpoint(16)), x)


def test_export_loads_in_timm_from_local_dir(run: Run, exported: Path) -> None:
    model = timm.create_model("local-dir:" + str(exported), pretrained=True)
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    assert_same_outputs(model, student_from_checkpoint(run.checkpoint(16)), x)


def test_export_of_a_distilled_deit_student(tiny_run, tmp_path: Path) -> None:
    deit = tiny_run("deit", "distill.loss=token", "student.name=deit_tiny_distilled_patch16_224")
    out, _ = export_student(deit.checkpoint(16), tmp_path / "export")
    model = timm.create_model("local-dir:" + str(out), pretrained=True)
    reference = student_from_checkpoint(deit.checkpoint(16))
    assert_same_outputs(model, reference, torch.rand(4, 3, 16, 16))


def _readme_export_section() -> tuple[str, str]:
    readme = (ROOT / "README.md").read_text()
    section = re.search(r"^## Export\n(.*?)(?=^## )", readme, flags=re.S | re.M)
    assert section, "README lost its '## Export' section"
    out_dir = re.search(r"kd export .*--out (\S+)", section.group(1))
    code = re.search(r"```python\n(.*?)```", section.group(1), flags=re.S)
    assert out_dir and code, section.group(1)
    return out_dir.group(1), code.group(1)


def test_readme_export_recipe_loads_the_trained_student(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the README's Python snippet as written against an export of a demo-shaped student."""
    out_dir, code = _readme_export_section()
    cfg = load_config(DEMO_PRESET, [f"output_dir={tmp_path / 'demo'}", "train.max_steps=2"])
    Trainer(cfg).train()
    checkpoint = tmp_path / "demo" / "checkpoints" / "step_00000002"
    export_student(checkpoint, tmp_path / out_dir)
    reference = student_from_checkpoint(checkpoint)

    created: list[torch.nn.Module] = []
    create_model = timm.create_model

    def recording_create_model(*args: Any, **kwargs: Any) -> torch.nn.Module:
        created.append(create_model(*args, **kwargs))
        return created[-1]

    monkeypatch.setattr(timm, "create_model", recording_create_model)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    assert created, code
    x = torch.rand(4, 1, 16, 16)
    for model in created:
        assert_same_outputs(model, reference, x)

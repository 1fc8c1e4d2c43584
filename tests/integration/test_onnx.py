"""kd export --format onnx: a dynamic-batch graph beside timm's files, checked with onnxruntime
against PyTorch before anything is written."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

from kd.cli import main
from tests.integration.conftest import train_tiny

ort = pytest.importorskip("onnxruntime", reason="the onnx extra is part of .[dev]")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tiny_teacher: str, tmp_path_factory: pytest.TempPathFactory):
    return train_tiny(tiny_teacher, tmp_path_factory.mktemp("onnx") / "run", "train.max_steps=4")


def test_the_onnx_graph_takes_any_batch_and_matches_the_timm_student(run, tmp_path: Path,
                                                                     capsys) -> None:
    out = tmp_path / "export"
    assert main(["export", "--checkpoint", str(run.dir), "--out", str(out), "--format",
                 "onnx", "--check-images", "20"]) == 0
    printed = capsys.readouterr().out
    assert "onnxruntime vs PyTorch on 20 validation images" in printed
    assert "top-1 agreement 100.00 %" in printed
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.onnx",
                                                     "model.safetensors"]
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()  # no kd needed
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    for batch in (1, 7):
        x = torch.randn(batch, 3, 16, 16)
        logits = session.run(None, {"images": x.numpy()})[0]
        torch.testing.assert_close(torch.from_numpy(logits), model(x).detach(), atol=1e-4,
                                   rtol=1e-4)


def test_a_graph_outside_the_tolerance_writes_nothing(run, tmp_path: Path, monkeypatch,
                                                      capsys) -> None:
    from kd.tools import export

    monkeypatch.setattr(export, "ONNX_TOLERANCE", -1.0)  # no graph can pass
    out = tmp_path / "export"
    assert main(["export", "--checkpoint", str(run.dir), "--out", str(out), "--format",
                 "onnx", "--check-images", "8"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("kd: error: --format onnx: the exported graph's logits differ")
    assert "export without --format onnx" in line
    assert not out.exists() and not list(tmp_path.glob(".export*"))


def test_an_unknown_format_is_a_user_error(run, tmp_path: Path, capsys) -> None:
    assert main(["export", "--checkpoint", str(run.dir), "--out", str(tmp_path / "x"),
                 "--format", "tflite"]) == 2
    assert "--format tflite: choose one of safetensors, onnx" in capsys.readouterr().err

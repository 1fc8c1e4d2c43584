"""`kd train` with no -c: the embedded digits demo, as a new user first runs it (about a minute)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.conftest import kd_cli


@pytest.mark.slow
def test_demo_distils_digits(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = kd_cli("train", f"output_dir={out}")  # one thread: see tests/integration/conftest
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    for label in ("teacher top-1", "student top-1", "agreement", "wall time"):
        assert label in result.stdout, result.stdout
    assert str(out) in result.stdout

    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 450  # 50 epochs × 9 steps of 128 images (1,200 train images)
    assert summary["teacher_top1"] > 0.95
    assert summary["student_top1"] > 0.9
    assert summary["agreement"] > 0.9
    assert f"{100 * summary['student_top1']:.2f} %" in result.stdout
    assert (out / "student.safetensors").is_file()
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000450"

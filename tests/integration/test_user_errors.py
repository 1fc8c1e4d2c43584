"""Mistakes a user can make end `kd train` with exit code 2 and one line, before writing anything.

The first case runs the real CLI in a subprocess (exactly what a user sees on stderr); the others
call ``kd.cli.main`` in this process, which is the same code minus the interpreter start-up.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
from safetensors.torch import save_file

from kd.cli import main
from tests.conftest import TINY
from tests.integration.conftest import assert_one_line_user_error, kd_cli

pytestmark = pytest.mark.usefixtures("one_thread")


def test_teacher_with_the_wrong_number_of_classes(tmp_path: Path) -> None:
    # The tiny teacher's architecture (configs/tiny.yaml teacher.kwargs), but 7 classes.
    teacher = timm.create_model("vit_tiny_patch16_224", num_classes=7, img_size=16, patch_size=8,
                                embed_dim=48, depth=1, num_heads=2)
    path = tmp_path / "teacher7.safetensors"
    save_file(teacher.state_dict(), str(path))
    out = tmp_path / "run"
    result = kd_cli("train", "-c", TINY, f"teacher.checkpoint={path}", f"output_dir={out}")
    assert_one_line_user_error(result, "data.num_classes", "7")
    assert not out.exists()  # nothing half-written


def kd_main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    rc = main(list(argv))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("kd: error: ")]
    assert len(errors) == 1, err
    return rc, errors[0]


@pytest.mark.parametrize(("overrides", "mentions"), [
    (["teacher.checkpoint={tmp}/missing.safetensors"], ["not found", "missing.safetensors"]),
    (["teacher.checkpoint={tmp}/missing.safetensors"], ["teacher.checkpoint"]),
    (["teacher.checkpoint={teacher}", "student.kwargs.img_size=32"],
     ["student.kwargs", "data.image_size=16"]),
    (["teacher.checkpoint={teacher}", "data.batch_size=129"], ["data.batch_size", "128"]),
    (["teacher.checkpoint=null", "distill.loss=soft"], ["distill.loss=soft", "teacher"]),
], ids=["missing-teacher-file", "missing-teacher-file-names-key", "student-img-size",
        "batch-larger-than-dataset", "soft-without-teacher"])
def test_user_errors(tiny_teacher: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                     overrides: list[str], mentions: list[str]) -> None:
    out = tmp_path / "run"
    args = [o.format(tmp=tmp_path, teacher=tiny_teacher) for o in overrides]
    rc, line = kd_main(capsys, "train", "-c", TINY, *args, f"output_dir={out}")
    assert rc == 2
    for m in mentions:
        assert m in line, (m, line)
    assert not out.exists()

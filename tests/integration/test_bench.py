"""``kd bench`` on tiny ViTs: the table's structure, the arithmetic behind it, the JSON and the
exit codes. No timing assertions: which loop is faster is what the benchmark measures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kd.tools.bench import LOOP_TITLES, LOOPS, parse_image_sizes

pytestmark = pytest.mark.usefixtures("one_thread")

IMAGE, PATCH, CLASSES, BATCH = 32, 8, 10, 8
TEACHER = {"embed_dim": 48, "depth": 1, "num_heads": 2, "patch_size": PATCH}
STUDENT = {"embed_dim": 32, "depth": 1, "num_heads": 2, "patch_size": PATCH}
ARGS = ["bench", "--teacher", "vit_tiny_patch16_224", "--student", "vit_tiny_patch16_224",
        "--image-size", str(IMAGE), "--batch", str(BATCH), "--precision", "fp32",
        "--steps", "2", "--warmup", "1", "--rounds", "2", "--device", "cpu",
        "--num-classes", str(CLASSES), "--teacher-kwargs", json.dumps(TEACHER),
        "--student-kwargs", json.dumps(STUDENT)]


def vit_forward_flops(dim: int, depth: int, image: int, patch: int, classes: int,
                      channels: int = 3) -> int:
    """A ViT's forward FLOPs per image by hand (2 per multiply-add): patch embedding, per block
    24·d² per token (qkv, projection, 4× MLP) and 4·n²·d for the two attention products, head."""
    patches = (image // patch) ** 2
    tokens = patches + 1  # the class token
    embed = 2 * patches * channels * patch * patch * dim
    block = 24 * tokens * dim * dim + 4 * tokens * tokens * dim
    return embed + depth * block + 2 * dim * classes


def test_kd_bench_cli_table_and_json(tmp_path: Path, capsys) -> None:
    from kd.cli import main

    out = tmp_path / "bench.json"
    # --set reaches kd's Trainer only: its teacher in bf16, the other loops' in fp32.
    assert main([*ARGS, "--set", "teacher.dtype=bf16", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    for title in LOOP_TITLES.values():
        assert title in printed
    assert f"json: {out}" in printed

    result = json.loads(out.read_text())
    assert result["settings"]["image_sizes"] == [IMAGE]
    assert result["settings"]["kd_overrides"] == ["teacher.dtype=bf16"]
    machine = result["machine"]
    assert machine["cpu"] and machine["threads"] >= 1 and machine["torch"] and machine["timm"]
    (run,) = result["runs"]
    assert run["precision"] == "fp32" and run["device"] == "cpu"

    rows = run["rows"]
    assert list(rows) == list(LOOPS)  # plain, kd, timm: three rows
    for name, row in rows.items():
        assert len(row["rounds"]) == 2 and all(v > 0 for v in row["rounds"]), name
        assert row["min"] <= row["img_per_s"] <= row["max"], name
        assert 0 < row["mfu"] <= 1, (name, row["mfu"])
        # MFU = FLOPs per image × images/s ÷ the measured peak.
        assert row["mfu"] == pytest.approx(
            run["flops_per_image"] * row["img_per_s"] / run["peak_flops"], rel=1e-9)
        # images/s of a round = batch × steps ÷ that round's seconds.
        assert row["rounds"] == pytest.approx([BATCH * 2 / s for s in run["seconds"][name]])
    assert run["ratios"]["kd/plain"] == pytest.approx(
        rows["kd"]["img_per_s"] / rows["plain"]["img_per_s"], rel=1e-9)
    assert run["ratios"]["kd/timm"] == pytest.approx(
        rows["kd"]["img_per_s"] / rows["timm"]["img_per_s"], rel=1e-9)

    flops = run["flops"]
    assert flops["teacher_forward"] > 0 and flops["backward"] > flops["student_forward"] > 0
    teacher = vit_forward_flops(48, 1, IMAGE, PATCH, CLASSES)
    student = vit_forward_flops(32, 1, IMAGE, PATCH, CLASSES)
    assert flops["teacher_forward"] / BATCH == pytest.approx(teacher, rel=0.25)
    assert flops["student_forward"] / BATCH == pytest.approx(student, rel=0.25)
    hand = teacher + 3 * student  # backward ≈ twice the forward
    assert 0.5 * hand < run["flops_per_image"] < 2 * hand
    assert run["peak_flops"] == max(run["peak_measurements"]) > 0
    assert set(run["kd_phases"]) >= {"teacher_forward", "student_forward", "backward",
                                     "optimizer"}


@pytest.mark.parametrize("args, mention", [
    (["--steps", "0"], "--steps 0"),
    (["--rounds", "0"], "--rounds 0"),
    (["--image-size", "abc"], "--image-size abc"),
    (["--student-kwargs", "[1, 2]"], "--student-kwargs"),
    (["--json", "/nonexistent/bench.json"], "--json /nonexistent/bench.json"),
    (["--set", "train.compil=true"], "--set train.compil=true"),
    (["--set", "data.mixup=0.8"], "--set data.mixup=0.8"),
])
def test_kd_bench_rejects_bad_options(args: list[str], mention: str, capsys) -> None:
    from kd.cli import main

    assert main(["bench", "--device", "cpu", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kd: error: ") and mention in err, err


def test_parse_image_sizes() -> None:
    assert parse_image_sizes(None) == [112, 224]
    assert parse_image_sizes(["112,224", "64"]) == [112, 224, 64]


def test_feature_pairs_are_benched_against_kd_on_logits_alone(tmp_path: Path, capsys) -> None:
    """--set distill.features adds work to kd's step: the same rounds time kd without it too,
    and the step's tensors are counted for both (the feature tokens and the projector)."""
    from kd.cli import main

    out = tmp_path / "bench.json"
    assert main([*ARGS, "--set", "distill.features=[{student: -1, teacher: -1, loss: mse}]",
                 "--json", str(out)]) == 0
    assert "kd, logits only" in capsys.readouterr().out
    run = json.loads(out.read_text())["runs"][0]
    assert run["loops"] == ["plain", "kd", "kd_logits", "timm"]
    assert run["ratios"]["kd/kd_logits"] == pytest.approx(
        run["rows"]["kd"]["img_per_s"] / run["rows"]["kd_logits"]["img_per_s"])
    rows = run["rows"]
    assert rows["kd"]["step_bytes"] > rows["kd_logits"]["step_bytes"] > 0
    assert rows["plain"]["step_bytes"] is None

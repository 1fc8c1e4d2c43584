"""`kd train` end to end through the real CLI: exit code, results table and every output file."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from kd.config import load_config, to_container
from kd.core.checkpoint import verify
from tests.conftest import TINY
from tests.integration.conftest import (
    TRAIN_KEYS,
    VAL_KEYS,
    assert_loss_is_weighted_sum,
    is_number,
    kd_cli,
    read_jsonl,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# configs/tiny.yaml: 128 images, batch 16 → 8 steps/epoch, 2 epochs, log every 2 steps,
# evaluate every epoch, checkpoint every 4 steps, keep 3.
STEPS, STEPS_PER_EPOCH, LOG_EVERY = 16, 8, 2


@pytest.fixture(scope="module")
def cli_run(tiny_teacher: str,
            tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path,
                                                               list[str]]:
    out = tmp_path_factory.mktemp("cli") / "run"
    overrides = [f"teacher.checkpoint={tiny_teacher}", f"output_dir={out}"]
    result = kd_cli("train", "-c", TINY, *overrides)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result, out, overrides


def test_exit_code_and_results_table(cli_run) -> None:
    result, out, _ = cli_run
    assert "Traceback" not in result.stderr
    summary = json.loads((out / "summary.json").read_text())
    stdout = result.stdout
    for label in ("teacher top-1", "student top-1", "agreement", "wall time"):
        assert label in stdout, stdout
    assert str(out) in stdout, stdout
    assert f"{100 * summary['student_top1']:.2f} %" in stdout
    assert f"{100 * summary['teacher_top1']:.2f} %" in stdout
    assert f"{100 * summary['agreement']:.2f} %" in stdout
    # Progress goes to stderr, not into the table on stdout.
    assert f"step {STEPS}/{STEPS}" in result.stderr
    assert f"step {STEPS}/{STEPS}" not in stdout


def test_config_yaml_round_trips(cli_run) -> None:
    _, out, overrides = cli_run
    saved = load_config(str(out / "config.yaml"))
    assert to_container(saved) == to_container(load_config(TINY, overrides))


def test_metrics_jsonl(cli_run) -> None:
    _, out, _ = cli_run
    records = read_jsonl(out / "metrics.jsonl")
    train = [r for r in records if "split" not in r]
    val = [r for r in records if r.get("split") == "val"]
    assert len(train) + len(val) == len(records)

    assert [r["step"] for r in train] == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
    for r in train:
        for key in TRAIN_KEYS:
            assert is_number(r.get(key)), (key, r)
        assert r["epoch"] == pytest.approx(r["step"] / STEPS_PER_EPOCH)
        assert r["lr"] > 0 and r["img_per_s"] > 0
        assert all(r[k] >= 0 for k in TRAIN_KEYS if k.startswith("t_"))
    assert_loss_is_weighted_sum(train, alpha=0.5)  # distill.loss=soft, alpha 0.5 (defaults)
    assert train[-1]["loss"] < 0.9 * train[0]["loss"]

    assert [(r["step"], r["epoch"]) for r in val] == [(8, 1), (16, 2)]
    for r in val:
        for key in VAL_KEYS:
            assert is_number(r[key]) and 0.0 <= r[key] <= 1.0, (key, r)
        assert r["student_top5"] >= r["student_top1"]


def test_summary_json(cli_run) -> None:
    _, out, _ = cli_run
    summary = json.loads((out / "summary.json").read_text())
    final = read_jsonl(out / "metrics.jsonl")[-1]
    assert final["split"] == "val"
    for key in VAL_KEYS:
        assert summary[key] == final[key]
    assert summary["steps"] == STEPS
    assert is_number(summary["wall_s"]) and summary["wall_s"] > 0
    assert is_number(summary["img_per_s"]) and summary["img_per_s"] > 0
    assert summary["output_dir"] == str(out)


def test_tensorboard_scalars(cli_run) -> None:
    _, out, _ = cli_run
    events = list((out / "tb").glob("events.out.tfevents.*"))
    assert events, list(out.iterdir())
    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    train_tags = {"train/loss", "train/loss_task", "train/loss_kd", "train/lr",
                  "train/img_per_s"}
    val_tags = {f"val/{k}" for k in VAL_KEYS}
    assert train_tags | val_tags <= tags, tags

    records = read_jsonl(out / "metrics.jsonl")
    train = [r for r in records if "split" not in r]
    val = [r for r in records if r.get("split") == "val"]
    for tag in train_tags:
        points = acc.Scalars(tag)
        assert [p.step for p in points] == [r["step"] for r in train], tag
    loss = [p.value for p in acc.Scalars("train/loss")]
    assert loss == pytest.approx([r["loss"] for r in train], rel=1e-6)
    for tag in val_tags:
        points = acc.Scalars(tag)
        assert [p.step for p in points] == [r["step"] for r in val], tag
    top1 = [p.value for p in acc.Scalars("val/student_top1")]
    assert top1 == pytest.approx([r["student_top1"] for r in val], rel=1e-6)


def test_checkpoints_layout(cli_run) -> None:
    _, out, _ = cli_run
    ckpts = out / "checkpoints"
    steps = sorted(p.name for p in ckpts.glob("step_*"))
    assert steps == ["step_00000008", "step_00000012", "step_00000016"]  # every 4, keep 3
    assert (ckpts / "latest").read_text().strip() == "step_00000016"
    run_config = to_container(load_config(str(out / "config.yaml")))
    for name in steps:
        d = ckpts / name
        assert {p.name for p in d.iterdir()} == {"student.safetensors", "state.pt",
                                                 "config.yaml", "manifest.json"}
        manifest = verify(d)  # sizes and sha256 match
        assert manifest["step"] == int(name.removeprefix("step_"))
        state = torch.load(d / "state.pt", map_location="cpu", weights_only=True)
        assert state["step"] == manifest["step"]
        assert to_container(load_config(str(d / "config.yaml"))) == run_config
    final = load_file(str(out / "student.safetensors"))
    latest = load_file(str(ckpts / "step_00000016" / "student.safetensors"))
    assert final.keys() == latest.keys()
    assert all(torch.equal(final[k], latest[k]) for k in final)
    # An earlier checkpoint holds earlier weights.
    early = load_file(str(ckpts / "step_00000008" / "student.safetensors"))
    assert not all(torch.equal(final[k], early[k]) for k in final)


def test_results_table_shows_a_long_output_dir_in_full(
        tiny_teacher: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from kd.cli import main

    out = tmp_path / ("a_rather_long_experiment_name_" * 3) / "run"
    rc = main(["train", "-c", TINY, f"teacher.checkpoint={tiny_teacher}", f"output_dir={out}",
               "train.max_steps=2"])
    assert rc == 0
    stdout = capsys.readouterr().out
    assert (out / "summary.json").is_file()
    assert str(out) in stdout, stdout

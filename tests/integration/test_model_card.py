"""The model card kd export writes, and --push-to-hub without a network."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kd.cli import main
from tests.integration.conftest import train_tiny

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tiny_teacher: str, tmp_path_factory: pytest.TempPathFactory):
    return train_tiny(tiny_teacher, tmp_path_factory.mktemp("card") / "run", "train.max_steps=4",
                      "train.ema_decay=0.5")


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_the_card_holds_accuracy_size_speed_and_settings(run, tmp_path: Path) -> None:
    out = tmp_path / "export"
    assert main(["export", "--checkpoint", str(run.dir), "--out", str(out)]) == 0
    card = (out / "README.md").read_text()
    meta = front_matter(card)
    assert meta["library_name"] == "timm" and "knowledge-distillation" in meta["tags"]
    metrics = meta["model-index"][0]["results"][0]["metrics"]
    assert metrics[0]["value"] == round(100 * run.summary["student_top1"], 2)  # same split
    rows = [line for line in card.splitlines() if line.startswith("| student") or
            line.startswith("| teacher")]
    assert len(rows) == 2
    teacher_top1 = f"{100 * run.summary['teacher_top1']:.2f} %"
    assert teacher_top1 in rows[1]
    for row in rows:  # parameters, GFLOPs and two latencies, measured
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[3].endswith(" M") and cells[4].endswith("FLOP") and cells[4][0] != "0"
        assert all(c.endswith(("µs", "ms", " s")) for c in cells[5:7]), cells
    assert "- loss: `soft`" in card and "EMA: on; the student itself is exported" in card
    assert "kd export --checkpoint " in card and f"--out {out}" in card  # to reproduce


def test_the_ema_card_reports_the_ema(run, tmp_path: Path) -> None:
    import json

    out = tmp_path / "ema"
    assert main(["export", "--checkpoint", str(run.dir), "--out", str(out), "--ema"]) == 0
    card = (out / "README.md").read_text()
    assert "EMA: its EMA (train.ema_decay), exported" in card
    last = [json.loads(line) for line in (run.dir / "metrics.jsonl").read_text().splitlines()
            if '"val"' in line][-1]
    value = front_matter(card)["model-index"][0]["results"][0]["metrics"][0]["value"]
    assert value == round(100 * last["student_ema_top1"], 2)


def test_push_to_hub_without_a_network_is_one_line(run, tmp_path: Path, monkeypatch,
                                                   capsys) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # read at import: the constant too
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    out = tmp_path / "export"
    assert main(["export", "--checkpoint", str(run.dir), "--out", str(out), "--push-to-hub",
                 "someone/student"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("kd: error: --push-to-hub someone/student: the upload failed")
    assert (out / "README.md").is_file()  # the export itself stands; only the upload failed

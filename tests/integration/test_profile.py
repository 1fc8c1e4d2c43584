"""``kd profile`` end to end on CPU: one process and two (torchrun, gloo), and a deliberately
slow dataset that must come out input-bound."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY
from tests.multiproc.helpers import free_port, launch_env

ANNOTATIONS = ("data", "teacher_forward", "student_forward", "loss", "backward", "optimizer")
SECTIONS = ("Summary", "Time per phase", "Step-to-step spread", "Top ", "Data wait and verdict",
            "CPU and GPU utilisation", "Memory", "Throughput and model FLOP utilisation",
            "Ranks", "Recommendations")
# Short schedules keep these tests quick: one warm-up step, two in the report.
SCHEDULE = ("--wait", "0", "--warmup", "1", "--active", "2")
LABELS_ONLY = ("distill.loss=none", "teacher.checkpoint=null")


def check_traces(out: Path, ranks: int) -> None:
    for rank in range(ranks):
        trace = (out / f"trace_rank{rank}.json").read_text()
        names = {e.get("name") for e in json.loads(trace)["traceEvents"]}
        assert set(ANNOTATIONS) <= names, set(ANNOTATIONS) - names
        assert list((out / "tb").glob(f"rank{rank}.*.pt.trace.json"))


def check_report(out: Path, world_size: int) -> str:
    """Every section present and carrying numbers; no placeholder values."""
    md = (out / "report.md").read_text()
    bodies = re.split(r"^## ", md, flags=re.M)[1:]
    titles = [b.splitlines()[0] for b in bodies]
    for want in SECTIONS:
        body = next((b for b, t in zip(bodies, titles) if t.startswith(want)), None)
        assert body is not None, f"section {want!r} missing: {titles}"
        assert re.search(r"\d", body.split("\n", 1)[1]), f"section {want!r} has no numbers"
    assert not re.search(r"\b(nan|None|inf)\b", md), "a placeholder value in report.md"
    page = (out / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 3 + (world_size > 1)
    assert "<h2>Recommendations</h2>" in page and not re.search(r"\b(nan|None)\b", page)
    for png in ("phases.png", "utilisation.png", "memory.png"):
        assert (out / png).stat().st_size > 1000
    assert f"over {world_size} rank(s)" in md
    return md


@pytest.mark.slow
def test_profile_one_process(tiny_teacher: str, tmp_path: Path, capsys) -> None:
    from kd.cli import main

    out = tmp_path / "profile"
    code = main(["profile", "-c", TINY, f"teacher.checkpoint={tiny_teacher}",
                 f"output_dir={tmp_path}", *SCHEDULE, "--top", "8"])
    assert code == 0
    printed = capsys.readouterr().out
    assert re.search(r"kd profile: (input|compute)-bound .* img/s, MFU \d", printed)
    check_traces(out, 1)
    md = check_report(out, 1)
    assert "One rank" in md and "teacher forward / image" in md
    top = md.split("## Top 8 operators by self time")[1].split("##")[0]
    assert top.count("`aten::") >= 4
    analysis = json.loads((out / "profile.json").read_text())
    flops = analysis["ranks"][0]["flops"]
    assert flops["teacher_forward"] > 0 and flops["backward"] > flops["student_forward"] > 0
    # The metrics records of a profiling run keep the trainer's interval sums.
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 3 and records[-1]["t_backward"] > 0


def test_profile_rejects_bad_schedules(capsys) -> None:
    from kd.cli import main

    assert main(["profile", "--active", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "kd: error: --active 0: profile at least one step"


@pytest.mark.slow
@pytest.mark.multiproc
def test_profile_two_processes(tmp_path: Path) -> None:
    out = tmp_path / "profile"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
           "--master-addr=127.0.0.1", f"--master-port={free_port()}", "-m", "kd.cli",
           "profile", "-c", TINY, *LABELS_ONLY, f"output_dir={tmp_path}", *SCHEDULE]
    result = subprocess.run(cmd, cwd=ROOT, env=launch_env(), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    check_traces(out, 2)
    md = check_report(out, 2)
    assert re.search(r"Slowest: \*\*rank [01]\*\*", md)
    ranks = md.split("## Ranks")[1].split("##")[0]
    assert re.search(r"^\| 0 \|", ranks, flags=re.M) and re.search(r"^\| 1 \|", ranks, flags=re.M)
    analysis = json.loads((out / "profile.json").read_text())["analysis"]
    assert analysis["facts"]["world_size"] == 2
    assert analysis["ranks"][1]["comm_per_step_s"] > 0  # gloo all-reduces were seen


@pytest.mark.slow
def test_slow_dataset_is_input_bound(tmp_path: Path) -> None:
    from kd.config import load_config
    from kd.core.trainer import Trainer
    from kd.tools.profiler import ProfileSettings, run_profile
    from kd.tools.report import DATA_WAIT_THRESHOLD

    cfg = load_config(TINY, [*LABELS_ONLY, f"output_dir={tmp_path}", "data.batch_size=8"])
    trainer = Trainer(cfg)
    get = trainer.train_set.get

    def slow_get(index: int, seed: int | None):  # a loader that decodes far too slowly
        time.sleep(0.02)
        return get(index, seed)

    trainer.train_set.get = slow_get
    analysis = run_profile(trainer, tmp_path, ProfileSettings(wait=0, warmup=1, active=2))
    assert analysis["verdict"]["kind"] == "input-bound"
    share = analysis["facts"]["data_share"]
    assert share > DATA_WAIT_THRESHOLD
    rec = next(r for r in analysis["recommendations"] if r["rule"] == "data-wait")
    assert f"data wait {100 * share:.1f} %" in rec["trigger"]
    md = (tmp_path / "report.md").read_text()
    assert "**Verdict: input-bound**" in md and "data.num_workers (now 0)" in md


def test_flops_counted_on_meta_match_a_real_count(tmp_path: Path) -> None:
    from kd.config import load_config
    from kd.core.trainer import Trainer
    from kd.tools.profiler import count_flops, training_batch_inputs

    cfg = load_config(TINY, [*LABELS_ONLY, f"output_dir={tmp_path}"])
    trainer = Trainer(cfg)
    before = [p.detach().clone() for p in trainer.student_core.parameters()]
    models = trainer.student_core, trainer.teacher, *training_batch_inputs(trainer)
    meta = count_flops(*models, "meta")
    real = count_flops(*models, trainer.device)
    # The CPU's fused attention kernel has no FLOP formula; on meta, attention runs as bmm
    # and is counted: 2 products × 2·5·5·16 FLOPs × 2 heads × 16 images (5 tokens, head dim 16).
    attention = 2 * 2 * 5 * 5 * 16 * 2 * 16
    assert meta.student_forward == real.student_forward + attention
    assert meta.backward == real.backward + 2 * attention
    assert meta.per_image > 0 and meta.teacher_forward == 0  # labels only: no teacher
    assert all(p.grad is None for p in trainer.student_core.parameters())
    assert all((a == b).all() for a, b in zip(before, trainer.student_core.parameters()))


def test_log_phases_prints_the_metrics_records_numbers(tmp_path: Path, caplog) -> None:
    import logging

    from kd.config import load_config
    from kd.core.metrics import phase_line
    from kd.core.trainer import Trainer

    cfg = load_config(TINY, [*LABELS_ONLY, f"output_dir={tmp_path}", "train.max_steps=4",
                             "train.log_phases=true", "checkpoint.every_steps=0"])
    with caplog.at_level(logging.INFO, logger="kd"):
        Trainer(cfg).train(evaluate=False, save=False)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    lines = [m for m in caplog.messages if m.startswith("iter ")]
    assert lines == [phase_line(r) for r in records if "split" not in r]

"""DeepSpeed ZeRO-1/2 in two CPU processes (gloo): same student as DDP, exact resume."""

from __future__ import annotations

import json

import pytest
import torch

from tests.multiproc.helpers import ATOL, keep_only_checkpoint, max_diff, ok, torchrun, weights

pytest.importorskip("deepspeed", reason="the deepspeed extra is part of .[dev]")
pytestmark = pytest.mark.multiproc


@pytest.mark.parametrize("stage", [1, 2])
def test_deepspeed_zero_matches_ddp_and_resumes_exactly(base, reference, tmp_path, stage):
    args = [*base, "dist.strategy=deepspeed", f"dist.zero_stage={stage}", "data.batch_size=8",
            "checkpoint.every_steps=6"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    ok(torchrun(2, *args, f"output_dir={straight}"))
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 16
    assert max_diff(weights(straight), weights(reference)) < ATOL
    ckpt = straight / "checkpoints" / "step_00000016"
    shards = sorted(p.name for p in (ckpt / "deepspeed").rglob("*.pt"))
    assert any("optim_states" in name for name in shards), shards
    assert set(json.loads((ckpt / "manifest.json").read_text())["files"]) >= {
        f"deepspeed/state/{name}" for name in shards}

    # The same run killed after step 6 (mid-epoch) and resumed through DeepSpeed's API.
    ok(torchrun(2, *args, f"output_dir={resumed}"))
    keep_only_checkpoint(resumed, 6)
    log = ok(torchrun(2, *args, f"output_dir={resumed}"))
    assert "resumed from" in log.stdout + log.stderr
    a, b = weights(straight), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a), max_diff(a, b)

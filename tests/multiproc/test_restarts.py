"""Real kills and real signals under torchrun: a SIGKILLed worker restarts the group, which
resumes from the last checkpoint; SIGTERM to one rank stops every rank at the same step."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import ROOT
from tests.multiproc.helpers import ATOL, free_port, launch_env, max_diff, ok, single, weights

pytestmark = pytest.mark.multiproc

# 40 epochs x 8 steps: long enough to be signalled mid-run, a few seconds on 2 cores.
LONG = ["train.epochs=40", "train.log_every=1", "checkpoint.every_steps=10"]


def start(nproc: int, *args: str, max_restarts: int = 0) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1",
           f"--nproc-per-node={nproc}", f"--max-restarts={max_restarts}",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}",
           "-m", "kd.cli", "train", *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=launch_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def worker(launcher: subprocess.Popen, local_rank: int, timeout: float = 60) -> psutil.Process:
    """The kd process torchrun started for ``local_rank``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in psutil.Process(launcher.pid).children(recursive=True):
            try:
                if child.environ().get("LOCAL_RANK") == str(local_rank):
                    return child
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        time.sleep(0.05)
    raise TimeoutError(f"no worker with LOCAL_RANK={local_rank}")


def last_step(run: Path) -> int:
    path = run / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [json.loads(x).get("step", 0) for x in path.read_text().splitlines() if x.strip()]
    return max(steps, default=0)


def wait_until(launcher: subprocess.Popen, condition, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert launcher.poll() is None, launcher.communicate()[0][-3000:]
        if condition():
            return
        time.sleep(0.02)
    raise TimeoutError("condition not met")


def checkpoints(run: Path) -> list[int]:
    return sorted(int(p.name.removeprefix("step_")) for p in (run / "checkpoints").glob("step_*")
                  if not p.name.endswith(".tmp")) if (run / "checkpoints").exists() else []


@pytest.mark.parametrize("nproc", [1, 2])
def test_sigkill_mid_epoch_restarts_and_resumes_from_the_last_checkpoint(base, tmp_path, nproc):
    batch = f"data.batch_size={16 // nproc}"
    straight = tmp_path / "straight"
    if nproc == 1:
        ok(single(*base, f"output_dir={straight}", batch, *LONG))
    else:
        straight_run = start(2, *base, f"output_dir={straight}", batch, *LONG)
        assert straight_run.wait(timeout=600) == 0, straight_run.communicate()[0][-3000:]
    out = tmp_path / "killed"
    launcher = start(nproc, *base, f"output_dir={out}", batch, *LONG, max_restarts=1)
    # Mid-epoch, after the checkpoint at step 20, before the one at 30.
    wait_until(launcher, lambda: 20 in checkpoints(out) and last_step(out) >= 23)
    victim = worker(launcher, nproc - 1)
    saved = max(checkpoints(out))
    victim.send_signal(signal.SIGKILL)
    log = launcher.communicate(timeout=600)[0]
    assert launcher.returncode == 0, log[-3000:]
    # The restarted group resumed from the newest checkpoint before the kill.
    resumed = [line for line in log.splitlines() if line.startswith("resumed from")]
    assert len(resumed) == 1, log[-3000:]
    # (one more checkpoint may have landed between looking and killing)
    assert any(resumed[0].endswith(f"step_{s:08d} at step {s}") for s in (saved, saved + 10))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 320
    if nproc == 1:  # bit-identical in one process
        assert max_diff(weights(out), weights(straight)) == 0.0
    else:  # same world size and data order: equal up to all-reduce rounding
        assert max_diff(weights(out), weights(straight)) < ATOL


def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step(base, tmp_path):
    out = tmp_path / "run"
    args = [*base, f"output_dir={out}", "data.batch_size=8", *LONG]
    launcher = start(2, *args)
    wait_until(launcher, lambda: last_step(out) >= 5)
    worker(launcher, 1).send_signal(signal.SIGTERM)  # rank 1 only
    log = launcher.communicate(timeout=300)[0]
    assert launcher.returncode != 0  # torchrun reports the workers' exit code 75 as a failure
    stops = [line for line in log.splitlines() if "kd: stopped by" in line]
    assert len(stops) == 2, log[-3000:]
    steps = {int(line.split("at step ")[1].split()[0]) for line in stops}
    assert len(steps) == 1  # both ranks stopped at the same step boundary
    step = steps.pop()
    assert "exitcode  : 75" in log, log[-3000:]  # torchrun's failure report names kd's code
    assert step in checkpoints(out)
    assert not (out / "summary.json").exists()
    # Running the same command again finishes the job from that checkpoint.
    resumed = start(2, *args)
    log = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, log[-3000:]
    assert f"resumed from {out / 'checkpoints' / f'step_{step:08d}'}" in log
    assert json.loads((out / "summary.json").read_text())["steps"] == 320

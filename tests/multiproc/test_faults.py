"""A rank that dies or hangs under torchrun: the survivor exits within dist.timeout_s, with code
3 and a line naming the rank, instead of waiting forever. Real SIGKILL / SIGSTOP / a stuck loop,
injected by KD_TEST_FAULT (tests/multiproc/faults.py, which torchrun runs in place of kd.cli)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from tests.conftest import ROOT
from tests.multiproc.faults import FAULT_ENV
from tests.multiproc.helpers import free_port, kill_tree, launch_env

pytestmark = pytest.mark.multiproc

TIMEOUT_S = 10  # dist.timeout_s in these runs
# Long enough to still be running when rank 1 fails after step 3; checkpoints every 4 steps.
ARGS = ["data.batch_size=8", "train.epochs=40", f"dist.timeout_s={TIMEOUT_S}"]


class Launch:
    """torchrun with 2 ranks and no restarts, each running kd with ``fault`` (``RANK:STEP:KIND``,
    tests/multiproc/faults.py), its output lines time-stamped as they arrive."""

    def __init__(self, fault: str, *args: str) -> None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2",
               "--max-restarts=0", "--master-addr=127.0.0.1", f"--master-port={free_port()}",
               "-m", "tests.multiproc.faults", "train", *args, *ARGS]
        self.started = time.monotonic()
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=launch_env({FAULT_ENV: fault}),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[tuple[float, str]] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    @property
    def log(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def line(self, text: str, timeout: float = 0) -> tuple[float, str]:
        """The first line containing ``text`` and when it arrived (waiting up to ``timeout``)."""
        deadline = time.monotonic() + timeout
        while True:
            for when, line in list(self.lines):
                if text in line:
                    return when, line
            if time.monotonic() >= deadline:
                raise AssertionError(f"no line with {text!r} in:\n{self.log[-3000:]}")
            time.sleep(0.05)

    def finish(self, timeout: float = 120) -> int:
        """torchrun's exit code; fails the test if it takes longer than ``timeout`` s in all."""
        try:
            code = self.proc.wait(timeout=max(1.0, self.started + timeout - time.monotonic()))
        except subprocess.TimeoutExpired:
            kill_tree(self.proc.pid)
            raise AssertionError(f"torchrun still running after {timeout} s:\n"
                                 f"{self.log[-3000:]}") from None
        self.reader.join(10)
        return code


def injected(run: Launch) -> tuple[float, int]:
    """When rank 1 injected its fault, and its pid."""
    when, line = run.line("kd-test: rank 1", timeout=90)
    return when, int(re.search(r"pid (\d+)", line).group(1))


def survivor_exited(run: Launch) -> None:
    assert re.search(r"exitcode\s*:\s*3 ", run.log), run.log[-3000:]  # rank 0: DistributedError
    assert not re.search(r'File "[^"]*/kd/', run.log), run.log[-3000:]  # no traceback from kd


def test_a_killed_rank_is_named_by_the_survivor(base, tmp_path):
    run = Launch("1:3:kill", *base, f"output_dir={tmp_path / 'run'}")
    assert run.finish() != 0
    killed, pid = injected(run)
    named, line = run.line("kd: error: rank 1")
    assert f"rank 1 ({os.uname().nodename}, pid {pid}) stopped responding: its process has " \
           f"exited" in line, line
    assert "collective after step" in line and line.endswith("Check the log of rank 1")
    assert named - killed < TIMEOUT_S  # a closed connection needs no timeout
    survivor_exited(run)
    print(f"killed rank named after {named - killed:.1f} s; torchrun ended after "
          f"{time.monotonic() - run.started:.1f} s")


@pytest.mark.parametrize("fault, diagnosis", [
    ("hang", "is alive but stuck after step 3"),  # stuck in its loop, heartbeat going on
    ("stop", "stopped responding: its process is stopped (SIGSTOP)"),  # frozen, heartbeat too
], ids=["hang", "stop"])
def test_a_hung_rank_is_named_within_the_timeout(base, tmp_path, fault, diagnosis):
    """The survivor waits dist.timeout_s in a collective, then names the rank. torchrun then
    sends the hung rank SIGTERM, which it cannot act on, and SIGKILL 30 s later (measured: the
    whole run then ends 52 s after it started); the test sends SIGKILL at once instead."""
    run = Launch(f"1:3:{fault}", *base, f"output_dir={tmp_path / 'run'}")
    hung, pid = injected(run)
    named, line = run.line("kd: error: rank 1", timeout=TIMEOUT_S + 30)
    assert f"rank 1 ({os.uname().nodename}, pid {pid}) {diagnosis}" in line, line
    assert f"when dist.timeout_s={TIMEOUT_S} ran out" in line
    assert TIMEOUT_S - 1 < named - hung < TIMEOUT_S + 10
    run.line("closing signal SIGTERM", timeout=30)  # torchrun saw the survivor exit
    os.kill(pid, signal.SIGKILL)
    assert run.finish() != 0
    survivor_exited(run)
    print(f"{fault}: rank named after {named - hung:.1f} s")

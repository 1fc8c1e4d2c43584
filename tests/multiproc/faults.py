"""Faults injected into one rank of a real run, for tests/multiproc/test_faults.py.

``python -m tests.multiproc.faults ARGS...`` is ``kd ARGS...`` (:func:`kd.cli.main`) in which,
when ``KD_TEST_FAULT=RANK:STEP:KIND`` is set, rank ``RANK`` fails right after step ``STEP``:
``kill`` (SIGKILL itself), ``stop`` (SIGSTOP itself: frozen, heartbeat included) or ``hang``
(sleep forever in the training loop; its heartbeat goes on). The fault fires from a step
observer of the watchdog (:func:`kd.core.watchdog.add_step_observer`), so only in a
distributed run, right where the training loop reports the step for the heartbeats.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

from kd import cli
from kd.core import watchdog

FAULT_ENV = "KD_TEST_FAULT"
KINDS = ("kill", "stop", "hang")


@dataclass(frozen=True)
class Fault:
    """Rank ``rank`` fails with ``kind`` right after step ``step``: a step observer."""

    rank: int
    step: int
    kind: str

    @classmethod
    def parse(cls, value: str) -> Fault:
        """``RANK:STEP:KIND``, as :data:`FAULT_ENV` holds it."""
        try:
            rank, step, kind = value.split(":")
            if kind not in KINDS:
                raise ValueError(kind)
            return cls(int(rank), int(step), kind)
        except ValueError:
            raise ValueError(f"{FAULT_ENV}={value!r}: expected RANK:STEP:KIND with KIND one of "
                             f"{', '.join(KINDS)}") from None

    def __call__(self, rank: int, step: int) -> None:
        if (rank, step) == (self.rank, self.step):
            inject(rank, step, self.kind)


def inject(rank: int, step: int, kind: str) -> None:
    """Fail now; the line printed first tells the test when, and which pid."""
    print(f"kd-test: rank {rank} (pid {os.getpid()}) injects '{kind}' after step {step} at "
          f"{time.time():.3f}", flush=True)
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif kind == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
    while kind == "hang":
        time.sleep(3600)


def main(argv: Sequence[str] | None = None) -> int:
    """``kd`` with the fault of :data:`FAULT_ENV`, if set, observing the steps."""
    value = os.environ.get(FAULT_ENV)
    if value:
        watchdog.add_step_observer(Fault.parse(value))
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())

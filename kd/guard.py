"""Guards around the training loop: preemption signals and non-finite steps.

**Preemption.** SageMaker managed spot and Slurm preemption send SIGTERM (SageMaker then allows
120 s, Slurm its ``GraceTime``; torchrun, when it is the one signalled, passes SIGTERM on to its
workers and kills them 30 s later). :class:`StopRequest` turns SIGTERM (and SIGUSR1, which
Slurm's ``--signal=USR1@120`` sends ahead of the time limit) into a flag; the trainer asks
:meth:`StopRequest.should_stop` at every step boundary, saves a checkpoint and exits with
:data:`~kd.errors.Preempted.exit_code`. A signal may reach one rank only, so the ranks agree
through an all-reduce of their flags on a small gloo group of their own. The all-reduce is
pipelined by one step (each call waits for the one started at the previous step, which has long
finished), so it costs no device synchronisation and, in practice, no waiting: every rank sees
the same flags at the same step and they all stop together, one step after the first of them
was signalled.

**Non-finite steps.** :class:`SkipTracker` keeps, on the device, the number of optimizer steps
skipped because the loss or the gradients were not finite, the longest run of consecutive skips
and the loss terms of the last skipped step. It is read at log steps only (no per-step host
synchronisation): a run of ``train.max_skipped_steps`` consecutive skips stops training there,
with the step and the loss terms in the message.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Mapping
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist
from torch.torch_version import TorchVersion

from kd.errors import DivergedError

log = logging.getLogger("kd")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """A stop flag raised by SIGTERM/SIGUSR1, agreed on by all ranks at step boundaries.

    Example:
        >>> stop = StopRequest(distributed=False)
        >>> stop.should_stop()
        False
        >>> stop.request(signal.SIGTERM); stop.should_stop()
        True
        >>> stop.close()
    """

    def __init__(self, distributed: bool, timeout_s: float = 1800.0) -> None:
        self.flag = False
        self.signal_name: str | None = None
        self.group = None
        self._pending: tuple[Any, torch.Tensor] | None = None
        self._previous: dict[int, Any] = {}
        if distributed:
            from datetime import timedelta

            # Host-side flags on a gloo group of their own: no device tensors, no interleaving
            # with the gradient all-reduces of the default group.
            self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handler)

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self.request(signum)

    def request(self, signum: int = signal.SIGTERM) -> None:
        """Ask to stop at the next step boundary (what the signal handler does)."""
        if not self.flag:
            self.signal_name = signal.Signals(signum).name
            # A log call in a signal handler can deadlock on the handler's lock: print instead.
            print(f"kd: {self.signal_name} received: stopping at the next step boundary to "
                  f"save a checkpoint", flush=True)
        self.flag = True

    def should_stop(self) -> bool:
        """True on every rank at once if any rank was signalled (see the module docstring)."""
        if self.group is None:
            return self.flag
        stop = False
        if self._pending is not None:
            work, flags = self._pending
            work.wait()
            stop = bool(flags.item())  # a CPU tensor: no device synchronisation
        flags = torch.tensor([int(self.flag)], dtype=torch.int32)
        self._pending = (dist.all_reduce(flags, group=self.group, async_op=True), flags)
        if stop and self.signal_name is None:
            self.signal_name = "a stop signal on another rank"
        return stop

    def close(self) -> None:
        """Finish the pending all-reduce and restore the previous signal handlers."""
        if self._pending is not None:
            try:
                self._pending[0].wait()
            except RuntimeError:  # the group is already broken: nothing left to agree on
                pass
            self._pending = None
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


# torchrun waits this long after passing SIGTERM on before it SIGKILLs its workers; torch 2.12
# made it configurable (`--shutdown-timeout` or TORCH_ELASTIC_SHUTDOWN_TIMEOUT,
# pytorch/pytorch#172596); earlier releases ignore the variable.
TORCHRUN_KILL_AFTER_S = 30.0
SHUTDOWN_TIMEOUT_FROM = "2.12"


def torchrun_kill_after_s(env: Mapping[str, str] | None = None,
                          torch_version: str | None = None) -> float | None:
    """Seconds between torchrun's SIGTERM to this worker and its SIGKILL; None when torchrun did
    not start this process (then the scheduler's grace time is the limit)."""
    env = os.environ if env is None else env
    if "TORCHELASTIC_RUN_ID" not in env:
        return None
    if TorchVersion(torch_version or torch.__version__) < SHUTDOWN_TIMEOUT_FROM:
        return TORCHRUN_KILL_AFTER_S
    try:
        return float(env.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", TORCHRUN_KILL_AFTER_S))
    except ValueError:
        return TORCHRUN_KILL_AFTER_S


def ignored_shutdown_timeout(env: Mapping[str, str] | None = None,
                             torch_version: str | None = None) -> str | None:
    """A warning when TORCH_ELASTIC_SHUTDOWN_TIMEOUT is set (launch/torchrun.sh sets 110) but
    this torch's torchrun ignores it and kills workers 30 s after a SIGTERM."""
    env = os.environ if env is None else env
    version = torch_version or torch.__version__
    asked = env.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT")
    if asked is None or "TORCHELASTIC_RUN_ID" not in env or \
            TorchVersion(version) >= SHUTDOWN_TIMEOUT_FROM:
        return None
    return (f"TORCH_ELASTIC_SHUTDOWN_TIMEOUT={asked} is ignored by torchrun from torch {version} "
            f"(honoured from torch {SHUTDOWN_TIMEOUT_FROM}): after a SIGTERM, workers have "
            f"{TORCHRUN_KILL_AFTER_S:.0f} s to save a checkpoint; the save time is logged when "
            f"it happens")


def report_preemption_save(save_s: float, env: Mapping[str, str] | None = None,
                           torch_version: str | None = None) -> str:
    """The log line for a checkpoint saved after a stop signal: how long it took, against
    torchrun's kill deadline when torchrun runs this worker."""
    budget = torchrun_kill_after_s(env, torch_version)
    line = f"preemption checkpoint saved in {save_s:.1f} s"
    if budget is None:
        return line
    line += f" of the {budget:.0f} s torchrun allows before SIGKILL"
    if save_s > 0.5 * budget:
        line += (f"; too close to the deadline: raise TORCH_ELASTIC_SHUTDOWN_TIMEOUT (honoured "
                 f"from torch {SHUTDOWN_TIMEOUT_FROM}) up to the scheduler's grace time")
    return line


class SkipTracker:
    """Device-side counts of skipped (non-finite) optimizer steps; see the module docstring."""

    TERMS = ("loss", "loss_task", "loss_kd", "grad_norm")

    def __init__(self, device: torch.device, max_consecutive: int, skipped: int = 0,
                 streak: int = 0) -> None:
        self.max_consecutive = max_consecutive
        self.skipped = torch.tensor(skipped, dtype=torch.int64, device=device)
        self.streak = torch.tensor(streak, dtype=torch.int64, device=device)
        self.streak_max = self.streak.clone()  # longest streak since the last check
        self.last_bad = torch.full((1 + len(self.TERMS),), float("nan"), device=device)

    def update(self, step: int, skipped: torch.Tensor, terms: torch.Tensor) -> None:
        """Record optimizer step ``step`` (1-based); ``terms`` holds :attr:`TERMS` in order."""
        s = skipped.to(torch.int64)
        self.skipped += s
        self.streak.mul_(s).add_(s)  # +1 when skipped, back to 0 when not
        torch.maximum(self.streak_max, self.streak, out=self.streak_max)
        # new_full fills on the device; torch.tensor([...], device=...) would be a blocking
        # copy from pageable host memory every step (tests/integration/test_host_sync.py).
        row = torch.cat([terms.new_full((1,), float(step), dtype=torch.float32), terms.float()])
        self.last_bad = torch.where(skipped, row, self.last_bad)

    def check(self) -> int:
        """At a log step: the total skipped so far; raises DivergedError past the limit."""
        skipped, streak_max = torch.stack([self.skipped, self.streak_max]).tolist()
        self.streak_max.copy_(self.streak)
        if self.max_consecutive and streak_max >= self.max_consecutive:
            step, *values = self.last_bad.tolist()
            detail = ", ".join(f"{k}={v:.4g}" for k, v in zip(self.TERMS, values, strict=True))
            raise DivergedError(
                f"{streak_max} consecutive optimizer steps had a non-finite loss or gradient "
                f"(train.max_skipped_steps={self.max_consecutive}; the last at step "
                f"{int(step)}: {detail}): the run diverged; lower optim.lr, set "
                f"optim.grad_clip, or train in bf16/fp32, then resume from the last checkpoint")
        return int(skipped)

    def state(self) -> dict[str, int]:
        return {"n_skipped_steps": int(self.skipped.item()), "skip_streak": int(self.streak.item())}

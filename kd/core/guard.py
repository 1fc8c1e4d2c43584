"""Guards around the training loop: preemption signals and non-finite steps.

**Preemption.** SageMaker managed spot and Slurm preemption send SIGTERM (SageMaker then allows
120 s, Slurm its ``GraceTime``; torchrun, when it is the one signalled, passes SIGTERM on to its
workers and kills them 30 s later). :class:`StopRequest` turns SIGTERM (and SIGUSR1, which
Slurm's ``--signal=USR1@120`` sends ahead of the time limit) into a flag; the trainer asks
:meth:`StopRequest.should_stop` at every step boundary, saves a checkpoint and exits with
:data:`~kd.errors.Preempted.exit_code`. A signal may reach one rank only, so the ranks agree
through an all-reduce of their flags. The all-reduce is pipelined by one step: each boundary
reads the result of the one started at the previous boundary and starts the next, so every rank
sees the same flags at the same step and they all stop together, one step after the first of
them was signalled. Where the flags travel depends on the default group's backend:

- **gloo and NCCL:** on a small gloo group of their own, as host tensors: no device work, no
  interleaving with the gradient all-reduces, and no waiting (the all-reduce read at a boundary
  was started a whole step earlier).
- **smddp** (SageMaker's data-parallel library): AWS documents that it supports neither
  ``new_group()`` nor a second backend beside it
  (https://docs.aws.amazon.com/sagemaker/latest/dg/data-parallel-modify-sdp-pt.html), so the
  flags go through the default group as a one-element device tensor. A boundary waits for the
  copy of the previous boundary's result to the host (a CUDA event), that is for the device to
  finish the previous step; the CPU can still prepare the next step while the device runs the
  current one. The cost: one 4-byte all-reduce per step and a host that runs at most one step
  ahead of the device. A store-based flag was the alternative; it needs a round trip to the
  store host per rank and step, and a blocking handshake to make every rank stop at the same
  step, since ranks reach a boundary at different times.

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
import time
from collections.abc import Mapping
from datetime import timedelta
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist
from torch.torch_version import TorchVersion

from kd.core import signals
from kd.errors import DivergedError

log = logging.getLogger("kd")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


# Backends that allow no process group beside the default one (see the module docstring).
SINGLE_GROUP_BACKENDS = ("smddp",)


class _GlooFlags:
    """Stop flags all-reduced as host tensors on a gloo group of their own."""

    def __init__(self, timeout_s: float) -> None:
        self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
        self._pending: tuple[Any, torch.Tensor] | None = None

    def start(self, flag: bool) -> None:
        flags = torch.tensor([int(flag)], dtype=torch.int32)
        self._pending = (dist.all_reduce(flags, group=self.group, async_op=True), flags)

    def result(self) -> bool:
        """Whether any rank's flag was up in the all-reduce started last (False: none yet)."""
        if self._pending is None:
            return False
        work, flags = self._pending
        work.wait()
        return bool(flags.item())  # a CPU tensor: no device synchronisation

    def finish(self) -> None:
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None


class _DefaultGroupFlags:
    """Stop flags all-reduced as a device tensor on the default group (for smddp)."""

    def __init__(self, device: torch.device, timeout_s: float) -> None:
        # float32: integer reductions may not be offered by every backend; a sum of 0/1 flags is
        # exact in float32 up to 2**24 ranks.
        self.timeout_s = timeout_s
        self.flags = torch.zeros(1, dtype=torch.float32, device=device)
        self.cuda = device.type == "cuda"
        self.host = torch.zeros(1, dtype=torch.float32, pin_memory=self.cuda)
        self.copied = torch.cuda.Event() if self.cuda else None
        self._work: Any = None  # the CPU all-reduce in flight
        self._pending = False

    def start(self, flag: bool) -> None:
        # fill_ with a Python number launches a kernel; torch.tensor(..., device=cuda) would be a
        # blocking copy from pageable host memory.
        self.flags.fill_(float(flag))
        work = dist.all_reduce(self.flags, async_op=True)
        if self.copied is not None:
            # On CUDA, wait() only makes the current stream wait for the collective; the host
            # goes on (torch.distributed.Work.wait's docstring: without a timeout it is
            # synchronize(), the current stream blocking on the work). The copy then lands in
            # pinned memory in stream order, and the event marks it.
            work.wait()
            self.host.copy_(self.flags, non_blocking=True)
            self.copied.record()
        else:
            self._work = work
        self._pending = True

    def result(self) -> bool:
        if not self._pending:
            return False
        if self.copied is not None:
            self._wait_for_copy()  # the device is done with the previous boundary
            return bool(self.host.item())  # pinned host memory: no device synchronisation
        self._work.wait()
        return bool(self.flags.item())  # a CPU tensor

    def _wait_for_copy(self) -> None:
        """Poll the event rather than block in cudaEventSynchronize: a peer that died leaves
        the all-reduce unfinished, and a blocked host would run no signal handler and raise
        nothing for the watchdog to diagnose."""
        assert self.copied is not None
        deadline = time.monotonic() + self.timeout_s
        delay = 1e-5
        while not self.copied.query():
            if time.monotonic() > deadline:
                raise RuntimeError(f"the stop-flag all-reduce on the default group did not "
                                   f"finish within dist.timeout_s={self.timeout_s:g} s")
            time.sleep(delay)
            delay = min(2 * delay, 0.01)

    def finish(self) -> None:
        self.result()
        self._pending, self._work = False, None


class StopRequest:
    """A stop flag raised by SIGTERM/SIGUSR1, agreed on by all ranks at step boundaries.

    Args:
        distributed: whether a process group is up (several ranks must agree).
        timeout_s: timeout of the gloo group the flags travel on (``dist.timeout_s``).
        device: this rank's device; used only when the default group's backend allows no second
            group (smddp), where the flags travel as a device tensor. Default: the current CUDA
            device if CUDA is available, else the CPU.

    Example:
        >>> stop = StopRequest(distributed=False)
        >>> stop.should_stop()
        False
        >>> stop.request(signal.SIGTERM); stop.should_stop()
        True
        >>> stop.close()
    """

    def __init__(self, distributed: bool, timeout_s: float = 1800.0,
                 device: torch.device | None = None) -> None:
        self.flag = False
        self.signal_name: str | None = None
        self._exchange: _GlooFlags | _DefaultGroupFlags | None = None
        if distributed:
            if dist.get_backend() in SINGLE_GROUP_BACKENDS:
                if device is None:
                    device = (torch.device("cuda", torch.cuda.current_device())
                              if torch.cuda.is_available() else torch.device("cpu"))
                self._exchange = _DefaultGroupFlags(device, timeout_s)
            else:
                self._exchange = _GlooFlags(timeout_s)
        # They take the stop signals until close() (kd.core.signals); none off the main thread.
        self._registrations = [signals.push(sig, self._handler) for sig in STOP_SIGNALS]

    @property
    def group(self) -> Any:
        """The gloo group the flags travel on; None in one process or on the default group."""
        return getattr(self._exchange, "group", None)

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
        if self._exchange is None:
            return self.flag
        stop = self._exchange.result()
        self._exchange.start(self.flag)
        if stop and self.signal_name is None:
            self.signal_name = "a stop signal on another rank"
        return stop

    def close(self) -> None:
        """Finish the pending all-reduce and remove this request's signal handlers."""
        if self._exchange is not None:
            try:
                self._exchange.finish()
            except RuntimeError:  # the group is already broken: nothing left to agree on
                pass
        for registration in self._registrations:
            signals.pop(registration)
        self._registrations = []


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

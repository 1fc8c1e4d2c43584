"""Heartbeats between ranks, so that a rank that dies or hangs is named, not waited for.

When one rank dies or hangs, the others learn it only from a failed collective: at once when its
process has exited (its connections close), or after ``dist.timeout_s`` when it is alive but
stuck (gloo and NCCL give up on a collective after the process-group timeout; torchrun, for its
part, stops a node's other workers when one of them exits). The error they get names no rank.

To name it, each rank runs a :class:`Watchdog`: a daemon thread that writes a heartbeat (step,
host, pid, state) every :func:`heartbeat_interval` seconds to the rendezvous store (the TCPStore
at ``MASTER_ADDR:MASTER_PORT``, which torchrun's agent hosts, or rank 0 without torchrun). When a
collective fails, :func:`diagnose` marks this rank ``waiting``, reads every heartbeat twice, one
heartbeat period apart, and names the ranks that explain the failure, strongest evidence first:

- ``failed``: the rank recorded its own error before exiting;
- ``silent``: its heartbeat stopped: the process exited, was killed or is frozen;
- ``done``: it finished while the others were still in a collective;
- ``missing``: it never sent one (it died or hung before training started);
- ``stuck``: its heartbeat goes on but it never reached the collective (stuck in its own code).

The result is a :class:`~kd.errors.DistributedError` (exit code 3) with one line such as
``rank 1 (node-3, pid 4242) stopped responding: its process has exited (last heartbeat 4 s ago,
at step 12); this rank's (0) collective after step 12 failed (...)``. Every store access is
bounded in time: the store's host may be the one that is gone.

torchrun sends SIGTERM to a node's other workers as soon as one exits (and SIGKILL 30 s later).
So that they can still name it, the watchdog turns SIGTERM into :class:`Terminated` while the
process group is up (the training loop's own handler, :class:`kd.core.guard.StopRequest`, takes over
inside the loop), and ignores it while a diagnosis runs and, once a fault is found, until the
process exits. A SIGTERM that no other rank's failure explains ends the process with code 143,
as the signal would. These handlers are registered with :mod:`kd.core.signals`, which decides
which one is in effect.

Cost: one small store write per rank per heartbeat, from the thread, and an integer assignment
per training step (:func:`report_step`); nothing on the device, no collectives.

:func:`add_step_observer` registers a function called after each step the watchdog records,
with the rank and the step: a seam for what must happen at an exact step of a distributed run.
The tests inject faults through it (``tests/multiproc/faults.py``: a rank that kills, stops or
hangs itself right after a given step).
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from datetime import timedelta
from types import FrameType

import psutil
import torch.distributed as dist

from kd.core import signals
from kd.errors import DistributedError

log = logging.getLogger("kd")

# Substrings of the RuntimeErrors gloo raises when a peer's connection closes or a collective
# times out (its transport's source path, then the reason); NCCL's and the store's errors are
# torch.distributed.DistError subclasses.
COLLECTIVE_MARKERS = ("gloo/transport", "Connection closed by peer", "Connection reset by peer",
                      "Timed out waiting")
MAX_NAMED = 4  # ranks named in the message; the rest are counted

StoreFactory = Callable[[], dist.Store]
StepObserver = Callable[[int, int], None]  # (rank, step)
STRONG_EVIDENCE = ("failed", "silent", "done", "missing")  # enough to explain a SIGTERM


class Terminated(SystemExit):
    """SIGTERM, as an exception: what the watchdog's handler raises while the process group is
    up (outside the training loop, whose own handler stops at a step boundary, ``kd.core.guard``).

    torchrun sends SIGTERM to a node's workers as soon as one of them exits: as an exception,
    it leaves time to name that worker. It ends the process with code 143, as the signal would.
    """

    def __init__(self) -> None:
        super().__init__(128 + signal.SIGTERM)


def heartbeat_interval(timeout_s: float) -> float:
    """Seconds between heartbeats: a fifth of the timeout, between 0.5 s and 5 s."""
    return min(5.0, max(0.5, timeout_s / 5))


@dataclass(frozen=True)
class Heartbeat:
    """What one rank last wrote to the store."""

    rank: int
    seq: int  # increases with every write: a heartbeat that does not change is a silent rank
    time: float  # wall clock (time.time) of the write
    step: int  # optimizer steps completed
    host: str
    pid: int
    state: str = "running"  # running | waiting (in a failed collective) | failed | done
    detail: str = ""  # the error, for waiting and failed

    def encode(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Heartbeat:
        return cls(**json.loads(raw))


@dataclass(frozen=True)
class Suspect:
    """A rank that explains a failed collective, and why (see the module docstring)."""

    rank: int
    reason: str  # failed | silent | missing | stuck | done
    beat: Heartbeat | None = None


def is_collective_failure(error: BaseException) -> bool:
    """Whether ``error`` is a collective (or the store) giving up on a peer."""
    if isinstance(error, dist.DistError):
        return True
    return isinstance(error, RuntimeError) and any(m in str(error) for m in COLLECTIVE_MARKERS)


def summarize_error(error: BaseException, limit: int = 200) -> str:
    """The first line of an error, without gloo's ``[file.cc:123]`` prefix."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = re.sub(r"^\[[^\]]*\]\s*", "", lines[0]) if lines else type(error).__name__
    return text if len(text) <= limit else text[:limit - 1] + "…"


def find_suspects(rank: int, world_size: int, before: Mapping[int, Heartbeat],
                  after: Mapping[int, Heartbeat]) -> list[Suspect]:
    """The other ranks that explain this rank's failed collective, from two readings of the
    heartbeats taken at least a heartbeat period apart; only the strongest kind of evidence."""
    found: dict[str, list[Suspect]] = {k: [] for k in ("failed", "silent", "done", "missing",
                                                       "stuck")}
    for r in range(world_size):
        if r == rank:
            continue
        first, last = before.get(r), after.get(r)
        if last is None:
            found["missing"].append(Suspect(r, "missing"))
        elif last.state == "failed":
            found["failed"].append(Suspect(r, "failed", last))
        elif last.state == "waiting":
            continue  # another victim of the same fault
        elif last.state == "done":
            found["done"].append(Suspect(r, "done", last))
        elif first is not None and first.seq == last.seq:
            found["silent"].append(Suspect(r, "silent", last))
        else:
            found["stuck"].append(Suspect(r, "stuck", last))
    return next((group for group in found.values() if group), [])


def _local_status(beat: Heartbeat) -> str | None:
    """The psutil status of a rank's process when it runs on this host ("gone" when it has
    exited), else None."""
    if beat.host != socket.gethostname():
        return None
    try:
        status = psutil.Process(beat.pid).status()
    except psutil.NoSuchProcess:
        return "gone"
    return "gone" if status == psutil.STATUS_ZOMBIE else status


def _process_state(beat: Heartbeat) -> str:
    """What can be seen of a silent rank's process from here (same host only)."""
    status = _local_status(beat)
    if status is None:
        return "it exited, was killed, or is frozen"
    if status == "gone":
        return "its process has exited"
    if status == psutil.STATUS_STOPPED:
        return "its process is stopped (SIGSTOP)"
    return "its process is alive but frozen"


def _who(beat: Heartbeat) -> str:
    return f"rank {beat.rank} ({beat.host}, pid {beat.pid})"


def describe_suspect(s: Suspect, now: float) -> str:
    """One clause about one suspect rank."""
    if s.beat is None:
        return f"rank {s.rank} never sent a heartbeat: it died or hung before training started"
    b, ago = s.beat, max(0.0, now - s.beat.time)
    if s.reason == "failed":
        return f"{_who(b)} failed after step {b.step}: {b.detail}"
    if s.reason == "silent":
        return (f"{_who(b)} stopped responding: {_process_state(b)} (last heartbeat {ago:.0f} s "
                f"ago, at step {b.step})")
    if s.reason == "done":
        return f"{_who(b)} finished after step {b.step} while the others were in a collective"
    return (f"{_who(b)} is alive but stuck after step {b.step}: its heartbeat goes on "
            f"({ago:.0f} s ago) but it never joined the collective; `py-spy dump --pid {b.pid}` "
            f"on {b.host} shows where it waits")


def describe_fault(rank: int, step: int, error: BaseException, suspects: list[Suspect],
                   now: float, timeout_s: float, store_problem: str | None = None) -> str:
    """The one-line message of a :class:`~kd.errors.DistributedError`."""
    # gloo appends generic advice to its errors: keep the first sentence.
    summary = re.split(r"(?<=\w)\. ", summarize_error(error))[0]
    if isinstance(error, Terminated):
        here = (f"this rank ({rank}) was stopped by SIGTERM after step {step} (torchrun stops "
                f"the other workers of a node when one fails)")
    elif "timed out" in summary.lower() or "timeout" in summary.lower():
        here = (f"this rank ({rank}) gave up on a collective after step {step} when "
                f"dist.timeout_s={timeout_s:g} ran out ({summary})")
    else:
        here = f"this rank's ({rank}) collective after step {step} failed ({summary})"
    if store_problem is not None:
        return (f"{here}; the other ranks' heartbeats could not be read ({store_problem}): the "
                f"process hosting the store (torchrun's agent on the first node, or rank 0) may "
                f"be gone; check every rank's log")
    if not suspects:
        return (f"{here}; every other rank's heartbeat is current and none reported an error: "
                f"suspect the network between the nodes, or this rank's communication library")
    named = [describe_suspect(s, now) for s in suspects[:MAX_NAMED]]
    if len(suspects) > MAX_NAMED:
        named.append(f"and {len(suspects) - MAX_NAMED} more ranks")
    logs = " and ".join(f"rank {s.rank}" for s in suspects[:2])
    return f"{'; '.join(named)}; {here}. Check the log of {logs}"


class Watchdog:
    """This rank's heartbeat thread, and the diagnosis of a failed collective.

    Args:
        rank, world_size: this process's place in the group.
        connect: returns a new store client (its own connection: a hung operation of the
            heartbeat thread must not block the diagnosis).
        timeout_s: ``dist.timeout_s``; sets the heartbeat period and appears in messages.
        prefix: store key prefix, distinct per torchrun restart.
        interval_s: seconds between heartbeats (default: :func:`heartbeat_interval`).

    Example:
        >>> store = dist.HashStore()
        >>> wd = Watchdog(0, 2, lambda: store, timeout_s=10).start()
        >>> wd.report_step(3)
        >>> wd.stop()
    """

    def __init__(self, rank: int, world_size: int, connect: StoreFactory, timeout_s: float,
                 prefix: str = "kd/heartbeat", interval_s: float | None = None) -> None:
        self.rank, self.world_size = rank, world_size
        self.connect = connect
        self.timeout_s = timeout_s
        self.prefix = prefix
        self.interval_s = interval_s or heartbeat_interval(timeout_s)
        # Reading twice this far apart shows which heartbeats still move.
        self.settle_s = 1.5 * self.interval_s + 0.5
        self.read_timeout_s = max(2.0, 2 * self.interval_s)
        self.step = 0
        self.state, self.detail = "running", ""
        self._seq = 0  # heartbeats begun
        self._done_seq = 0  # heartbeats written
        self._stopping = False
        self._wake = threading.Event()
        self._written = threading.Condition()
        self._thread: threading.Thread | None = None
        self.pid = os.getpid()

    def key(self, rank: int) -> str:
        return f"{self.prefix}/{rank}"

    # ------------------------------------------------------------------------ heartbeats
    def start(self) -> Watchdog:
        self._thread = threading.Thread(target=self._run, name="kd-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        store, warned = None, False
        while not self._stopping:
            try:
                store = store or self.connect()
                self._seq += 1
                beat = Heartbeat(self.rank, self._seq, time.time(), self.step,
                                 socket.gethostname(), self.pid, self.state, self.detail)
                store.set(self.key(self.rank), beat.encode())
                with self._written:
                    self._done_seq = beat.seq
                    self._written.notify_all()
            except Exception as e:  # the store may be gone; the collectives will tell
                store = None
                if not warned:
                    log.warning("kd: rank %d cannot write its heartbeat: %s", self.rank,
                                summarize_error(e))
                    warned = True
            self._wake.wait(self.interval_s)
            self._wake.clear()

    def report_step(self, step: int) -> None:
        """Record ``step`` completed optimizer steps (an attribute store; no I/O)."""
        self.step = step

    def publish(self, state: str, detail: str = "", wait_s: float = 2.0) -> None:
        """Write ``state`` now (from the thread) and wait up to ``wait_s`` for the write."""
        self.state, self.detail = state, detail
        if self._thread is None or not self._thread.is_alive():
            return
        want = self._seq + 1  # a heartbeat begun before the state changed may not carry it
        with self._written:
            self._wake.set()
            self._written.wait_for(lambda: self._done_seq >= want, wait_s)

    def stop(self) -> None:
        """Write a last heartbeat (``done`` unless a failure was published) and end the thread."""
        if self.state == "running":
            self.publish("done", wait_s=1.0)
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)

    # ------------------------------------------------------------------------ diagnosis
    def read(self) -> dict[int, Heartbeat]:
        """Every rank's last heartbeat; raises TimeoutError if the store does not answer within
        :attr:`read_timeout_s` (the store's host may be gone), or the store's own error."""
        result: dict[int, Heartbeat] = {}
        failure: list[BaseException] = []

        def work() -> None:
            try:
                store = self.connect()
                keys = [self.key(r) for r in range(self.world_size)]
                present = keys if store.check(keys) else [k for k in keys if store.check([k])]
                for raw in store.multi_get(present) if present else []:
                    beat = Heartbeat.decode(raw)
                    result[beat.rank] = beat
            except Exception as e:
                failure.append(e)

        reader = threading.Thread(target=work, name="kd-heartbeat-read", daemon=True)
        reader.start()
        reader.join(self.read_timeout_s)
        if reader.is_alive():
            raise TimeoutError(f"the store did not answer within {self.read_timeout_s:g} s")
        if failure:
            raise failure[0]
        return dict(result)

    def diagnose(self, error: BaseException) -> DistributedError | None:
        """The other ranks' state after ``error`` on this rank (a failed collective, or
        :class:`Terminated`), as one line; ``None`` for a SIGTERM that no rank explains.

        Takes about :attr:`settle_s` seconds (two readings of the heartbeats) unless the first
        reading explains every other rank. SIGTERM is ignored meanwhile, and from then on when
        a fault is found: the rank is ending, and torchrun's SIGTERM, sent as soon as another
        worker exits, must not cut the diagnosis short or replace its exit code.
        """
        ignoring = signals.push(signal.SIGTERM, signal.SIG_IGN)
        fault = None
        try:
            fault = self._diagnose(error)
        finally:
            if fault is None:
                signals.pop(ignoring)
        return fault

    def _diagnose(self, error: BaseException) -> DistributedError | None:
        self.publish("waiting", f"{type(error).__name__}: {summarize_error(error)}")
        try:
            before = self.read()
            # Explained without a second reading: a recorded state, or a process gone from
            # this host (torchrun's workers on one node); a second reading then adds nothing.
            if len(before) == self.world_size and all(
                    b.state in ("failed", "waiting", "done") or _local_status(b) == "gone"
                    for r, b in before.items() if r != self.rank):
                after = before
            else:
                time.sleep(self.settle_s)
                after = self.read()
        except Exception as e:
            if isinstance(error, Terminated):
                return None
            return DistributedError(describe_fault(self.rank, self.step, error, [], time.time(),
                                                   self.timeout_s,
                                                   store_problem=summarize_error(e)))
        suspects = find_suspects(self.rank, self.world_size, before, after)
        if isinstance(error, Terminated) and not any(s.reason in STRONG_EVIDENCE
                                                     for s in suspects):
            return None  # stopped from outside (a scheduler, a user): no fault to report
        return DistributedError(describe_fault(self.rank, self.step, error, suspects,
                                               time.time(), self.timeout_s))


# ------------------------------------------------------------------------ this process's watchdog
_active: Watchdog | None = None
_sigterm: signals.Registration | None = None  # _on_sigterm's, while _active runs
_step_observers: list[StepObserver] = []


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    """SIGTERM while the process group is up: :class:`Terminated`, to diagnose (see above)."""
    if _active is None:  # stopped from a thread that could not remove this handler
        signals.default_action(signum)
        return
    raise Terminated()


def start(rank: int, world_size: int, timeout_s: float,
          connect: StoreFactory | None = None) -> Watchdog:
    """Start this process's watchdog (``kd.core.dist.init_distributed`` does, after the group).

    Without ``connect``, heartbeats go to the TCPStore at ``MASTER_ADDR:MASTER_PORT``.
    """
    global _active, _sigterm
    stop()
    if connect is None:
        host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        store_timeout = timedelta(seconds=max(2.0, 2 * heartbeat_interval(timeout_s)))

        def connect() -> dist.Store:
            return dist.TCPStore(host, port, is_master=False, timeout=store_timeout,
                                 wait_for_workers=False)

    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    _active = Watchdog(rank, world_size, connect, timeout_s, prefix=f"kd/heartbeat/{restart}")
    _sigterm = signals.push(signal.SIGTERM, _on_sigterm)
    return _active.start()


def stop() -> None:
    """Stop this process's watchdog, if any (``kd.core.dist.cleanup`` does).

    Its SIGTERM handler goes; a SIGTERM ignored by a diagnosis that found a fault stays ignored.
    """
    global _active, _sigterm
    if _active is not None:
        _active.stop()
        _active = None
    if _sigterm is not None:
        signals.pop(_sigterm)
        _sigterm = None


def add_step_observer(observer: StepObserver) -> Callable[[], None]:
    """Call ``observer(rank, step)`` right after this process's watchdog records ``step``
    (:func:`report_step`; none is called in one process); returns what removes it.

    Observers run in the training loop, between two steps: they must be quick.
    """
    _step_observers.append(observer)
    return lambda: _step_observers.remove(observer)


def report_step(step: int) -> None:
    """Tell the watchdog that ``step`` optimizer steps are done (a no-op in one process)."""
    if _active is not None:
        _active.report_step(step)
        for observe in tuple(_step_observers):
            observe(_active.rank, step)


def diagnose(error: BaseException) -> DistributedError | None:
    """What ``error`` means for the job, when it ends this rank of a distributed run.

    A failed collective (``error`` or an exception it interrupted), or a SIGTERM that another
    rank's failure explains: a :class:`~kd.errors.DistributedError` naming the ranks at fault.
    Anything else: ``None``, after publishing it so that the other ranks can name this one.
    """
    if _active is None:
        return None
    cause: BaseException | None = error
    for _ in range(8):  # a SIGTERM may interrupt the unwinding of a failed collective
        if cause is None or is_collective_failure(cause):
            break
        cause = cause.__cause__ or cause.__context__
    else:
        cause = None
    if cause is not None or isinstance(error, Terminated):
        return _active.diagnose(cause or error)
    what = type(error).__name__
    detail = summarize_error(error) if str(error) else ""
    _active.publish("failed", f"{what}: {detail}" if detail else what)
    return None

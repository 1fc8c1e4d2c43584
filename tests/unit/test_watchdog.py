"""Heartbeats and the diagnosis of a failed collective, on in-memory and real TCP stores."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from datetime import timedelta

import pytest
import torch.distributed as dist

from kd.core import signals, watchdog
from kd.core.watchdog import Heartbeat, Suspect, Watchdog, describe_fault, find_suspects
from kd.errors import DistributedError
from tests.multiproc.faults import Fault

HOST = socket.gethostname()
GLOO_TIMEOUT = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] "
                            "Timed out waiting 10000ms for recv operation to complete")
GLOO_CLOSED = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:538] Read "
                           "error [127.0.0.1]:19871: Connection reset by peer. This is "
                           "typically caused by a remote worker hanging or bugs in the "
                           "application.")


def beat(rank: int, seq: int, state: str = "running", step: int = 7, detail: str = "",
         age: float = 0.0, host: str = "node-1", pid: int = 4242) -> Heartbeat:
    return Heartbeat(rank, seq, time.time() - age, step, host, pid, state, detail)


@pytest.mark.parametrize("before, after, expected", [
    # rank 2's heartbeat did not move: it is silent, and rank 1 (waiting too) is a victim
    ({1: beat(1, 3), 2: beat(2, 5)}, {1: beat(1, 4, "waiting"), 2: beat(2, 5)}, [(2, "silent")]),
    # a recorded error outranks a silent heartbeat (rank 2 failed, then its heartbeat stopped)
    ({1: beat(1, 3), 2: beat(2, 5, "failed")}, {1: beat(1, 3), 2: beat(2, 5, "failed")},
     [(2, "failed")]),
    # alive, not in the collective: stuck
    ({1: beat(1, 3), 2: beat(2, 5, "waiting")}, {1: beat(1, 4), 2: beat(2, 6, "waiting")},
     [(1, "stuck")]),
    # never wrote one
    ({1: beat(1, 3, "waiting")}, {1: beat(1, 4, "waiting")}, [(2, "missing")]),
    # everyone else is a victim too: nobody to name
    ({1: beat(1, 3, "waiting"), 2: beat(2, 3, "waiting")},
     {1: beat(1, 3, "waiting"), 2: beat(2, 3, "waiting")}, []),
])
def test_find_suspects_names_the_strongest_evidence_only(before, after, expected):
    suspects = find_suspects(0, 3, before, after)
    assert [(s.rank, s.reason) for s in suspects] == expected


def test_messages_name_rank_host_pid_and_step():
    now = time.time()
    silent = describe_fault(0, 12, GLOO_CLOSED, [Suspect(1, "silent", beat(1, 5, age=31))], now,
                            10)
    assert silent.startswith("rank 1 (node-1, pid 4242) stopped responding:")
    assert "last heartbeat 31 s ago, at step 7" in silent
    assert "this rank's (0) collective after step 12 failed (Read error" in silent
    assert "typically caused" not in silent and "pair.cc" not in silent  # gloo's boilerplate
    assert silent.endswith("Check the log of rank 1") and "\n" not in silent

    stuck = describe_fault(0, 7, GLOO_TIMEOUT, [Suspect(1, "stuck", beat(1, 9))], now, 10)
    assert "rank 1 (node-1, pid 4242) is alive but stuck after step 7" in stuck
    assert "py-spy dump --pid 4242" in stuck
    assert "gave up on a collective after step 7 when dist.timeout_s=10 ran out" in stuck

    failed = describe_fault(0, 7, GLOO_CLOSED,
                            [Suspect(1, "failed", beat(1, 9, "failed", detail="DataError: x"))],
                            now, 10)
    assert failed.startswith("rank 1 (node-1, pid 4242) failed after step 7: DataError: x;")

    many = describe_fault(0, 7, GLOO_CLOSED, [Suspect(r, "missing") for r in range(1, 8)], now, 10)
    assert "rank 4 never sent a heartbeat" in many and "and 3 more ranks" in many

    alone = describe_fault(0, 7, GLOO_TIMEOUT, [], now, 10)
    assert "none reported an error: suspect the network" in alone
    gone = describe_fault(0, 7, GLOO_CLOSED, [], now, 10, store_problem="connection refused")
    assert "heartbeats could not be read (connection refused)" in gone


def test_process_state_of_a_silent_rank_on_this_host():
    proc = subprocess.Popen(["sleep", "60"])
    try:
        proc.send_signal(signal.SIGSTOP)
        time.sleep(0.2)
        frozen = Suspect(1, "silent", beat(1, 5, host=HOST, pid=proc.pid))
        assert "its process is stopped (SIGSTOP)" in watchdog.describe_suspect(frozen, time.time())
    finally:
        proc.kill()
        proc.wait()
    assert "its process has exited" in watchdog.describe_suspect(frozen, time.time())


def test_collective_failures_are_recognised():
    assert watchdog.is_collective_failure(GLOO_TIMEOUT)
    assert watchdog.is_collective_failure(GLOO_CLOSED)
    assert watchdog.is_collective_failure(dist.DistBackendError("NCCL watchdog timeout"))
    assert not watchdog.is_collective_failure(RuntimeError("CUDA out of memory"))
    assert not watchdog.is_collective_failure(RuntimeError("Default process group has not been "
                                                           "initialized"))
    assert not watchdog.is_collective_failure(ValueError("Timed out waiting"))


def _pair(store: dist.Store, interval: float = 0.1) -> tuple[Watchdog, Watchdog]:
    return tuple(Watchdog(r, 2, lambda: store, timeout_s=10, interval_s=interval).start()
                 for r in (0, 1))


def test_a_dead_rank_is_named_as_silent():
    store = dist.HashStore()
    survivor = Watchdog(0, 2, lambda: store, timeout_s=10, interval_s=0.1).start()
    # rank 1's last words before a SIGKILL: a heartbeat that will never change
    store.set(survivor.key(1), beat(1, 9, step=3, age=2, pid=999_999).encode())
    survivor.report_step(4)
    t0 = time.monotonic()
    error = survivor.diagnose(GLOO_CLOSED)
    assert time.monotonic() - t0 < 2  # one heartbeat period and a bit
    survivor.stop()
    assert isinstance(error, DistributedError) and error.exit_code == 3
    assert str(error).startswith("rank 1 (node-1, pid 999999) stopped responding")
    assert "collective after step 4 failed" in str(error)


def test_a_rank_whose_process_is_gone_from_this_host_needs_no_second_reading():
    store = dist.HashStore()
    survivor = Watchdog(0, 2, lambda: store, timeout_s=10, interval_s=2).start()
    gone = subprocess.Popen(["true"])
    gone.wait()
    store.set(survivor.key(1), beat(1, 9, step=3, host=HOST, pid=gone.pid).encode())
    t0 = time.monotonic()
    message = str(survivor.diagnose(GLOO_CLOSED))
    assert time.monotonic() - t0 < survivor.settle_s / 2, message  # settle_s is 3.5 s here
    survivor.stop()
    assert f"rank 1 ({HOST}, pid {gone.pid}) stopped responding: its process has exited" \
        in message


def test_a_stuck_rank_and_a_failed_rank_are_named():
    store = dist.HashStore()
    survivor, stuck = _pair(store)
    stuck.report_step(5)
    message = str(survivor.diagnose(GLOO_TIMEOUT))
    assert f"rank 1 ({HOST}, pid" in message and "is alive but stuck after step 5" in message
    stuck.publish("failed", "DataError: train/0001.jpg is truncated")
    message = str(survivor.diagnose(GLOO_CLOSED))
    assert "failed after step 5: DataError: train/0001.jpg is truncated" in message
    for w in (survivor, stuck):
        w.stop()


def test_the_last_heartbeat_says_done_or_keeps_the_failure():
    store = dist.HashStore()
    a, b = _pair(store)
    a.stop()
    b.publish("failed", "ValueError: boom")
    b.stop()
    assert Heartbeat.decode(store.get(a.key(0))).state == "done"
    last = Heartbeat.decode(store.get(b.key(1)))
    assert (last.state, last.detail) == ("failed", "ValueError: boom")


def test_an_unreachable_store_bounds_the_diagnosis():
    def hang() -> dist.Store:
        time.sleep(60)
        raise AssertionError("unreachable")

    wd = Watchdog(0, 2, hang, timeout_s=10, interval_s=0.1)
    t0 = time.monotonic()
    message = str(wd.diagnose(GLOO_CLOSED))
    assert time.monotonic() - t0 < wd.read_timeout_s + 1
    assert "heartbeats could not be read (the store did not answer within 2 s)" in message


def test_module_functions_over_a_real_tcp_store(monkeypatch):
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                           timeout=timedelta(seconds=10))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(server.port))
    wd = watchdog.start(rank=0, world_size=2, timeout_s=2.5)  # a heartbeat every 0.5 s
    try:
        watchdog.report_step(11)
        assert watchdog.diagnose(ValueError("not a collective error")) is None  # published
        last = Heartbeat.decode(server.get(wd.key(0)))
        assert (last.step, last.state, last.detail) == (11, "failed", "ValueError: not a "
                                                        "collective error")
        error = watchdog.diagnose(GLOO_TIMEOUT)
        assert str(error).startswith("rank 1 never sent a heartbeat")
    finally:
        watchdog.stop()
    assert watchdog.diagnose(GLOO_TIMEOUT) is None  # no watchdog: nothing to diagnose
    watchdog.report_step(12)  # a no-op


def test_step_observers_see_each_reported_step_of_a_running_watchdog():
    seen = []
    remove = watchdog.add_step_observer(lambda rank, step: seen.append((rank, step)))
    try:
        watchdog.report_step(1)  # no watchdog: no observer called
        store = dist.HashStore()
        watchdog.start(rank=1, world_size=2, timeout_s=2.5, connect=lambda: store)
        try:
            watchdog.report_step(2)
            watchdog.report_step(3)
        finally:
            watchdog.stop()
    finally:
        remove()
    watchdog.report_step(4)  # no watchdog, no observer
    assert seen == [(1, 2), (1, 3)]


def test_test_fault_variable_is_checked():
    with pytest.raises(ValueError, match="RANK:STEP:KIND"):
        Fault.parse("1:3:explode")
    fault = Fault.parse("1:3:kill")
    assert fault == Fault(rank=1, step=3, kind="kill")
    fault(0, 3)  # another rank's fault: no-op
    fault(1, 2)  # another step: no-op


@pytest.fixture(autouse=True)
def sigterm_handler():
    """A diagnosis that finds a fault leaves SIGTERM ignored (the process is ending): undo it."""
    before = signal.getsignal(signal.SIGTERM)
    yield before
    for registration in signals.registrations(signal.SIGTERM):
        signals.pop(registration)
    assert signal.getsignal(signal.SIGTERM) is before


def _sigterm_during(unwinding: BaseException | None) -> BaseException:
    """The exception a SIGTERM raises, alone or while ``unwinding`` propagates."""
    try:
        if unwinding is None:
            signal.raise_signal(signal.SIGTERM)  # what torchrun sends when rank 1 exits
        try:
            raise unwinding
        finally:
            signal.raise_signal(signal.SIGTERM)
    except watchdog.Terminated as e:
        assert e.code == 143
        return e
    raise AssertionError("SIGTERM raised nothing")


@pytest.mark.parametrize("rank1, unwinding, expected", [
    ("silent", None, "rank 1 (node-1, pid 999999) stopped responding: it exited, was killed, "
     "or is frozen"),
    ("silent", None, "; this rank (0) was stopped by SIGTERM after step 0 (torchrun stops"),
    ("silent", GLOO_CLOSED, "; this rank's (0) collective after step 0 failed (Read error"),
    ("waiting", None, None),  # a scheduler's SIGTERM to every rank: no diagnosis, exit 143
])
def test_sigterm_names_the_rank_that_explains_it(sigterm_handler, rank1, unwinding, expected):
    store = dist.HashStore()
    wd = watchdog.start(rank=0, world_size=2, timeout_s=2.5, connect=lambda: store)
    try:
        store.set(wd.key(1), beat(1, 9, rank1, step=3, age=2, pid=999_999).encode())
        fault = watchdog.diagnose(_sigterm_during(unwinding))
        if expected is None:
            assert fault is None
            assert signals.current(signal.SIGTERM) is watchdog._on_sigterm
        else:
            assert expected in str(fault)
            # the rank is ending: a second SIGTERM must not replace its exit code 3
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        watchdog.stop()
    expected_after = sigterm_handler if expected is None else signal.SIG_IGN
    assert signal.getsignal(signal.SIGTERM) is expected_after

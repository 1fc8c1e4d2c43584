"""The stack of signal handlers (kd.core.signals): nesting, removal in any order, ignoring, and
what other threads and forked children get. On SIGUSR2, which nothing else here handles."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator

import pytest

from kd.core import signals

SIG = signal.SIGUSR2


@pytest.fixture(autouse=True)
def original() -> Iterator[object]:
    """The handler before each test; a test must leave it in place."""
    before = signal.getsignal(SIG)
    yield before
    leftover = signals.registrations(SIG)
    for registration in leftover:
        signals.pop(registration)
    assert leftover == () and signal.getsignal(SIG) is before


def recorder(calls: list[str], name: str) -> signals.Handler:
    return lambda signum, frame: calls.append(name)


def test_the_innermost_handler_wins_and_leaving_restores_the_previous(original):
    calls: list[str] = []
    with signals.handle(SIG, recorder(calls, "outer")):
        signal.raise_signal(SIG)
        with signals.handle(SIG, recorder(calls, "inner")):
            signal.raise_signal(SIG)
        signal.raise_signal(SIG)
        assert len(signals.registrations(SIG)) == 1
    assert calls == ["outer", "inner", "outer"]
    assert signals.current(SIG) is None and signal.getsignal(SIG) is original


def test_registrations_may_be_removed_in_any_order(original):
    calls: list[str] = []
    first = signals.push(SIG, recorder(calls, "first"))
    second = signals.push(SIG, recorder(calls, "second"))
    signals.pop(first)  # not the one in effect: nothing changes
    signal.raise_signal(SIG)
    signals.pop(first)  # twice: a no-op
    signals.pop(second)
    assert calls == ["second"] and signal.getsignal(SIG) is original


def test_ignored_ignores_at_the_os_level_and_an_ignore_left_in_place_outlives_the_rest(original):
    calls: list[str] = []
    handler = recorder(calls, "handler")
    with signals.handle(SIG, handler):
        with signals.ignored(SIG):
            assert signal.getsignal(SIG) is signal.SIG_IGN
            assert signals.current(SIG) is signal.SIG_IGN
            signal.raise_signal(SIG)
        assert signals.current(SIG) is handler
        signal.raise_signal(SIG)
        ignoring = signals.push(SIG, signal.SIG_IGN)  # as a diagnosis that found a fault
    assert signal.getsignal(SIG) is signal.SIG_IGN  # the handler went, the ignore stays
    signals.pop(ignoring)
    assert calls == ["handler"] and signal.getsignal(SIG) is original


def test_other_threads_change_nothing(original):
    main = signals.push(SIG, signal.SIG_IGN)
    made: list[signals.Registration] = []

    def elsewhere() -> None:
        made.append(signals.push(SIG, recorder([], "thread")))
        signals.pop(made[0])
        signals.pop(main)

    thread = threading.Thread(target=elsewhere)
    thread.start()
    thread.join()
    assert len(made) == 1 and signals.registrations(SIG) == (main,)
    assert signal.getsignal(SIG) is signal.SIG_IGN
    signals.pop(main)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_takes_the_default_action():
    with signals.handle(SIG, recorder([], "parent")):
        pid = os.fork()
        if pid == 0:  # the child: the parent's handler must not run here
            try:
                signal.raise_signal(SIG)
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == SIG

"""The one owner of this process's signal handlers: a stack of handlers per signal.

Two parts of kd take SIGTERM, at different times: the watchdog (:mod:`kd.core.watchdog`) while
the process group is up, and :class:`kd.core.guard.StopRequest` inside the training loop; a
diagnosis of a failed collective ignores it meanwhile. Rather than each saving and restoring
what it found (which holds only if they finish in the reverse order of their start), each
registers here:

- :func:`push` registers a handler (a function, ``signal.SIG_IGN`` or ``signal.SIG_DFL``) and
  returns its :class:`Registration`; :func:`pop` removes it, in any order;
- :func:`handle` and :func:`ignored` do both around a ``with`` block;
- the registration made last, among those not yet removed, is in effect; once none is left,
  the handler found before the first one is back.

Python runs signal handlers in the main thread only, and lets only the main thread set them: a
call of :func:`push` or :func:`pop` from another thread changes nothing (its registration is
inert). A process forked after a registration (a data loader's worker) inherits the handler; a
signal delivered there takes the default action (:func:`default_action`): the handlers are
meant for the process that registered them.

Example:
    >>> with handle(signal.SIGTERM, lambda signum, frame: print("stopping")):
    ...     with ignored(signal.SIGTERM):
    ...         signal.raise_signal(signal.SIGTERM)  # ignored
    ...     signal.raise_signal(signal.SIGTERM)
    stopping
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from types import FrameType
from typing import Any

Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers


@dataclass(eq=False)
class Registration:
    """One handler registered for one signal, by the process ``pid``; compared by identity."""

    signum: int
    handler: Handler
    pid: int


_stacks: dict[int, list[Registration]] = {}
_before: dict[int, Handler] = {}  # the handler found when a signal's stack was empty


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def push(signum: int, handler: Handler) -> Registration:
    """Register ``handler`` for ``signum``; in effect until :func:`pop` or a later push."""
    registration = Registration(signum, handler, os.getpid())
    if not _in_main_thread():
        return registration
    stack = _stacks.setdefault(signum, [])
    if not stack:
        _before[signum] = signal.getsignal(signum)
    stack.append(registration)
    _install(signum)
    return registration


def pop(registration: Registration) -> None:
    """Remove ``registration`` (a no-op if it is not registered, or off the main thread)."""
    stack = _stacks.get(registration.signum, [])
    if not _in_main_thread() or not any(r is registration for r in stack):
        return
    stack.remove(registration)
    _install(registration.signum)


@contextmanager
def handle(signum: int, handler: Handler) -> Iterator[Registration]:
    """``handler`` takes ``signum`` inside the block (unless an inner block registers another)."""
    registration = push(signum, handler)
    try:
        yield registration
    finally:
        pop(registration)


def ignored(signum: int) -> AbstractContextManager[Registration]:
    """A ``with`` block in which ``signum`` is ignored."""
    return handle(signum, signal.SIG_IGN)


def current(signum: int) -> Handler | None:
    """The handler in effect among the registered ones; None when none is registered."""
    stack = _stacks.get(signum)
    return stack[-1].handler if stack else None


def registrations(signum: int) -> tuple[Registration, ...]:
    """The registrations for ``signum``, the one in effect last."""
    return tuple(_stacks.get(signum, ()))


def default_action(signum: int) -> None:
    """Take the signal's default action now (for SIGTERM: end the process, exit code 143)."""
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _install(signum: int) -> None:
    """Give the operating system what is now in effect: ``SIG_IGN`` and ``SIG_DFL`` as such (an
    ignored signal does not even interrupt a system call), a function through :func:`_dispatch`."""
    stack = _stacks.get(signum)
    if stack:
        handler = stack[-1].handler
        signal.signal(signum, _dispatch if callable(handler) else handler)
        return
    before = _before.get(signum)
    signal.signal(signum, signal.SIG_DFL if before is None else before)
    _stacks.pop(signum, None)  # after: a signal delivered meanwhile still finds `before`
    _before.pop(signum, None)


def _dispatch(signum: int, frame: FrameType | None) -> None:
    """The handler the operating system calls: the registration in effect decides, at delivery."""
    stack = _stacks.get(signum)
    if stack and stack[-1].pid != os.getpid():  # a forked child (a data loader's worker)
        default_action(signum)
        return
    handler = stack[-1].handler if stack else _before.get(signum)
    if callable(handler):
        handler(signum, frame)
    elif handler != signal.SIG_IGN:
        default_action(signum)

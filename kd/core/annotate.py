"""Named ranges around the training phases, for whichever profiler listens.

:func:`annotate` always opens a ``torch.profiler.record_function`` range (a few microseconds
when no profiler listens), an NVTX range when CUDA is in use (Nsight Systems shows it), and a
SageMaker Profiler annotation when that profiler's ``smprof`` module imports (it ships only
inside SageMaker's training containers). Which of these apply is decided once, at the first
call, so a training step pays nothing per call for the ones that do not.

Example:
    >>> from kd.core.annotate import annotate
    >>> with annotate("teacher_forward"):
    ...     pass
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import logging
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger("kd")

# SageMaker Profiler's Python module. It was called `smppy` in containers released before
# December 2023; PyPI's `smppy` is an unrelated package, so only `smprof` is looked for.
SMPROF_MODULE = "smprof"


# ------------------------------------------------------------------------------ annotations
class _NvtxRange:
    """An NVTX push/pop pair (torch.cuda.nvtx), shown as a named range by Nsight Systems."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self) -> None:
        torch.cuda.nvtx.range_push(self.name)

    def __exit__(self, *exc: object) -> None:
        torch.cuda.nvtx.range_pop()


class _Ranges:
    """Several range context managers entered as one, innermost last."""

    __slots__ = ("factories", "name", "stack")

    def __init__(self, name: str, factories: tuple[Callable[[str], Any], ...]) -> None:
        self.name, self.factories = name, factories
        self.stack = contextlib.ExitStack()

    def __enter__(self) -> None:
        for factory in self.factories:
            self.stack.enter_context(factory(self.name))

    def __exit__(self, *exc: Any) -> bool:
        return bool(self.stack.__exit__(*exc))


def import_smprof() -> Any | None:
    """SageMaker Profiler's module when it imports and offers ``annotate``, else None.

    The documented API (AWS, "Prepare and run a training job with SageMaker Profiler") is
    ``smprof.annotate(name)`` as a context manager, plus ``smprof.SMProfiler.instance()`` with
    ``configure``/``start_profiling``/``stop_profiling``; a module without ``annotate`` is
    treated as absent.
    """
    try:
        if importlib.util.find_spec(SMPROF_MODULE) is None:
            return None
        module = importlib.import_module(SMPROF_MODULE)
    except Exception as e:  # a broken install inside a container must not stop training
        log.debug("%s does not import (%s); no SageMaker Profiler annotations", SMPROF_MODULE, e)
        return None
    return module if callable(getattr(module, "annotate", None)) else None


@functools.cache
def range_factories() -> tuple[Callable[[str], Any], ...]:
    """The range kinds :func:`annotate` opens, decided once (at its first call).

    The trainer first annotates after the models are on their device, so CUDA is initialised
    by then when it is used at all.
    """
    factories: list[Callable[[str], Any]] = [torch.profiler.record_function]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        factories.append(_NvtxRange)
    smprof = import_smprof()
    if smprof is not None:
        factories.append(smprof.annotate)
    return tuple(factories)


def annotate(name: str) -> contextlib.AbstractContextManager:
    """A named range for profilers: torch.profiler always, NVTX on CUDA, SageMaker when present.

    Args:
        name: the range's name, e.g. ``teacher_forward``.

    Example:
        >>> with annotate("data"):
        ...     batch = [1, 2, 3]
    """
    factories = range_factories()
    if len(factories) == 1:  # CPU outside SageMaker: just record_function, no wrapper
        return factories[0](name)
    return _Ranges(name, factories)

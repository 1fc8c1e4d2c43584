"""Loading ``benchmarks/gpu_check.py`` (a script, not a package) for the tests that call it."""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

from tests.conftest import ROOT

SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def load_gpu_check() -> ModuleType:
    """The script as the module ``gpu_check`` (loaded once per session)."""
    if "gpu_check" in sys.modules:
        return sys.modules["gpu_check"]
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module

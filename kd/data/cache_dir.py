"""Where kd keeps what it measures once per machine (loader choices, shard sample counts)."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "KD_CACHE_DIR"


def default_cache_dir() -> Path:
    """``$KD_CACHE_DIR``, else ``$XDG_CACHE_HOME/kd``, else ``~/.cache/kd``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "kd"

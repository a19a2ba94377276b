"""Where trtcompress keeps converted models and other reusable files."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$TRTCOMPRESS_CACHE`, else `$XDG_CACHE_HOME/trtcompress`, else `~/.cache/trtcompress`."""
    if env := os.environ.get("TRTCOMPRESS_CACHE"):
        return Path(env).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "trtcompress"

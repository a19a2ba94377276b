"""Where trtcompress keeps converted models and other reusable files."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$TRTCOMPRESS_CACHE`, else `$XDG_CACHE_HOME/trtcompress`, else `~/.cache/trtcompress`; absolute.

    An empty or relative `XDG_CACHE_HOME` is ignored, as the XDG spec says (it would put a copy of every
    converted model in whatever directory a command runs from)."""
    if env := os.environ.get("TRTCOMPRESS_CACHE"):
        return Path(env).expanduser().absolute()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return base / "trtcompress"

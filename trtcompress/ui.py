"""Terminal output: logs and progress on stderr (stdout stays clean for tables and --json)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text


def expand_user(ctx: Any, param: Any, value: Any) -> Any:
    """Click callback of path arguments: a leading `~` is the home directory, as the shell reads it. The
    shell leaves `--output=~/x` alone: the artifact went to ./~/x while the CLI printed "artifact: ~/x"."""
    if isinstance(value, Path | str) and str(value).startswith("~"):
        return type(value)(os.path.expanduser(value))
    return value


def finite_or_named(value: Any) -> Any:
    """`value` with every non-finite float as the string "NaN" / "Infinity" / "-Infinity"."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {k: finite_or_named(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_or_named(v) for v in value]
    return value


def json_text(data: Any, indent: int | None = 2) -> str:
    """Strict JSON for stdout (`--json`): a non-finite number (a broken model's ppl is inf) becomes the
    string "Infinity" / "-Infinity" / "NaN" (Python's bare Infinity / NaN are not JSON: jq and most
    parsers refuse the whole document), not null, which reads as "not measured"."""
    return json.dumps(finite_or_named(data), indent=indent, default=str, allow_nan=False)


class UI:
    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.err = Console(stderr=True, quiet=quiet)
        # Tables keep their columns when piped (rich would otherwise assume 80 columns).
        self.out = Console(width=None if sys.stdout.isatty() else 160)

    def log(self, message: str) -> None:
        # Text, not markup: a message holds paths and names ("[/v2]" would raise MarkupError, "[v2]" vanish)
        self.err.print(Text(message, style="dim"), highlight=False)

    @contextlib.contextmanager
    def progress(self) -> Iterator[Progress | None]:
        if self.quiet:
            yield None
            return
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.err,
            transient=True,
        ) as progress:
            yield progress

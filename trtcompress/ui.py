"""Terminal output: logs and progress on stderr (stdout stays clean for tables and --json)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class UI:
    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.err = Console(stderr=True, quiet=quiet)
        # Tables keep their columns when piped (rich would otherwise assume 80 columns).
        self.out = Console(width=None if sys.stdout.isatty() else 160)

    def log(self, message: str) -> None:
        self.err.print(f"[dim]{message}[/dim]", highlight=False)

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

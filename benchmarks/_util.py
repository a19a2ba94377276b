"""Helpers shared by the benchmark scripts: timed subprocesses with their own peak RSS."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass


@dataclass
class Timed:
    seconds: float
    peak_rss_mb: float  # MiB: ru_maxrss is in KiB on Linux, / 1024
    returncode: int
    stdout: str


def exit_if_help(doc: str | None) -> None:
    """`-h` / `--help` for a script that reads `sys.argv` itself: print its docstring and exit, before it
    runs anything or writes its default results file."""
    if {"-h", "--help"} & set(sys.argv[1:]):
        print(doc)
        raise SystemExit(0)


def run_timed(args: list[str]) -> Timed:
    """Run `python -m trtcompress ARGS`; wall time and the child's own peak RSS (wait4)."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "trtcompress", *args], stdout=subprocess.PIPE, text=True)
    stdout = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return Timed(time.perf_counter() - start, usage.ru_maxrss / 1024, proc.returncode, stdout)


def machine() -> str:
    import platform

    import torch

    threads = torch.get_num_threads()
    return f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {threads} threads"

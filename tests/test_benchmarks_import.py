"""Every benchmarks/*.py script still imports, and every trtcompress name it imports still exists.

The benchmark scripts are run by hand (BENCHMARKS.md), so nothing else notices when a refactor of
trtcompress renames or moves a name one of them uses. Each script is imported under its own module
name (never as __main__, so its main does not run), in one subprocess: scripts set TRITON_INTERPRET
and extend sys.path at import time, which must not leak into this test session. The trtcompress
imports inside their functions (most scripts import lazily, after parsing their arguments) are
resolved from the source, without calling the functions. No model is loaded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
SCRIPTS = sorted(p.name for p in BENCHMARKS.glob("*.py"))

CHECK = r"""
import ast, importlib, importlib.util, json, sys, traceback
from pathlib import Path

bench, root = Path(sys.argv[1]), Path(sys.argv[2])
sys.path[:0] = [str(bench), str(root)]


def trtcompress_imports(tree):
    # (module, name or None, line) for every trtcompress import, at any depth (lazy ones included)
    for node in ast.walk(tree):
        top = (node.module or "").split(".")[0] if isinstance(node, ast.ImportFrom) else None
        if top == "trtcompress" and node.level == 0:
            for alias in node.names:
                yield node.module, alias.name, node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "trtcompress":
                    yield alias.name, None, node.lineno


def check(path):
    name = "benchmarks_" + path.stem
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up here
    try:
        spec.loader.exec_module(module)
    except BaseException:
        return "import failed:\n" + traceback.format_exc(limit=-3)
    for mod_name, attr, line in trtcompress_imports(ast.parse(path.read_text(), str(path))):
        where = f"{path.name}:{line}"
        try:
            mod = importlib.import_module(mod_name)
        except BaseException as exc:
            return f"{where}: import {mod_name}: {type(exc).__name__}: {exc}"
        if attr is None or hasattr(mod, attr):
            continue
        try:
            importlib.import_module(f"{mod_name}.{attr}")
        except ImportError:
            return f"{where}: {mod_name} has no {attr!r}"
    return None


print(json.dumps({p.name: check(p) for p in sorted(bench.glob("*.py"))}))
"""


@pytest.fixture(scope="module")
def results() -> dict[str, str | None]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-c", CHECK, str(BENCHMARKS), str(ROOT)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_found_scripts() -> None:
    assert len(SCRIPTS) > 10 and "gpu_session.sh" not in SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_imports(results: dict[str, str | None], script: str) -> None:
    assert script in results
    assert results[script] is None, results[script]

"""Source-wide rules a test can hold: text files are read and written as UTF-8 whatever the locale."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "trtcompress"


def _text_io_without_encoding(tree: ast.AST) -> list[tuple[int, str]]:
    """`read_text()`, `write_text()` and text-mode `open()` calls that leave the encoding to the locale
    (an ASCII one under tritonserver's python stub, or a C-locale container)."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or any(k.arg == "encoding" for k in node.keywords):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if name in ("read_text", "write_text") and isinstance(func, ast.Attribute):
            found.append((node.lineno, name))
        elif name == "open":
            # builtin open(file, mode) or Path.open(mode)
            mode_args = node.args[1:2] if isinstance(func, ast.Name) else node.args[:1]
            mode = [a.value for a in mode_args if isinstance(a, ast.Constant)]
            mode += [
                k.value.value for k in node.keywords if k.arg == "mode" and isinstance(k.value, ast.Constant)
            ]
            if not any("b" in str(m) for m in mode):
                found.append((node.lineno, name))
    return found


def test_text_files_are_read_and_written_as_utf8():
    offenders = [
        f"{path.relative_to(PACKAGE.parent)}:{line}: {name}() without encoding="
        for path in sorted(PACKAGE.rglob("*.py"))
        for line, name in _text_io_without_encoding(ast.parse(path.read_text(encoding="utf-8")))
    ]
    assert not offenders, "\n".join(offenders)


def test_the_check_finds_what_it_looks_for():
    code = 'p.read_text()\nopen(f)\nopen(f, "rb")\np.open("a")\np.write_text(s, encoding="utf-8")\n'
    assert [name for _, name in _text_io_without_encoding(ast.parse(code))] == ["read_text", "open", "open"]

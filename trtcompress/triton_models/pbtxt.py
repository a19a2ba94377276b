"""Render `config.pbtxt` templates strictly and validate them with Triton's own schema.

Upstream's `fill_template.py` leaves an unfilled `${name}` in place without a word; here a template is
rendered with `string.Template` semantics, any value left unfilled (or a placeholder the values do not
name) is an error, and the result is parsed back into `tritonclient`'s `model_config_pb2.ModelConfig`
with `google.protobuf.text_format`, so a misspelled field or a wrong type fails at generation time,
not when tritonserver loads the repository.
"""

from __future__ import annotations

import re
import string
from pathlib import Path
from typing import Any

from trtcompress.errors import TrtcompressError


class RepositoryError(TrtcompressError):
    """A model repository that cannot be generated (or did not validate)."""


# the `${name}` form, the one templates (ours, upstream's fill_template.py) use, always as a whole value
# (`"${engine_dir}"`, `max_batch_size: ${n}`): a bare `$NAME`, or a `${name}` inside a longer text, is
# the values' own (paths such as /data/$USER/model or "/runs/${date} 2/out" are legal directory names)
_PLACEHOLDER = re.compile(r"\$\{[^}]*\}")
_STRING = re.compile(r""""(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*'""")  # a quoted string (pbtxt, Python)


def _whole(value: str) -> list[str]:
    """The placeholders of a value made of placeholders only (and blanks)."""
    found = _PLACEHOLDER.findall(value)
    return found if found and not _PLACEHOLDER.sub("", value).strip() else []


def _placeholders(text: str, yaml_file: bool = False) -> list[str]:
    """Unfilled `${name}`s: what makes up a whole quoted string or YAML value, or any outside quoted
    strings."""
    if yaml_file:
        try:
            import yaml

            data = yaml.safe_load(text)
        except Exception:  # not YAML after all: read it as text
            pass
        else:

            def scalars(node: Any) -> list[Any]:
                if isinstance(node, dict):
                    return [x for k, v in node.items() for x in (*scalars(k), *scalars(v))]
                if isinstance(node, list):
                    return [x for v in node for x in scalars(v)]
                return [node]

            return [p for v in scalars(data) if isinstance(v, str) for p in _whole(v)]
    found: list[str] = []

    def literal(match: re.Match) -> str:
        found.extend(_whole(match.group(0)[1:-1]))
        return '""'

    found += _PLACEHOLDER.findall(_STRING.sub(literal, text))
    return found


def render(template: str, values: dict[str, Any]) -> str:
    """Fill `${name}` placeholders; unknown or missing names and leftovers are errors."""
    names = {m.group("named") or m.group("braced") for m in string.Template.pattern.finditer(template)}
    names.discard(None)
    missing = sorted(names - set(values))
    if missing:
        raise RepositoryError(f"template placeholders without a value: {', '.join(missing)}")
    text = string.Template(template).substitute({k: str(v) for k, v in values.items()})
    check_no_placeholders(text)
    return text


def check_no_placeholders(text: str, where: str = "config") -> None:
    leftover = _placeholders(text, yaml_file=where.endswith((".yaml", ".yml")))
    if leftover:
        raise RepositoryError(f"{where}: unfilled template placeholders {sorted(set(leftover))}")


def parse_config(text: str, where: str = "config.pbtxt") -> Any:
    """Parse with Triton's ModelConfig schema (raises RepositoryError naming the problem)."""
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError as exc:  # pragma: no cover - tritonclient is a declared dependency of serving
        raise RepositoryError(
            f"validating {where} needs tritonclient: pip install 'trtcompress[serve]' ({exc})"
        ) from None
    check_no_placeholders(text, where)
    config = model_config_pb2.ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as exc:
        raise RepositoryError(f"{where} is not a valid Triton model config: {exc}") from None
    return config


def write_config(model_dir: Path, text: str) -> Any:
    """Validate, then write `model_dir/config.pbtxt`; returns the parsed ModelConfig."""
    config = parse_config(text, str(model_dir / "config.pbtxt"))
    if config.name and config.name != model_dir.name:
        raise RepositoryError(f"{model_dir}: config name {config.name!r} differs from the directory name")
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.pbtxt").write_text(text, encoding="utf-8")
    return config


def validate_repository(repo: Path) -> dict[str, Any]:
    """Parse every `config.pbtxt` under `repo` (one level of models); returns {model name: ModelConfig}."""
    configs = {}
    for path in sorted(Path(repo).glob("*/config.pbtxt")):
        configs[path.parent.name] = parse_config(path.read_text(encoding="utf-8"), str(path))
    if not configs:
        raise RepositoryError(f"{repo}: no model (no */config.pbtxt)")
    for path in Path(repo).rglob("*"):
        if path.suffix in {".pbtxt", ".yaml", ".py"} and path.is_file():
            check_no_placeholders(path.read_text(encoding="utf-8"), str(path))
    return configs


def parameters(values: dict[str, Any]) -> str:
    """A `parameters` block (Triton parameters are strings)."""
    out = []
    for key, value in values.items():
        if isinstance(value, bool):
            value = "true" if value else "false"
        text = str(value).replace("\\", "\\\\").replace('"', '\\"')
        out.append(f'parameters {{\n  key: "{key}"\n  value: {{ string_value: "{text}" }}\n}}')
    return "\n".join(out)

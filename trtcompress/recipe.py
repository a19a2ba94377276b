"""Recipe: the single source of truth for a build.

A recipe is YAML validated by pydantic with `extra="forbid"` everywhere, so a typo is an error that
names the field path and the allowed keys. Built-in presets live in `trtcompress/presets/*.yaml`.
Every `trtcompress build` flag maps onto a recipe path (see `CLI_FLAG_PATHS`); `--set PATH=VALUE`
reaches any field. The resolved recipe is written into every artifact.
"""

from __future__ import annotations

import copy
import difflib
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from trtcompress.builders.gates import Gate
from trtcompress.errors import RecipeError
from trtcompress.eval.config import EvalConfig
from trtcompress.kv.config import KVCacheConfig
from trtcompress.passes import PASS_REGISTRY, PassConfig
from trtcompress.runtime.config import DeployConfig

PRESET_DIR = Path(__file__).parent / "presets"


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CalibrationConfig(StrictModel):
    dataset: Literal["boolq"] = Field("boolq", description="BoolQ passages after the perplexity window")
    num_samples: int = Field(128, ge=1, description="calibration sequences")
    seq_len: int = Field(512, ge=8, description="tokens per calibration sequence")


class EngineConfig(StrictModel):
    """`trtllm-build` settings for `--engine` (TensorRT-LLM 1.2.1; see builders/engine.py)."""

    enabled: bool = Field(False, description="build a TensorRT-LLM engine from the trtllm checkpoint")
    max_batch_size: int = Field(8, ge=1, description="trtllm-build --max_batch_size")
    max_input_len: int = Field(1024, ge=1, description="trtllm-build --max_input_len")
    max_seq_len: int = Field(2048, ge=2, description="trtllm-build --max_seq_len")
    max_num_tokens: int = Field(4096, ge=1, description="trtllm-build --max_num_tokens")
    kv_cache_type: Literal["paged", "continuous", "disabled"] = Field("paged", description="--kv_cache_type")
    gemm_plugin: str = Field("auto", description="--gemm_plugin (auto, float16, bfloat16, disable, ...)")
    gpt_attention_plugin: str = Field("auto", description="--gpt_attention_plugin")
    use_paged_context_fmha: bool = Field(True, description="--use_paged_context_fmha")
    workers: int = Field(1, ge=1, description="--workers (parallel rank builds)")


EXPORT_FORMAT = Literal["native", "trtllm", "hf"]


class ExportConfig(StrictModel):
    formats: list[EXPORT_FORMAT] = Field(
        default_factory=lambda: ["native"],
        description="artifact formats: native (always written), trtllm (OUT/trtllm), hf (OUT/hf)",
    )
    shard_size_mb: int = Field(2048, ge=1, description="maximum safetensors shard size")
    tp_size: int = Field(1, ge=1, description="tensor-parallel ranks of the trtllm checkpoint")
    pp_size: int = Field(1, ge=1, description="pipeline-parallel stages of the trtllm checkpoint")
    dtype: Literal["auto", "float16", "bfloat16"] = Field(
        "auto",
        description="dtype of trtllm/hf dense tensors; auto: bfloat16 for a bfloat16 source checkpoint, else "
        "float16 (TensorRT-LLM's converters follow the source too)",
    )
    engine: EngineConfig = Field(default_factory=EngineConfig)

    @field_validator("formats", mode="before")
    @classmethod
    def _native_first(cls, value: Any) -> Any:
        # The native artifact is the build's record (manifest, checksums): always written, listed once.
        if isinstance(value, str):
            value = [value]
        # Only a valid list is reordered: an error must name the entry's index in the list as written.
        if isinstance(value, list) and all(v in typing.get_args(EXPORT_FORMAT) for v in value):
            return ["native", *dict.fromkeys(v for v in value if v != "native")]
        return value

    @model_validator(mode="before")
    @classmethod
    def _engine_needs_checkpoint(cls, data: Any) -> Any:
        # The engine is built from the trtllm checkpoint, so asking for an engine asks for the checkpoint.
        engine = data.get("engine") if isinstance(data, dict) else None
        if isinstance(engine, dict) and engine.get("enabled") is True:
            formats = data.get("formats", ["native"])
            formats = [formats] if isinstance(formats, str) else list(formats)
            if "trtllm" not in formats:
                data = {**data, "formats": [*formats, "trtllm"]}
        return data


def _pass_config_type() -> Any:
    configs = tuple(cls.config_type for cls in PASS_REGISTRY.values())
    if len(configs) == 1:
        return configs[0]
    return Annotated[Union[configs], Field(discriminator="method")]  # noqa: UP007 (dynamic union)


PassConfigUnion = _pass_config_type()


class Recipe(StrictModel):
    name: str = Field("custom", description="recipe name, recorded in the artifact")
    description: str = Field("", description="free text")
    model: str | None = Field(None, description="default model when the command line names none")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype of uncompressed tensors"
    )
    passes: list[PassConfigUnion] = Field(
        default_factory=list, description="compression passes, applied in order"
    )  # type: ignore[valid-type]
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    gates: list[Gate] = Field(default_factory=list, description="e.g. 'ppl_ratio <= 1.05'")
    export: ExportConfig = Field(default_factory=ExportConfig)
    deploy: DeployConfig = Field(
        default_factory=DeployConfig, description="serving: in-flight batching and Triton repositories"
    )
    kv_cache: KVCacheConfig = Field(default_factory=KVCacheConfig, description="KV-cache codec (issue 5)")

    @field_validator("passes", mode="before")
    @classmethod
    def _known_methods(cls, value: Any) -> Any:
        if not isinstance(value, list):
            return value
        for i, item in enumerate(value):
            if isinstance(item, dict):
                method = item.get("method")
                if method is None:
                    raise ValueError(
                        f"passes[{i}] has no 'method'; known methods: {', '.join(sorted(PASS_REGISTRY))}"
                    )
                if not isinstance(method, str) or method not in PASS_REGISTRY:  # (a list is unhashable)
                    hint = (
                        difflib.get_close_matches(method, list(PASS_REGISTRY), 1)
                        if isinstance(method, str)
                        else []
                    )
                    did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
                    raise ValueError(
                        f"passes[{i}].method {method!r} is not a known pass{did_you_mean}; "
                        f"known: {', '.join(sorted(PASS_REGISTRY))}"
                    )
        return value

    @property
    def needs_calibration(self) -> bool:
        return any(PASS_REGISTRY[p.method].needs for p in self.passes)

    def to_yaml(self) -> str:
        # allow_unicode: a description's "·" stays itself, not "\xB7" in a double-quoted, folded string.
        # _RecipeDumper: text that recipe YAML reads as a number (`name: 1e3`) is quoted, so it reads back.
        return yaml.dump(
            self.model_dump(mode="json"),
            Dumper=_RecipeDumper,
            sort_keys=False,
            allow_unicode=True,
            width=100,
        )


# ---------------------------------------------------------------------------------------------- loading


class _RecipeLoader(yaml.SafeLoader):
    """YAML for recipes: a key given twice is an error (PyYAML keeps the last one silently), and
    numbers read as in YAML 1.2: exponent floats without a dot (`1e-3`, a string in YAML 1.1) are
    floats, and colon-separated digits are text (YAML 1.1's base-60 made `pattern: 2:4` the int 124)."""

    def construct_yaml_int(self, node: yaml.ScalarNode) -> Any:
        return self.construct_scalar(node) if ":" in node.value else super().construct_yaml_int(node)

    def construct_yaml_float(self, node: yaml.ScalarNode) -> Any:
        return self.construct_scalar(node) if ":" in node.value else super().construct_yaml_float(node)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: flattened (and overridable
                continue  # by the mapping's own keys) in super().construct_mapping, not a key of its own
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, typing.Hashable):  # `? [a, b]`: refused as such by super()
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


# YAML 1.2 exponent floats that YAML 1.1 reads as text: no dot (`1e-3`), or an unsigned exponent (`1.5e3`)
_EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$")
_RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+.0123456789"))


class _RecipeDumper(yaml.SafeDumper):
    """Quotes a string that _RecipeLoader would read as a float (`1e3`), as SafeDumper does `1.5`."""


_RecipeDumper.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+.0123456789"))
_RecipeLoader.add_constructor("tag:yaml.org,2002:int", _RecipeLoader.construct_yaml_int)
_RecipeLoader.add_constructor("tag:yaml.org,2002:float", _RecipeLoader.construct_yaml_float)


def yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_RecipeLoader)  # a SafeLoader subclass: no arbitrary objects


def _yaml_error(exc: yaml.YAMLError) -> str:
    """`problem (line L, column C)`: PyYAML's first line alone ("while scanning ...") says neither."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark else problem


def parse_recipe(data: Any, source: str) -> Recipe:
    if not isinstance(data, dict):
        got = "nothing (an empty file)" if data is None else type(data).__name__
        raise RecipeError(f"{source}: a recipe is a YAML mapping, got {got}")
    if (where := _surrogate_path(data)) is not None:
        raise RecipeError(
            f"{source}: {where}: text that is not valid Unicode (a byte that is not UTF-8 on the command "
            "line, or a \\uD800-\\uDFFF escape): the artifact's files could not hold it"
        )
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        # a boolean that lax mode read as 0 or 1 and then refused (`bits: yes` is 1 bit, below 2) is named
        # as the boolean it is, not as the number pydantic made of it
        booleans = _boolean_errors(data)
        raise RecipeError(f"{source}: {_format_errors(booleans) or format_validation_error(exc)}") from None
    if booleans := _boolean_errors(data):
        raise RecipeError(f"{source}: {_format_errors(booleans)}") from None
    return recipe


def recorded_recipe(data: Any, source: str) -> tuple[Recipe, int]:
    """An artifact's recorded recipe as this version of trtcompress reads it, and where its calibration
    text starts (its build's eval.ppl_tokens). Everything that acts on an artifact (eval, inspect, repo,
    the runtime) reads it through here, so that a recipe this version no longer accepts (an older build's,
    or an edited manifest) is one named error, not a traceback or a repository that fails in the server.

    An artifact built before eval.ppl_tokens had to be whole windows of eval.context (1,500 in windows of
    1,024) scored its whole windows only: its recipe is read with those (what its build measured), not
    refused, which left the artifact impossible to evaluate at all."""
    section = data.get("eval") if isinstance(data, dict) else None
    section = section if isinstance(section, dict) else {}
    ppl, context = section.get("ppl_tokens"), section.get("context")
    start = None
    if type(ppl) is int and type(context) is int and 0 < context <= ppl and ppl % context:
        data = {**data, "eval": {**section, "ppl_tokens": ppl // context * context}}
        start = ppl  # (its calibration text still starts after all of them)
    try:
        recipe = parse_recipe(data, source)
    except RecipeError as exc:
        raise RecipeError(
            f"{exc} (the recipe recorded at build time, which this version of trtcompress does not accept; "
            "rebuild the artifact)"
        ) from None
    return recipe, recipe.eval.ppl_tokens if start is None else start


def _surrogate_path(data: Any, path: str = "", seen: set[int] | None = None) -> str | None:
    """The recipe path of the first text (value or key) holding a lone surrogate, which UTF-8 cannot encode:
    `--name $'\\xff'` arrives as '\\udcff' and made `eval` crash writing its plot, after the build."""
    if isinstance(data, str):
        try:
            data.encode("utf-8")
        except UnicodeEncodeError:
            return path or "recipe"
        return None
    seen = set() if seen is None else seen
    if id(data) in seen:  # a YAML alias of itself (`&a [*a]`): pydantic names what is wrong with it
        return None
    seen.add(id(data))
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for key, value in items:
        where = f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}" if path else str(key)
        if (found := _surrogate_path(key, path or "recipe")) is not None:
            return found
        if (found := _surrogate_path(value, where, seen)) is not None:
            return found
    return None


def _boolean_errors(data: Any) -> list:
    """pydantic's lax mode reads a boolean as a number (`num_samples: yes` is 1 sample, `damp: true` 1.0):
    the strict mode names those; its other complaints (a quoted "128") are coercions lax mode allows."""
    try:
        Recipe.model_validate(data, strict=True)
    except ValidationError as exc:
        return [
            {
                **e,
                "msg": f"expected a number, not the boolean {e['input']!r} (YAML reads unquoted "
                "yes/no/true/false/on/off as booleans)",
            }
            for e in exc.errors()
            if isinstance(e.get("input"), bool) and e["type"] in ("int_type", "float_type")
        ]
    return []


def list_presets() -> dict[str, Recipe]:
    return {path.stem: load_recipe_file(path) for path in sorted(PRESET_DIR.glob("*.yaml"))}


def load_recipe_file(path: Path) -> Recipe:
    try:  # (pathlib raises, rather than answers False, for a name too long for the file system)
        is_dir, is_file = path.is_dir(), path.is_file()
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read the recipe ({exc.strerror})") from None
    if is_dir:
        raise RecipeError(f"{path}: a directory, not a recipe file (a recipe is one YAML file)")
    if not is_file:
        raise RecipeError(f"{path}: no such recipe file")
    try:
        data = yaml_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read the recipe ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: invalid YAML ({_yaml_error(exc)})") from None
    return parse_recipe(data, str(path))


def load_recipe(spec: str) -> Recipe:
    """A preset name (see `trtcompress recipes`) or a path to a YAML file."""
    preset = PRESET_DIR / f"{spec}.yaml"
    if _is_file_or_error(preset):
        return load_recipe_file(preset)
    path = Path(spec).expanduser()
    if path.suffix in (".yaml", ".yml") or _is_file_or_error(path, exists=True):
        return load_recipe_file(path)  # (which names an error _is_file_or_error met)
    names = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
    hint = difflib.get_close_matches(spec, names, 1)
    did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
    raise RecipeError(
        f"{spec!r} is neither a preset{did_you_mean} nor a recipe file; presets: {', '.join(names)}"
    )


def _is_file_or_error(path: Path, exists: bool = False) -> bool:
    """`path.is_file()` (`path.exists()`), True when asking raises (a name too long for the file system)."""
    try:
        return path.exists() if exists else path.is_file()
    except OSError:
        return exists


# -------------------------------------------------------------------------------------------- overrides

# Each `build` flag and the recipe path it sets. `passes.*.x` sets x on every pass that has the field.
CLI_FLAG_PATHS: dict[str, str] = {
    "bits": "passes.*.bits",
    "group_size": "passes.*.group_size",
    "symmetric": "passes.*.symmetric",
    "exclude": "passes.*.exclude",
    "calib_samples": "calibration.num_samples",
    "calib_seq_len": "calibration.seq_len",
    "eval": "eval.enabled",
    "reference": "eval.reference",
    "ppl_tokens": "eval.ppl_tokens",
    "gsm8k_problems": "eval.gsm8k_problems",
    "gsm8k_generate": "eval.gsm8k_generate",
    "gate": "gates",
    "kv": "kv_cache.codec",
    "export": "export.formats",
    "tp_size": "export.tp_size",
    "pp_size": "export.pp_size",
    "engine": "export.engine.enabled",
    "dtype": "dtype",
    "name": "name",
}


YAML_NULLS = ("", "~", "null", "Null", "NULL")


def parse_assignment(text: str) -> tuple[str, Any]:
    """`path=value` with a YAML value (`eval.gsm8k_problems=16`, `passes.0.exclude=[lm_head]`)."""
    path, sep, raw = text.partition("=")
    if not sep or not path.strip():
        raise RecipeError(f"--set {text!r}: expected PATH=VALUE, e.g. passes.0.group_size=64")
    path = path.strip()
    raw_text = raw.strip()
    quoted = len(raw_text) >= 2 and raw_text[0] == raw_text[-1] and raw_text[0] in "'\""
    text_field = _text_field(path.split("."))
    # (YAML's null forms, the empty value included, still clear an optional one: `--set kv_cache.codec=`)
    if text_field and not quoted and not (text_field == "optional" and raw_text in YAML_NULLS):
        # free text as typed: YAML would make `name=no` a bool, `model=1.0` a float, cut at ` #`
        return path, raw_text
    try:
        value = yaml_load(raw)
    except yaml.YAMLError:
        value = raw
    return path, value


def _text_field(keys: list[str]) -> Literal["required", "optional"] | None:
    """Whether a recipe path ends at a field declared `str` (name, description, ...: "required") or
    `str | None` (model, kv_cache.codec, ...: "optional", where an unquoted `null` still means None)."""
    model: type[BaseModel] | None = Recipe
    for i, key in enumerate(keys):
        field = model.model_fields.get(key) if model is not None else None
        if field is None:
            return None
        if i == len(keys) - 1:
            if field.annotation is str:
                return "required"
            return "optional" if set(typing.get_args(field.annotation)) == {str, type(None)} else None
        model = _model_of(field.annotation)
    return None


def with_overrides(recipe: Recipe, overrides: list[tuple[str, Any]]) -> Recipe:
    """Apply `(path, value)` overrides in order and re-validate the whole recipe."""
    if not overrides:
        return recipe
    data = recipe.model_dump(mode="json")
    for path, value in overrides:
        _assign(data, path.split("."), value, path)
    return parse_recipe(data, "recipe overrides")


def _assign(node: Any, keys: list[str], value: Any, full: str) -> None:
    key, rest = keys[0], keys[1:]
    if isinstance(node, list):
        if key == "*":
            if not rest:
                raise RecipeError(f"{full}: '*' selects entries by a field: {full}.FIELD=VALUE")
            hits = [item for item in node if isinstance(item, dict) and _accepts(item, rest[0])]
            if not hits:
                raise RecipeError(f"{full}: no entry of this recipe has a field {rest[0]!r}")
            for item in hits:
                _assign(item, rest, copy.deepcopy(value), full)
            return
        try:
            index = int(key)
            node[index]
        except (ValueError, IndexError):
            raise RecipeError(
                f"{full}: {key!r} is not a valid index (the list has {len(node)} entries)"
            ) from None
        if rest:
            _assign(node[index], rest, value, full)
        else:
            node[index] = value
        return
    if not isinstance(node, dict):
        raise RecipeError(f"{full}: cannot set {key!r} inside a {type(node).__name__}")
    if rest:
        if key not in node:
            raise RecipeError(f"{full}: the recipe has no section {key!r}")
        _assign(node[key], rest, value, full)
    else:
        node[key] = value


def _accepts(item: dict, field: str) -> bool:
    cls = PASS_REGISTRY.get(item.get("method", ""))
    return field in (cls.config_type.model_fields if cls else item)


# ------------------------------------------------------------------------------------------ error text


def _model_of(annotation: Any) -> type[BaseModel] | None:
    while True:
        origin = typing.get_origin(annotation)
        if origin is Annotated or origin in (list, tuple):
            annotation = typing.get_args(annotation)[0]
        elif origin in (Union, getattr(__import__("types"), "UnionType", Union)):
            models = [
                a for a in typing.get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)
            ]
            return models[0] if len(models) == 1 else None
        else:
            break
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def format_validation_error(exc: ValidationError) -> str:
    return _format_errors(exc.errors())


def _format_errors(errors: list) -> str:
    messages = []
    for err in errors:
        loc = list(err["loc"])
        # a key that is not a string (YAML `1:`, `yes:`, `~:`) ends the location: name its mapping instead
        invalid_key = err["type"] == "invalid_key"
        if invalid_key:
            loc = loc[:-1]
        model: type[BaseModel] | None = Recipe
        parts: list[str] = []
        for i, item in enumerate(loc):
            if isinstance(item, int):
                parts[-1] += f"[{item}]"
                continue
            if model is None and item in PASS_REGISTRY:  # discriminated-union tag: not a user-visible key
                model = PASS_REGISTRY[item].config_type
                continue
            parts.append(str(item))
            if i < len(loc) - 1 or invalid_key:
                model = (
                    _model_of(model.model_fields[item].annotation)
                    if model and item in model.model_fields
                    else None
                )
        path = ".".join(parts) or "recipe"
        if invalid_key:
            allowed = f"; allowed keys: {', '.join(sorted(model.model_fields))}" if model else ""
            messages.append(
                f"{path}: key {err['input']!r} is not text (YAML reads an unquoted number, null or "
                f"yes/no/true/false/on/off as a value, not a name){allowed}"
            )
        elif err["type"] == "extra_forbidden":
            parent = model if model is not None and loc[-1] not in model.model_fields else None
            allowed = sorted(parent.model_fields) if parent else []
            hint = difflib.get_close_matches(str(loc[-1]), allowed, 1)
            did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
            messages.append(f"{path}: unknown key{did_you_mean}; allowed keys: {', '.join(allowed)}")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            messages.append(msg if msg.startswith(path) else f"{path}: {msg}")
    return "; ".join(messages)


__all__ = [
    "CalibrationConfig",
    "ExportConfig",
    "KVCacheConfig",
    "PassConfig",
    "Recipe",
    "load_recipe",
    "with_overrides",
]

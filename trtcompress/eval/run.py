"""`trtcompress eval`: evaluate an artifact against its source model, or a model (compressed in memory)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from trtcompress.checkpoints import native
from trtcompress.errors import ModelError, RecipeError, TrtcompressError
from trtcompress.eval.config import EvalConfig
from trtcompress.eval.harness import EvalReport, check_protocol, check_reference, evaluate
from trtcompress.eval.report import plot_report
from trtcompress.models import PACKAGED_MODELS, load_model
from trtcompress.models.gguf_convert import COMPLETE_MARKER
from trtcompress.recipe import Recipe, load_recipe, recorded_recipe, with_overrides
from trtcompress.ui import UI

if TYPE_CHECKING:
    from rich.progress import Progress
    from torch import nn


def _is_artifact(target: str) -> bool:
    path = Path(target)
    if target.lower() in PACKAGED_MODELS and not path.exists():
        return False
    return (path / native.MANIFEST).exists() or (path.is_dir() and not (path / "config.json").exists())


def _check_output_dir(directory: Path) -> None:
    """Checked before the evaluation without creating anything: a command refused later (a bad --set,
    an artifact given --recipe) must leave no directory behind. `_write_outputs` creates it."""
    if (reason := native.unwritable_reason(directory)) is not None:
        raise TrtcompressError(f"--output-dir {directory}: cannot create the directory ({reason})")


# What `eval ARTIFACT` may override: how it is measured, not how it was built (passes, calibration, dtype,
# export are the artifact's own; gates and deploy are not used by eval).
_ARTIFACT_EVAL_SECTIONS = ("eval", "kv_cache", "name", "description")


def _check_artifact_overrides(target: str, overrides: list[tuple[str, Any]]) -> None:
    for path, _ in overrides:
        section = path.split(".")[0]
        if section not in _ARTIFACT_EVAL_SECTIONS:
            raise RecipeError(
                f"{target} is an artifact: eval cannot change {path} (it evaluates the artifact as built; "
                f"rebuild it with `trtcompress build ... --set {path}=...`); eval takes eval.*, kv_cache.*, "
                "name and description"
            )


def _write_outputs(report: EvalReport, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    native.write_json_atomic(directory / "eval.json", report.model_dump(mode="json"))
    plot_report(report, directory / "eval.png")


def _built_recipe(artifact: native.LoadedArtifact, target: str) -> tuple[Recipe, int]:
    """The artifact's recipe, and where its calibration text starts (`recipe.recorded_recipe`)."""
    return recorded_recipe(artifact.manifest["recipe"], f"{target}/manifest.json")


def _check_window_before_calibration(built: Recipe, config: EvalConfig, start: int) -> None:
    """An artifact's calibrated passes saw the BoolQ tokens right after its build's perplexity window
    (models.calibration, from `start`: its build's eval.ppl_tokens): a wider window at eval time would
    score the model on its own calibration text and report an optimistic perplexity."""
    scored = config.ppl_tokens // config.context * config.context
    if built.needs_calibration and scored > start:
        raise RecipeError(
            f"eval.ppl_tokens {config.ppl_tokens} would score tokens {start}-{scored - 1}, "
            f"which this artifact was calibrated on (calibration starts after its build's "
            f"eval.ppl_tokens {start}); use at most {start}"
        )


def evaluate_target(
    target: str,
    *,
    recipe_spec: str | None = None,
    reference_spec: str | None = None,
    overrides: list[tuple[str, Any]] | None = None,
    output_dir: Path | None = None,
    ui: UI | None = None,
) -> EvalReport:
    ui = ui or UI(quiet=True)
    overrides = overrides or []
    if output_dir is not None:  # checked before the evaluation, not after it
        _check_output_dir(output_dir)
    if _is_artifact(target):
        if recipe_spec:
            raise RecipeError(
                f"{target} is an artifact (already compressed); --recipe applies to models only"
            )
        _check_artifact_overrides(target, overrides)
        artifact = native.load_artifact(Path(target))
        if artifact.status == "failed_gates":
            ui.log(f"note: {target} failed its gates at build time")
        built, calibration_start = _built_recipe(artifact, target)
        recipe = with_overrides(built, overrides)
        _check_window_before_calibration(built, recipe.eval, calibration_start)
        reference = spec = None
        if recipe.eval.reference:
            spec = reference_spec or _reference_of(artifact.manifest["source"])
            try:
                reference = _load_reference(spec, artifact.model, artifact.tokenizer, ui)
            except ModelError as exc:
                raise ModelError(
                    f"{exc} (reference model of {target}; pass --reference-model PATH or --no-reference)"
                ) from None
        with ui.progress() as progress:
            report = evaluate_recipe(
                artifact.model,
                artifact.tokenizer,
                recipe,
                reference,
                str(target),
                progress,
                reference_name=spec,
            )
        _write_outputs(report, output_dir or Path(target))
        return report

    recipe = with_overrides(load_recipe(recipe_spec or "baseline"), overrides)  # bad input before the model
    loaded = load_model(target, log=ui.log)
    if recipe.passes:
        from trtcompress.builders.compress import compress_model

        check_protocol(recipe.eval, loaded.model, loaded.tokenizer)  # before minutes of compression
        recipe.kv_cache.check_model(loaded.model, recipe.eval.context)
        reference = (
            _load_reference(reference_spec or target, loaded.model, loaded.tokenizer, ui)
            if recipe.eval.reference
            else None
        )
        with ui.progress() as progress:
            compress_model(loaded.model, loaded.tokenizer, recipe, progress=progress, log=ui.log)
            report = evaluate_recipe(
                loaded.model, loaded.tokenizer, recipe, reference, target, progress,
                reference_name=reference_spec or target,
            )  # fmt: skip
    else:
        # No passes: the model is its own reference, unless --reference-model names another one to
        # compare with (its figures must then be measured, not copied from the model's own).
        reference = None
        if reference_spec and recipe.eval.reference:
            reference = _load_reference(reference_spec, loaded.model, loaded.tokenizer, ui)
        with ui.progress() as progress:
            # its own reference unless --no-reference (which leaves the reference figures unmeasured)
            is_reference = reference_spec is None and recipe.eval.reference
            report = evaluate_recipe(
                loaded.model, loaded.tokenizer, recipe, reference, target, progress, is_reference,
                reference_name=reference_spec,
            )  # fmt: skip
    if output_dir:
        _write_outputs(report, output_dir)
    return report


def _load_reference(spec: str, model, tokenizer, ui: UI):
    """The reference model, refused unless it reads the evaluated model's token ids."""
    reference = load_model(spec, log=ui.log)
    check_reference(model, tokenizer, reference.model, reference.tokenizer, spec)
    return reference.model


def evaluate_recipe(
    model: nn.Module,
    tokenizer: Any,
    recipe: Recipe,
    reference: nn.Module | None,
    model_name: str,
    progress: Progress | None,
    is_reference: bool = False,
    reference_name: str | None = None,
) -> EvalReport:
    """`evaluate` with a recipe's evaluation protocol, name and KV-cache codec (build and eval alike).
    The report's protocol records what the reference figures were measured on, `reference_model`
    (`reference_name`, "itself" or None; `reference` stays the setting): `eval --reference-model` and an
    artifact's source are not always the model a reader assumes."""
    report = evaluate(
        model,
        tokenizer,
        recipe.eval,
        reference,
        model_name=model_name,
        recipe_name=recipe.name,
        is_reference=is_reference,
        progress=progress,
        kv=recipe.kv_cache,
    )
    measured = reference is not None and not is_reference
    report.protocol["reference_model"] = reference_name if measured else "itself" if is_reference else None
    return report


def _reference_of(source: dict[str, Any]) -> str:
    """The model an artifact was built from: its known name, else the directory as the build resolved it
    (`source.model` is the argument as typed: a relative `./llama` named another directory, or none,
    when `eval` ran from elsewhere)."""
    model = str(source.get("model", ""))
    if not source.get("path"):
        return model
    path = Path(source["path"])
    # A known name that the build resolved to a local directory of that name (which wins over the
    # packaged model) is that directory: from elsewhere the name would load the packaged model.
    built_from_directory = (path / "config.json").is_file() and not (path / COMPLETE_MARKER).is_file()
    if model.lower() in PACKAGED_MODELS and not built_from_directory:
        return model  # the packaged model (its converted copy may live elsewhere on this machine)
    return str(path)

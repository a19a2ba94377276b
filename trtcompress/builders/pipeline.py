"""`trtcompress build`: load -> compress -> evaluate -> gates -> write the artifact, atomically."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from trtcompress.builders.compress import compress_model
from trtcompress.builders.gates import GateResult, check_gates, check_measurable
from trtcompress.checkpoints import native
from trtcompress.errors import ArtifactError, RecipeError
from trtcompress.eval.harness import EvalReport, check_protocol
from trtcompress.eval.report import plot_report
from trtcompress.eval.run import evaluate_recipe
from trtcompress.models import DEFAULT_MODEL, load_model, resolve_model
from trtcompress.recipe import Recipe
from trtcompress.ui import UI


@dataclass
class BuildResult:
    path: Path
    manifest: dict
    report: EvalReport | None
    gates: list[GateResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def gates_passed(self) -> bool:
        return all(g.passed for g in self.gates)


def build(
    model_spec: str | None, recipe: Recipe, out: Path, *, force: bool = False, ui: UI | None = None
) -> BuildResult:
    ui = ui or UI(quiet=True)
    start = time.perf_counter()
    spec = model_spec or recipe.model or DEFAULT_MODEL
    if recipe.gates and not recipe.eval.enabled:
        raise RecipeError(
            f"the recipe declares gates ({', '.join(str(g) for g in recipe.gates)}) but eval.enabled is "
            "false (--no-eval): gates need an evaluation; drop them with --set gates=[] or evaluate"
        )
    if recipe.eval.enabled:
        check_measurable(recipe.gates, recipe.eval, kv_codec=recipe.kv_cache.codec is not None)
    out = Path(out)
    native.check_output(out, force)  # fail before spending minutes on compression
    native.check_output_location(out)  # a read-only or impossible OUT, too
    if force and recipe.eval.enabled and _keeps_previous(out):  # (a broken model fails with no gates too)
        native.check_output(failed_gates_path(out), force)  # where a failing build would go instead
    if recipe.export.engine.enabled:  # refuse before any work or any file when TensorRT-LLM is missing
        from trtcompress.builders.engine import require_trtllm

        require_trtllm()
    if set(recipe.export.formats) != {"native"} or recipe.export.engine.enabled:
        from trtcompress.builders.exports import check_recipe

        check_recipe(recipe)  # export requests the passes cannot satisfy, before minutes of compression

    resolve_model(spec, log=ui.log)  # a bad model argument fails here, before anything is printed
    ui.log(f"loading {spec}")
    loaded = load_model(spec, log=ui.log)
    if {"trtllm", "hf"} & set(recipe.export.formats):  # architecture, tp/pp geometry, group widths
        from trtcompress.builders.exports import check_model, resolve_export_dtype

        recipe = resolve_export_dtype(recipe, loaded.path)  # (the manifest records the dtype written)
        check_model(recipe, loaded.model)
    if recipe.eval.enabled:  # an evaluation that cannot run fails now, not after the compression
        check_protocol(recipe.eval, loaded.model, loaded.tokenizer)
    # a KV codec this model's head dim cannot store (or, to evaluate, attention it cannot follow), too
    recipe.kv_cache.check_model(loaded.model, recipe.eval.context if recipe.eval.enabled else None)
    with ui.progress() as progress:
        compress_model(loaded.model, loaded.tokenizer, recipe, progress=progress, log=ui.log)
    compress_seconds = time.perf_counter() - start

    # the checkpoints before the evaluation: a layout the writers refuse costs no evaluation
    staged = _stage_checkpoints(loaded, recipe, out, ui)
    try:
        report, gates = None, []
        if recipe.eval.enabled:  # before writing: where the artifact goes depends on its gates
            reference = load_model(spec, log=ui.log).model if recipe.eval.reference else None
            with ui.progress() as progress:
                report = evaluate_recipe(
                    loaded.model, loaded.tokenizer, recipe, reference, spec, progress, reference_name=spec
                )
            del reference
            gates = check_gates(recipe.gates, report)
        final = out
        if force and not all(g.passed for g in gates) and _keeps_previous(out):
            final = failed_gates_path(out)
            ui.log(f"gate(s) failed: {out} keeps its previous artifact; this build is written to {final}")

        # `force` for the sibling too: it replaces an earlier failed build there (artifacts only, as always).
        with native.atomic_directory(final, force=force) as tmp:
            content = native.write_weights(
                loaded.model, loaded.tokenizer, tmp, shard_size_bytes=recipe.export.shard_size_mb << 20
            )
            content["exports"] = write_exports(
                loaded, recipe, tmp, content, log=ui.log, final=final, staged=staged
            )
            manifest = native.new_manifest(
                recipe=recipe.model_dump(mode="json"),
                source={"model": spec, "path": str(loaded.path), "model_type": loaded.config.model_type},
                model_config=loaded.model.config.to_dict(),
                generation_config=loaded.model.generation_config.to_diff_dict(),
                content=content,
            )
            if report is not None:
                manifest["eval"] = report.model_dump(mode="json")
                manifest["gates"] = [g.model_dump() for g in gates]
                manifest["status"] = "ok" if all(g.passed for g in gates) else "failed_gates"
                native.write_json_atomic(tmp / "eval.json", manifest["eval"])
                plot_report(report, tmp / "eval.png")
            manifest["timings"] = {"compress_s": compress_seconds, "total_s": time.perf_counter() - start}
            native.write_manifest(tmp, manifest)
        return BuildResult(final, manifest, report, gates, time.perf_counter() - start)
    finally:
        if staged is not None:  # (moved into the artifact, or left by a failure)
            shutil.rmtree(staged.dir, ignore_errors=True)


def failed_gates_path(out: Path) -> Path:
    """Where `build --force` writes a build whose gates fail when OUT holds an artifact to keep."""
    out = Path(out).resolve()
    return out.with_name(f"{out.name}.failed-gates")


def _keeps_previous(out: Path) -> bool:
    """Whether `out` holds an artifact that a build whose gates fail must not replace: any artifact but
    one marked failed_gates itself. `--force` used to swap a good artifact for one that `serve` and
    `repo` refuse, deleting the last good build; an unreadable manifest counts as one to keep."""
    if not (Path(out) / native.MANIFEST).is_file():
        return False
    try:
        return native.read_manifest(Path(out))["status"] != "failed_gates"
    except ArtifactError:  # corrupt or tampered: not known to be a failed build, so kept
        return True


@dataclass
class StagedCheckpoints:
    dir: Path  # holds trtllm/ and hf/ until they move into the artifact
    exports: dict  # their manifest `exports` entries


def _stage_checkpoints(loaded, recipe: Recipe, out: Path, ui: UI) -> StagedCheckpoints | None:
    """Write the trtllm / hf checkpoints into a hidden sibling of `out` (same file system: they move into
    the artifact by rename). A writer's refusal leaves nothing behind."""
    if not {"trtllm", "hf"} & set(recipe.export.formats):
        return None
    from trtcompress.builders.exports import write_checkpoints

    parent = Path(out).resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{Path(out).name}.exports-", dir=parent))
    except OSError as exc:
        raise ArtifactError(f"{parent}: cannot write the output there ({exc.strerror})") from None
    try:
        return StagedCheckpoints(
            staging, write_checkpoints(loaded.model, loaded.tokenizer, recipe, staging, ui.log)
        )
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        formats = " / ".join(sorted({"trtllm", "hf"} & set(recipe.export.formats)))
        if (failure := native.storage_failure(exc, out, f"the {formats} checkpoint")) is not None:
            raise failure from None  # a full disk: one line, as the artifact's
        raise


def write_exports(
    loaded,
    recipe: Recipe,
    out: Path,
    content: dict,
    log=lambda m: None,
    final: Path | None = None,
    staged: StagedCheckpoints | None = None,
) -> dict:
    """The recipe's extra formats (OUT/trtllm, OUT/hf, OUT/engine + OUT/triton/trtllm), inside the build's
    atomic directory `out` (`final`: where it is renamed to); `staged`: checkpoints written before the
    evaluation, moved in. Their files join the manifest's checksummed file list (paths relative to the
    artifact)."""
    from trtcompress.builders.exports import export_formats

    checkpoints = None
    if staged is not None:
        for sub in ("trtllm", "hf"):
            if (staged.dir / sub).exists():
                os.replace(staged.dir / sub, out / sub)
        checkpoints = staged.exports
    exports = export_formats(
        loaded.model, loaded.tokenizer, recipe, out, log=log, final=final, checkpoints=checkpoints
    )
    for sub in ("trtllm", "hf", "engine", "triton/trtllm"):
        root = out / sub
        for file in sorted(root.rglob("*")) if root.is_dir() else []:
            if file.is_file():
                rel = file.relative_to(out).as_posix()
                content["files"][rel] = {"sha256": native.sha256_file(file), "bytes": file.stat().st_size}
    return exports

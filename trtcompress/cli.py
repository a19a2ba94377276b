"""`trtcompress` command line: thin wrappers that parse, call, print."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any

import click

from trtcompress.errors import GateFailure, TrtcompressError
from trtcompress.ui import UI, expand_user, json_text


def _recipe_overrides(flags: dict[str, Any], assignments: tuple[str, ...]) -> list[tuple[str, Any]]:
    """Turn `build`/`eval` flags into recipe-path overrides (flags first, then --set in order)."""
    from trtcompress.recipe import CLI_FLAG_PATHS, parse_assignment

    overrides: list[tuple[str, Any]] = []
    for flag, path in CLI_FLAG_PATHS.items():
        value = flags.get(flag)
        if value is None or value == ():
            continue
        overrides.append((path, list(value) if isinstance(value, tuple) else value))
    overrides += [parse_assignment(a) for a in assignments]
    return overrides


def _resolved_recipe(recipe_spec: str, flags: dict[str, Any], assignments: tuple[str, ...]):
    from trtcompress.recipe import load_recipe, with_overrides

    recipe = load_recipe(recipe_spec)
    gates = flags.get("gate") or ()
    recipe = with_overrides(recipe, _recipe_overrides({**flags, "gate": None}, assignments))
    if gates:  # --gate appends to the gates as resolved (recipe, then --set gates=...), last
        recipe = with_overrides(recipe, [("gates", [*(str(g) for g in recipe.gates), *gates])])
    return recipe


def _check_flags_apply(recipe, flags: dict[str, Any]) -> None:
    """A flag the resolved recipe has no use for is refused, as `--bits` is on a recipe without bits:
    silently building without it would let the user believe it took effect."""
    from trtcompress.builders.exports import calibrates_kv_scales
    from trtcompress.errors import RecipeError

    # (static int8 / fp8 KV-cache scales for a trtllm / hf export are calibrated on them too)
    uses_calibration = recipe.needs_calibration or calibrates_kv_scales(recipe)
    for flag, option in (("calib_samples", "--calib-samples"), ("calib_seq_len", "--calib-seq-len")):
        if flags.get(flag) is not None and not uses_calibration:
            passes = ", ".join(p.method for p in recipe.passes) or "none"
            raise RecipeError(
                f"{option}: recipe {recipe.name!r} has no calibrated pass (its passes: {passes}), "
                "so calibration settings would have no effect"
            )
    for flag, option in (("tp_size", "--tp-size"), ("pp_size", "--pp-size")):
        if flags.get(flag) is not None and "trtllm" not in recipe.export.formats:
            raise RecipeError(
                f"{option} sets up the trtllm export, which this build does not write: add --export trtllm"
            )


def _print_json(data: Any) -> None:
    click.echo(json_text(data))


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="trtcompress")
def cli() -> None:
    """Compress LLMs, measure what it cost, and package them for TensorRT-LLM and Triton."""


# ------------------------------------------------------------------------------------------------ build

eval_options = [
    click.option("--ppl-tokens", type=int, help="perplexity window tokens [eval.ppl_tokens]"),
    click.option("--gsm8k-problems", type=int, help="GSM8K problems for KL/top-1/bpb [eval.gsm8k_problems]"),
    click.option("--gsm8k-generate", type=int, help="problems for greedy exact match [eval.gsm8k_generate]"),
    click.option(
        "--reference/--no-reference",
        default=None,
        help="compare with the uncompressed model [eval.reference]",
    ),
    click.option(
        "--kv",
        metavar="CODEC",
        help="decode with a compressed KV cache: fp16, int8, fp8, kivi-2bit/3bit/4bit, gear-2bit/4bit "
        "[kv_cache.codec]",
    ),
]


def _add(options):
    def decorator(fn):
        for option in reversed(options):
            fn = option(fn)
        return fn

    return decorator


@cli.command()
@click.argument("model", required=False, callback=expand_user)
@click.option(
    "--recipe",
    "-r",
    "recipe_spec",
    default="int4-g128-rtn",
    show_default=True,
    callback=expand_user,
    help="preset name (see `trtcompress recipes`) or a YAML file",
)
@click.option(
    "--output",
    "-o",
    "out",
    type=click.Path(path_type=Path),
    callback=expand_user,
    required=True,
    help="artifact directory",
)
@click.option(
    "--force", is_flag=True, help="replace an existing artifact (only once the new one is complete)"
)
@click.option("--bits", type=int, help="bits per weight [passes.*.bits]")
@click.option(
    "--group-size", type=int, help="input channels per scale, 0 = per channel [passes.*.group_size]"
)
@click.option("--symmetric/--asymmetric", default=None, help="quantization grid [passes.*.symmetric]")
@click.option("--exclude", multiple=True, help="module patterns left uncompressed [passes.*.exclude]")
@click.option("--calib-samples", type=int, help="calibration sequences [calibration.num_samples]")
@click.option("--calib-seq-len", type=int, help="tokens per calibration sequence [calibration.seq_len]")
@click.option("--eval/--no-eval", "eval", default=None, help="evaluate after building [eval.enabled]")
@_add(eval_options)
@click.option("--gate", multiple=True, help="extra gate, e.g. 'ppl_ratio <= 1.05' [gates]")
@click.option(
    "--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), help="dtype of dense tensors [dtype]"
)
@click.option("--name", help="recipe name recorded in the artifact [name]")
@click.option(
    "--export",
    type=click.Choice(["native", "trtllm", "hf"]),
    multiple=True,
    help="also write OUT/trtllm (TensorRT-LLM checkpoint), OUT/hf (ModelOpt HF layout) [export.formats]",
)
@click.option("--tp-size", type=int, help="tensor-parallel ranks of the trtllm export [export.tp_size]")
@click.option("--pp-size", type=int, help="pipeline-parallel stages of the trtllm export [export.pp_size]")
@click.option(
    "--engine/--no-engine",
    default=None,
    help="build a TensorRT-LLM engine into OUT/engine (needs TensorRT-LLM 1.2.1) [export.engine.enabled]",
)
@click.option(
    "--set",
    "assignments",
    multiple=True,
    metavar="PATH=VALUE",
    help="any recipe field, e.g. eval.context=512",
)
@click.option("--quiet", "-q", is_flag=True, help="no progress bars or logs")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object (implies --quiet)")
def build(model, recipe_spec, out, force, assignments, quiet, as_json, **flags) -> None:
    """Compress MODEL (a known name such as smollm2-135m, or a local HF directory) into an artifact."""
    from trtcompress.builders.pipeline import build as run_build
    from trtcompress.eval.report import gates_table, report_table

    ui = UI(quiet=quiet or as_json)
    recipe = _resolved_recipe(recipe_spec, flags, assignments)
    _check_flags_apply(recipe, flags)
    result = run_build(model, recipe, out, force=force, ui=ui)
    if as_json:
        _print_json(
            {
                "artifact": str(result.path),
                "status": result.manifest["status"],
                **(result.report.model_dump(mode="json") if result.report else {}),
                "gates": [g.model_dump() for g in result.gates],
                "build_seconds": result.seconds,
            }
        )
    else:
        if result.report:
            ui.out.print(report_table(result.report))
        if result.gates:
            ui.out.print(gates_table(result.gates))
        ui.out.print(  # markup=False: OUT is the user's path ("out[/v2]" would raise MarkupError)
            f"artifact: {result.path}  status: {result.manifest['status']}  ({result.seconds:.1f} s)",
            markup=False,
        )
    if not result.gates_passed:
        failed = ", ".join(g.gate for g in result.gates if not g.passed)
        raise GateFailure(
            f"gate(s) failed: {failed}; the artifact is kept at {result.path} marked failed_gates"
        )


# ------------------------------------------------------------------------------------------------- eval


@cli.command("eval")
@click.argument("target", callback=expand_user)
@click.option(
    "--recipe",
    "-r",
    "recipe_spec",
    callback=expand_user,
    help="compress TARGET (a model) in memory with this recipe first",
)
@click.option(
    "--reference-model",
    "reference_spec",
    callback=expand_user,
    help="uncompressed model to compare against (default: the artifact's source model)",
)
@_add(eval_options)
@click.option(
    "--set", "assignments", multiple=True, metavar="PATH=VALUE", help="recipe field, e.g. eval.context=512"
)
@click.option(
    "--output-dir",
    type=click.Path(path_type=Path),
    callback=expand_user,
    help="where to write eval.json and eval.png (default: inside the artifact; nowhere for a plain model)",
)
@click.option("--quiet", "-q", is_flag=True, help="no progress bars or logs")
@click.option(
    "--json", "as_json", is_flag=True, help="print one JSON object with stable keys (implies --quiet)"
)
def eval_cmd(target, recipe_spec, reference_spec, assignments, output_dir, quiet, as_json, **flags) -> None:
    """Evaluate an artifact, or a model (optionally compressed in memory with --recipe)."""
    from trtcompress.eval.report import report_table
    from trtcompress.eval.run import evaluate_target

    ui = UI(quiet=quiet or as_json)
    report = evaluate_target(
        target,
        recipe_spec=recipe_spec,
        reference_spec=reference_spec,
        overrides=_recipe_overrides(flags, assignments),
        output_dir=output_dir,
        ui=ui,
    )
    if as_json:
        _print_json(report.model_dump(mode="json"))
    else:
        ui.out.print(report_table(report))


# ---------------------------------------------------------------------------------------------- inspect


@cli.command()
@click.argument("artifact", type=click.Path(path_type=Path), callback=expand_user)
@click.option(
    "--no-verify", is_flag=True, help="skip the sha256 check of the files (presence and sizes still checked)"
)
@click.option("--json", "as_json", is_flag=True, help="print the manifest")
def inspect(artifact, no_verify, as_json) -> None:
    """Per-layer table of an artifact (verifies checksums first)."""
    from trtcompress.checkpoints.inspect import inspect_artifact

    inspect_artifact(artifact, verify=not no_verify, as_json=as_json, ui=UI())


# ---------------------------------------------------------------------------------------------- recipes


def _pass_fields(config) -> str:
    skip = ("method", "targets", "exclude")
    return ", ".join(f"{k}={v}" for k, v in config.model_dump().items() if k not in skip)


@cli.command()
@click.argument("name", required=False)
def recipes(name) -> None:
    """List built-in recipe presets, or print one as YAML (a starting point for your own)."""
    from rich.table import Table

    from trtcompress.recipe import list_presets, load_recipe

    if name:
        click.echo(load_recipe(name).to_yaml(), nl=False)
        return
    table = Table(title="recipe presets (use with --recipe NAME; `trtcompress recipes NAME` prints the YAML)")
    table.add_column("name")
    table.add_column("passes")
    table.add_column("description")
    for preset, recipe in list_presets().items():
        passes = ", ".join(f"{p.method}({_pass_fields(p)})" for p in recipe.passes) or "-"
        table.add_row(preset, passes, recipe.description)
    UI().out.print(table)


# ------------------------------------------------------------------------------------------------ bench


@cli.group()
def bench() -> None:
    """Measured trade-offs (results also recorded in BENCHMARKS.md)."""


def _sweep_sizes(groups: str, bits: int, with_int8: bool, symmetric: bool, problems: int, output_dir: Path):
    """`bench groupsize` input, checked before the model loads: one error line, not a traceback."""
    from pydantic import ValidationError

    from trtcompress.errors import RecipeError
    from trtcompress.eval.config import EvalConfig
    from trtcompress.eval.groupsize import sweep_configs
    from trtcompress.eval.run import _check_output_dir

    try:
        sizes = [int(g) for g in groups.split(",") if g.strip()]
    except ValueError:
        raise RecipeError(
            f"--groups {groups!r}: expected group sizes separated by commas, e.g. 16,64,0"
        ) from None
    if not sizes and not with_int8:
        raise RecipeError(f"--groups {groups!r} with --no-int8: nothing to measure")
    try:
        sweep_configs(bits, sizes, with_int8, symmetric)
        EvalConfig(gsm8k_problems=problems, gsm_symbolic_problems=0)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else ""
        flag = {"bits": "--bits", "gsm8k_problems": "--gsm8k-problems"}.get(field, "--groups")
        value = f" {err['input']}" if flag != "--groups" else ""
        raise RecipeError(f"{flag}{value}: {err['msg'].removeprefix('Value error, ')}") from None
    _check_output_dir(output_dir)
    return sizes


@bench.command("groupsize")
@click.argument("model", required=False, default="smollm2-135m", callback=expand_user)
@click.option("--bits", type=int, default=4, show_default=True)
@click.option("--groups", default="16,32,64,128,0", show_default=True, help="group sizes; 0 = per channel")
@click.option("--int8/--no-int8", "with_int8", default=True, show_default=True, help="add INT8 per-channel")
@click.option("--asymmetric", is_flag=True, help="asymmetric grids instead of symmetric")
@click.option("--gsm8k-problems", type=int, default=64, show_default=True)
@click.option(
    "--output-dir",
    "-o",
    type=click.Path(path_type=Path),
    callback=expand_user,
    default=Path("out/bench-groupsize"),
    show_default=True,
    help="writes groupsize.json and groupsize.png",
)
@click.option("--json", "as_json", is_flag=True)
def bench_groupsize(model, bits, groups, with_int8, asymmetric, gsm8k_problems, output_dir, as_json) -> None:
    """Sweep group sizes: accuracy (ppl, KL) against bits/param, against the uncompressed model."""
    from trtcompress.eval.groupsize import groupsize_table, run_groupsize_sweep

    ui = UI(quiet=as_json)
    sizes = _sweep_sizes(groups, bits, with_int8, not asymmetric, gsm8k_problems, output_dir)
    rows = run_groupsize_sweep(model, bits, sizes, with_int8, not asymmetric, gsm8k_problems, output_dir, ui)
    if as_json:
        _print_json(rows)
    else:
        ui.out.print(groupsize_table(rows))
        ui.out.print(f"wrote {output_dir / 'groupsize.json'} and {output_dir / 'groupsize.png'}")


# ------------------------------------------------------------------------------------- serve (issue 6)

from trtcompress.cli_serve import register as _register_serving  # noqa: E402

_register_serving(cli, bench)


def exit_on_terminate() -> None:
    """SIGTERM / SIGHUP raise SystemExit (status 128 + signal, as the default action reports) instead of
    ending the process at once, so `finally` blocks run: a `build` stopped by `kill` or a closed terminal
    left its hidden `.OUT.partial-*` directory (a whole model's weights) behind for good. `serve` installs
    its own handlers (it stops tritonserver first). A signal the parent set to be ignored stays ignored:
    `nohup trtcompress build ...` must outlive its terminal."""

    def terminate(signum, frame) -> None:
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) is signal.SIG_DFL:
            signal.signal(sig, terminate)


def main() -> None:
    exit_on_terminate()
    try:
        cli(prog_name="trtcompress")
    except TrtcompressError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()

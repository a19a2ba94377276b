"""`trtcompress bench groupsize`: the group-size trade-off, measured (accuracy vs bytes)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from rich.table import Table

from trtcompress.builders.compress import compress_model
from trtcompress.eval.config import EvalConfig
from trtcompress.eval.harness import evaluate
from trtcompress.eval.report import plot_tradeoff
from trtcompress.models import load_model
from trtcompress.passes.gsq import GSQConfig
from trtcompress.recipe import Recipe
from trtcompress.ui import UI, json_text


def sweep_configs(bits: int, group_sizes: list[int], with_int8: bool, symmetric: bool) -> list[GSQConfig]:
    configs = [GSQConfig(bits=bits, group_size=g, symmetric=symmetric) for g in group_sizes]
    if with_int8:
        configs.append(GSQConfig(bits=8, group_size=0, symmetric=True))
    return configs


def run_groupsize_sweep(
    model_spec: str,
    bits: int,
    group_sizes: list[int],
    with_int8: bool,
    symmetric: bool,
    gsm8k_problems: int,
    output_dir: Path,
    ui: UI,
) -> list[dict[str, Any]]:
    eval_config = EvalConfig(gsm8k_problems=gsm8k_problems, gsm_symbolic_problems=0)
    reference = load_model(model_spec, log=ui.log)
    rows: list[dict[str, Any]] = []
    with ui.progress() as progress:
        for config in sweep_configs(bits, group_sizes, with_int8, symmetric):
            label = config.format.name
            ui.log(f"{label}: quantizing and evaluating")
            model = copy.deepcopy(reference.model)
            recipe = Recipe(name=label, passes=[config], eval=eval_config)
            compress_model(model, reference.tokenizer, recipe, progress=progress)
            report = evaluate(
                model,
                reference.tokenizer,
                eval_config,
                reference.model,
                model_name=model_spec,
                recipe_name=label,
                progress=progress,
            )
            rows.append(
                {
                    "label": label,
                    "bits": config.bits,
                    "group_size": config.group_size,
                    "symmetric": config.symmetric,
                    "bits_per_param": report.bits_per_param,
                    "weight_bytes": report.weight_bytes,
                    "ppl": report.ppl,
                    "ppl_ref": report.ppl_ref,
                    "ppl_ratio": report.ppl_ratio,
                    "gsm8k_kl": report.gsm8k_kl,
                    "gsm8k_top1": report.gsm8k_top1,
                    "gsm8k_bpb": report.gsm8k_bpb,
                }
            )
            del model
    write_rows(rows, output_dir)
    plot_tradeoff(rows, output_dir / "groupsize.png", f"{model_spec}: group size vs accuracy")
    return rows


def groupsize_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="group-size sweep (same protocol, same reference)", title_justify="left")
    for column in ("format", "bits/param", "weight MB", "ppl", "ppl ratio", "GSM8K KL", "top-1", "bpb"):
        table.add_column(column, justify="left" if column == "format" else "right")
    for r in rows:
        table.add_row(
            r["label"],
            f"{r['bits_per_param']:.3f}",
            f"{r['weight_bytes'] / 1e6:.1f}",
            _fmt(r["ppl"], ".2f"),
            _fmt(r["ppl_ratio"], ".3f"),
            _fmt(r["gsm8k_kl"], ".4f"),
            _fmt(r["gsm8k_top1"], ".3f"),
            _fmt(r["gsm8k_bpb"], ".4f"),
        )
    return table


def _fmt(value: float | None, spec: str) -> str:
    """A dash for a metric the sweep did not measure (`--gsm8k-problems 0`: no KL, top-1, bpb)."""
    return "-" if value is None else format(value, spec)


def write_rows(rows: list[dict[str, Any]], output_dir: Path) -> Path:
    """`groupsize.json`, strict JSON (a point broken past float range has ppl "Infinity", not a bare
    Infinity, which jq and most parsers refuse)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / "groupsize.json"
    path.write_text(json_text(rows) + "\n", encoding="utf-8")
    return path

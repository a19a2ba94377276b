"""Human-facing output of an evaluation: rich tables and PNG plots."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.table import Table
from rich.text import Text

from trtcompress.eval.harness import EvalReport
from trtcompress.eval.metrics import exp_nll

# (label, key, reference key, format)
ROWS: tuple[tuple[str, str, str | None, str], ...] = (
    ("perplexity (BoolQ window)", "ppl", "ppl_ref", "{:.3f}"),
    ("GSM8K KL(ref || model)", "gsm8k_kl", None, "{:.4f}"),
    ("GSM8K top-1 agreement", "gsm8k_top1", None, "{:.3f}"),
    ("GSM8K gold-answer bits/byte", "gsm8k_bpb", "gsm8k_bpb_ref", "{:.4f}"),
    ("gsm_symbolic KL", "gsm_symbolic_kl", None, "{:.4f}"),
    ("gsm_symbolic top-1", "gsm_symbolic_top1", None, "{:.3f}"),
    ("gsm_symbolic bits/byte", "gsm_symbolic_bpb", "gsm_symbolic_bpb_ref", "{:.4f}"),
    ("GSM8K greedy exact match", "gsm8k_exact_match", "gsm8k_exact_match_ref", "{:.3f}"),
    ("weight MB", "weight_bytes", "weight_bytes_ref", "mb"),
    ("bits/param (decoder linears)", "bits_per_param", "bits_per_param_ref", "{:.3f}"),
    ("KV bytes/token", "kv_bytes_per_token", "kv_bytes_per_token_ref", "{:.1f}"),
)


def _fmt(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    if fmt == "mb":
        return f"{value / 1e6:.2f}"
    return fmt.format(value)


def report_title(report: EvalReport) -> str:
    """Model and recipe, and the KV-cache codec the figures were decoded with (an `eval --kv` of the
    uncompressed model read "baseline", as if nothing had been compressed)."""
    kv = report.protocol.get("kv_cache") or {}
    codec = kv.get("codec") if isinstance(kv, dict) else None
    options = ",".join(f"{k}={v}" for k, v in (kv.get("options") or {}).items()) if codec else ""
    return (
        f"{report.model} · {report.recipe}"
        + (f" · KV cache {codec}" if codec else "")
        + (f" ({options})" if options else "")
    )


def report_table(report: EvalReport) -> Table:
    # Text: the model path and recipe name are the user's, not rich markup ("x[/v2]" would raise)
    reference = report.protocol.get("reference_model")
    table = Table(
        title=Text(report_title(report)),
        title_justify="left",
        caption=Text(f"reference: {reference}") if reference else None,
        caption_justify="left",
    )
    table.add_column("metric")
    table.add_column("compressed", justify="right")
    table.add_column("reference", justify="right")
    table.add_column("ratio", justify="right")
    data = report.model_dump()
    for label, key, ref_key, fmt in ROWS:
        value = data.get(key)
        if value is None:
            continue
        ref = data.get(ref_key) if ref_key else None
        ratio = f"{value / ref:.3f}" if ref not in (None, 0) and value is not None else ""
        table.add_row(label, _fmt(value, fmt), _fmt(ref, fmt), ratio)
    return table


def _measured(result: Any) -> str:
    return measured_text(result.value, result.gate, result.passed)


def measured_text(value: float | None, gate: str, passed: bool) -> str:
    """A gate's measured value with 4 significant digits, or as many more as it takes for the shown number
    to get the gate's verdict (ppl_ratio 1.05004 failing `<= 1.05` must not read "1.05")."""
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, int | float):  # (a manifest edited by hand)
        return str(value)
    if float(value).is_integer() and abs(value) < 2**53:  # byte counts: every digit
        return str(int(value))
    from trtcompress.builders.gates import OPS, Gate

    try:
        parsed = Gate.model_validate(gate)
    except ValueError:  # (a manifest's gate that does not parse: shown, not judged)
        return f"{value:.6g}"
    for digits in range(4, 17):
        text = f"{value:#.{digits}g}"  # `#`: keep trailing zeros (a ratio of 0.99998 read "1", as if exact)
        if OPS[parsed.op](float(text), parsed.value) == passed:
            return text
    return repr(value)


def gates_table(gates: Sequence[Any]) -> Table:
    table = Table(title="gates", title_justify="left")
    table.add_column("gate")
    table.add_column("measured", justify="right")
    table.add_column("result")
    for g in gates:
        measured = _measured(g)
        verdict = Text("pass", style="green") if g.passed else Text.assemble(("FAIL", "red"), f" {g.reason}")
        verdict.rstrip()  # (in place) no trailing blank after a FAIL without a reason
        table.add_row(Text(g.gate), measured, verdict)
    return table


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _no_kl_reason(report: EvalReport) -> str:
    """Why the plot has no GSM8K KL: `eval.gsm8k_problems: 0` (its bpb is unmeasured too), else no
    reference. It read "no reference model" for a build that had one (beside its reference ppl bars)."""
    if report.gsm8k_bpb is None:
        return "GSM8K not evaluated (eval.gsm8k_problems: 0)"
    return "no reference model: KL not measured"


def plot_report(report: EvalReport, path: Path) -> None:
    """Per-window perplexity (model vs reference) and the per-problem GSM8K KL distribution."""
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    nll = report.details.get("ppl_window_nll") or []
    nll_ref = report.details.get("ppl_window_nll_ref")
    xs = range(len(nll))
    ax1.bar([x - 0.2 for x in xs], [exp_nll(v) for v in nll], width=0.4, label="compressed")
    if nll_ref:
        ax1.bar([x + 0.2 for x in xs], [exp_nll(v) for v in nll_ref], width=0.4, label="reference")
    ax1.set_xlabel("window")
    ax1.set_ylabel("perplexity")
    ax1.set_title(
        f"BoolQ perplexity ({report.ppl:.2f}" + (f" vs {report.ppl_ref:.2f})" if report.ppl_ref else ")")
    )
    ax1.legend()
    kl = report.details.get("gsm8k_kl_per_problem")
    if kl:
        ax2.bar(range(len(kl)), sorted(kl, reverse=True))
        ax2.set_xlabel("GSM8K problem (sorted)")
        ax2.set_ylabel("mean KL per answer token (nats)")
        ax2.set_title(f"GSM8K KL {report.gsm8k_kl:.4f}, top-1 {report.gsm8k_top1:.3f}")
    else:
        ax2.text(0.5, 0.5, _no_kl_reason(report), ha="center", va="center")
        ax2.set_axis_off()
    fig.suptitle(f"{report_title(report)} · {report.bits_per_param:.2f} bits/param")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def plot_tradeoff(rows: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """Accuracy (ppl, KL) against bits/param for a sweep, one labelled point per configuration."""
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, label in ((ax1, "ppl", "perplexity"), (ax2, "gsm8k_kl", "GSM8K KL (nats/token)")):
        pts = sorted((r["bits_per_param"], r[key], r["label"]) for r in rows if r.get(key) is not None)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-")
        for x, y, text in pts:
            ax.annotate(text, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel("bits/param (decoder linears)")
        ax.set_ylabel(label)
        if key == "ppl" and rows and rows[0].get("ppl_ref"):
            ax.axhline(rows[0]["ppl_ref"], ls="--", c="gray", label="reference")
            ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

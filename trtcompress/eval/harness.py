"""Run the evaluation protocol on a (compressed) model against its reference; one flat report."""

from __future__ import annotations

import time
from typing import Any

from pydantic import BaseModel, ConfigDict
from rich.progress import Progress
from torch import nn

from trtcompress.compressed.accounting import weight_stats
from trtcompress.errors import ModelError
from trtcompress.eval import metrics
from trtcompress.eval.config import EvalConfig
from trtcompress.eval.datasets import TokenStream, gsm8k_problems, gsm_symbolic_problems
from trtcompress.kv.config import KVCacheConfig


class EvalReport(BaseModel):
    """Stable keys: scripts rely on these names (later issues add keys, never rename them)."""

    # A non-finite number inside `details` (a broken window's NLL, a problem's KL) must stay one in
    # `model_dump(mode="json")`, as the top-level metrics do: the default turns it into null there,
    # which reads as "not measured".
    model_config = ConfigDict(ser_json_inf_nan="strings")

    model: str
    recipe: str
    ppl: float
    ppl_ref: float | None = None
    ppl_ratio: float | None = None
    gsm8k_kl: float | None = None
    gsm8k_top1: float | None = None
    gsm8k_bpb: float | None = None
    gsm8k_bpb_ref: float | None = None
    gsm_symbolic_kl: float | None = None
    gsm_symbolic_top1: float | None = None
    gsm_symbolic_bpb: float | None = None
    gsm_symbolic_bpb_ref: float | None = None
    gsm8k_exact_match: float | None = None
    gsm8k_exact_match_ref: float | None = None
    weight_bytes: int
    weight_bytes_ref: int | None = None
    bits_per_param: float
    bits_per_param_ref: float | None = None
    kv_bytes_per_token: float | None = None
    kv_bytes_per_token_ref: float | None = None
    eval_seconds: float
    protocol: dict[str, Any]
    details: dict[str, Any]

    def metrics(self) -> dict[str, float]:
        """Every numeric top-level value, for gates."""
        return {
            k: v
            for k, v in self.model_dump().items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }


GATE_METRICS = tuple(
    name
    for name, f in EvalReport.model_fields.items()
    if f.annotation in (float, int, float | None, int | None)
)


def measured_metrics(config: EvalConfig, *, reference: bool, kv_codec: bool) -> frozenset[str]:
    """The gate metrics an evaluation of a compressed model fills with these settings (the others stay
    None): `reference`, whether it runs against the uncompressed model; `kv_codec`, whether it decodes
    with a KV codec. What `build` checks its gates against before compressing; tests hold `evaluate` to
    it."""
    names = {"ppl", "weight_bytes", "bits_per_param", "eval_seconds"}
    if reference:
        names |= {"ppl_ref", "ppl_ratio", "weight_bytes_ref", "bits_per_param_ref"}
    for prefix, problems in (
        ("gsm8k", config.gsm8k_problems),
        ("gsm_symbolic", config.gsm_symbolic_problems),
    ):
        if problems:
            names.add(f"{prefix}_bpb")
            if reference:
                names |= {f"{prefix}_bpb_ref", f"{prefix}_kl", f"{prefix}_top1"}
    if config.gsm8k_generate:
        names |= {"gsm8k_exact_match", "gsm8k_exact_match_ref"} if reference else {"gsm8k_exact_match"}
    if kv_codec:  # the fp16 figure is computed, not measured on the reference
        names |= {"kv_bytes_per_token", "kv_bytes_per_token_ref"}
    return frozenset(names)


def check_reference(
    model: nn.Module, tokenizer, reference: nn.Module, reference_tokenizer=None, name: str = ""
) -> None:
    """Refuse a reference model that reads other token ids than `model`: both models are fed the same
    ids (the evaluated model's tokenizer), so a reference with another vocabulary would be scored on
    text it never saw as such (a silently meaningless ppl_ref, KL and top-1), or crash on the logits'
    widths."""
    name = f"the reference model {name}".rstrip()
    if reference_tokenizer is not None and not _same_tokenizer(tokenizer, reference_tokenizer):
        raise ModelError(
            f"{name} has another tokenizer than the evaluated model: KL, top-1 and "
            "ppl_ref compare the two on the same token ids, so the reference must share the tokenizer"
        )
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    vocab_ref = getattr(getattr(reference, "config", None), "vocab_size", None)
    if vocab is not None and vocab_ref is not None and vocab != vocab_ref:
        raise ModelError(
            f"{name} has a vocabulary of {vocab_ref} logits, the evaluated model "
            f"{vocab}: KL and top-1 compare the two distributions token by token, so they must match"
        )


def _same_tokenizer(a, b) -> bool:
    probe = "Question: 12 - 4 = ?\nAnswer: Ünïcode, 数字 and  spaces.\n\n"
    return a.get_vocab() == b.get_vocab() and a(probe).input_ids == b(probe).input_ids


def check_protocol(config: EvalConfig, model: nn.Module, tokenizer) -> None:
    """Refuse an evaluation this model and text cannot run, before minutes of compression: a window
    longer than the model's positions, a perplexity window longer than the BoolQ text."""
    metrics.check_context(config.context, model)
    TokenStream(tokenizer).window(config.ppl_tokens)


def evaluate(
    model: nn.Module,
    tokenizer,
    config: EvalConfig,
    reference: nn.Module | None = None,
    *,
    model_name: str,
    recipe_name: str,
    is_reference: bool = False,
    progress: Progress | None = None,
    kv: KVCacheConfig | None = None,
) -> EvalReport:
    """Evaluate `model`. With `reference`, also score the uncompressed model on the same data.

    `is_reference` marks `model` as the uncompressed model itself: reference figures equal its own.
    With a `kv` codec, decode with the compressed KV cache against the reference (or `model` itself
    when it is the reference) decoding with an fp16 cache (trtcompress.kv.report).
    """
    if reference is not None and not is_reference:
        check_reference(model, tokenizer, reference)
    if kv is not None and kv.codec is not None:
        from trtcompress.kv.report import evaluate_with_kv

        ref = model if is_reference else reference
        return evaluate_with_kv(
            model, tokenizer, config, kv, ref, model_name=model_name, recipe_name=recipe_name,
            progress=progress,
        )  # fmt: skip
    start = time.perf_counter()
    stream = TokenStream(tokenizer)
    window = stream.window(config.ppl_tokens)
    gsm8k = gsm8k_problems(config.gsm8k_problems)
    symbolic = gsm_symbolic_problems(config.gsm_symbolic_problems, config.gsm_symbolic_seed)
    n_windows = config.ppl_tokens // config.context
    with_ref = reference is not None and not is_reference
    steps = (n_windows + len(gsm8k) + len(symbolic) + config.gsm8k_generate) * (2 if with_ref else 1)
    steps -= len(gsm8k) + len(symbolic) if with_ref else 0  # fidelity scores both models in one pass
    task = progress.add_task("evaluating", total=steps) if progress else None

    def tick(n: int) -> None:
        if task is not None:
            progress.advance(task, n)  # type: ignore[union-attr]

    ppl = metrics.perplexity(model, window, config.context, tick)
    ppl_ref = metrics.perplexity(reference, window, config.context, tick) if with_ref else None
    ref_for_fidelity = reference if with_ref else None
    fid = (
        metrics.answer_fidelity(model, tokenizer, gsm8k, ref_for_fidelity, config.batch_size, tick)
        if gsm8k
        else None
    )
    sym = (
        metrics.answer_fidelity(model, tokenizer, symbolic, ref_for_fidelity, config.batch_size, tick)
        if symbolic
        else None
    )
    exact = exact_ref = None
    if config.gsm8k_generate:
        problems = gsm8k_problems(config.gsm8k_generate)
        exact = metrics.greedy_exact_match(model, tokenizer, problems, config.max_new_tokens, tick)
        if with_ref:
            exact_ref = metrics.greedy_exact_match(
                reference, tokenizer, problems, config.max_new_tokens, tick
            )

    stats = weight_stats(model)
    stats_ref = weight_stats(reference) if with_ref else (stats if is_reference else None)
    if is_reference:
        ppl_ref, exact_ref = ppl, exact
    report = EvalReport(
        model=model_name,
        recipe=recipe_name,
        ppl=ppl.ppl,
        ppl_ref=ppl_ref.ppl if ppl_ref else None,
        ppl_ratio=ppl.ppl / ppl_ref.ppl if ppl_ref else None,
        gsm8k_kl=0.0 if is_reference and fid else (fid.kl if fid else None),
        gsm8k_top1=1.0 if is_reference and fid else (fid.top1 if fid else None),
        gsm8k_bpb=fid.bpb if fid else None,
        gsm8k_bpb_ref=fid.bpb if is_reference and fid else (fid.bpb_ref if fid else None),
        gsm_symbolic_kl=0.0 if is_reference and sym else (sym.kl if sym else None),
        gsm_symbolic_top1=1.0 if is_reference and sym else (sym.top1 if sym else None),
        gsm_symbolic_bpb=sym.bpb if sym else None,
        gsm_symbolic_bpb_ref=sym.bpb if is_reference and sym else (sym.bpb_ref if sym else None),
        gsm8k_exact_match=exact,
        gsm8k_exact_match_ref=exact_ref,
        weight_bytes=stats.weight_bytes,
        weight_bytes_ref=stats_ref.weight_bytes if stats_ref else None,
        bits_per_param=stats.bits_per_param,
        bits_per_param_ref=stats_ref.bits_per_param if stats_ref else None,
        eval_seconds=time.perf_counter() - start,
        protocol=config.model_dump()
        | {"ppl_windows": n_windows, "gsm8k_answer_tokens": fid.tokens if fid else 0},
        details={
            "ppl_window_nll": ppl.window_nll,
            "ppl_window_nll_ref": ppl_ref.window_nll if ppl_ref else None,
            # the model as its own reference: KL 0 on every problem, as the top-level gsm8k_kl says (the
            # plot read the missing list as "no reference model: KL not measured")
            "gsm8k_kl_per_problem": (fid.per_problem_kl if with_ref else [0.0] * len(gsm8k))
            if fid and (with_ref or is_reference)
            else None,
            "bits_per_param_model": stats.bits_per_param_model,
            "params": stats.params,
        },
    )
    if task is not None:
        progress.remove_task(task)  # type: ignore[union-attr]
    return report

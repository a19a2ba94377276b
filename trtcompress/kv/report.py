"""The EvalReport of a model decoding with a compressed KV cache (the `--kv` path of `evaluate`)."""

from __future__ import annotations

import time

from rich.progress import Progress
from torch import nn

from trtcompress.compressed.accounting import weight_stats
from trtcompress.eval.config import EvalConfig
from trtcompress.eval.datasets import TokenStream, gsm8k_problems, gsm_symbolic_problems
from trtcompress.eval.harness import EvalReport
from trtcompress.eval.metrics import check_context
from trtcompress.kv.config import KVCacheConfig
from trtcompress.kv.evaluate import kv_answer_fidelity, kv_greedy_exact_match, kv_perplexity
from trtcompress.kv.scalar import FP16Codec


def evaluate_with_kv(
    model: nn.Module,
    tokenizer,
    config: EvalConfig,
    kv: KVCacheConfig,
    reference: nn.Module | None,
    *,
    model_name: str,
    recipe_name: str,
    progress: Progress | None = None,
) -> EvalReport:
    """`model` decoding with `kv.codec` against `reference` (the uncompressed model; `model` itself
    when evaluating a plain model) decoding with an fp16 cache, on the same protocol."""
    # as the plain path's perplexity does: past the trained positions the numbers mean nothing
    check_context(config.context, model)
    kv.check_model(model, config.context)  # a one-line error, not a traceback from the first cache built
    start = time.perf_counter()
    codec, bs, sink = kv.build_codec(), kv.block_size, kv.sink_tokens
    window = TokenStream(tokenizer).window(config.ppl_tokens)
    gsm8k = gsm8k_problems(config.gsm8k_problems)
    symbolic = gsm_symbolic_problems(config.gsm_symbolic_problems, config.gsm_symbolic_seed)
    n_windows = config.ppl_tokens // config.context
    runs = 2 if reference is not None else 1  # the reference decodes too, with an fp16 cache
    steps = n_windows * runs + len(gsm8k) + len(symbolic) + config.gsm8k_generate * runs
    task = progress.add_task(f"evaluating with a {kv.codec} KV cache", total=steps) if progress else None

    def tick(n: int) -> None:
        if task is not None:
            progress.advance(task, n)  # type: ignore[union-attr]

    ppl = kv_perplexity(model, window, config.context, codec, bs, tick, sink)
    ppl_ref = (
        kv_perplexity(reference, window, config.context, FP16Codec(), bs, tick, sink) if reference else None
    )
    fid = kv_answer_fidelity(model, tokenizer, gsm8k, codec, reference, bs, tick, sink) if gsm8k else None
    sym = (
        kv_answer_fidelity(model, tokenizer, symbolic, codec, reference, bs, tick, sink) if symbolic else None
    )
    exact = exact_ref = None
    if config.gsm8k_generate:
        problems = gsm8k_problems(config.gsm8k_generate)
        exact = kv_greedy_exact_match(
            model, tokenizer, problems, codec, config.max_new_tokens, bs, tick, sink
        )
        if reference is not None:  # as the plain path: a gate on exact match compares with the reference
            exact_ref = kv_greedy_exact_match(
                reference, tokenizer, problems, FP16Codec(), config.max_new_tokens, bs, tick, sink
            )
    stats = weight_stats(model)
    stats_ref = weight_stats(reference) if reference is not None else None
    if task is not None:
        progress.remove_task(task)  # type: ignore[union-attr]
    return EvalReport(
        model=model_name,
        recipe=recipe_name,
        ppl=ppl.result.ppl,
        ppl_ref=ppl_ref.result.ppl if ppl_ref else None,
        ppl_ratio=ppl.result.ppl / ppl_ref.result.ppl if ppl_ref else None,
        gsm8k_kl=fid.kl if fid else None,
        gsm8k_top1=fid.top1 if fid else None,
        gsm8k_bpb=fid.bpb if fid else None,
        gsm8k_bpb_ref=fid.bpb_ref if fid else None,
        gsm_symbolic_kl=sym.kl if sym else None,
        gsm_symbolic_top1=sym.top1 if sym else None,
        gsm_symbolic_bpb=sym.bpb if sym else None,
        gsm_symbolic_bpb_ref=sym.bpb_ref if sym else None,
        gsm8k_exact_match=exact,
        gsm8k_exact_match_ref=exact_ref,
        weight_bytes=stats.weight_bytes,
        weight_bytes_ref=stats_ref.weight_bytes if stats_ref else None,
        bits_per_param=stats.bits_per_param,
        bits_per_param_ref=stats_ref.bits_per_param if stats_ref else None,
        kv_bytes_per_token=ppl.bytes_per_token,
        kv_bytes_per_token_ref=float(ppl.fp16_bytes_per_token),
        eval_seconds=time.perf_counter() - start,
        protocol=config.model_dump()
        | {
            "ppl_windows": n_windows,
            "gsm8k_answer_tokens": fid.tokens if fid else 0,
            "kv_cache": kv.model_dump(),
            "kv_reference": "the reference model decoding with an fp16 KV cache",
        },
        details={
            "ppl_window_nll": ppl.result.window_nll,
            "ppl_window_nll_ref": ppl_ref.result.window_nll if ppl_ref else None,
            "gsm8k_kl_per_problem": fid.per_problem_kl if fid and reference is not None else None,
            "bits_per_param_model": stats.bits_per_param_model,
            "params": stats.params,
            "kv_codec": codec.describe(),
            "kv_bytes_ratio": ppl.bytes_per_token / ppl.fp16_bytes_per_token,
            "kv_bytes_per_token_mean": ppl.bytes_per_token_mean,
        },
    )

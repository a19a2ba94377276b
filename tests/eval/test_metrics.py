import math

import pytest
import torch

from trtcompress.eval import metrics
from trtcompress.eval.datasets import Problem, TokenStream, gsm8k_problems, gsm_symbolic_problems


def test_gsm8k_problems_follow_the_protocol():
    problems = gsm8k_problems(64)
    assert len(problems) == 64
    first = problems[0]
    assert first.question.startswith("Janet’s ducks lay 16 eggs")
    assert "<<" not in first.answer and first.answer.endswith("#### 18")
    assert first.final == "18"
    assert first.prompt.endswith("\nAnswer:") and first.completion.startswith(" Janet sells")


def test_gsm_symbolic_is_seeded():
    a, b = gsm_symbolic_problems(3, seed=7), gsm_symbolic_problems(3, seed=7)
    assert a == b and len(a) == 3
    assert a[0].answer.rstrip().endswith(f"#### {a[0].final}")


def test_perplexity_matches_a_direct_computation(tiny_model):
    model, tok = tiny_model.model, tiny_model.tokenizer
    ids = TokenStream(tok).window(256)
    result = metrics.perplexity(model, ids, 128)
    with torch.no_grad():
        losses = [
            model(input_ids=torch.tensor([ids[i : i + 128]]), labels=torch.tensor([ids[i : i + 128]])).loss
            for i in (0, 128)
        ]
    assert result.ppl == pytest.approx(math.exp(sum(loss.item() for loss in losses) / 2), rel=1e-5)


def test_fidelity_of_a_model_against_itself(tiny_model):
    problems = gsm8k_problems(3)
    result = metrics.answer_fidelity(tiny_model.model, tiny_model.tokenizer, problems, tiny_model.model, 2)
    assert result.kl == pytest.approx(0.0, abs=1e-6)
    assert result.top1 == 1.0
    assert result.bpb == pytest.approx(result.bpb_ref)
    assert result.tokens == sum(len(tiny_model.tokenizer(p.completion).input_ids) for p in problems)


def test_fidelity_is_independent_of_batching(tiny_model):
    problems = gsm8k_problems(5)
    noisy = __import__("copy").deepcopy(tiny_model.model)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    a = metrics.answer_fidelity(noisy, tiny_model.tokenizer, problems, tiny_model.model, 1)
    b = metrics.answer_fidelity(noisy, tiny_model.tokenizer, problems, tiny_model.model, 4)
    assert a.kl > 0
    assert a.kl == pytest.approx(b.kl, rel=1e-4) and a.bpb == pytest.approx(b.bpb, rel=1e-5)
    assert a.top1 == b.top1


def test_answer_bits_per_byte_match_a_direct_computation(tiny_model):
    """The answer tokens are scored from the positions that predict them: scoring the positions one later
    kept the self-fidelity and batching tests passing (they compare the metric with itself)."""
    model, tok = tiny_model.model, tiny_model.tokenizer
    problems = gsm8k_problems(2)
    result = metrics.answer_fidelity(model, tok, problems, batch_size=2)
    nll = 0.0
    with torch.no_grad():
        for problem in problems:
            prompt, answer = metrics.encode_problem(tok, problem)
            logp = torch.log_softmax(model(input_ids=torch.tensor([prompt + answer])).logits[0].float(), -1)
            nll -= sum(logp[len(prompt) - 1 + j, token].item() for j, token in enumerate(answer))
    nbytes = sum(len(p.completion.encode("utf-8")) for p in problems)
    assert result.bpb == pytest.approx(nll / (math.log(2) * nbytes), rel=1e-4)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("She makes 9 * 2 = $18 every day.\n#### 18", "18"),
        ("So the answer is 1,250.", "1250"),
        ("The total is 3.50 dollars", "3.5"),
        ("no number here", None),
        ("It drops by -4 degrees", "-4"),
        ("#### -3", "-3"),
        ("It takes 2-3 days", "3"),  # a hyphen between digits is no minus sign
        ("She lost money, so the answer is -$5.", "-5"),  # a minus before the dollar sign
        ("#### -$1,200", "-1200"),
        ("It costs $10-$4", "4"),  # ... but not a subtraction's
        ("The answer is .5", "0.5"),  # as the gold "0.5" writes it
        ("#### -0", "0"),
    ],
)
def test_extract_final_number(text, expected):
    assert metrics.extract_final_number(text) == expected


def test_greedy_exact_match_runs_and_scores(tiny_model):
    problem = Problem(
        question="1+1?", answer="2\n#### 2", final="2", fewshot_prompt="Question: 1+1?\nAnswer:"
    )
    score = metrics.greedy_exact_match(tiny_model.model, tiny_model.tokenizer, [problem], max_new_tokens=4)
    assert score in (0.0, 1.0)


def test_answers_get_no_special_tokens_and_windows_stay_in_the_trained_range(tiny_model):
    """A tokenizer that prepends BOS: the prompt keeps it, the answer (which continues the prompt) must
    not, or a BOS mid-sequence is scored as the first answer token. And a perplexity window longer
    than the model's positions is refused rather than measured past the trained range."""
    from tokenizers import processors

    from trtcompress.errors import RecipeError

    tok = tiny_model.tokenizer
    bos = tok.convert_ids_to_tokens(0)
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, 0)]
    )
    problem = Problem(question="2 + 2?", answer="2 + 2 = 4\n#### 4", final="4")
    prompt, answer = metrics.encode_problem(tok, problem)
    assert prompt[0] == 0 and 0 not in answer
    assert answer == tok(problem.completion, add_special_tokens=False).input_ids
    positions = tiny_model.model.config.max_position_embeddings
    with pytest.raises(RecipeError, match="exceeds the model's"):
        metrics.perplexity(tiny_model.model, list(range(2 * positions + 2)), positions + 1)


def test_perplexity_past_float_range_is_inf_not_a_crash(tiny_model, tmp_path):
    """A broken model (huge, finite logits) has a mean NLL past ~709.8 nats, where math.exp overflows:
    its perplexity is inf (which fails a ppl gate) and the report still plots, instead of an
    OverflowError aborting the build before the gates run."""
    from trtcompress.eval.harness import EvalReport
    from trtcompress.eval.report import plot_report

    model, tok = tiny_model.model, tiny_model.tokenizer
    with torch.no_grad():
        model.model.norm.weight.mul_(1e4)
    result = metrics.perplexity(model, TokenStream(tok).window(256), 128)
    assert result.ppl == math.inf and min(result.window_nll) > 710
    report = EvalReport(
        model="m", recipe="r", ppl=result.ppl, ppl_ref=20.0, ppl_ratio=result.ppl / 20.0, weight_bytes=1,
        bits_per_param=4.0, eval_seconds=1.0, protocol={},
        details={"ppl_window_nll": result.window_nll, "ppl_window_nll_ref": [3.0, 3.0]},
    )  # fmt: skip
    plot_report(report, tmp_path / "eval.png")
    assert (tmp_path / "eval.png").stat().st_size > 1000


def _sentencepiece_style_tokenizer():
    """A Llama-2 style tokenizer.json: a normalizer that prepends the "▁" dummy prefix to every text,
    pieces learned within words, BOS added."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from trtcompress.eval.datasets import boolq_passages_text

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.BpeTrainer(vocab_size=800, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator([boolq_passages_text()[:50_000]], trainer)
    tok.pre_tokenizer = None
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_answer_tokens_continue_the_prompt_as_the_whole_text_encodes():
    """A SentencePiece tokenizer encodes the completion " a" alone as ["▁", "▁a"...]: scored that way,
    every answer started with a spurious lone "▁" (a double space the model never sees in the text)."""
    tok = _sentencepiece_style_tokenizer()
    problem = gsm8k_problems(1)[0]
    prompt, answer = metrics.encode_problem(tok, problem)
    assert prompt + answer == tok(problem.prompt + problem.completion).input_ids
    assert tok.convert_ids_to_tokens(answer[0]) != "▁" and prompt[0] == tok.bos_token_id


def test_non_finite_details_stay_non_finite_in_the_json_report(tiny_model_dir):
    """A model whose outputs are NaN: its per-window NLLs and per-problem KLs are NaN, and the JSON
    report must say so ("NaN", like the top-level `ppl`), not null, which reads as "not measured"."""
    import json

    from tests.conftest import TINY_EVAL
    from trtcompress.eval.harness import evaluate
    from trtcompress.models import load_model
    from trtcompress.ui import json_text

    model = load_model(str(tiny_model_dir), log=lambda m: None)
    reference = load_model(str(tiny_model_dir), log=lambda m: None).model
    with torch.no_grad():
        model.model.model.norm.weight.fill_(math.nan)
    config = TINY_EVAL.model_copy(update={"gsm8k_problems": 2, "gsm_symbolic_problems": 0})
    report = evaluate(model.model, model.tokenizer, config, reference, model_name="m", recipe_name="r")
    data = json.loads(json_text(report.model_dump(mode="json")))
    assert data["ppl"] == "NaN" and data["gsm8k_kl"] == "NaN"
    assert data["details"]["ppl_window_nll"] == ["NaN", "NaN"]
    assert data["details"]["gsm8k_kl_per_problem"] == ["NaN", "NaN"]


def test_kl_ignores_tokens_the_reference_rules_out():
    """0 * log 0: a token with reference probability 0 (logit -inf) made the KL NaN, not its finite value."""
    from trtcompress.eval.metrics import FidelityAccumulator

    problem = Problem(question="2 + 2?", answer="2 + 2 = 4\n#### 4", final="4")
    acc = FidelityAccumulator([problem])
    logp_ref = torch.log(torch.tensor([[0.5, 0.5, 0.0]]))
    logp = torch.log(torch.tensor([[0.25, 0.25, 0.5]]))
    acc.add(0, logp, torch.tensor([0]), logp_ref)
    assert acc.result().kl == pytest.approx(math.log(2))

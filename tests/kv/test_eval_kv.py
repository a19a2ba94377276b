"""`--kv` / `kv_cache:`: recipe validation, and generation-time evaluation through the real CLI."""

from __future__ import annotations

import json

import pytest

from tests.conftest import TINY_EVAL, TINY_EVAL_FLAGS, run_cli
from trtcompress.errors import RecipeError
from trtcompress.kv import codec_names
from trtcompress.kv.config import CODEC_NAMES, KVCacheConfig
from trtcompress.recipe import CLI_FLAG_PATHS, load_recipe, parse_recipe, with_overrides


def test_config_names_match_registry() -> None:
    assert sorted(CODEC_NAMES) == sorted(codec_names())


def test_recipe_kv_section() -> None:
    recipe = parse_recipe({"kv_cache": {"codec": "gear-2bit", "options": {"rank": 4}}}, "test")
    assert recipe.kv_cache.codec == "gear-2bit"
    assert recipe.kv_cache.build_codec().rank == {"k": 4, "v": 4}
    assert parse_recipe({}, "test").kv_cache.codec is None
    assert CLI_FLAG_PATHS["kv"] == "kv_cache.codec"
    assert (
        with_overrides(load_recipe("baseline"), [("kv_cache.codec", "kivi-2bit")]).kv_cache.codec
        == "kivi-2bit"
    )
    round_trip = parse_recipe(recipe.model_dump(mode="json"), "yaml")
    assert round_trip == recipe


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"codec": "gear-2bits"}, "did you mean 'gear-2bit'"),
        (
            {"codec": "kivi-2bit", "options": {"rank": 2}},
            r"kv_cache\.options\.rank: unknown option for codec 'kivi-2bit'; allowed options: group, scale",
        ),
        ({"codec": "gear-2bit", "options": {"key_rnk": 2}}, r"did you mean 'key_rank'.*outlier_dtype"),
        ({"codec": "int8", "options": {"bits": 8}}, "unknown option for codec 'int8'; it takes no options"),
        ({"codec": "kivi-2bit", "options": {"bits": 4}}, "the codec's name sets its bits"),
        ({"options": {"rank": 2}}, "needs a kv_cache.codec"),
        ({"codec": "gear-2bit", "block_szie": 64}, "did you mean 'block_size'"),
        ({"codec": "kivi-2bit", "block_size": 96}, "multiple of 64"),
    ],
)
def test_recipe_kv_errors(section: dict, message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        parse_recipe({"kv_cache": section}, "test")


def test_evaluate_with_kv_tiny(tiny_model) -> None:
    from trtcompress.eval.harness import evaluate

    kw = {"model_name": "tiny", "recipe_name": "baseline", "is_reference": True}
    plain = evaluate(tiny_model.model, tiny_model.tokenizer, TINY_EVAL, **kw)
    assert plain.kv_bytes_per_token is None and plain.kv_bytes_per_token_ref is None
    fp16 = evaluate(tiny_model.model, tiny_model.tokenizer, TINY_EVAL, kv=KVCacheConfig(codec="fp16"), **kw)
    assert fp16.ppl == pytest.approx(plain.ppl, rel=1e-3)  # an fp16 cache changes nothing measurable
    assert fp16.ppl_ratio == pytest.approx(1.0, abs=1e-9) and fp16.gsm8k_kl == pytest.approx(0.0, abs=1e-9)
    gear = evaluate(
        tiny_model.model, tiny_model.tokenizer, TINY_EVAL, kv=KVCacheConfig(codec="gear-2bit"), **kw
    )
    # tiny model: 2 layers x 2 KV heads x head_dim 24 -> fp16 reference = 2 * 2 * 2 * 2 * 24 bytes/token
    assert gear.kv_bytes_per_token_ref == 384
    # at a 128-token context the fp16 tail (0..63 tokens) weighs a lot: between the blocks alone and fp16
    blocks_only = 2 * KVCacheConfig(codec="gear-2bit").build_codec().bytes_per_token(64, 24, heads=2)
    assert blocks_only < gear.kv_bytes_per_token < 0.6 * gear.kv_bytes_per_token_ref
    assert gear.ppl != fp16.ppl and gear.gsm8k_kl > 1e-6  # (a random model: top-1 barely moves)
    assert gear.details["kv_codec"]["name"] == "gear-2bit"


def test_kv_evaluation_measures_the_reference_exact_match_too(tiny_model) -> None:
    """`gsm8k_exact_match_ref` was never set with a KV codec, so a gate on it failed as "not measured:
    it needs eval.gsm8k_generate > 0" although that was set. The reference decodes with an fp16 cache."""
    from trtcompress.eval.harness import evaluate

    config = TINY_EVAL.model_copy(update={"gsm8k_generate": 1, "max_new_tokens": 4})
    kw = {"model_name": "tiny", "recipe_name": "baseline", "is_reference": True}
    report = evaluate(tiny_model.model, tiny_model.tokenizer, config, kv=KVCacheConfig(codec="int8"), **kw)
    assert report.gsm8k_exact_match is not None and report.gsm8k_exact_match_ref is not None


def test_cli_eval_kv(tiny_model_dir) -> None:
    proc = run_cli("eval", str(tiny_model_dir), "--kv", "kivi-4bit", "--json", *TINY_EVAL_FLAGS)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["kv_bytes_per_token"] < report["kv_bytes_per_token_ref"]
    assert report["protocol"]["kv_cache"]["codec"] == "kivi-4bit"
    bad = run_cli("eval", str(tiny_model_dir), "--kv", "gear-3bit", *TINY_EVAL_FLAGS)
    assert bad.returncode == 2 and "unknown KV codec 'gear-3bit'" in bad.stderr


def test_kv_perplexity_past_float_range_is_inf_not_a_crash(tiny_model_dir) -> None:
    """A model broken enough that its mean NLL passes ~709.8 nats gets ppl inf, which fails its gates,
    instead of an OverflowError that stopped `eval --kv` before any gate ran."""
    import torch

    from trtcompress.kv import get_codec
    from trtcompress.kv.evaluate import kv_perplexity
    from trtcompress.models import load_model

    model = load_model(str(tiny_model_dir), log=lambda m: None).model  # a copy of its own: scaled below
    with torch.no_grad():
        model.lm_head.weight.mul_(1e5)
    ids = list(range(3, 3 + 64))
    out = kv_perplexity(model, ids, context=32, codec=get_codec("fp16"), block_size=16)
    assert out.result.ppl == float("inf")


def test_kv_evaluation_refuses_a_context_past_the_positions(tiny_model) -> None:
    """As the plain evaluation does: `eval MODEL --kv CODEC` decoded a 2048-token window on a model of
    1024 positions and reported its perplexity."""
    from trtcompress.eval.config import EvalConfig
    from trtcompress.eval.harness import evaluate

    config = EvalConfig(ppl_tokens=2048, context=2048, gsm8k_problems=0, gsm_symbolic_problems=0)
    with pytest.raises(RecipeError, match=r"eval\.context 2048 exceeds the model.s 1024 positions"):
        evaluate(
            tiny_model.model, tiny_model.tokenizer, config, model_name="tiny", recipe_name="baseline",
            is_reference=True, kv=KVCacheConfig(codec="kivi-4bit"),
        )  # fmt: skip


def test_kv_greedy_stops_where_hf_generate_does(tiny_model, monkeypatch) -> None:
    """Greedy exact match with an fp16 cache completes as `greedy_exact_match` (HF generate) does: it
    stops at any of the generation config's EOS ids (a chat model's second end token), not only at the
    tokenizer's, and keeps the EOS token in the completion as generate does."""
    import torch

    import trtcompress.eval.metrics as metrics
    from trtcompress.eval.datasets import gsm8k_problems
    from trtcompress.kv import get_codec
    from trtcompress.kv.evaluate import kv_greedy_exact_match

    model, tok = tiny_model.model, tiny_model.tokenizer
    problems = gsm8k_problems(1)
    prompt = torch.tensor([tok(problems[0].fewshot_prompt or problems[0].prompt).input_ids])
    with torch.no_grad():
        out = model.generate(input_ids=prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    model.generation_config.eos_token_id = [tok.eos_token_id, int(out[0, prompt.shape[1] + 2])]
    texts: list[str] = []
    extract = metrics.extract_final_number
    monkeypatch.setattr(metrics, "extract_final_number", lambda text: (texts.append(text), extract(text))[1])
    metrics.greedy_exact_match(model, tok, problems, max_new_tokens=8)
    kv_greedy_exact_match(model, tok, problems, get_codec("fp16"), max_new_tokens=8)
    assert len(texts) == 2 and texts[1] == texts[0]
    assert len(tok(texts[0], add_special_tokens=False).input_ids) < 8  # it did stop early


def test_kv_codec_the_head_dim_cannot_hold_is_refused_before_compression(tiny_model_dir, monkeypatch) -> None:
    """A codec option that only the model's head dim rules out (here a rank above the tiny model's 24
    channels) was found when the first KV cache was built, after the weights were compressed, and came
    out of `build` / `eval --recipe` as a ValueError traceback: a one-line RecipeError now, up front."""
    import trtcompress.builders.compress as compress
    import trtcompress.builders.pipeline as pipeline
    from trtcompress.eval.run import evaluate_target

    def must_not_compress(*args, **kwargs):
        raise AssertionError("compressed before the KV codec was checked against the model")

    monkeypatch.setattr(compress, "compress_model", must_not_compress)
    monkeypatch.setattr(pipeline, "compress_model", must_not_compress)
    kv = [("kv_cache.codec", "gear-2bit"), ("kv_cache.options", {"rank": 30})]
    message = r"kv_cache: codec gear-2bit: a low-rank residual of rank 30 exceeds .* 24 channels"
    with pytest.raises(RecipeError, match=message):
        evaluate_target(str(tiny_model_dir), recipe_spec="int8-rtn", overrides=kv)
    with pytest.raises(RecipeError, match=message):  # a plain model: no compression, same error
        evaluate_target(str(tiny_model_dir), overrides=kv)
    recipe = with_overrides(load_recipe("int8-rtn"), [*kv, ("gates", [])])
    with pytest.raises(RecipeError, match=message):
        pipeline.build(str(tiny_model_dir), recipe, tiny_model_dir.parent / "never-built")


def test_kv_options_of_another_codec_say_how_to_clear_them() -> None:
    """`eval ARTIFACT --kv kivi-2bit` on an artifact built with GEAR options keeps those options (`--kv`
    sets kv_cache.codec only): the error named an option the user never typed, and no way out."""
    built = parse_recipe({"kv_cache": {"codec": "gear-2bit", "options": {"key_rank": 1}}}, "manifest")
    with pytest.raises(RecipeError, match=r"options\.key_rank: unknown option .*kv_cache\.options=\{\}"):
        with_overrides(built, [("kv_cache.codec", "kivi-2bit")])
    with pytest.raises(RecipeError, match=r"needs a kv_cache\.codec .*kv_cache\.options=\{\}"):
        with_overrides(built, [("kv_cache.codec", None)])
    cleared = with_overrides(built, [("kv_cache.codec", "kivi-2bit"), ("kv_cache.options", {})])
    assert cleared.kv_cache.codec == "kivi-2bit" and cleared.kv_cache.options == {}


def test_kv_check_model_refuses_a_sliding_window_and_a_head_the_codes_cannot_fill() -> None:
    """The other things the first cache or decoder would have refused mid-run, as a NotImplementedError
    or a ValueError traceback: a context past a sliding window, 3-bit value codes of a 20-channel head."""
    from transformers import AutoConfig, AutoModelForCausalLM

    def tiny(model_type: str, **config):
        base = dict(
            vocab_size=64, hidden_size=64, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256,
        )  # fmt: skip
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **{**base, **config}))

    mistral = tiny("mistral", sliding_window=16)
    KVCacheConfig(codec="fp16").check_model(mistral, 16)
    with pytest.raises(RecipeError, match=r"kv_cache: .*sliding window of 16 tokens.*at most 16 tokens"):
        KVCacheConfig(codec="fp16").check_model(mistral, 32)
    with pytest.raises(RecipeError, match=r"kv_cache: codec kivi-3bit: a head dim of 20 holds 60 bits"):
        KVCacheConfig(codec="kivi-3bit").check_model(tiny("llama", head_dim=20))


def test_a_window_no_longer_than_a_block_is_refused_for_a_lossy_codec(tiny_model, tiny_model_dir) -> None:
    """With eval.context <= kv_cache.block_size every perplexity token attends only to the exact fp16
    tail (a window's one block is compressed after its last token): `eval --kv kivi-2bit` at context 64
    reported ppl_ratio 1.0, a gate on it passing for any codec, and more bytes per token than fp16."""
    from trtcompress.eval.config import EvalConfig
    from trtcompress.eval.harness import evaluate
    from trtcompress.eval.run import evaluate_target

    message = (
        r"kv_cache: eval\.context \(64\) must be longer than kv_cache\.block_size \(64\) to measure codec "
        r"kivi-2bit: no perplexity token would attend to a compressed block"
    )
    with pytest.raises(RecipeError, match=message):
        KVCacheConfig(codec="kivi-2bit").check_model(tiny_model.model, 64)
    KVCacheConfig(codec="kivi-2bit").check_model(tiny_model.model, 65)  # one token sees a compressed block
    KVCacheConfig(codec="kivi-2bit", block_size=16, options={"group": 16}).check_model(tiny_model.model, 64)
    KVCacheConfig(codec="fp16").check_model(tiny_model.model, 32)  # the reference cache: nothing is lost
    KVCacheConfig(codec="kivi-2bit").check_model(tiny_model.model)  # serving: no evaluation window
    config = EvalConfig(ppl_tokens=128, context=64, gsm8k_problems=0, gsm_symbolic_problems=0)
    with pytest.raises(RecipeError, match=message):
        evaluate(
            tiny_model.model, tiny_model.tokenizer, config, model_name="tiny", recipe_name="baseline",
            is_reference=True, kv=KVCacheConfig(codec="kivi-2bit"),
        )  # fmt: skip
    flags = [("eval.ppl_tokens", 64), ("eval.context", 32), ("kv_cache.codec", "gear-2bit")]
    with pytest.raises(RecipeError, match=r"eval\.context \(32\) must be longer than kv_cache\.block_size"):
        evaluate_target(str(tiny_model_dir), overrides=flags)


def test_kv_bytes_per_token_is_what_the_codec_stores_counted_by_hand(tiny_model) -> None:
    """gear-2bit's defaults on the tiny model (2 layers, 2 KV heads, head dim 24, 64-token blocks, one
    fp16 sink token), every stored byte counted here from the format, not from `codec.layout`:
    keys (24 channel rows of 64 tokens, one 64-token group per row): 2-bit codes 24 x 16 B, fp8 scale
    and zero per group 24 + 24 B, their fp16 block maxima 2 + 2 B, a 3% outlier budget round(0.03 x
    1536) = 46 fp8 corrections + 46 int16 indices + one fp16 scale = 46 + 92 + 2 B; values (64 token
    rows of 24 channels, one group per row since 24 is not a multiple of 64): codes 64 x 6 B, scale and
    zero 64 + 64 B, maxima 4 B, round(0.015 x 1536) = 23 outliers: 23 + 46 + 2 B. No low-rank factors."""
    from trtcompress.kv.evaluate import kv_perplexity

    keys = 24 * 16 + (24 + 24) + (2 + 2) + (46 + 46 * 2 + 2)
    values = 64 * 6 + (64 + 64) + (2 + 2) + (23 + 23 * 2 + 2)
    block = (keys + values) * 2 * 2  # x 2 KV heads x 2 layers
    fp16_token = 2 * 2 * 2 * 24 * 2  # K and V x layers x heads x head dim x 2 bytes
    assert (keys, values, block, fp16_token) == (576, 587, 4652, 384)
    codec = KVCacheConfig(codec="gear-2bit").build_codec()
    ids = list(range(3, 3 + 256))  # two windows of 128 tokens
    out = kv_perplexity(tiny_model.model, ids, 128, codec, block_size=64, sink_tokens=1)
    # the last block's worth of steps: 65..128 tokens held = full blocks + fp16 tail + the sink token
    held = range(65, 129)
    per_token = [(n // 64 * block + (n % 64 + 1) * fp16_token) / n for n in held]
    assert out.fp16_bytes_per_token == fp16_token
    assert out.bytes_per_token == pytest.approx(sum(per_token) / len(per_token), rel=1e-12)
    every = range(2, 129)  # the whole decode's time average, after the one-token prompt
    mean = sum(n // 64 * block + (n % 64 + 1) * fp16_token for n in every) / sum(every)
    assert out.bytes_per_token_mean == pytest.approx(mean, rel=1e-12)

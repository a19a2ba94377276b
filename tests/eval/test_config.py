import pytest
from pydantic import ValidationError

from trtcompress.errors import RecipeError
from trtcompress.eval.config import EvalConfig
from trtcompress.eval.datasets import TokenStream


def test_generation_problems_stay_within_gsm8k():
    """GSM8K has 1,319 test problems: asking for more would score fewer than the protocol records."""
    assert EvalConfig(gsm8k_generate=1319).gsm8k_generate == 1319
    with pytest.raises(ValidationError, match="less than or equal to 1319"):
        EvalConfig(gsm8k_generate=1320)


def test_a_window_longer_than_the_passages_is_a_recipe_error(tiny_model):
    """A recipe value, so a one-line RecipeError for the CLI rather than a ValueError traceback."""
    stream = TokenStream(tiny_model.tokenizer)
    with pytest.raises(RecipeError, match=r"eval\.ppl_tokens"):
        stream.window(len(stream.ids) + 1)


def test_a_perplexity_window_is_a_whole_number_of_contexts():
    """1,500 tokens in windows of 1,024 scored one window and dropped the rest without a word."""
    with pytest.raises(ValidationError, match=r"whole number of windows.*use 1024 or 2048"):
        EvalConfig(ppl_tokens=1500, context=1024)
    assert EvalConfig(ppl_tokens=3072, context=1024).ppl_tokens == 3072
